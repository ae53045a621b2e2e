"""Index patterns (DESIGN §2.1), their structure, and a device-aware cache.

``Π[i, o, k] = 1`` iff output ``o`` reads input ``i`` at kernel tap ``k``. For padding
modes other than ``'zeros'`` a padded position is a copy of an input element, so the
pattern points at that element and no padded copy of the input is ever needed.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Tuple

import torch
from torch import Tensor

from backpack_tn.tn.cache import LRUCache
from backpack_tn.tn.geometry import DimGeometry

_PATTERNS: LRUCache[Tensor] = LRUCache("patterns", maxsize=256)


@lru_cache(maxsize=4096)
def source_indices(dim: DimGeometry) -> Tuple[Tuple[int | None, ...], ...]:
    """Input index read by every ``(o, k)``, as nested tuples ``[o][k]``.

    Args:
        dim: Geometry of one spatial dimension.

    Returns:
        ``idx[o][k]``: the input index, or ``None`` for a zero-padded position.
    """
    return tuple(
        tuple(dim.source_index(o, k) for k in range(dim.kernel_size))
        for o in range(dim.output_size)
    )


@lru_cache(maxsize=4096)
def touched_rows(dim: DimGeometry) -> Tuple[int, int]:
    """Smallest half-open input range ``[start, stop)`` that any output reads.

    Rows outside it never influence the convolution (the *crop* simplification).

    Args:
        dim: Geometry of one spatial dimension.

    Returns:
        ``(start, stop)``; ``(0, 0)`` if only zero padding is read.
    """
    rows = [i for row in source_indices(dim) for i in row if i is not None]
    if not rows:
        return (0, 0)
    return (min(rows), max(rows) + 1)


def is_dense(dim: DimGeometry) -> bool:
    """Whether windows tile the input without overlap, padding or holes between taps.

    Covers the identity (``K = S = 1``), down-sampling (``K = 1 < S``) and
    non-overlapping (``S ≥ K``, e.g. patchify stems with ``K = S``) cases: output ``o``
    then reads the contiguous rows ``o·S … o·S + K − 1``, so a reshape replaces the
    pattern.

    Args:
        dim: Geometry of one spatial dimension.

    Returns:
        ``True`` if the pattern can be replaced by slicing and reshaping the input.
    """
    return (
        not dim.padded
        and dim.stride >= dim.kernel_size
        and (dim.dilation == 1 or dim.kernel_size == 1)
    )


def structure(dim: DimGeometry) -> str:
    """Name the structure of a dimension's index pattern.

    Args:
        dim: Geometry of one spatial dimension.

    Returns:
        ``'identity'``, ``'downsample'``, ``'dense'``, ``'crop'`` (general pattern
        whose untouched input rows can be cut off) or ``'general'``.
    """
    if is_dense(dim):
        if dim.kernel_size == 1:
            return "identity" if dim.stride == 1 else "downsample"
        return "dense"
    if touched_rows(dim) != (0, dim.input_size):
        return "crop"
    return "general"


def _build_pattern(
    dim: DimGeometry,
    rows: Tuple[int, int],
    reduced: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    start, stop = rows
    pattern = torch.zeros(
        stop - start, dim.output_size, dim.kernel_size, dtype=dtype, device="cpu"
    )
    for o, taps in enumerate(source_indices(dim)):
        for k, i in enumerate(taps):
            if i is not None and start <= i < stop:
                pattern[i - start, o, k] = 1
    if reduced:
        pattern = pattern.sum(1)
    # Build on the CPU (tiny, Python-indexed) and move once: avoids many device writes.
    return pattern.to(device)


def index_pattern(
    dim: DimGeometry,
    *,
    rows: Tuple[int, int] | None = None,
    reduced: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Return the (cached) index pattern of one spatial dimension.

    Args:
        dim: Geometry of the dimension.
        rows: Input row range ``[start, stop)`` to keep (default: all rows).
        reduced: If ``True``, return ``Π̄[i, k] = Σ_o Π[i, o, k]`` (for KFAC-reduce).
        dtype: Data type of the pattern.
        device: Device of the pattern.

    Returns:
        ``Π[i, o, k]`` of shape ``[stop − start, O, K]``, or ``Π̄`` of shape
        ``[stop − start, K]`` if ``reduced``. Treat it as read-only: it is shared.
    """
    rows = (0, dim.input_size) if rows is None else tuple(rows)
    device = torch.device(device)
    key = (dim, rows, reduced, dtype, device)
    return _PATTERNS.get_or_create(
        key, lambda: _build_pattern(dim, rows, reduced, dtype, device)
    )
