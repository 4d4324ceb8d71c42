"""The side-by-side benchmark's data: the paper's process in the design of peers.md section 3.

    y_ij = m * g(x_ij) + b_i + e_ij,   b_i ~ N(0, sigma_b2),   e_ij ~ N(0, sigma_e2),

with g from :func:`merf_dask.simulate.fixed_effect_function`. Training clusters come in five sizes
(5, 15, 30, 60, 90 rows, equally many of each: 500 clusters for 20,000 rows); every known cluster
also has 10 held-out rows, and 100 new clusters of 50 rows are never seen in training.

The frames carry the truth (``f_true`` = m g(x), ``b_true``) so the benchmark can score an oracle;
models only ever see ``x1, x2, x3, cluster, y``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from merf_dask.simulate import fixed_effect_function

TRAIN_CLUSTER_SIZES = (5, 15, 30, 60, 90)
HELD_OUT_ROWS_PER_KNOWN_CLUSTER = 10
NEW_CLUSTERS, ROWS_PER_NEW_CLUSTER = 100, 50
#: peers.md section 3: m = 0.6, sigma_b = 4.5 as the *standard deviation* of b_i, sigma_e = 1
M, SIGMA_B2, SIGMA_E2 = 0.6, 4.5**2, 1.0
FEATURES = ["x1", "x2", "x3"]


@dataclass
class Design:
    """Training rows, held-out rows of the training clusters, and rows of new clusters."""

    train: pd.DataFrame
    test_known: pd.DataFrame
    test_new: pd.DataFrame


def model_inputs(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, pd.Series, np.ndarray]:
    """X, Z (a random intercept), cluster ids and y of a frame, as ``MERF.fit`` takes them."""
    return (frame[FEATURES].to_numpy(), np.ones((len(frame), 1)), frame["cluster"],
            frame["y"].to_numpy())


def _clusters(sizes: np.ndarray, b: np.ndarray, rng: np.random.Generator,
              first_id: int) -> pd.DataFrame:
    codes = np.repeat(np.arange(len(sizes)), sizes)
    x = rng.standard_normal((len(codes), 3))
    f_true = M * fixed_effect_function(x)
    return pd.DataFrame({
        "cluster": pd.Index(codes + first_id).map(lambda code: f"c{code}"),
        "y": f_true + b[codes] + rng.normal(0.0, np.sqrt(SIGMA_E2), len(codes)),
        "x1": x[:, 0], "x2": x[:, 1], "x3": x[:, 2],
        "f_true": f_true, "b_true": b[codes],
    })


def paper_design(n_train_rows: int, seed: int) -> Design:
    """Simulate ``n_train_rows`` training rows (a multiple of 200) and the two test sets."""
    clusters_per_size, remainder = divmod(n_train_rows, sum(TRAIN_CLUSTER_SIZES))
    if remainder or clusters_per_size == 0:
        raise ValueError(f"rows must be a positive multiple of {sum(TRAIN_CLUSTER_SIZES)}")
    rng = np.random.default_rng(seed)
    train_sizes = np.repeat(np.array(TRAIN_CLUSTER_SIZES), clusters_per_size)
    n_known = len(train_sizes)
    known = _clusters(train_sizes + HELD_OUT_ROWS_PER_KNOWN_CLUSTER,
                      rng.normal(0.0, np.sqrt(SIGMA_B2), n_known), rng, first_id=0)
    new = _clusters(np.full(NEW_CLUSTERS, ROWS_PER_NEW_CLUSTER),
                    rng.normal(0.0, np.sqrt(SIGMA_B2), NEW_CLUSTERS), rng, first_id=n_known)
    # the last 10 rows of every known cluster are held out; rows are i.i.d. within a cluster
    rows_left = known.groupby("cluster", sort=False).cumcount(ascending=False).to_numpy()
    held_out = rows_left < HELD_OUT_ROWS_PER_KNOWN_CLUSTER
    return Design(train=known[~held_out].reset_index(drop=True),
                  test_known=known[held_out].reset_index(drop=True),
                  test_new=new)
