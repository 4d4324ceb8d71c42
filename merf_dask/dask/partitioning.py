"""Keep every cluster's rows in exactly one partition of a Dask DataFrame.

The distributed E-step is local to a partition only when no cluster spans two partitions; the
exception is a cluster with more than ``max_cluster_rows`` rows, which the fit spreads over
partitions anyway (:func:`merf_dask.core.em.spread_part`).

Functions
---------
split_clusters
    The cluster ids found in more than one partition, spread clusters aside (a cheap
    per-partition ``value_counts`` pass).
ensure_cluster_partitions
    Check the invariant; shuffle by cluster id once when it does not hold.
check_cluster_partitions
    Check the invariant and raise a ``ValueError`` naming offending clusters when it does not hold.
"""

from __future__ import annotations

import dask
import pandas as pd

from ..core.em import MAX_CLUSTER_ROWS

__all__ = ["split_clusters", "ensure_cluster_partitions", "check_cluster_partitions"]


def _cluster_rows(part: pd.DataFrame, column: str) -> pd.Series:
    return part[column].value_counts(sort=False)


def split_clusters(ddf, column: str, *, max_cluster_rows: int = MAX_CLUSTER_ROWS) -> pd.Index:
    """Cluster ids that occur in more than one partition and have at most
    ``max_cluster_rows`` rows (larger ones are spread by the fit wherever they are).

    Parameters
    ----------
    ddf : dask.dataframe.DataFrame
    column : str
        Name of the cluster-id column.
    max_cluster_rows : int, default=250,000

    Returns
    -------
    pandas.Index
        The split ids (empty when every cluster lives in one partition).
    """
    per_partition = pd.concat(dask.compute(*[
        dask.delayed(_cluster_rows)(part, column) for part in ddf.to_delayed()]))
    grouped = per_partition.groupby(level=0, sort=False)
    partitions, rows = grouped.size(), grouped.sum()
    return partitions.index[(partitions.to_numpy() > 1) & (rows.to_numpy() <= max_cluster_rows)]


def check_cluster_partitions(ddf, column: str, *, max_cluster_rows: int = MAX_CLUSTER_ROWS
                             ) -> None:
    """Raise ``ValueError`` when a cluster of at most ``max_cluster_rows`` rows spans more
    than one partition."""
    split = split_clusters(ddf, column, max_cluster_rows=max_cluster_rows)
    if len(split):
        examples = ", ".join(map(repr, split[:5].tolist()))
        raise ValueError(
            f"{len(split)} clusters of column {column!r} span more than one partition "
            f"(for example {examples}); shuffle by {column!r} first "
            f"(merf_dask.dask.partitioning.ensure_cluster_partitions)")


def ensure_cluster_partitions(ddf, column: str, *, npartitions: int | None = None,
                              max_cluster_rows: int = MAX_CLUSTER_ROWS):
    """Return ``ddf`` with every cluster in exactly one partition (clusters of more than
    ``max_cluster_rows`` rows may stay spread).

    Cluster-whole input (for example a lake bucketed by a stable hash of the cluster id) is
    returned unchanged; anything else is shuffled once by ``column``.

    Parameters
    ----------
    ddf : dask.dataframe.DataFrame
    column : str
        Name of the cluster-id column.
    npartitions : int, optional
        Partitions after a shuffle; defaults to the input's.
    max_cluster_rows : int, default=250,000

    Returns
    -------
    dask.dataframe.DataFrame
    """
    if ddf.npartitions == 1 or not len(split_clusters(ddf, column,
                                                      max_cluster_rows=max_cluster_rows)):
        return ddf
    # a hash shuffle puts equal ids in one partition by construction: no second check
    return ddf.shuffle(on=column, npartitions=npartitions or ddf.npartitions)
