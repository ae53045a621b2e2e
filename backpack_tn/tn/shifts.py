"""Shift-structured Gram of the unfolded input: KFAC-expand for stride-1 convolutions.

With stride 1, kernel taps ``k`` and ``k'`` read the input at positions ``t`` and
``t + δ`` with ``δ = (k' − k)·D`` (dilation ``D``). The Gram entry of two unfolded
rows, ``Σ_{n,o} u[(c,k), o] u[(c',k'), o]``, is therefore a sum of the products
``x[c, t] · x[c', t + δ]`` over a box of input positions ``t`` — and the tap pairs
sharing ``δ`` only differ in where that box is cut near the borders.

So instead of one GEMM over ``N·ΠO`` with ``(C·ΠK)²`` outputs (``ΠK²`` input-sized
products per channel pair) this computes, for every offset ``δ`` (``Π(2K − 1)`` of
them, of which only the lexicographically non-negative half is needed: the Gram is
symmetric, and the blocks of ``−δ`` are the transposed blocks of ``δ``), the sums over
the few boxes that the cut points split the valid positions into — one large interior
box and thin border strips — and adds, per tap pair, the boxes its window covers.
Exact, with ``(Π(2K−1) + 1)/2`` input-sized products per channel pair instead of
``ΠK²`` (3×3: 13 instead of 81, 5×5: 41 instead of 625). Only zero padding
(implicit: padded positions contribute nothing). A strided convolution is a stride-1
one over the input's phases (:func:`polyphase_gram`), which pays off for large
kernels at small strides (stems). The caller chooses between these and the tensor
network by measuring them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Tuple

import torch
from torch import Tensor

from backpack_tn.tn.geometry import ConvGeometry, DimGeometry
from backpack_tn.tn.views import gather_rows


def supports_shift_gram(geometry: ConvGeometry) -> bool:
    """Whether :func:`shift_gram` applies: stride 1, zero padding, a kernel > 1."""
    dims = geometry.dims
    return (
        all(d.stride == 1 and d.padding_mode == "zeros" for d in dims)
        and math.prod(d.kernel_size for d in dims) > 1
    )


def supports_polyphase_gram(geometry: ConvGeometry) -> bool:
    """Whether :func:`polyphase_gram` applies.

    Zero padding, some stride > 1, and a kernel > 1 after the split into phases
    (more than one tap position per phase; e.g. not a kernel equal to the stride
    without padding).
    """
    dims = geometry.dims
    return (
        all(d.padding_mode == "zeros" for d in dims)
        and any(d.stride > 1 for d in dims)
        and math.prod(_phase_dim(d)[0].kernel_size for d in dims) > 1
    )


@lru_cache(maxsize=1024)
def polyphase_products(geometry: ConvGeometry, channels: int) -> tuple:
    """Input-sized products per sample: ``(polyphase Gram, block-triangular Gram)``.

    The polyphase Gram pays ``(Π(2K'−1) + 1)/2`` offsets of ``(C·ΠS)²`` products over
    the ``ΠU`` phase positions; the Gram of the unfolded input ``(C·ΠK)²/2`` over the
    ``ΠO`` output positions. Callers offer the polyphase Gram only where this count
    is lower (large kernels at small strides: a ResNet stem, 7×7 stride 2, needs a
    third of the products; 3×3 stride 2 twice as many) and then measure, as its
    many small products run below BLAS peak.
    """
    phased = [_phase_dim(d)[0] for d in geometry.dims]
    phases = math.prod(d.stride for d in geometry.dims)
    offsets = (math.prod(2 * d.kernel_size - 1 for d in phased) + 1) // 2
    poly = offsets * (channels * phases) ** 2 * math.prod(d.input_size for d in phased)
    taps = math.prod(geometry.kernel_size)
    tn = (channels * taps) ** 2 / 2 * math.prod(geometry.output_size)
    return poly, tn


@lru_cache(maxsize=1024)
def _phase_dim(dim: DimGeometry) -> Tuple[DimGeometry, Tuple[Tuple[int, int], ...]]:
    """One dimension of a strided convolution as a stride-1 one over its phases.

    Tap ``k`` reads position ``S·o + a_k`` with ``a_k = k·D − P``; writing
    ``a_k = S·q_k + r_k`` (``0 ≤ r_k < S``), that is position ``o + q_k`` of the phase
    ``x_r[u] = x[S·u + r]``. So the convolution is a stride-1, dilation-1 one over the
    ``S`` phases (as channels) with taps ``q_min … q_max``; each original tap is one
    (phase, tap) pair of it, the others are never read.

    Returns:
        The stride-1 geometry (phase length ``U = ⌈I/S⌉``; phases shorter than ``U``
        are zero-padded, which is what the convolution reads there) and, per
        original tap, ``(r_k, q_k − q_min)``.
    """
    s = dim.stride
    starts = [k * dim.dilation - dim.pad_left for k in range(dim.kernel_size)]
    q = [a // s for a in starts]
    kernel = q[-1] - q[0] + 1
    length = -(-dim.input_size // s)
    out = dim.output_size
    phased = DimGeometry(
        input_size=length,
        kernel_size=kernel,
        stride=1,
        dilation=1,
        pad_left=-q[0],
        pad_right=out - length + q[0] + kernel - 1,
        padding_mode="zeros",
    )
    return phased, tuple((a % s, qk - q[0]) for a, qk in zip(starts, q))


def polyphase_gram(x: Tensor, geometry: ConvGeometry) -> Tensor:
    """:func:`shift_gram` for a strided convolution, by splitting the input into phases.

    With stride ``S`` the taps ``k`` and ``k'`` read the same phase of the input when
    ``k·D ≡ k'·D (mod S)``; over its phases (``ΠS`` times the channels, each
    ``⌈I/S⌉`` long) the convolution has stride 1 and a ``⌈K/S⌉``-ish kernel, whose
    Gram has the shift structure. The Gram of the original taps is the sub-matrix of
    the phases' Gram at their (phase, tap) pairs.

    Args:
        x: Input ``[B, N, C, *I]`` (see :func:`shift_gram`).
        geometry: The convolution's geometry (see :func:`supports_polyphase_gram`).

    Returns:
        ``[B, C·ΠK, C·ΠK]``, rows ordered channel-major as ``F.unfold``'s.

    Raises:
        ValueError: If the geometry is not supported.
    """
    if not supports_polyphase_gram(geometry):
        raise ValueError(
            "polyphase_gram needs zero padding, a stride > 1 and overlapping taps."
        )
    dims = geometry.dims
    plans = [_phase_dim(d) for d in dims]
    strides = [d.stride for d in dims]
    lengths = [p.input_size for p, _ in plans]
    lead = x.shape[:3]
    # right-pad every dimension to S·U, split each position into (u, r), and move
    # the phases r next to the channels: [B, N, C, *S, *U]
    pad = []
    for d, s, u in zip(reversed(dims), reversed(strides), reversed(lengths)):
        pad += [0, s * u - d.input_size]
    split = torch.nn.functional.pad(x, pad).reshape(
        *lead, *(v for pair in zip(lengths, strides) for v in pair)
    )
    spatial = len(dims)
    order = (
        [0, 1, 2]
        + [4 + 2 * i for i in range(spatial)]
        + [3 + 2 * i for i in range(spatial)]
    )
    phases = split.permute(order).reshape(*lead[:2], -1, *lengths)
    stride_one = ConvGeometry(tuple(p for p, _ in plans), geometry.groups)
    gram = shift_gram(phases, stride_one)
    rows = _phase_rows(geometry, x.shape[2])
    return gather_rows(gather_rows(gram, 1, rows), 2, rows)


@lru_cache(maxsize=1024)
def _phase_rows(geometry: ConvGeometry, channels: int) -> Tuple[int, ...]:
    """Rows of the original (channel, tap) pairs in the phases' Gram.

    The phases' Gram is channel-major, then the phases, then the stride-1 taps.
    """
    plans = [_phase_dim(d) for d in geometry.dims]
    strides = [d.stride for d in geometry.dims]
    taps_per_phase = math.prod(p.kernel_size for p, _ in plans)
    block = math.prod(strides) * taps_per_phase
    rows = []
    for k in itertools.product(*(range(d.kernel_size) for d in geometry.dims)):
        pairs = [plan[1][kk] for plan, kk in zip(plans, k)]
        phase = _flat([r for r, _ in pairs], strides)
        tap = _flat([t for _, t in pairs], [p.kernel_size for p, _ in plans])
        rows.append(phase * taps_per_phase + tap)
    return tuple(c * block + r for c in range(channels) for r in rows)


def _flat(indices, sizes) -> int:
    """Row-major flat index of ``indices`` in a grid of ``sizes``."""
    flat = 0
    for i, n in zip(indices, sizes):
        flat = flat * n + i
    return flat


@dataclass(frozen=True)
class _DimShift:
    """One dimension at one tap offset: the boxes' segments and each tap's cover."""

    shift: int  # δ in input positions
    segments: Tuple[Tuple[int, int], ...]  # [start, stop) of the first factor's t
    cover: Tuple[Tuple[int, int, int], ...]  # (tap k, first segment, stop segment)


@lru_cache(maxsize=1024)
def _dim_shift(dim: DimGeometry, offset: int) -> _DimShift:
    """Segments of ``t`` for tap offset ``offset = k' − k`` in one dimension."""
    size, dilation, out = dim.input_size, dim.dilation, dim.output_size
    shift = offset * dilation
    # both t and t + δ must be inputs (padded positions contribute zero)
    lo, hi = max(0, -shift), min(size, size - shift)
    if hi <= lo:
        return _DimShift(shift, (), ())
    windows = []
    cuts = {lo, hi}
    for k in range(dim.kernel_size):
        if not 0 <= k + offset < dim.kernel_size:
            continue
        start = k * dilation - dim.pad_left  # input position of output 0 at tap k
        a, b = min(max(start, lo), hi), min(max(start + out, lo), hi)
        windows.append((k, a, b))
        cuts.update((a, b))
    cuts = sorted(cuts)
    segments = tuple((s, e) for s, e in zip(cuts, cuts[1:]) if e > s)
    cover = []
    for k, a, b in windows:
        inside = [i for i, (s, e) in enumerate(segments) if a <= s and e <= b]
        first, stop = (inside[0], inside[-1] + 1) if inside else (0, 0)
        cover.append((k, first, stop))
    return _DimShift(shift, segments, tuple(cover))


def shift_gram(x: Tensor, geometry: ConvGeometry) -> Tensor:
    """``Σ_n Σ_o u_{n,o} u_{n,o}ᵀ`` of the unfolded input of a stride-1 convolution.

    Args:
        x: Input ``[B, N, C, *I]``: ``B`` independent problems (e.g. channel groups)
            of ``N`` samples with ``C`` channels each.
        geometry: The convolution's geometry (stride 1, zero padding; see
            :func:`supports_shift_gram`).

    Returns:
        ``[B, C·ΠK, C·ΠK]``, rows ordered channel-major as ``F.unfold``'s.

    Raises:
        ValueError: If the geometry is not supported.
    """
    if not supports_shift_gram(geometry):
        raise ValueError("shift_gram needs stride 1, zero padding and a kernel > 1.")
    dims = geometry.dims
    batch, samples, channels = x.shape[:3]
    kernel = tuple(d.kernel_size for d in dims)
    # Zero margins as wide as the largest shift after every trailing dimension (and
    # one zero row after the first; no offset that is summed reads before a row's
    # start, as its first component is ≥ 0): a box spanning whole rows — all
    # positions of the trailing dimensions — is then one contiguous range of the
    # flattened positions, and so is its shifted partner, so its sum is a strided
    # batched GEMM over the samples without a copy. A shifted read that leaves a
    # row lands in a margin (zero) of the same or the neighbouring row.
    margins = [(d.kernel_size - 1) * d.dilation for d in dims[1:]]
    pad = [p for margin in reversed(margins) for p in (0, margin)] + [0, 1]
    padded = torch.nn.functional.pad(x, pad).flatten(3)  # [B, N, C, L]
    sizes = [d.input_size + m for d, m in zip(dims[1:], margins)]
    row = math.prod(sizes)  # flattened positions per index of the first dim
    strides = [row] + [math.prod(sizes[j + 1 :]) for j in range(len(sizes))]

    # Every tap pair's block is written exactly once (or its mirror is), so the
    # result starts uninitialised; pairs that never overlap are zeroed at the end.
    gram = x.new_empty(batch, channels, *kernel, channels, *kernel)
    written = set()
    zero = (0,) * len(dims)
    for offset in itertools.product(*(range(1 - k, k) for k in kernel)):
        if offset < zero:
            # The Gram is symmetric: the block of taps (k + δ, k) is the transpose
            # of the block of taps (k, k + δ), filled below. Only the offsets that
            # are lexicographically ≥ 0 are summed: (Π(2K−1) + 1)/2 of them.
            continue
        plans = [_dim_shift(d, o) for d, o in zip(dims, offset)]
        if any(not p.segments for p in plans):
            continue  # the taps never overlap inside the input
        shift = sum(p.shift * s for p, s in zip(plans, strides))
        rows = [
            _row_sum(
                padded[..., a * row : b * row],
                padded[..., a * row + shift : b * row + shift],
            )
            for a, b in plans[0].segments
        ]  # whole padded rows of every segment of the first dimension: [B, C, C]
        blocks = _OffsetBlocks(x, plans, rows)
        for covers in itertools.product(*(p.cover for p in plans)):
            taps = tuple(k for k, _, _ in covers)
            partners = tuple(k + o for k, o in zip(taps, offset))
            block = blocks.cover(tuple((first, stop) for _, first, stop in covers))
            if block is None:
                continue  # the windows never overlap: zeroed below
            gram[(slice(None), slice(None), *taps, slice(None), *partners)] = block
            written.add((taps, partners))
            if offset != zero:
                mirror = (slice(None), slice(None), *partners, slice(None), *taps)
                gram[mirror] = block.transpose(1, 2)
                written.add((partners, taps))
    for taps in itertools.product(*map(range, kernel)):
        for partners in itertools.product(*map(range, kernel)):
            if (taps, partners) not in written:
                gram[(slice(None), slice(None), *taps, slice(None), *partners)] = 0
    size = channels * math.prod(kernel)
    return gram.reshape(batch, size, size)


class _OffsetBlocks:
    """Sums over the boxes of one tap offset ``δ``, shared by its tap pairs.

    The first dimension's segments are summed over whole (margin-padded) rows by one
    GEMM each (``rows``). A tap pair covers a range of those segments and a box of
    the trailing dimensions' segments; its block is the row sums over its range minus
    the thin trailing boxes outside its box (or, if its box misses the largest
    trailing segment, the sum of the boxes inside). Thin boxes are one GEMM over the
    pair's whole row range each, and every sum is kept for the other pairs.
    """

    def __init__(self, x: Tensor, plans, rows):
        self.x, self.plans, self.rows = x, plans, rows
        trailing = plans[1:]
        self.grid = list(itertools.product(*(range(len(p.segments)) for p in trailing)))
        # the largest segment of every trailing dimension
        self.bulk = tuple(
            max(range(len(p.segments)), key=lambda i, p=p: _length(p.segments[i]))
            for p in trailing
        )
        self._row_ranges, self._boxes = {}, {}

    def cover(self, ranges):
        """The block of a tap pair covering ``[first, stop)`` segments per dimension.

        Returns ``None`` for an empty cover.
        """
        if any(first == stop for first, stop in ranges):
            return None
        span, inner = ranges[0], ranges[1:]
        inside = set(itertools.product(*(range(*r) for r in inner)))
        if self.bulk not in inside:
            terms = [self._box(span, index) for index in sorted(inside)]
            return terms[0] if len(terms) == 1 else torch.stack(terms).sum(0)
        block = self._rows(span)
        outside = [index for index in self.grid if index not in inside]
        if outside:
            block = block - sum(self._box(span, index) for index in outside)
        return block

    def _rows(self, span):
        if span not in self._row_ranges:
            parts = self.rows[span[0] : span[1]]
            total = parts[0]
            for part in parts[1:]:
                total = total + part
            self._row_ranges[span] = total
        return self._row_ranges[span]

    def _box(self, span, index):
        """``Σ_{n, t ∈ box} x[c, t] x[c', t + δ]``: rows of ``span``, ``index``."""
        key = (span, index)
        if key not in self._boxes:
            first_dim = self.plans[0]
            bounds = [
                (first_dim.segments[span[0]][0], first_dim.segments[span[1] - 1][1])
            ]
            bounds += [p.segments[i] for p, i in zip(self.plans[1:], index)]
            lead = (slice(None),) * 3
            first = lead + tuple(slice(a, b) for a, b in bounds)
            second = lead + tuple(
                slice(a + p.shift, b + p.shift) for (a, b), p in zip(bounds, self.plans)
            )
            self._boxes[key] = torch.einsum(
                "bnc...,bnd...->bcd", self.x[first], self.x[second]
            )
        return self._boxes[key]


def _row_sum(first: Tensor, second: Tensor) -> Tensor:
    """``Σ_{n,i} first[b, n, c, i] · second[b, n, d, i]`` for strided ``[B, N, C, L]``.

    Per sample a GEMM straight on the strided views, then a sum of ``N`` ``C × C``
    results; where those results outweigh the operands (``C > 2L``, small maps of
    wide layers), one GEMM over copies of both operands is cheaper.
    """
    channels, length = first.shape[2], first.shape[3]
    if channels > 2 * length:
        return torch.einsum("bnci,bndi->bcd", first, second)
    return torch.stack(
        [torch.bmm(a, b.transpose(1, 2)).sum(0) for a, b in zip(first, second)]
    )


def _length(segment: Tuple[int, int]) -> int:
    return segment[1] - segment[0]


__all__ = [
    "polyphase_gram",
    "polyphase_products",
    "shift_gram",
    "supports_polyphase_gram",
    "supports_shift_gram",
]
