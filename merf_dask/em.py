"""The MERF EM loop, written once for every place the data can live.

The loop talks to its data through three methods (the :class:`EMData` protocol), so the same
iteration runs on in-memory arrays (:class:`InMemoryEMData`, below) and on partitions held by Dask
workers (:class:`merf_dask.dask_em.DaskEMData`):

1. ``fit_fixed_effects`` -- the M-step for f: fit the learner to the working response
   y - Z b and keep its honest (out-of-bag) predictions at the training rows;
2. ``random_effects_step`` -- the E-step for b from per-cluster sufficient statistics, returning
   the partial sums (:class:`merf_dask._core.EMSums`);
3. ``random_effects`` -- the final table of b_i and Var(b_i | y_i).

The driver combines the sums into sigma2, D and the GLL (:func:`_core.update_variance_components`),
logs one line per iteration and stops on the relative change of the GLL.

Classes and functions
---------------------
EMData
    The protocol above.
InMemoryEMData
    All rows in this process.
IterationRecord, EMResult
    What one iteration and the whole fit report.
run_em
    The loop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator

from ._core import (EMSums, cluster_statistics, random_effects_offset, random_effects_step,
                    update_variance_components)
from .learners import fit_fixed_effects

__all__ = ["EMData", "InMemoryEMData", "IterationRecord", "EMResult", "run_em"]

logger = logging.getLogger("merf_dask")


class EMData(Protocol):
    """Where the rows live, as the EM loop sees it."""

    def fit_fixed_effects(self, learner: BaseEstimator, *, use_oob: bool,
                          iteration: int) -> BaseEstimator: ...

    def random_effects_step(self, *, sigma2: float, D: np.ndarray) -> EMSums: ...

    def random_effects(self) -> tuple[pd.Index, np.ndarray, np.ndarray]: ...


class InMemoryEMData:
    """All training rows in this process.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    Z : ndarray of shape (n_samples, q)
    codes : ndarray of shape (n_samples,), int
        Cluster of each row, in ``[0, len(cluster_ids))``.
    y : ndarray of shape (n_samples,)
    cluster_ids : pandas.Index of length n_clusters
    """

    def __init__(self, *, X, Z, codes, y, cluster_ids: pd.Index):
        self.X, self.Z, self.codes, self.y = X, Z, codes, y
        self.cluster_ids = cluster_ids
        self.b = np.zeros((len(cluster_ids), Z.shape[1]))
        self.b_cov = np.zeros((len(cluster_ids), Z.shape[1], Z.shape[1]))
        self.f_hat = None

    def fit_fixed_effects(self, learner, *, use_oob, iteration):
        working_response = self.y - random_effects_offset(self.Z, self.b, self.codes)
        fitted, self.f_hat = fit_fixed_effects(learner, self.X, working_response, use_oob=use_oob)
        return fitted

    def random_effects_step(self, *, sigma2, D):
        stats = cluster_statistics(self.codes, self.Z, self.y - self.f_hat,
                                   n_clusters=len(self.cluster_ids))
        self.b, self.b_cov, sums = random_effects_step(stats, sigma2=sigma2, D=D)
        return sums

    def random_effects(self):
        return self.cluster_ids, self.b, self.b_cov


@dataclass(frozen=True)
class IterationRecord:
    """One EM iteration, as logged and stored in the fit history."""

    iteration: int
    gll: float
    relative_change: float
    sigma2: float
    D: np.ndarray
    m_step_seconds: float
    e_step_seconds: float
    val_mse: float | None = None

    def __str__(self) -> str:
        val = "" if self.val_mse is None else f"  val_mse={self.val_mse:.6g}"
        diag = ", ".join(f"{v:.4g}" for v in np.diag(self.D))
        return (f"iteration {self.iteration:3d}  GLL={self.gll:.6g}  "
                f"rel_change={self.relative_change:.2e}  sigma2={self.sigma2:.4g}  "
                f"diag(D)=[{diag}]  M-step={self.m_step_seconds:.2f}s  "
                f"E-step={self.e_step_seconds:.2f}s{val}")


@dataclass
class EMResult:
    """Everything the loop learned."""

    fe_model: BaseEstimator
    sigma2: float
    D: np.ndarray
    cluster_ids: pd.Index
    b: np.ndarray
    b_cov: np.ndarray
    n_rows: int
    converged: bool
    history: list[IterationRecord] = field(default_factory=list)


def _relative_change(previous: float, current: float) -> float:
    if not (np.isfinite(previous) and np.isfinite(current)):
        return np.inf
    return abs(current - previous) / max(abs(previous), np.finfo(float).tiny)


def run_em(data: EMData, *, learner: BaseEstimator, use_oob: bool, q: int,
           max_iterations: int, tol: float,
           validation_mse: Callable[[BaseEstimator, pd.Index, np.ndarray], float] | None = None,
           on_iteration: Callable[[IterationRecord], None] | None = None) -> EMResult:
    """Run MERF's EM from b = 0, sigma2 = 1, D = I_q (the initial values of merf and the paper).

    Parameters
    ----------
    data : EMData
    learner : estimator
        Unfitted fixed-effects learner (cloned every iteration).
    use_oob : bool
        Use out-of-bag predictions of f at the training rows.
    q : int
        Number of random-effect columns.
    max_iterations : int
    tol : float
        Stop when |GLL_r - GLL_{r-1}| / |GLL_{r-1}| < tol; 0 runs every iteration.
    validation_mse : callable, optional
        ``validation_mse(fe_model, cluster_ids, b)`` gives the validation MSE of an iterate.
    on_iteration : callable, optional
        Called with every :class:`IterationRecord` (progress bars, events).

    Returns
    -------
    EMResult
    """
    sigma2, D = 1.0, np.eye(q)
    previous_gll = np.nan
    history: list[IterationRecord] = []
    converged = False
    fe_model = None
    for iteration in range(1, max_iterations + 1):
        started = time.perf_counter()
        fe_model = data.fit_fixed_effects(learner, use_oob=use_oob, iteration=iteration)
        m_step_done = time.perf_counter()
        sums = data.random_effects_step(sigma2=sigma2, D=D)
        sigma2, D, gll = update_variance_components(sums)
        e_step_done = time.perf_counter()
        val_mse = None
        if validation_mse is not None:
            cluster_ids, b, _ = data.random_effects()
            val_mse = validation_mse(fe_model, cluster_ids, b)
        record = IterationRecord(
            iteration=iteration, gll=gll, relative_change=_relative_change(previous_gll, gll),
            sigma2=sigma2, D=D, m_step_seconds=m_step_done - started,
            e_step_seconds=e_step_done - m_step_done, val_mse=val_mse)
        history.append(record)
        logger.info("%s", record)
        if on_iteration is not None:
            on_iteration(record)
        if tol > 0 and record.relative_change < tol:
            converged = True
            break
        previous_gll = gll
    cluster_ids, b, b_cov = data.random_effects()
    return EMResult(fe_model=fe_model, sigma2=sigma2, D=D, cluster_ids=cluster_ids, b=b,
                    b_cov=b_cov, n_rows=int(sums.n_rows), converged=converged, history=history)
