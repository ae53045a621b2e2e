"""Applying index patterns tap by tap: strided slices instead of one-hot matrices.

For a fixed kernel tap ``k``, ``Π[:, :, k]`` is a shifted, strided identity: output
``o`` reads input ``o·S + k·D − P``. With zero padding only a contiguous range of
outputs reads real input rows; the rest reads zeros. Two executors use this:

* :func:`im2col` materialises a window operand (the unfolded input) directly in the
  memory layout the contraction wants — one strided copy per tap, borders zeroed —
  without first building a padded copy of the input.
* :func:`run_taps` never materialises the unfolded input: it contracts one tap at a
  time with strided views of the input (and the matching output range of the other
  operands), accumulating into the result. Memory stays at the size of the input,
  which wins when the unfolded input is large compared with the result (depthwise
  convolutions, per-sample quantities).

Padding modes that copy input elements (reflect, replicate, circular) first gather the
padded rows once (the size of the input), then every tap reads a full range.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch.nn.functional as F
from torch import Tensor

from backpack_tn.tn.devices import is_cuda
from backpack_tn.tn.network import DimPlan, Operand, TensorNetwork
from backpack_tn.tn.views import gather_rows


@dataclass(frozen=True)
class TapRange:
    """Outputs ``[out_start, out_stop)`` read rows ``in_start, in_start + S, …``."""

    out_start: int
    out_stop: int
    in_start: int
    stride: int

    @property
    def count(self) -> int:
        """Number of outputs that read real input rows."""
        return self.out_stop - self.out_start

    def in_slice(self) -> slice:
        """Slice of the (prepared) input axis read at this tap."""
        stop = self.in_start + (self.count - 1) * self.stride + 1
        return slice(self.in_start, stop, self.stride)


@dataclass(frozen=True)
class WindowDim:
    """A dimension applied as windows: its geometry on the *prepared* input axis."""

    position: int  # spatial dimension index
    size: int  # length of the prepared axis (after gathering padded rows)
    pad: int  # zero padding before the prepared axis
    output_size: int
    kernel_size: int
    stride: int
    dilation: int
    gather: Optional[Tuple[int, ...]]  # rows to gather first (non-zero padding modes)

    def tap(self, k: int) -> TapRange:
        """Valid outputs and first input row for kernel tap ``k``."""
        offset = k * self.dilation - self.pad
        # smallest o with o·S + offset ≥ 0, largest with o·S + offset ≤ size − 1
        lo = max(0, -(offset // self.stride))
        hi = min(self.output_size, (self.size - 1 - offset) // self.stride + 1)
        hi = max(hi, lo)
        return TapRange(lo, hi, lo * self.stride + offset, self.stride)


def window_dims(plans: Tuple[DimPlan, ...]) -> Tuple[WindowDim, ...]:
    """The window dimensions of a formulation, with their tap geometry."""
    dims = []
    for d, plan in enumerate(plans):
        if plan.kind != "window":
            continue
        view = plan.view
        if view.index is not None:  # gathered padded rows: no zero padding left
            size, pad, gather = len(view.index), 0, view.index
        else:
            size, pad, gather = view.stop, view.pad[0], None
        out, stride, kernel, dilation = view.window
        dims.append(WindowDim(d, size, pad, out, kernel, stride, dilation, gather))
    return tuple(dims)


def supports_direct_windows(op: Operand, plans: Tuple[DimPlan, ...]) -> bool:
    """Whether every non-window dimension of ``op`` is read unchanged."""
    for view, plan in zip(op.views, plans):
        if plan.kind == "window":
            continue
        if view.index is not None or any(view.pad) or view.split or view.window:
            return False
        if view.start != 0 or view.step != 1 or view.stop != plan.geometry.input_size:
            return False
    return True


def _prepare(x: Tensor, dims: Tuple[WindowDim, ...], lead: int) -> Tensor:
    """Gather the padded rows of non-zero padding modes (a copy of input size)."""
    for dim in dims:
        if dim.gather is not None:
            x = gather_rows(x, lead + dim.position, dim.gather)
        elif dim.size != x.shape[lead + dim.position]:  # rows never read
            x = x.narrow(lead + dim.position, 0, dim.size)
    return x


def _taps(dims: Tuple[WindowDim, ...]):
    return itertools.product(*(range(d.kernel_size) for d in dims))


def im2col(
    x: Tensor, op: Operand, plans: Tuple[DimPlan, ...], layout: Tuple[str, ...]
) -> Tensor:
    """Materialise a window operand contiguously in ``layout`` order.

    Args:
        x: The source tensor ``[lead…, I1, …, Id]``.
        op: The window operand (axes in canonical order: lead, then ``o k`` per window
            dimension and one axis per other dimension).
        plans: Per-dimension plans of the formulation.
        layout: Axis order of the result (``op.layout`` or ``op.axes``).

    Returns:
        The unfolded input, contiguous in ``layout`` order.
    """
    dims = window_dims(plans)
    lead = x.dim() - len(plans)
    x = _prepare(x, dims, lead)
    fast = _torch_unfold(x, dims, op, layout, lead)
    if fast is not None:
        return fast
    by_position = {d.position: d for d in dims}
    axis_of: Dict[int, int] = {}  # spatial dim -> canonical index of its first axis
    shape: List[int] = list(x.shape[:lead])
    for p in range(len(plans)):
        axis_of[p] = len(shape)
        dim = by_position.get(p)
        shape += [dim.output_size, dim.kernel_size] if dim else [x.shape[lead + p]]
    sizes = dict(zip(op.axes, shape))
    buffer = x.new_empty([sizes[a] for a in layout])
    canon = buffer.permute([layout.index(a) for a in op.axes])  # a view

    for taps in _taps(dims):
        ranges = {d.position: d.tap(k) for d, k in zip(dims, taps)}
        base: list = [slice(None)] * canon.dim()
        for d, k in zip(dims, taps):
            base[axis_of[d.position] + 1] = k
        for p, r in ranges.items():  # windows reading zero padding at this tap
            borders = [slice(0, r.out_start)] if r.out_start else []
            if r.out_stop < by_position[p].output_size:
                borders.append(slice(r.out_stop, None))
            for border in borders:
                index = list(base)
                index[axis_of[p]] = border
                canon[tuple(index)].zero_()
        if all(r.count for r in ranges.values()):
            dst, src = list(base), [slice(None)] * x.dim()
            for p, r in ranges.items():
                dst[axis_of[p]] = slice(r.out_start, r.out_stop)
                src[lead + p] = r.in_slice()
            canon[tuple(dst)].copy_(x[tuple(src)])
    return buffer


def window_builder(
    shape: Tuple[int, ...],
    op: Operand,
    plans: Tuple[DimPlan, ...],
    layout: Tuple[str, ...],
    device=None,
) -> Callable[[Tensor], Tensor]:
    """:func:`im2col` specialised to sources of one shape: the torch calls only.

    Args:
        shape: Shape of the source tensor.
        op: The window operand.
        plans: Per-dimension plans of the formulation.
        layout: Axis order of the result.
        device: Device of the source (decides :func:`small_window_limit`).

    Returns:
        A function of the source tensor computing what :func:`im2col` computes.
    """
    dims = window_dims(plans)
    lead = len(shape) - len(plans)
    if any(d.gather is not None for d in dims):  # F.unfold does not apply
        return lambda x: im2col(x, op, plans, layout)
    prepared = list(shape)
    for d in dims:  # what _prepare narrows
        prepared[lead + d.position] = d.size
    recipe = _unfold_recipe(
        tuple(prepared), dims, op, tuple(layout), lead, small_window_limit(device)
    )
    if recipe is None:
        return lambda x: im2col(x, op, plans, layout)
    return lambda x: _unfold_by(_prepare(x, dims, lead), recipe)


def unfold_mode(
    lead_shape: Tuple[int, ...],
    dims: Tuple[WindowDim, ...],
    op: Operand,
    layout: Tuple[str, ...],
    num_plans: int,
    small_limit: Optional[int] = None,
) -> Optional[str]:
    """How :func:`im2col` builds a window operand: with torch's im2col or per tap.

    ``F.unfold`` applies to 1 or 2 spatial dims, all zero-padded windows whose padding
    it reproduces. Its output order is ``lead…, k…, o…``; another layout costs one
    permuted copy, worth it only for small operands
    (:data:`SMALL_WINDOW_ELEMENTS_PER_TAP`).

    Args:
        lead_shape: Shape of the source's leading (non-spatial) axes.
        dims: The window dimensions (:func:`window_dims`).
        op: The window operand.
        layout: Axis order of the result.
        num_plans: Number of spatial dimensions of the formulation.
        small_limit: Elements per tap up to which the permuted copy is worth it
            (default :data:`SMALL_WINDOW_ELEMENTS_PER_TAP`).

    Returns:
        ``'natural'`` (one ``F.unfold``), ``'permuted'`` (``F.unfold`` and a copy) or
        ``None`` (the per-tap loop).
    """
    num, lead = len(dims), len(lead_shape)
    if num != num_plans or num not in (1, 2) or lead < 1:
        return None
    if any(d.gather is not None for d in dims):
        return None
    for d in dims:
        span = d.dilation * (d.kernel_size - 1) + 1
        if (d.size + 2 * d.pad - span) // d.stride + 1 != d.output_size:
            return None
    if tuple(layout) == _natural_layout(op, lead, num):
        return "natural"
    outputs = math.prod(d.output_size for d in dims)
    if small_limit is None:
        small_limit = SMALL_WINDOW_ELEMENTS_PER_TAP
    small = math.prod(lead_shape) * outputs <= small_limit
    return "permuted" if small else None


def _natural_layout(op: Operand, lead: int, num: int) -> Tuple[str, ...]:
    k_axes = tuple(op.axes[lead + 2 * i + 1] for i in range(num))
    o_axes = tuple(op.axes[lead + 2 * i] for i in range(num))
    return tuple(op.axes[:lead]) + k_axes + o_axes


def _torch_unfold(
    x: Tensor, dims: Tuple[WindowDim, ...], op: Operand, layout, lead: int
) -> Optional[Tensor]:
    """``F.unfold`` where :func:`unfold_mode` allows it, else ``None``."""
    recipe = _unfold_recipe(
        tuple(x.shape), dims, op, tuple(layout), lead, small_window_limit(x.device)
    )
    return None if recipe is None else _unfold_by(x, recipe)


def _unfold_by(x: Tensor, recipe: tuple) -> Tensor:
    """The torch calls of an :func:`_unfold_recipe` on the (prepared) source ``x``."""
    source_shape, arguments, cols_shape, perm = recipe
    cols = F.unfold(x.reshape(source_shape), *arguments).view(cols_shape)
    return cols if perm is None else cols.permute(perm).contiguous()


@lru_cache(maxsize=1024)
def _unfold_recipe(
    shape: Tuple[int, ...],
    dims: Tuple[WindowDim, ...],
    op: Operand,
    layout: Tuple[str, ...],
    lead: int,
    small_limit: int,
) -> Optional[tuple]:
    """Arguments of :func:`_torch_unfold`'s torch calls, or ``None`` (per-tap loop).

    Cached: deriving them costs tens of microseconds of Python per call, as much as
    the whole unfold of a small operand. ``small_limit`` is
    :func:`small_window_limit` of the device at call time (part of the key: the tests
    lower it to exercise the per-tap loop).
    """
    num = len(shape) - lead
    mode = unfold_mode(shape[:lead], dims, op, layout, num, small_limit)
    if mode is None:
        return None
    geo = [_identity_dim()] * (2 - num) + list(dims)  # F.unfold wants 2 dims
    source_shape = (shape[0], math.prod(shape[1:lead]), *([1] * (2 - num)))
    source_shape += shape[lead:]
    arguments = tuple(
        tuple(getattr(d, name) for d in geo)
        for name in ("kernel_size", "dilation", "pad", "stride")
    )
    cols_shape = (*shape[:lead], *(d.kernel_size for d in dims))
    cols_shape += tuple(d.output_size for d in dims)
    if mode == "natural":
        return source_shape, arguments, cols_shape, None
    natural = _natural_layout(op, lead, num)
    return source_shape, arguments, cols_shape, tuple(map(natural.index, layout))


#: Unfolded elements per kernel tap below which a window operand in a layout
#: ``F.unfold`` does not produce is still built by it, plus one permuted copy. The
#: per-tap loop costs a few small torch calls per tap (≈ 20 µs each on a CPU) but
#: only one strided pass over the data; torch's im2col plus the permuted copy is two
#: calls and two passes (≈ 1.5 ns per element). Measured crossover on a 2-core EPYC
#: CPU: ≈ 16k elements per tap (3×3 and 7×7 kernels, 1–16 channels).
SMALL_WINDOW_ELEMENTS_PER_TAP = 1 << 14

#: The same limit on a GPU. There the per-tap loop's calls are kernel launches of
#: ~10–25 µs each (H100, ``docs/benchmarks.md``: 9–25 taps took 0.3–2.5 ms where one
#: ``F.unfold`` and a GEMM took 0.2–0.3 ms), while a copy moves ~10¹¹ elements per
#: second: the crossover is some 10⁷ elements per tap (≈ 25 µs of copying). An
#: estimate from that run, not a measured crossover.
SMALL_WINDOW_ELEMENTS_PER_TAP_CUDA = 1 << 24


def small_window_limit(device=None) -> int:
    """:data:`SMALL_WINDOW_ELEMENTS_PER_TAP` for ``device`` (read at call time)."""
    if is_cuda(device):
        return SMALL_WINDOW_ELEMENTS_PER_TAP_CUDA
    return SMALL_WINDOW_ELEMENTS_PER_TAP


def _identity_dim() -> WindowDim:
    return WindowDim(-1, 1, 0, 1, 1, 1, 1, None)


@lru_cache(maxsize=256)
def tap_network(net: TensorNetwork) -> TensorNetwork:
    """``net`` with the window dimensions' kernel axes removed (one tap at a time)."""
    kernel_axes = {
        f"k{d.position + 1}{tag}" for d in window_dims(net.plans) for tag in ("", "'")
    }
    operands = tuple(replace(op, layout=None) for op in net.operands)
    return replace(net, operands=operands, dropped=net.dropped | kernel_axes)


def supports_taps(net: TensorNetwork) -> bool:
    """Taps need windows, the input read once, and no pattern left."""
    sources = [op.source for op in net.operands]
    if net.strategy != "window" or sources.count("x") != 1 or None in sources:
        return False
    x_op = net.operands[sources.index("x")]
    return not net.output_views and supports_direct_windows(x_op, net.plans)


def run_taps(
    net: TensorNetwork,
    tensors: Mapping[str, Tensor],
    sizes: Mapping[str, int],
    contract: Callable[[TensorNetwork, list], Tensor],
) -> Tensor:
    """Evaluate a window formulation one kernel tap at a time.

    Args:
        net: A window formulation with :func:`supports_taps`.
        tensors: The tensor arguments by name.
        sizes: Size of every axis of the network.
        contract: Contracts a network given its materialised operands (with the
            network's epilogue).

    Returns:
        The result with axes ``net.result_axes``.
    """
    dims = window_dims(net.plans)
    tap_net = tap_network(net)
    x_op = next(op for op in net.operands if op.source == "x")
    lead = tensors["x"].dim() - len(net.plans)
    x = _prepare(tensors["x"], dims, lead)
    kernel_axis = {f"k{d.position + 1}": d for d in dims}
    out_axis = {f"o{d.position + 1}": d for d in dims}

    result_axes = net.result_axes
    x_position = net.operands.index(x_op)
    out = None
    for taps in _taps(dims):
        ranges = {d.position: d.tap(k) for d, k in zip(dims, taps)}
        if not all(r.count for r in ranges.values()):
            continue  # this tap reads only zero padding
        tap_of = {d.position: k for d, k in zip(dims, taps)}
        operands = []
        for position, op in enumerate(tap_net.operands):
            if position == x_position:
                index = [slice(None)] * lead
                for p in range(len(net.plans)):
                    r = ranges.get(p)
                    index.append(r.in_slice() if r else slice(None))
                tensor = x[tuple(index)]
            else:
                index = []
                for a in op.axes:
                    if a in net.dropped:  # size-1 kernel axis of a simplified dim
                        index.append(0)
                    elif a in kernel_axis:
                        index.append(tap_of[kernel_axis[a].position])
                    elif a in out_axis:
                        r = ranges[out_axis[a].position]
                        index.append(slice(r.out_start, r.out_stop))
                    else:
                        index.append(slice(None))
                tensor = tensors[op.source][tuple(index)]
            operands.append(tensor)
        part = contract(tap_net, operands)
        if out is None:
            out = part.new_zeros([sizes[a] for a in result_axes])
        target: list = []
        for a in result_axes:
            if a in kernel_axis:
                target.append(tap_of[kernel_axis[a].position])
            elif a in out_axis:  # results on the output grid (e.g. forward)
                r = ranges[out_axis[a].position]
                target.append(slice(r.out_start, r.out_stop))
            else:
                target.append(slice(None))
        out[tuple(target)] += part
    if out is None:  # every tap reads only padding
        any_tensor = tensors["x"]
        out = any_tensor.new_zeros([sizes[a] for a in result_axes])
    return out
