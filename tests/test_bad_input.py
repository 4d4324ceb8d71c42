"""Every bad input a new user hits gets the right result or one clear error, on every path:
merf 1.0 arrays, formula frames, Dask collections, tiny data, and model directories."""

import hashlib
import json
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor

from helpers import simulate_lmm
from merf_dask import MERF, SingularFitWarning
from merf_dask.core.ensemble import plan_members
from merf_dask.core.hashing import cluster_hashes
from merf_dask.learners import LEARNERS, make_learner

FORMULA = "y ~ x1 + x2 + x3 + (1 + t | g)"


@pytest.fixture(scope="module")
def frame():
    return simulate_lmm(n_clusters=40, seed=3)


def small_forest():
    return RandomForestRegressor(n_estimators=10, min_samples_leaf=5, random_state=0)


def merf_arrays(frame):
    X = frame[["x1", "x2", "x3"]]
    Z = pd.DataFrame({"intercept": 1.0, "t": frame["t"]})
    return X, Z, frame["g"], frame["y"]


@pytest.fixture(scope="module")
def array_model(frame):
    X, Z, clusters, y = merf_arrays(frame)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MERF(small_forest(), max_iterations=3, random_state=0).fit(X, Z, clusters, y)


# ---------------------------------------------------------------- silent wrong results

def test_predict_refuses_reordered_or_renamed_columns(frame, array_model):
    X, Z, clusters, _ = merf_arrays(frame)
    reordered = X[["x2", "x1", "x3"]]
    with pytest.raises(ValueError, match="another order"):
        array_model.predict(reordered, Z, clusters)
    with pytest.raises(ValueError, match=r"missing \['x3'\]"):
        array_model.predict(X.rename(columns={"x3": "x4"}), Z, clusters)
    with pytest.raises(ValueError, match="Z's columns"):
        array_model.predict(X, Z[["t", "intercept"]], clusters)
    # the columns in fit's order give the fitted model's predictions; arrays carry no names
    np.testing.assert_array_equal(array_model.predict(reordered[["x1", "x2", "x3"]], Z, clusters),
                                  array_model.predict(X.to_numpy(), Z.to_numpy(), clusters))


def test_cross_fit_with_two_clusters_stays_honest():
    rng = np.random.default_rng(0)
    n = 400
    data = pd.DataFrame({"x": rng.uniform(size=n), "g": np.repeat(["a", "b"], n // 2)})
    data["y"] = np.sin(6 * data["x"]) + np.where(data["g"] == "a", 1.0, -1.0) \
        + rng.normal(0, 1, n)
    fits = {oob: MERF(HistGradientBoostingRegressor(random_state=0), formula="y ~ x + (1 | g)",
                      oob=oob, max_iterations=5, tol=0, random_state=0).fit(data)
            for oob in (True, False)}
    assert fits[True].honest_kind_ == "cross-fitted"
    assert "cross-fitted" in fits[True].summary()
    # in-sample boosting fits the noise: its sigma2 is the biased one
    assert fits[True].sigma2_ > fits[False].sigma2_ + 0.1
    assert fits[True].sigma2_ == pytest.approx(1.0, abs=0.25)


@pytest.mark.parametrize("n_clusters", [2, 3, 5, 17])
def test_every_residue_class_of_a_small_fit_holds_clusters(n_clusters):
    hashes = cluster_hashes([f"c{i}" for i in range(n_clusters)])
    for seed in range(20):
        plan = plan_members(HistGradientBoostingRegressor(), honest=True, n_rows=100,
                            n_folds=2, member_rows="auto", seed=seed, cluster_hashes=hashes)
        assert set(plan.residue_of(hashes)) == set(range(plan.stride))


def test_more_folds_than_clusters_is_refused(frame):
    few = frame[frame["g"].isin(["g0", "g1"])]
    with pytest.raises(ValueError, match="n_folds=3 needs at least 3 clusters, got 2"):
        MERF(HistGradientBoostingRegressor(), formula=FORMULA, n_folds=3).fit(few)


@pytest.mark.parametrize("random_state", [7, np.random.RandomState(7)], ids=["int", "RandomState"])
def test_a_loaded_model_has_the_saved_parameters(frame, tmp_path, random_state):
    model = MERF(small_forest(), formula=FORMULA, max_iterations=2, tol=0,
                 random_state=random_state).fit(frame)
    model.save(tmp_path / "m")
    loaded = MERF.load(tmp_path / "m")
    saved_params, loaded_params = model.get_params(), loaded.get_params()
    assert type(loaded_params["fixed_effects_model"]) is RandomForestRegressor
    assert loaded_params["fixed_effects_model"].get_params() == \
        saved_params["fixed_effects_model"].get_params()
    np.testing.assert_array_equal(clone(loaded).fit(frame).predict(frame),
                                  clone(model).fit(frame).predict(frame))


def _edit_manifest(directory, edit):
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.fixture
def saved(frame, tmp_path):
    model = MERF(small_forest(), formula=FORMULA, max_iterations=2, random_state=0).fit(frame)
    model.save(tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.parametrize("edit", [
    lambda m: m.update(sigma2=m["sigma2"] * 10),
    lambda m: m["schema"]["features"].reverse(),
    lambda m: m.update(D=[[9.0, 0.0], [0.0, 9.0]]),
], ids=["sigma2", "feature order", "D"])
def test_an_edited_manifest_is_refused(saved, edit):
    _edit_manifest(saved, edit)
    with pytest.raises(ValueError, match="manifest.json was modified"):
        MERF.load(saved)


def test_a_missing_hash_entry_is_named(saved):
    def drop_learner_hash(manifest):
        del manifest["sha256"]["learner.skops"]
        content = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
        manifest["manifest_sha256"] = hashlib.sha256(
            json.dumps(content, sort_keys=True).encode()).hexdigest()
    _edit_manifest(saved, drop_learner_hash)
    with pytest.raises(ValueError, match="lists no SHA-256 for learner.skops"):
        MERF.load(saved)


def test_an_older_format_version_says_how_to_resave(saved):
    _edit_manifest(saved, lambda m: m.update(format_version=1))
    with pytest.raises(ValueError, match="format version 1.*fit the model again"):
        MERF.load(saved)


@pytest.mark.parametrize("second", ["zero", "collinear"])
def test_an_uninformative_z_column_warns(frame, second):
    X, Z, clusters, y = merf_arrays(frame)
    Z = Z.assign(t=0.0) if second == "zero" else Z.assign(t=2.0)
    with pytest.warns(SingularFitWarning, match="no variation"):
        MERF(small_forest(), max_iterations=3, random_state=0).fit(X, Z, clusters, y)


# ---------------------------------------------------------------- tiny data

TINY = {
    "4 rows in clusters of 1 and 3": pd.DataFrame({"x": [0.1, 0.5, 0.9, 0.3],
                                                   "g": ["a", "b", "b", "b"],
                                                   "y": [1.0, 2.0, 2.5, 1.7]}),
    "10 one-row clusters": pd.DataFrame({"x": np.linspace(0, 1, 10),
                                         "g": [f"c{i}" for i in range(10)],
                                         "y": np.sin(np.arange(10.0))}),
}


@pytest.mark.parametrize("oob", ["auto", True, False])
@pytest.mark.parametrize("learner", LEARNERS)
@pytest.mark.parametrize("data", TINY, ids=list(TINY))
def test_tiny_data_fits_or_states_the_minimum(data, learner, oob):
    model = MERF(make_learner(learner, random_state=0), formula="y ~ x + (1 | g)", oob=oob,
                 max_iterations=3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model.fit(TINY[data])
        except ValueError as error:
            if data == "10 one-row clusters":  # lme4's rule: a level per row is no random effect
                assert "'g' has as many levels as the data has rows (10)" in str(error)
                return
            # LightGBM refuses a fold of one row: say so, and why
            assert "rows of one member's fold" in str(error)
            assert "minimum of 2" in str(error)
            return
    assert np.isfinite(model.predict(TINY[data])).all()
    expected = {True: {"out-of-bag", "cross-fitted"}, False: {"in-sample"}}
    honest = learner != "linear" if oob == "auto" else oob  # "auto": honest but for linear
    assert model.honest_kind_ in expected[honest]


# ---------------------------------------------------------------- one rule for every path

def test_predict_of_no_rows(frame, array_model):
    model = MERF(small_forest(), formula=FORMULA, max_iterations=2, random_state=0).fit(frame)
    assert model.predict(frame.iloc[:0]).shape == (0,)
    prediction, std = model.predict(frame.iloc[:0], return_std=True)
    assert prediction.shape == std.shape == (0,)
    X, Z, clusters, _ = merf_arrays(frame.iloc[:0])
    assert array_model.predict(X, Z, clusters).shape == (0,)


def test_formula_predict_refuses_missing_features_and_ids(frame):
    model = MERF(small_forest(), formula=FORMULA, max_iterations=2, random_state=0).fit(frame)
    with pytest.raises(ValueError, match="NaN or infinite values in column 'x2'"):
        model.predict(frame.assign(x2=np.where(np.arange(len(frame)) == 3, np.nan, frame["x2"])))
    with pytest.raises(ValueError, match="1 missing ids"):
        model.predict(frame.assign(g=frame["g"].where(np.arange(len(frame)) != 5)))


def test_cluster_ids_fit_accepts_are_ids_save_and_load_keep(frame, tmp_path):
    X, Z, _, y = merf_arrays(frame)
    mixed = pd.Series([1 if i % 2 else "1" for i in range(len(frame))], dtype=object)
    with pytest.raises(TypeError, match="mixed"):
        MERF(small_forest()).fit(X, Z, mixed, y)
    tuples = pd.Series([(i % 3, i % 5) for i in range(len(frame))])
    with pytest.raises(TypeError, match="tuple"):
        MERF(small_forest()).fit(X, Z, tuples, y)
    ints = frame["g"].str[1:].astype(int)
    model = MERF(small_forest(), max_iterations=2, random_state=0).fit(X, Z, ints, y)
    model.save(tmp_path / "ints")
    np.testing.assert_array_equal(MERF.load(tmp_path / "ints").predict(X, Z, ints),
                                  model.predict(X, Z, ints))


def test_huge_and_constant_responses(frame):
    with pytest.raises(ValueError, match=r"y has values up to 1.*e\+30.*rescale y"):
        MERF(small_forest(), formula=FORMULA).fit(frame.assign(y=frame["y"] * 1e300))
    with pytest.raises(ValueError, match="no variance to decompose"):
        MERF(small_forest(), formula=FORMULA, random_state=0).fit(frame.assign(y=3.0))


def test_a_live_client_does_not_move_a_pandas_fit(frame, dask_client):
    model = MERF(small_forest(), formula=FORMULA, max_iterations=2, random_state=0).fit(frame)
    assert model.n_partitions_ == 1
    on_cluster = MERF(small_forest(), formula=FORMULA, max_iterations=2, random_state=0,
                      client=dask_client).fit(frame)
    assert on_cluster.n_partitions_ > 1


def test_dask_fits_refuse_missing_ids_and_features(frame, dask_client):
    import dask.dataframe as dd
    bad_id = frame.assign(g=frame["g"].where(frame["g"] != "g4"))
    with pytest.raises(ValueError, match="grouping column 'g' has .* missing ids"):
        MERF(small_forest(), formula=FORMULA, max_iterations=2).fit(
            dd.from_pandas(bad_id, npartitions=3))
    bad_x = frame.assign(x1=np.where(np.arange(len(frame)) == 7, np.inf, frame["x1"]))
    with pytest.raises(ValueError, match="column 'x1'"):
        MERF(small_forest(), formula=FORMULA, max_iterations=2).fit(
            dd.from_pandas(bad_x, npartitions=3))


def test_predict_of_a_dask_frame_with_empty_partitions(frame, dask_client):
    import dask.dataframe as dd
    model = MERF(small_forest(), formula=FORMULA, max_iterations=2, random_state=0).fit(frame)
    ddf = dd.from_pandas(frame, npartitions=4)
    filtered = ddf[ddf["g"] == "g0"]  # most partitions are empty now
    np.testing.assert_allclose(filtered.pipe(model.predict).compute().to_numpy(),
                               model.predict(frame[frame["g"] == "g0"]))


# ---------------------------------------------------------------- merf 1.0 code unchanged

def test_merf_constructor_names(frame):
    X, Z, clusters, y = merf_arrays(frame)
    model = MERF(fixed_effects_model=small_forest(), gll_early_stop_threshold=0.1,
                 max_iterations=10).fit(X, Z, clusters, y)
    assert model.n_iter_ < 10  # stopped early at the merf threshold
    assert model.trained_b.shape == (40, 2)
    with pytest.raises(ValueError, match="give only one"):
        MERF(small_forest(), gll_early_stop_threshold=0.1, tol=0.01).fit(X, Z, clusters, y)


# ---------------------------------------------------------------- the same rules from the CLI

def _merf_dask(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", "from merf_dask.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_fit_names_a_missing_cluster_id_and_writes_nothing(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    data = simulate_lmm(n_clusters=20, seed=5)
    data.loc[7, "g"] = None
    (tmp_path / "lake").mkdir()
    pq.write_table(pa.Table.from_pandas(data, preserve_index=False),
                   tmp_path / "lake" / "part-0.parquet")
    result = _merf_dask("fit", str(tmp_path / "lake"), "--formula", "y ~ x1 + (1 | g)",
                        "--output", str(tmp_path / "model"), "--n-workers", "1",
                        "--max-iterations", "2")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("merf-dask: error:") and "'g'" in last and "missing ids" in last
    assert not (tmp_path / "model").exists()


def test_cli_evaluate_and_predict_a_lake_with_an_empty_file(frame, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    model = MERF(small_forest(), formula=FORMULA, max_iterations=2, random_state=0).fit(frame)
    model.save(tmp_path / "model")
    (tmp_path / "lake").mkdir()
    table = pa.Table.from_pandas(frame, preserve_index=False)
    pq.write_table(table, tmp_path / "lake" / "a.parquet")
    pq.write_table(table.slice(0, 0), tmp_path / "lake" / "b.parquet")
    evaluated = _merf_dask("evaluate", str(tmp_path / "lake"), "--model", str(tmp_path / "model"))
    assert evaluated.returncode == 0, evaluated.stderr
    assert "known clusters" in evaluated.stdout
    predicted = _merf_dask("predict", str(tmp_path / "lake"), "--model", str(tmp_path / "model"),
                           "--output", str(tmp_path / "predictions"))
    assert predicted.returncode == 0, predicted.stderr
    written = pd.read_parquet(tmp_path / "predictions")
    np.testing.assert_allclose(np.sort(written["prediction"].to_numpy()),
                               np.sort(model.predict(frame)))


def test_the_manifest_keeps_the_keys_its_readers_use(saved):
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["n_iter"] == len(manifest["history"]) == 2
    assert manifest["oob"] is True and manifest["honest"] in {"out-of-bag", "partly in-sample"}
    assert manifest["converged"] is False and manifest["model_size_bytes"] > 0
