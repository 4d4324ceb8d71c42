"""Joint BLUPs of several random-effects factors from one partition's rows, and the EM updates.

The residual after the fixed effects, r = y - f(X), is modelled as r = sum_k Z_k b_k + e with
b_k,l ~ N(0, D_k) for every level l of factor k and e ~ N(0, sigma2 I). As in lme4, the random
effects are written b_k,l = L_k u_k,l with L_k L_k' = D_k / sigma2 (:func:`relative_factor`), so
u ~ N(0, sigma2 I) and, with Zt = Z L (each factor's columns times its L_k) and M = Zt'Zt + I,

    E[u | r] = M^-1 Zt'r,      Var(u | r) = sigma2 M^-1,
    E[e'e | r] = |r - Z b|^2 + sigma2 (Q - tr M^-1)      (Q: number of random effects),

which stays valid when some D_k is singular (a boundary fit). The EM update of D_k needs only the
diagonal blocks of M^-1 at its levels, and sigma2 needs only tr M^-1.

Where the factors' levels live
------------------------------
Rows are partitioned by the first factor (the partition factor): every one of its levels has all
its rows in one partition. A factor nested in it (each level inside one level of the partition
factor) is just as local. The other factors are crossed: their levels span partitions, and their
unknowns (the global ones, G) are shared. Ordering the local unknowns (L) first,

    M = [[A, B], [B', E]],   A block-diagonal, one block per level of the partition factor,

and one EM E-step is:

1. in every partition (:func:`solve_local`): A's blocks inverted (q x q, or an arrow-shaped block
   with the nested levels: exact block elimination), F = A^-1 B, u0 = A^-1 Zt_L'r, and the
   partition's share of the Schur complement S = I + sum_p (E_p - B_p'F_p) and of its right-hand
   side t = sum_p (Zt_G'r - B_p'u0) (:class:`CrossedShare`, summed like any partial sums);
2. on the driver (:mod:`merf_dask.core.crossed_solve`): u_G = S^-1 t, and S^-1 where the
   crossed unknowns are few (dense); at scale by conjugate gradients whose products S x are one
   more pass over the partitions, with stochastic estimates of the traces the M-step needs;
3. in every partition again (:func:`finish_local`): u_L = u0 - F u_G, and the diagonal blocks of
   M^-1 at local levels, A^-1 + F S^-1 F'.

With no crossed factor, step 1 is the whole E-step. The dense path is exact: the EM reaches the
maximum-likelihood estimates whatever the design. Every sum over levels of the partition factor
that feeds the crossed system is exact (:class:`~merf_dask.core.exact_sum.ExactSum`), so the
system is the same bits on any partitioning.

Classes and functions
---------------------
RandomFactor
    One grouping factor: its name, Z columns and the blocks of its covariance that are free.
FactorEffects
    The fitted random effects of one factor: levels, b, Var(b | y), D.
relative_factor
    L with L L' = D / sigma2.
CrossedRows, LocalSystem, CrossedShare, solve_local, schur_terms, finish_local
    The E-step above (the driver's step is :mod:`merf_dask.core.crossed_solve`).
EMSums, combine_sums, update_variance_components
    The partial sums that travel, and the driver's M-step for sigma2 and every D_k.
probe_sum, factor_moments, partition_sums, crossed_effects, crossed_offsets
    From u-space results to b, Var(b | y) and the sums.
variance_components
    The components in the layout of lme4's ``as.data.frame(VarCorr(m))``.
random_effects_offset
    sum_k Z_k b_k at every row (working response, prediction).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .exact_sum import ExactSum

__all__ = ["RandomFactor", "FactorEffects", "relative_factor", "LocalSystem", "CrossedShare",
           "solve_local", "finish_local", "factor_moments", "partition_sums",
           "crossed_effects", "crossed_offsets", "EMSums", "combine_sums",
           "update_variance_components", "variance_components", "random_effects_offset",
           "CrossedRows", "probe_sum", "schur_terms"]

#: Rows of F S^-1 handled at a time when the conditional covariances are finished (bounds the
#: dense block to this many rows times the crossed unknowns).
_FINISH_CHUNK = 2048


@dataclass(frozen=True)
class RandomFactor:
    """One grouping factor of the model, without data.

    Attributes
    ----------
    name : str
        As lme4 prints it (``"g"``, ``"a:b"``).
    z_names : tuple of str
        Names of its Z columns (``"(Intercept)"``, slopes).
    blocks : tuple of tuple of int
        The terms of this factor: each is a set of Z columns whose covariance is estimated;
        columns of different terms are uncorrelated (``(1 | g) + (0 + t | g)``).
    """

    name: str
    z_names: tuple[str, ...]
    blocks: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        if not self.blocks:
            object.__setattr__(self, "blocks", (tuple(range(len(self.z_names))),))

    @property
    def q(self) -> int:
        """Number of Z columns."""
        return len(self.z_names)

    @property
    def mask(self) -> np.ndarray:
        """(q, q) bool: the entries of D that are estimated (the others are 0)."""
        mask = np.zeros((self.q, self.q), dtype=bool)
        for block in self.blocks:
            mask[np.ix_(block, block)] = True
        return mask


@dataclass
class FactorEffects:
    """The random effects of one factor.

    Attributes
    ----------
    factor : RandomFactor
    levels : pandas.Index of length n_levels
    b : ndarray of shape (n_levels, q)
        Conditional means (BLUPs).
    b_cov : ndarray of shape (n_levels, q, q)
        Conditional covariances Var(b_l | y).
    D : ndarray of shape (q, q)
    """

    factor: RandomFactor
    levels: pd.Index
    b: np.ndarray
    b_cov: np.ndarray
    D: np.ndarray


def relative_factor(D: np.ndarray, sigma2: float) -> np.ndarray:
    """A square root L of D / sigma2 (L L' = D / sigma2), also for a singular D.

    Parameters
    ----------
    D : ndarray of shape (q, q), symmetric positive semi-definite
    sigma2 : float

    Returns
    -------
    ndarray of shape (q, q)
    """
    values, vectors = np.linalg.eigh(0.5 * (D + D.T) / sigma2)
    return vectors * np.sqrt(np.clip(values, 0.0, None))


@dataclass
class EMSums:
    """Partial sums of one or more partitions; all a partition sends to the driver.

    Per-factor entries are lists in the model's factor order; a crossed factor's entries are
    filled on the driver (a partition does not own its levels).

    Attributes
    ----------
    n_rows : float
    residual_ss : float
        |r - sum_k Z_k b_k|^2.
    residual_correction : float
        sigma2 (Q - tr M^-1) over the unknowns summed: the EM correction of the sigma2 update.
    quadratic : float
        r'r - u'Zt'r, so that the log-likelihood of r is -(N log(2 pi sigma2) + log|M| +
        quadratic / sigma2) / 2.
    logdet : float
        log|M| contributions (log|A| of each partition, log|S| on the driver).
    n_levels : list of float
    bbt : list of ndarray of shape (q_k, q_k)
        Sum of b b' over the factor's levels.
    conditional_cov : list of ndarray of shape (q_k, q_k)
        Sum of Var(b | y) over the factor's levels.
    design_gram : list of ndarray of shape (q_k, q_k)
        Z_k'Z_k over all rows: a direction it does not see is one the data cannot inform D_k in.
    n_in_sample : float
        Rows whose prediction of f was in-sample because no honest member served them.
    log_density, penalty : float
        Binary and count fits (:mod:`merf_dask.core.laplace`): sum of log p(y | eta) and u'u
        at the mode.
    """

    n_rows: float
    residual_ss: float
    residual_correction: float
    quadratic: float
    logdet: float
    n_levels: list
    bbt: list
    conditional_cov: list
    design_gram: list
    n_in_sample: float = 0.0
    log_density: float = 0.0
    penalty: float = 0.0

    def __add__(self, other: "EMSums") -> "EMSums":
        def add(a, b):
            return [x + y for x, y in zip(a, b)] if isinstance(a, list) else a + b
        return EMSums(**{name: add(getattr(self, name), getattr(other, name))
                         for name in self.__dataclass_fields__})


def combine_sums(*sums: EMSums) -> EMSums:
    """The sum of any number of partial sums (a tree reduction's combine)."""
    total = sums[0]
    for more in sums[1:]:
        total = total + more
    return total


def _pair_sums(codes_i, Zi, codes_j, Zj, n_j):
    """For every (level of i, level of j) pair that shares a row: sum of Zi[:, a] Zj[:, c].

    Returns ``(levels_i, levels_j, values)`` with values of shape (n_pairs, q_i, q_j).
    """
    key = codes_i.astype(np.int64) * n_j + codes_j
    pairs, inverse = np.unique(key, return_inverse=True)
    values = np.empty((len(pairs), Zi.shape[1], Zj.shape[1]))
    for a in range(Zi.shape[1]):
        for c in range(Zj.shape[1]):
            values[:, a, c] = np.bincount(inverse, Zi[:, a] * Zj[:, c], len(pairs))
    return pairs // n_j, pairs % n_j, values


def _grams(factors, codes, Zt, n_levels):
    """Zt_i'Zt_j for every pair i <= j of ``factors`` at the level pairs that share a row:
    yields ``(i, j, levels_i, levels_j, values)`` (values of shape (n_pairs, q_i, q_j))."""
    for position, i in enumerate(factors):
        for j in factors[position:]:
            if i == j:
                levels = np.arange(n_levels[i])
                yield i, j, levels, levels, _level_gram(codes[i], Zt[i], n_levels[i])
            else:
                yield i, j, *_pair_sums(codes[i], Zt[i], codes[j], Zt[j], n_levels[j])


def _level_gram(codes, Zt, n_levels):
    """Zt_l'Zt_l for every level: (n_levels, q, q), by q(q+1)/2 bincounts."""
    q = Zt.shape[1]
    gram = np.empty((n_levels, q, q))
    for a in range(q):
        for c in range(a, q):
            gram[:, a, c] = gram[:, c, a] = np.bincount(codes, Zt[:, a] * Zt[:, c], n_levels)
    return gram


def _level_sums(codes, Zt, r, n_levels):
    """Zt_l'r for every level: (n_levels, q)."""
    return np.column_stack([np.bincount(codes, Zt[:, a] * r, n_levels)
                            for a in range(Zt.shape[1])]).reshape(n_levels, Zt.shape[1])


@dataclass
class _Blocks:
    """A block-diagonal matrix over the local unknowns, its blocks grouped by size.

    ``start[j]`` is the first unknown of block j; blocks of size s are stored together in
    ``dense[s]`` (shape (n_s, s, s)) in the order ``members[s]`` (block numbers).
    """

    start: np.ndarray
    size: np.ndarray
    members: dict = field(default_factory=dict)
    dense: dict = field(default_factory=dict)

    def unknowns(self, s: int) -> np.ndarray:
        """(n_s, s) the unknowns of the blocks of size s."""
        return self.start[self.members[s]][:, None] + np.arange(s)

    def apply(self, vector: np.ndarray) -> np.ndarray:
        """The block-diagonal matrix times ``vector`` (shape (n_unknowns,))."""
        out = np.empty_like(vector)
        for s, blocks in self.dense.items():
            index = self.unknowns(s)
            out[index] = np.einsum("kij,kj->ki", blocks, vector[index])
        return out

    def sparse(self) -> sp.csr_matrix:
        """As a scipy sparse matrix."""
        rows, cols, values = [], [], []
        for s, blocks in self.dense.items():
            index = self.unknowns(s)
            rows.append(np.repeat(index, s, axis=1).ravel())
            cols.append(np.tile(index, (1, s)).ravel())
            values.append(blocks.ravel())
        n = int(self.start[-1] + self.size[-1]) if len(self.size) else 0
        return sp.csr_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
                             shape=(n, n))

    def entries(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Values at (rows[i], cols[i]), each pair inside one block."""
        block = np.searchsorted(self.start, rows, side="right") - 1
        out = np.empty(len(rows))
        for s, members in self.members.items():
            position = np.full(len(self.start), -1)
            position[members] = np.arange(len(members))
            take = position[block] >= 0
            out[take] = self.dense[s][position[block[take]], rows[take] - self.start[block[take]],
                                      cols[take] - self.start[block[take]]]
        return out


@dataclass
class CrossedRows:
    """What a partition keeps of its coupling to the crossed unknowns, for products with its
    share of S and for sums that do not depend on the partitioning.

    Attributes
    ----------
    coupling : scipy.sparse.csr_matrix of shape (n_local, P)
        F = A^-1 B (columns sorted).
    cross_gram : tuple of ndarray (rows, cols, values)
        B = Zt_L'Zt_G as coordinates: one entry per (local unknown, crossed unknown) pair that
        shares a row, each summed over the rows of one level of the partition factor.
    row_unknowns : ndarray of shape (n_rows, Q_G), int
        Each row's crossed unknowns (every crossed factor's columns side by side).
    row_values : ndarray of shape (n_rows, Q_G)
        Zt_G at each row and those unknowns.
    cell_gram : scipy.sparse.csr_matrix of shape (n_cells, P) or None
        E_p by cells: a cell is one level of the partition factor and one crossed unknown j
        (the same in any partitioning); its row holds the sums over that level's rows of
        Zt_j Zt_j' at every crossed unknown j'. Only where S is solved iteratively (its
        products use the cells); None otherwise, as the next two.
    cell_coupling : scipy.sparse.csr_matrix of shape (n_cells, n_local) or None
        B_p' by cells: B_ij at (cell of i's level and j, i).
    cell_unknown : ndarray of shape (n_cells,), int, or None
        The crossed unknown of each cell.
    """

    coupling: sp.csr_matrix
    cross_gram: tuple
    row_unknowns: np.ndarray
    row_values: np.ndarray
    cell_gram: sp.csr_matrix | None = None
    cell_coupling: sp.csr_matrix | None = None
    cell_unknown: np.ndarray | None = None


@dataclass
class LocalSystem:
    """What the first pass over a partition leaves for the second (kept where it was made).

    Attributes
    ----------
    unknowns : list of ndarray or None
        Per factor, (n_levels, q) the local unknowns of its levels; None for a crossed factor.
    a_inverse : _Blocks
        A^-1.
    crossed : CrossedRows or None
        None with no crossed factor.
    u0 : ndarray of shape (n_local,)
        A^-1 Zt_L'r.
    rhs : ndarray of shape (n_local,)
        Zt_L'r.
    q : list of int
        Z columns of every factor.
    """

    unknowns: list
    a_inverse: _Blocks
    crossed: CrossedRows | None
    u0: np.ndarray
    rhs: np.ndarray
    q: list

    @property
    def coupling(self) -> sp.csr_matrix | None:
        """F = A^-1 B, or None."""
        return None if self.crossed is None else self.crossed.coupling


@dataclass
class CrossedShare:
    """One or more partitions' share of the crossed factors' system, summed exactly: the sums
    are the same bits however the levels of the partition factor are split into partitions.

    Attributes
    ----------
    rhs : ExactSum of shape (P,)
        Zt_G'r.
    reduced_rhs : ExactSum of shape (P,)
        Zt_G'r - B'u0.
    diagonal : list of (ExactSum of shape (n_levels_k, q_k, q_k) or None) or None
        The blocks of that sum at each crossed level (None for local factors), when S is
        solved iteratively (they precondition it).
    term_bound : float
        A bound on every term of S_p (and on |term| / max|x| over the terms of the products
        S_p x) in every partition; the maximum is exact
        (:mod:`merf_dask.core.crossed_solve` sums those terms on a grid set by it).
    """

    rhs: ExactSum
    reduced_rhs: ExactSum
    diagonal: list | None = None
    term_bound: float = 0.0

    def __add__(self, other: "CrossedShare") -> "CrossedShare":
        def add(a, b):
            return None if a is None else a + b
        diagonal = None if self.diagonal is None else [
            add(a, b) for a, b in zip(self.diagonal, other.diagonal)]
        return CrossedShare(rhs=self.rhs + other.rhs,
                            reduced_rhs=self.reduced_rhs + other.reduced_rhs, diagonal=diagonal,
                            term_bound=max(self.term_bound, other.term_bound))


def crossed_offsets(factors, crossed_levels) -> np.ndarray:
    """First crossed unknown of each factor (and the total P last); local factors take none.

    Parameters
    ----------
    factors : sequence of RandomFactor
    crossed_levels : sequence of (pandas.Index or None)
        The level table of each crossed factor, None for local factors.

    Returns
    -------
    ndarray of shape (n_factors + 1,), int
    """
    sizes = [0 if levels is None else len(levels) * factor.q
             for factor, levels in zip(factors, crossed_levels)]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def solve_local(*, codes, Z, n_levels, r, relative, crossed_position, offsets, dense=True
                ) -> tuple[LocalSystem, CrossedShare | None, float]:
    """The first pass of the E-step over one partition.

    Parameters
    ----------
    codes : list of ndarray of shape (n_rows,), int
        Per factor, each row's level among the partition's levels of that factor.
    Z : list of ndarray of shape (n_rows, q_k)
    n_levels : list of int
        The partition's number of levels of each factor.
    r : ndarray of shape (n_rows,)
        Residuals after the fixed effects.
    relative : list of ndarray of shape (q_k, q_k)
        :func:`relative_factor` of each factor.
    crossed_position : list of (ndarray or None)
        Per crossed factor, the position of each of the partition's levels in the factor's
        level table; None for the partition factor and the factors nested in it.
    offsets : ndarray
        :func:`crossed_offsets`.
    dense : bool, default=True
        Whether S is solved densely (its terms are summed in a later pass,
        :func:`schur_terms`) or iteratively (the share carries S's blocks at each crossed
        level, its preconditioner).

    Returns
    -------
    system : LocalSystem
    share : CrossedShare or None
        None when there is no crossed factor.
    logdet : float
        log|A|.
    """
    local = [k for k, position in enumerate(crossed_position) if position is None]
    crossed = [k for k, position in enumerate(crossed_position) if position is not None]
    Zt = [np.ascontiguousarray(Zk @ Lk) for Zk, Lk in zip(Z, relative)]
    blocks, unknowns = _local_layout(codes, [Zt[k].shape[1] for k in range(len(Z))], n_levels,
                                     local)

    # A = Zt_L'Zt_L + I, block by block
    for i, j, levels_i, levels_j, values in _grams(local, codes, Zt, n_levels):
        _scatter(blocks, unknowns[i][levels_i], unknowns[j][levels_j], values)
    logdet = 0.0
    for s, block in blocks.dense.items():
        block += np.eye(s)
        sign, logdets = np.linalg.slogdet(block)
        logdet += float(logdets.sum())
        blocks.dense[s] = np.linalg.inv(block)

    n_local = int(blocks.start[-1] + blocks.size[-1]) if len(blocks.size) else 0
    rhs = np.zeros(n_local)
    for k in local:
        rhs[unknowns[k].ravel()] = _level_sums(codes[k], Zt[k], r, n_levels[k]).ravel()
    u0 = blocks.apply(rhs)
    system = LocalSystem(unknowns=[unknowns[k] if k in local else None for k in range(len(Z))],
                         a_inverse=blocks, crossed=None, u0=u0, rhs=rhs,
                         q=[Zk.shape[1] for Zk in Z])
    if not crossed:
        return system, None, logdet

    P = int(offsets[-1])
    crossed_unknowns = {k: _crossed_unknowns(offsets[k], Zt[k].shape[1], crossed_position[k])
                        for k in crossed}
    b_rows, b_cols, b_values = [], [], []
    for i in local:
        for j in crossed:
            levels_i, levels_j, values = _pair_sums(codes[i], Zt[i], codes[j], Zt[j], n_levels[j])
            rows, cols = _pair_index(unknowns[i][levels_i], crossed_unknowns[j][levels_j])
            b_rows.append(rows), b_cols.append(cols), b_values.append(values.ravel())
    B = sp.csr_matrix((np.concatenate(b_values), (np.concatenate(b_rows),
                                                  np.concatenate(b_cols))), shape=(n_local, P))
    B.sort_indices()
    F = (blocks.sparse() @ B).tocsr()
    # columns in the crossed tables' order, so F u_G adds in the same order on any partitioning
    F.sort_indices()
    B_coo = B.tocoo()
    row_unknowns = np.hstack([crossed_unknowns[k][codes[k]] for k in crossed])
    row_values = np.hstack([Zt[k] for k in crossed])
    system.crossed = CrossedRows(coupling=F, cross_gram=(B_coo.row, B_coo.col, B_coo.data),
                                 row_unknowns=row_unknowns, row_values=row_values)
    if not dense:
        _add_cells(system.crossed, block_of_row=codes[local[0]],
                   block_of_unknown=np.repeat(np.arange(len(blocks.start)), blocks.size), P=P)

    # every sum over levels of the partition factor is exact, term by term: a term is one
    # row's or one (local unknown, crossed unknown) pair's, the same in any partitioning
    row_terms = row_values * r[:, None]
    crossed_rhs = ExactSum.of_terms(row_unknowns.ravel(), row_terms.ravel(), (P,))
    reduced_rhs = ExactSum.of_terms(
        np.concatenate([row_unknowns.ravel(), B_coo.col]),
        np.concatenate([row_terms.ravel(), -B_coo.data * u0[B_coo.row]]), (P,))
    share = CrossedShare(rhs=crossed_rhs, reduced_rhs=reduced_rhs,
                         term_bound=_term_bound(system.crossed))
    if not dense:
        first_column = np.cumsum([0] + [Zt[k].shape[1] for k in crossed])
        share.diagonal = [None] * len(Z)
        for k, start_column in zip(crossed, first_column):
            q = Zt[k].shape[1]
            share.diagonal[k] = _diagonal_terms(
                system.crossed, offset=int(offsets[k]), q=q,
                n_table=int((offsets[k + 1] - offsets[k]) // q),
                columns=slice(int(start_column), int(start_column) + q))
    return system, share, logdet


def _add_cells(rows: CrossedRows, *, block_of_row, block_of_unknown, P) -> None:
    """Sum ``rows``' E_p and B_p' by cells, each sum over one level's rows or unknowns in their
    order (the same in any partitioning)."""
    b_rows, b_cols, b_values = rows.cross_gram
    row_unknowns, row_values = rows.row_unknowns, rows.row_values
    n_rows, width = row_unknowns.shape
    cell_keys = np.concatenate([(np.repeat(block_of_row, width) * P + row_unknowns.ravel()),
                                block_of_unknown[b_rows] * P + b_cols])
    keys, cell = np.unique(cell_keys, return_inverse=True)
    row_cell, b_cell = cell[:n_rows * width].reshape(n_rows, width), cell[n_rows * width:]
    # E by cells: every (a, c) pair of a row's unknowns, summed per (cell of a, unknown c)
    a, c = np.meshgrid(np.arange(width), np.arange(width), indexing="ij")
    pair_keys = (row_cell[:, a.ravel()] * P + row_unknowns[:, c.ravel()]).ravel()
    pair_values = (row_values[:, a.ravel()] * row_values[:, c.ravel()]).ravel()
    entries, entry = np.unique(pair_keys, return_inverse=True)
    rows.cell_gram = sp.csr_matrix((np.bincount(entry, pair_values, len(entries)),
                                    (entries // P, entries % P)), shape=(len(keys), P))
    rows.cell_coupling = sp.csr_matrix((b_values, (b_cell, b_rows)),
                                       shape=(len(keys), rows.coupling.shape[0]))
    rows.cell_unknown = keys % P


def _term_bound(rows: CrossedRows) -> float:
    """A bound on every term of S_p (|Zt_a Zt_c| of a row, |B_ij F_ij'|) and, with cells, on
    max|x|^-1 times every cell's entry of S_p x."""
    row_norm = np.asarray(abs(rows.coupling).sum(axis=1)).ravel()
    terms = [np.abs(rows.row_values).max(axis=1) ** 2,
             np.abs(rows.cross_gram[2]) * row_norm[rows.cross_gram[0]]]
    if rows.cell_gram is not None:
        terms.append(np.asarray(abs(rows.cell_gram).sum(axis=1)).ravel()
                     + abs(rows.cell_coupling) @ row_norm)
    return float(max((t.max() for t in terms if len(t)), default=0.0))


def schur_terms(rows: CrossedRows, P: int) -> tuple[np.ndarray, np.ndarray]:
    """The terms of E_p - B_p'F_p on and above the diagonal: one per row and pair of its
    crossed unknowns, one per B entry (i, j) and F entry (i, j') of its row (-B_ij F_ij').

    Returns
    -------
    index : ndarray of shape (n_terms,), int
        Flat index j * P + j' (j <= j').
    values : ndarray of shape (n_terms,)
    """
    ru, rv = rows.row_unknowns, rows.row_values
    a, c = np.triu_indices(ru.shape[1])
    first, second = np.minimum(ru[:, a], ru[:, c]), np.maximum(ru[:, a], ru[:, c])
    gram_index, gram_values = (first * P + second).ravel(), (rv[:, a] * rv[:, c]).ravel()
    b_rows, b_cols, b_values = rows.cross_gram
    F = rows.coupling
    # each B entry (i, j) meets the F entries (i, j') of its row with j' >= j: F's entries
    # from the first at or after column j (rows and columns sorted) to the row's end
    f_rows = np.repeat(np.arange(F.shape[0]), np.diff(F.indptr))
    first = np.searchsorted(f_rows * P + F.indices, b_rows * P + b_cols)
    count = F.indptr[b_rows + 1] - first
    b_entry = np.repeat(np.arange(len(b_rows)), count)
    f_entry = np.arange(count.sum()) + np.repeat(first - np.cumsum(count) + count, count)
    index = np.concatenate([gram_index, b_cols[b_entry] * P + F.indices[f_entry]])
    values = np.concatenate([gram_values, -b_values[b_entry] * F.data[f_entry]])
    return index, values


def _diagonal_terms(rows: CrossedRows, *, offset: int, q: int, n_table: int, columns: slice
                    ) -> ExactSum:
    """The blocks of E_p - B_p'F_p at one crossed factor's levels (its unknowns from
    ``offset``, its ``columns`` of the rows' crossed unknowns), as exact sums of terms."""
    ru, rv = rows.row_unknowns[:, columns], rows.row_values[:, columns]
    level = (ru[:, 0] - offset) // q
    B = sp.csr_matrix((rows.cross_gram[2], rows.cross_gram[:2]), shape=rows.coupling.shape)
    first = offset + np.arange(n_table) * q
    index, values = [], []
    for a in range(q):
        for c in range(q):
            index.append((level * q + a) * q + c)
            values.append(rv[:, a] * rv[:, c])
            pairs = B[:, first + a].multiply(rows.coupling[:, first + c]).tocoo()
            index.append((pairs.col * q + a) * q + c)
            values.append(-pairs.data)
    return ExactSum.of_terms(np.concatenate(index), np.concatenate(values), (n_table, q, q))


def _crossed_unknowns(offset: int, q: int, position: np.ndarray) -> np.ndarray:
    """(n_levels, q) the crossed unknowns of a factor's levels at ``position`` in its table."""
    return offset + position[:, None] * q + np.arange(q)


def _pair_index(rows_unknowns, cols_unknowns):
    """Row and column index of every entry of pairs of (q_i,)- and (q_j,)-unknown levels."""
    q_i, q_j = rows_unknowns.shape[1], cols_unknowns.shape[1]
    rows = np.repeat(rows_unknowns[:, :, None], q_j, axis=2).ravel()
    cols = np.repeat(cols_unknowns[:, None, :], q_i, axis=1).ravel()
    return rows, cols


def _scatter(blocks: _Blocks, rows_unknowns, cols_unknowns, values):
    """Write the (q_i, q_j) values of level pairs into A's blocks (and their transposes)."""
    rows, cols = _pair_index(rows_unknowns, cols_unknowns)
    block = np.searchsorted(blocks.start, rows, side="right") - 1
    flat = values.ravel()
    for s, members in blocks.members.items():
        position = np.full(len(blocks.start), -1)
        position[members] = np.arange(len(members))
        take = position[block] >= 0
        where = position[block[take]]
        r = rows[take] - blocks.start[block[take]]
        c = cols[take] - blocks.start[block[take]]
        blocks.dense[s][where, r, c] = flat[take]
        blocks.dense[s][where, c, r] = flat[take]


def _local_layout(codes, q, n_levels, local):
    """Number the local unknowns block by block (one block per level of the partition factor).

    A nested factor's level joins the block of the partition-factor level it lies in, after
    that level's own unknowns.

    Returns the (empty) :class:`_Blocks` and, per local factor, the (n_levels, q) unknowns.
    """
    outer = local[0]
    n_outer = n_levels[outer]
    parents, counts = {}, {}
    for k in local[1:]:
        parent = np.zeros(n_levels[k], dtype=np.int64)
        parent[codes[k]] = codes[outer]
        if not np.array_equal(parent[codes[k]], codes[outer]):
            raise ValueError("a factor treated as nested has a level in two levels of the "
                             "partition factor")
        parents[k] = parent
        counts[k] = np.bincount(parent, minlength=n_outer)
    size = q[outer] + sum(q[k] * counts[k] for k in local[1:]) * np.ones(n_outer, dtype=np.int64)
    start = np.concatenate([[0], np.cumsum(size)[:-1]]).astype(np.int64)
    unknowns = {outer: start[:, None] + np.arange(q[outer])}
    filled = np.full(n_outer, q[outer], dtype=np.int64)
    for k in local[1:]:
        order = np.argsort(parents[k], kind="stable")
        first_of_parent = np.concatenate([[0], np.cumsum(counts[k])[:-1]])
        rank = np.empty(n_levels[k], dtype=np.int64)
        rank[order] = np.arange(n_levels[k]) - first_of_parent[parents[k][order]]
        base = start[parents[k]] + filled[parents[k]] + rank * q[k]
        unknowns[k] = base[:, None] + np.arange(q[k])
        filled += q[k] * counts[k]
    blocks = _Blocks(start=start, size=size)
    for s in np.unique(size):
        members = np.flatnonzero(size == s)
        blocks.members[int(s)] = members
        blocks.dense[int(s)] = np.zeros((len(members), int(s), int(s)))
    return blocks, unknowns


def finish_local(system: LocalSystem, *, solution=None, crossed_position=None, offsets=None):
    """The second pass: local unknowns and the diagonal blocks of M^-1 at local levels.

    Parameters
    ----------
    system : LocalSystem
    solution : CrossedSolution, optional
        The crossed unknowns (:mod:`merf_dask.core.crossed_solve`); None when there is no
        crossed factor.
    crossed_position, offsets
        As for :func:`solve_local` (to read the crossed unknowns of the partition's levels).

    Returns
    -------
    u : list of (ndarray of shape (n_levels, q) or None)
        Per factor: E[u | r] at the partition's levels (crossed factors included, read from
        the solution).
    m_inverse : list of (ndarray of shape (n_levels, q, q) or None)
        Per local factor, the diagonal blocks of M^-1 (block-Jacobi in the coupling when the
        solve was iterative); None for crossed factors.
    stochastic : list of (ndarray of shape (q, q) or None)
        Per local factor, the stochastic rest of the sum of those blocks over its levels (None
        when exact).
    quadratic : float
        u_L'Zt_L'r.
    """
    u_local = system.u0
    F = system.coupling
    if solution is not None:
        u_local = u_local - F @ solution.u
        iterative = solution.inverse is None
        if iterative:
            coupled_difference = F @ solution.probe_difference
            coupled_dual = F @ solution.probe_dual
    u, m_inverse, stochastic = [], [], []
    for k, unknowns in enumerate(system.unknowns):
        if unknowns is None:
            u.append(solution.u[_crossed_unknowns(offsets[k], system.q[k],
                                                  crossed_position[k])])
            m_inverse.append(None), stochastic.append(None)
            continue
        u.append(u_local[unknowns])
        n, q = unknowns.shape
        blocks = np.empty((n, q, q))
        for a in range(q):
            for c in range(q):
                blocks[:, a, c] = system.a_inverse.entries(unknowns[:, a], unknowns[:, c])
        rest = None
        if solution is not None:
            blocks += _coupled_blocks(F, solution.block_inverse_matrix if iterative
                                      else solution.inverse, unknowns)
            if iterative:
                rest = probe_sum(coupled_difference[unknowns], coupled_dual[unknowns])
        m_inverse.append(blocks), stochastic.append(rest)
    return u, m_inverse, stochastic, float(u_local @ system.rhs)


def _coupled_blocks(F: sp.csr_matrix, S_inv, unknowns: np.ndarray) -> np.ndarray:
    """The (q, q) diagonal blocks of F S^-1 F' at each level's unknowns, a chunk at a time
    (``S_inv`` dense, or sparse block-diagonal)."""
    n, q = unknowns.shape
    out = np.empty((n, q, q))
    for start in range(0, n, _FINISH_CHUNK):
        chunk = unknowns[start:start + _FINISH_CHUNK]
        rows = [F[chunk[:, a]] for a in range(q)]
        projected = [row @ S_inv for row in rows]
        for a in range(q):
            for c in range(q):
                out[start:start + len(chunk), a, c] = np.asarray(
                    rows[c].multiply(projected[a]).sum(axis=1)).ravel()
    return out


def probe_sum(difference: np.ndarray, dual: np.ndarray) -> np.ndarray:
    """sum over levels of the probes' mean of (x - y)_l y_l', symmetrised.

    Parameters
    ----------
    difference, dual : ndarray of shape (n_levels, q, n_probes)

    Returns
    -------
    ndarray of shape (q, q)
    """
    total = np.einsum("lam,lcm->ac", difference, dual) / difference.shape[2]
    return 0.5 * (total + total.T)


def factor_moments(u: np.ndarray, m_inverse: np.ndarray, relative: np.ndarray, sigma2: float,
                   stochastic: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """b, Var(b | y), their sum and the sigma2 correction of one factor's levels, from u-space
    results.

    Parameters
    ----------
    u : ndarray of shape (n_levels, q)
    m_inverse : ndarray of shape (n_levels, q, q)
        The levels' diagonal blocks of M^-1 (as reported).
    relative : ndarray of shape (q, q)
    sigma2 : float
    stochastic : ndarray of shape (q, q), optional
        What the sum of the blocks over the levels lacks (an iterative solve's estimate).

    Returns
    -------
    b : ndarray of shape (n_levels, q)
    b_cov : ndarray of shape (n_levels, q, q)
    cov_sum : ndarray of shape (q, q)
        The sum of Var(b | y) over the levels that the M-step uses.
    correction : float
        sigma2 (n_levels q - sum tr M^-1_l).
    """
    b = u @ relative.T
    b_cov = sigma2 * np.einsum("ij,kjl,ml->kim", relative, m_inverse, relative)
    b_cov = 0.5 * (b_cov + np.swapaxes(b_cov, 1, 2))  # exactly symmetric, as it is stored
    cov_sum = b_cov.sum(axis=0)
    trace = float(np.einsum("kii->", m_inverse))
    if stochastic is not None:
        cov_sum = cov_sum + sigma2 * relative @ stochastic @ relative.T
        trace += float(np.trace(stochastic))
    return b, b_cov, cov_sum, sigma2 * (u.size - trace)


def partition_sums(*, codes, Z, r, b, cov_sums, corrections, quadratic, logdet
                   ) -> EMSums:
    """One partition's :class:`EMSums` from its levels' random effects.

    Parameters
    ----------
    codes, Z : list of ndarray
        As for :func:`solve_local`.
    r : ndarray of shape (n_rows,)
    b : list of ndarray of shape (n_levels_k, q_k)
        Every factor's b at the partition's levels (crossed factors included).
    cov_sums : list of (ndarray of shape (q_k, q_k) or None)
        Each local factor's sum of Var(b | y) over its levels (:func:`factor_moments`); None
        for crossed factors (their sums are the driver's).
    corrections : float
        The local factors' sigma2 corrections (:func:`factor_moments`).
    quadratic : float
        r'r - u_L'Zt_L'r.
    logdet : float
        log|A|.

    Returns
    -------
    EMSums
    """
    residual = r - random_effects_offset(Z, b, codes)
    zero = [np.zeros((Zk.shape[1], Zk.shape[1])) for Zk in Z]
    return EMSums(
        n_rows=float(len(r)), residual_ss=float(residual @ residual),
        residual_correction=corrections, quadratic=float(r @ r) - quadratic, logdet=logdet,
        n_levels=[0.0 if cov is None else float(len(bk)) for bk, cov in zip(b, cov_sums)],
        bbt=[z if cov is None else bk.T @ bk for z, bk, cov in zip(zero, b, cov_sums)],
        conditional_cov=[z if cov is None else cov for z, cov in zip(zero, cov_sums)],
        design_gram=[Zk.T @ Zk for Zk in Z])


def crossed_effects(solution, *, q, offsets, crossed_levels, relative, sigma2
                    ) -> tuple[dict, EMSums]:
    """The crossed factors' b and Var(b | y), and their entries of the sums (driver side).

    Parameters
    ----------
    solution : CrossedSolution
    q : list of int
    offsets : ndarray
    crossed_levels : list of (pandas.Index or None)
    relative : list of ndarray
    sigma2 : float

    Returns
    -------
    effects : dict
        Factor index -> (b, b_cov) over its whole level table.
    sums : EMSums
        Its per-factor entries, sigma2 correction, log|S| and quadratic form (rows and
        residuals are the partitions').
    """
    effects = {}
    zero = [np.zeros((qk, qk)) for qk in q]
    sums = EMSums(n_rows=0.0, residual_ss=0.0, residual_correction=0.0,
                  quadratic=-solution.quadratic, logdet=solution.logdet,
                  n_levels=[0.0] * len(q), bbt=list(zero), conditional_cov=list(zero),
                  design_gram=list(zero))
    for k, levels in enumerate(crossed_levels):
        if levels is None:
            continue
        index = _crossed_unknowns(offsets[k], q[k], np.arange(len(levels)))
        m_inverse, stochastic = solution.level_blocks(index, k)
        b, b_cov, cov_sum, correction = factor_moments(solution.u[index], m_inverse,
                                                       relative[k], sigma2, stochastic)
        effects[k] = (b, b_cov)
        sums.n_levels[k] = float(len(levels))
        sums.bbt[k], sums.conditional_cov[k] = b.T @ b, cov_sum
        sums.residual_correction += correction
    return effects, sums


def update_variance_components(sums: EMSums, factors, *, sigma2: float
                               ) -> tuple[float, list[np.ndarray], float, float]:
    """The driver's M-step: new sigma2 and D_k, the GLL and the log-likelihood.

    Parameters
    ----------
    sums : EMSums
        Over every partition, with the crossed factors' entries added.
    factors : sequence of RandomFactor
    sigma2 : float
        The residual variance the E-step used.

    Returns
    -------
    sigma2 : float
        (|r - Z b|^2 + sigma2 (Q - tr M^-1)) / N.
    D : list of ndarray of shape (q_k, q_k)
        (sum b b' + Var(b | y)) / n_levels, on the factor's free blocks.
    gll : float
        sum e'e / sigma2 + sum_k,l b'D_k^-1 b + n_levels_k log|D_k| + N log sigma2 at the new
        values (Hajjem et al.'s generalised log-likelihood); ``inf`` when some D_k is singular.
    log_likelihood : float
        The marginal log-likelihood of r at the E-step's sigma2 and D.
    """
    new_sigma2 = (sums.residual_ss + sums.residual_correction) / sums.n_rows
    gll = sums.residual_ss / new_sigma2 + sums.n_rows * np.log(new_sigma2)
    new_D = []
    for factor, n_levels, bbt, cov in zip(factors, sums.n_levels, sums.bbt,
                                          sums.conditional_cov):
        D = np.where(factor.mask, (bbt + cov) / n_levels, 0.0)
        D = 0.5 * (D + D.T)
        new_D.append(D)
        sign, logdet = np.linalg.slogdet(D)
        gll = np.inf if sign <= 0 else gll + float(np.trace(np.linalg.solve(D, bbt))) \
            + n_levels * logdet
    log_likelihood = -0.5 * (sums.n_rows * np.log(2 * np.pi * sigma2) + sums.logdet
                             + sums.quadratic / sigma2)
    return float(new_sigma2), new_D, float(gll), float(log_likelihood)


def variance_components(effects, sigma2: float | None) -> pd.DataFrame:
    """The variance components in the layout of lme4's ``as.data.frame(VarCorr(m))``.

    One row per variance (``var2`` missing) and then per covariance of every term, terms in
    model order; a factor's second and later terms are named ``g.1``, ``g.2`` as lme4 names
    them; the ``Residual`` row last (left out when ``sigma2`` is None).

    Parameters
    ----------
    effects : sequence of FactorEffects
    sigma2 : float or None

    Returns
    -------
    pandas.DataFrame
        Columns ``grp``, ``var1``, ``var2``, ``vcov``, ``sdcor``.
    """
    rows = []
    for e in effects:
        for t, block in enumerate(e.factor.blocks):
            group = e.factor.name if t == 0 else f"{e.factor.name}.{t}"
            sd = np.sqrt(np.clip(np.diag(e.D), 0.0, None))
            for a in block:
                rows.append((group, e.factor.z_names[a], None, e.D[a, a], sd[a]))
            for i, a in enumerate(block):
                for c in block[i + 1:]:
                    scale = sd[a] * sd[c]
                    rows.append((group, e.factor.z_names[a], e.factor.z_names[c], e.D[a, c],
                                 e.D[a, c] / scale if scale > 0 else np.nan))
    if sigma2 is not None:
        rows.append(("Residual", None, None, sigma2, np.sqrt(sigma2)))
    frame = pd.DataFrame(rows, columns=["grp", "var1", "var2", "vcov", "sdcor"])
    return frame.astype({"grp": object, "var1": object, "var2": object, "vcov": float,
                         "sdcor": float})


def random_effects_offset(Z, b, codes) -> np.ndarray:
    """sum_k Z_k b_k at every row; a row's unknown level (code -1) of a factor contributes 0.

    Parameters
    ----------
    Z : list of ndarray of shape (n_samples, q_k)
    b : list of ndarray of shape (n_levels_k, q_k)
    codes : list of ndarray of shape (n_samples,), int
        Index into ``b[k]``, or -1 for a level not seen in training.

    Returns
    -------
    ndarray of shape (n_samples,)
    """
    offset = np.zeros(len(codes[0]) if codes else 0)
    for Zk, bk, ck in zip(Z, b, codes):
        known = ck >= 0
        if known.all():  # every training row: no masked copies
            offset += np.einsum("nq,nq->n", Zk, bk[ck]) if Zk.shape[1] > 1 else Zk[:, 0] * bk[ck, 0]
        else:
            offset[known] += np.einsum("nq,nq->n", Zk[known], bk[ck[known]])
    return offset
