"""Symmetric Gram matrices ``u uᵀ`` from about half of the products.

A Gram matrix is symmetric, but a GEMM computes both triangles. Splitting the rows of
``u`` into blocks and multiplying each block of rows only with itself and the rows
after it computes the block upper triangle (``(B + 1)/(2B)`` of the products for ``B``
blocks); the blocks below the diagonal are their transposes, copied. The copy costs
one pass over the ``R × R`` result and thinner GEMMs, so this pays off when the inner
dimension is long — the KFAC-expand factor of a convolution, whose inner dimension is
every sample's every output position. With a short one (fewer than
:data:`MIN_INNER` columns) one GEMM is faster: measured on this CPU, 4608 rows × 98
columns 85 ms (one GEMM) vs 91 ms (blocks); 2304 × 1568 218 vs 108 ms.
"""

from __future__ import annotations

import torch
from torch import Tensor

from backpack_tn.tn.devices import is_cuda

#: Rows per block below which blocks stop paying: thinner GEMMs run less efficiently,
#: and every block adds two torch calls.
MIN_BLOCK_ROWS = 128

#: Inner dimensions shorter than this use one GEMM (see the module docstring).
MIN_INNER = 256

#: At most this many blocks: the saved products approach half (``(B + 1)/(2B)``)
#: while the calls keep growing. Measured on a 2-core EPYC (one thread), ``R`` = 576
#: to 4608 rows: 8 blocks 1.3–1.8× faster than one GEMM, 16 blocks no better.
MAX_BLOCKS = 8


def default_blocks(rows: int, inner: int, device=None) -> int:
    """Blocks :func:`symmetric_gram` uses for ``rows × inner`` matrices by default.

    One on a GPU: there every block's GEMM and mirror copy is a kernel launch of
    ~10–25 µs (measured per torch call on an H100, ``docs/benchmarks.md``), the time
    of ~10⁹ multiply-adds, more than the halved products of a KFAC factor save.
    """
    if inner < MIN_INNER or is_cuda(device):
        return 1
    return max(1, min(MAX_BLOCKS, rows // MIN_BLOCK_ROWS))


def product_fraction(rows: int, inner: int, device=None) -> float:
    """Fraction of a GEMM's products that :func:`symmetric_gram` computes by default."""
    blocks = min(default_blocks(rows, inner, device), max(rows, 1))
    return (blocks + 1) / (2 * blocks)


def symmetric_gram(u: Tensor, blocks: int | None = None) -> Tensor:
    """``u uᵀ`` for a batch of matrices, computing only the block upper triangle.

    Args:
        u: ``[B, R, M]``.
        blocks: Number of row blocks, of equal size up to one row (default: as
            many as keep at least :data:`MIN_BLOCK_ROWS` rows each, at most
            :data:`MAX_BLOCKS`, one if ``M <`` :data:`MIN_INNER` or on a GPU; at
            most one per row).

    Returns:
        ``[B, R, R]``; the blocks below the diagonal blocks are copies of those
        above.

    Raises:
        ValueError: If ``blocks`` is not positive.
    """
    batch, rows, inner = u.shape
    if blocks is None:
        blocks = default_blocks(rows, inner, u.device)
    if blocks < 1:
        raise ValueError(f"blocks must be positive, got {blocks}.")
    blocks = min(blocks, max(rows, 1))
    if blocks == 1:
        return torch.bmm(u, u.transpose(1, 2))
    bounds = [i * rows // blocks for i in range(blocks + 1)]
    out = u.new_empty(batch, rows, rows)
    for start, stop in zip(bounds, bounds[1:]):
        # this block of rows against itself and every later row
        band = torch.bmm(u[:, start:stop], u[:, start:].transpose(1, 2))
        out[:, start:stop, start:] = band
        if stop < rows:  # the mirror image below the diagonal block
            out[:, stop:, start:stop] = band[:, :, stop - start :].transpose(1, 2)
    return out


__all__ = [
    "symmetric_gram",
    "default_blocks",
    "product_fraction",
    "MIN_BLOCK_ROWS",
    "MIN_INNER",
    "MAX_BLOCKS",
]
