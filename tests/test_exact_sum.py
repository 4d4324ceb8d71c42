"""Order- and grouping-independent sums of :mod:`merf_dask.core.exact_sum`.

The references are ``math.fsum`` (correctly rounded) per entry, exact integer arithmetic on
dyadic terms, and IEEE addition of two floats (correctly rounded); reproducibility is checked
bit for bit over random partitionings, orders and merge trees.
"""

import math
import pickle
from fractions import Fraction
from itertools import permutations

import numpy as np
import pytest

import merf_dask.core.exact_sum as exact_sum
from merf_dask.core.exact_sum import ExactSum, exact_total

TINY = 2.0**-1074


def bits(x):
    return np.ascontiguousarray(x, dtype=np.float64).view(np.int64)


def same_bits(x, y):
    return np.asarray(x).shape == np.asarray(y).shape and np.array_equal(bits(x), bits(y))


def fsum_per_entry(index, values, size):
    """Correctly rounded sum of each entry's terms (0.0 where untouched)."""
    order = np.argsort(index, kind="stable")
    index, values = index[order], values[order]
    starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])
    out = np.zeros(size)
    for start, stop in zip(starts, np.r_[starts[1:], len(index)]):
        out[index[start]] = math.fsum(values[start:stop])
    return out


def ulps(x, reference):
    """|x - reference| in units of the last place of reference (of the smallest normal for 0)."""
    return np.abs(x - reference) / np.spacing(np.maximum(np.abs(reference), 2.0**-1022))


def normal_terms(rng, n):
    return rng.normal(size=n)


def wide_terms(rng, n):
    """Log-uniform magnitudes from 1e-300 to 1e300 with random signs."""
    return rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-300, 300, n)


def lognormal_terms(rng, n):
    return rng.choice([-1.0, 1.0], n) * rng.lognormal(0.0, 30.0, n)


def cancelling_terms(rng, n):
    """Pairs x, -x of large terms (up to 1e16) plus small normal ones: sums ~1e-16 of the terms."""
    big = rng.normal(size=n // 4) * 10.0 ** rng.uniform(10, 16, n // 4)
    small = rng.normal(size=n - 2 * (n // 4))
    return np.concatenate([big, -big, small])


GENERATORS = [normal_terms, wide_terms, lognormal_terms, cancelling_terms]


def random_partials(rng, index, values, shape):
    """The terms in a random order, cut into a random number of partitions (some empty)."""
    order = rng.permutation(len(index))
    n_parts = int(rng.integers(1, 12))
    cuts = np.sort(rng.integers(0, len(index) + 1, n_parts - 1))
    return [ExactSum.of_terms(index[part], values[part], shape)
            for part in np.split(order, cuts)]


def merge_randomly(rng, parts):
    """Adds the parts along a random binary tree, each operand on a random side."""
    parts = list(parts)
    while len(parts) > 1:
        i, j = rng.choice(len(parts), 2, replace=False)
        left, right = parts[i], parts[j]
        parts = [p for k, p in enumerate(parts) if k not in (i, j)] + [left + right]
    return parts[0]


def assert_same_state(a, b):
    assert a.shape == b.shape
    assert np.array_equal(a.index, b.index)
    assert np.array_equal(a.top, b.top)
    assert np.array_equal(a.bins, b.bins)


# ---------------------------------------------------------------------------------- reproducible


@pytest.mark.parametrize("generate", GENERATORS)
def test_bits_do_not_depend_on_partitioning_order_or_merge_tree(generate):
    rng = np.random.default_rng(GENERATORS.index(generate))
    n, size = 6000, 37
    index = rng.integers(0, size, n)
    values = generate(rng, n)
    reference = ExactSum.of_terms(index, values, (size,))
    expected = reference.to_dense()
    ordinary = set()
    for _ in range(15):
        parts = random_partials(rng, index, values, (size,))
        for total in (merge_randomly(rng, parts), exact_total(rng.permutation(parts)),
                      sum(parts)):
            assert same_bits(total.to_dense(), expected)
            assert_same_state(total, reference)
        sums = [np.bincount(index[o], weights=values[o], minlength=size)
                for o in np.array_split(rng.permutation(n), rng.integers(1, 6))]
        ordinary.add(np.sum(sums, axis=0).tobytes())
    # the data make ordinary float sums depend on the split, so the check above has teeth
    assert len(ordinary) > 2


def test_bits_agree_over_many_blocks_and_both_index_mappings():
    """More terms than one processing block; a huge shape (sorted mapping) and a small one
    (lookup table) give the same sums bit for bit."""
    rng = np.random.default_rng(5)
    n, size = 3 * exact_sum._BLOCK + 123, 500
    index = rng.integers(0, size, n)
    values = lognormal_terms(rng, n)
    small = ExactSum.of_terms(index, values, (size,))
    # the same entries spread over a (size, 10**7) grid: about 5e9 cells, far too many for a table
    big_shape = (size, 10**7)
    spread = index * 10**7 + 12345
    big = ExactSum.of_terms(spread, values, big_shape)
    assert np.array_equal(big.index, np.unique(spread))
    assert same_bits(big.to_coo()[1], small.to_coo()[1])
    parts = random_partials(rng, spread, values, big_shape)
    assert_same_state(merge_randomly(rng, parts), big)
    expected = fsum_per_entry(index, values, size)
    assert np.all(ulps(small.to_dense(), expected) <= 1)


def test_cancellation_is_exact_in_every_order_and_grouping():
    terms = [1e16, 1.0, -1e16]
    for order in permutations(terms):
        one = ExactSum.of_terms([0, 0, 0], list(order), 1)
        split = (ExactSum.of_terms([0], [order[0]], 1)
                 + (ExactSum.of_terms([0], [order[1]], 1) + ExactSum.of_terms([0], [order[2]], 1)))
        for total in (one, split):
            assert same_bits(total.to_dense(), [1.0])
    assert sum(terms) != 1.0  # what ordinary float addition gives


def test_dropped_low_bits_are_dropped_the_same_way_by_every_merge():
    """2**-30 fits under 2**60 alone but falls out of the window below 2**100: every grouping
    must drop it, including the ones that first add it to terms that keep it."""
    terms = [2.0**100, 2.0**-30, 2.0**60, -(2.0**100), 3 * 2.0**-30]
    results = set()
    rng = np.random.default_rng(0)
    for _ in range(60):
        singles = [ExactSum.of_terms([0], [t], 1) for t in rng.permutation(terms)]
        results.add(merge_randomly(rng, singles).to_dense().tobytes())
    assert results == {np.array([2.0**60]).tobytes()}
    # without the 2**100 pair the small terms are kept
    kept = exact_total([ExactSum.of_terms([0], [t], 1) for t in (2.0**-30, 2.0**60, 3 * 2.0**-30)])
    assert kept.to_dense()[0] == 2.0**60 + 2.0**-28


# ---------------------------------------------------------------------------------- accurate


@pytest.mark.parametrize("generate", [normal_terms, wide_terms, lognormal_terms])
def test_matches_fsum_within_one_ulp(generate):
    rng = np.random.default_rng(11)
    n, size = 20000, 300
    index = rng.integers(0, size, n)
    values = generate(rng, n)
    got = ExactSum.of_terms(index, values, (size,)).to_dense()
    expected = fsum_per_entry(index, values, size)
    largest = np.zeros(size)
    np.maximum.at(largest, index, np.abs(values))
    comparable = np.abs(expected) >= 2.0**-30 * largest
    assert comparable.mean() > 0.9
    assert np.all(ulps(got[comparable], expected[comparable]) <= 1)
    assert np.mean(got[comparable] == expected[comparable]) > 0.99


def test_error_is_within_the_truncation_bound_when_sums_cancel():
    rng = np.random.default_rng(12)
    n, size = 20000, 50
    index = rng.integers(0, size, n)
    values = cancelling_terms(rng, n)
    index = np.concatenate([index[: n // 4], index[: n // 4], index[2 * (n // 4):]])
    state = ExactSum.of_terms(index, values, (size,))
    got = state.to_dense()
    expected = fsum_per_entry(index, values, size)
    counts = np.bincount(index, minlength=size)
    # each term loses less than one unit of the lowest kept bin, top - 3
    unit = np.ldexp(1.0, 32 * (state.top.astype(int) - 3) - 1074)
    bound = counts * unit + np.spacing(np.abs(expected))
    assert np.all(np.abs(got - expected) <= bound)
    # the sums are ~1e-16 of the terms, where ordinary summation loses every digit
    ordinary = np.bincount(index, weights=values, minlength=size)
    assert np.median(np.abs(ordinary - expected) / np.abs(expected)) > 1e-3
    assert np.max(np.abs(got - expected) / np.abs(expected)) < 1e-10


def test_dyadic_terms_sum_exactly():
    """Integers times powers of two spanning 95 bits (under the guaranteed 96): exact state."""
    rng = np.random.default_rng(13)
    n = 5000
    numerators = rng.integers(-2**40, 2**40, n)
    exponents = rng.integers(-28, 28, n)  # bits from 2**-28 to 2**66: 95 bits
    values = np.ldexp(numerators.astype(np.float64), exponents)
    exact = sum(Fraction(int(m)) * Fraction(2) ** int(e) for m, e in zip(numerators, exponents))
    state = ExactSum.of_terms(np.zeros(n, int), values, 1)
    # the integer state holds the exact sum...
    held = sum(int(state.bins[0, s]) * Fraction(2) ** (32 * (int(state.top[0]) - s) - 1074)
               for s in range(exact_sum.N_BINS_KEPT))
    assert held == exact
    # ...and reads back correctly rounded, which ordinary summation is not
    got = state.to_dense()[0]
    assert got == float(exact) == math.fsum(values)
    assert sum(values) != got


def test_two_terms_give_the_ieee_sum():
    """IEEE addition of two floats is correctly rounded: the exact sum must agree."""
    rng = np.random.default_rng(14)
    x = lognormal_terms(rng, 20000)
    y = lognormal_terms(rng, 20000) * rng.choice([1.0, 1 + 2.0**-40], 20000)
    got = (ExactSum.of_array(x) + ExactSum.of_array(y)).to_dense()
    assert np.all(ulps(got, x + y) <= 1)
    assert np.mean(got == x + y) > 0.999


def test_many_terms_in_one_entry_stay_exact():
    """2**22 terms whose chunks are all ones: float64 accumulators of the chunks would round."""
    x = (2.0**53 - 1) * 2.0**-20  # 53 set bits across three 32-bit bins
    n = 2**22
    got = ExactSum.of_terms(np.zeros(n, np.int64), np.full(n, x), 1).to_dense()[0]
    assert got == x * n


def test_signs_zeros_subnormals_and_extremes():
    big = np.finfo(np.float64).max
    cases = [
        ([-1.5, -2.25], -3.75),
        ([0.0, -0.0], 0.0),
        ([-0.0], 0.0),
        ([3.0, -3.0], 0.0),
        ([-3.0, 3.0, -0.0], 0.0),
        ([TINY, TINY, TINY], 3 * TINY),
        ([-TINY, 2 * TINY], TINY),
        ([2.0**-1022, -TINY], 2.0**-1022 - TINY),  # normal minus subnormal: largest subnormal
        ([1e-310, 1e-310, -1e-320], 1e-310 + 1e-310 - 1e-320),
        ([1e300, 1e-300], 1e300),
        ([1e-300, 1e-300], 2e-300),
        ([1e300, 1e-300, -1e300], 0.0),  # 1e-300 is ~2000 bits below: truncated
        ([big, -big], 0.0),
        ([big / 2, big / 2], big),
        ([big, big / 2, -big], big / 2),
        ([big, big], np.inf),
        ([-big, -big], -np.inf),
    ]
    for terms, expected in cases:
        got = ExactSum.of_terms(np.zeros(len(terms), int), terms, ()).to_dense()
        assert got.shape == ()
        assert same_bits(got, expected), (terms, got, expected)
    rng = np.random.default_rng(15)
    units = rng.integers(-2**52, 2**52, 1000)  # random subnormals and their sum
    got = ExactSum.of_terms(np.zeros(1000, int), units * TINY, 1).to_dense()[0]
    assert got == int(units.sum()) * TINY


# ---------------------------------------------------------------------------------- sparse


def test_untouched_entries_are_zero_and_merges_take_the_union():
    a = ExactSum.of_terms([7, 3, 7], [1.0, -2.0, 0.5], 10)
    b = ExactSum.of_terms([3, 9, 0], [2.0, 0.25, 0.0], 10)
    assert a.n_entries == 2 and np.array_equal(a.index, [3, 7])
    total = a + b
    index, values = total.to_coo()
    assert np.array_equal(index, [0, 3, 7, 9])
    assert same_bits(values, [0.0, 0.0, 1.5, 0.25])
    assert same_bits(total.to_dense(), [0, 0, 0, 0, 0, 0, 0, 1.5, 0, 0.25])
    assert same_bits((b + a).to_dense(), total.to_dense())
    # per stored entry: 8 bytes of index, 2 of top, 32 of accumulators
    assert (total.index.nbytes + total.top.nbytes + total.bins.nbytes) / total.n_entries <= 42


def test_two_dimensional_shapes_use_flat_indices():
    rng = np.random.default_rng(16)
    shape = (6, 4)
    rows, cols = rng.integers(0, 6, 3000), rng.integers(0, 3, 3000)  # column 3 untouched
    values = wide_terms(rng, 3000)
    flat = np.ravel_multi_index((rows, cols), shape)
    got = ExactSum.of_terms(flat, values, shape).to_dense()
    assert got.shape == shape
    expected = fsum_per_entry(flat, values, 24).reshape(shape)
    assert np.all(ulps(got, expected) <= 1)
    assert same_bits(got[:, 3], np.zeros(6))
    dense = rng.normal(size=shape)
    assert same_bits(ExactSum.of_array(dense).to_dense(), dense)
    assert ExactSum.of_array(dense).n_entries == 24
    both = ExactSum.of_array(dense) + ExactSum.of_terms(flat, values, shape)
    expected = fsum_per_entry(np.r_[flat, np.arange(24)], np.r_[values, dense.ravel()], 24)
    assert np.all(ulps(both.to_dense(), expected.reshape(shape)) <= 1)


def test_shapes_are_checked():
    a = ExactSum.of_terms([1], [1.0], (2, 3))
    with pytest.raises(ValueError, match="shape"):
        a + ExactSum.of_terms([1], [1.0], (3, 2))
    with pytest.raises(ValueError, match="shape"):
        exact_total([a, ExactSum.of_terms([1], [1.0], 6)])
    with pytest.raises(ValueError, match="shape"):
        exact_total([a], shape=(6,))
    with pytest.raises(TypeError):
        a + np.zeros((2, 3))
    with pytest.raises(TypeError):
        exact_total([a, 1.0])
    with pytest.raises(ValueError, match="range"):
        ExactSum.of_terms([6], [1.0], (2, 3))
    with pytest.raises(ValueError, match="range"):
        ExactSum.of_terms([-1], [1.0], (2, 3))
    with pytest.raises(ValueError, match="length"):
        ExactSum.of_terms([0, 1], [1.0], (2, 3))
    with pytest.raises(TypeError, match="integers"):
        ExactSum.of_terms([0.0], [1.0], (2, 3))
    with pytest.raises(ValueError):
        ExactSum((2,), np.zeros(1, np.int64), np.zeros(1, np.int16), np.zeros((1, 3), np.int64))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_terms_raise(bad):
    values = np.ones(10)
    values[6] = bad
    with pytest.raises(ValueError, match="term 6 is not finite"):
        ExactSum.of_terms(np.arange(10) % 3, values, 3)
    # also when the terms are sorted internally (a huge shape)
    with pytest.raises(ValueError, match="term 6 is not finite"):
        ExactSum.of_terms(np.arange(10)[::-1] * 10**9, values, 10**11)
    with pytest.raises(ValueError, match="not finite"):
        ExactSum.of_array(values.reshape(2, 5))


def test_empty_term_lists():
    empty = ExactSum.of_terms([], [], (3, 2))
    assert empty.n_entries == 0 and empty.shape == (3, 2)
    assert same_bits(empty.to_dense(), np.zeros((3, 2)))
    index, values = empty.to_coo()
    assert index.shape == values.shape == (0,)
    a = ExactSum.of_terms([4], [2.5], (3, 2))
    assert_same_state(empty + a, a)
    assert_same_state(a + empty, a)
    assert exact_total([], shape=5).to_dense().shape == (5,)
    with pytest.raises(ValueError, match="shape"):
        exact_total([])


def test_pickle_round_trip():
    rng = np.random.default_rng(17)
    state = ExactSum.of_terms(rng.integers(0, 10**6, 500), wide_terms(rng, 500), (1000, 1000))
    copy = pickle.loads(pickle.dumps(state))
    assert isinstance(copy, ExactSum)
    assert_same_state(copy, state)
    assert same_bits(copy.to_dense(), state.to_dense())
    other = ExactSum.of_terms(rng.integers(0, 10**6, 500), wide_terms(rng, 500), (1000, 1000))
    assert_same_state(copy + other, state + other)
