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

__all__ = ["check_matrix", "check_vector", "check_clusters", "check_same_length",
           "check_feature_names", "LARGEST_VALUE"]


def _first_bad_column(values: np.ndarray, names: list[str]) -> str:
    bad = np.flatnonzero(~np.isfinite(values).all(axis=0))[0]
    return names[bad]


#: The largest magnitude accepted in y and Z: EM sums their squares over every row, which
#: overflow float64 (about 1.8e308) once values pass about 1e150.
LARGEST_VALUE = 1e150

#: Cluster id types that fit, save and load all support (pandas' ``infer_dtype`` names).
_ID_KINDS = {"integer", "string", "floating", "boolean", "datetime64", "datetime", "date",
             "timedelta64", "timedelta"}


def _refuse_overflow(values: np.ndarray, largest: float | None, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` when a value exceeds ``largest`` in magnitude."""
    if largest is None or not values.size:
        return
    biggest = float(np.abs(values).max())
    if biggest > largest:
        raise ValueError(f"{what} has values up to {biggest:.3g}; EM sums their squares, which "
                         f"overflow above about {largest:.0e}: rescale {what}")


def check_matrix(data, *, name: str, allow_empty: bool = False, largest: float | None = None,
                 columns: list[str] | None = None, allow_no_columns: bool = False
                 ) -> tuple[np.ndarray, list[str] | None]:
    """Return ``data`` as a finite float64 array of shape (n_samples, n_columns) and its column names.

    Parameters
    ----------
    data : array-like or DataFrame of shape (n_samples, n_columns) or (n_samples,)
        A 1-d input is one column.
    name : str
        Argument name used in error messages (``"X"``, ``"Z"``).
    allow_empty : bool, default=False
        Accept 0 rows (prediction of an empty frame or partition).
    largest : float, optional
        Refuse values whose magnitude exceeds this (see ``LARGEST_VALUE``).
    columns : list of str, optional
        Names of an array's columns for error messages (a formula's design).
    allow_no_columns : bool, default=False
        Accept 0 columns (the features of a formula such as ``y ~ 1 + (1 | g)``).

    Returns
    -------
    values : ndarray of shape (n_samples, n_columns)
    columns : list of str or None
        The DataFrame's column names; None for an array without names.
    """
    if isinstance(data, pd.Series):
        data = data.to_frame()
    frame_columns = None
    if isinstance(data, pd.DataFrame):
        frame_columns = [str(c) for c in data.columns]
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
    names = frame_columns or columns or [f"{name}{i}" for i in range(values.shape[1])]
    if values.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (0 rows)")
    if values.shape[1] == 0 and not allow_no_columns:
        raise ValueError(f"{name} has no columns")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or infinite values in column "
                         f"{_first_bad_column(values, names)!r}")
    for j, column in enumerate(names if largest is not None else ()):
        _refuse_overflow(values[:, j], largest, f"{name} column {column!r}")
    return values, frame_columns


def check_vector(data, *, name: str, largest: float | None = LARGEST_VALUE) -> np.ndarray:
    """Return ``data`` as a finite float64 array of shape (n_samples,).

    A one-column DataFrame is accepted (merf 1.0 failed on ``df[["y"]]``, its issue #59); values
    beyond ``largest`` in magnitude are refused (see ``LARGEST_VALUE``).
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
    _refuse_overflow(values, largest, name)
    return values


def check_clusters(data, *, name: str = "clusters", allow_empty: bool = False) -> pd.Series:
    """Cluster ids as a pandas Series with a fresh index.

    Ids are integers, strings, floats, booleans or dates, all of one kind: those are what a
    model directory stores and reads back as the same ids. Mixed kinds (``1`` and ``"1"``) and
    containers (tuples) are refused here rather than at save or predict time.
    """
    if isinstance(data, pd.DataFrame):
        if data.shape[1] != 1:
            raise ValueError(f"{name} must have one column, got {data.shape[1]}")
        data = data.iloc[:, 0]
    try:
        ids = pd.Series(data).reset_index(drop=True)
    except ValueError as error:  # e.g. a 2-d array
        raise ValueError(f"{name} must be 1-dimensional: {error}") from None
    if len(ids) == 0:
        if allow_empty:
            return ids
        raise ValueError(f"{name} is empty (0 rows)")
    missing = ids.isna().to_numpy()
    if missing.any():
        raise ValueError(f"{name} has {int(missing.sum())} missing ids (first at row "
                         f"{int(np.flatnonzero(missing)[0])})")
    kind = pd.api.types.infer_dtype(ids, skipna=False)
    if kind == "categorical":
        kind = pd.api.types.infer_dtype(ids.cat.categories, skipna=False)
    if kind not in _ID_KINDS:
        kinds = sorted({type(v).__name__ for v in ids.iloc[:1000]})
        raise TypeError(f"{name} must all be integers, or all strings (or floats, booleans, "
                        f"dates); got {kind} ids (types {', '.join(kinds)}, first "
                        f"{ids.iloc[0]!r}): convert them to one type, e.g. .astype(str)")
    return ids


def check_same_length(**arrays) -> None:
    """Raise ``ValueError`` naming the arguments when they have different numbers of rows."""
    lengths = {name: len(values) for name, values in arrays.items() if values is not None}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{name} has {n}" for name, n in lengths.items())
        raise ValueError(f"inconsistent numbers of rows: {described}")


def check_feature_names(given: list[str] | None, fitted: list[str], *, name: str) -> None:
    """Raise ``ValueError`` when a DataFrame's columns differ from those seen in fit.

    Like scikit-learn, names must match in number, spelling and order: a reordered frame would
    otherwise be predicted silently with its columns swapped. Arrays (``given`` None) pass.
    """
    if given is None or list(given) == list(fitted):
        return
    missing = [c for c in fitted if c not in given]
    unexpected = [c for c in given if c not in fitted]
    if missing or unexpected:
        raise ValueError(f"{name}'s columns differ from those seen in fit: missing {missing}, "
                         f"unexpected {unexpected} (fit saw {list(fitted)})")
    raise ValueError(f"{name}'s columns are in another order than in fit: got {list(given)}, "
                     f"fit saw {list(fitted)}; select them in that order (X[{list(fitted)}])")
