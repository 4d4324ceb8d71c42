"""Stable hashes of cluster ids: the same in every process, machine and session.

Lake buckets (:mod:`merf_dask.io.lake`) and the M-step's residue classes
(:mod:`merf_dask.core.ensemble`) both use :func:`cluster_hashes`, so that when a lake's bucket count
divides the stride every member's rows come from one bucket.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["cluster_hashes"]


def cluster_hashes(cluster_ids) -> np.ndarray:
    """Stable 64-bit hash of each cluster id, the same in every process, machine and session.

    Uses pandas' SipHash with a fixed key (``hash_pandas_object``), never Python's ``hash()``,
    which is salted per process. Integer ids hash as int64 and everything else by its string, so
    an id hashes the same whether it is int64, a Python int in an object array, a category or a
    string of any string dtype.

    Parameters
    ----------
    cluster_ids : array-like of shape (n,)

    Returns
    -------
    ndarray of shape (n,), dtype uint64
    """
    ids = pd.Series(np.asarray(cluster_ids)).infer_objects()
    ids = ids.astype(np.int64 if pd.api.types.is_integer_dtype(ids.dtype) else str)
    return pd.util.hash_pandas_object(ids, index=False).to_numpy()
