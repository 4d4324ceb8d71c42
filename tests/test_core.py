"""The E-step of :mod:`merf_dask.core.random_effects` against dense references written here.

The single-factor reference is written from the paper's formulas with n_i x n_i matrices, one
cluster at a time, as merf 1.0 and the authors' R code compute it; the several-factor reference
builds the whole marginal covariance V = sum_k Z_k (I kron D_k) Z_k' + sigma2 I.
"""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from merf_dask.core.crossed_solve import (DENSE_CROSSED_UNKNOWNS, _from_limbs, _grid,
                                          exact_products, exact_schur, solve_crossed,
                                          solve_iteratively)
from merf_dask.core.random_effects import (EMSums, RandomFactor, crossed_effects,
                                           crossed_offsets, factor_moments, finish_local,
                                           partition_sums, random_effects_offset,
                                           relative_factor, solve_local,
                                           update_variance_components, variance_components)


def e_step(codes, Z, r, D, sigma2, crossed_levels, dense=True):
    """The E-step of one block holding every row, glued as the EM loop glues it (the crossed
    unknowns solved densely, or iteratively)."""
    factors = [RandomFactor(f"f{k}", tuple(f"z{j}" for j in range(Zk.shape[1])))
               for k, Zk in enumerate(Z)]
    n_levels = [int(c.max()) + 1 for c in codes]
    relative = [relative_factor(Dk, sigma2) for Dk in D]
    offsets = crossed_offsets(factors, crossed_levels)
    positions = [None if table is None else np.arange(len(table)) for table in crossed_levels]
    system, share, logdet = solve_local(codes=codes, Z=Z, n_levels=n_levels, r=r,
                                        relative=relative, crossed_position=positions,
                                        offsets=offsets, dense=dense)
    solution = extra = None
    if share is not None and dense:
        solution = solve_crossed(share, exact_schur(system.crossed, int(offsets[-1]),
                                                    term_bound=share.term_bound))
    elif share is not None:
        solution = solve_iteratively(
            share, lambda X: exact_products(system.crossed, X, term_bound=share.term_bound),
            offsets=offsets)
    if share is not None:
        effects, extra = crossed_effects(solution, q=[f.q for f in factors], offsets=offsets,
                                         crossed_levels=crossed_levels, relative=relative,
                                         sigma2=sigma2)
    u, m_inverse, stochastic, quadratic = finish_local(system, solution=solution,
                                                       crossed_position=positions,
                                                       offsets=offsets)
    b, b_cov, cov_sums, corrections = [], [], [], 0.0
    for k, (uk, mk, rest) in enumerate(zip(u, m_inverse, stochastic)):
        if mk is None:
            b.append(uk @ relative[k].T), b_cov.append(None), cov_sums.append(None)
            continue
        bk, ck, cov_sum, correction = factor_moments(uk, mk, relative[k], sigma2, rest)
        b.append(bk), b_cov.append(ck), cov_sums.append(cov_sum)
        corrections += correction
    sums = partition_sums(codes=codes, Z=Z, r=r, b=b, cov_sums=cov_sums,
                          corrections=corrections, quadratic=quadratic, logdet=logdet)
    if extra is not None:
        sums = sums + extra
        for k, (bk, ck) in effects.items():
            b_cov[k] = ck
    return factors, b, b_cov, sums


def dense_reference(codes, Z, r, D, sigma2):
    """b, Var(b | r) blocks, the log-likelihood and the EM updates from the dense V."""
    n = len(r)
    designs, covariances = [], []
    for ck, Zk, Dk in zip(codes, Z, D):
        q, L = Zk.shape[1], int(ck.max()) + 1
        full = np.zeros((n, L * q))
        for a in range(q):
            full[np.arange(n), ck * q + a] = Zk[:, a]
        designs.append(full)
        covariances.append(np.kron(np.eye(L), Dk))
    Zf = np.hstack(designs)
    G = np.zeros((Zf.shape[1],) * 2)
    start = 0
    for Gk in covariances:
        G[start:start + len(Gk), start:start + len(Gk)] = Gk
        start += len(Gk)
    V = Zf @ G @ Zf.T + sigma2 * np.eye(n)
    V_inv = np.linalg.inv(V)
    b = G @ Zf.T @ V_inv @ r
    C = G - G @ Zf.T @ V_inv @ Zf @ G
    log_likelihood = -0.5 * (n * np.log(2 * np.pi) + np.linalg.slogdet(V)[1] + r @ V_inv @ r)
    e = r - Zf @ b
    new_sigma2 = (e @ e + np.trace(Zf.T @ Zf @ C)) / n
    per_factor, new_D, start = [], [], 0
    for ck, Zk in zip(codes, Z):
        q, L = Zk.shape[1], int(ck.max()) + 1
        bk = b[start:start + L * q].reshape(L, q)
        Ck = np.array([C[start + l * q:start + (l + 1) * q, start + l * q:start + (l + 1) * q]
                       for l in range(L)])
        per_factor.append((bk, Ck))
        new_D.append((bk.T @ bk + Ck.sum(axis=0)) / L)
        start += L * q
    return per_factor, log_likelihood, new_sigma2, new_D


def naive_em_step(codes, Z, r, sigma2, D):
    """Dense per-cluster E-step and variance updates (Hajjem et al. 2014, with tr(V^-1))."""
    K, q = codes.max() + 1, Z.shape[1]
    b = np.zeros((K, q))
    sigma2_sum, D_sum = 0.0, np.zeros((q, q))
    for i in range(K):
        rows = codes == i
        Zi, ri, ni = Z[rows], r[rows], rows.sum()
        Vi_inv = np.linalg.inv(Zi @ D @ Zi.T + sigma2 * np.eye(ni))
        b[i] = D @ Zi.T @ Vi_inv @ ri
        eps = ri - Zi @ b[i]
        sigma2_sum += eps @ eps + sigma2 * (ni - sigma2 * np.trace(Vi_inv))
        D_sum += np.outer(b[i], b[i]) + D - D @ Zi.T @ Vi_inv @ Zi @ D
    N = len(r)
    new_sigma2, new_D = sigma2_sum / N, D_sum / K
    gll = 0.0
    for i in range(K):
        rows = codes == i
        eps = r[rows] - Z[rows] @ b[i]
        gll += (eps @ eps / new_sigma2 + b[i] @ np.linalg.inv(new_D) @ b[i]
                + np.linalg.slogdet(new_D)[1] + rows.sum() * np.log(new_sigma2))
    return b, new_sigma2, new_D, gll


def random_covariance(rng, q):
    A = rng.standard_normal((q, q))
    return A @ A.T + 0.5 * np.eye(q)


@pytest.mark.parametrize("q", [1, 2, 3])
def test_one_factor_equals_the_papers_dense_step(q):
    rng = np.random.default_rng(q)
    sizes = np.concatenate([[1, 1, 2], rng.integers(1, 60, 40)])  # uneven, with 1-row clusters
    codes = np.repeat(np.arange(len(sizes)), sizes)
    Z = np.column_stack([np.ones(len(codes)), rng.standard_normal((len(codes), q - 1))])
    r = rng.standard_normal(len(codes)) * 2
    D, sigma2 = random_covariance(rng, q), 0.7

    b_ref, sigma2_ref, D_ref, gll_ref = naive_em_step(codes, Z, r, sigma2, D)
    factors, b, b_cov, sums = e_step([codes], [Z], r, [D], sigma2, [None])
    new_sigma2, new_D, gll, _ = update_variance_components(sums, factors, sigma2=sigma2)

    np.testing.assert_allclose(b[0], b_ref, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(new_sigma2, sigma2_ref, rtol=1e-10)
    np.testing.assert_allclose(new_D[0], D_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gll, gll_ref, rtol=1e-10)
    rows = codes == 5  # Var(b_i | y_i) = D - D Z'V^-1 Z D for a multi-row cluster
    Zi = Z[rows]
    Vi_inv = np.linalg.inv(Zi @ D @ Zi.T + sigma2 * np.eye(rows.sum()))
    np.testing.assert_allclose(b_cov[0][5], D - D @ Zi.T @ Vi_inv @ Zi @ D, rtol=1e-9,
                               atol=1e-12)


def nested_and_crossed(rng, n=500):
    """Partition factor g with a slope, a factor nested in g, a factor crossed with g."""
    g = rng.integers(0, 25, n)
    nested = pd.factorize(g * 4 + rng.integers(0, 4, n))[0]
    crossed = rng.integers(0, 9, n)
    Z = [np.column_stack([np.ones(n), rng.standard_normal(n)]), np.ones((n, 1)),
         np.column_stack([np.ones(n), rng.standard_normal(n)])]
    return [g, nested, crossed], Z, rng.standard_normal(n) * 1.5


def test_several_factors_equal_the_dense_marginal_model():
    rng = np.random.default_rng(11)
    codes, Z, r = nested_and_crossed(rng)
    D = [random_covariance(rng, 2), np.array([[0.6]]), np.diag([0.8, 0.3])]
    sigma2 = 0.9
    factors, b, b_cov, sums = e_step(codes, Z, r, D, sigma2,
                                     [None, None, pd.RangeIndex(9)])
    per_factor, log_likelihood, sigma2_ref, D_ref = dense_reference(codes, Z, r, D, sigma2)
    for k, (b_ref, C_ref) in enumerate(per_factor):
        np.testing.assert_allclose(b[k], b_ref, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(b_cov[k], C_ref, rtol=1e-8, atol=1e-10)
    new_sigma2, new_D, _, ll = update_variance_components(sums, factors, sigma2=sigma2)
    np.testing.assert_allclose(ll, log_likelihood, rtol=1e-10)
    np.testing.assert_allclose(new_sigma2, sigma2_ref, rtol=1e-9)
    for Dk, Dk_ref in zip(new_D, D_ref):
        np.testing.assert_allclose(Dk, Dk_ref, rtol=1e-8, atol=1e-12)


def test_a_crossed_factor_gives_the_same_answer_as_a_local_one():
    """Treating a nested factor as crossed (a shared table) changes nothing but the work."""
    rng = np.random.default_rng(2)
    codes, Z, r = nested_and_crossed(rng, n=300)
    D = [random_covariance(rng, 2), np.array([[0.6]]), random_covariance(rng, 2)]
    tables = [None, pd.RangeIndex(int(codes[1].max()) + 1), pd.RangeIndex(9)]
    _, b_local, cov_local, _ = e_step(codes, Z, r, D, 1.1, [None, None, tables[2]])
    _, b_shared, cov_shared, _ = e_step(codes, Z, r, D, 1.1, tables)
    for k in range(3):
        np.testing.assert_allclose(b_local[k], b_shared[k], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(cov_local[k], cov_shared[k], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dense", [True, False])
def test_blocks_sum_to_the_whole_bit_for_bit(dense):
    """The crossed system summed over any split of the partition factor's levels into blocks
    is the same bits as the whole's (and so are the products of the iterative solve)."""
    rng = np.random.default_rng(7)
    codes, Z, r = nested_and_crossed(rng, n=400)
    D = [random_covariance(rng, 2), np.array([[0.6]]), np.diag([0.8, 0.3])]
    factors = [RandomFactor(f"f{k}", tuple(f"z{j}" for j in range(Zk.shape[1])))
               for k, Zk in enumerate(Z)]
    crossed_levels = [None, None, pd.RangeIndex(9)]
    offsets = crossed_offsets(factors, crossed_levels)
    relative = [relative_factor(Dk, 1.3) for Dk in D]
    X = rng.standard_normal((int(offsets[-1]), 3))

    def share(rows):
        local = [pd.factorize(c[rows])[0] for c in codes[:2]]
        block_codes = [*local, pd.factorize(codes[2][rows], sort=True)[0]]
        position = np.unique(codes[2][rows])
        return solve_local(codes=block_codes, Z=[Zk[rows] for Zk in Z],
                           n_levels=[int(c.max()) + 1 for c in block_codes], r=r[rows],
                           relative=relative, crossed_position=[None, None, position],
                           offsets=offsets, dense=dense)

    def bits(values):
        return np.ascontiguousarray(values).view(np.int64)

    whole = share(np.ones(len(r), dtype=bool))
    P = int(offsets[-1])
    for n_blocks in (2, 3):
        block_of_level = rng.integers(0, n_blocks, codes[0].max() + 1)
        parts = [share(block_of_level[codes[0]] == block) for block in range(n_blocks)]
        total = parts[0][1]
        for part in parts[1:][::-1]:
            total = total + part[1]
        assert total.term_bound == whole[1].term_bound
        if dense:
            schur = [sum(limbs).toarray() for limbs in zip(*(
                exact_schur(part[0].crossed, P, term_bound=total.term_bound) for part in parts))]
            expected = exact_schur(whole[0].crossed, P, term_bound=total.term_bound)
            for limb, limb_expected in zip(schur, expected):
                assert np.array_equal(bits(limb), bits(limb_expected.toarray()))
        else:
            assert np.array_equal(bits(total.diagonal[2].to_dense()),
                                  bits(whole[1].diagonal[2].to_dense()))
        for name in ("rhs", "reduced_rhs"):
            assert np.array_equal(bits(getattr(total, name).to_dense()),
                                  bits(getattr(whole[1], name).to_dense()))
        if not dense:  # the iterative solve's products (only its shares sum by cells)
            products = [sum(limbs) for limbs in zip(*(
                exact_products(part[0].crossed, X, term_bound=total.term_bound)
                for part in parts))]
            expected = exact_products(whole[0].crossed, X, term_bound=total.term_bound)
            for limb, limb_expected in zip(products, expected):
                assert np.array_equal(bits(limb), bits(limb_expected))
        np.testing.assert_allclose(sum(part[2] for part in parts), whole[2], rtol=1e-12)
    # the sums are E_p - B_p'F_p and its products, against scipy's (float) algebra
    rows = whole[0].crossed
    B = sp.csr_matrix((rows.cross_gram[2], rows.cross_gram[:2]), shape=rows.coupling.shape)
    rows_design = sp.csr_matrix((rows.row_values.ravel(), (np.repeat(np.arange(len(r)),
                                 rows.row_unknowns.shape[1]), rows.row_unknowns.ravel())),
                                shape=(len(r), P))
    S_p = (rows_design.T @ rows_design - B.T @ rows.coupling).toarray()
    if not dense:
        np.testing.assert_allclose(_from_limbs(expected, _grid(whole[1].term_bound
                                                               * np.abs(X).max(axis=0))),
                                   S_p @ X, rtol=1e-10, atol=1e-12)
    else:
        upper = _from_limbs([limb.toarray() for limb in exact_schur(
            rows, P, term_bound=whole[1].term_bound)], _grid(whole[1].term_bound))
        np.testing.assert_allclose(upper, np.triu(S_p), rtol=1e-10, atol=1e-12)


def test_the_iterative_solve_is_exact_in_b_and_close_in_the_traces():
    """Beyond the dense limit: b as exact as conjugate gradients make it; the reported
    conditional covariances are block-Jacobi approximations (lower bounds at crossed levels);
    the M-step's sums and log|S| are stochastic estimates close to the exact ones."""
    rng = np.random.default_rng(5)
    n = 2500
    codes = [rng.integers(0, 250, n), rng.integers(0, 150, n)]
    Z = [np.column_stack([np.ones(n), rng.standard_normal(n)]), np.ones((n, 1))]
    r = rng.standard_normal(n) * 1.5
    D, sigma2 = [random_covariance(rng, 2), np.array([[0.5]])], 0.9
    crossed_levels = [None, pd.RangeIndex(150)]
    factors, b, b_cov, sums = e_step(codes, Z, r, D, sigma2, crossed_levels, dense=False)
    per_factor, log_likelihood, sigma2_ref, D_ref = dense_reference(codes, Z, r, D, sigma2)
    for k, (b_ref, C_ref) in enumerate(per_factor):
        np.testing.assert_allclose(b[k], b_ref, rtol=1e-6, atol=1e-8)
        gap = C_ref - b_cov[k]
        if crossed_levels[k] is not None:  # exact minus reported: positive semi-definite
            assert np.linalg.eigvalsh(gap).min() > -1e-10
        assert abs(np.trace(gap.sum(axis=0))) < 0.05 * np.trace(C_ref.sum(axis=0))
    # 150 crossed levels: a few probes average over few levels (measured 1e-2 on D, 2e-4 on
    # the log-likelihood); the errors shrink with the levels (next test)
    new_sigma2, new_D, _, ll = update_variance_components(sums, factors, sigma2=sigma2)
    np.testing.assert_allclose(ll, log_likelihood, rtol=5e-4)
    np.testing.assert_allclose(new_sigma2, sigma2_ref, rtol=1e-3)
    for Dk, Dk_ref in zip(new_D, D_ref):
        np.testing.assert_allclose(Dk, Dk_ref, rtol=3e-2, atol=1e-3)


def test_beyond_the_dense_limit_the_iterative_e_step_agrees_with_the_dense_one():
    """4,000 crossed levels (more than the dense limit): the iterative E-step's updates of
    sigma2 and D and its log-likelihood next to the dense solve's (measured: 3e-5 relative on
    the variances, 1e-5 on the log-likelihood)."""
    rng = np.random.default_rng(5)
    n, n_crossed = 20_000, 4_000
    assert n_crossed > DENSE_CROSSED_UNKNOWNS
    codes = [rng.integers(0, 2_000, n), rng.integers(0, n_crossed, n)]
    Z = [np.column_stack([np.ones(n), rng.standard_normal(n)]), np.ones((n, 1))]
    r = rng.standard_normal(n) * 1.5
    D, sigma2 = [random_covariance(rng, 2), np.array([[0.5]])], 0.9
    crossed_levels = [None, pd.RangeIndex(n_crossed)]
    results = {}
    for dense in (True, False):
        factors, b, b_cov, sums = e_step(codes, Z, r, D, sigma2, crossed_levels, dense=dense)
        results[dense] = b, update_variance_components(sums, factors, sigma2=sigma2)
    (b_dense, (sigma2_dense, D_dense, _, ll_dense)), (b_iter, (sigma2_iter, D_iter, _, ll_iter)) \
        = results[True], results[False]
    for bk_dense, bk_iter in zip(b_dense, b_iter):
        np.testing.assert_allclose(bk_iter, bk_dense, rtol=0, atol=1e-7)
    np.testing.assert_allclose(sigma2_iter, sigma2_dense, rtol=1e-4)
    np.testing.assert_allclose(ll_iter, ll_dense, rtol=1e-4)
    for Dk_iter, Dk_dense in zip(D_iter, D_dense):
        sd = np.sqrt(np.diag(Dk_dense))
        np.testing.assert_allclose(np.diag(Dk_iter), np.diag(Dk_dense), rtol=3e-4)
        np.testing.assert_allclose(Dk_iter / np.outer(sd, sd), Dk_dense / np.outer(sd, sd),
                                   atol=1e-4)


def test_singular_D_is_a_valid_boundary():
    """With D = 0 the random effects are 0 and sigma2 is the mean squared residual."""
    rng = np.random.default_rng(3)
    codes = np.repeat(np.arange(10), 5)
    r = rng.standard_normal(50)
    factors, b, b_cov, sums = e_step([codes], [np.ones((50, 1))], r, [np.zeros((1, 1))], 1.0,
                                     [None])
    assert np.all(b[0] == 0) and np.all(b_cov[0] == 0)
    sigma2, D, gll, _ = update_variance_components(sums, factors, sigma2=1.0)
    np.testing.assert_allclose(sigma2, np.mean(r**2))
    assert gll == np.inf


def test_a_factors_blocks_are_uncorrelated():
    """(1 | g) + (0 + t | g): the M-step leaves the covariance between the blocks at 0."""
    rng = np.random.default_rng(4)
    codes, Z, r = nested_and_crossed(rng)
    factor = RandomFactor("g", ("(Intercept)", "t"), blocks=((0,), (1,)))
    _, _, _, sums = e_step(codes[:1], Z[:1], r, [random_covariance(rng, 2)], 1.0, [None])
    _, (D,), _, _ = update_variance_components(sums, [factor], sigma2=1.0)
    assert D[0, 1] == D[1, 0] == 0 and D[0, 0] > 0 and D[1, 1] > 0


def test_offset_is_zero_for_unknown_levels():
    Z = [np.array([[1.0, 2.0], [1.0, -1.0], [1.0, 0.5]]), np.ones((3, 1))]
    b = [np.array([[0.5, 1.0], [2.0, 0.0]]), np.array([[10.0]])]
    codes = [np.array([0, 1, -1]), np.array([-1, 0, 0])]
    np.testing.assert_allclose(random_effects_offset(Z, b, codes), [2.5, 12.0, 10.0])


def test_variance_components_have_lmes_layout():
    from merf_dask.core.random_effects import FactorEffects
    slope = FactorEffects(RandomFactor("g", ("(Intercept)", "t")), pd.Index([1]),
                          np.zeros((1, 2)), np.zeros((1, 2, 2)),
                          np.array([[4.0, 1.0], [1.0, 1.0]]))
    split = FactorEffects(RandomFactor("h", ("(Intercept)", "u"), blocks=((0,), (1,))),
                          pd.Index([1]), np.zeros((1, 2)), np.zeros((1, 2, 2)),
                          np.diag([9.0, 0.25]))
    table = variance_components([slope, split], 2.0)
    assert list(table.columns) == ["grp", "var1", "var2", "vcov", "sdcor"]
    assert table["grp"].tolist() == ["g", "g", "g", "h", "h.1", "Residual"]
    assert table["var1"].tolist()[:5] == ["(Intercept)", "t", "(Intercept)", "(Intercept)", "u"]
    assert table["var2"].tolist()[2] == "t" and pd.isna(table["var2"].tolist()[0])
    np.testing.assert_allclose(table["vcov"], [4.0, 1.0, 1.0, 9.0, 0.25, 2.0])
    np.testing.assert_allclose(table["sdcor"], [2.0, 1.0, 0.5, 3.0, 0.5, np.sqrt(2.0)])


def test_sums_add_field_by_field():
    one = EMSums(n_rows=2.0, residual_ss=1.0, residual_correction=0.5, quadratic=3.0,
                 logdet=0.1, n_levels=[1.0, 0.0], bbt=[np.eye(1), np.zeros((2, 2))],
                 conditional_cov=[np.eye(1), np.eye(2)], design_gram=[np.eye(1), np.eye(2)])
    total = one + one
    assert total.n_rows == 4.0 and total.n_levels == [2.0, 0.0]
    np.testing.assert_array_equal(total.conditional_cov[1], 2 * np.eye(2))
