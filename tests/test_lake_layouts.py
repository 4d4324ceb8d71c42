"""Lakes laid out however pipelines lay them out, read through a bucketed copy written once.

The foreign lakes here are written with pyarrow in layouts merf-dask would never write: hive
directories by day with every cluster in every day, files of very different sizes, an empty file.
"""

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from merf_dask import MERF
from merf_dask.io.lake import bucket_lake, bucketed_by, bucketed_copy, read_lake, write_lake
from merf_dask.simulate import simulate_frame

FORMULA = "y ~ x1 + x2 + x3 + (1 | cluster)"
#: Shares of the rows in each day directory: files of very different sizes.
DAY_SHARES = [0.55, 0.25, 0.12, 0.05, 0.03]


def merf_dask(*args, env=None):
    return subprocess.run([sys.executable, "-c", "from merf_dask.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def write_by_day(frame, root, seed=0):
    """``frame`` as ``root/day=D/part-0.parquet``: rows drawn into days at random (so every
    cluster is in every day), plus an empty file."""
    rng = np.random.default_rng(seed)
    day = rng.choice(len(DAY_SHARES), size=len(frame), p=DAY_SHARES)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    for d in range(len(DAY_SHARES)):
        (root / f"day={d}").mkdir(parents=True)
        pq.write_table(table.filter(pa.array(day == d)), root / f"day={d}" / "part-0.parquet")
    pq.write_table(table.slice(0, 0), root / "day=0" / "part-1.parquet")
    return day


def assert_same_model(model, reference):
    """The same trees, random effects and variance components, bit for bit."""
    assert model.sigma2_history_ == reference.sigma2_history_
    np.testing.assert_array_equal(model.b_.loc[reference.b_.index], reference.b_)
    trees, reference_trees = model.fe_model_.estimators_, reference.fe_model_.estimators_
    assert len(trees) == len(reference_trees)
    for tree, reference_tree in zip(trees, reference_trees):
        for name in ("feature", "threshold", "value"):
            np.testing.assert_array_equal(getattr(tree.tree_, name),
                                          getattr(reference_tree.tree_, name))


@pytest.fixture(scope="module")
def frame():
    return simulate_frame(n_rows=3_000, n_clusters=150, seed=0)


def test_a_lake_laid_out_by_day_fits_the_model_of_its_bucketed_lake(tmp_path, frame):
    """`merf-dask fit` on the by-day lake writes a bucketed copy under the scratch location,
    reuses it in the next fit, writes a new one when the source changes, and fits the same
    model as merf-dask's own lake of the same rows (another bucket count)."""
    day = write_by_day(frame, tmp_path / "by_day")
    assert all(frame.loc[day == d, "cluster"].nunique() > 100 for d in range(3))
    write_lake(frame, tmp_path / "bucketed", cluster_column="cluster", n_buckets=3)
    env = {"MERF_DASK_SCRATCH": str(tmp_path / "scratch")}

    def fit(lake, output):
        fitted = merf_dask("fit", str(tmp_path / lake), "--formula", FORMULA, "--output",
                           str(tmp_path / output), "--n-workers", "2", "--max-iterations", "2",
                           "--learner", "extra-trees", "--quiet", env=env)
        assert fitted.returncode == 0, fitted.stderr
        return MERF.load(tmp_path / output)

    reference = fit("bucketed", "reference")
    from_days = fit("by_day", "from_days")
    assert_same_model(from_days, reference)
    np.testing.assert_array_equal(from_days.predict(frame), reference.predict(frame))

    (copy,) = (tmp_path / "scratch").iterdir()
    assert bucketed_by(copy) == "cluster"
    assert len(read_lake(copy).compute()) == len(frame)
    written = {path: path.stat().st_mtime_ns for path in copy.rglob("*.parquet")}
    fit("by_day", "again")
    assert {path: path.stat().st_mtime_ns for path in copy.rglob("*.parquet")} == written

    pq.write_table(pa.Table.from_pandas(frame.head(10), preserve_index=False),
                   tmp_path / "by_day" / "day=4" / "part-1.parquet")
    fit("by_day", "changed")
    assert len(list((tmp_path / "scratch").iterdir())) == 2


def test_the_bucket_command_writes_a_lake_bucketed_by_the_column(tmp_path, frame):
    write_by_day(frame, tmp_path / "by_day")
    done = merf_dask("bucket", str(tmp_path / "by_day"), "--cluster", "cluster", "--output",
                     str(tmp_path / "lake"), "--buckets", "4", "--n-workers", "1")
    assert done.returncode == 0, done.stderr
    assert bucketed_by(tmp_path / "lake") == "cluster"
    lake = read_lake(tmp_path / "lake", cluster_column="cluster")
    assert lake.npartitions == 4
    rows = lake.compute().sort_values(["cluster", "x1"]).reset_index(drop=True)
    expected = frame.sort_values(["cluster", "x1"]).reset_index(drop=True)
    np.testing.assert_array_equal(rows[expected.columns].to_numpy(), expected.to_numpy())
    again = merf_dask("bucket", str(tmp_path / "by_day"), "--cluster", "cluster", "--output",
                      str(tmp_path / "lake"))
    assert again.returncode == 1 and "--overwrite" in again.stderr
    assert again.stderr.count("\n") == 1  # one line, no traceback
    unknown = merf_dask("bucket", str(tmp_path / "by_day"), "--cluster", "user", "--output",
                        str(tmp_path / "other"))
    assert unknown.returncode == 1 and "'user'" in unknown.stderr
    assert not (tmp_path / "other").exists()


def test_evaluate_reads_a_foreign_lake_as_it_is(tmp_path, frame):
    """Rows' errors stand alone: evaluate needs no copy and no shuffle."""
    write_lake(frame, tmp_path / "bucketed", cluster_column="cluster")
    write_by_day(frame, tmp_path / "by_day")
    model = merf_dask("fit", str(tmp_path / "bucketed"), "--formula", FORMULA, "--output",
                      str(tmp_path / "model"), "--n-workers", "1", "--max-iterations", "1",
                      "--learner", "linear", "--quiet")
    assert model.returncode == 0, model.stderr
    scores = [merf_dask("evaluate", str(tmp_path / lake), "--model", str(tmp_path / "model"),
                        env={"MERF_DASK_SCRATCH": str(tmp_path / "scratch")})
              for lake in ("bucketed", "by_day")]
    assert all(score.returncode == 0 for score in scores), [s.stderr for s in scores]
    assert scores[0].stdout == scores[1].stdout
    assert not (tmp_path / "scratch").exists()


def test_bucketed_copy_is_written_once_per_source_and_column(tmp_path, frame):
    write_by_day(frame, tmp_path / "by_day")
    first = bucketed_copy(tmp_path / "by_day", cluster_column="cluster",
                          scratch=tmp_path / "scratch")
    assert bucketed_copy(tmp_path / "by_day", cluster_column="cluster",
                         scratch=tmp_path / "scratch") == first
    other = bucketed_copy(tmp_path / "by_day", cluster_column="x1", scratch=tmp_path / "scratch")
    assert other != first and bucketed_by(other) == "x1"
    with pytest.raises(ValueError, match="'user'"):
        bucket_lake(tmp_path / "by_day", tmp_path / "lake", cluster_column="user")


def test_the_estimator_fits_a_foreign_frame_through_a_bucketed_copy(tmp_path, frame,
                                                                     dask_client):
    """`MERF(scratch=...)` on `dd.read_parquet` of the by-day lake: no shuffle into worker
    memory (no warning), the model of the bucketed lake, and the copy gone after the fit."""
    import warnings

    import dask.dataframe as dd
    from sklearn.ensemble import RandomForestRegressor

    write_by_day(frame, tmp_path / "by_day")
    write_lake(frame, tmp_path / "bucketed", cluster_column="cluster", n_buckets=3)
    forest = RandomForestRegressor(n_estimators=20, min_samples_leaf=5, random_state=0)

    def fitted(data, **kwargs):
        return MERF(forest, formula=FORMULA, max_iterations=2, random_state=0,
                    client=dask_client, **kwargs).fit(data)
    reference = fitted(read_lake(tmp_path / "bucketed", cluster_column="cluster"))
    (tmp_path / "scratch").mkdir()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="the data is not partitioned by cluster")
        model = fitted(dd.read_parquet(tmp_path / "by_day"), scratch=tmp_path / "scratch")
    assert_same_model(model, reference)
    assert list((tmp_path / "scratch").iterdir()) == []
    with pytest.warns(UserWarning, match="held in worker memory"):  # without a scratch location
        assert_same_model(fitted(dd.read_parquet(tmp_path / "by_day")), reference)


def test_a_cluster_with_40_percent_of_the_rows_is_spread_and_fits_the_in_process_model(
        tmp_path, frame):
    """A cluster bigger than max_cluster_rows: `merf-dask bucket` spreads its rows over every
    bucket (the other clusters stay whole), the foreign lake's fit (through its bucketed copy)
    holds no more than a bucket's share of it in any partition, and the model is the in-process
    fit's, bit for bit."""
    import pandas as pd

    from merf_dask.dask.partitioning import split_clusters
    from merf_dask.learners import make_learner

    big = simulate_frame(n_rows=2_000, n_clusters=1, seed=1).assign(cluster="big")
    skewed = pd.concat([frame, big], ignore_index=True)
    write_by_day(skewed, tmp_path / "by_day")
    done = merf_dask("bucket", str(tmp_path / "by_day"), "--cluster", "cluster", "--output",
                     str(tmp_path / "lake"), "--buckets", "4", "--max-cluster-rows", "500",
                     "--n-workers", "1")
    assert done.returncode == 0, done.stderr
    lake = read_lake(tmp_path / "lake", cluster_column="cluster")
    parts = [part.compute() for part in lake.to_delayed()]
    assert len(parts) == 4
    assert all(350 < (part["cluster"] == "big").sum() < 650 for part in parts)
    others = pd.concat([part.loc[part["cluster"] != "big", ["cluster"]].drop_duplicates()
                        for part in parts])
    assert others["cluster"].is_unique and len(others) == frame["cluster"].nunique()
    assert list(split_clusters(lake, "cluster", max_cluster_rows=500)) == []
    assert list(split_clusters(lake, "cluster")) == ["big"]  # below the default: not spread

    fitted = merf_dask("fit", str(tmp_path / "by_day"), "--formula", FORMULA, "--output",
                       str(tmp_path / "model"), "--n-workers", "2", "--max-iterations", "2",
                       "--learner", "extra-trees", "--max-cluster-rows", "500", "--quiet",
                       env={"MERF_DASK_SCRATCH": str(tmp_path / "scratch")})
    assert fitted.returncode == 0, fitted.stderr
    model = MERF.load(tmp_path / "model")
    in_process = MERF(make_learner("extra-trees", random_state=0), formula=FORMULA,
                      max_iterations=2, random_state=0, max_cluster_rows=500).fit(skewed)
    assert_same_model(model, in_process)
    assert model.b_.index.is_unique and "big" in model.b_.index
