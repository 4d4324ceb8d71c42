"""The vectorised sufficient-statistics E-step against a naive dense implementation.

The reference below is written from the paper's formulas with n_i x n_i matrices, one cluster at
a time, exactly as merf 1.0 and the authors' R code compute it.
"""

import numpy as np
import pytest

from merf_dask.core.statistics import (cluster_statistics, random_effects_offset, random_effects_step,
                             update_variance_components)


def naive_em_step(codes, Z, r, sigma2, D):
    """Dense per-cluster E-step and variance updates (Hajjem et al. 2014, with tr(V^-1))."""
    K, q = codes.max() + 1, Z.shape[1]
    b = np.zeros((K, q))
    sigma2_sum, D_sum, residual_ss, bbt = 0.0, np.zeros((q, q)), 0.0, np.zeros((q, q))
    for i in range(K):
        rows = codes == i
        Zi, ri, ni = Z[rows], r[rows], rows.sum()
        Vi = Zi @ D @ Zi.T + sigma2 * np.eye(ni)
        Vi_inv = np.linalg.inv(Vi)
        b[i] = D @ Zi.T @ Vi_inv @ ri
        eps = ri - Zi @ b[i]
        residual_ss += eps @ eps
        sigma2_sum += eps @ eps + sigma2 * (ni - sigma2 * np.trace(Vi_inv))
        D_sum += np.outer(b[i], b[i]) + D - D @ Zi.T @ Vi_inv @ Zi @ D
        bbt += np.outer(b[i], b[i])
    N = len(r)
    new_sigma2, new_D = sigma2_sum / N, D_sum / K
    gll = 0.0
    for i in range(K):
        rows = codes == i
        eps = r[rows] - Z[rows] @ b[i]
        Ri = new_sigma2 * np.eye(rows.sum())
        gll += (eps @ np.linalg.inv(Ri) @ eps + b[i] @ np.linalg.inv(new_D) @ b[i]
                + np.linalg.slogdet(new_D)[1] + np.linalg.slogdet(Ri)[1])
    return b, new_sigma2, new_D, gll, residual_ss


@pytest.mark.parametrize("q", [1, 2, 3])
def test_vectorised_step_equals_dense_reference(q):
    rng = np.random.default_rng(q)
    sizes = np.concatenate([[1, 1, 2], rng.integers(1, 60, 40)])  # uneven, with 1-row clusters
    codes = np.repeat(np.arange(len(sizes)), sizes)
    Z = np.column_stack([np.ones(len(codes)), rng.standard_normal((len(codes), q - 1))])
    r = rng.standard_normal(len(codes)) * 2
    A = rng.standard_normal((q, q))
    D = A @ A.T + 0.5 * np.eye(q)
    sigma2 = 0.7

    b_ref, sigma2_ref, D_ref, gll_ref, rss_ref = naive_em_step(codes, Z, r, sigma2, D)
    stats = cluster_statistics(codes, Z, r, n_clusters=len(sizes))
    b, b_cov, sums = random_effects_step(stats, sigma2=sigma2, D=D)
    new_sigma2, new_D, gll = update_variance_components(sums)

    np.testing.assert_allclose(b, b_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(sums.residual_ss, rss_ref, rtol=1e-10)
    np.testing.assert_allclose(new_sigma2, sigma2_ref, rtol=1e-10)
    np.testing.assert_allclose(new_D, D_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gll, gll_ref, rtol=1e-10)
    # Var(b_i | y_i) = D - D Z'V^-1 Z D for a multi-row cluster
    rows = codes == 5
    Zi = Z[rows]
    Vi_inv = np.linalg.inv(Zi @ D @ Zi.T + sigma2 * np.eye(rows.sum()))
    np.testing.assert_allclose(b_cov[5], D - D @ Zi.T @ Vi_inv @ Zi @ D, rtol=1e-10, atol=1e-12)


def test_blocks_sum_to_the_whole():
    """Partial sums of disjoint blocks of clusters add up to the sums over all clusters."""
    rng = np.random.default_rng(7)
    codes = np.repeat(np.arange(30), rng.integers(1, 20, 30))
    Z = np.column_stack([np.ones(len(codes)), rng.standard_normal(len(codes))])
    r = rng.standard_normal(len(codes))
    D = np.array([[1.0, 0.2], [0.2, 0.4]])
    whole = random_effects_step(cluster_statistics(codes, Z, r, n_clusters=30), sigma2=1.3, D=D)[2]
    first = codes < 12
    parts = [random_effects_step(cluster_statistics(codes[m] - codes[m].min(), Z[m], r[m],
                                                    n_clusters=len(np.unique(codes[m]))),
                                 sigma2=1.3, D=D)[2] for m in (first, ~first)]
    total = parts[0] + parts[1]
    assert total.n_rows == whole.n_rows and total.n_clusters == whole.n_clusters
    np.testing.assert_allclose(total.residual_ss, whole.residual_ss, rtol=1e-12)
    np.testing.assert_allclose(total.bbt, whole.bbt, rtol=1e-12)
    np.testing.assert_allclose(total.conditional_cov, whole.conditional_cov, rtol=1e-12)


def test_singular_D_is_a_valid_boundary():
    """With D = 0 the random effects are 0 and sigma2 is the mean squared residual."""
    rng = np.random.default_rng(3)
    codes = np.repeat(np.arange(10), 5)
    Z = np.ones((50, 1))
    r = rng.standard_normal(50)
    b, b_cov, sums = random_effects_step(cluster_statistics(codes, Z, r, n_clusters=10),
                                         sigma2=1.0, D=np.zeros((1, 1)))
    assert np.all(b == 0) and np.all(b_cov == 0)
    sigma2, D, gll = update_variance_components(sums)
    np.testing.assert_allclose(sigma2, np.mean(r**2))
    assert gll == np.inf


def test_offset_is_zero_for_unknown_clusters():
    Z = np.array([[1.0, 2.0], [1.0, -1.0], [1.0, 0.5]])
    b = np.array([[0.5, 1.0], [2.0, 0.0]])
    np.testing.assert_allclose(random_effects_offset(Z, b, np.array([0, 1, -1])), [2.5, 2.0, 0.0])
