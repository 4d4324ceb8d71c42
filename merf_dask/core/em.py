"""The MERF EM loop, written once for every place the data can live.

The loop talks to its data through the :class:`EMData` protocol, so the same iteration runs on
in-memory arrays (:class:`InMemoryEMData`, below) and on partitions streamed by Dask workers
(:class:`merf_dask.dask.em.DaskEMData`):

1. ``fit_fixed_effects(plan)`` -- the M-step for f: fit the members of a
   :class:`~merf_dask.core.ensemble.MemberPlan` to the working response y - Z b;
2. ``random_effects_step`` -- honest (out-of-bag or cross-fitted) predictions of f at the
   training rows, then the E-step for b from per-cluster sufficient statistics, returning the
   partial sums (:class:`merf_dask.core.statistics.EMSums`);
3. ``fixed_effects_model`` and ``random_effects`` -- the current f and the table of b_i and
   Var(b_i | y_i); ``set_random_effects`` restores b from a checkpoint.

The driver combines the sums into sigma2, D and the GLL
(:func:`~merf_dask.core.statistics.update_variance_components`), logs one line per iteration, stops on the relative change of the GLL, and hands an
:class:`EMState` to a checkpoint writer after every iteration that does not stop the loop.

Classes and functions
---------------------
PartitionArrays
    One block of cluster-whole rows as numpy arrays, with the stable keys of its rows.
m_step_pieces, e_step
    The two per-partition steps (pure numpy; the Dask backend runs them on the workers).
EMData
    The protocol above.
InMemoryEMData
    All rows in this process.
IterationRecord, EMState, EMResult
    What one iteration, a resumable point and the whole fit report.
run_em
    The loop.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import joblib
import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator

from .statistics import (EMSums, cluster_statistics, random_effects_offset, random_effects_step,
                    update_variance_components)
from .ensemble import (MemberPlan, Piece, assemble_model, fit_members, honest_predictions,
                       row_keys, training_pieces)
from .hashing import cluster_hashes

__all__ = ["PartitionArrays", "m_step_pieces", "e_step", "EMData", "InMemoryEMData",
           "align_random_effects",
           "IterationRecord", "EMState", "EMResult", "run_em"]

logger = logging.getLogger("merf_dask")


@dataclass(frozen=True)
class PartitionArrays:
    """The rows of a block holding whole clusters.

    Attributes
    ----------
    X : ndarray of shape (n_rows, n_features)
    Z : ndarray of shape (n_rows, q)
    y : ndarray of shape (n_rows,)
    codes : ndarray of shape (n_rows,)
        Index of each row's cluster in ``cluster_ids``.
    cluster_ids : pandas.Index of length n_clusters
        In order of first appearance.
    hashes : ndarray of shape (n_clusters,), uint64
        Stable hash of each cluster id.
    keys : ndarray of shape (n_rows,), uint64
        Stable key of each row (:func:`merf_dask.core.ensemble.row_keys`).
    """

    X: np.ndarray
    Z: np.ndarray
    y: np.ndarray
    codes: np.ndarray
    cluster_ids: pd.Index
    hashes: np.ndarray
    keys: np.ndarray

    @classmethod
    def from_arrays(cls, *, X, Z, y, codes, cluster_ids) -> "PartitionArrays":
        """Rows put in the order of their keys, so every sum over a cluster's rows adds in the
        same order whatever order the rows arrived in."""
        hashes = cluster_hashes(cluster_ids)
        keys = row_keys(hashes, codes, np.column_stack([X, Z, y]))
        order = np.argsort(keys, kind="stable")
        return cls(X=X[order], Z=Z[order], y=y[order], codes=codes[order],
                   cluster_ids=pd.Index(cluster_ids), hashes=hashes, keys=keys[order])

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, *, x_columns: list[str], z_columns: list[str],
                   cluster_column: str, y_column: str) -> "PartitionArrays":
        codes, cluster_ids = pd.factorize(frame[cluster_column], sort=False)
        return cls.from_arrays(
            X=frame[x_columns].to_numpy(dtype=float),
            Z=frame[z_columns].to_numpy(dtype=float).reshape(len(frame), len(z_columns)),
            y=frame[y_column].to_numpy(dtype=float), codes=codes.astype(np.int64),
            cluster_ids=cluster_ids)

    @property
    def nbytes(self) -> int:
        """Bytes of the row arrays."""
        return sum(a.nbytes for a in (self.X, self.Z, self.y, self.codes, self.keys))

    def residues(self, plan: MemberPlan) -> np.ndarray:
        """Residue class of every row's cluster in ``plan`` (:meth:`MemberPlan.residue_of`)."""
        return plan.residue_of(self.hashes)[self.codes]


def m_step_pieces(part: PartitionArrays, b: np.ndarray, plan: MemberPlan) -> dict[int, Piece]:
    """This block's training rows for the plan's members, with the working response y - Z b.

    Parameters
    ----------
    part : PartitionArrays
    b : ndarray of shape (n_clusters, q)
    plan : MemberPlan

    Returns
    -------
    dict
        Residue class -> :class:`~merf_dask.core.ensemble.Piece`.
    """
    working_response = part.y - random_effects_offset(part.Z, b, part.codes)
    return training_pieces(plan, X=part.X, y=working_response, keys=part.keys,
                           residue_of_row=part.residues(plan))


def e_step(part: PartitionArrays, plan: MemberPlan, fitted: list, *, sigma2: float,
           D: np.ndarray, n_jobs=None) -> tuple[np.ndarray, np.ndarray, EMSums]:
    """Honest predictions of f at this block's rows, then the E-step for its clusters.

    Parameters
    ----------
    part : PartitionArrays
    plan : MemberPlan
    fitted : list of (member index, fitted member)
    sigma2 : float
    D : ndarray of shape (q, q)
    n_jobs : int or None
        Threads that predict contiguous blocks of rows (joblib convention); a row's prediction
        does not depend on the other rows, so any number gives the same result.

    Returns
    -------
    b : ndarray of shape (n_clusters, q)
    b_cov : ndarray of shape (n_clusters, q, q)
    sums : EMSums
    """
    residue_of_row = part.residues(plan)
    bounds = np.linspace(0, len(part.y), joblib.effective_n_jobs(n_jobs) + 1).astype(int)
    blocks = [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]
    predicted = joblib.Parallel(n_jobs=n_jobs, prefer="threads")(
        joblib.delayed(honest_predictions)(plan, fitted, X=part.X[rows], keys=part.keys[rows],
                                           residue_of_row=residue_of_row[rows])
        for rows in blocks)
    f_hat = np.concatenate([values for values, _ in predicted])
    stats = cluster_statistics(part.codes, part.Z, part.y - f_hat,
                               n_clusters=len(part.cluster_ids))
    b, b_cov, sums = random_effects_step(stats, sigma2=sigma2, D=D)
    n_in_sample = sum(count for _, count in predicted) if plan.n_honest else 0
    return b, b_cov, dataclasses.replace(sums, n_in_sample=float(n_in_sample))


class EMData(Protocol):
    """Where the rows live, as the EM loop sees it."""

    n_rows: int
    n_clusters: int
    cluster_hashes: np.ndarray  # of every training cluster, shape (n_clusters,)

    def fit_fixed_effects(self, plan: MemberPlan) -> None: ...

    def random_effects_step(self, *, sigma2: float, D: np.ndarray) -> EMSums: ...

    def fixed_effects_model(self) -> BaseEstimator: ...

    def random_effects(self) -> tuple[pd.Index, np.ndarray, np.ndarray]: ...

    def set_random_effects(self, cluster_ids: pd.Index, b: np.ndarray) -> None: ...


def align_random_effects(ids: pd.Index, table_ids: pd.Index, table: np.ndarray) -> np.ndarray:
    """Rows of ``table`` (indexed by ``table_ids``) in the order of ``ids``; all must be there."""
    position = table_ids.get_indexer(ids)
    if (position < 0).any():
        raise ValueError(f"the checkpoint has no random effects for cluster "
                         f"{ids[position < 0][0]!r}: it belongs to other data")
    return table[position]


class InMemoryEMData:
    """All training rows in this process; members are fitted on local threads.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    Z : ndarray of shape (n_samples, q)
    codes : ndarray of shape (n_samples,), int
        Cluster of each row, in ``[0, len(cluster_ids))``.
    y : ndarray of shape (n_samples,)
    cluster_ids : pandas.Index of length n_clusters
    n_jobs : int or None
        Threads that fit members and predict rows (joblib convention; -1 is every core).
    """

    def __init__(self, *, X, Z, codes, y, cluster_ids: pd.Index, n_jobs=None):
        self.part = PartitionArrays.from_arrays(X=X, Z=Z, y=y, codes=codes,
                                                cluster_ids=cluster_ids)
        self.n_rows, self.n_clusters = len(y), len(cluster_ids)
        self.cluster_hashes = self.part.hashes
        self.n_jobs = n_jobs
        self.b = np.zeros((len(cluster_ids), Z.shape[1]))
        self.b_cov = np.zeros((len(cluster_ids), Z.shape[1], Z.shape[1]))
        self.plan = self.fitted = None

    def fit_fixed_effects(self, plan):
        pieces = m_step_pieces(self.part, self.b, plan)
        n_threads = joblib.effective_n_jobs(self.n_jobs)
        chunks = [(pieces[r], members) for r, members in plan.chunks(n_threads) if r in pieces]
        fitted = joblib.Parallel(n_jobs=self.n_jobs, prefer="threads")(
            joblib.delayed(fit_members)(plan, members, piece) for piece, members in chunks)
        self.plan, self.fitted = plan, [member for chunk in fitted for member in chunk]

    def random_effects_step(self, *, sigma2, D):
        self.b, self.b_cov, sums = e_step(self.part, self.plan, self.fitted, sigma2=sigma2, D=D,
                                          n_jobs=self.n_jobs)
        return sums

    def fixed_effects_model(self):
        return assemble_model(self.plan, self.fitted, self.part.X.shape[1])

    def random_effects(self):
        return self.part.cluster_ids, self.b, self.b_cov

    def set_random_effects(self, cluster_ids, b):
        self.b = align_random_effects(self.part.cluster_ids, cluster_ids, b)


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

    def to_json(self) -> dict:
        """The record as JSON values (a relative change that is not finite, as in the first
        iteration, becomes null: strict JSON has no infinity)."""
        change = self.relative_change if np.isfinite(self.relative_change) else None
        return {"iteration": self.iteration, "gll": self.gll, "relative_change": change,
                "sigma2": self.sigma2, "D": np.asarray(self.D).tolist(),
                "m_step_seconds": self.m_step_seconds, "e_step_seconds": self.e_step_seconds,
                "val_mse": self.val_mse}

    @classmethod
    def from_json(cls, values: dict) -> "IterationRecord":
        """The record written by :meth:`to_json` (a missing relative change, as in manifests
        of earlier versions, reads as NaN)."""
        change = values.get("relative_change", np.nan)
        return cls(**{**values, "D": np.asarray(values["D"], dtype=float),
                      "relative_change": np.inf if change is None else change})


@dataclass(frozen=True)
class EMState:
    """Everything the loop needs to go on after a finished iteration (what a checkpoint holds).

    Attributes
    ----------
    iteration : int
        The last finished iteration.
    sigma2 : float
    D : ndarray of shape (q, q)
    history : list of IterationRecord
    cluster_ids : pandas.Index of length n_clusters
    b : ndarray of shape (n_clusters, q)
    """

    iteration: int
    sigma2: float
    D: np.ndarray
    history: list
    cluster_ids: pd.Index
    b: np.ndarray


@dataclass
class EMResult:
    """Everything the loop learned.

    ``design_gram`` is Z'Z over all rows (shape (q, q)); ``n_in_sample`` counts the rows that got
    an in-sample prediction of f in the last iteration although the plan is honest.
    """

    fe_model: BaseEstimator
    sigma2: float
    D: np.ndarray
    cluster_ids: pd.Index
    b: np.ndarray
    b_cov: np.ndarray
    n_rows: int
    converged: bool
    history: list[IterationRecord] = field(default_factory=list)
    design_gram: np.ndarray | None = None
    n_in_sample: int = 0


def _relative_change(previous: float, current: float) -> float:
    if not (np.isfinite(previous) and np.isfinite(current)):
        return np.inf
    return abs(current - previous) / max(abs(previous), np.finfo(float).tiny)


def _canonical(value):
    """``value`` rounded to 13 significant digits.

    Partial sums add in an order that depends on the partitioning, so sigma2 and D can differ
    in their last bits between two partitionings of the same data; a forest grown on a working
    response that differs by one ulp can split differently. Rounding far below any statistical
    meaning makes the next iteration start from the same bits.
    """
    rounded = np.array([float(f"{v:.13g}") for v in np.ravel(value)]).reshape(np.shape(value))
    return rounded if np.ndim(value) else float(rounded)


def run_em(data: EMData, *, plan: MemberPlan, q: int, max_iterations: int, tol: float,
           validation_mse: Callable[[BaseEstimator, pd.Index, np.ndarray], float] | None = None,
           on_iteration: Callable[[IterationRecord], None] | None = None,
           start: EMState | None = None,
           on_state: Callable[[EMState], None] | None = None) -> EMResult:
    """Run MERF's EM from b = 0, sigma2 = 1, D = I_q (the paper's initial values), or from a
    checkpointed state.

    Parameters
    ----------
    data : EMData
    plan : MemberPlan
        The members of every M-step (:func:`~merf_dask.core.ensemble.plan_members`).
    q : int
        Number of random-effect columns.
    max_iterations : int
    tol : float
        Stop when |GLL_r - GLL_{r-1}| / |GLL_{r-1}| < tol; 0 runs every iteration.
    validation_mse : callable, optional
        ``validation_mse(fe_model, cluster_ids, b)`` gives the validation MSE of an iterate.
    on_iteration : callable, optional
        Called with every :class:`IterationRecord` (progress bars, events).
    start : EMState, optional
        Resume after this state's iteration.
    on_state : callable, optional
        Called with the :class:`EMState` after every iteration that does not end the loop (a
        resumed run repeats at most the iteration in flight, and reaches the same model).

    Returns
    -------
    EMResult
    """
    sigma2, D, history = 1.0, np.eye(q), []
    if start is not None:
        sigma2, D, history = start.sigma2, start.D, list(start.history)
        data.set_random_effects(start.cluster_ids, start.b)
    first = len(history) + 1
    if first > max_iterations:
        raise ValueError(f"nothing to resume: the checkpoint is at iteration {first - 1} and "
                         f"max_iterations is {max_iterations}")
    previous_gll = history[-1].gll if history else np.nan
    converged = False
    for iteration in range(first, max_iterations + 1):
        started = time.perf_counter()
        data.fit_fixed_effects(plan)
        m_step_done = time.perf_counter()
        sums = data.random_effects_step(sigma2=sigma2, D=D)
        sigma2, D, gll = map(_canonical, update_variance_components(sums))
        # residuals of exactly zero (or a zero or NaN variance): nothing is left to decompose
        if not (sums.residual_ss > 0 and sigma2 > 0):
            raise ValueError(
                f"the residuals y - f(X) - Z b are all zero in EM iteration {iteration}: the "
                "fixed effects reproduce y exactly (a constant y, or a learner that interpolates "
                "its training rows with oob=False); there is no variance to decompose")
        e_step_done = time.perf_counter()
        val_mse = None
        if validation_mse is not None:
            cluster_ids, b, _ = data.random_effects()
            val_mse = validation_mse(data.fixed_effects_model(), cluster_ids, b)
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
        if on_state is not None and iteration < max_iterations:
            cluster_ids, b, _ = data.random_effects()
            on_state(EMState(iteration=iteration, sigma2=sigma2, D=D, history=list(history),
                             cluster_ids=cluster_ids, b=b))
        previous_gll = gll
    cluster_ids, b, b_cov = data.random_effects()
    return EMResult(fe_model=data.fixed_effects_model(), sigma2=sigma2, D=D,
                    cluster_ids=cluster_ids, b=b, b_cov=b_cov, n_rows=data.n_rows,
                    converged=converged, history=history, design_gram=sums.design_gram,
                    n_in_sample=int(sums.n_in_sample))
