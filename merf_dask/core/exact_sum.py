"""Floating-point sums whose bits do not depend on the order or grouping of the terms.

The EM loop adds per-level quantities (for example, for item j, a term summed over all users)
first inside each Dask partition and then across partitions. Ordinary float64 addition is not
associative, so the last bits of such a sum depend on how the rows were split into partitions,
and a model fitted on 2 partitions differs from one fitted on 5. :class:`ExactSum` is a sum that
is a pure function of the *multiset* of its terms: the same bits whatever the order of the
terms, their grouping into partial sums, or the number of partitions.

Method
------
Reproducible binned summation, in the spirit of Demmel and Nguyen's "indexed floating point"
(ReproBLAS), written here from scratch in vectorised numpy.

* Every finite float64 is an integer multiple of 2**-1074. Number its bits by absolute position
  (position 0 is worth 2**-1074, position 2097 is the top bit of the largest float) and cut the
  positions into bins of ``W = 32`` bits at fixed boundaries: bin ``b`` holds positions
  ``32*b ... 32*b + 31``. There are 66 bins (0 ... 65).
* A term's 53-bit significand lies in at most three adjacent bins; its magnitude splits
  *exactly* into three unsigned 32-bit chunks, each given the term's sign. The split uses no
  reference point, so a term's chunks are the same whatever else is being summed.
* The *top* of an entry is the highest bin that any of its terms touches (never below
  ``K - 1 = 3``). A maximum is order-independent, so the top is a function of the multiset.
* An entry keeps ``K = 4`` int64 accumulators, for the bins ``top, top-1, top-2, top-3``; every
  term adds its chunks that fall in that window, and its chunks below the window are dropped
  (truncation toward zero of each term, never rounding). Integer addition is exact, associative
  and commutative, so the accumulators are the sums of the kept chunks in any order.
* Two partial sums of one entry with different tops are merged by shifting the one with the
  lower top down to the higher top, dropping the accumulators that fall out of the window. The
  result is exactly the state that adding all the terms directly at the higher top gives, so
  any merge tree ends in the same integer state. No carries are ever propagated in the stored
  state (a carry out of a later-dropped bin would make the state depend on the grouping).
* :meth:`ExactSum.to_dense` converts the integer state to float64 by a fixed sequence of
  integer and IEEE operations (carry normalisation, sign-magnitude split, an error-free
  Fast2Sum of the three leading 32-bit limbs): the same state always gives the same bits.

Limits
------
* Kept precision: at least ``(K-1)*W = 96`` bits below the top bit of an entry's largest term.
  Each term loses only its bits below the window, less than ``2**-96 * max|term|``, so the
  result is within ``n_terms * 2**-96 * max|term|`` of the exact sum, on top of the
  conversion error below. An entry with top bin 3 (all terms below about ``2**-946``) keeps
  every bit.
* Conversion: the float64 result is within 0.51 ulp of the exact value of the integer state
  (nearly always the correctly rounded value); when the result is subnormal, within 1.01 ulp
  (a second rounding to the subnormal's precision).
  Exact sums beyond the float64 range convert to ``±inf``. A zero sum is ``+0.0``.
* Overflow: every chunk is below ``2**32`` in magnitude, so the int64 accumulators cannot
  overflow while an entry has fewer than ``2**31`` terms in all its partial sums together.
  :meth:`ExactSum.of_terms` refuses ``2**31`` terms or more in one call; merges are not checked.
* Memory: per stored entry 8 bytes of index, 2 of top and 32 of accumulators (42 bytes).
* Terms must be finite: a NaN or infinity raises ``ValueError``.

File map
--------
``ExactSum``              the sparse integer state (frozen dataclass of numpy arrays, pickles)
``ExactSum.of_terms``     per-entry sums of terms given by flat index, like ``np.bincount``
``ExactSum.of_array``     one dense array as one term per entry
``ExactSum.__add__``      merge of two states (union of entries); ``exact_total`` for many
``ExactSum.to_dense`` / ``to_coo``   float64 results
``_entry_positions``      sorted unique indices and each index's position among them
``_term_chunks``          the exact 32-bit split of float64 terms (bit manipulation)
``_merge``, ``_shift_down``   the shift-and-add of several states
``_to_float``             the deterministic conversion of integer states to float64
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["ExactSum", "exact_total", "BIN_BITS", "N_BINS_KEPT"]

#: Width ``W`` of a bin in bits.
BIN_BITS = 32
#: Number ``K`` of bins kept per entry (the top bin and the ``K - 1`` below it).
N_BINS_KEPT = 4

# the bit manipulation below (shifts by 5, masks of 31) is written for W = 32
_W = BIN_BITS
_K = N_BINS_KEPT
_MASK = np.uint64((1 << _W) - 1)
_FRACTION = np.uint64((1 << 52) - 1)
_MAX_TERMS = 2**31 - 1
# terms processed together in of_terms: the temporaries of one block stay in cache
_BLOCK = 1 << 16
# of_terms maps indices to entries through a dense lookup table when the flat size is at most
# this many times the number of terms (plus a constant), else by sorting
_DENSE_FACTOR = 4
_DENSE_MIN = 1 << 16


@dataclass(frozen=True, eq=False)
class ExactSum:
    """Per-entry sums of float64 terms that are the same bits for any order or grouping.

    Sparse: only the entries some term touched are stored. Build one with :meth:`of_terms` or
    :meth:`of_array`, merge with ``+`` (or :func:`exact_total`), read with :meth:`to_dense` or
    :meth:`to_coo`. The arrays are the exact integer state described in the module docstring;
    they are not meant to be written by hand.

    Attributes
    ----------
    shape : tuple of int
        Shape of the dense result, e.g. ``(P,)``, ``(P, m)`` or ``(P, P)``.
    index : ndarray of shape (n_entries,), dtype int64
        Sorted unique flat (C-order) indices into ``shape`` of the touched entries.
    top : ndarray of shape (n_entries,), dtype int16
        The highest bin of each entry, in ``[K - 1, 65]``.
    bins : ndarray of shape (n_entries, K), dtype int64
        ``bins[e, s]`` is the sum of the chunks in bin ``top[e] - s`` of entry ``e``'s terms;
        bin ``b`` is worth ``2**(32*b - 1074)``.
    """

    shape: tuple
    index: np.ndarray
    top: np.ndarray
    bins: np.ndarray

    def __post_init__(self):
        shape = _check_shape(self.shape)
        object.__setattr__(self, "shape", shape)
        n = self.index.shape[0] if self.index.ndim == 1 else -1
        if (self.index.dtype != np.int64 or self.top.dtype != np.int16
                or self.bins.dtype != np.int64 or self.top.shape != (n,)
                or self.bins.shape != (n, _K)):
            raise ValueError(
                "ExactSum needs index (n,) int64, top (n,) int16 and bins "
                f"(n, {_K}) int64; got {self.index.shape} {self.index.dtype}, "
                f"{self.top.shape} {self.top.dtype}, {self.bins.shape} {self.bins.dtype}")

    # ------------------------------------------------------------------ construction

    @classmethod
    def of_terms(cls, index, values, shape) -> "ExactSum":
        """Per-entry sums of terms: entry ``index[i]`` gets ``values[i]``.

        Like ``np.bincount(index, weights=values, minlength=prod(shape))`` but exact up to
        the limits in the module docstring, and sparse: only the entries in ``index`` are
        stored (an entry whose terms are all zero is stored, with value 0).

        Parameters
        ----------
        index : array-like of int, shape (n_terms,)
            Flat (C-order) index into ``shape`` of each term's entry, in ``[0, prod(shape))``.
        values : array-like of float, shape (n_terms,)
            The terms, converted to float64. Every term must be finite.
        shape : int or tuple of int
            Shape of the dense result.

        Returns
        -------
        ExactSum

        Raises
        ------
        ValueError
            If a term is not finite, an index is out of range, the lengths differ or there are
            ``2**31`` terms or more.
        """
        shape = _check_shape(shape)
        size = math.prod(shape)
        index = np.asarray(index)
        values = np.asarray(values)
        if index.ndim != 1 or values.ndim != 1 or index.shape != values.shape:
            raise ValueError("index and values must be 1-D of one length; got shapes "
                             f"{index.shape} and {values.shape}")
        if index.size and index.dtype.kind not in "iu":
            raise TypeError(f"index must be integers, not {index.dtype}")
        if values.dtype.kind not in "fiub":
            raise TypeError(f"values must be real numbers, not {values.dtype}")
        n = index.shape[0]
        if n > _MAX_TERMS:
            raise ValueError(f"{n} terms in one call; at most {_MAX_TERMS} keep int64 exact")
        if n == 0:
            return _empty(shape)
        index = index.astype(np.int64, copy=False)
        lo, hi = index.min(), index.max()
        if lo < 0 or hi >= size:
            raise ValueError(f"index out of range for shape {shape}: "
                             f"{lo if lo < 0 else hi} not in [0, {size})")
        values = np.ascontiguousarray(values, dtype=np.float64)
        bits = values.view(np.uint64)

        uniq, pos, order = _entry_positions(index, size, sorted_runs=False)
        if order is not None:  # work in the order of the entries: cache-friendly scatters
            bits = bits[order]
        n_entries = uniq.shape[0]

        # pass 1: the top of each entry, the maximum of its terms' top bins
        top = np.full(n_entries, _K - 1, dtype=np.int64)
        for start in range(0, n, _BLOCK):
            block = slice(start, start + _BLOCK)
            exponent = _exponent(bits[block])
            if (exponent == 0x7FF).any():
                bad = start + int(np.flatnonzero(exponent == 0x7FF)[0])
                bad = bad if order is None else int(order[bad])
                raise ValueError(f"term {bad} is not finite ({float(values[bad])}); "
                                 "exact sums need finite terms")
            np.maximum.at(top, pos[block], _term_top(exponent))

        # pass 2: add every chunk into its slot of its entry's window; the last element of
        # `acc` is a dump for the chunks below the window
        dump = n_entries * _K
        acc = np.zeros(dump + 1, dtype=np.int64)
        for start in range(0, n, _BLOCK):
            block = slice(start, start + _BLOCK)
            p = pos[block]
            low_bin, chunks = _term_chunks(bits[block])
            offset = top[p] - low_bin  # slot of the lowest chunk
            base = p * _K
            for i, chunk in enumerate(chunks):
                # offset - i < 0 only for a zero chunk above the term's top bit
                slot = np.maximum(offset - i, 0)
                target = base + slot
                target[slot >= _K] = dump
                np.add.at(acc, target, chunk)
        bins = acc[:dump].reshape(n_entries, _K)
        return cls(shape, uniq, top.astype(np.int16), bins)

    @classmethod
    def of_array(cls, values) -> "ExactSum":
        """One dense array as a single term per entry (every entry stored).

        Parameters
        ----------
        values : array-like of float, any shape
            Every element must be finite.

        Returns
        -------
        ExactSum
            Of shape ``values.shape``; ``of_array(x).to_dense()`` equals ``x`` (as float64,
            with ``-0.0`` read back as ``+0.0``).
        """
        values = np.asarray(values, dtype=np.float64)
        return cls.of_terms(np.arange(values.size, dtype=np.int64), values.ravel(),
                            values.shape)

    # ------------------------------------------------------------------ arithmetic

    def __add__(self, other) -> "ExactSum":
        """The state of all the terms of both sums: union of the touched entries.

        Parameters
        ----------
        other : ExactSum
            Of the same ``shape``.

        Returns
        -------
        ExactSum

        Raises
        ------
        ValueError
            If the shapes differ.
        """
        if not isinstance(other, ExactSum):
            return NotImplemented
        return exact_total([self, other])

    def __radd__(self, other) -> "ExactSum":
        """``0 + s`` is ``s``, so that the built-in ``sum`` of ExactSums works."""
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    # ------------------------------------------------------------------ results

    @property
    def n_entries(self) -> int:
        """Number of stored (touched) entries."""
        return int(self.index.shape[0])

    def to_coo(self) -> tuple[np.ndarray, np.ndarray]:
        """The touched entries and their sums.

        Returns
        -------
        index : ndarray of shape (n_entries,), dtype int64
            Sorted unique flat indices (a copy of ``self.index``).
        values : ndarray of shape (n_entries,), dtype float64
            The sum of each entry.
        """
        return self.index.copy(), _to_float(self.top, self.bins)

    def to_dense(self) -> np.ndarray:
        """The sums as a dense float64 array.

        Returns
        -------
        ndarray of shape ``self.shape``, dtype float64
            Zeros (``+0.0``) where no term touched the entry.
        """
        out = np.zeros(math.prod(self.shape), dtype=np.float64)
        out[self.index] = _to_float(self.top, self.bins)
        return out.reshape(self.shape)


def exact_total(parts: Sequence[ExactSum], *, shape=None) -> ExactSum:
    """The sum of several :class:`ExactSum` in one merge.

    The same state as adding them with ``+`` in any order or tree.

    Parameters
    ----------
    parts : sequence of ExactSum
        All of one shape.
    shape : int or tuple of int, optional
        The shape of the parts; needed when ``parts`` is empty (the result is then an
        ExactSum with no entries), checked otherwise.

    Returns
    -------
    ExactSum

    Raises
    ------
    ValueError
        If the shapes differ, or ``parts`` is empty and no ``shape`` is given.
    TypeError
        If a part is not an ExactSum.
    """
    parts = list(parts)
    for part in parts:
        if not isinstance(part, ExactSum):
            raise TypeError(f"exact_total adds ExactSum, not {type(part).__name__}")
    if shape is not None:
        shape = _check_shape(shape)
    elif parts:
        shape = parts[0].shape
    else:
        raise ValueError("exact_total of no parts needs shape=")
    for part in parts:
        if part.shape != shape:
            raise ValueError(f"cannot add ExactSum of shape {part.shape} to shape {shape}")
    parts = [part for part in parts if part.n_entries]
    if not parts:
        return _empty(shape)
    if len(parts) == 1:
        return parts[0]
    return _merge(parts, shape)


# ---------------------------------------------------------------------- helpers


def _check_shape(shape) -> tuple:
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    if math.prod(shape) >= 2**62:
        raise ValueError(f"shape {shape} has too many entries for int64 flat indices")
    return shape


def _empty(shape) -> ExactSum:
    return ExactSum(shape, np.zeros(0, np.int64), np.zeros(0, np.int16),
                    np.zeros((0, _K), np.int64))


def _entry_positions(index, size, *, sorted_runs):
    """Sorted unique indices and the position of each index among them.

    Parameters
    ----------
    index : ndarray of shape (n,), dtype int64
        Values in ``[0, size)``.
    size : int
        Number of possible index values.
    sorted_runs : bool
        Whether ``index`` is a concatenation of sorted runs (then a stable sort merges them).

    Returns
    -------
    uniq : ndarray of shape (n_unique,), dtype int64
    pos : ndarray of shape (n,), dtype int64
        ``uniq[pos] == index`` when ``order`` is None, else ``uniq[pos] == index[order]``
        (and ``pos`` is non-decreasing).
    order : ndarray of shape (n,) or None
        The sorting permutation, when ``index`` was sorted (a large ``size``); None when
        a dense lookup table of ``size`` entries was used.
    """
    n = index.shape[0]
    if size <= _DENSE_FACTOR * n + _DENSE_MIN:
        touched = np.bincount(index, minlength=size) > 0
        uniq = np.flatnonzero(touched).astype(np.int64, copy=False)
        lookup = np.cumsum(touched, dtype=np.int64)
        lookup -= 1
        return uniq, lookup[index], None
    order = np.argsort(index, kind="stable" if sorted_runs else "quicksort")
    ordered = index[order]
    new = np.empty(n, dtype=bool)
    new[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    pos = np.cumsum(new, dtype=np.int64)
    pos -= 1
    return ordered[new], pos, order


def _exponent(bits):
    """Biased exponent field (0 ... 2047) of float64 bit patterns, as int64."""
    return ((bits >> np.uint64(52)) & np.uint64(0x7FF)).view(np.int64)


def _term_top(exponent):
    """Top bin of each term: the bin of its highest possible bit, at least K - 1.

    A normal float with biased exponent ``E`` has its top bit at absolute position ``E + 51``;
    subnormals and zeros (``E = 0``) lie in bins 0 and 1, below the floor ``K - 1``.
    """
    return np.maximum((exponent + 51) >> 5, _K - 1)


def _term_chunks(bits):
    """Exact split of float64 terms into three signed 32-bit chunks at absolute bins.

    Parameters
    ----------
    bits : ndarray of shape (n,), dtype uint64
        The terms' bit patterns (finite).

    Returns
    -------
    low_bin : ndarray of shape (n,), dtype int64
        The bin of chunk 0; chunk ``i`` is in bin ``low_bin + i``.
    chunks : tuple of three ndarrays of shape (n,), dtype int64
        Each in ``(-2**32, 2**32)``, with the term's sign; the term equals
        ``sum_i chunks[i] * 2**(32*(low_bin + i) - 1074)`` exactly.
    """
    exponent = (bits >> np.uint64(52)) & np.uint64(0x7FF)
    significand = bits & _FRACTION
    significand |= (exponent != 0).astype(np.uint64) << np.uint64(52)
    # absolute position of the significand's lowest bit: E - 1 for normals, 0 for subnormals
    lowest = np.maximum(exponent, np.uint64(1)) - np.uint64(1)
    low_bin = (lowest >> np.uint64(5)).view(np.int64)
    shift = lowest & np.uint64(31)
    up = np.uint64(32) - shift  # 1 ... 32
    # the significand shifted left by `shift` is up to 84 bits: cut it into three 32-bit chunks
    chunk0 = (significand << shift) & _MASK
    chunk1 = (significand >> up) & _MASK
    chunk2 = (significand >> np.uint64(32)) >> up
    sign = (bits.view(np.int64) >> 63) | 1  # +1 or -1
    return low_bin, tuple(c.view(np.int64) * sign for c in (chunk0, chunk1, chunk2))


def _shift_down(bins, by):
    """Move each row's accumulators ``by`` slots down (towards lower bins), dropping the ones
    that leave the window.

    Parameters
    ----------
    bins : ndarray of shape (n, K), dtype int64
    by : ndarray of shape (n,), int, >= 0

    Returns
    -------
    ndarray of shape (n, K), dtype int64
        ``out[e, s] = bins[e, s - by[e]]`` where ``s >= by[e]``, else 0.
    """
    moved = np.flatnonzero(by)
    if moved.size == 0:
        return bins
    out = bins.copy()
    source = np.arange(_K) - by[moved, None]
    part = np.take_along_axis(bins[moved], np.maximum(source, 0), axis=1)
    part[source < 0] = 0
    out[moved] = part
    return out


def _merge(parts, shape) -> ExactSum:
    """Sum of several non-empty states of one shape (their stored indices are sorted runs)."""
    index = np.concatenate([part.index for part in parts])
    uniq, pos, order = _entry_positions(index, math.prod(shape), sorted_runs=True)
    if order is not None:
        pos[order] = pos.copy()  # back to the order of the parts
    top = np.full(uniq.shape[0], _K - 1, dtype=np.int16)
    bounds = np.cumsum([0] + [part.n_entries for part in parts])
    for part, start, stop in zip(parts, bounds[:-1], bounds[1:]):
        p = pos[start:stop]  # unique within a part
        top[p] = np.maximum(top[p], part.top)
    bins = np.zeros((uniq.shape[0], _K), dtype=np.int64)
    for part, start, stop in zip(parts, bounds[:-1], bounds[1:]):
        p = pos[start:stop]
        by = (top[p] - part.top).astype(np.int64)
        bins[p] += _shift_down(part.bins, by)
    return ExactSum(shape, uniq, top, bins)


def _to_float(top, bins):
    """Float64 value of integer states, a fixed function of the state.

    Parameters
    ----------
    top : ndarray of shape (n,), int
    bins : ndarray of shape (n, K), dtype int64

    Returns
    -------
    ndarray of shape (n,), dtype float64
        Within 0.51 ulp of the exact value (1.01 ulp when subnormal); ``+0.0`` for zero;
        ``±inf`` beyond the float64 range.
    """
    limbs = [np.array(bins[:, s]) for s in range(_K)]  # contiguous copies, top bin first

    def normalise(limbs):
        # carries upward: every accumulator but the first ends in [0, 2**32); exact
        for s in range(_K - 1, 0, -1):
            limbs[s - 1] += limbs[s] >> _W
            limbs[s] &= (1 << _W) - 1

    normalise(limbs)
    negative = limbs[0] < 0  # the others are >= 0 and below 2**(32*(K-1))
    if negative.any():
        for limb in limbs:
            np.negative(limb, out=limb, where=negative)
        normalise(limbs)
    # K + 1 limbs of 32 bits, all in [0, 2**32): limb k is worth 2**(32*(top + 1 - k) - 1074)
    wide = [limbs[0] >> _W, limbs[0] & ((1 << _W) - 1)] + limbs[1:]
    first = np.full(top.shape, len(wide) - 1, dtype=np.int64)  # the leading nonzero limb
    for k in range(len(wide) - 2, -1, -1):
        first[wide[k] != 0] = k
    zero = np.zeros_like(first)
    wide += [zero, zero]
    # value = (a + b + c + rest) * 2**exponent, with a = wide[first] * 2**64 >= 2**64 (or a
    # zero state), b = wide[first + 1] * 2**32, c = wide[first + 2] and 0 <= rest < 1, far
    # below the ulp of a + b + c
    a = np.choose(first, wide[:-2]).astype(np.float64) * 2.0**64
    b = np.choose(first, wide[1:-1]).astype(np.float64) * 2.0**32
    c = np.choose(first, wide[2:]).astype(np.float64)
    high = a + b
    error = b - (high - a)  # Fast2Sum (a >= b): high + error == a + b exactly
    value = high + (error + c)
    exponent = _W * (top.astype(np.int64) - 1 - first) - 1074
    with np.errstate(over="ignore"):
        value = np.ldexp(value, exponent)
    np.negative(value, out=value, where=negative)
    return value
