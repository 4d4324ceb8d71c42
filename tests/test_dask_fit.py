"""Distributed fits on a real two-process LocalCluster agree with in-process fits."""

import time

import dask
import dask.dataframe as dd
import distributed
import numpy as np
import pandas as pd
import pytest
from dask.utils import key_split
from distributed.diagnostics.plugin import SchedulerPlugin
from sklearn.linear_model import LinearRegression

from merf_dask import MERF
from merf_dask.core.random_effects import RandomFactor
from merf_dask.dask.partitioning import check_cluster_partitions, ensure_cluster_partitions

from helpers import simulate_lmm

LINEAR = dict(max_iterations=15, tol=0)


@pytest.fixture(scope="module")
def frame():
    frame = simulate_lmm(n_clusters=60, seed=5)
    frame["one"] = 1.0
    return frame


@pytest.fixture(scope="module")
def in_process(frame):
    return MERF(LinearRegression(), **LINEAR).fit(
        frame[["x1", "x2", "x3"]], frame[["one", "t"]], frame["g"], frame["y"])


def assert_same_model(model, reference):
    np.testing.assert_allclose(model.sigma2_, reference.sigma2_, rtol=1e-8)
    np.testing.assert_allclose(model.D_, reference.D_, rtol=1e-8)
    np.testing.assert_allclose(model.gll_history_, reference.gll_history_, rtol=1e-8)
    b = model.b_.loc[reference.b_.index].to_numpy()
    np.testing.assert_allclose(b, reference.b_.to_numpy(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("npartitions", [1, 4])
def test_dask_collections_match_in_process(dask_client, frame, in_process, npartitions):
    # partitions cut by row count split clusters: the fit must shuffle them whole first
    ddf = dd.from_pandas(frame, npartitions=npartitions, sort=False)
    model = MERF(LinearRegression(), client=dask_client, **LINEAR).fit(
        ddf[["x1", "x2", "x3"]], ddf[["one", "t"]], ddf["g"], ddf["y"])
    assert model.n_partitions_ == npartitions
    assert_same_model(model, in_process)


def test_pandas_input_with_a_client_runs_on_the_cluster(dask_client, frame, in_process):
    model = MERF(LinearRegression(), client=dask_client, **LINEAR).fit(
        frame[["x1", "x2", "x3"]], frame[["one", "t"]], frame["g"], frame["y"])
    assert model.n_partitions_ > 1
    assert_same_model(model, in_process)


def test_dask_predict_is_lazy_and_equals_in_memory(dask_client, frame, in_process):
    ddf = dd.from_pandas(frame, npartitions=3)
    lazy = in_process.predict(ddf[["x1", "x2", "x3"]], ddf[["one", "t"]], ddf["g"])
    assert isinstance(lazy, dd.Series)
    eager = in_process.predict(frame[["x1", "x2", "x3"]], frame[["one", "t"]], frame["g"])
    np.testing.assert_allclose(lazy.compute().to_numpy(), eager, rtol=1e-12)


def test_data_local_forest_fits_on_the_workers(dask_client):
    from merf_dask.simulate import simulate_frame
    data = simulate_frame(n_rows=6000, n_clusters=150, seed=2)
    ddf = dd.from_pandas(data, npartitions=4, sort=False)
    ones = ddf[["x1"]].map_partitions(lambda p: pd.DataFrame({"one": np.ones(len(p))},
                                                             index=p.index))
    with pytest.warns(UserWarning, match="not partitioned by cluster"):
        model = MERF(random_state=0, max_iterations=6, tol=0, client=dask_client).fit(
            ddf[["x1", "x2", "x3"]], ones, ddf["cluster"], ddf["y"])
    assert model.n_partitions_ == 4
    assert len(model.fe_model_.estimators_) == 100
    # honest predictions keep the variance components near the truth (sigma2 = 1, D = 4.5)
    assert 0.7 < model.sigma2_ < 2.5
    assert 0.75 * 4.5 < model.D_[0, 0] < 1.25 * 4.5
    assert set(model.b_.index) == set(data["cluster"])


def test_partition_invariant_is_checked(dask_client, frame):
    ddf = dd.from_pandas(frame, npartitions=4, sort=False)
    with pytest.raises(ValueError, match="span more than one partition"):
        check_cluster_partitions(ddf, "g")
    check_cluster_partitions(ensure_cluster_partitions(ddf, "g"), "g")


def test_members_use_one_thread_on_workers_and_the_model_the_threads_asked_for(dask_client,
                                                                                 frame):
    """LightGBM's n_jobs=None means every core: on a worker, which runs one task per thread,
    each member is fitted with one thread; the returned model keeps the user's setting."""
    from lightgbm import LGBMRegressor  # in the test extra
    learner = LGBMRegressor(n_estimators=10, verbose=-1, random_state=0)
    assert learner.n_jobs is None
    model = MERF(learner, client=dask_client, max_iterations=2, tol=0).fit(
        frame[["x1", "x2", "x3"]], frame[["one", "t"]], frame["g"], frame["y"])
    members = model.fe_model_.members
    assert len(members) == 2
    for member in members:
        assert member.booster_.params["num_threads"] == 1
        assert member.n_jobs is None
    assert learner.n_jobs is None  # the user's learner is not touched


@pytest.fixture(scope="module")
def lake_rows(tmp_path_factory):
    """A simulated Parquet lake of 4 buckets, read lazily (every pass reads the files again)."""
    from merf_dask.io.lake import read_lake, write_simulated_lake
    url = tmp_path_factory.mktemp("cache") / "lake"
    write_simulated_lake(url, n_rows=4000, n_clusters=80, seed=3, n_buckets=4)
    frame = read_lake(url, columns=["x1", "x2", "x3", "y", "cluster"], cluster_column="cluster")
    return frame.assign(one=1.0)


@pytest.mark.parametrize("honest", [True, False])
def test_kept_and_streamed_partitions_give_the_same_fit(dask_client, lake_rows, honest):
    from sklearn.ensemble import RandomForestRegressor

    from merf_dask.dask.em import DaskEMData
    from merf_dask.core.em import run_em
    from merf_dask.core.ensemble import plan_members

    learner = RandomForestRegressor(n_estimators=8, min_samples_leaf=5, random_state=0)
    results = {}
    for cache in (False, True):
        data = DaskEMData(client=dask_client, partitions=lake_rows.to_delayed(),
                          x_columns=["x1", "x2", "x3"], z_columns=[["one"]],
                          factors=[RandomFactor("cluster", ("one",))],
                          factor_columns=["cluster"], y_column="y", cache=cache)
        assert data.cached is cache
        # members on 4 residue classes, so pieces move between tasks as on big data
        plan = plan_members(learner, honest=honest, n_rows=data.n_rows, n_folds=2,
                            member_rows=1000, seed=0)
        results[cache] = run_em(data, plan=plan, max_iterations=3, tol=0)
    streamed, kept = results[False], results[True]
    assert [r.gll for r in kept.history] == [r.gll for r in streamed.history]
    np.testing.assert_array_equal(kept.effects[0].b, streamed.effects[0].b)
    assert kept.sigma2 == streamed.sigma2
    X = lake_rows[["x1", "x2", "x3"]].compute().to_numpy()
    np.testing.assert_array_equal(kept.fe_model.predict(X), streamed.fe_model.predict(X))


@pytest.mark.parametrize("n_bytes, limits, kept", [
    (100, [1000, 1000], True),  # 5 % of the memory there is
    (201, [1000, 1000], False),  # over a tenth
    (100, [1000, 0], False),  # a worker without a limit: the memory there is is unknown
    (100, [], False),
])
def test_partitions_are_kept_in_worker_memory_only_when_they_fit(n_bytes, limits, kept):
    from merf_dask.dask.em import fits_in_memory
    assert fits_in_memory(n_bytes, limits) is kept


def test_small_data_is_kept_in_worker_memory_by_default(dask_client, lake_rows):
    from merf_dask.dask.em import DaskEMData
    data = DaskEMData(client=dask_client, partitions=lake_rows.to_delayed(),
                      x_columns=["x1", "x2", "x3"], z_columns=[["one"]],
                      factors=[RandomFactor("cluster", ("one",))], factor_columns=["cluster"],
                      y_column="y")
    assert data.cached
    assert len(data.sources) == lake_rows.npartitions
    distributed.wait(data.sources)
    assert all(dask_client.who_has(data.sources).values())  # each on a worker


class _MostHeldPieces(SchedulerPlugin):
    """Counts the partitions' M-step pieces in worker memory, and the most at any time."""

    name = "most-held-pieces"

    def __init__(self):
        self.held = self.most = 0

    def transition(self, key, start, finish, *args, **kwargs):
        if key_split(key) == "m_step_pieces":
            self.held += (finish == "memory") - (start == "memory")
            self.most = max(self.most, self.held)


def _slow_read(partition):
    time.sleep(0.25)
    return partition


def test_the_m_step_holds_a_few_partitions_pieces_not_all(dask_client, tmp_path):
    """Each partition's pieces are let go once cut into classes, and the fits run before more
    pieces are cut: memory for a few partitions, however many there are.

    Each read takes a quarter second, as a real partition's read takes longer than a scheduler
    round trip: with instant reads a loaded machine finishes several partitions before the
    scheduler's message to cut the first arrives, and the count measures that latency instead.
    """
    from sklearn.ensemble import RandomForestRegressor

    from merf_dask.dask.em import DaskEMData
    from merf_dask.core.ensemble import plan_members
    from merf_dask.io.lake import read_lake, write_simulated_lake

    write_simulated_lake(tmp_path / "lake", n_rows=16_000, n_clusters=320, seed=3, n_buckets=16)
    frame = read_lake(tmp_path / "lake", columns=["x1", "x2", "x3", "y", "cluster"],
                      cluster_column="cluster").assign(one=1.0)
    partitions = [dask.delayed(_slow_read)(partition) for partition in frame.to_delayed()]
    data = DaskEMData(client=dask_client, partitions=partitions,
                      x_columns=["x1", "x2", "x3"], z_columns=[["one"]],
                      factors=[RandomFactor("cluster", ("one",))], factor_columns=["cluster"],
                      y_column="y", cache=False)
    plan = plan_members(RandomForestRegressor(n_estimators=16, random_state=0), honest=True,
                        n_rows=data.n_rows, n_folds=2, member_rows=1000, seed=0)
    dask_client.register_plugin(_MostHeldPieces())
    try:
        data.fit_fixed_effects(plan, {})
        most = dask_client.run_on_scheduler(
            lambda dask_scheduler: dask_scheduler.plugins[_MostHeldPieces.name].most)
    finally:
        dask_client.unregister_scheduler_plugin(_MostHeldPieces.name)
    assert frame.npartitions == 16
    # two per worker thread (the scheduler sends each thread its next read ahead); 16 when the
    # M-step kept them all to its end
    assert 1 <= most <= 6
