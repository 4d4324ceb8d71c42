"""The pure numerical core of MERF's EM: one partition in, small arrays out.

Everything here is numpy on one block of rows whose clusters are all present in the block (a
partition, or all the data in-process). Nothing here knows about Dask.

With r_i = y_i - f(X_i) the residual of cluster i after the fixed effects, the E-step and the
variance updates of Hajjem, Bellavance & Larocque (2014) need only the per-cluster sufficient
statistics (n_i, Z_i'Z_i, Z_i'r_i, r_i'r_i). By the Woodbury identity, with
W_i = sigma2 I_q + Z_i'Z_i D::

    b_i          = D W_i^-1 Z_i'r_i                       (BLUP of the random effects)
    Var(b_i|y_i) = sigma2 D W_i^-1 = D - D Z_i'V_i^-1 Z_i D
    sigma2 (n_i - sigma2 tr V_i^-1) = tr(Var(b_i|y_i) Z_i'Z_i)
    e_i'e_i      = r_i'r_i - 2 b_i'Z_i'r_i + b_i'Z_i'Z_i b_i

so no n_i x n_i matrix is ever formed and every solve is q x q, batched over clusters (no
Python loop over clusters). The form with W_i stays valid when D is singular (a boundary fit).

Functions and classes
---------------------
cluster_statistics
    Per-cluster sufficient statistics of one block, by ``np.bincount``.
random_effects_step
    The E-step for every cluster of a block: b_i, Var(b_i | y_i), and the block's partial sums.
EMSums
    The partial sums that travel: a few scalars and q x q matrices; ``+`` combines two blocks.
update_variance_components
    The driver's combine: new sigma2, D and the generalised log-likelihood (GLL).
random_effects_offset
    Z_i b_i for every row (used for the working response and for prediction).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

__all__ = [
    "ClusterStatistics",
    "EMSums",
    "cluster_statistics",
    "random_effects_step",
    "update_variance_components",
    "random_effects_offset",
]


@dataclass(frozen=True)
class ClusterStatistics:
    """Sufficient statistics of the clusters of one block.

    Attributes
    ----------
    n : ndarray of shape (n_clusters,)
        Rows per cluster.
    ztz : ndarray of shape (n_clusters, q, q)
        Z_i'Z_i.
    ztr : ndarray of shape (n_clusters, q)
        Z_i'r_i.
    rtr : ndarray of shape (n_clusters,)
        r_i'r_i.
    """

    n: np.ndarray
    ztz: np.ndarray
    ztr: np.ndarray
    rtr: np.ndarray


def cluster_statistics(codes: np.ndarray, Z: np.ndarray, r: np.ndarray, *,
                       n_clusters: int) -> ClusterStatistics:
    """Per-cluster sufficient statistics, O(n q^2) with one ``bincount`` per entry.

    Parameters
    ----------
    codes : ndarray of shape (n_samples,), int
        Cluster of every row, in ``[0, n_clusters)``.
    Z : ndarray of shape (n_samples, q)
        Random-effects design.
    r : ndarray of shape (n_samples,)
        Residuals after the fixed effects.
    n_clusters : int

    Returns
    -------
    ClusterStatistics
    """
    q = Z.shape[1]
    ztz = np.empty((n_clusters, q, q))
    for a in range(q):  # q(q+1)/2 weighted bincounts; q is small (intercept and a few slopes)
        for c in range(a, q):
            ztz[:, a, c] = ztz[:, c, a] = np.bincount(codes, Z[:, a] * Z[:, c], n_clusters)
    ztr = np.column_stack([np.bincount(codes, Z[:, a] * r, n_clusters) for a in range(q)])
    return ClusterStatistics(
        n=np.bincount(codes, minlength=n_clusters).astype(float),
        ztz=ztz,
        ztr=ztr.reshape(n_clusters, q),
        rtr=np.bincount(codes, r * r, n_clusters),
    )


@dataclass(frozen=True)
class EMSums:
    """Partial sums of one or more blocks; all a block sends to the driver.

    Attributes
    ----------
    n_rows : float
        N, the number of rows.
    n_clusters : float
        The number of clusters.
    residual_ss : float
        Sum over clusters of e_i'e_i with e_i = y_i - f(X_i) - Z_i b_i.
    residual_correction : float
        Sum of sigma2 (n_i - sigma2 tr V_i^-1), the EM correction of the sigma2 update.
    bbt : ndarray of shape (q, q)
        Sum of b_i b_i'.
    conditional_cov : ndarray of shape (q, q)
        Sum of Var(b_i | y_i).
    design_gram : ndarray of shape (q, q)
        Z'Z over all rows: a direction it does not see is one the data cannot inform D in.
    n_in_sample : float, default=0
        Rows whose prediction of f was in-sample because no honest member served them.
    """

    n_rows: float
    n_clusters: float
    residual_ss: float
    residual_correction: float
    bbt: np.ndarray
    conditional_cov: np.ndarray
    design_gram: np.ndarray
    n_in_sample: float = 0.0

    def __add__(self, other: "EMSums") -> "EMSums":
        return EMSums(**{field.name: getattr(self, field.name) + getattr(other, field.name)
                         for field in fields(self)})


def random_effects_step(stats: ClusterStatistics, *, sigma2: float, D: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, EMSums]:
    """E-step for every cluster of a block, from its sufficient statistics.

    Parameters
    ----------
    stats : ClusterStatistics
        Statistics of residuals r = y - f(X) with the current fixed effects.
    sigma2 : float
        Residual variance of the previous iteration.
    D : ndarray of shape (q, q)
        Random-effects covariance of the previous iteration.

    Returns
    -------
    b : ndarray of shape (n_clusters, q)
        BLUPs of the random effects.
    b_cov : ndarray of shape (n_clusters, q, q)
        Conditional covariances Var(b_i | y_i).
    sums : EMSums
        The block's partial sums for the variance updates and the GLL.
    """
    q = D.shape[0]
    W = sigma2 * np.eye(q) + stats.ztz @ D                           # (K, q, q)
    W_inv_ztr = np.linalg.solve(W, stats.ztr[..., None])[..., 0]      # (K, q)
    b = W_inv_ztr @ D.T                                               # D W^-1 Z'r, row-wise
    # Var(b|y) = sigma2 D W^-1; W^-1 through its transpose so D stays on the left
    b_cov = sigma2 * np.swapaxes(np.linalg.solve(np.swapaxes(W, 1, 2), np.broadcast_to(D, W.shape)), 1, 2)
    b_cov = 0.5 * (b_cov + np.swapaxes(b_cov, 1, 2))
    bZtr = np.einsum("kq,kq->k", b, stats.ztr)
    bZtZb = np.einsum("kp,kpq,kq->k", b, stats.ztz, b)
    sums = EMSums(
        n_rows=float(stats.n.sum()),
        n_clusters=float(len(stats.n)),
        residual_ss=float(np.sum(stats.rtr - 2.0 * bZtr + bZtZb)),
        residual_correction=float(np.einsum("kpq,kqp->", b_cov, stats.ztz)),
        bbt=b.T @ b,
        conditional_cov=b_cov.sum(axis=0),
        design_gram=stats.ztz.sum(axis=0),
    )
    return b, b_cov, sums


def update_variance_components(sums: EMSums) -> tuple[float, np.ndarray, float]:
    """Combine the partial sums of all blocks into the new variance components and the GLL.

    Parameters
    ----------
    sums : EMSums
        Sums over every block (they carry the previous sigma2 and D through the E-step).

    Returns
    -------
    sigma2 : float
        (sum e_i'e_i + sigma2 (n_i - sigma2 tr V_i^-1)) / N.
    D : ndarray of shape (q, q)
        (sum b_i b_i' + Var(b_i | y_i)) / n_clusters.
    gll : float
        sum_i e_i'e_i / sigma2 + b_i'D^-1 b_i + log|D| + n_i log sigma2 at the new sigma2 and D;
        ``inf`` when D is singular.
    """
    new_sigma2 = (sums.residual_ss + sums.residual_correction) / sums.n_rows
    new_D = (sums.bbt + sums.conditional_cov) / sums.n_clusters
    new_D = 0.5 * (new_D + new_D.T)
    sign, logdet = np.linalg.slogdet(new_D)
    if sign <= 0:
        gll = np.inf
    else:
        gll = (sums.residual_ss / new_sigma2
               + float(np.trace(np.linalg.solve(new_D, sums.bbt)))
               + sums.n_clusters * logdet
               + sums.n_rows * np.log(new_sigma2))
    return float(new_sigma2), new_D, float(gll)


def random_effects_offset(Z: np.ndarray, b: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Z_i b_i for every row; rows with code -1 (clusters not seen in training) get 0.

    Parameters
    ----------
    Z : ndarray of shape (n_samples, q)
    b : ndarray of shape (n_clusters, q)
    codes : ndarray of shape (n_samples,), int
        Index into ``b``, or -1 for an unknown cluster.

    Returns
    -------
    ndarray of shape (n_samples,)
    """
    known = codes >= 0
    offset = np.zeros(len(codes))
    offset[known] = np.einsum("nq,nq->n", Z[known], b[codes[known]])
    return offset
