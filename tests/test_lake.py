"""Tests of merf_dask.io.lake on real files: a temporary directory and a real S3 server on loopback."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import boto3
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from merf_dask.io.filesystem import INCOMPLETE_MARKER, atomic_directory
from merf_dask.io.lake import (
    bucket_of,
    read_lake,
    write_dataset,
    write_lake,
    write_simulated_lake,
)
from merf_dask.dask.partitioning import split_clusters
from merf_dask.simulate import simulate_frame

N_BUCKETS = 6


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return simulate_frame(n_rows=3_000, n_clusters=60, seed=3)


def sorted_rows(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.sort_values(["cluster", "x1"]).reset_index(drop=True)


def assert_same_rows(actual: pd.DataFrame, expected: pd.DataFrame) -> None:
    # Dask turns str columns into its pyarrow-backed string dtype: compare values, not dtypes
    pd.testing.assert_frame_equal(sorted_rows(actual), sorted_rows(expected), check_dtype=False)


def write_file(path, rows: pd.DataFrame) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), path)


def hidden_entries(directory) -> list[str]:
    return [name for name in os.listdir(directory) if name.startswith(".")]


# ---------------------------------------------------------------- bucketing


def test_bucket_of_is_a_fixed_hash_whatever_the_string_dtype():
    ids = ["c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7"]
    # pinned values: a salted or changed hash would move clusters between the buckets of old lakes
    expected = [1, 1, 6, 11, 1, 11, 9, 4]
    for dtype in ("str", object, "category"):
        assert bucket_of(pd.Series(ids, dtype=dtype), 16).tolist() == expected


@pytest.mark.parametrize("as_dask", [False, True], ids=["pandas", "dask"])
def test_lake_round_trip_keeps_each_cluster_in_one_partition(tmp_path, frame, as_dask):
    source = dd.from_pandas(frame, npartitions=7) if as_dask else frame
    if as_dask:
        assert len(split_clusters(source, "cluster")) > 0  # the lake has clusters to gather
    write_lake(source, tmp_path / "lake", cluster_column="cluster", n_buckets=N_BUCKETS)

    bucket_directories = sorted(os.listdir(tmp_path / "lake"))
    assert bucket_directories == [f"bucket={k}" for k in range(N_BUCKETS)]
    for directory in bucket_directories:
        # one file per input partition with rows in the bucket (no shuffle); a pandas frame is
        # one partition
        files = sorted(os.listdir(tmp_path / "lake" / directory))
        inputs = {f"part-{i}.parquet" for i in range(7 if as_dask else 1)}
        assert files and set(files) <= inputs
        for name in files:
            ids = pq.read_table(tmp_path / "lake" / directory / name).column(
                "cluster").to_pandas()
            assert set(bucket_of(ids, N_BUCKETS)) == {int(directory.removeprefix("bucket="))}

    lake = read_lake(tmp_path / "lake", cluster_column="cluster")
    assert lake.npartitions == N_BUCKETS
    assert len(split_clusters(lake, "cluster")) == 0
    rows = lake.compute()
    assert list(rows.columns) == list(frame.columns)
    assert dict(rows.dtypes) == dict(lake.dtypes)
    assert_same_rows(rows, frame)
    assert hidden_entries(tmp_path) == []


def test_several_files_in_one_bucket_are_read_as_one_partition(tmp_path, frame):
    write_lake(frame, tmp_path / "lake", cluster_column="cluster", n_buckets=N_BUCKETS)
    bucket_zero = frame[bucket_of(frame["cluster"], N_BUCKETS) == 0]
    write_file(tmp_path / "lake" / "bucket=0" / "part-1.parquet", bucket_zero)

    lake = read_lake(tmp_path / "lake", cluster_column="cluster")

    assert lake.npartitions == N_BUCKETS
    assert len(split_clusters(lake, "cluster")) == 0
    assert_same_rows(lake.compute(), pd.concat([frame, bucket_zero]))


def test_columns_and_filters(tmp_path, frame):
    write_lake(frame, tmp_path / "lake", cluster_column="cluster", n_buckets=N_BUCKETS)
    buckets = bucket_of(frame["cluster"], N_BUCKETS)

    projected = read_lake(tmp_path / "lake", columns=["x1", "cluster"]).compute()
    assert list(projected.columns) == ["x1", "cluster"]

    positive = read_lake(tmp_path / "lake", filters=[("x1", ">", 0)]).compute()
    assert_same_rows(positive, frame[frame["x1"] > 0])

    pruned = read_lake(tmp_path / "lake", columns=["cluster", "x1", "bucket"],
                       filters=[("bucket", "in", [0, 2])])
    assert pruned.npartitions == 2  # the other buckets never become tasks
    rows = pruned.compute()
    assert set(rows["bucket"]) == {0, 2}
    np.testing.assert_array_equal(rows["bucket"], bucket_of(rows["cluster"], N_BUCKETS))
    assert len(rows) == np.isin(buckets, [0, 2]).sum()

    either = read_lake(tmp_path / "lake", filters=[[("bucket", "==", 1)], [("x2", "<", -1)]])
    assert_same_rows(either.compute(), frame[(buckets == 1) | (frame["x2"] < -1)])

    nothing = read_lake(tmp_path / "lake", filters=[("bucket", "==", N_BUCKETS)])
    assert len(nothing.compute()) == 0


@pytest.mark.parametrize("arguments", [
    {"columns": ["cluster", "nope"]},
    {"filters": [("nope", ">", 0)]},
    {"cluster_column": "nope"},
])
def test_an_unknown_column_is_named_with_the_available_ones(tmp_path, frame, arguments):
    write_lake(frame, tmp_path / "lake", cluster_column="cluster", n_buckets=N_BUCKETS)
    with pytest.raises(ValueError, match=r"'nope' is not in .*available columns: 'cluster', 'y'"):
        read_lake(tmp_path / "lake", **arguments)


def test_a_dataset_that_is_not_bucketed_is_shuffled_into_whole_clusters(tmp_path, frame):
    scattered = frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
    write_dataset(dd.from_pandas(scattered, npartitions=4), tmp_path / "plain")
    assert sorted(os.listdir(tmp_path / "plain")) == [f"part-{i}.parquet" for i in range(4)]
    assert len(split_clusters(read_lake(tmp_path / "plain"), "cluster")) > 0

    lake = read_lake(tmp_path / "plain", cluster_column="cluster")

    assert len(split_clusters(lake, "cluster")) == 0
    assert_same_rows(lake.compute(), frame)


def test_bucket_directories_not_bucketed_by_the_cluster_column_are_checked(tmp_path, frame):
    # a lake laid out in bucket=K directories by another tool, here round-robin by row
    for bucket in range(3):
        write_file(tmp_path / "lake" / f"bucket={bucket}" / "data.parquet", frame.iloc[bucket::3])
    assert len(split_clusters(read_lake(tmp_path / "lake"), "cluster")) > 0

    lake = read_lake(tmp_path / "lake", cluster_column="cluster")

    assert len(split_clusters(lake, "cluster")) == 0
    assert_same_rows(lake.compute(), frame)


def test_write_dataset_of_a_pandas_frame_is_one_file(tmp_path, frame):
    write_dataset(frame, tmp_path / "predictions")
    assert os.listdir(tmp_path / "predictions") == ["part-0.parquet"]
    assert_same_rows(pd.read_parquet(tmp_path / "predictions"), frame)


# ---------------------------------------------------------------- simulated lakes


def test_simulated_lake_is_written_block_by_block_with_whole_clusters(tmp_path):
    n_rows, n_clusters = 5_003, 200
    write_simulated_lake(tmp_path / "sim", n_rows=n_rows, n_clusters=n_clusters, seed=7,
                         n_buckets=4, chunk_rows=1_000)

    lake = read_lake(tmp_path / "sim", cluster_column="cluster")
    assert lake.npartitions == 4
    assert len(split_clusters(lake, "cluster")) == 0
    rows = lake.compute()
    assert len(rows) == n_rows
    assert set(rows["cluster"]) == {f"c{i}" for i in range(n_clusters)}
    sizes = rows.groupby("cluster").size()
    assert sorted(sizes[sizes == 26].index) == ["c0", "c1", "c2"]  # 5003 = 200 * 25 + 3
    assert set(sizes) == {25, 26}
    for bucket in range(4):
        path = tmp_path / "sim" / f"bucket={bucket}" / "part-0.parquet"
        file = pq.ParquetFile(path)
        # one row group per block: the rows were never all in memory at once
        assert file.num_row_groups > 1
        ids = file.read(columns=["cluster"]).column("cluster").to_pandas()
        assert set(bucket_of(ids, 4)) == {bucket}

    write_simulated_lake(tmp_path / "again", n_rows=n_rows, n_clusters=n_clusters, seed=7,
                         n_buckets=4, chunk_rows=1_000)
    pd.testing.assert_frame_equal(read_lake(tmp_path / "again").compute(), rows)


# ---------------------------------------------------------------- checks on read


def test_a_missing_lake_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_lake(tmp_path / "nowhere")


def test_a_lake_without_files_or_rows_is_refused(tmp_path, frame):
    (tmp_path / "bare" / "bucket=0").mkdir(parents=True)
    with pytest.raises(ValueError, match="bare holds no Parquet files"):
        read_lake(tmp_path / "bare")

    for bucket in range(2):
        write_file(tmp_path / "empty" / f"bucket={bucket}" / "part-0.parquet", frame.iloc[:0])
    with pytest.raises(ValueError, match="empty holds no rows: its 2 Parquet files are all empty"):
        read_lake(tmp_path / "empty")


def test_a_corrupt_file_is_named(tmp_path, frame):
    write_lake(frame, tmp_path / "lake", cluster_column="cluster", n_buckets=N_BUCKETS)
    corrupt = tmp_path / "lake" / "bucket=3" / "part-0.parquet"
    corrupt.write_bytes(b"these bytes are not parquet" * 10)
    with pytest.raises(ValueError, match=rf"{corrupt} is not a valid Parquet file"):
        read_lake(tmp_path / "lake")


@pytest.mark.parametrize("change, difference", [
    (lambda rows: rows.assign(x1=rows["x1"].astype(str)),
     "column 'x1' is large_string, not double"),
    (lambda rows: rows.drop(columns="x2"), "column 'x2' is missing"),
    (lambda rows: rows.assign(x4=1.0), "extra column 'x4'"),
])
def test_mixed_schemas_name_the_file_and_the_column(tmp_path, frame, change, difference):
    write_lake(frame, tmp_path / "lake", cluster_column="cluster", n_buckets=N_BUCKETS)
    odd = tmp_path / "lake" / "bucket=4" / "part-0.parquet"
    write_file(odd, change(pd.read_parquet(odd)))
    with pytest.raises(ValueError, match=rf"{odd} does not match the schema of .*bucket=0.*"
                                         rf"{difference}"):
        read_lake(tmp_path / "lake")


def test_an_interrupted_publish_is_refused(tmp_path, frame):
    write_lake(frame, tmp_path / "lake", cluster_column="cluster", n_buckets=N_BUCKETS)
    (tmp_path / "lake" / INCOMPLETE_MARKER).touch()
    with pytest.raises(ValueError, match="lake is incomplete"):
        read_lake(tmp_path / "lake")


# ---------------------------------------------------------------- atomic writes


def test_an_existing_lake_is_kept_without_overwrite_and_replaced_with_it(tmp_path, frame):
    write_lake(frame, tmp_path / "lake", cluster_column="cluster", n_buckets=N_BUCKETS)
    other = simulate_frame(n_rows=500, n_clusters=10, seed=4)

    with pytest.raises(FileExistsError, match=r"lake already exists; pass overwrite=True"):
        write_lake(other, tmp_path / "lake", cluster_column="cluster", n_buckets=2)
    assert_same_rows(read_lake(tmp_path / "lake").compute(), frame)

    write_lake(other, tmp_path / "lake", cluster_column="cluster", n_buckets=2, overwrite=True)
    assert sorted(os.listdir(tmp_path / "lake")) == ["bucket=0", "bucket=1"]
    assert_same_rows(read_lake(tmp_path / "lake").compute(), other)
    assert hidden_entries(tmp_path) == []


def failing_partition(index: int, *, rows: pd.DataFrame) -> pd.DataFrame:
    if index == 2:
        raise RuntimeError("source broke mid-read")
    return rows


def test_a_failure_mid_write_leaves_nothing_and_keeps_the_old_lake(tmp_path, frame):
    breaking = dd.from_map(failing_partition, range(4), rows=frame, meta=frame.iloc[:0])

    with pytest.raises(RuntimeError, match="source broke"):
        write_lake(breaking, tmp_path / "lake", cluster_column="cluster", n_buckets=N_BUCKETS)
    assert os.listdir(tmp_path) == []

    write_dataset(frame, tmp_path / "lake")
    with pytest.raises(RuntimeError, match="source broke"):
        write_lake(breaking, tmp_path / "lake", cluster_column="cluster", n_buckets=N_BUCKETS,
                   overwrite=True)
    assert os.listdir(tmp_path) == ["lake"]
    assert_same_rows(read_lake(tmp_path / "lake").compute(), frame)


def test_atomic_directory_publishes_only_a_finished_directory(tmp_path):
    with atomic_directory(tmp_path / "model") as staging:
        assert os.path.basename(staging).startswith(".model.tmp-")
        (Path(staging) / "weights.bin").write_bytes(b"1")
        assert not (tmp_path / "model").exists()
    assert os.listdir(tmp_path / "model") == ["weights.bin"]

    with pytest.raises(KeyError), atomic_directory(tmp_path / "model", overwrite=True) as staging:
        (Path(staging) / "weights.bin").write_bytes(b"2")
        raise KeyError("interrupted")
    assert (tmp_path / "model" / "weights.bin").read_bytes() == b"1"
    assert hidden_entries(tmp_path) == []


def test_an_unwritable_destination_is_named(tmp_path, frame):
    # a path under a regular file: mkdir fails even for root, unlike a chmod-ed directory
    (tmp_path / "not-a-directory").write_text("")
    destination = tmp_path / "not-a-directory" / "lake"
    with pytest.raises(OSError, match=rf"cannot write {destination}"):
        write_lake(frame, destination, cluster_column="cluster")


# ---------------------------------------------------------------- S3


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as environment:
        # moto and boto3 need credentials and a region to sign requests, any will do
        environment.setenv("AWS_ACCESS_KEY_ID", "x")
        environment.setenv("AWS_SECRET_ACCESS_KEY", "x")
        environment.setenv("AWS_DEFAULT_REGION", "us-east-1")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="lakes")
        yield endpoint
        server.stop()


@pytest.fixture
def s3_options(s3_endpoint) -> dict:
    return {"client_kwargs": {"endpoint_url": s3_endpoint}, "key": "x", "secret": "x"}


def s3_keys(endpoint: str, prefix: str) -> list[str]:
    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(
        Bucket="lakes", Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def test_s3_round_trip_overwrite_and_failure(s3_endpoint, s3_options, frame):
    prefix = f"run-{uuid.uuid4().hex}"
    url = f"s3://lakes/{prefix}/lake"

    write_lake(dd.from_pandas(frame, npartitions=3), url, cluster_column="cluster",
               n_buckets=N_BUCKETS, storage_options=s3_options)
    keys = s3_keys(s3_endpoint, prefix)  # a file per input partition with rows in a bucket
    assert {key.rsplit("/", 2)[1] for key in keys} == {f"bucket={k}" for k in range(N_BUCKETS)}
    assert {key.rsplit("/", 1)[1] for key in keys} <= {f"part-{i}.parquet" for i in range(3)}
    lake = read_lake(url, cluster_column="cluster", storage_options=s3_options)
    assert lake.npartitions == N_BUCKETS
    assert len(split_clusters(lake, "cluster")) == 0
    assert_same_rows(lake.compute(), frame)

    other = simulate_frame(n_rows=400, n_clusters=8, seed=5)
    with pytest.raises(FileExistsError, match=rf"{url} already exists"):
        write_lake(other, url, cluster_column="cluster", storage_options=s3_options)
    write_lake(other, url, cluster_column="cluster", n_buckets=2, storage_options=s3_options,
               overwrite=True)
    # the copy replaced every old file and left neither staging files nor the marker behind
    assert s3_keys(s3_endpoint, prefix) == [
        f"{prefix}/lake/bucket={k}/part-0.parquet" for k in range(2)]
    assert_same_rows(read_lake(url, storage_options=s3_options).compute(), other)

    breaking = dd.from_map(failing_partition, range(4), rows=frame, meta=frame.iloc[:0])
    with pytest.raises(RuntimeError, match="source broke"):
        write_lake(breaking, f"s3://lakes/{prefix}/broken", cluster_column="cluster",
                   n_buckets=N_BUCKETS, storage_options=s3_options)
    assert not any(key.startswith((f"{prefix}/broken", f"{prefix}/.broken"))
                   for key in s3_keys(s3_endpoint, prefix))

    boto3.client("s3", endpoint_url=s3_endpoint).put_object(
        Bucket="lakes", Key=f"{prefix}/lake/{INCOMPLETE_MARKER}", Body=b"")
    with pytest.raises(ValueError, match=rf"{url} is incomplete"):
        read_lake(url, storage_options=s3_options)


def test_s3_simulated_lake(s3_endpoint, s3_options):
    url = f"s3://lakes/run-{uuid.uuid4().hex}/sim"
    write_simulated_lake(url, n_rows=2_000, n_clusters=40, n_buckets=3, chunk_rows=500,
                         storage_options=s3_options)
    lake = read_lake(url, cluster_column="cluster", storage_options=s3_options)
    assert lake.npartitions == 3
    rows = lake.compute()
    assert len(rows) == 2_000
    assert rows["cluster"].nunique() == 40
