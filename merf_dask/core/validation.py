"""Turn what users pass to ``fit`` / ``predict`` into checked numpy arrays.

merf 1.0 wanted a pandas Series for ``clusters`` and failed obscurely on anything else (its
issues #13 and #59). Here X, Z, clusters and y may be numpy arrays, lists, pandas DataFrames or
Series (y may be a one-column DataFrame); every problem is one ``ValueError`` naming the argument
and, where there is one, the column.

Functions
---------
check_matrix
    X or Z as a finite float64 matrix, with its column names.
check_vector
    y as a finite float64 vector.
check_clusters
    Cluster ids of any hashable type as a pandas Series (no missing ids).
check_same_length
    All arguments describe the same rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["check_matrix", "check_vector", "check_clusters", "check_same_length"]


def _first_bad_column(values: np.ndarray, names: list[str]) -> str:
    bad = np.flatnonzero(~np.isfinite(values).all(axis=0))[0]
    return names[bad]


def check_matrix(data, *, name: str) -> tuple[np.ndarray, list[str]]:
    """Return ``data`` as a finite float64 array of shape (n_samples, n_columns) and its column names.

    Parameters
    ----------
    data : array-like or DataFrame of shape (n_samples, n_columns) or (n_samples,)
        A 1-d input is one column.
    name : str
        Argument name used in error messages (``"X"``, ``"Z"``).

    Returns
    -------
    values : ndarray of shape (n_samples, n_columns)
    columns : list of str
        DataFrame column names, or ``name0, name1, ...``.
    """
    if isinstance(data, pd.Series):
        data = data.to_frame()
    if isinstance(data, pd.DataFrame):
        columns = [str(c) for c in data.columns]
        non_numeric = [str(c) for c, dtype in data.dtypes.items()
                       if not (pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype))]
        if non_numeric:
            raise ValueError(f"{name} has non-numeric columns {non_numeric}; encode them as numbers "
                             "(or use a formula, which encodes string columns)")
        values = data.to_numpy(dtype=float, na_value=np.nan)
    else:
        try:
            values = np.asarray(data, dtype=float)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name} must be numeric: {error}") from None
        if values.ndim == 1:
            values = values[:, None]
        if values.ndim != 2:
            raise ValueError(f"{name} must be 2-dimensional, got shape {values.shape}")
        columns = [f"{name}{i}" for i in range(values.shape[1])]
    if values.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows)")
    if values.shape[1] == 0:
        raise ValueError(f"{name} has no columns")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or infinite values in column "
                         f"{_first_bad_column(values, columns)!r}")
    return values, columns


def check_vector(data, *, name: str) -> np.ndarray:
    """Return ``data`` as a finite float64 array of shape (n_samples,).

    A one-column DataFrame is accepted (merf 1.0 failed on ``df[["y"]]``, its issue #59).
    """
    if isinstance(data, pd.DataFrame):
        if data.shape[1] != 1:
            raise ValueError(f"{name} must have one column, got {data.shape[1]}")
        data = data.iloc[:, 0]
    try:
        values = np.asarray(data, dtype=float)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numeric: {error}") from None
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional, got shape {values.shape}")
    if values.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows)")
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise ValueError(f"{name} contains {len(bad)} NaN or infinite values "
                         f"(first at row {bad[0]})")
    return values


def check_clusters(data, *, name: str = "clusters") -> pd.Series:
    """Cluster ids of any hashable type (int, str, ...) as a pandas Series with a fresh index."""
    if isinstance(data, pd.DataFrame):
        if data.shape[1] != 1:
            raise ValueError(f"{name} must have one column, got {data.shape[1]}")
        data = data.iloc[:, 0]
    try:
        ids = pd.Series(data).reset_index(drop=True)
    except ValueError as error:  # e.g. a 2-d array
        raise ValueError(f"{name} must be 1-dimensional: {error}") from None
    if len(ids) == 0:
        raise ValueError(f"{name} is empty (0 rows)")
    missing = ids.isna().to_numpy()
    if missing.any():
        raise ValueError(f"{name} has {int(missing.sum())} missing ids (first at row "
                         f"{int(np.flatnonzero(missing)[0])})")
    return ids


def check_same_length(**arrays) -> None:
    """Raise ``ValueError`` naming the arguments when they have different numbers of rows."""
    lengths = {name: len(values) for name, values in arrays.items() if values is not None}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{name} has {n}" for name, n in lengths.items())
        raise ValueError(f"inconsistent numbers of rows: {described}")
