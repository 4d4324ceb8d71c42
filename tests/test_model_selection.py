"""Hyperparameter search of a formula MERF with dask-ml on a real multi-process Dask cluster,
with folds of whole clusters: the example of docs/model-selection.md, executed as written."""

import json
import os
import re
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.model_selection import GroupKFold, KFold, ParameterGrid, cross_val_score

DOC = Path(__file__).resolve().parents[1] / "docs" / "model-selection.md"

pytestmark = [
    pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning"),
    pytest.mark.filterwarnings("ignore:.*training rows had no member:UserWarning"),
    # the dashboard's default port may be taken by another cluster on this machine
    pytest.mark.filterwarnings("ignore:Port .* is already in use:UserWarning"),
]


def doc_blocks() -> list[str]:
    """The page's python code blocks, in order (indented ones dedented)."""
    return [textwrap.dedent(block) for block in
            re.findall(r"^[ \t]*```python\n(.*?)^[ \t]*```$", DOC.read_text(),
                       flags=re.MULTILINE | re.DOTALL)]


def _first_fit_error(namespace):
    """Fit the first candidate in this process, raising the error its tasks met."""
    params = list(ParameterGrid(namespace["grid"]))[0]
    clone(namespace["model"]).set_params(**params).fit(namespace["frame"])
    raise AssertionError("every fit of the search failed, but a fit in this process succeeds")


@pytest.fixture(scope="module")
def documented():
    """The namespace left by the page's code: cluster and client, then the search; the page's
    last block (closing both) runs at teardown."""
    blocks = doc_blocks()
    assert len(blocks) == 4, "cluster, search, close, scorer: update the test with the page"
    start, search, close, scorer = blocks
    assert "client.close()" in close and "def neg_mse" in scorer
    assert "LocalCluster(n_workers=2" in start and "processes=True" in start
    assert "GridSearchCV" in search and "GroupKFold(n_splits=3)" in search
    namespace = {"__name__": "model_selection_doc"}
    exec(compile(start, f"{DOC}[start]", "exec"), namespace)
    try:
        try:
            exec(compile(search, f"{DOC}[search]", "exec"), namespace)
        except IndexError:  # dask-ml's refit when every fit failed (error_score=np.nan)
            _first_fit_error(namespace)
        exec(compile(scorer, f"{DOC}[scorer]", "exec"), namespace)
        yield namespace
    finally:
        exec(compile(close, f"{DOC}[close]", "exec"), namespace)


def test_the_search_ran_on_the_cluster(documented):
    from distributed import default_client
    client = documented["client"]
    assert default_client() is client
    assert len(client.scheduler_info()["workers"]) == 2
    # the (candidate, fold) fits and the refit were tasks of this scheduler
    prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert "merf-fit-score" in prefixes and "best-estimator" in prefixes, prefixes


def test_best_params_is_one_of_the_grid(documented):
    search, grid = documented["search"], documented["grid"]
    assert search.best_params_ in list(ParameterGrid(grid))
    assert np.isfinite(search.best_score_)


def test_cv_results_has_one_row_per_candidate_and_a_score_per_fold(documented):
    search, grid = documented["search"], documented["grid"]
    candidates = list(ParameterGrid(grid))
    results = pd.DataFrame(search.cv_results_)
    assert len(results) == len(candidates) == 4
    assert sorted(map(repr, results["params"])) == sorted(map(repr, candidates))
    assert search.n_splits_ == 3
    folds = sorted(c for c in results if re.fullmatch(r"split\d+_test_score", c))
    assert folds == ["split0_test_score", "split1_test_score", "split2_test_score"]
    if results[folds].isna().any(axis=None):
        _first_fit_error(documented)
    np.testing.assert_allclose(results["mean_test_score"], results[folds].mean(axis=1))
    assert set(results["rank_test_score"]) <= set(range(1, len(candidates) + 1))


def test_refit_best_estimator_predicts(documented):
    search, frame, best = documented["search"], documented["frame"], documented["best"]
    for name, value in search.best_params_.items():
        assert best.get_params()[name] == value
    assert best.n_rows_ == len(frame)  # refitted on every row
    assert set(best.b_.index) == set(frame["cluster"])
    prediction = documented["prediction"]
    assert prediction.shape == (len(frame),) and np.all(np.isfinite(prediction))
    assert best.score(frame) > search.best_score_  # known clusters score above new ones
    # a new cluster is predicted by the fixed effects alone
    new = frame.head(5).assign(cluster="never-seen")
    np.testing.assert_allclose(best.predict(new),
                               best.fe_model_.predict(new[["x1", "x2", "x3"]].to_numpy()))
    assert documented["neg_mse"](best, frame) < 0


def test_every_fold_trains_without_its_test_clusters(documented, tmp_path):
    """A second search on the same cluster whose scorer records, from the worker, the clusters
    each fold's model was trained on (``b_``'s index) and the clusters it is scored on."""
    from dask_ml.model_selection import GridSearchCV

    frame, client = documented["frame"], documented["client"]
    record_dir = str(tmp_path)

    def recording_r2(estimator, data, y=None):  # pickled by value to the workers
        Path(record_dir, f"{uuid.uuid4().hex}.json").write_text(json.dumps({
            "train": sorted(map(str, estimator.b_.index)),
            "test": sorted(map(str, data["cluster"].unique())),
            "max_iterations": estimator.max_iterations, "pid": os.getpid()}))
        return estimator.score(data)

    grid = {"max_iterations": [2, 3]}
    search = GridSearchCV(documented["model"], grid, cv=GroupKFold(n_splits=3),
                          scoring=recording_r2, error_score=np.nan, refit=False)
    search.fit(frame, groups=frame["cluster"])
    records = [json.loads(p.read_text()) for p in sorted(Path(record_dir).glob("*.json"))]

    assert len(records) == 2 * 3  # one score per (candidate, fold); no train scores, no refit
    worker_pids = set(client.run(os.getpid).values())
    assert {r["pid"] for r in records} <= worker_pids and os.getpid() not in worker_pids
    every = set(frame["cluster"])
    for record in records:
        train, test = set(record["train"]), set(record["test"])
        assert not train & test, f"clusters both trained on and tested: {sorted(train & test)}"
        assert train | test == every

    # the folds are GroupKFold's, computed here
    expected = sorted(
        (sorted(set(frame["cluster"].iloc[train_rows])), sorted(set(frame["cluster"].iloc[rows])))
        for train_rows, rows in GroupKFold(n_splits=3).split(frame, groups=frame["cluster"]))
    for candidate in grid["max_iterations"]:
        folds = sorted((r["train"], r["test"]) for r in records
                       if r["max_iterations"] == candidate)
        assert folds == expected
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))


def test_row_folds_leak_cluster_effects_into_the_score(documented):
    """The page's numbers: the same model scores far higher on random row folds (its test
    clusters trained too) than on folds of whole clusters (new clusters)."""
    frame, best = documented["frame"], documented["best"]
    model = clone(best)
    new_clusters = cross_val_score(model, frame, groups=frame["cluster"], cv=GroupKFold(3))
    known_clusters = cross_val_score(model, frame, cv=KFold(3, shuffle=True, random_state=0))
    assert new_clusters.mean() + 0.2 < known_clusters.mean()
    assert 0.2 < new_clusters.mean() < 0.6 and 0.7 < known_clusters.mean() < 0.95
