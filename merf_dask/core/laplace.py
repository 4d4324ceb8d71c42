"""The E-step of binary and count fits: Laplace's approximation, and EM updates that reach its
maximum.

For a family with canonical link (:mod:`merf_dask.core.families`), y | b has log-density
l(y | eta) with eta = f + Z b, and b = L u with L L' = D and u ~ N(0, I). Given f, Laplace's
approximation of the marginal log-likelihood is

    l_L = sum_i l(y_i | eta_i) - u'u / 2 - log|M| / 2,   M = I + L'Z'W Z L,

at the mode u of the integrand, found by Newton's method: each step is the weighted Gaussian
solve of :func:`merf_dask.core.random_effects.solve_local` with rows scaled by sqrt(w) (w =
dmu/deta) and the working residual Z b + (y - mu) / w, with step halving on the penalised
log-likelihood. At the mode, Var(b | y) ~ L M^-1 L' = H^-1.

The EM update D = mean over levels of (b b' + H^-1), fitted on the working response, is PQL,
which biases D low for binary data with small clusters. The update here keeps the derivative of
log|M| through the mode (W depends on b): with v_i = z_i'H^-1 z_i (the conditional variance of
eta_i), a = Z'(w' * v) (w' = dw/deta) and delta = H^-1 a / 2,

    D = mean over levels of (b b' + H^-1 - delta b' - b delta'),

and the fixed part is fitted to f + (y - mu - w' v / 2) / w + Z delta with weights w. Its fixed
point is the stationary point of l_L in (D, f) for a linear learner (tests check the Laplace ML
estimates); the derivation is in ``docs/families.md``.

Functions
---------
laplace_local
    One block's Laplace E-step (local factors only): the mode, H^-1, the sums and the next
    working response.
update_laplace_components
    The driver's update of every D_k and the Laplace log-likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .families import Family
from .random_effects import (EMSums, _local_layout, factor_moments, finish_local,
                             random_effects_offset, solve_local)

__all__ = ["LaplaceStep", "laplace_local", "update_laplace_components", "initial_working"]

#: Newton's method stops when no unknown moves by more than this (u is standard normal a priori).
_MODE_TOLERANCE = 1e-10
_MAX_NEWTON_STEPS = 100
_MAX_HALVINGS = 30
#: Working weights are kept above this, so (y - mu) / w stays finite where mu is 0 or 1.
_MIN_WEIGHT = 1e-300


@dataclass
class LaplaceStep:
    """One block's Laplace E-step.

    Attributes
    ----------
    u : ndarray of shape (n_local,)
        The mode (the next E-step starts there).
    target : ndarray of shape (n_rows,)
        The fixed part's next working response f + (y - mu - w' v / 2) / w + Z delta.
    weights : ndarray of shape (n_rows,)
        w at the mode.
    f : ndarray of shape (n_rows,)
        The honest predictions of the fixed part it used (an accelerated iteration's further
        E-steps reuse them).
    n_in_sample : int
        Rows of ``f`` predicted in-sample because no honest member served them.
    """

    u: np.ndarray
    target: np.ndarray
    weights: np.ndarray
    f: np.ndarray
    n_in_sample: int = 0


def initial_working(y: np.ndarray, family: Family, mean: float) -> tuple[np.ndarray, np.ndarray]:
    """The first M-step's working response and weights, at b = 0: for binary y at
    eta = logit(mean), ``mean`` the mean of y over every row of the fit; for counts at each
    row's mu = y + 0.1, as R's glm starts (from the mean, a count of 334 among counts of 2.6
    gave a working response of 128 that a forest fitted as it was, and the fit diverged)."""
    if family.name == "poisson":
        mu = y + 0.1
        return np.log(mu) + (y - mu) / mu, mu
    w = np.full(len(y), family.weights(mean))
    return family.link(mean) + (y - mean) / w, w


def _penalised(family, y, f, Z, codes, relative, unknowns, u, *, row_block, unknown_block,
               n_blocks):
    """The penalised log-likelihood of every block of unknowns (one per level of the first
    factor, its nested levels with it), and eta, at ``u``."""
    b = [u[k] @ L.T for k, L in zip(unknowns, relative)]
    eta = f + random_effects_offset(Z, b, codes)
    value = (np.bincount(row_block, family.log_density(y, eta), n_blocks)
             - 0.5 * np.bincount(unknown_block, u * u, n_blocks))
    return value, eta


def laplace_local(*, y, f, Z, codes, n_levels, relative, family: Family, u_start=None
                  ) -> tuple[LaplaceStep, list, list, EMSums]:
    """The Laplace E-step of one block whose factors are all local (each level inside one
    level of the first factor).

    Parameters
    ----------
    y : ndarray of shape (n_rows,)
    f : ndarray of shape (n_rows,)
        Honest predictions of the fixed part.
    Z, codes, n_levels
        As for :func:`~merf_dask.core.random_effects.solve_local`.
    relative : list of ndarray of shape (q_k, q_k)
        L_k with L_k L_k' = D_k.
    family : Family
    u_start : ndarray of shape (n_local,), optional
        Where Newton's method starts (the last mode); zero by default.

    Returns
    -------
    step : LaplaceStep
    b : list of ndarray of shape (n_levels_k, q_k)
    b_cov : list of ndarray of shape (n_levels_k, q_k, q_k)
        H^-1 at each level.
    sums : EMSums
        With ``conditional_cov`` holding sum H^-1 - delta b' - b delta', and the pieces of l_L.
    """
    no_crossed = [None] * len(Z)
    Zt = [Zk @ Lk for Zk, Lk in zip(Z, relative)]

    def system_at(u):
        eta = _penalised(family, y, f, Z, codes, relative, unknowns, u, **blocks)[1]
        mu = family.mean(eta)
        w = np.maximum(family.weights(mu), _MIN_WEIGHT)
        s = np.sqrt(w)
        system, _, logdet = solve_local(
            codes=codes, Z=[s[:, None] * Zk for Zk in Z], n_levels=n_levels,
            r=s * (eta - f) + (y - mu) / s, relative=relative, crossed_position=no_crossed,
            offsets=np.zeros(len(Z) + 1, dtype=np.int64))
        return system, logdet, mu, w

    # the numbering of the unknowns, as solve_local makes it (it does not depend on the weights)
    layout, numbered = _local_layout(codes, [Zk.shape[1] for Zk in Z], n_levels,
                                     list(range(len(Z))))
    unknowns = [numbered[k] for k in range(len(Z))]
    n_blocks = len(layout.start)
    n_local = int(layout.start[-1] + layout.size[-1]) if n_blocks else 0
    unknown_block = np.repeat(np.arange(n_blocks), layout.size)
    blocks = dict(row_block=codes[0], unknown_block=unknown_block, n_blocks=n_blocks)
    u = np.zeros(n_local) if u_start is None else u_start.copy()
    # Newton's method block by block (the blocks are independent given f): each stops, and
    # halves its step, on its own penalised log-likelihood, so its mode is the same bits
    # whatever other blocks share its partition
    objective = _penalised(family, y, f, Z, codes, relative, unknowns, u, **blocks)[0]
    moving = np.ones(n_blocks, dtype=bool)
    for _ in range(_MAX_NEWTON_STEPS):
        system, logdet, mu, w = system_at(u)
        step = np.where(moving[unknown_block], system.u0 - u, 0.0)
        candidate = objective
        for _ in range(_MAX_HALVINGS):  # the penalised log-likelihood is concave: halve to rise
            candidate = _penalised(family, y, f, Z, codes, relative, unknowns, u + step,
                                   **blocks)[0]
            falling = candidate < objective
            if not falling.any():
                break
            step[falling[unknown_block]] *= 0.5
        size = np.zeros(n_blocks)
        np.maximum.at(size, unknown_block, np.abs(step))
        u, objective = u + step, np.maximum(candidate, objective)
        moving &= size > _MODE_TOLERANCE
        if not moving.any():
            break
    system, logdet, mu, w = system_at(u)  # M and w at the mode
    _, m_inverse, _, _ = finish_local(system)
    u_factors = [u[k] for k in unknowns]

    # v_i = z_i' H^-1 z_i over every factor's unknowns of row i (one block of A^-1)
    v = np.zeros(len(y))
    row_unknowns = [unknowns_k[codes_k] for unknowns_k, codes_k in zip(unknowns, codes)]
    for k, (rows_k, Zt_k) in enumerate(zip(row_unknowns, Zt)):
        for j, (rows_j, Zt_j) in enumerate(zip(row_unknowns, Zt)):
            for a in range(Zt_k.shape[1]):
                for c in range(Zt_j.shape[1]):
                    v += Zt_k[:, a] * Zt_j[:, c] * system.a_inverse.entries(rows_k[:, a],
                                                                            rows_j[:, c])
    slope = family.weight_slope(mu) * v
    a_u = np.zeros(n_local)
    for rows_k, Zt_k in zip(row_unknowns, Zt):
        for a in range(Zt_k.shape[1]):
            a_u += np.bincount(rows_k[:, a], slope * Zt_k[:, a], n_local)
    delta_u = 0.5 * system.a_inverse.apply(a_u)

    b, b_cov, cov_sums, delta_b = [], [], [], []
    for uk, mk, Lk, unknowns_k in zip(u_factors, m_inverse, relative, unknowns):
        bk, covk, cov_sum, _ = factor_moments(uk, mk, Lk, 1.0)
        dk = delta_u[unknowns_k] @ Lk.T
        b.append(bk), b_cov.append(covk), delta_b.append(dk)
        cov_sums.append(cov_sum - dk.T @ bk - bk.T @ dk)
    eta = f + random_effects_offset(Z, b, codes)
    target = (f + (y - mu - 0.5 * slope) / w + random_effects_offset(Z, delta_b, codes))
    sums = EMSums(
        n_rows=float(len(y)), residual_ss=0.0, residual_correction=0.0, quadratic=0.0,
        logdet=logdet, n_levels=[float(len(bk)) for bk in b],
        bbt=[bk.T @ bk for bk in b], conditional_cov=cov_sums,
        design_gram=[Zk.T @ Zk for Zk in Z],
        log_density=float(family.log_density(y, eta).sum()), penalty=float(u @ u))
    return LaplaceStep(u=u, target=target, weights=w, f=f), b, b_cov, sums


def update_laplace_components(sums: EMSums, factors) -> tuple[list, float, float]:
    """The driver's update of every D_k from the blocks' Laplace sums.

    Returns
    -------
    D : list of ndarray of shape (q_k, q_k)
        Positive semi-definite (eigenvalues below zero, which the correction can give far from
        the optimum, are set to zero).
    gll : float
        -2 l_L at the E-step's D (what the loop's stopping rule watches).
    log_likelihood : float
        l_L.
    """
    new_D = []
    for factor, n_levels, bbt, cov in zip(factors, sums.n_levels, sums.bbt,
                                          sums.conditional_cov):
        D = np.where(factor.mask, (bbt + cov) / n_levels, 0.0)
        values, vectors = np.linalg.eigh(0.5 * (D + D.T))
        new_D.append((vectors * np.clip(values, 0.0, None)) @ vectors.T)
    log_likelihood = sums.log_density - 0.5 * (sums.penalty + sums.logdet)
    return new_D, -2.0 * log_likelihood, float(log_likelihood)
