"""The MERF EM loop, written once for every place the data can live.

The loop talks to its data through the :class:`EMData` protocol, so the same iteration runs on
in-memory arrays (:class:`InMemoryEMData`, below) and on partitions streamed by Dask workers
(:class:`merf_dask.dask.em.DaskEMData`). One iteration:

1. ``fit_fixed_effects(plan, crossed_b)`` -- the M-step for f: fit the members of a
   :class:`~merf_dask.core.ensemble.MemberPlan` to the working response y - sum_k Z_k b_k;
2. ``local_step`` -- in every block, honest (out-of-bag or cross-fitted) predictions of f at the
   training rows, then the elimination of the local random effects (the partition factor's and
   those nested in it), returning the crossed factors' summed share
   (:mod:`merf_dask.core.random_effects`);
3. on the driver, the crossed factors' unknowns (when there are crossed factors);
4. ``finish_step`` -- in every block, the local b and their conditional covariances, returning
   the partial sums (:class:`~merf_dask.core.random_effects.EMSums`).

A binary or count fit (``data.family``) replaces steps 2 to 4 by ``laplace_step``: in every
block, honest predictions of f and the Laplace E-step, whose working response and weights the
next M-step fits (:mod:`merf_dask.core.laplace`); with crossed factors, Newton's method over all
blocks at once, each step a weighted pass of steps 2 to 4 (:mod:`merf_dask.core.laplace_crossed`).

The driver turns the sums into sigma2, every D_k and the GLL
(:func:`~merf_dask.core.random_effects.update_variance_components`), logs one line per
iteration, stops on the relative change of the GLL, and hands an :class:`EMState` to a
checkpoint writer after every iteration that does not stop the loop.

Classes and functions
---------------------
PartitionArrays
    One block of rows holding whole levels of the partition factor, as numpy arrays in the
    order of their stable keys.
EffectsLayout, layout_of, nested_in_partition_factor
    Which factors are local to the blocks and which are crossed.
spread_clusters, spread_part
    Clusters too big for one task: their rows spread over blocks, as a tied crossed part of
    the partition factor.
m_step_pieces, honest_residuals, e_step_local, e_step_finish, crossed_schur, crossed_products
    The per-block steps (pure numpy; the Dask backend runs them on the workers).
laplace_pieces, laplace_e_step, refuse_crossed_family, begin_crossed_laplace
    The same for binary and count fits (:mod:`merf_dask.core.laplace`).
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

from .crossed_solve import (DENSE_CROSSED_UNKNOWNS, CrossedSolution, exact_products,
                            exact_schur, solve_crossed, solve_iteratively)
from .random_effects import (CrossedShare, EMSums, FactorEffects,
                             LocalSystem, crossed_effects, crossed_offsets, factor_moments,
                             finish_local, partition_sums, random_effects_offset,
                             relative_factor, solve_local,
                             update_variance_components)
from .ensemble import (MemberPlan, Piece, StagePredictions, advance_stages, assemble_model,
                       fit_members, honest_predictions, restaged, row_keys, training_pieces)
from .hashing import cluster_hashes
from .families import Family
from .laplace import initial_working, laplace_local, update_laplace_components
from .laplace_crossed import begin_newton, crossed_laplace_e_step

__all__ = ["PartitionArrays", "EffectsLayout", "layout_of", "nested_in_partition_factor",
           "MAX_CLUSTER_ROWS", "spread_clusters", "spread_part", "spread_factor_levels",
           "laplace_pieces",
           "laplace_e_step", "refuse_crossed_family", "begin_crossed_laplace",
           "m_step_pieces", "LocalStep", "honest_residuals", "e_step_local", "e_step_again",
           "e_step_finish",
           "EMData", "InMemoryEMData", "align_random_effects",
           "IterationRecord", "EMState", "EMResult", "run_em", "canonical"]

logger = logging.getLogger("merf_dask")

#: ``max_cluster_rows`` by default: a cluster with more rows is spread over partitions by row
#: (:func:`spread_part`). A quarter of a default lake bucket (a million rows).
MAX_CLUSTER_ROWS = 250_000


@dataclass(frozen=True)
class PartitionArrays:
    """The rows of a block holding whole levels of the partition factor (the first factor).

    Attributes
    ----------
    X : ndarray of shape (n_rows, n_features)
    y : ndarray of shape (n_rows,)
    Z : tuple of ndarray of shape (n_rows, q_k)
        Random-effects design of every factor.
    codes : tuple of ndarray of shape (n_rows,), int
        Each row's level of every factor, as an index into ``levels[k]``.
    levels : tuple of pandas.Index
        The block's levels of every factor, in order of first appearance.
    hashes : ndarray of shape (n_clusters,), uint64
        Stable hash of each level of the partition factor (the clusters).
    keys : ndarray of shape (n_rows,), uint64
        Stable key of each row (:func:`merf_dask.core.ensemble.row_keys`).
    spread : ndarray of shape (n_clusters,), bool, or None
        Which clusters are spread (:func:`spread_part`); None when the model has none.
    """

    X: np.ndarray
    y: np.ndarray
    Z: tuple
    codes: tuple
    levels: tuple
    hashes: np.ndarray
    keys: np.ndarray
    spread: np.ndarray | None = None

    @classmethod
    def from_arrays(cls, *, X, y, Z, codes, levels) -> "PartitionArrays":
        """Rows put in the order of their keys, so every sum over a level's rows adds in the
        same order whatever order the rows arrived in.

        ``Z``, ``codes`` and ``levels`` are sequences with one entry per factor.
        """
        hashes = cluster_hashes(levels[0])
        # the other factors' levels enter the key too: two rows alike but for those differ
        other_levels = [cluster_hashes(ids)[c].view(np.float64) for ids, c in
                        zip(levels[1:], codes[1:])]
        keys = row_keys(hashes, codes[0], np.column_stack([X, *Z, y, *other_levels]))
        order = np.argsort(keys, kind="stable")
        return cls(X=X[order], y=y[order], Z=tuple(Zk[order] for Zk in Z),
                   codes=tuple(c[order] for c in codes), levels=tuple(map(pd.Index, levels)),
                   hashes=hashes, keys=keys[order])

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, *, x_columns: list[str], z_columns: list,
                   factor_columns: list[str], y_column: str) -> "PartitionArrays":
        """From a frame with a column of level labels per factor (``factor_columns``) and its Z
        columns (``z_columns``, a list of column lists, one per factor)."""
        factorized = [pd.factorize(frame[name], sort=False) for name in factor_columns]
        return cls.from_arrays(
            X=frame[x_columns].to_numpy(dtype=float).reshape(len(frame), len(x_columns)),
            Z=[frame[columns].to_numpy(dtype=float).reshape(len(frame), len(columns))
               for columns in z_columns],
            y=frame[y_column].to_numpy(dtype=float),
            codes=[codes.astype(np.int64) for codes, _ in factorized],
            levels=[levels for _, levels in factorized])

    @property
    def cluster_ids(self) -> pd.Index:
        """The partition factor's levels."""
        return self.levels[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the row arrays."""
        return sum(a.nbytes for a in (self.X, self.y, self.keys, *self.Z, *self.codes))

    def residues(self, plan: MemberPlan) -> np.ndarray:
        """Residue class of every row in ``plan``: its cluster's
        (:meth:`MemberPlan.residue_of`), its own for rows of spread clusters
        (:meth:`MemberPlan.row_residues`)."""
        residues = plan.residue_of(self.hashes)[self.codes[0]]
        if self.spread is not None:
            rows = self.spread[self.codes[0]]
            residues[rows] = plan.row_residues(self.keys[rows])
        return residues


def spread_factor_levels(cluster_ids: pd.Index, spread_levels: pd.Index
                         ) -> tuple[np.ndarray, pd.Index]:
    """Which of a block's clusters are spread, and the block's levels of the spread factor
    (:func:`spread_part`): its spread clusters, or the first spread cluster of the fit when it
    has none (every row points at a level, with a zero Z)."""
    spread = cluster_ids.isin(spread_levels)
    present = cluster_ids[spread]
    return spread, pd.Index(present if len(present) else spread_levels[:1])


def spread_part(part: PartitionArrays, spread_levels: pd.Index) -> PartitionArrays:
    """``part`` with the rows of spread clusters moved to one more, crossed factor.

    A cluster with more rows than a task should hold (``max_cluster_rows``) is spread over
    partitions by row, so it is not a local level of the partition factor. Its rows keep their
    level of the partition factor with a zero Z there (a placeholder level: no data, left out
    of every sum, b = 0), and get the same Z in a last factor whose levels are the spread
    clusters: a crossed factor (its sums add across partitions) whose covariance is tied to the
    partition factor's (:class:`EffectsLayout`). The other rows have a zero Z in the last
    factor. The same in every backend and on any partitioning, whether or not a spread
    cluster's rows happen to lie in one partition.

    Parameters
    ----------
    part : PartitionArrays
        Its keys are those of the rows as they are (the last factor does not enter them).
    spread_levels : pandas.Index
        Every spread cluster of the fit.

    Returns
    -------
    PartitionArrays
    """
    spread, levels = spread_factor_levels(part.levels[0], spread_levels)
    rows = spread[part.codes[0]]
    codes = np.where(rows, levels.get_indexer(part.levels[0])[part.codes[0]], 0)
    local_z = np.where(rows[:, None], 0.0, part.Z[0])
    spread_z = np.where(rows[:, None], part.Z[0], 0.0)
    return dataclasses.replace(part, Z=(local_z, *part.Z[1:], spread_z),
                               codes=(*part.codes, codes.astype(np.int64)),
                               levels=(*part.levels, levels), spread=spread)


@dataclass(frozen=True)
class EffectsLayout:
    """Where every factor's levels live: in the partitions (the partition factor, and factors
    nested in it) or in a table shared by all partitions (crossed factors).

    With spread clusters (:func:`spread_part`) the E-step sees one factor more than the model:
    the last is the spread part of the partition factor, crossed, with the partition factor's
    covariance (:meth:`expand`); its sums join the partition factor's (:meth:`pooled`).

    Attributes
    ----------
    factors : tuple of RandomFactor
        The E-step's factors: the model's, then the spread part when there is one.
    crossed_levels : tuple of (pandas.Index or None)
        The level table of each crossed factor; None for local factors.
    dense : bool
        Whether the crossed unknowns are few enough to be solved densely
        (:data:`~merf_dask.core.crossed_solve.DENSE_CROSSED_UNKNOWNS`).
    spread_levels : pandas.Index or None
        The spread clusters (the last factor's table), None when there are none.
    """

    factors: tuple
    crossed_levels: tuple
    dense: bool = True
    spread_levels: pd.Index | None = None

    @property
    def model_factors(self) -> tuple:
        """The model's factors (without the spread part)."""
        return self.factors if self.spread_levels is None else self.factors[:-1]

    def model_factor(self, k: int) -> int:
        """The model factor whose b the E-step's factor ``k`` holds."""
        return 0 if self.spread_levels is not None and k == len(self.factors) - 1 else k

    def expand(self, D: list) -> list:
        """The model's covariances, one per E-step factor."""
        return [D[self.model_factor(k)] for k in range(len(self.factors))]

    def pooled(self, sums: EMSums) -> EMSums:
        """The E-step's sums per model factor: the spread part's added to the partition
        factor's."""
        if self.spread_levels is None:
            return sums

        def pool(values):
            return [values[0] + values[-1], *values[1:-1]]
        return dataclasses.replace(
            sums, n_levels=pool(sums.n_levels), bbt=pool(sums.bbt),
            conditional_cov=pool(sums.conditional_cov), design_gram=pool(sums.design_gram))

    def with_spread(self, spread_levels: pd.Index) -> "EffectsLayout":
        """This layout with the spread part of the partition factor added (unchanged when
        ``spread_levels`` is empty)."""
        if not len(spread_levels):
            return self
        table = pd.Index(spread_levels).unique()
        table = table[np.argsort(cluster_hashes(table), kind="stable")]
        factors = (*self.factors, self.factors[0])
        crossed = (*self.crossed_levels, table)
        return EffectsLayout(factors=factors, crossed_levels=crossed,
                             dense=_solved_densely(factors, crossed), spread_levels=table)


    @property
    def offsets(self) -> np.ndarray:
        """First crossed unknown of each factor, and their number last."""
        return crossed_offsets(self.factors, self.crossed_levels)

    def positions(self, part: PartitionArrays) -> list:
        """Per crossed factor, the table position of each of ``part``'s levels (None for local
        factors)."""
        return [None if table is None else table.get_indexer(levels)
                for table, levels in zip(self.crossed_levels, part.levels)]

    def effects_at(self, part: PartitionArrays, local_b: list, crossed_b: dict) -> list:
        """Every factor's b at ``part``'s levels, from its local b and the crossed tables."""
        return [local_b[k] if table is None else crossed_b[k][position]
                for k, (table, position) in enumerate(zip(self.crossed_levels,
                                                          self.positions(part)))]


def _solved_densely(factors, crossed_levels) -> bool:
    """Whether the crossed unknowns are at most
    :data:`~merf_dask.core.crossed_solve.DENSE_CROSSED_UNKNOWNS`."""
    return int(crossed_offsets(factors, crossed_levels)[-1]) <= DENSE_CROSSED_UNKNOWNS


def layout_of(factors, parts_levels: list[list[pd.Index]], parents_whole: list[list[bool]]
              ) -> EffectsLayout:
    """Which factors are crossed, from every partition's levels.

    A factor other than the partition factor is local when each of its levels lies inside one
    level of the partition factor (``parents_whole``, from :func:`nested_in_partition_factor`
    in each partition) and in one partition.

    Parameters
    ----------
    factors : sequence of RandomFactor
    parts_levels : list (per partition) of list (per factor) of pandas.Index
    parents_whole : list (per partition) of list (per factor) of bool

    Returns
    -------
    EffectsLayout
    """
    crossed = [None]
    for k in range(1, len(factors)):
        every = parts_levels[0][k].append([levels[k] for levels in parts_levels[1:]])
        nested = all(whole[k] for whole in parents_whole) and every.is_unique
        if nested:
            crossed.append(None)
            continue
        # ordered by the levels' hashes, so that the crossed unknowns (and every sum over them)
        # come in the same order whatever the partitioning
        table = every.unique()
        crossed.append(table[np.argsort(cluster_hashes(table), kind="stable")])
    return EffectsLayout(factors=tuple(factors), crossed_levels=tuple(crossed),
                         dense=_solved_densely(factors, crossed))


def spread_clusters(rows: pd.Series, *, max_cluster_rows: int) -> pd.Index:
    """The clusters to spread: those with more than ``max_cluster_rows`` rows.

    Parameters
    ----------
    rows : Series
        Rows of each cluster (indexed by cluster id; one entry per cluster).
    max_cluster_rows : int

    Returns
    -------
    pandas.Index
    """
    spread = rows.index[rows.to_numpy() > max_cluster_rows]
    if len(spread):
        logger.info("%d clusters have more than max_cluster_rows=%d rows (the largest %d): "
                    "their rows are spread over partitions and members", len(spread),
                    max_cluster_rows, int(rows.max()))
    return spread


def nested_in_partition_factor(part: PartitionArrays) -> list[bool]:
    """Per factor, whether each of its levels in ``part`` lies inside one level of the
    partition factor."""
    whole = [True]
    for codes in part.codes[1:]:
        parent = np.zeros(codes.max() + 1 if len(codes) else 0, dtype=np.int64)
        parent[codes] = part.codes[0]
        whole.append(bool(np.array_equal(parent[codes], part.codes[0])))
    return whole


def m_step_pieces(part: PartitionArrays, b: list, plan: MemberPlan, working=None,
                  staged: StagePredictions | None = None) -> dict[int, Piece]:
    """This block's training rows for the plan's members, with the working response y - Z b
    (or the binary or count fit's working response and weights), less what warm-started
    members' stages so far predict in-sample (``staged``), which their next stage is fitted to.

    Parameters
    ----------
    part : PartitionArrays
    b : list of ndarray of shape (n_levels_k, q_k)
        Every factor's b at the block's levels (:meth:`EffectsLayout.effects_at`).
    plan : MemberPlan
    working : (ndarray of shape (n_rows,), ndarray of shape (n_rows,)), optional
        A binary or count fit's working response and weights
        (:class:`~merf_dask.core.laplace.LaplaceStep`); ``b`` is then not used.
    staged : StagePredictions, optional
        The block's sums of warm-started members' stages (None before the first M-step and for
        other learners).

    Returns
    -------
    dict
        Residue class -> :class:`~merf_dask.core.ensemble.Piece`.
    """
    if working is not None:
        target, weights = working
    else:
        target, weights = part.y - random_effects_offset(part.Z, b, part.codes), None
    if staged is not None:
        target = target - staged.own
    return training_pieces(plan, X=part.X, y=target, keys=part.keys,
                           residue_of_row=part.residues(plan), weights=weights)


@dataclass
class LocalStep:
    """A block's E-step after its first pass (what its second pass needs)."""

    system: LocalSystem
    residuals: np.ndarray
    logdet: float
    n_in_sample: int


def honest_residuals(part: PartitionArrays, plan: MemberPlan,
                     fitted: list | StagePredictions, *, n_jobs=None) -> tuple[np.ndarray, int]:
    """y - f(X) with honest predictions of f at this block's rows, and the rows no honest
    member served.

    Parameters
    ----------
    part : PartitionArrays
    plan : MemberPlan
    fitted : list of (member index, fitted member), or StagePredictions
        The members, or the block's sums of warm-started members' stages (which hold the
        honest predictions already).
    n_jobs : int or None
        Threads that predict contiguous blocks of rows (joblib convention); a row's prediction
        does not depend on the other rows, so any number gives the same result.
    """
    if isinstance(fitted, StagePredictions):
        return part.y - fitted.honest, fitted.n_in_sample
    residue_of_row = part.residues(plan)
    bounds = np.linspace(0, len(part.y), joblib.effective_n_jobs(n_jobs) + 1).astype(int)
    blocks = [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]
    predicted = joblib.Parallel(n_jobs=n_jobs, prefer="threads")(
        joblib.delayed(honest_predictions)(plan, fitted, X=part.X[rows], keys=part.keys[rows],
                                           residue_of_row=residue_of_row[rows])
        for rows in blocks)
    f_hat = np.concatenate([values for values, _ in predicted])
    n_in_sample = sum(count for _, count in predicted) if plan.n_honest else 0
    return part.y - f_hat, int(n_in_sample)


def e_step_local(part: PartitionArrays, plan: MemberPlan, fitted: list | StagePredictions, *,
                 layout: EffectsLayout, relative: list, n_jobs=None
                 ) -> tuple[LocalStep, CrossedShare | None]:
    """The E-step's first pass over a block: honest residuals and the local elimination
    (:func:`merf_dask.core.random_effects.solve_local`).

    Parameters
    ----------
    part : PartitionArrays
    plan : MemberPlan
    fitted : list of (member index, fitted member), or StagePredictions
        What :func:`honest_residuals` predicts f with.
    layout : EffectsLayout
    relative : list of ndarray of shape (q_k, q_k)
        :func:`~merf_dask.core.random_effects.relative_factor` of every factor.
    n_jobs : int or None

    Returns
    -------
    step : LocalStep
    share : CrossedShare or None
    """
    residuals, n_in_sample = honest_residuals(part, plan, fitted, n_jobs=n_jobs)
    return e_step_again(LocalStep(None, residuals, 0.0, n_in_sample), part, layout=layout,
                        relative=relative)


def e_step_again(step: LocalStep, part: PartitionArrays, *, layout: EffectsLayout, relative: list
                 ) -> tuple[LocalStep, CrossedShare | None]:
    """The first pass of an E-step at other variance components, from the residuals of an
    earlier one (the same f: what EM's acceleration evaluates).

    Parameters
    ----------
    step : LocalStep
        Of :func:`e_step_local` (its residuals are used).
    part : PartitionArrays
    layout : EffectsLayout
    relative : list of ndarray of shape (q_k, q_k)

    Returns
    -------
    step : LocalStep
    share : CrossedShare or None
    """
    system, share, logdet = solve_local(
        codes=list(part.codes), Z=list(part.Z), n_levels=[len(ids) for ids in part.levels],
        r=step.residuals, relative=relative, crossed_position=layout.positions(part),
        offsets=layout.offsets, dense=layout.dense)
    return LocalStep(system, step.residuals, logdet, step.n_in_sample), share


def e_step_finish(step: LocalStep, part: PartitionArrays, *, layout: EffectsLayout, relative,
                  sigma2: float, solution: CrossedSolution | None = None
                  ) -> tuple[list, list, EMSums]:
    """The E-step's second pass over a block, once the crossed unknowns are known.

    Parameters
    ----------
    step : LocalStep
    part : PartitionArrays
    layout : EffectsLayout
    relative : list of ndarray
    sigma2 : float
        The residual variance the E-step uses.
    solution : CrossedSolution, optional
        None without crossed factors.

    Returns
    -------
    b : list of (ndarray of shape (n_levels_k, q_k) or None)
        The local factors' b at the block's levels; None for crossed factors.
    b_cov : list of (ndarray of shape (n_levels_k, q_k, q_k) or None)
    sums : EMSums
    """
    u, m_inverse, stochastic, quadratic = finish_local(
        step.system, solution=solution, crossed_position=layout.positions(part),
        offsets=layout.offsets)
    b, b_cov, cov_sums, corrections = [], [], [], 0.0
    for k, (uk, mk, rest, Lk) in enumerate(zip(u, m_inverse, stochastic, relative)):
        if mk is None:  # crossed: b at this block's levels, for its residuals only
            b.append(uk @ Lk.T), b_cov.append(None), cov_sums.append(None)
            continue
        if k == 0 and part.spread is not None:
            # the spread clusters' placeholder levels hold no data: b = 0, and no sum sees them
            kept = ~part.spread
            bk, covk = np.zeros(uk.shape), np.zeros(mk.shape)
            bk[kept], covk[kept], cov_sum, correction = factor_moments(uk[kept], mk[kept], Lk,
                                                                       sigma2, rest)
        else:
            bk, covk, cov_sum, correction = factor_moments(uk, mk, Lk, sigma2, rest)
        b.append(bk), b_cov.append(covk), cov_sums.append(cov_sum)
        corrections += correction
    sums = partition_sums(codes=list(part.codes), Z=list(part.Z), r=step.residuals, b=b,
                          cov_sums=cov_sums, corrections=corrections, quadratic=quadratic,
                          logdet=step.logdet)
    if part.spread is not None:
        sums.n_levels[0] = float(np.count_nonzero(~part.spread))
    sums.n_in_sample = float(step.n_in_sample)
    local_b = [None if mk is None else bk for bk, mk in zip(b, m_inverse)]
    return local_b, b_cov, sums


def refuse_crossed_family(family: Family, layout: EffectsLayout) -> None:
    """Refuse a binary or count fit whose crossed unknowns are too many to solve densely: the
    Laplace correction needs z_i' H^-1 z_i across the crossed system, which the iterative solve
    does not form (:mod:`merf_dask.core.laplace_crossed`)."""
    if not layout.dense:
        P = int(layout.offsets[-1])
        raise ValueError(f"{family.name} fits take crossed factors (and clusters spread over "
                         f"partitions) with at most {DENSE_CROSSED_UNKNOWNS:,} crossed random "
                         f"effects in all for now; this design has {P:,}")


def begin_crossed_laplace(part: PartitionArrays, plan: MemberPlan,
                          fitted: list | StagePredictions | None, *, previous,
                          layout: EffectsLayout, n_jobs=None):
    """A block's state at the start of a Laplace E-step with crossed factors
    (:func:`merf_dask.core.laplace_crossed.begin_newton`): honest f from ``fitted``, or
    ``previous``'s when None (an accelerated iteration's further E-steps)."""
    if fitted is None:
        f, n_in_sample = previous.f, previous.n_in_sample
    else:
        residuals, n_in_sample = honest_residuals(part, plan, fitted, n_jobs=n_jobs)
        f = part.y - residuals
    return begin_newton(part, f, n_in_sample, previous, layout=layout)


def laplace_pieces(part: PartitionArrays, plan: MemberPlan, previous, *, family: Family,
                   mean: float, staged: StagePredictions | None = None) -> dict[int, Piece]:
    """A binary or count fit's M-step rows: the working response and weights of the block's
    last Laplace E-step (``previous``), or at b = 0 and the fit's ``mean`` of y before the
    first (less warm-started members' stages, as in :func:`m_step_pieces`)."""
    working = (initial_working(part.y, family, mean) if previous is None
               else (previous.target, previous.weights))
    return m_step_pieces(part, None, plan, working=working, staged=staged)


def laplace_e_step(part: PartitionArrays, plan: MemberPlan,
                   fitted: list | StagePredictions | None, *, relative,
                   family: Family, previous=None, n_jobs=None):
    """A binary or count fit's E-step over one block whose factors are local
    (:func:`merf_dask.core.laplace.laplace_local`), starting from its last mode.

    Parameters
    ----------
    part : PartitionArrays
    plan : MemberPlan
    fitted : list of (member index, fitted member), StagePredictions or None
        What predicts f honestly (:func:`honest_residuals`); None reuses ``previous``'s
        predictions (the further E-steps of an accelerated iteration).
    relative : list of ndarray
        L_k with L_k L_k' = D_k.
    family : Family
    previous : LaplaceStep, optional
    n_jobs : int or None

    Returns
    -------
    step : LaplaceStep
    b, b_cov : list of ndarray
    sums : EMSums
    """
    if fitted is None:
        f, n_in_sample = previous.f, previous.n_in_sample
    else:
        residuals, n_in_sample = honest_residuals(part, plan, fitted, n_jobs=n_jobs)
        f = part.y - residuals
    step, b, b_cov, sums = laplace_local(
        y=part.y, f=f, Z=list(part.Z), codes=list(part.codes),
        n_levels=[len(ids) for ids in part.levels], relative=relative, family=family,
        u_start=None if previous is None else previous.u)
    step.n_in_sample, sums.n_in_sample = n_in_sample, float(n_in_sample)
    return step, b, b_cov, sums


def crossed_products(step: LocalStep, X: np.ndarray, *, term_bound: float) -> list:
    """A block's share of S X (:func:`~merf_dask.core.crossed_solve.exact_products`)."""
    return exact_products(step.system.crossed, X, term_bound=term_bound)


def crossed_schur(step: LocalStep, P: int, *, term_bound: float) -> list:
    """A block's share of S (:func:`~merf_dask.core.crossed_solve.exact_schur`)."""
    return exact_schur(step.system.crossed, P, term_bound=term_bound)


def add_limbs(*shares):
    """The sum of blocks' shares of S or S X (integers: exact in any order)."""
    return [sum(limbs) for limbs in zip(*shares)]


class EMData(Protocol):
    """Where the rows live, as the EM loop sees it.

    One E-step is ``local_step`` (every block's first pass; the crossed factors' summed share
    comes back), the driver's solve for the crossed unknowns (which asks for the sum over
    blocks of :func:`crossed_schur` with ``crossed_schur``, or of :func:`crossed_products` with
    ``crossed_product`` when it iterates), and ``finish_step`` (every block's second pass). ``local_step(again=True)`` evaluates an E-step at other variance
    components from the honest residuals of the iteration's first one (which ``keep=True``
    asks to keep), without predicting f again.
    """

    n_rows: int
    n_clusters: int
    cluster_hashes: np.ndarray  # of every level of the partition factor, shape (n_clusters,)
    layout: EffectsLayout
    family: Family | None  # None: Gaussian

    def fit_fixed_effects(self, plan: MemberPlan, crossed_b: dict) -> None: ...

    def local_step(self, *, relative: list, sigma2: float, again: bool = False,
                   keep: bool = False) -> CrossedShare | None: ...

    def crossed_schur(self, *, term_bound: float) -> list: ...

    def laplace_step(self, *, relative: list, again: bool = False) -> EMSums: ...

    # a binary or count fit with crossed factors (:mod:`merf_dask.core.laplace_crossed`): every
    # block's state for the E-step, passes over them that return their partial sums combined,
    # the last pass, and the crossed unknowns' mode, kept for the next E-step
    crossed_mode: np.ndarray | None

    def laplace_begin(self, *, again: bool = False) -> None: ...

    def laplace_pass(self, task: Callable, combine: Callable, **shared): ...

    def laplace_finish(self, task: Callable, **shared) -> EMSums: ...

    def crossed_product(self, X: np.ndarray, *, term_bound: float) -> list: ...

    def finish_step(self, *, relative: list, sigma2: float,
                    solution: CrossedSolution | None) -> EMSums: ...

    def fixed_effects_model(self) -> BaseEstimator: ...

    def fitted_members(self) -> list: ...

    def resume_members(self, plan: MemberPlan, members: list) -> None: ...

    def local_effects(self) -> list: ...

    def set_local_effects(self, effects: list) -> None: ...


def align_random_effects(ids: pd.Index, table_ids: pd.Index, table: np.ndarray) -> np.ndarray:
    """Rows of ``table`` (indexed by ``table_ids``) in the order of ``ids``; all must be there."""
    position = table_ids.get_indexer(ids)
    if (position < 0).any():
        raise ValueError(f"the checkpoint has no random effects for level "
                         f"{ids[position < 0][0]!r}: it belongs to other data")
    return table[position]


class InMemoryEMData:
    """All training rows in this process; members are fitted on local threads.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    y : ndarray of shape (n_samples,)
    Z : list of ndarray of shape (n_samples, q_k)
    codes : list of ndarray of shape (n_samples,), int
        Each row's level of every factor, in ``[0, len(levels[k]))``.
    levels : list of pandas.Index
    factors : list of RandomFactor
    max_cluster_rows : int
        Clusters with more rows are spread (:func:`spread_part`), as on Dask.
    family : Family or None
        A binary or count fit's family (its E-step is Laplace's,
        :mod:`merf_dask.core.laplace`); None is Gaussian.
    n_jobs : int or None
        Threads that fit members and predict rows (joblib convention; -1 is every core).
    """

    def __init__(self, *, X, y, Z, codes, levels, factors, max_cluster_rows=MAX_CLUSTER_ROWS,
                 family=None, n_jobs=None):
        part = PartitionArrays.from_arrays(X=X, y=y, Z=Z, codes=codes, levels=levels)
        layout = layout_of(factors, [list(part.levels)], [nested_in_partition_factor(part)])
        spread = spread_clusters(
            pd.Series(np.bincount(part.codes[0], minlength=len(part.levels[0])),
                      index=part.levels[0]), max_cluster_rows=max_cluster_rows)
        self.layout = layout.with_spread(spread)
        self.part = part if self.layout is layout else spread_part(part, self.layout.spread_levels)
        self.n_rows, self.n_clusters = len(y), len(levels[0])
        self.cluster_hashes = self.part.hashes
        self.n_jobs = n_jobs
        self.b = [None if table is not None else np.zeros((len(ids), f.q))
                  for f, ids, table in zip(self.layout.factors, self.part.levels,
                                           self.layout.crossed_levels)]
        self.b_cov = list(self.b)
        self.plan = self.fitted = self.step = None
        self.staged = None  # warm-started members' stages summed at the rows
        self.family = family
        if family is not None:
            family.check_response(self.part.y)
            refuse_crossed_family(family, self.layout)
            self.mean = canonical(float(np.mean(self.part.y)))  # as on Dask, any partitioning
            self.laplace = self.newton = self.crossed_mode = None

    def fit_fixed_effects(self, plan, crossed_b):
        if self.family is not None:
            pieces = laplace_pieces(self.part, plan, self.laplace, family=self.family,
                                    mean=self.mean, staged=self.staged)
        else:
            pieces = m_step_pieces(self.part,
                                   self.layout.effects_at(self.part, self.b, crossed_b), plan,
                                   staged=self.staged)
        n_threads = joblib.effective_n_jobs(self.n_jobs)
        chunks = [(pieces[r], members) for r, members in plan.chunks(n_threads) if r in pieces]
        previous = [self.fitted] if plan.rounds_per_step and self.fitted else []
        fitted = joblib.Parallel(n_jobs=self.n_jobs, prefer="threads")(
            joblib.delayed(fit_members)(plan, members, piece, previous=previous)
            for piece, members in chunks)
        self.plan, self.fitted = plan, [member for chunk in fitted for member in chunk]
        if plan.rounds_per_step:
            self.staged = advance_stages(plan, self.fitted, X=self.part.X, keys=self.part.keys,
                                         residue_of_row=self.part.residues(plan),
                                         previous=self.staged)

    @property
    def honest_source(self):
        """What the E-step's honest predictions come from: the members, or their stages'
        sums when they are warm-started."""
        return self.staged if self.plan.rounds_per_step else self.fitted

    def local_step(self, *, relative, sigma2, again=False, keep=False):
        if again:
            self.step, share = e_step_again(self.step, self.part, layout=self.layout,
                                            relative=relative)
        else:
            self.step, share = e_step_local(self.part, self.plan, self.honest_source,
                                            layout=self.layout, relative=relative,
                                            n_jobs=self.n_jobs)
        return share

    def laplace_step(self, *, relative, again=False):
        self.laplace, self.b, self.b_cov, sums = laplace_e_step(
            self.part, self.plan, None if again else self.honest_source, relative=relative,
            family=self.family, previous=self.laplace, n_jobs=self.n_jobs)
        return sums

    def laplace_begin(self, *, again=False):
        self.newton = begin_crossed_laplace(self.part, self.plan,
                                            None if again else self.honest_source,
                                            previous=self.laplace, layout=self.layout,
                                            n_jobs=self.n_jobs)

    def laplace_pass(self, task, combine, **shared):
        self.newton, partial = task(self.part, self.newton, **shared)
        return partial

    def laplace_finish(self, task, **shared):
        self.b, self.b_cov, sums, self.laplace = task(self.part, self.newton, **shared)
        self.newton = None
        return sums

    def crossed_schur(self, *, term_bound):
        return crossed_schur(self.step, int(self.layout.offsets[-1]), term_bound=term_bound)

    def crossed_product(self, X, *, term_bound):
        return crossed_products(self.step, X, term_bound=term_bound)

    def finish_step(self, *, relative, sigma2, solution):
        self.b, self.b_cov, sums = e_step_finish(self.step, self.part, layout=self.layout,
                                                 relative=relative, sigma2=sigma2,
                                                 solution=solution)
        return sums

    def fixed_effects_model(self):
        return assemble_model(self.plan, self.fitted, self.part.X.shape[1])

    def fitted_members(self):
        return list(self.fitted)

    def resume_members(self, plan, members):
        self.plan, self.fitted = plan, list(members)
        self.staged = restaged(plan, self.fitted, X=self.part.X, keys=self.part.keys,
                               residue_of_row=self.part.residues(plan))

    def local_effects(self):
        return [None if b is None else (ids, b, cov)
                for ids, b, cov in zip(self.part.levels, self.b, self.b_cov)]

    def set_local_effects(self, effects):
        self.b = [None if b is None else align_random_effects(ids, saved[0], saved[1])
                  for ids, b, saved in zip(self.part.levels, self.b, effects)]


@dataclass(frozen=True)
class IterationRecord:
    """One EM iteration, as logged and stored in the fit history.

    ``D`` lists every factor's covariance; ``sigma2`` is None for binary and count fits (no
    residual variance); ``log_likelihood`` is the marginal log-likelihood of the residuals
    y - f(X) (Laplace's, for binary and count fits) at the variance components the iteration
    started from.
    """

    iteration: int
    gll: float
    relative_change: float
    sigma2: float | None
    D: list
    m_step_seconds: float
    e_step_seconds: float
    val_mse: float | None = None
    log_likelihood: float | None = None

    def __str__(self) -> str:
        val = "" if self.val_mse is None else f"  val_mse={self.val_mse:.6g}"
        diag = " | ".join(", ".join(f"{v:.4g}" for v in np.diag(Dk)) for Dk in self.D)
        sigma2 = "" if self.sigma2 is None else f"sigma2={self.sigma2:.4g}  "
        return (f"iteration {self.iteration:3d}  GLL={self.gll:.6g}  "
                f"rel_change={self.relative_change:.2e}  {sigma2}"
                f"diag(D)=[{diag}]  M-step={self.m_step_seconds:.2f}s  "
                f"E-step={self.e_step_seconds:.2f}s{val}")

    def to_json(self) -> dict:
        """The record as JSON values (a relative change that is not finite, as in the first
        iteration, becomes null: strict JSON has no infinity)."""
        change = self.relative_change if np.isfinite(self.relative_change) else None
        return {"iteration": self.iteration, "gll": self.gll, "relative_change": change,
                "sigma2": self.sigma2, "D": [np.asarray(Dk).tolist() for Dk in self.D],
                "m_step_seconds": self.m_step_seconds, "e_step_seconds": self.e_step_seconds,
                "val_mse": self.val_mse, "log_likelihood": self.log_likelihood}

    @classmethod
    def from_json(cls, values: dict) -> "IterationRecord":
        """The record written by :meth:`to_json`."""
        change = values.get("relative_change")
        return cls(**{**values, "D": [np.asarray(Dk, dtype=float) for Dk in values["D"]],
                      "relative_change": np.inf if change is None else change})


@dataclass(frozen=True)
class EMState:
    """Everything the loop needs to go on after a finished iteration (what a checkpoint holds).

    Attributes
    ----------
    iteration : int
        The last finished iteration.
    sigma2 : float
    D : list of ndarray of shape (q_k, q_k)
    history : list of IterationRecord
    effects : list of (pandas.Index, ndarray of shape (n_levels_k, q_k))
        Every factor's levels and b.
    members : list of (int, BoostingStages) or None
        Warm-started members (:attr:`~merf_dask.core.ensemble.MemberPlan.rounds_per_step`),
        which the next M-step goes on from; None for other learners, refitted in every M-step.
    """

    iteration: int
    sigma2: float
    D: list
    history: list
    effects: list
    members: list | None = None


@dataclass
class EMResult:
    """Everything the loop learned.

    ``design_gram`` is Z_k'Z_k over all rows for every factor; ``n_in_sample`` counts the rows
    that got an in-sample prediction of f in the last iteration although the plan is honest.
    """

    fe_model: BaseEstimator
    sigma2: float
    effects: list  # of FactorEffects
    n_rows: int
    converged: bool
    history: list[IterationRecord] = field(default_factory=list)
    design_gram: list | None = None
    n_in_sample: int = 0


def _relative_change(previous: float, current: float) -> float:
    if not (np.isfinite(previous) and np.isfinite(current)):
        return np.inf
    return abs(current - previous) / max(abs(previous), np.finfo(float).tiny)


#: Halvings of SQUAREM's step before it falls back to two plain EM steps.
_EXTRAPOLATION_BACKOFFS = 8
#: EM crawls (and "auto" acceleration starts) when this many successive steps of the variance
#: components each shrank by less than this ratio.
_CRAWL_ITERATIONS, _CRAWL_RATIO = 3, 0.9


def canonical(value, *, digits: int = 13):
    """``value`` rounded to ``digits`` significant digits (13 unless told).

    Partial sums add in an order that depends on the partitioning, so sigma2, D (and a
    formula's means and standard deviations) can differ in their last bits
    between two partitionings of the same data; a forest grown on a working response that
    differs by one ulp can split differently. Rounding far below any statistical meaning makes
    the next iteration start from the same bits.
    """
    rounded = np.array([float(f"{v:.{digits}g}") for v in np.ravel(value)]).reshape(
        np.shape(value))
    return rounded if np.ndim(value) else float(rounded)


def _e_step(data: EMData, *, sigma2: float, D: list, again: bool = False, keep: bool = False
            ) -> tuple[EMSums, dict]:
    """One E-step over ``data``: the blocks' first pass, the crossed unknowns on the driver,
    the blocks' second pass. Returns the sums and the crossed factors' (b, b_cov)."""
    layout = data.layout
    relative = [relative_factor(Dk, sigma2) for Dk in layout.expand(D)]
    if data.family is not None:  # sigma2 is 1: D is on the scale of the linear predictor
        if any(table is not None for table in layout.crossed_levels):
            return crossed_laplace_e_step(data, relative=relative, again=again)
        return data.laplace_step(relative=relative, again=again), {}
    share = data.local_step(relative=relative, sigma2=sigma2, again=again, keep=keep)
    if share is None:
        return data.finish_step(relative=relative, sigma2=sigma2, solution=None), {}
    if layout.dense:
        solution = solve_crossed(share, data.crossed_schur(term_bound=share.term_bound))
    else:
        solution = solve_iteratively(
            share, lambda X: data.crossed_product(X, term_bound=share.term_bound),
            offsets=layout.offsets)
    crossed, crossed_sums = crossed_effects(
        solution, q=[f.q for f in layout.factors], offsets=layout.offsets,
        crossed_levels=list(layout.crossed_levels), relative=relative, sigma2=sigma2)
    sums = data.finish_step(relative=relative, sigma2=sigma2, solution=solution)
    return layout.pooled(sums + crossed_sums), crossed


class _CrawlDetector:
    """Whether EM crawls: the steps of (sigma2, D) shrink geometrically with a ratio near 1."""

    def __init__(self, *, active: bool, enabled: bool):
        self.active, self.enabled = active, enabled
        self.previous, self.steps = None, []

    def update(self, theta: list) -> None:
        flat = np.concatenate([np.ravel(x) for x in theta])
        if self.previous is not None:
            self.steps.append(float(np.linalg.norm(flat - self.previous)))
        self.previous = flat
        recent = self.steps[-_CRAWL_ITERATIONS - 1:]
        if self.enabled and not self.active and len(recent) == _CRAWL_ITERATIONS + 1:
            ratios = [b / a for a, b in zip(recent[:-1], recent[1:]) if a > 0]
            if len(ratios) == _CRAWL_ITERATIONS and all(
                    _CRAWL_RATIO < ratio < 1 for ratio in ratios):
                logger.info("EM crawls (steps shrink by %.3f per iteration): accelerating",
                            ratios[-1])
                self.active = True


def _extrapolated(theta0: list, theta1: list, theta2: list) -> list | None:
    """SQUAREM's extrapolation (Varadhan & Roland 2008, scheme S3) of two EM steps
    theta0 -> theta1 -> theta2 of (sigma2, D_1, ...), backed off until sigma2 > 0 and every D_k
    is positive semi-definite; None when even the smallest step leaves them."""
    flat = [np.concatenate([np.ravel(x) for x in theta]) for theta in (theta0, theta1, theta2)]
    r, v = flat[1] - flat[0], flat[2] - 2 * flat[1] + flat[0]
    if not np.linalg.norm(v) > 0:
        return None
    alpha = min(-1.0, -np.linalg.norm(r) / np.linalg.norm(v))
    for _ in range(_EXTRAPOLATION_BACKOFFS):
        candidate = flat[0] - 2 * alpha * r + alpha ** 2 * v
        theta, position = [], 0
        for x in theta0:
            size = np.size(x)
            theta.append(candidate[position:position + size].reshape(np.shape(x)))
            position += size
        sigma2, *D = theta
        if float(sigma2) > 0 and all(np.linalg.eigvalsh(0.5 * (Dk + Dk.T))[0] >= 0 for Dk in D):
            return [float(sigma2), *[0.5 * (Dk + Dk.T) for Dk in D]]
        alpha = 0.5 * (alpha - 1.0)  # halfway to alpha = -1, which is theta2 itself
    return None


def _updated_components(data: EMData, sums: EMSums, factors, sigma2: float
                        ) -> tuple[float, list, float, float]:
    """The M-step of the variance components: sigma2, every D_k, the GLL and the
    log-likelihood (:func:`~merf_dask.core.random_effects.update_variance_components`; binary
    and count fits keep sigma2 = 1 and watch -2 times Laplace's log-likelihood,
    :func:`~merf_dask.core.laplace.update_laplace_components`), all :func:`canonical`: every
    E-step, an accelerated iteration's further ones too, starts from the same bits on any
    partitioning, and SQUAREM's choice between its candidates is made on the same numbers."""
    if data.family is None:
        sigma2, D, gll, log_likelihood = update_variance_components(sums, factors, sigma2=sigma2)
    else:
        sigma2, (D, gll, log_likelihood) = 1.0, update_laplace_components(sums, factors)
    return (canonical(sigma2), [canonical(Dk) for Dk in D], canonical(gll),
            canonical(log_likelihood))


def _accelerated_step(data: EMData, factors, *, sigma2: float, D: list, sums: EMSums,
                      crossed: dict) -> tuple[EMSums, dict, float]:
    """The E-step sums (and crossed effects) that the M-step turns into the next iterate, after
    a SQUAREM step on the variance components from the same residuals.

    Two EM steps theta0 -> theta1 -> theta2 and their extrapolation theta' cost two more
    E-steps from the iteration's honest residuals (no prediction of f). theta' is kept when its
    log-likelihood is at least theta1's (then the M-step of its E-step, which EM cannot make
    worse, is the next iterate); otherwise theta2, two plain EM steps. Returns the sums, the
    crossed effects and the log-likelihood at the parameters of the E-step they come from.
    """
    sigma2_1, D_1, _, log_likelihood_0 = _updated_components(data, sums, factors, sigma2)
    sums_1, crossed_1 = _e_step(data, sigma2=sigma2_1, D=D_1, again=True)
    sigma2_2, D_2, _, log_likelihood_1 = _updated_components(data, sums_1, factors, sigma2_1)
    theta = _extrapolated([sigma2, *D], [sigma2_1, *D_1], [sigma2_2, *D_2])
    if theta is not None:
        sums_x, crossed_x = _e_step(data, sigma2=theta[0], D=theta[1:], again=True)
        log_likelihood_x = _updated_components(data, sums_x, factors, theta[0])[3]
        if log_likelihood_x >= log_likelihood_1:
            return sums_x, crossed_x, theta[0]
        # the blocks hold the last E-step's b: the one at theta1 again
        sums_1, crossed_1 = _e_step(data, sigma2=sigma2_1, D=D_1, again=True)
    return sums_1, crossed_1, sigma2_1


def _all_effects(data: EMData, crossed: dict, D: list) -> list[FactorEffects]:
    """Every model factor's :class:`FactorEffects`, local ones from the blocks, crossed from
    the driver's tables; the spread clusters after the partition factor's local levels."""
    layout = data.layout
    local = data.local_effects()
    effects = []
    for k, (factor, table) in enumerate(zip(layout.model_factors, layout.crossed_levels)):
        levels, b, b_cov = local[k] if table is None else (table, *crossed[k])
        if k == 0 and layout.spread_levels is not None:
            kept = ~levels.isin(layout.spread_levels)  # not the placeholders
            spread_b, spread_cov = crossed[len(layout.factors) - 1]
            levels = levels[kept].append(layout.spread_levels)
            b, b_cov = np.vstack([b[kept], spread_b]), np.vstack([b_cov[kept], spread_cov])
        effects.append(FactorEffects(factor=factor, levels=levels, b=b, b_cov=b_cov, D=D[k]))
    return effects


def run_em(data: EMData, *, plan: MemberPlan, max_iterations: int, tol: float,
           validation_mse: Callable[[BaseEstimator, list], float] | None = None,
           on_iteration: Callable[[IterationRecord], None] | None = None,
           start: EMState | None = None,
           on_state: Callable[[EMState], None] | None = None,
           accelerate: bool | str = False) -> EMResult:
    """Run MERF's EM from b = 0, sigma2 = 1, D_k = I (the paper's initial values), or from a
    checkpointed state.

    Parameters
    ----------
    data : EMData
    plan : MemberPlan
        The members of every M-step (:func:`~merf_dask.core.ensemble.plan_members`).
    max_iterations : int
    tol : float
        Stop when |GLL_r - GLL_{r-1}| / |GLL_{r-1}| < tol; 0 runs every iteration.
    validation_mse : callable, optional
        ``validation_mse(fe_model, effects)`` gives the validation MSE of an iterate, with
        ``effects`` a list of (levels, b) per factor.
    on_iteration : callable, optional
        Called with every :class:`IterationRecord` (progress bars, events).
    start : EMState, optional
        Resume after this state's iteration (with its members, when they are warm-started).
    on_state : callable, optional
        Called with the :class:`EMState` after every iteration that does not end the loop (a
        resumed run repeats at most the iteration in flight, and reaches the same model).
    accelerate : bool or "auto", default=False
        Take a SQUAREM step on the variance components in every iteration
        (:func:`_accelerated_step`): two more E-steps from the same residuals (kept in the
        blocks during the iteration), and far fewer iterations where EM crawls (components near
        zero, nested designs). "auto" starts once EM crawls: its last :data:`_CRAWL_ITERATIONS`
        steps of (sigma2, D) each shrank by less than :data:`_CRAWL_RATIO` of the one before.

    Returns
    -------
    EMResult
    """
    layout = data.layout
    sigma2, D, history = 1.0, [np.eye(f.q) for f in layout.model_factors], []
    crossed = {k: (np.zeros((len(table), f.q)), np.zeros((len(table), f.q, f.q)))
               for k, (f, table) in enumerate(zip(layout.factors, layout.crossed_levels))
               if table is not None}
    if start is not None:
        sigma2, D, history = start.sigma2, list(start.D), list(start.history)
        data.set_local_effects(start.effects)
        if plan.rounds_per_step:
            data.resume_members(plan, start.members)
        for k in crossed:
            levels, b = start.effects[layout.model_factor(k)]
            crossed[k] = (align_random_effects(layout.crossed_levels[k], levels, b),
                          crossed[k][1])
    first = len(history) + 1
    if first > max_iterations:
        raise ValueError(f"nothing to resume: the checkpoint is at iteration {first - 1} and "
                         f"max_iterations is {max_iterations}")
    previous_gll = history[-1].gll if history else np.nan
    converged = False
    crawl = _CrawlDetector(active=accelerate is True, enabled=accelerate is not False)
    for iteration in range(first, max_iterations + 1):
        started = time.perf_counter()
        growing = iteration <= plan.growing_steps
        if growing or not plan.rounds_per_step:  # warm-started members stay once grown
            data.fit_fixed_effects(plan, {k: b for k, (b, _) in crossed.items()})
        m_step_done = time.perf_counter()
        sums, crossed = _e_step(data, sigma2=sigma2, D=D, keep=crawl.active)
        if crawl.active:
            sums, crossed, sigma2 = _accelerated_step(data, layout.model_factors, sigma2=sigma2,
                                                      D=D, sums=sums, crossed=crossed)
        sigma2, D, gll, log_likelihood = _updated_components(data, sums, layout.model_factors,
                                                             sigma2)
        crawl.update([sigma2, *D])
        # residuals of exactly zero (or a zero or NaN variance): nothing is left to decompose
        if data.family is None and not (sums.residual_ss > 0 and sigma2 > 0):
            raise ValueError(
                f"the residuals y - f(X) - Z b are all zero in EM iteration {iteration}: the "
                "fixed effects reproduce y exactly (a constant y, or a learner that interpolates "
                "its training rows with oob=False); there is no variance to decompose")
        e_step_done = time.perf_counter()
        val_mse = None
        if validation_mse is not None:
            val_mse = validation_mse(data.fixed_effects_model(),
                                     [(e.levels, e.b) for e in _all_effects(data, crossed, D)])
        record = IterationRecord(
            iteration=iteration, gll=gll, relative_change=_relative_change(previous_gll, gll),
            sigma2=None if data.family is not None else sigma2, D=D,
            m_step_seconds=m_step_done - started,
            e_step_seconds=e_step_done - m_step_done, val_mse=val_mse,
            log_likelihood=log_likelihood)
        history.append(record)
        logger.info("%s", record)
        if on_iteration is not None:
            on_iteration(record)
        if tol > 0 and record.relative_change < tol and not growing:
            converged = True
            break
        if on_state is not None and iteration < max_iterations:
            on_state(EMState(iteration=iteration, sigma2=sigma2, D=D, history=list(history),
                             effects=[(e.levels, e.b) for e in _all_effects(data, crossed, D)],
                             members=data.fitted_members() if plan.rounds_per_step else None))
        previous_gll = gll
    return EMResult(fe_model=data.fixed_effects_model(), sigma2=sigma2,
                    effects=_all_effects(data, crossed, D), n_rows=data.n_rows,
                    converged=converged, history=history, design_gram=sums.design_gram,
                    n_in_sample=int(sums.n_in_sample))
