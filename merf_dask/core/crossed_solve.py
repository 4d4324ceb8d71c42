"""The crossed factors' unknowns from the partitions' shares: densely, or iteratively at scale.

After the partitions have eliminated their local unknowns (:func:`~merf_dask.core.random_effects.
solve_local`), the crossed unknowns u_G solve S u_G = t with S = I + sum_p S_p (P x P). Where P is
at most :data:`DENSE_CROSSED_UNKNOWNS`, S is summed on the driver and inverted
(:func:`solve_crossed`): everything is exact. Beyond, S is never formed (:func:`solve_iteratively`):

- u_G by preconditioned conjugate gradients (PCG); a product S x is one pass over the
  partitions, each returning S_p x (:func:`exact_products`), with S's blocks at each crossed
  level as the preconditioner P_c = C C' (block Jacobi);
- the EM M-step needs sums of diagonal blocks of S^-1 (and of F S^-1 F' at local levels). They
  are the block-Jacobi part P_c^-1 plus an unbiased stochastic estimate of the rest: with
  Rademacher probes z, w = C z, x = S^-1 w and y = C^-T z (so E[w y'] = I and y = P_c^-1 w),
  E[(x - y) y'] = S^-1 - P_c^-1 (Hutchinson's estimator with a control variate);
- log|S| = log|P_c| + tr log(C^-1 S C^-T), the trace by stochastic Lanczos quadrature from the
  same PCG runs (their coefficients are the Lanczos tridiagonal of C^-1 S C^-T started at z);
- the probes are the same in every E-step (a fixed seed), so the M-step is a deterministic map
  and EM converges to a fixed point next to the maximum-likelihood estimates.

Both paths sum across partitions in fixed point: every term of S_p (or of S_p x) is one row's
or one (local unknown, crossed unknown) pair's, the same in any partitioning; counted in units of
2**-52 of a bound on all of them (:attr:`CrossedShare.term_bound`, a maximum, so exact) as two
integers of 26 bits, they add exactly in any order, and S (or S x) is the same bits on any
partitioning. The rounding is relative to the largest term, not to each sum, as float sums'
would be to their partial sums.

The per-level conditional covariances reported for such a fit are the block-Jacobi ones
(P_c^-1 at crossed levels, A^-1 + F P_c^-1 F' at local levels): the covariance of a level's
effects given the crossed effects of the levels it does not share rows with, a lower bound on the
exact one. docs/structures.md gives the measured errors.

Classes and functions
---------------------
CrossedSolution
    u_G, log|S| and what the partitions need for their conditional covariances.
exact_schur, solve_crossed
    One partition's S_p as exact fixed-point sums; the dense solve.
exact_products
    One partition's S_p x as exact fixed-point sums (the iterative solve's product).
solve_iteratively
    PCG, the stochastic traces and the log-determinant.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .random_effects import CrossedRows, CrossedShare, probe_sum, schur_terms

__all__ = ["CrossedSolution", "exact_schur", "solve_crossed", "exact_products",
           "solve_iteratively",
           "DENSE_CROSSED_UNKNOWNS", "TRACE_PROBES"]

logger = logging.getLogger("merf_dask")

#: Crossed factors with at most this many unknowns (levels x columns) in all are solved densely
#: on the driver: S takes 8 P^2 bytes (72 MB at 3,000) and its inverse O(P^3).
DENSE_CROSSED_UNKNOWNS = 3000
#: Rademacher probes of the stochastic traces and log-determinant.
TRACE_PROBES = 16
#: PCG stops when every column's residual is below this share of its right-hand side's norm.
_TOLERANCE = 1e-9
_MAX_PCG_ITERATIONS = 1000
_PROBE_SEED = 20140101
#: Terms summed across partitions are counted in units of 2**-52 of a bound on them, as two
#: integers of _LIMB_BITS bits: sums of up to 2**(53 - _LIMB_BITS) terms per entry are exact.
_LIMB_BITS = 26


@dataclass
class CrossedSolution:
    """The crossed unknowns and what finishes the E-step.

    Attributes
    ----------
    u : ndarray of shape (P,)
        E[u_G | r].
    logdet : float
        log|S| (estimated when iterative).
    quadratic : float
        u_G'Zt_G'r.
    inverse : ndarray of shape (P, P) or None
        S^-1 (dense solve).
    block_inverse : list of (ndarray of shape (n_levels_k, q_k, q_k) or None) or None
        P_c^-1 at each crossed factor's levels (iterative solve).
    block_inverse_matrix : scipy.sparse.csr_matrix of shape (P, P) or None
        The same as one block-diagonal matrix.
    probe_difference : ndarray of shape (P, n_probes) or None
        x - y of every probe.
    probe_dual : ndarray of shape (P, n_probes) or None
        y of every probe.
    iterations : int
        PCG iterations (0 for the dense solve).
    """

    u: np.ndarray
    logdet: float
    quadratic: float
    inverse: np.ndarray | None = None
    block_inverse: list | None = None
    block_inverse_matrix: sp.csr_matrix | None = None
    probe_difference: np.ndarray | None = None
    probe_dual: np.ndarray | None = None
    iterations: int = 0

    def level_blocks(self, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """A crossed factor's (n_levels, q, q) blocks of M^-1 as reported, and the stochastic
        part of their sum ((q, q), None when exact).

        Parameters
        ----------
        index : ndarray of shape (n_levels, q), int
            The factor's crossed unknowns.
        k : int
            The factor.
        """
        if self.inverse is not None:
            return self.inverse[index[:, :, None], index[:, None, :]], None
        return self.block_inverse[k], probe_sum(self.probe_difference[index],
                                                self.probe_dual[index])


def solve_crossed(share: CrossedShare, schur: list) -> CrossedSolution:
    """The crossed unknowns by a dense Cholesky factorisation of S (the exact path).

    Parameters
    ----------
    share : CrossedShare
        Summed over all partitions.
    schur : list of scipy.sparse.csr_matrix of shape (P, P)
        :func:`exact_schur` summed over all partitions.
    """
    upper = _from_limbs([limb.toarray() for limb in schur], _grid(share.term_bound))
    S = upper + np.triu(upper, 1).T + np.eye(len(upper))
    chol = np.linalg.cholesky(S)
    inverse = np.linalg.inv(chol)
    inverse = inverse.T @ inverse
    u = inverse @ share.reduced_rhs.to_dense()
    return CrossedSolution(u=u, inverse=inverse, logdet=float(2.0 * np.log(np.diag(chol)).sum()),
                           quadratic=float(u @ share.rhs.to_dense()))


def _limbs(terms: np.ndarray, grid) -> tuple[np.ndarray, np.ndarray]:
    """Two integers of at most 26 bits with terms = (high 2^26 + low) grid up to a rounding
    below grid (every operation is exact: grid is a power of two)."""
    units = np.rint(terms * (1.0 / grid))
    high = np.floor(units * 2.0 ** -_LIMB_BITS)
    units -= high * 2.0 ** _LIMB_BITS
    return high, units


def _from_limbs(limbs, grid) -> np.ndarray:
    """The value of summed limbs (a deterministic function of the integers)."""
    high, low = limbs
    return (high * 2.0 ** _LIMB_BITS + low) * grid


def _grid(bound) -> np.ndarray:
    """The power of two that terms bounded by ``bound`` are counted in (2**-52 of the bound)."""
    bound = np.asarray(bound, dtype=float)
    exponent = np.frexp(np.where(bound > 0, bound, 1.0))[1]
    return np.ldexp(1.0, exponent - 2 * _LIMB_BITS)


def exact_schur(rows: CrossedRows, P: int, *, term_bound: float) -> list:
    """One partition's E_p - B_p'F_p on and above the diagonal, as integers whose sums over
    partitions are exact.

    Its terms (:func:`~merf_dask.core.random_effects.schur_terms`) do not depend on how the
    rows are split into partitions; each is counted in units of 2**-52 ``term_bound`` (a bound
    on every term of every partition) as two integers of 26 bits, which float64 adds exactly
    for up to 2**27 terms per entry.

    Returns
    -------
    list of 2 scipy.sparse.csr_matrix of shape (P, P)
        The limbs (:func:`solve_crossed` turns their sums into S).
    """
    index, values = schur_terms(rows, P)
    # P is small on this path: count into all P^2 entries, keep those some term touched
    limbs = [np.bincount(index, limb, P * P) for limb in _limbs(values, _grid(term_bound))]
    touched = np.flatnonzero(np.bincount(index, minlength=P * P))
    return [sp.csr_matrix((limb[touched], (touched // P, touched % P)), shape=(P, P))
            for limb in limbs]


def exact_products(rows: CrossedRows, X: np.ndarray, *, term_bound: float) -> list:
    """One partition's S_p X, as integers whose sums over partitions are exact.

    S_p X = E_p X - B_p'(F_p X) is summed first within each cell (one level of the partition
    factor and one crossed unknown: :class:`~merf_dask.core.random_effects.CrossedRows`, the
    same sums in the same order on any partitioning), then across cells as in
    :func:`exact_schur`, in units set by ``term_bound`` * max|X[:, c]| (a bound on every
    cell's sum).

    Parameters
    ----------
    rows : CrossedRows
    X : ndarray of shape (P, m)
    term_bound : float
        :attr:`CrossedShare.term_bound` over every partition.

    Returns
    -------
    list of 2 ndarray of shape (P, m)
        The limbs; :func:`_from_limbs` of their sum over partitions is S X - X.
    """
    P, m = X.shape
    cell_sums = rows.cell_gram @ X - rows.cell_coupling @ (rows.coupling @ X)
    flat = (rows.cell_unknown[:, None] * m + np.arange(m)).ravel()
    limbs = _limbs(cell_sums, _grid(term_bound * np.abs(X).max(axis=0)))
    return [np.bincount(flat, limb.ravel(), P * m).reshape(P, m) for limb in limbs]


def _block_diagonal(share: CrossedShare) -> list:
    """P_c = I + the summed blocks of S_p at each crossed level (None for local factors)."""
    blocks = []
    for k, diagonal in enumerate(share.diagonal):
        if diagonal is None:
            blocks.append(None)
            continue
        values = diagonal.to_dense()
        values = 0.5 * (values + np.swapaxes(values, 1, 2)) + np.eye(values.shape[1])
        blocks.append(values)
    return blocks


def _block_apply(blocks: list, offsets, X: np.ndarray, operation) -> np.ndarray:
    """``operation(block, x_block)`` at every crossed level: (P, m) -> (P, m)."""
    out = np.empty_like(X)
    for k, values in enumerate(blocks):
        if values is None:
            continue
        n, q, _ = values.shape
        part = X[offsets[k]:offsets[k + 1]].reshape(n, q, -1)
        out[offsets[k]:offsets[k + 1]] = operation(values, part).reshape(n * q, -1)
    return out


def _block_matrix(blocks: list, offsets, P: int) -> sp.csr_matrix:
    """The blocks as one block-diagonal sparse matrix."""
    rows, cols, values = [], [], []
    for k, block in enumerate(blocks):
        if block is None:
            continue
        n, q, _ = block.shape
        index = offsets[k] + np.arange(n * q).reshape(n, q)
        rows.append(np.repeat(index, q, axis=1).ravel())
        cols.append(np.tile(index, (1, q)).ravel())
        values.append(block.ravel())
    return sp.csr_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(P, P))


def solve_iteratively(share: CrossedShare, product, *, offsets, n_probes: int = TRACE_PROBES
                      ) -> CrossedSolution:
    """The crossed unknowns, the stochastic traces' probes and log|S| by PCG.

    Parameters
    ----------
    share : CrossedShare
        Summed over all partitions, with its blocks at each crossed level.
    product : callable
        ``product(X)`` gives :func:`exact_products` summed over the partitions for X of shape
        (P, m) (one pass over them).
    offsets : ndarray
        :func:`~merf_dask.core.random_effects.crossed_offsets`.
    n_probes : int

    Returns
    -------
    CrossedSolution
    """
    P = int(offsets[-1])
    blocks = _block_diagonal(share)
    factors = [None if b is None else np.linalg.cholesky(b) for b in blocks]
    block_inverse = [None if b is None else np.linalg.inv(b) for b in blocks]
    probes = np.random.default_rng(_PROBE_SEED).choice([-1.0, 1.0], size=(P, n_probes))
    W = _block_apply(factors, offsets, probes, lambda c, z: np.einsum("lij,ljm->lim", c, z))
    rhs = np.column_stack([share.reduced_rhs.to_dense(), W])

    def apply_s(X):
        return X + _from_limbs(product(X), _grid(share.term_bound * np.abs(X).max(axis=0)))

    def precondition(R):
        return _block_apply(block_inverse, offsets, R, lambda b, r: np.einsum("lij,ljm->lim",
                                                                               b, r))

    solution, alphas, betas, iterations = _pcg(apply_s, precondition, rhs)
    # y = C^-T z = P_c^-1 w
    dual = precondition(W)
    logdet_blocks = sum(2.0 * np.log(np.diagonal(c, axis1=1, axis2=2)).sum()
                        for c in factors if c is not None)
    quadrature = [_lanczos_log_quadrature(a, b) for a, b in zip(alphas[1:], betas[1:])]
    logdet = float(logdet_blocks + P * np.mean(quadrature))
    u = solution[:, 0]
    logger.debug("crossed unknowns: %d PCG iterations", iterations)
    return CrossedSolution(
        u=u, logdet=logdet, quadratic=float(u @ share.rhs.to_dense()),
        block_inverse=block_inverse, block_inverse_matrix=_block_matrix(block_inverse, offsets, P),
        probe_difference=solution[:, 1:] - dual, probe_dual=dual, iterations=iterations)


def _pcg(apply_s, precondition, rhs: np.ndarray):
    """Preconditioned conjugate gradients on every column of ``rhs`` at once, from zero.

    Returns the solutions (P, m), each column's CG coefficients alpha and beta (lists), and the
    iterations of the slowest column. A column stops once its residual norm is below
    :data:`_TOLERANCE` of its right-hand side's.
    """
    P, m = rhs.shape
    x = np.zeros_like(rhs)
    r = rhs.copy()
    z = precondition(r)
    p = z.copy()
    rz = np.einsum("ij,ij->j", r, z)
    target = _TOLERANCE * np.linalg.norm(rhs, axis=0)
    active = np.linalg.norm(r, axis=0) > target
    alphas, betas = [[] for _ in range(m)], [[] for _ in range(m)]
    iteration = 0
    while active.any() and iteration < _MAX_PCG_ITERATIONS:
        iteration += 1
        columns = np.flatnonzero(active)
        sp_ = apply_s(p[:, columns])
        alpha = rz[columns] / np.einsum("ij,ij->j", p[:, columns], sp_)
        x[:, columns] += alpha * p[:, columns]
        r[:, columns] -= alpha * sp_
        z_new = precondition(r[:, columns])
        rz_new = np.einsum("ij,ij->j", r[:, columns], z_new)
        beta = rz_new / rz[columns]
        for j, column in enumerate(columns):
            alphas[column].append(float(alpha[j]))
            betas[column].append(float(beta[j]))
        p[:, columns] = z_new + beta * p[:, columns]
        rz[columns] = rz_new
        active[columns] = np.linalg.norm(r[:, columns], axis=0) > target[columns]
    if active.any():
        logger.warning("the crossed random effects' conjugate gradients stopped after %d "
                       "iterations with a relative residual of %.1e", iteration,
                       float((np.linalg.norm(r, axis=0) / np.maximum(target / _TOLERANCE,
                                                                     1e-300)).max()))
    return x, alphas, betas, iteration


def _lanczos_log_quadrature(alphas: list, betas: list) -> float:
    """e1' log(T) e1 for the Lanczos tridiagonal T of a CG run (Gauss quadrature of
    z' log(A) z / |z|^2)."""
    k = len(alphas)
    if k == 0:
        return 0.0
    a, b = np.asarray(alphas), np.asarray(betas)
    diagonal = 1.0 / a
    diagonal[1:] += b[:-1] / a[:-1]
    off = np.sqrt(b[:-1]) / a[:-1]
    T = np.diag(diagonal) + np.diag(off, 1) + np.diag(off, -1)
    values, vectors = np.linalg.eigh(T)
    return float((vectors[0] ** 2 * np.log(values)).sum())
