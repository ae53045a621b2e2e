"""Small two-operand einsums as one batched GEMM, laid out once per operand shapes.

``torch.einsum`` decides on every call how to permute, reshape and multiply its
operands; for two operands that is a few microseconds of C++ around one ``bmm``
(on this CPU: 12.7 µs for a per-sample gradient's ``'nko,nco->nck'`` whose ``bmm``
takes 3.9 µs), which is as long as the GEMMs of small layers, and on a GPU as long
as their kernels. :func:`compile_pair` makes those decisions once, from the first
operands, and returns a function that runs only the views and the ``bmm``:

* axes of one operand that the result does not keep are summed first;
* the shared axes the result keeps are the batch of the ``bmm``, the shared axes it
  does not keep its inner dimension, the others its rows and columns;
* each operand is passed as a matrix or as a transposed matrix, whichever its
  memory order makes a view (``bmm`` reads both without a copy), and the operands
  swap sides where the result's axis order wants the second operand's axes first,
  so that the result is laid out as the equation's output where it can be.

The rest is left to ``torch.einsum``, whose own layout measured faster there on this
CPU: pairs above :data:`MAX_PAIR_MACS` (batched dot products excepted), pairs whose
batch is not the operands' outer axis or where an operand would need a copy, axes
repeated within one term (diagonals) and broadcast axes.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

PairFn = Callable[[Tensor, Tensor], Tensor]

#: Larger pairs run as ``torch.einsum`` unless they are batched dot products: there
#: the microseconds saved are lost in the GEMM, and ``torch.einsum``'s orientation of
#: the GEMM measured up to 2× faster on this CPU (``df,abcde->fabce``: 3 result rows,
#: 3072–98304 columns). Batched dot products (one row, one column) ran 5–14× faster
#: as a ``bmm`` at every size measured: ``torch.einsum`` multiplies element-wise,
#: then sums.
MAX_PAIR_MACS = 1 << 18


def _view_or_none(tensor: Tensor, shape: Sequence[int]) -> Optional[Tensor]:
    try:
        return tensor.view(shape)
    except RuntimeError:  # the memory order needs a copy
        return None


def _batch_outermost(tensor: Tensor, term: str, batch: Sequence[str]) -> bool:
    """Whether the batch axes of ``tensor`` (those of size > 1) vary slowest.

    A ``bmm`` over a batch that is not the outer axis reads its matrices strided:
    ``gefdab,abfgde->a`` (batch ``ab`` last) ran at 0.75× of ``torch.einsum``.
    """
    strides = dict(zip(term, tensor.stride()))
    sizes = dict(zip(term, tensor.shape))
    batch_strides = [strides[c] for c in batch if sizes[c] > 1]
    other = [strides[c] for c in term if c not in batch and sizes[c] > 1]
    return not batch_strides or not other or min(batch_strides) >= max(other)


class _Side:
    """How one operand becomes a ``[B, rows, inner]`` matrix (or its transpose)."""

    def __init__(self, term: str, summed: str, order: List[str], inner_first: bool):
        kept = [c for c in term if c not in summed]
        self.sum_dims = tuple(i for i, c in enumerate(term) if c in summed)
        self.permutation = tuple(kept.index(c) for c in order)
        self.identity = self.permutation == tuple(range(len(kept)))
        self.inner_first = inner_first

    def __call__(self, tensor: Tensor, shape: Tuple[int, int, int]) -> Tensor:
        if self.sum_dims:
            tensor = tensor.sum(self.sum_dims)
        if not self.identity:
            tensor = tensor.permute(self.permutation)
        if self.inner_first:  # laid out [B, inner, rows]: pass the transpose
            return tensor.reshape(shape[0], shape[2], shape[1]).transpose(1, 2)
        return tensor.reshape(shape)


def _side(
    term: str,
    summed: str,
    batch: List[str],
    rows: List[str],
    inner: List[str],
    tensor: Tensor,
    shape: Tuple[int, int, int],
    allow_copy: bool,
) -> Optional[_Side]:
    """The operand's layout that views its memory, rows-first where both do.

    Where neither does: the rows-first layout (a copy) if ``allow_copy``, else ``None``.
    """
    options = [
        _Side(term, summed, batch + rows + inner, inner_first=False),
        _Side(term, summed, batch + inner + rows, inner_first=True),
    ]
    reduced = tensor
    if summed:  # a sum's result is contiguous: its layout, without computing it
        kept = [n for c, n in zip(term, tensor.shape) if c not in summed]
        reduced = torch.empty(kept, device="meta")
    for side in options:
        permuted = reduced.permute(side.permutation)
        flat = (shape[0], shape[2], shape[1]) if side.inner_first else tuple(shape)
        if _view_or_none(permuted, flat) is not None:
            return side
    return options[0] if allow_copy else None


def compile_pair(
    equation: str, a: Tensor, b: Tensor, allow_copy: bool = False
) -> Optional[PairFn]:
    """``torch.einsum(equation, a, b)`` as one ``bmm``, planned for these operands.

    Args:
        equation: Explicit two-operand equation (``'ab,bc->ac'``), no ellipsis.
        a: First operand (its shape and memory order are used for planning).
        b: Second operand.
        allow_copy: Plan every pair ``bmm`` can express, whatever its size and
            layout, copying operands where needed (tests use it to check the
            layouts); by default only the pairs described in the module docstring.

    Returns:
        A function of two operands of the same shapes (any memory order) that returns
        what ``torch.einsum`` returns, or ``None`` where ``torch.einsum`` should run.
    """
    inputs, out = equation.replace(" ", "").split("->")
    ta, tb = inputs.split(",")
    terms = (ta, tb, out)
    if any(len(set(t)) != len(t) for t in terms) or set(out) - set(ta + tb):
        return None
    if len(ta) != a.dim() or len(tb) != b.dim():
        return None
    size = dict(zip(ta, a.shape))
    for c, n in zip(tb, b.shape):
        if size.setdefault(c, n) != n:  # broadcasting: leave it to torch.einsum
            return None
    batch = [c for c in out if c in ta and c in tb]
    a_rows = [c for c in out if c in ta and c not in tb]
    b_rows = [c for c in out if c in tb and c not in ta]
    inner = [c for c in ta if c in tb and c not in out]
    a_summed = "".join(c for c in ta if c not in tb and c not in out)
    b_summed = "".join(c for c in tb if c not in ta and c not in out)

    def prod(axes: List[str]) -> int:
        return math.prod(size[c] for c in axes)

    n_batch, n_inner = prod(batch), prod(inner)
    if not allow_copy:
        dot = not a_rows and not b_rows
        macs = n_batch * prod(a_rows) * prod(b_rows) * n_inner
        if not dot and macs > MAX_PAIR_MACS:
            return None
        if not (_batch_outermost(a, ta, batch) and _batch_outermost(b, tb, batch)):
            return None
    # the result's axis order after the batch: a's axes first, or b's
    rest = [c for c in out if c not in batch]
    swap = bool(b_rows) and bool(a_rows) and rest == b_rows + a_rows
    if swap:
        (ta, a_rows, a_summed, a), (tb, b_rows, b_summed, b) = (
            (tb, b_rows, b_summed, b),
            (ta, a_rows, a_summed, a),
        )
    left_shape = (n_batch, prod(a_rows), n_inner)
    right_shape = (n_batch, prod(b_rows), n_inner)  # the right side transposed
    left = _side(ta, a_summed, batch, a_rows, inner, a, left_shape, allow_copy)
    right = _side(tb, b_summed, batch, b_rows, inner, b, right_shape, allow_copy)
    if left is None or right is None:
        return None
    produced = batch + a_rows + b_rows  # the bmm result's axes
    result_shape = tuple(size[c] for c in produced)
    permutation = tuple(produced.index(c) for c in out)
    identity = permutation == tuple(range(len(out)))

    def run(a: Tensor, b: Tensor) -> Tensor:
        if swap:
            a, b = b, a
        # ``right`` lays b out as [B, columns, inner]: its transpose is [B, inner, N]
        product = torch.bmm(left(a, left_shape), right(b, right_shape).transpose(1, 2))
        product = product.view(result_shape)
        return product if identity else product.permute(permutation)

    return run
