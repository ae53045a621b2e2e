"""Materialise and contract symbolic tensor networks with cached contraction plans.

The evaluation strategy is chosen here, per call, from cached information only:

1. **Formulation**: an operation may come as several equivalent networks (e.g. batch L2
   through per-sample gradients or through the Gram form). Each is planned once with
   ``opt_einsum`` for the concrete shapes (plan cached per equation, shapes, dtype and
   device) and the one with the lower estimated cost — contraction FLOPs plus the
   element-wise epilogue — is used.
2. **Batch chunking**: if the plan's largest intermediate exceeds the memory budget
   (:func:`set_memory_budget`), the batch axis ``n`` is split into chunks that are
   contracted one after another and concatenated (``n`` kept) or summed (``n``
   contracted) — bounding memory at the price of more, smaller contractions.

New strategies (e.g. strided-view application of patterns) plug in as further
formulations or executors in :data:`EXECUTORS`; callers do not change.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import opt_einsum
import torch
import torch.nn.functional as F
from torch import Tensor

from backpack_tn.tn.cache import LRUCache
from backpack_tn.tn.network import Operand, SpatialView, TensorNetwork
from backpack_tn.tn.patterns import index_pattern

Shape = Tuple[int, ...]

_BUDGET: Dict[str, Optional[int]] = {"bytes": 2**30}
_FORCED: Dict[str, Optional[str]] = {"strategy": None}
STRATEGIES = ("pattern", "window")


@contextmanager
def force_strategy(strategy: Optional[str]) -> Iterator[None]:
    """Within the context, use only formulations of one strategy where available.

    For benchmarks and tests; normal use lets the engine choose.

    Args:
        strategy: ``'pattern'`` (contract index patterns), ``'window'`` (strided
            views of the padded input) or ``None`` (automatic choice).

    Yields:
        Nothing.

    Raises:
        ValueError: For an unknown strategy.
    """
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES} or None, got {strategy!r}.")
    previous = _FORCED["strategy"]
    _FORCED["strategy"] = strategy
    try:
        yield
    finally:
        _FORCED["strategy"] = previous


def set_memory_budget(num_bytes: Optional[int]) -> None:
    """Bound the largest intermediate of a contraction; ``None`` disables chunking.

    Args:
        num_bytes: Budget in bytes (default 1 GiB) or ``None``.

    Raises:
        ValueError: If the budget is not positive.
    """
    if num_bytes is not None and num_bytes <= 0:
        raise ValueError(f"memory budget must be positive or None, got {num_bytes}.")
    _BUDGET["bytes"] = num_bytes


def get_memory_budget() -> Optional[int]:
    """Current memory budget in bytes (``None``: unbounded)."""
    return _BUDGET["bytes"]


@dataclass(frozen=True)
class ContractionPlan:
    """A planned contraction: the compiled expression and its cost estimates."""

    expression: Callable
    flops: float
    largest_intermediate: int  # elements


_PLANS: LRUCache[ContractionPlan] = LRUCache("contractions", maxsize=1024)


def _plan(equation: str, shapes: Sequence[Shape], dtype, device) -> ContractionPlan:
    def create() -> ContractionPlan:
        _, info = opt_einsum.contract_path(equation, *shapes, shapes=True)
        expression = opt_einsum.contract_expression(
            equation, *shapes, optimize=info.path
        )
        return ContractionPlan(
            expression, float(info.opt_cost), int(info.largest_intermediate)
        )

    return _PLANS.get_or_create((equation, tuple(shapes), dtype, device), create)


# --- views on input-like tensors ------------------------------------------------------


def _view_length(view: SpatialView) -> int:
    rows = len(view.index) if view.index is not None else len(range(view.start, view.stop, view.step))
    return rows + sum(view.pad)


def _viewed_shape(shape: Shape, views: Tuple[SpatialView, ...]) -> Shape:
    lead = len(shape) - len(views)
    out = list(shape[:lead])
    for view in views:
        if view.split:
            out.extend(view.split[::2])
        elif view.window:
            out.extend((view.window[0], view.window[2]))
        else:
            out.append(_view_length(view))
    return tuple(out)


def _apply_views(tensor: Tensor, views: Tuple[SpatialView, ...]) -> Tensor:
    """Slice, gather, pad and cut windows on the trailing spatial axes.

    Everything but the gather and the zero padding is a view of the input.
    """
    lead = tensor.dim() - len(views)
    # Walk backwards so turning an axis into two does not shift the ones to visit.
    for pos in reversed(range(lead, tensor.dim())):
        view = views[pos - lead]
        if view.index is not None:
            index = torch.tensor(view.index, device=tensor.device)
            tensor = tensor.index_select(pos, index)
        elif (view.start, view.stop, view.step) != (0, tensor.shape[pos], 1):
            index = (slice(None),) * pos + (slice(view.start, view.stop, view.step),)
            tensor = tensor[index]
        if any(view.pad):
            pad = [0] * (2 * (tensor.dim() - pos))
            pad[-2:] = view.pad
            tensor = F.pad(tensor, pad)
        if view.split:
            out, stride, kernel = view.split
            shape = tensor.shape
            tensor = tensor.reshape(*shape[:pos], out, stride, *shape[pos + 1 :])
            if kernel != stride:
                tensor = tensor.narrow(pos + 1, 0, kernel)
        elif view.window:
            out, stride, kernel, dilation = view.window
            span = dilation * (kernel - 1) + 1
            tensor = tensor.unfold(pos, span, stride).movedim(-1, pos + 1)
            if dilation > 1:
                index = (slice(None),) * (pos + 1) + (slice(None, None, dilation),)
                tensor = tensor[index]
    return tensor


def _embed(result: Tensor, views: Tuple[SpatialView, ...], sizes: Shape) -> Tensor:
    """Inverse of :func:`_apply_views`: scatter ``result`` into zeros of full size."""
    lead = result.dim() - sum(2 if v.split else 1 for v in views)
    # On the enlarged zero tensor the zero-padding of a view is real storage.
    # (Only slices and non-overlapping splits occur here: see conv.py.)
    views = tuple(replace(v, stop=v.stop + v.pad[1], pad=(0, 0)) for v in views)
    padded = [max(size, v.stop) for size, v in zip(sizes, views)]
    full = result.new_zeros(*result.shape[:lead], *padded)
    target = _apply_views(full, views)
    target.copy_(result)  # the views are genuine views of ``full``: writes land in it
    crop = (slice(None),) * lead + tuple(slice(0, s) for s in sizes)
    return full[crop]


# --- operands -------------------------------------------------------------------------


def _operand_shape(net: TensorNetwork, op: Operand, shapes: Mapping[str, Shape]):
    if op.source is None:
        ref = op.pattern
        rows = ref.rows[1] - ref.rows[0]
        full = (
            (rows, ref.geometry.kernel_size)
            if ref.reduced
            else (
                rows,
                ref.geometry.output_size,
                ref.geometry.kernel_size,
            )
        )
    else:
        full = _viewed_shape(shapes[op.source], op.views)
    sizes = dict(zip(op.axes, full))
    return tuple(sizes[a] for a in net.kept(op.contracted_axes))


def _materialise_all(
    net: TensorNetwork, tensors: Mapping[str, Tensor], dtype, device
) -> list:
    """All operands; an input read twice the same way is viewed (and copied) once."""
    done: Dict[tuple, Tensor] = {}
    operands = []
    for op in net.operands:
        if op.source is None:
            ref = op.pattern
            operands.append(
                index_pattern(
                    ref.geometry,
                    rows=ref.rows,
                    reduced=ref.reduced,
                    dtype=dtype,
                    device=device,
                )
            )
            continue
        drop = tuple(p for p, a in enumerate(op.axes) if a in net.dropped)
        key = (op.source, op.views, drop, op.layout)
        if key not in done:
            tensor = _apply_views(tensors[op.source], op.views)
            tensor = tensor.squeeze(drop) if drop else tensor
            if op.layout is not None:
                kept = net.kept(op.axes)
                perm = [kept.index(a) for a in net.kept(op.layout)]
                tensor = tensor.permute(perm).contiguous()
            done[key] = tensor
        operands.append(done[key])
    return operands


# --- execution ------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """The formulation and execution parameters picked for one call."""

    network: TensorNetwork
    plan: ContractionPlan
    chunks: int
    executor: str = "einsum"


def _epilogue_cost(net: TensorNetwork, shapes: Sequence[Shape]) -> float:
    if not net.square_sum:
        return 0.0
    sizes = {}
    for op, shape in zip(net.operands, shapes):
        sizes.update(zip(net.kept(op.contracted_axes), shape))
    return float(math.prod(sizes[a] for a in net.kept(net.output)))


def choose(
    formulations: Sequence[TensorNetwork],
    shapes: Mapping[str, Shape],
    dtype: torch.dtype,
    device: torch.device,
) -> Choice:
    """Pick the cheapest formulation and the number of batch chunks.

    Args:
        formulations: Equivalent networks.
        shapes: Shapes of the tensor arguments by name.
        dtype: Data type of the computation.
        device: Device of the computation.

    Returns:
        The choice; all planning information comes from caches after the first call.
    """
    forced = _FORCED["strategy"]
    if forced is not None:
        matching = [f for f in formulations if f.strategy == forced]
        formulations = matching or formulations
    best = None
    for net in formulations:
        op_shapes = [_operand_shape(net, op, shapes) for op in net.operands]
        plan = _plan(net.equation, op_shapes, dtype, device)
        cost = plan.flops + _epilogue_cost(net, op_shapes)
        if best is None or cost < best[0]:
            best = (cost, net, plan)
    _, net, plan = best
    chunks = 1
    budget = _BUDGET["bytes"]
    batch = shapes["x"][0] if "x" in shapes else shapes.get("v", (1,))[0]
    item = torch.empty((), dtype=dtype).element_size()
    if budget is not None and plan.largest_intermediate * item > budget:
        if all("n" in op.axes for op in net.operands if op.source in ("x", "v", "s")):
            chunks = min(batch, math.ceil(plan.largest_intermediate * item / budget))
    return Choice(net, plan, max(chunks, 1))


def _contract(net: TensorNetwork, plan: ContractionPlan, operands: list) -> Tensor:
    result = plan.expression(*operands, backend="torch")
    if net.square_sum:
        out = net.kept(net.output)
        dims = tuple(out.index(a) for a in net.square_sum if a in out)
        # The contraction result is fresh memory unless it aliases an operand.
        fresh = all(result.data_ptr() != t.data_ptr() for t in operands)
        result = (result.pow_(2) if fresh else result.pow(2)).sum(dims)
    return result


def _run_einsum(choice: Choice, tensors: Mapping[str, Tensor]) -> Tensor:
    net = choice.network
    any_tensor = next(iter(tensors.values()))
    dtype, device = any_tensor.dtype, any_tensor.device
    if choice.chunks == 1:
        operands = _materialise_all(net, tensors, dtype, device)
        return _contract(net, choice.plan, operands)

    # ``n`` is a leading axis, so its position is the same before and after views.
    batch_axis = {
        op.source: op.axes.index("n")
        for op in net.operands
        if op.source is not None and "n" in op.axes
    }
    name, pos = next(iter(batch_axis.items()))
    batch = tensors[name].shape[pos]
    size = math.ceil(batch / choice.chunks)
    result_axes = net.result_axes
    keep_n = "n" in result_axes
    pieces, total = [], None
    for start in range(0, batch, size):
        chunk = {
            name: t.narrow(batch_axis[name], start, min(size, batch - start))
            if name in batch_axis
            else t
            for name, t in tensors.items()
        }
        operands = _materialise_all(net, chunk, dtype, device)
        shapes = [tuple(o.shape) for o in operands]
        plan = _plan(net.equation, shapes, dtype, device)
        part = _contract(net, plan, operands)
        if keep_n:
            pieces.append(part)
        else:
            total = part if total is None else total.add_(part)
    return torch.cat(pieces, result_axes.index("n")) if keep_n else total


EXECUTORS: Dict[str, Callable[[Choice, Mapping[str, Tensor]], Tensor]] = {
    "einsum": _run_einsum,
}


def evaluate(
    formulations: Sequence[TensorNetwork], tensors: Mapping[str, Tensor]
) -> Tensor:
    """Evaluate an operation given as equivalent networks on concrete tensors.

    Args:
        formulations: Equivalent networks (from :func:`backpack_tn.tn.conv.networks`).
        tensors: The tensor arguments by name (``'x'``, ``'w'``, ``'v'``, ``'s'``), with
            channel axes already split into groups.

    Returns:
        The result, with axes ``network.result_axes`` (size-1 kernel axes removed by
        simplifications are absent; reshape to the target shape). Results on the
        input grid are embedded back to the full input size.
    """
    any_tensor = next(iter(tensors.values()))
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    choice = choose(formulations, shapes, any_tensor.dtype, any_tensor.device)
    result = EXECUTORS[choice.executor](choice, tensors)
    net = choice.network
    if net.output_views:
        sizes = tuple(p.geometry.input_size for p in net.plans)
        result = _embed(result, net.output_views, sizes)
    return result
