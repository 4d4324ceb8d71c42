"""Parquet data lakes bucketed by cluster id, on a local disk or any fsspec store (``s3://``, ...).

A *lake* is a hive-partitioned Parquet dataset with one directory per bucket::

    url/bucket=0/part-0.parquet
    url/bucket=1/part-0.parquet
    ...

(a bucket written from a Dask frame holds one file per input partition, ``part-<i>.parquet``).

Rows go to bucket ``bucket_of(cluster id)``, a stable hash of the id, so every cluster lies in one
file and reading one Dask partition per bucket directory keeps each cluster in one partition with
no shuffle (what lets the distributed E-step solve a cluster where its rows are). The exception
is a cluster with more rows than ``max_cluster_rows``: its rows are spread over the buckets by a
hash of each row, and the fit sums its statistics across partitions
(:func:`merf_dask.core.em.spread_part`).

Functions
---------
bucket_of
    The bucket of each cluster id.
write_lake
    Write a pandas or Dask DataFrame as a bucketed lake (each Dask partition split by bucket where
    it is, no shuffle).
write_simulated_lake
    Write the paper's data-generating process as a bucketed lake, one block of clusters at a time.
write_dataset
    Write a DataFrame as plain Parquet, one file per partition (predictions and other outputs).
read_lake
    Read a lake (or any Parquet dataset) into a Dask DataFrame with every cluster in one
    partition, after checking the footers: missing, empty, corrupt or mixed-schema input and unknown
    columns fail with a message naming the file or column.
bucketed_by
    The column a lake was bucketed by (None for any other Parquet dataset).
bucket_lake
    Write a bucketed copy of any Parquet dataset (file by file, no shuffle).
bucketed_copy
    The bucketed copy of a dataset in a scratch location: written once, found again by the
    source's fingerprint.

Publishing is atomic (:func:`merf_dask.io.filesystem.atomic_directory`): :func:`read_lake` refuses
a directory holding the marker of an interrupted publish.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import posixpath
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import dask
import dask.dataframe as dd
import distributed
import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from ..core.em import MAX_CLUSTER_ROWS, spread_clusters
from ..core.hashing import cluster_hashes
from ..dask.partitioning import ensure_cluster_partitions
from ..simulate import simulate_frame
from .filesystem import (atomic_directory, check_complete, data_fingerprint, open_filesystem,
                         url_of)

__all__ = [
    "BUCKET_COLUMN",
    "bucket_of",
    "write_lake",
    "write_simulated_lake",
    "write_dataset",
    "read_lake",
    "bucketed_by",
    "bucket_lake",
    "bucketed_copy",
]

#: Hive partition key of the bucket directories (``bucket=K``); no data column may use this name.
BUCKET_COLUMN = "bucket"

# Parquet key-value metadata recording the column a lake was bucketed by, so that a reader asking
# for that column can trust the layout without checking it.
_BUCKETED_BY_KEY = b"merf_dask:bucketed_by"
_BUCKET_DIRECTORY = re.compile(rf"{BUCKET_COLUMN}=(\d+)")
_BUCKET_FIELD = pa.field(BUCKET_COLUMN, pa.int32())

# The default bucket count aims at ~100 MB per bucket in memory for a few dozen numeric columns,
# and gives every worker thread several buckets so that stragglers even out, but never makes a
# bucket so small that per-task overhead dominates.
_TARGET_ROWS_PER_BUCKET = 1_000_000
_BUCKETS_PER_THREAD = 4
_MIN_ROWS_PER_BUCKET = 10_000

logger = logging.getLogger("merf_dask")

#: Rows of a Dask frame read to type its object columns (Dask's placeholders have no type).
_SCHEMA_SAMPLE_ROWS = 1000

# Footers are read concurrently because each costs a round trip or two on an object store.
_FOOTER_READERS = 16


def bucket_of(ids: pd.Series, n_buckets: int) -> np.ndarray:
    """Bucket of each cluster id, the same in every process, machine and session.

    The bucket is the id's :func:`~merf_dask.core.hashing.cluster_hashes` modulo ``n_buckets``:
    with a power-of-two bucket count, the M-step's member folds (residues of the same hash
    modulo a power of two) line up with buckets and no rows move.

    Parameters
    ----------
    ids : Series of shape (n_rows,)
        Cluster ids.
    n_buckets : int
        Number of buckets, at least 1.

    Returns
    -------
    ndarray of shape (n_rows,), dtype int64
        Values in ``[0, n_buckets)``.
    """
    if n_buckets < 1:
        raise ValueError(f"n_buckets must be at least 1, got {n_buckets}")
    return (cluster_hashes(ids) % np.uint64(n_buckets)).astype(np.int64)


def write_lake(frame: pd.DataFrame | dd.DataFrame, url: str | os.PathLike, *, cluster_column: str,
               n_buckets: int | None = None, max_cluster_rows: int = MAX_CLUSTER_ROWS,
               storage_options: dict | None = None, overwrite: bool = False) -> None:
    """Write ``frame`` as a lake: ``url/bucket=K/part-<i>.parquet``, a directory per non-empty
    bucket.

    No shuffle: each partition of a Dask DataFrame is split by bucket where it is and written as
    one file per bucket it has rows of (``part-<i>.parquet`` for partition i), so a task holds
    one input partition and nothing moves between workers (a disk-backed P2P shuffle of 20M
    rows lost a 1 GiB worker here). A pandas frame is one partition. The index is not written.
    A cluster with
    more than ``max_cluster_rows`` rows is spread over the buckets by a hash of each row (a pass
    over the cluster column counts them), so no bucket holds more than its share of it; a fit
    treats such a cluster as spread (:func:`merf_dask.core.em.spread_part`).

    Parameters
    ----------
    frame : pandas or Dask DataFrame of shape (n_rows, n_columns)
        Must contain ``cluster_column`` and no column named ``bucket``.
    url : str or path-like
        Destination directory (local path or fsspec URL).
    cluster_column : str
        Column holding the cluster ids.
    n_buckets : int, optional
        Number of buckets. Defaults to about one per million rows, raised to a few per worker thread
        (of the active ``distributed`` client, else of this machine) while buckets keep at least
        10,000 rows. Counting the rows of a Dask frame is a pass over it unless its source knows
        the count (``dd.read_parquet`` reads it from the footers).
    max_cluster_rows : int, default=250,000
        Clusters with more rows are spread over the buckets (the estimator's parameter of the
        same name).
    storage_options : dict, optional
        Passed to the filesystem, also on the workers.
    overwrite : bool
        Replace an existing destination instead of raising ``FileExistsError``.
    """
    _require_columns([cluster_column], list(frame.columns), source="frame")
    if BUCKET_COLUMN in frame.columns:
        raise ValueError(f"column {BUCKET_COLUMN!r} of the frame clashes with the bucket "
                         f"directories of a lake; rename it")
    n_buckets = n_buckets or _default_n_buckets(len(frame))
    if n_buckets < 1:
        raise ValueError(f"n_buckets must be at least 1, got {n_buckets}")
    schema = _arrow_schema(frame, bucketed_by=cluster_column)
    cluster_rows = frame[cluster_column].value_counts(sort=False)
    if not isinstance(frame, pd.DataFrame):
        cluster_rows = cluster_rows.compute()
    spread = spread_clusters(cluster_rows, max_cluster_rows=max_cluster_rows)
    with atomic_directory(url, overwrite=overwrite, storage_options=storage_options) as staging:
        filesystem, directory = open_filesystem(staging, storage_options=storage_options)
        write = dict(cluster_column=cluster_column, n_buckets=n_buckets, spread=spread,
                     filesystem=filesystem, directory=directory, schema=schema)
        if isinstance(frame, pd.DataFrame):
            _write_buckets(frame, part=0, **write)
            return
        dask.compute(*[dask.delayed(_write_buckets)(rows, part=part, **write)
                       for part, rows in enumerate(frame.to_delayed())])


def write_simulated_lake(url: str | os.PathLike, *, n_rows: int, n_clusters: int,
                         seed: int | None = 0, n_buckets: int | None = None,
                         storage_options: dict | None = None, overwrite: bool = False,
                         chunk_rows: int = 1_000_000) -> None:
    """Write the paper's data-generating process as a lake without holding all rows in memory.

    Clusters are simulated in contiguous blocks of about ``chunk_rows`` rows (each with its own
    seed spawned from ``seed``) and appended to one open Parquet writer per bucket, so memory stays
    at one block whatever ``n_rows``. Cluster sizes are those of
    :func:`~merf_dask.simulate.simulate_frame` (rows spread as evenly as possible) and ids run from
    ``"c0"`` to ``f"c{n_clusters - 1}"``; the values depend on ``chunk_rows`` as well as ``seed``.

    Parameters
    ----------
    url : str or path-like
        Destination directory (local path or fsspec URL).
    n_rows, n_clusters : int
        Total rows and clusters, ``1 <= n_clusters <= n_rows``.
    seed : int or None
        Seed of the whole lake.
    n_buckets : int, optional
        As in :func:`write_lake`.
    storage_options : dict, optional
    overwrite : bool
        Replace an existing destination instead of raising ``FileExistsError``.
    chunk_rows : int
        Rows simulated at once, roughly: a block holds whole clusters.
    """
    if n_clusters < 1 or n_rows < n_clusters:
        raise ValueError(
            f"need 1 <= n_clusters <= n_rows, got n_rows={n_rows}, n_clusters={n_clusters}")
    n_buckets = n_buckets or _default_n_buckets(n_rows)
    with (atomic_directory(url, overwrite=overwrite, storage_options=storage_options) as staging,
          contextlib.ExitStack() as open_files):
        filesystem, directory = open_filesystem(staging, storage_options=storage_options)
        writers: dict[int, pq.ParquetWriter] = {}
        for block in _simulated_blocks(n_rows=n_rows, n_clusters=n_clusters, seed=seed,
                                       chunk_rows=chunk_rows):
            schema = _arrow_schema(block, bucketed_by="cluster")
            for bucket, rows in block.groupby(bucket_of(block["cluster"], n_buckets), sort=True):
                if bucket not in writers:
                    file = open_files.enter_context(
                        _open_for_writing(filesystem, _bucket_file(directory, bucket)))
                    writers[bucket] = open_files.enter_context(pq.ParquetWriter(file, schema))
                writers[bucket].write_table(
                    pa.Table.from_pandas(rows, schema=schema, preserve_index=False))


def write_dataset(frame: pd.DataFrame | dd.DataFrame, url: str | os.PathLike, *,
                  storage_options: dict | None = None, overwrite: bool = False) -> None:
    """Write ``frame`` as plain Parquet: ``url/part-<i>.parquet``, one file per partition.

    For outputs that need no bucketing (predictions, per-cluster tables). Each Dask partition is
    written by the worker holding it. The index is not written.

    Parameters
    ----------
    frame : pandas or Dask DataFrame of shape (n_rows, n_columns)
        A pandas frame counts as one partition.
    url : str or path-like
        Destination directory (local path or fsspec URL).
    storage_options : dict, optional
    overwrite : bool
        Replace an existing destination instead of raising ``FileExistsError``.
    """
    schema = _arrow_schema(frame)
    with atomic_directory(url, overwrite=overwrite, storage_options=storage_options) as staging:
        filesystem, directory = open_filesystem(staging, storage_options=storage_options)
        if isinstance(frame, pd.DataFrame):
            _write_file(frame, filesystem=filesystem, path=f"{directory}/part-0.parquet",
                        schema=schema)
            return
        dask.compute(*[
            dask.delayed(_write_file)(part, filesystem=filesystem,
                                      path=f"{directory}/part-{index}.parquet", schema=schema)
            for index, part in enumerate(frame.to_delayed())
        ])


def read_lake(url: str | os.PathLike, *, columns: Sequence[str] | None = None,
              filters: list | None = None, cluster_column: str | None = None,
              storage_options: dict | None = None) -> dd.DataFrame:
    """Read a lake, or any Parquet dataset, into a Dask DataFrame.

    A bucketed lake (every file under a ``bucket=K`` directory) is read as one partition per bucket
    directory, however many files each holds; when the lake records that it was bucketed by
    ``cluster_column`` (as :func:`write_lake` does) the layout is trusted. Otherwise, given
    ``cluster_column``, the partitions (of the buckets, or of ``dd.read_parquet`` for any other
    dataset) are checked with one pass over that column and shuffled once if a cluster spans two.

    The Parquet footers are checked first, without reading data.

    Parameters
    ----------
    url : str or path-like
        Lake directory, Parquet file or prefix (local path or fsspec URL).
    columns : sequence of str, optional
        Columns to read; defaults to all data columns (the ``bucket`` key only when asked for, as
        int32).
    filters : list, optional
        pyarrow-style filters: ``[(column, op, value), ...]`` (all must hold) or a list of such
        lists (any must hold). Conditions on ``bucket`` skip whole buckets; the others drop rows.
    cluster_column : str, optional
        Keep each cluster of this column in one partition.
    storage_options : dict, optional
        Passed to the filesystem, also on the workers.

    Returns
    -------
    dask.dataframe.DataFrame of shape (n_rows, n_columns)
        One partition per bucket for a bucketed lake; the index is meaningless.

    Raises
    ------
    FileNotFoundError
        Nothing at ``url``.
    ValueError
        Naming the file or column: the lake is incomplete, holds no Parquet file or no rows, a file
        is not valid Parquet, files disagree on a column's type or presence, or a requested
        column (in ``columns``, ``filters`` or ``cluster_column``) does not exist.
    """
    filesystem, root, files, footers, schema, buckets = _inspect(url, storage_options)
    if sum(footer.num_rows for footer in footers) == 0:
        raise ValueError(f"{url} holds no rows: its {len(files)} Parquet files are all empty")
    available = schema.names + (_hive_keys(root, files) if buckets is None else [BUCKET_COLUMN])
    requested = [*(columns or []), *_filter_columns(filters)]
    if cluster_column is not None:
        requested.append(cluster_column)
    _require_columns(requested, available, source=url)
    if cluster_column and columns is not None and cluster_column not in columns:
        raise ValueError(f"cluster_column {cluster_column!r} must be one of the columns read, "
                         f"got columns={list(columns)}")

    if buckets is None:
        lake = dd.read_parquet(os.fspath(url), columns=columns, filters=filters,
                               storage_options=storage_options)
        return lake if cluster_column is None else ensure_cluster_partitions(lake, cluster_column)

    lake = _read_buckets(filesystem, buckets, file_schema=schema,
                         columns=list(columns) if columns is not None else schema.names,
                         filters=filters)
    if cluster_column is None or cluster_column == _bucketed_by(schema):
        return lake
    return ensure_cluster_partitions(lake, cluster_column)


def bucketed_by(url: str | os.PathLike, *, storage_options: dict | None = None) -> str | None:
    """The column ``url`` was bucketed by (:func:`write_lake`), or None for any other dataset.

    Reads the footers only (the same checks as :func:`read_lake`).
    """
    *_, schema, buckets = _inspect(url, storage_options)
    return None if buckets is None else _bucketed_by(schema)


def _inspect(url, storage_options):
    """What :func:`read_lake` and :func:`bucketed_by` learn from the listing and the footers,
    after checking them: the filesystem, the root, the data files, their footers, the common
    schema and the files of each bucket (None for a dataset that is not bucketed)."""
    filesystem, root = open_filesystem(url, storage_options=storage_options)
    files = _data_files(filesystem, root, url=url)
    check_complete(url, storage_options=storage_options)
    footers = _read_footers(filesystem, files)
    schema = _common_schema(filesystem, files, footers)
    return filesystem, root, files, footers, schema, _files_by_bucket(root, files)


def _bucketed_by(schema: pa.Schema) -> str | None:
    """The column recorded in a lake's schema as the one it was bucketed by."""
    return (schema.metadata or {}).get(_BUCKETED_BY_KEY, b"").decode() or None


def bucket_lake(source: str | os.PathLike, output: str | os.PathLike, *, cluster_column: str,
                n_buckets: int | None = None, max_cluster_rows: int = MAX_CLUSTER_ROWS,
                storage_options: dict | None = None, overwrite: bool = False) -> None:
    """Write a copy of any Parquet dataset bucketed by ``cluster_column`` (a lake).

    The rows are read file by file, and each file's rows are written to the buckets they fall in
    by the worker that read them (:func:`write_lake`): no process holds more than one input
    partition, and no row crosses the network but to the output. The copy is published
    atomically.

    Parameters
    ----------
    source : str or path-like
        Any Parquet dataset :func:`read_lake` reads (hive-partitioned or flat, local or URL).
    output : str or path-like
        The lake to write.
    cluster_column : str
    n_buckets, max_cluster_rows
        As for :func:`write_lake`.
    storage_options : dict, optional
        For both the source and the output.
    overwrite : bool
        Replace an existing output instead of raising ``FileExistsError``.
    """
    frame = read_lake(source, storage_options=storage_options)
    _require_columns([cluster_column], list(frame.columns), source=source)
    write_lake(frame, output, cluster_column=cluster_column, n_buckets=n_buckets,
               max_cluster_rows=max_cluster_rows, storage_options=storage_options,
               overwrite=overwrite)


def bucketed_copy(source: str | os.PathLike, *, cluster_column: str, scratch: str | os.PathLike,
                  max_cluster_rows: int = MAX_CLUSTER_ROWS,
                  storage_options: dict | None = None) -> str:
    """The copy of ``source`` bucketed by ``cluster_column`` under ``scratch``, written by
    :func:`bucket_lake` when it is not there yet.

    The copy's directory is named by a hash of the source's fingerprint (its files' paths,
    sizes and modification marks, :func:`~merf_dask.io.filesystem.data_fingerprint`), the
    column and ``max_cluster_rows`` (:func:`write_lake`), so a later fit of the same, unchanged
    source finds it, and a changed source gets a new copy. Removing the directory (or all of ``scratch``) is always safe.

    Returns
    -------
    str
        The copy's URL.
    """
    fingerprint = data_fingerprint(source, storage_options=storage_options)
    key = hashlib.sha256(json.dumps([fingerprint, cluster_column, max_cluster_rows]).encode()
                         ).hexdigest()[:24]
    filesystem, root = open_filesystem(scratch, storage_options=storage_options)
    path = posixpath.join(root, f"bucketed-{key}")
    url = url_of(filesystem, path)
    if filesystem.exists(path):
        with contextlib.suppress(ValueError):  # an interrupted publish is written again
            check_complete(url, storage_options=storage_options)
            logger.info("reading the bucketed copy of %s at %s", source, url)
            return url
    logger.info("writing a copy of %s bucketed by %r to %s (once: later fits of the same data "
                "read it)", source, cluster_column, url)
    bucket_lake(source, url, cluster_column=cluster_column, max_cluster_rows=max_cluster_rows,
                storage_options=storage_options, overwrite=True)
    return url


# ---------------------------------------------------------------- writing


def _default_n_buckets(n_rows: int) -> int:
    per_target = math.ceil(n_rows / _TARGET_ROWS_PER_BUCKET)
    per_thread = min(_BUCKETS_PER_THREAD * _worker_threads(), n_rows // _MIN_ROWS_PER_BUCKET)
    # a power of two, so that buckets line up with the M-step's member folds (see bucket_of)
    return 1 << math.ceil(math.log2(max(1, per_target, per_thread)))


def _worker_threads() -> int:
    try:
        client = distributed.get_client()
    except ValueError:  # no client: the work runs on this machine
        return os.cpu_count() or 1
    return sum(client.nthreads().values())


def _arrow_schema(frame: pd.DataFrame | dd.DataFrame, *, bucketed_by: str | None = None
                  ) -> pa.Schema:
    # one schema for every file: inferred per file, a column that is all null in one bucket would
    # get a different type there and the lake would fail its schema check. Dask's non-empty meta
    # stands for the data because an empty object column would be inferred as null.
    sample = frame if isinstance(frame, pd.DataFrame) else frame._meta_nonempty
    objects = [name for name, dtype in sample.dtypes.items() if dtype == object]
    if objects and not isinstance(frame, pd.DataFrame):
        # Dask makes up object values that Arrow cannot type: take them from the data
        head = frame[objects].head(_SCHEMA_SAMPLE_ROWS, npartitions=-1)
        sample = sample.assign(**{name: head[name].dropna().iloc[:1].tolist() * len(sample)
                                  or sample[name] for name in objects})
    schema = pa.Schema.from_pandas(sample, preserve_index=False)
    if bucketed_by is None:
        return schema
    return schema.with_metadata({**schema.metadata, _BUCKETED_BY_KEY: bucketed_by.encode()})


def _row_buckets(rows: pd.DataFrame, cluster_column: str, n_buckets: int, spread: pd.Index
                 ) -> np.ndarray:
    """The bucket of every row: its cluster's, or for rows of spread clusters a hash of the
    row's values modulo ``n_buckets`` (the same in any process)."""
    buckets = bucket_of(rows[cluster_column], n_buckets)
    in_spread = rows[cluster_column].isin(spread).to_numpy()
    if in_spread.any():
        row_hashes = pd.util.hash_pandas_object(rows[in_spread], index=False).to_numpy()
        buckets[in_spread] = (row_hashes % np.uint64(n_buckets)).astype(np.int64)
    return buckets


def _bucket_file(directory: str, bucket: int, part: int = 0) -> str:
    return f"{directory}/{BUCKET_COLUMN}={bucket}/part-{part}.parquet"


def _write_buckets(rows: pd.DataFrame, *, part: int, cluster_column: str, n_buckets: int,
                   spread: pd.Index, filesystem: fsspec.AbstractFileSystem, directory: str,
                   schema: pa.Schema) -> None:
    """Write the rows of input partition ``part`` to one file in each bucket they fall in."""
    buckets = _row_buckets(rows, cluster_column, n_buckets, spread)
    for bucket, bucket_rows in rows.groupby(buckets, sort=True):
        _write_file(bucket_rows, filesystem=filesystem,
                    path=_bucket_file(directory, int(bucket), part), schema=schema)
    # Arrow's allocator keeps freed pages for its next tables: a worker that goes on to fit
    # would carry them as unmanaged memory (two 1 GiB workers were lost after a 20M-row copy)
    pa.default_memory_pool().release_unused()


def _write_file(rows: pd.DataFrame, *, filesystem: fsspec.AbstractFileSystem, path: str,
                schema: pa.Schema) -> None:
    table = pa.Table.from_pandas(rows, schema=schema, preserve_index=False)
    with _open_for_writing(filesystem, path) as file:
        pq.write_table(table, file)


def _open_for_writing(filesystem: fsspec.AbstractFileSystem, path: str):
    filesystem.makedirs(posixpath.dirname(path), exist_ok=True)
    return filesystem.open(path, "wb")


def _simulated_blocks(*, n_rows: int, n_clusters: int, seed: int | None, chunk_rows: int
                      ) -> Iterator[pd.DataFrame]:
    """Consecutive blocks of whole clusters, together one simulation of ``n_clusters`` clusters."""
    rows_per_cluster, n_larger_clusters = divmod(n_rows, n_clusters)
    clusters_per_block = max(1, chunk_rows // rows_per_cluster)
    block_starts = range(0, n_clusters, clusters_per_block)
    block_seeds = np.random.SeedSequence(seed).spawn(len(block_starts))
    for first, block_seed in zip(block_starts, block_seeds, strict=True):
        stop = min(first + clusters_per_block, n_clusters)
        # as in simulate_frame, the first n_larger_clusters clusters of the lake have a row more;
        # simulate_frame gives a block's extra rows to its first clusters, which are those
        n_block_larger = max(0, min(stop, n_larger_clusters) - first)
        block = simulate_frame(n_rows=(stop - first) * rows_per_cluster + n_block_larger,
                               n_clusters=stop - first,
                               seed=int(block_seed.generate_state(1, np.uint64)[0]))
        block["cluster"] = _renumber_clusters(block["cluster"], first=first)
        yield block


def _renumber_clusters(ids: pd.Series, *, first: int) -> pd.Series:
    """Relabel a block's clusters ``c<first>``, ``c<first + 1>``, ... in order of appearance."""
    codes, uniques = pd.factorize(ids)
    labels = "c" + pd.Index(np.arange(first, first + len(uniques))).astype(str)
    return pd.Series(labels[codes], index=ids.index)


def _data_files(filesystem: fsspec.AbstractFileSystem, root: str, *, url) -> list[str]:
    """Sorted data files of a dataset, skipping ``_``- and ``.``-prefixed names as pyarrow does."""
    filesystem.invalidate_cache(root)  # files may have been written by other processes
    if not filesystem.exists(root):
        raise FileNotFoundError(f"no Parquet dataset at {url}")
    if filesystem.isfile(root):
        return [root]
    files = sorted(
        path for path in filesystem.find(root)
        if not any(part.startswith(("_", ".")) for part in path[len(root) + 1:].split("/")))
    if not files:
        raise ValueError(f"{url} holds no Parquet files")
    return files


def _arrow_filesystem(filesystem: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    # pyarrow's own local filesystem reads without a round trip through Python
    if isinstance(filesystem, LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem))


def _read_footers(filesystem: fsspec.AbstractFileSystem, files: list[str]
                  ) -> list[pq.FileMetaData]:
    arrow_filesystem = _arrow_filesystem(filesystem)

    def read_footer(path: str) -> pq.FileMetaData:
        try:
            return pq.read_metadata(path, filesystem=arrow_filesystem)
        except pa.ArrowInvalid as error:
            raise ValueError(
                f"{url_of(filesystem, path)} is not a valid Parquet file: {error}") from error

    with ThreadPoolExecutor(max_workers=min(_FOOTER_READERS, len(files))) as pool:
        return list(pool.map(read_footer, files))


def _common_schema(filesystem: fsspec.AbstractFileSystem, files: list[str],
                   footers: list[pq.FileMetaData]) -> pa.Schema:
    """The schema of the first file, after checking every other file has the same columns.

    Column order and nullability may differ: pyarrow matches columns by name.
    """
    reference = footers[0].schema.to_arrow_schema()
    reference_types = {field.name: field.type for field in reference}
    for path, footer in zip(files[1:], footers[1:], strict=True):
        types = {field.name: field.type for field in footer.schema.to_arrow_schema()}
        difference = _schema_difference(types, reference_types)
        if difference:
            raise ValueError(
                f"{url_of(filesystem, path)} does not match the schema of "
                f"{url_of(filesystem, files[0])}: {difference}")
    return reference


def _schema_difference(types: dict[str, pa.DataType], reference: dict[str, pa.DataType]
                       ) -> str | None:
    for name, reference_type in reference.items():
        if name not in types:
            return f"column {name!r} is missing"
        if not types[name].equals(reference_type):
            return f"column {name!r} is {types[name]}, not {reference_type}"
    extra = [name for name in types if name not in reference]
    return f"it has the extra column {extra[0]!r}" if extra else None


def _files_by_bucket(root: str, files: list[str]) -> dict[int, list[str]] | None:
    """Files per bucket number when every file lies directly in a ``bucket=K`` directory."""
    by_bucket: dict[int, list[str]] = {}
    for path in files:
        directory, _, _ = path[len(root) + 1:].rpartition("/")
        match = _BUCKET_DIRECTORY.fullmatch(directory)
        if match is None:
            return None
        by_bucket.setdefault(int(match.group(1)), []).append(path)
    return dict(sorted(by_bucket.items()))


def _hive_keys(root: str, files: list[str]) -> list[str]:
    directories = {part for path in files for part in path[len(root) + 1:].split("/")[:-1]}
    return sorted({part.partition("=")[0] for part in directories if "=" in part})


def _filter_columns(filters: list | None) -> list[str]:
    if not filters:
        return []
    # a flat list of (column, op, value) is one conjunction; a list of lists is a disjunction
    conjunctions = filters if isinstance(filters[0], list) else [filters]
    return [column for conjunction in conjunctions for column, _, _ in conjunction]


def _require_columns(requested: Sequence[str], available: Sequence[str], *, source) -> None:
    missing = [column for column in requested if column not in available]
    if missing:
        raise ValueError(f"column {missing[0]!r} is not in {source}; available columns: "
                         f"{', '.join(map(repr, available))}")


def _bucket_dataset(filesystem: fsspec.AbstractFileSystem, buckets: dict[int, list[str]], *,
                    lake_schema: pa.Schema) -> ds.FileSystemDataset:
    """A dataset of the given bucket files whose ``bucket`` column comes from their directory.

    Built from the known paths and partition expressions: no listing, no footer read.
    """
    paths = [path for files in buckets.values() for path in files]
    partitions = [pc.field(BUCKET_COLUMN) == bucket
                  for bucket, files in buckets.items() for _ in files]
    return ds.FileSystemDataset.from_paths(
        paths, schema=lake_schema, format=ds.ParquetFileFormat(),
        filesystem=_arrow_filesystem(filesystem), partitions=partitions)


def _read_bucket(bucket_files: tuple[int, list[str]], *, filesystem: fsspec.AbstractFileSystem,
                 lake_schema: pa.Schema, columns: list[str], row_filter: pc.Expression | None
                 ) -> pd.DataFrame:
    bucket, files = bucket_files
    dataset = _bucket_dataset(filesystem, {bucket: files}, lake_schema=lake_schema)
    return dataset.to_table(columns=columns, filter=row_filter).to_pandas()


def _read_buckets(filesystem: fsspec.AbstractFileSystem, buckets: dict[int, list[str]], *,
                  file_schema: pa.Schema, columns: list[str], filters: list | None
                  ) -> dd.DataFrame:
    lake_schema = file_schema.append(_BUCKET_FIELD)
    filter_expression = pq.filters_to_expression(filters) if filters else None
    if filter_expression is not None:
        # conditions on the bucket column rule out whole buckets before any task exists
        dataset = _bucket_dataset(filesystem, buckets, lake_schema=lake_schema)
        kept = {fragment.path for fragment in dataset.get_fragments(filter=filter_expression)}
        buckets = {bucket: files for bucket, files in buckets.items()
                   if any(path in kept for path in files)}
    meta = lake_schema.empty_table().select(columns).to_pandas()
    if not buckets:
        return dd.from_pandas(meta, npartitions=1)
    return dd.from_map(_read_bucket, list(buckets.items()), filesystem=filesystem,
                       lake_schema=lake_schema, columns=columns, row_filter=filter_expression,
                       meta=meta, enforce_metadata=False, label="read-lake")
