"""The same seed gives the same model wherever and however the rows arrive, and a checkpointed
fit resumes to the model of an uninterrupted one.

Reproducibility is checked on a real two-process LocalCluster, on pandas frames, on Dask
DataFrames of 1, 3 and 5 cluster-whole partitions, on lakes of 2 and 8 buckets and on shuffled
rows, against an in-process fit. ``member_rows`` is small so that the M-step's members train on
4 residue classes of clusters (stride 4), which a 2-bucket lake splits and an 8-bucket lake
spreads over several buckets.

The in-process fits run before the module's Dask client exists (a client, once created, becomes
the default and makes any later fit distributed): fixtures that fit in-process are requested
before ``dask_client`` and check that no client is active.
"""

import json
import warnings

import dask.dataframe as dd
import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor
from sklearn.exceptions import ConvergenceWarning
from sklearn.tree import DecisionTreeRegressor
from threadpoolctl import threadpool_limits

from merf_dask import MERF
from merf_dask.core import ensemble
from merf_dask.io.lake import read_lake, write_lake
from merf_dask.dask.partitioning import check_cluster_partitions
from merf_dask.simulate import simulate_frame

FORMULA = "y ~ x1 + x2 + x3 + (1 | cluster)"
N_ROWS, N_CLUSTERS = 2000, 80
MEMBER_ROWS = 600  # stride 4 for 2000 rows
LEARNERS = {
    "forest": lambda: RandomForestRegressor(n_estimators=16, min_samples_leaf=5,
                                            max_features=1.0, random_state=0),
    # max_features < 1 makes the boosting depend on its seed (at 1.0 it is deterministic, and
    # the cross-fit's folds come from cluster hashes: the fit's seed would change nothing)
    "cross-fit": lambda: HistGradientBoostingRegressor(max_iter=20, max_features=0.5,
                                                       random_state=0),
    # members that go on boosting from the M-step before (2 more rounds in each)
    "warm-started": lambda: HistGradientBoostingRegressor(max_iter=20, max_features=0.5,
                                                          early_stopping=False,
                                                          warm_start=True, random_state=0),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_library():
    with threadpool_limits(limits=1):
        yield


def active_client():
    from distributed import default_client
    try:
        return default_client()
    except ValueError:
        return None


def merf(kind, **params):
    params = {"random_state": 0, "max_iterations": 4, "tol": 0, "member_rows": MEMBER_ROWS,
              **params}
    return MERF(LEARNERS[kind](), formula=FORMULA, **params)


def fit(model, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(data)


def shuffled(frame, seed=1):
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


@pytest.fixture(scope="module")
def frame():
    return simulate_frame(n_rows=N_ROWS, n_clusters=N_CLUSTERS, seed=3)


@pytest.fixture(scope="module")
def in_process(frame, warm_checkpoint):
    """In-process fits of each learner, on the frame and on its rows shuffled (requesting the
    interrupted warm-started fit's checkpoint too, so that it is written in-process)."""
    assert active_client() is None, "in-process fits must run before the Dask client starts"
    models = {}
    for kind in LEARNERS:
        models[kind] = fit(merf(kind), frame)
        models[kind, "shuffled"] = fit(merf(kind), shuffled(frame))
        for model in (models[kind], models[kind, "shuffled"]):
            assert model.n_partitions_ == 1
    return models


def assert_same_model(model, reference, frame):
    assert model.n_iter_ == reference.n_iter_
    assert sorted(model.b_.index.astype(str)) == sorted(reference.b_.index.astype(str))
    b = model.b_.set_axis(model.b_.index.astype(str)).loc[reference.b_.index.astype(str)]
    np.testing.assert_allclose(b.to_numpy(), reference.b_.to_numpy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(model.sigma2_, reference.sigma2_, rtol=0, atol=1e-9)
    np.testing.assert_allclose(model.D_, reference.D_, rtol=0, atol=1e-9)
    np.testing.assert_allclose(model.sigma2_history_, reference.sigma2_history_, rtol=0,
                               atol=1e-9)
    np.testing.assert_allclose(model.predict(frame), reference.predict(frame), rtol=0,
                               atol=1e-9)


def cluster_whole_partitions(frame, n_partitions, seed):
    """A Dask DataFrame of ``n_partitions`` partitions, each holding whole clusters (assigned at
    random), with the rows of each partition in random order."""
    rng = np.random.default_rng(seed)
    ids = frame["cluster"].unique()
    part_of_cluster = dict(zip(ids, rng.permutation(len(ids)) % n_partitions))
    part_of_row = frame["cluster"].map(part_of_cluster).to_numpy()
    parts = [shuffled(frame[part_of_row == p], seed=seed + p) for p in range(n_partitions)]
    ddf = dd.from_map(lambda part: part, parts, meta=frame.iloc[:0], enforce_metadata=False)
    assert ddf.npartitions == n_partitions
    check_cluster_partitions(ddf, "cluster")
    return ddf


# ------------------------------------------------------------- in-process


@pytest.mark.parametrize("kind", LEARNERS)
def test_shuffled_rows_give_the_same_model(in_process, frame, kind):
    assert_same_model(in_process[kind, "shuffled"], in_process[kind], frame)


@pytest.mark.parametrize("kind", LEARNERS)
def test_another_seed_gives_another_model(in_process, frame, kind):
    """The comparisons above can fail: a different seed moves b by far more than 1e-9."""
    assert active_client() is None
    other = fit(merf(kind, random_state=1), frame)
    b = other.b_.loc[in_process[kind].b_.index].to_numpy()
    assert np.max(np.abs(b - in_process[kind].b_.to_numpy())) > 1e-6
    assert other.sigma2_ != in_process[kind].sigma2_


# ------------------------------------------------------------ checkpoints
# (in-process: they count the learner's fit calls with a class attribute)


class Interrupting(DecisionTreeRegressor):
    """A cross-fitted learner that counts its fits and raises on the ``fail_at``-th."""

    calls = 0
    fail_at = None

    def fit(self, X, y, sample_weight=None, check_input=True):
        cls = type(self)
        cls.calls += 1
        if cls.fail_at is not None and cls.calls >= cls.fail_at:
            raise RuntimeError("interrupted")
        return super().fit(X, y, sample_weight=sample_weight, check_input=check_input)


@pytest.fixture
def interrupting():
    Interrupting.calls, Interrupting.fail_at = 0, None
    yield Interrupting
    Interrupting.calls, Interrupting.fail_at = 0, None


N_FOLDS = 2  # members per M-step: 2 folds, data far below member_rows


def checkpoint_model(random_state=0, checkpoint=None):
    return MERF(Interrupting(max_depth=5, min_samples_leaf=5), formula=FORMULA,
                random_state=random_state, max_iterations=6, tol=0, n_folds=N_FOLDS,
                checkpoint=checkpoint)


def checkpoint_metadata(path):
    return json.loads(pq.read_schema(path).metadata[b"merf_dask:checkpoint"])


def interrupt_after_iteration_3(frame, path, random_state=0):
    Interrupting.calls, Interrupting.fail_at = 0, 3 * N_FOLDS + 1  # first fit of iteration 4
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(checkpoint_model(random_state, checkpoint=path), frame)
    assert path.exists()
    assert checkpoint_metadata(path)["iteration"] == 3
    Interrupting.calls, Interrupting.fail_at = 0, None


def test_checkpointed_fit_resumes_to_the_uninterrupted_model(frame, tmp_path, interrupting):
    assert active_client() is None
    reference = fit(checkpoint_model(), frame)
    assert interrupting.calls == 6 * N_FOLDS and reference.resumed_from_ == 0
    path = tmp_path / "ck.parquet"
    interrupt_after_iteration_3(frame, path)
    resumed = fit(checkpoint_model(checkpoint=path), frame)
    assert resumed.resumed_from_ == 3
    assert interrupting.calls == 3 * N_FOLDS  # only iterations 4 to 6 were fitted
    assert resumed.n_iter_ == 6 and len(resumed.gll_history_) == 6
    assert not path.exists()  # removed at the end of the fit
    assert_same_model(resumed, reference, frame)
    np.testing.assert_allclose(resumed.gll_history_, reference.gll_history_, rtol=1e-12)


def test_checkpoint_of_other_parameters_or_data_is_ignored(frame, tmp_path, interrupting):
    assert active_client() is None
    path = tmp_path / "ck.parquet"
    interrupt_after_iteration_3(frame, path, random_state=0)
    other_seed = fit(checkpoint_model(random_state=1, checkpoint=path), frame)
    assert other_seed.resumed_from_ == 0
    assert interrupting.calls == 6 * N_FOLDS
    assert_same_model(other_seed, fit(checkpoint_model(random_state=1), frame), frame)

    interrupt_after_iteration_3(frame, path, random_state=0)
    fewer_rows = frame[frame["cluster"] != frame["cluster"].iloc[0]]
    other_data = fit(checkpoint_model(random_state=0, checkpoint=path), fewer_rows)
    assert other_data.resumed_from_ == 0
    assert interrupting.calls == 6 * N_FOLDS
    assert not path.exists()


def interrupted_warm_started_fit(frame, path):
    """A warm-started fit with a checkpoint, stopped in its fourth M-step (its members' fits
    raise from then on: the learner itself must stay one the checkpoint trusts)."""
    reference = fit(merf("warm-started", max_iterations=6), frame)
    n_members = len(reference.fe_model_.members)
    calls = []
    grow = ensemble._fit_fold_member

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3 * n_members:
            raise RuntimeError("interrupted")
        return grow(*args, **kwargs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ensemble, "_fit_fold_member", interrupting)
        with pytest.raises(RuntimeError, match="interrupted"):
            fit(merf("warm-started", max_iterations=6, checkpoint=path), frame)
    assert checkpoint_metadata(path)["iteration"] == 3
    assert len(checkpoint_metadata(path)["member_indices"]) == n_members
    return reference


@pytest.fixture(scope="module")
def warm_checkpoint(frame, tmp_path_factory):
    """An interrupted warm-started fit's checkpoint (written in-process, before the module's
    client exists) and the uninterrupted fit's model."""
    assert active_client() is None
    path = tmp_path_factory.mktemp("warm") / "ck.parquet"
    return path, interrupted_warm_started_fit(frame, path)


def test_a_warm_started_fit_resumes_to_the_uninterrupted_model(frame, tmp_path):
    """The checkpoint holds the warm-started members; the resumed fit goes on boosting from
    them (and from their stage sums, recomputed stage by stage) to the uninterrupted model."""
    assert active_client() is None
    path = tmp_path / "ck.parquet"
    reference = interrupted_warm_started_fit(frame, path)
    resumed = fit(merf("warm-started", max_iterations=6, checkpoint=path), frame)
    assert resumed.resumed_from_ == 3 and resumed.n_iter_ == 6
    assert not path.exists()
    assert [len(m.stages) for m in resumed.fe_model_.members] == \
        [len(m.stages) for m in reference.fe_model_.members]
    assert_same_model(resumed, reference, frame)


def long_pipeline(with_std):
    """A learner whose repr is longer than scikit-learn's 700 characters, differing from its
    sibling only in the middle step (which the repr elides with '...')."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    steps = [StandardScaler(with_mean=False) for _ in range(16)]
    steps[6] = StandardScaler(with_std=with_std)
    return make_pipeline(*steps, Interrupting(max_depth=5, min_samples_leaf=5))


def test_checkpoint_of_a_learner_differing_deep_inside_is_ignored(frame, tmp_path,
                                                                  interrupting):
    assert active_client() is None
    path = tmp_path / "ck.parquet"
    first, second = long_pipeline(True), long_pipeline(False)
    assert first.get_params() != second.get_params()
    Interrupting.calls, Interrupting.fail_at = 0, 3 * N_FOLDS + 1
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(MERF(first, formula=FORMULA, random_state=0, max_iterations=6, tol=0,
                 checkpoint=path), frame)
    Interrupting.calls, Interrupting.fail_at = 0, None
    assert checkpoint_metadata(path)["iteration"] == 3
    model = fit(MERF(second, formula=FORMULA, random_state=0, max_iterations=6, tol=0,
                     checkpoint=path), frame)
    assert model.resumed_from_ == 0


# ---------------------------------------------------------- on the cluster


@pytest.mark.parametrize("kind", LEARNERS)
def test_pandas_frame_on_the_cluster(in_process, dask_client, frame, kind):
    model = fit(merf(kind, client=dask_client), frame)
    assert model.n_partitions_ > 1
    assert_same_model(model, in_process[kind], frame)
    model = fit(merf(kind, client=dask_client), shuffled(frame, seed=5))
    assert_same_model(model, in_process[kind], frame)


def test_a_warm_started_fit_resumes_on_the_cluster(in_process, warm_checkpoint, dask_client,
                                                   frame):
    """An in-process fit's checkpoint resumes on the cluster (its members scattered to the
    workers, every partition's stage sums recomputed there) to the uninterrupted model."""
    path, reference = warm_checkpoint
    resumed = fit(merf("warm-started", max_iterations=6, checkpoint=path, client=dask_client),
                  frame)
    assert resumed.resumed_from_ == 3 and resumed.n_partitions_ > 1
    assert_same_model(resumed, reference, frame)


@pytest.mark.parametrize("n_partitions", [1, 3, 5])
def test_dask_frame_of_cluster_whole_partitions(in_process, dask_client, frame, n_partitions):
    ddf = cluster_whole_partitions(frame, n_partitions, seed=n_partitions)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no shuffle: the partitions are kept
        model = fit(merf("forest", client=dask_client), ddf)
    assert model.n_partitions_ == n_partitions
    assert_same_model(model, in_process["forest"], frame)


@pytest.mark.parametrize("n_buckets", [2, 8])
@pytest.mark.parametrize("kind", LEARNERS)
def test_lakes_of_any_bucket_count(in_process, dask_client, frame, tmp_path, n_buckets, kind):
    url = tmp_path / f"lake{n_buckets}"
    write_lake(shuffled(frame, seed=n_buckets), url, cluster_column="cluster",
               n_buckets=n_buckets)
    lake = read_lake(url, cluster_column="cluster")
    assert lake.npartitions == n_buckets
    model = fit(merf(kind, client=dask_client), lake)
    assert model.n_partitions_ == n_buckets
    assert_same_model(model, in_process[kind], frame)
