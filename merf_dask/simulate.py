"""Simulated clustered data from the MERF paper's data-generating process.

The process (Hajjem, Bellavance & Larocque 2014; merf's ``MERFDataGenerator``)::

    y_ij = m * g(x_ij) + b_i + e_ij,
    g(x) = 2 x1 + x2**2 + 4 * 1(x3 > 0) + 2 log|x1| x3,   x ~ N(0, I_3),
    b_i ~ N(0, sigma_b2),   e_ij ~ N(0, sigma_e2).

Functions
---------
simulate_frame
    One frame with a given number of rows and clusters (what ``merf-dask simulate`` writes).
gain_experiment
    The known/new-cluster design of merf's gain experiment: train, known-cluster test and
    new-cluster test frames for one of the six (m, sigma_b2) scenarios.
simulate_crossed_frame
    The same g(x) with crossed random intercepts of users and items (ratings, clicks):
    y = m g(x) + u_user + v_item + e.

Cluster ids are strings (``"c0"``, ``"c1"``, ...) built with int64 arithmetic, so any number of
clusters works (merf 1.0's generator overflows int8 above 128 clusters).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["GAIN_SCENARIOS", "simulate_frame", "gain_experiment", "simulate_crossed_frame",
           "fixed_effect_function"]

#: (m, sigma_b2) of the six scenarios of merf's gain experiment, sigma_e2 = 1 throughout.
GAIN_SCENARIOS: tuple[tuple[float, float], ...] = (
    (0.8, 0.9),
    (0.7, 2.7),
    (0.6, 4.5),
    (0.3, 0.2),
    (0.3, 0.5),
    (0.2, 0.8),
)


def fixed_effect_function(x: np.ndarray) -> np.ndarray:
    """The paper's non-linear fixed effect g(x).

    Parameters
    ----------
    x : ndarray of shape (n_samples, 3)

    Returns
    -------
    ndarray of shape (n_samples,)
    """
    x1, x2, x3 = x[:, 0], x[:, 1], x[:, 2]
    with np.errstate(divide="ignore"):
        log_abs_x1 = np.log(np.abs(x1))
    return 2 * x1 + x2**2 + 4 * (x3 > 0) + 2 * log_abs_x1 * x3


def _cluster_rows(sizes: np.ndarray, *, m: float, b: np.ndarray, sigma_e2: float,
                  rng: np.random.Generator, id_offset: int = 0) -> pd.DataFrame:
    codes = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    x = rng.standard_normal((len(codes), 3))
    y = m * fixed_effect_function(x) + b[codes] + rng.normal(0.0, np.sqrt(sigma_e2), len(codes))
    ids = pd.Index(np.arange(len(sizes), dtype=np.int64) + id_offset).astype(str)
    return pd.DataFrame({
        "cluster": "c" + ids[codes],
        "y": y,
        "x1": x[:, 0],
        "x2": x[:, 1],
        "x3": x[:, 2],
    })


def simulate_frame(*, n_rows: int, n_clusters: int, m: float = 0.6, sigma_b2: float = 4.5,
                   sigma_e2: float = 1.0, seed: int | None = 0) -> pd.DataFrame:
    """Simulate ``n_rows`` rows spread as evenly as possible over ``n_clusters`` clusters.

    Parameters
    ----------
    n_rows : int
        Total number of rows, at least ``n_clusters``.
    n_clusters : int
        Number of clusters (at least 1).
    m, sigma_b2, sigma_e2 : float
        Scale of the fixed effect, variance of the random intercepts and of the noise.
    seed : int or None
        Seed of the generator.

    Returns
    -------
    DataFrame of shape (n_rows, 5)
        Columns ``cluster`` (str), ``y``, ``x1``, ``x2``, ``x3``.
    """
    if n_clusters < 1 or n_rows < n_clusters:
        raise ValueError(
            f"need 1 <= clusters <= rows, got rows={n_rows}, clusters={n_clusters}")
    rng = np.random.default_rng(seed)
    sizes = np.full(n_clusters, n_rows // n_clusters, dtype=np.int64)
    sizes[: n_rows % n_clusters] += 1
    b = rng.normal(0.0, np.sqrt(sigma_b2), n_clusters)
    return _cluster_rows(sizes, m=m, b=b, sigma_e2=sigma_e2, rng=rng)


def gain_experiment(scenario: int = 2, *, seed: int | None = 0
                    ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The train / known-cluster test / new-cluster test design of merf's gain experiment.

    100 known clusters of sizes {10, 30, 50, 70, 90} (20 each) of which 10 % of the rows train
    (500 rows) and 90 % test (4,500 rows); 100 new clusters of the same sizes (5,000 rows).

    Parameters
    ----------
    scenario : int in [0, 6)
        Index into :data:`GAIN_SCENARIOS`.
    seed : int or None

    Returns
    -------
    train, test_known, test_new : DataFrame
        Columns as :func:`simulate_frame`.
    """
    m, sigma_b2 = GAIN_SCENARIOS[scenario]
    rng = np.random.default_rng(seed)
    sizes = np.repeat(np.array([10, 30, 50, 70, 90], dtype=np.int64), 20)
    known = _cluster_rows(sizes, m=m, b=rng.normal(0, np.sqrt(sigma_b2), len(sizes)),
                          sigma_e2=1.0, rng=rng)
    new = _cluster_rows(sizes, m=m, b=rng.normal(0, np.sqrt(sigma_b2), len(sizes)),
                        sigma_e2=1.0, rng=rng, id_offset=len(sizes))
    # the first 10 % of each known cluster's rows train; rows are i.i.d. within a cluster
    position = known.groupby("cluster", sort=False).cumcount().to_numpy()
    size = known.groupby("cluster", sort=False)["y"].transform("size").to_numpy()
    is_train = position < size // 10
    return (known[is_train].reset_index(drop=True),
            known[~is_train].reset_index(drop=True), new)


def simulate_crossed_frame(*, n_rows: int, n_users: int, n_items: int, m: float = 0.6,
                           sigma_user2: float = 1.0, sigma_item2: float = 0.5,
                           sigma_e2: float = 1.0, item_skew: float = 1.0,
                           seed: int | None = 0) -> pd.DataFrame:
    """Rows of users rating items: crossed random intercepts, truth known.

    Every row draws its user uniformly and its item from a Zipf-like law (item i with weight
    (i + 1)^-item_skew, so a few items are popular, as in ratings data); g(x) as in
    :func:`simulate_frame`.

    Parameters
    ----------
    n_rows, n_users, n_items : int
    m : float
        Scale of the fixed effect.
    sigma_user2, sigma_item2, sigma_e2 : float
        Variances of the user and item intercepts and of the noise.
    item_skew : float
        Exponent of the items' popularity law (0 is uniform).
    seed : int or None

    Returns
    -------
    DataFrame of shape (n_rows, 6)
        Columns ``user`` and ``item`` (str), ``y``, ``x1``, ``x2``, ``x3``.
    """
    if min(n_users, n_items) < 1 or n_rows < max(n_users, n_items):
        raise ValueError(f"need 1 <= users, items <= rows, got rows={n_rows}, "
                         f"users={n_users}, items={n_items}")
    rng = np.random.default_rng(seed)
    user = rng.integers(0, n_users, n_rows)
    weights = (np.arange(n_items) + 1.0) ** -item_skew
    item = rng.choice(n_items, size=n_rows, p=weights / weights.sum())
    x = rng.standard_normal((n_rows, 3))
    y = (m * fixed_effect_function(x) + rng.normal(0, np.sqrt(sigma_user2), n_users)[user]
         + rng.normal(0, np.sqrt(sigma_item2), n_items)[item]
         + rng.normal(0, np.sqrt(sigma_e2), n_rows))
    return pd.DataFrame({"user": "u" + pd.Index(user).astype(str),
                         "item": "i" + pd.Index(item).astype(str),
                         "y": y, "x1": x[:, 0], "x2": x[:, 1], "x3": x[:, 2]})
