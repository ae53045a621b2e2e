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
(implicit: padded positions contribute nothing) and stride 1; the caller chooses
between this and the tensor network by measuring both.
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


def supports_shift_gram(geometry: ConvGeometry) -> bool:
    """Whether :func:`shift_gram` applies: stride 1, zero padding, a kernel > 1."""
    dims = geometry.dims
    return (
        all(d.stride == 1 and d.padding_mode == "zeros" for d in dims)
        and math.prod(d.kernel_size for d in dims) > 1
    )


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

    lead = (slice(None),) * 3
    gram = x.new_zeros(batch, channels, *kernel, channels, *kernel)
    spatial = tuple(range(len(dims)))
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
        boxes = x.new_empty(
            *(len(p.segments) for p in plans), batch, channels, channels
        )
        # the largest segment of every trailing dimension: its boxes come from the
        # whole-row sums minus the (thin) other boxes
        bulk = tuple(
            max(range(len(p.segments)), key=lambda i, p=p: _length(p.segments[i]))
            for p in plans[1:]
        )
        rest = list(itertools.product(*(range(len(p.segments)) for p in plans[1:])))
        for s1, (a, b) in enumerate(plans[0].segments):
            start = a * row  # whole padded rows a, …, b − 1
            length = (b - a) * row
            first = padded[..., start : start + length]
            second = padded[..., start + shift : start + shift + length]
            rows = _row_sum(first, second)  # [B, C, C]
            for index in rest:
                if index == bulk:
                    continue
                boxes[(s1, *index)] = _box(x, plans, (s1, *index), lead)
                rows = rows - boxes[(s1, *index)]
            boxes[(s1, *bulk)] = rows
        for covers in itertools.product(*(p.cover for p in plans)):
            taps = tuple(k for k, _, _ in covers)
            partners = tuple(k + o for k, o in zip(taps, offset))
            ranges = tuple(slice(first, stop) for _, first, stop in covers)
            total = boxes[ranges].sum(spatial)  # empty cover: zeros
            gram[(slice(None), slice(None), *taps, slice(None), *partners)] = total
            if offset != zero:
                mirror = (slice(None), slice(None), *partners, slice(None), *taps)
                gram[mirror] = total.transpose(1, 2)
    size = channels * math.prod(kernel)
    return gram.reshape(batch, size, size)


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


def _box(x: Tensor, plans, index, lead) -> Tensor:
    """``Σ_{n, t ∈ box} x[c, t] x[c', t + δ]`` for one box: ``[B, C, C']``."""
    first = lead + tuple(slice(*p.segments[i]) for p, i in zip(plans, index))
    second = lead + tuple(
        slice(p.segments[i][0] + p.shift, p.segments[i][1] + p.shift)
        for p, i in zip(plans, index)
    )
    return torch.einsum("bnc...,bnd...->bcd", x[first], x[second])


__all__ = ["shift_gram", "supports_shift_gram"]
