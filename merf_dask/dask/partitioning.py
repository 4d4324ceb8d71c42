"""Keep every cluster's rows in exactly one partition of a Dask DataFrame.

The distributed E-step is local to a partition only when no cluster spans two partitions.

Functions
---------
split_clusters
    The cluster ids found in more than one partition (a cheap per-partition ``unique`` pass).
ensure_cluster_partitions
    Check the invariant; shuffle by cluster id once when it does not hold.
check_cluster_partitions
    Check the invariant and raise a ``ValueError`` naming offending clusters when it does not hold.
"""

from __future__ import annotations

import dask
import pandas as pd

__all__ = ["split_clusters", "ensure_cluster_partitions", "check_cluster_partitions"]


def _unique_ids(part: pd.DataFrame, column: str) -> pd.Series:
    return pd.Series(part[column].unique())


def split_clusters(ddf, column: str) -> pd.Index:
    """Cluster ids that occur in more than one partition.

    Parameters
    ----------
    ddf : dask.dataframe.DataFrame
    column : str
        Name of the cluster-id column.

    Returns
    -------
    pandas.Index
        The split ids (empty when every cluster lives in one partition).
    """
    per_partition = dask.compute(*[
        dask.delayed(_unique_ids)(part, column) for part in ddf.to_delayed()
    ])
    counts = pd.concat(per_partition, ignore_index=True).value_counts()
    return counts.index[counts.to_numpy() > 1]


def check_cluster_partitions(ddf, column: str) -> None:
    """Raise ``ValueError`` when a cluster spans more than one partition."""
    split = split_clusters(ddf, column)
    if len(split):
        examples = ", ".join(map(repr, split[:5].tolist()))
        raise ValueError(
            f"{len(split)} clusters of column {column!r} span more than one partition "
            f"(for example {examples}); shuffle by {column!r} first "
            f"(merf_dask.dask.partitioning.ensure_cluster_partitions)")


def ensure_cluster_partitions(ddf, column: str, *, npartitions: int | None = None):
    """Return ``ddf`` with every cluster in exactly one partition.

    Cluster-whole input (for example a lake bucketed by a stable hash of the cluster id) is
    returned unchanged; anything else is shuffled once by ``column``.

    Parameters
    ----------
    ddf : dask.dataframe.DataFrame
    column : str
        Name of the cluster-id column.
    npartitions : int, optional
        Partitions after a shuffle; defaults to the input's.

    Returns
    -------
    dask.dataframe.DataFrame
    """
    if ddf.npartitions == 1 or len(split_clusters(ddf, column)) == 0:
        return ddf
    # a hash shuffle puts equal ids in one partition by construction: no second check
    return ddf.shuffle(on=column, npartitions=npartitions or ddf.npartitions)
