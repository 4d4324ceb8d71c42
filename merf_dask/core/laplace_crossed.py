"""The Laplace E-step of binary and count fits whose factors are crossed.

With crossed factors the blocks' modes are coupled, so Newton's method runs on all the unknowns
at once. Each step is the weighted Gaussian E-step of :mod:`merf_dask.core.random_effects`
(rows scaled by sqrt(w), working residual Z b + (y - mu) / w, sigma2 = 1): the blocks eliminate
their local unknowns, the driver solves the crossed ones densely
(:func:`~merf_dask.core.crossed_solve.solve_crossed`), and the blocks read their proposal
u0 - F u_G. The step is halved until the penalised log-likelihood, summed exactly over the
blocks (:class:`~merf_dask.core.exact_sum.ExactSum`), does not fall; so the mode is the same bits
on any partitioning.

At the mode, the EM update of :mod:`merf_dask.core.laplace` needs each row's conditional variance
of its linear predictor across the crossed system,

    v_i = zt_L'(A^-1 + F S^-1 F') zt_L - 2 zt_L'F S^-1 zt_G + zt_G'S^-1 zt_G,

which each block computes with F S^-1 a chunk of its local unknowns at a time, and
delta = M^-1 a / 2 (a = Zt'(w' v)), one more solve with the same factorisation: the blocks send
a_G - B'A^-1 a_L, the driver multiplies by S^-1, the blocks finish delta_L = A^-1 a_L / 2 - F
delta_G. Only the dense crossed solve is supported (at most
:data:`~merf_dask.core.crossed_solve.DENSE_CROSSED_UNKNOWNS` crossed random effects): beyond, v_i
would need S^-1's entries, which the iterative solve does not form.

Each block function takes the block's arrays and its state and returns the new state and a
partial sum for the driver; the Dask backend runs them where the blocks live.

Classes and functions
---------------------
CrossedNewton
    A block's state during the E-step.
begin_newton
    The state at the start of an E-step (honest f, the last mode).
newton_system, newton_schur, newton_proposal, newton_objective
    A Newton step's passes.
newton_moments, newton_finish
    The passes at the mode: v_i and a's share, then b, Var(b | y), delta, the working response
    and the sums.
crossed_laplace_e_step
    The driver's loop.
"""

from __future__ import annotations

import functools
import logging
import operator
from dataclasses import dataclass, replace

import numpy as np

from .crossed_solve import exact_schur, solve_crossed
from .exact_sum import ExactSum
from .families import Family
from .laplace import _MAX_HALVINGS, _MAX_NEWTON_STEPS, _MIN_WEIGHT, _MODE_TOLERANCE, LaplaceStep
from .random_effects import (EMSums, LocalSystem, _crossed_unknowns, _local_layout,
                             factor_moments, finish_local, random_effects_offset, solve_local)

__all__ = ["CrossedNewton", "begin_newton", "newton_system", "newton_schur",
           "newton_proposal", "newton_objective", "newton_moments", "newton_finish",
           "crossed_laplace_e_step", "add_all", "add_tuples"]

logger = logging.getLogger("merf_dask")

#: A halved step is taken once the penalised log-likelihood falls by no more than this share
#: of its size: closer to the mode its changes are below the rounding of its terms.
_OBJECTIVE_SLACK = 1e-13
#: Local unknowns whose rows of F S^-1 are formed at a time (bounds that dense block).
_CHUNK_UNKNOWNS = 2048


@dataclass
class CrossedNewton:
    """A block's state during a Laplace E-step with crossed factors.

    Attributes
    ----------
    f : ndarray of shape (n_rows,)
        Honest predictions of the fixed part.
    n_in_sample : int
        Rows of ``f`` predicted in-sample.
    unknowns : list of (ndarray of shape (n_levels_k, q_k) or None)
        Every local factor's unknowns (as :func:`solve_local` numbers them); None for crossed
        factors.
    u : ndarray of shape (n_local,)
        The local unknowns at the current point.
    step : ndarray of shape (n_local,) or None
        Newton's last proposal minus ``u``.
    system : LocalSystem or None
        M's local part at ``u``.
    logdet : float
        log|A| at ``u``.
    mu, w : ndarray of shape (n_rows,) or None
        The mean and weights at ``u``.
    slope : ndarray of shape (n_rows,) or None
        w' v at the mode.
    a_solved : ndarray of shape (n_local,) or None
        A^-1 a_L at the mode.
    """

    f: np.ndarray
    n_in_sample: int
    unknowns: list
    u: np.ndarray
    step: np.ndarray | None = None
    system: LocalSystem | None = None
    logdet: float = 0.0
    mu: np.ndarray | None = None
    w: np.ndarray | None = None
    slope: np.ndarray | None = None
    a_solved: np.ndarray | None = None


def add_all(*values):
    """The sum of partial results (a tree reduction's combine)."""
    return functools.reduce(operator.add, values)


def add_tuples(*tuples):
    """Element by element sums of tuples of partial results."""
    return tuple(add_all(*items) for items in zip(*tuples))


def _local_unknowns(part, layout) -> tuple:
    """The local unknowns' numbering (as :func:`solve_local` makes it): per factor, the
    (n_levels, q) unknowns (None for crossed factors), and their number."""
    local = [k for k, table in enumerate(layout.crossed_levels) if table is None]
    blocks, unknowns = _local_layout(list(part.codes), [Zk.shape[1] for Zk in part.Z],
                                     [len(ids) for ids in part.levels], local)
    n_local = int(blocks.start[-1] + blocks.size[-1]) if len(blocks.size) else 0
    return [unknowns.get(k) for k in range(len(part.Z))], n_local


def begin_newton(part, f: np.ndarray, n_in_sample: int, previous: LaplaceStep | None, *,
                 layout) -> CrossedNewton:
    """A block's state at the start of an E-step: Newton's method starts at the last mode."""
    unknowns, n_local = _local_unknowns(part, layout)
    return CrossedNewton(f=f, n_in_sample=n_in_sample, unknowns=unknowns,
                         u=np.zeros(n_local) if previous is None else previous.u.copy())


def _eta(part, state: CrossedNewton, u_local, u_crossed, *, relative, layout) -> np.ndarray:
    """f + Z b at the block's rows, b from the local and the crossed unknowns."""
    b = []
    for k, (Lk, position) in enumerate(zip(relative, layout.positions(part))):
        if position is None:
            b.append(u_local[state.unknowns[k]] @ Lk.T)
        else:
            index = _crossed_unknowns(layout.offsets[k], Lk.shape[0], position)
            b.append(u_crossed[index] @ Lk.T)
    return state.f + random_effects_offset(list(part.Z), b, list(part.codes))


def _objective(part, eta, u_local, family: Family) -> tuple[ExactSum, int]:
    """The block's share of the penalised log-likelihood, sum log p(y | eta) - u_L'u_L / 2,
    as an exact sum (shape (1,)), and the number of its terms that overflowed (a trial point
    far out: its log-likelihood is -inf)."""
    terms = np.concatenate([family.log_density(part.y, eta), -0.5 * u_local * u_local])
    finite = np.isfinite(terms)
    return (ExactSum.of_terms(np.zeros(int(finite.sum()), dtype=np.int64), terms[finite], (1,)),
            int(len(terms) - finite.sum()))


def _total(objective: tuple[ExactSum, int], u_crossed: np.ndarray) -> float:
    """The penalised log-likelihood from the blocks' summed shares and the crossed unknowns."""
    total, overflowed = objective
    if overflowed:
        return -np.inf
    return float(total.to_dense()[0]) - 0.5 * float(u_crossed @ u_crossed)


def newton_system(part, state: CrossedNewton, *, u_crossed, relative, family: Family, layout,
                  accept: float | None = None):
    """Take the pending step (``accept`` times it), then build Newton's system there.

    Returns
    -------
    state : CrossedNewton
    partial : tuple of (CrossedShare, ExactSum, int)
        The block's share of the crossed system and of the penalised log-likelihood at the
        new point (:func:`_objective`).
    """
    u = state.u if accept is None else state.u + accept * state.step
    eta = _eta(part, state, u, u_crossed, relative=relative, layout=layout)
    mu = family.mean(eta)
    w = np.maximum(family.weights(mu), _MIN_WEIGHT)
    s = np.sqrt(w)
    system, share, logdet = solve_local(
        codes=list(part.codes), Z=[s[:, None] * Zk for Zk in part.Z],
        n_levels=[len(ids) for ids in part.levels], r=s * (eta - state.f) + (part.y - mu) / s,
        relative=relative, crossed_position=layout.positions(part), offsets=layout.offsets)
    state = replace(state, u=u, step=None, system=system, logdet=logdet, mu=mu, w=w)
    return state, (share, *_objective(part, eta, u, family))


def newton_schur(part, state: CrossedNewton, *, P: int, term_bound: float):
    """The block's share of S at the current point (:func:`exact_schur`)."""
    return state, exact_schur(state.system.crossed, P, term_bound=term_bound)


def newton_proposal(part, state: CrossedNewton, *, solution):
    """Newton's proposal for the local unknowns, u0 - F u_G; the partial is the largest move."""
    step = state.system.u0 - state.system.coupling @ solution.u - state.u
    return replace(state, step=step), float(np.abs(step).max(initial=0.0))


def newton_objective(part, state: CrossedNewton, *, t: float, u_crossed, relative,
                     family: Family, layout):
    """The block's share of the penalised log-likelihood at u + t step (the crossed unknowns
    at ``u_crossed``)."""
    u = state.u + t * state.step
    eta = _eta(part, state, u, u_crossed, relative=relative, layout=layout)
    return state, _objective(part, eta, u, family)


def _row_variances(system: LocalSystem, Zt: list, codes: list, crossed_index: dict,
                   S_inverse: np.ndarray) -> np.ndarray:
    """v_i = zt_i' M^-1 zt_i at every row of the block (see the module docstring).

    Parameters
    ----------
    system : LocalSystem
    Zt : list of ndarray of shape (n_rows, q_k)
        Every factor's Z L (unweighted).
    codes : list of ndarray of shape (n_rows,)
    crossed_index : dict
        Crossed factor -> (n_levels, q) its unknowns at the block's levels.
    S_inverse : ndarray of shape (P, P)
    """
    local = [k for k, unknowns in enumerate(system.unknowns) if unknowns is not None]
    local_index = np.hstack([system.unknowns[k][codes[k]] for k in local])
    local_values = np.hstack([Zt[k] for k in local])
    crossed = sorted(crossed_index)
    crossed_rows = np.hstack([crossed_index[k][codes[k]] for k in crossed])
    crossed_values = np.hstack([Zt[k] for k in crossed])
    v = np.zeros(len(codes[0]))
    for a in range(local_index.shape[1]):
        for c in range(local_index.shape[1]):
            v += local_values[:, a] * local_values[:, c] * system.a_inverse.entries(
                local_index[:, a], local_index[:, c])
    for a in range(crossed_rows.shape[1]):
        for c in range(crossed_rows.shape[1]):
            v += crossed_values[:, a] * crossed_values[:, c] * S_inverse[crossed_rows[:, a],
                                                                         crossed_rows[:, c]]
    # the terms through F, a chunk of whole blocks (levels of the partition factor) at a time:
    # a row's local unknowns all lie in its block
    F = system.coupling
    starts = system.a_inverse.start
    block_of_row = codes[local[0]]
    order = np.argsort(block_of_row, kind="stable")
    row_bounds = np.searchsorted(block_of_row[order], np.arange(len(starts) + 1))
    first = 0
    while first < len(starts):
        last = max(first + 1, int(np.searchsorted(starts, starts[first] + _CHUNK_UNKNOWNS)))
        lo = int(starts[first])
        hi = int(starts[last]) if last < len(starts) else F.shape[0]
        rows = order[row_bounds[first]:row_bounds[last]]
        coupled = F[lo:hi] @ S_inverse  # F S^-1, (hi - lo, P)
        coupled_local = (F[lo:hi] @ coupled.T).T  # F S^-1 F', (hi - lo, hi - lo)
        index = local_index[rows] - lo
        values = local_values[rows]
        for a in range(index.shape[1]):
            for c in range(index.shape[1]):
                v[rows] += values[:, a] * values[:, c] * coupled_local[index[:, a], index[:, c]]
            for j in range(crossed_rows.shape[1]):
                v[rows] -= 2.0 * values[:, a] * crossed_values[rows, j] * coupled[
                    index[:, a], crossed_rows[rows, j]]
        first = last
    return v


def _crossed_index(part, layout) -> dict:
    """Crossed factor -> (n_levels, q) its unknowns at the block's levels."""
    return {k: _crossed_unknowns(layout.offsets[k], Zk.shape[1], position)
            for k, (Zk, position) in enumerate(zip(part.Z, layout.positions(part)))
            if position is not None}


def newton_moments(part, state: CrossedNewton, *, solution, relative, family: Family, layout):
    """At the mode: every row's v_i, and the block's share of a_G - B'A^-1 a_L.

    Returns
    -------
    state : CrossedNewton
    partial : ExactSum of shape (P,)
    """
    system = state.system
    Zt = [Zk @ Lk for Zk, Lk in zip(part.Z, relative)]
    crossed_index = _crossed_index(part, layout)
    codes = list(part.codes)
    v = _row_variances(system, Zt, codes, crossed_index, solution.inverse)
    slope = family.weight_slope(state.mu) * v
    n_local = len(state.u)
    a_local = np.zeros(n_local)
    for k, unknowns in enumerate(system.unknowns):
        if unknowns is not None:
            rows = unknowns[codes[k]]
            for a in range(rows.shape[1]):
                a_local += np.bincount(rows[:, a], slope * Zt[k][:, a], n_local)
    a_solved = system.a_inverse.apply(a_local)
    index = [crossed_index[k][codes[k]].ravel() for k in sorted(crossed_index)]
    terms = [(slope[:, None] * Zt[k]).ravel() for k in sorted(crossed_index)]
    b_rows, b_cols, b_values = system.crossed.cross_gram
    share = ExactSum.of_terms(np.concatenate([*index, b_cols]),
                              np.concatenate([*terms, -b_values * a_solved[b_rows]]),
                              (int(layout.offsets[-1]),))
    return replace(state, slope=slope, a_solved=a_solved), share


def newton_finish(part, state: CrossedNewton, *, solution, u_crossed, delta_crossed, relative,
                  family: Family, layout) -> tuple[list, list, EMSums, LaplaceStep]:
    """The block's local b, Var(b | y), the corrected sums and the next working response.

    Returns
    -------
    b, b_cov : list (per factor; None for crossed factors)
    sums : EMSums
    step : LaplaceStep
    """
    system = state.system
    _, m_inverse, _, _ = finish_local(system, solution=solution,
                                      crossed_position=layout.positions(part),
                                      offsets=layout.offsets)
    delta = 0.5 * state.a_solved - system.coupling @ delta_crossed
    codes = list(part.codes)
    b, b_cov, delta_b, n_levels, bbt, cov_sums = [], [], [], [], [], []
    crossed_index = _crossed_index(part, layout)
    for k, (Lk, unknowns) in enumerate(zip(relative, system.unknowns)):
        q = Lk.shape[0]
        if unknowns is None:  # crossed: the driver's sums
            delta_b.append(delta_crossed[crossed_index[k]] @ Lk.T)
            b.append(None), b_cov.append(None), n_levels.append(0.0)
            bbt.append(np.zeros((q, q))), cov_sums.append(np.zeros((q, q)))
            continue
        kept = (np.ones(len(unknowns), dtype=bool) if k or part.spread is None
                else ~part.spread)  # a spread cluster's placeholder level holds no data
        bk, covk = np.zeros((len(unknowns), q)), np.zeros((len(unknowns), q, q))
        bk[kept], covk[kept], cov_sum, _ = factor_moments(state.u[unknowns[kept]],
                                                          m_inverse[k][kept], Lk, 1.0)
        dk = np.zeros((len(unknowns), q))
        dk[kept] = delta[unknowns[kept]] @ Lk.T
        b.append(bk), b_cov.append(covk), delta_b.append(dk)
        n_levels.append(float(np.count_nonzero(kept)))
        bbt.append(bk.T @ bk), cov_sums.append(cov_sum - dk.T @ bk - bk.T @ dk)
    eta = _eta(part, state, state.u, u_crossed, relative=relative, layout=layout)
    target = (state.f + (part.y - state.mu - 0.5 * state.slope) / state.w
              + random_effects_offset(list(part.Z), delta_b, codes))
    sums = EMSums(
        n_rows=float(len(part.y)), residual_ss=0.0, residual_correction=0.0, quadratic=0.0,
        logdet=state.logdet, n_levels=n_levels, bbt=bbt, conditional_cov=cov_sums,
        design_gram=[Zk.T @ Zk for Zk in part.Z],
        log_density=float(family.log_density(part.y, eta).sum()),
        penalty=float(state.u @ state.u), n_in_sample=float(state.n_in_sample))
    step = LaplaceStep(u=state.u, target=target, weights=state.w, f=state.f,
                       n_in_sample=state.n_in_sample)
    return b, b_cov, sums, step


def _crossed_sums(solution, u_crossed, delta_crossed, *, relative, layout) -> tuple[dict, EMSums]:
    """The crossed factors' b and Var(b | y) over their tables and their entries of the sums
    (driver side), with the Laplace correction."""
    q = [Lk.shape[0] for Lk in relative]
    zero = [np.zeros((qk, qk)) for qk in q]
    sums = EMSums(n_rows=0.0, residual_ss=0.0, residual_correction=0.0, quadratic=0.0,
                  logdet=solution.logdet, n_levels=[0.0] * len(q), bbt=list(zero),
                  conditional_cov=list(zero), design_gram=list(zero),
                  penalty=float(u_crossed @ u_crossed))
    effects = {}
    for k, table in enumerate(layout.crossed_levels):
        if table is None:
            continue
        index = _crossed_unknowns(layout.offsets[k], q[k], np.arange(len(table)))
        m_inverse, _ = solution.level_blocks(index, k)
        b, b_cov, cov_sum, _ = factor_moments(u_crossed[index], m_inverse, relative[k], 1.0)
        d = delta_crossed[index] @ relative[k].T
        effects[k] = (b, b_cov)
        sums.n_levels[k] = float(len(table))
        sums.bbt[k], sums.conditional_cov[k] = b.T @ b, cov_sum - d.T @ b - b.T @ d
    return effects, sums


def crossed_laplace_e_step(data, *, relative: list, again: bool = False
                           ) -> tuple[EMSums, dict]:
    """The Laplace E-step over ``data`` (an :class:`~merf_dask.core.em.EMData` with crossed
    factors), Newton's method from the last mode.

    Returns the sums (per model factor) and the crossed factors' (b, b_cov).
    """
    layout, family = data.layout, data.family
    P = int(layout.offsets[-1])  # at most DENSE_CROSSED_UNKNOWNS: refuse_crossed_family
    shared = dict(relative=relative, family=family, layout=layout)
    data.laplace_begin(again=again)
    u_crossed = np.zeros(P) if data.crossed_mode is None else data.crossed_mode

    def system_at(accept):
        """Newton's system at the point after the pending step, solved densely."""
        share, *objective = data.laplace_pass(newton_system, add_tuples, u_crossed=u_crossed,
                                              accept=accept, **shared)
        schur = data.laplace_pass(newton_schur, add_tuples, P=P, term_bound=share.term_bound)
        return solve_crossed(share, schur), _total(objective, u_crossed)

    solution, objective = system_at(None)
    for _ in range(_MAX_NEWTON_STEPS):
        step_crossed = solution.u - u_crossed
        size = max(data.laplace_pass(newton_proposal, max, solution=solution),
                   float(np.abs(step_crossed).max(initial=0.0)))
        if size <= _MODE_TOLERANCE:
            break
        t = 1.0
        for _ in range(_MAX_HALVINGS):  # the penalised log-likelihood is concave
            trial = u_crossed + t * step_crossed
            candidate = _total(data.laplace_pass(newton_objective, add_tuples, t=t,
                                                 u_crossed=trial, **shared), trial)
            if candidate >= objective - _OBJECTIVE_SLACK * abs(objective):
                break
            t *= 0.5
        u_crossed = u_crossed + t * step_crossed
        solution, objective = system_at(t)
    else:
        logger.warning("Newton's method for the random effects' mode stopped after %d steps",
                       _MAX_NEWTON_STEPS)
    a_share = data.laplace_pass(newton_moments, add_all, solution=solution, **shared)
    delta_crossed = 0.5 * (solution.inverse @ a_share.to_dense())
    sums = data.laplace_finish(newton_finish, solution=solution, u_crossed=u_crossed,
                               delta_crossed=delta_crossed, **shared)
    effects, crossed_sums = _crossed_sums(solution, u_crossed, delta_crossed, relative=relative,
                                          layout=layout)
    data.crossed_mode = u_crossed
    return layout.pooled(sums + crossed_sums), effects
