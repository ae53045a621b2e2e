"""Tensor-in, tensor-out convolution quantities computed as tensor networks.

Every function works for any number of spatial dimensions (inferred from the tensors),
takes the hyper-parameters of ``torch.nn.ConvNd`` as keywords (ints or tuples; padding
also ``'same'``/``'valid'``; every ``padding_mode``) and a ``simplify`` switch that
turns the structural simplifications of DESIGN §2.3 on (default) or off. Nothing here
knows about BackPACK or curvlinops; the integrations call these functions.

Shapes use ``N`` batch, ``C_in``/``C_out`` channels, ``G`` groups, ``I``/``O``/``K``
spatial input/output/kernel sizes, ``V`` the leading dimension of a backpropagated
GGN factor (classes or Monte-Carlo samples).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from backpack_tn.tn.cache import LRUCache
from backpack_tn.tn.conv import networks
from backpack_tn.tn.evaluate import (
    chosen_memory,
    evaluate,
    fastest,
    fastest_choice,
    get_autotune,
    keep_first,
    native_allowed,
    plan_settings,
    prepared_run,
)
from backpack_tn.tn.geometry import ConvGeometry, IntOrTuple, Padding, make_geometry
from backpack_tn.tn.shifts import (
    polyphase_gram,
    polyphase_products,
    shift_gram,
    supports_polyphase_gram,
    supports_shift_gram,
)

__all__ = [
    "conv",
    "unfold",
    "input_vjp",
    "weight_vjp",
    "kfac_input_factor",
    "averaged_patches",
    "group_average",
    "diag_ggn_weight",
    "sqrt_ggn_weight",
    "batch_l2_weight",
    "sum_grad_squared_weight",
]

KFAC_APPROXIMATIONS = ("expand", "reduce")
GROUPS_MODES = ("average", "separate")


def _check_rank(tensor: Tensor, name: str, rank: int, layout: str) -> None:
    if tensor.dim() != rank:
        raise ValueError(
            f"{name} must have {rank} dimensions {layout}, got shape "
            f"{tuple(tensor.shape)}."
        )


def _spatial_dims(x: Tensor, name: str = "x") -> int:
    if x.dim() < 3:
        raise ValueError(
            f"{name} must have shape [N, C, *spatial] with at least one spatial "
            f"dimension, got shape {tuple(x.shape)}."
        )
    return x.dim() - 2


def _check_channels(channels: int, groups: int, name: str) -> None:
    if channels % groups != 0:
        raise ValueError(f"{name} ({channels}) must be divisible by groups ({groups}).")


def _geometry(
    input_shape: Sequence[int],
    kernel_size: IntOrTuple,
    stride: IntOrTuple,
    padding: Padding,
    dilation: IntOrTuple,
    groups: int,
    padding_mode: str,
) -> ConvGeometry:
    args = (
        tuple(input_shape[2:]),
        _hashable(kernel_size),
        _hashable(stride),
        _hashable(padding),
        _hashable(dilation),
        groups,
        padding_mode,
    )
    if _all_exact(args[1:]):
        geometry = _cached_geometry(*args)
    else:  # e.g. a list, or a float equal to a cached int: validate uncached
        geometry = make_geometry(*args)
    _check_channels(input_shape[1], groups, "input channels")
    return geometry


def _hashable(value):
    return tuple(value) if isinstance(value, (list, torch.Size)) else value


# Validation and normalisation are pure: small problems would otherwise pay for them
# on every call (tens of microseconds next to a sub-millisecond kernel).
# ``typed``: ``True`` and ``1`` are different arguments (validation tells them apart).
_cached_geometry = functools.lru_cache(maxsize=1024, typed=True)(make_geometry)


def _check_output(tensor: Tensor, name: str, geometry: ConvGeometry, lead: int):
    """Check ``tensor``'s trailing spatial dims match the convolution output."""
    _check_rank(tensor, name, lead + 1 + len(geometry.dims), "(leading, C_out, *O)")
    if tuple(tensor.shape[lead + 1 :]) != geometry.output_size:
        raise ValueError(
            f"{name} has spatial size {tuple(tensor.shape[lead + 1 :])}, but the "
            f"convolution's output size is {geometry.output_size}."
        )
    _check_channels(tensor.shape[lead], geometry.groups, f"{name} channels")


def _group_input(x: Tensor, groups: int) -> Tensor:
    n, c = x.shape[:2]
    return x.reshape(n, groups, c // groups, *x.shape[2:])


#: From this many input elements on, a CPU reduction over the groups axis (a strided,
#: outer axis) ran at 10–12 GB/s, 1.6–2.0× slower than a GEMM with a row of ``1/G``
#: (inputs of 2–10 M elements, MobileNet-v2's depthwise layers at batch 8); smaller
#: inputs stay in cache, and there the reduction is faster.
_GEMM_MEAN_ELEMENTS = 3 << 19


def group_average(x: Tensor, groups: int) -> Tensor:
    """Average a convolution's input over its channel groups.

    curvlinops' convention for the input-based Kronecker factor of a grouped
    convolution: one factor for all groups, from the group-averaged input.

    Args:
        x: Input ``[N, C_in, *I]``.
        groups: Number of channel groups (divides ``C_in``).

    Returns:
        ``[N, C_in/G, *I]``; ``x`` itself if ``groups == 1``.
    """
    if groups == 1:
        return x
    n, c = x.shape[:2]
    grouped = x.reshape(n, groups, -1)
    # float32/64 only: in half precisions the weight 1/G would be rounded (a bias)
    gemm = x.dtype in (torch.float32, torch.float64) and x.device.type == "cpu"
    if gemm and x.numel() >= _GEMM_MEAN_ELEMENTS:
        weights = x.new_full((1, groups), 1.0 / groups)
        mean = torch.matmul(weights, grouped)  # [N, 1, C_in/G·ΠI]
    else:
        mean = grouped.mean(1)
    return mean.reshape(n, c // groups, *x.shape[2:])


def _native(geometry: ConvGeometry, simplify: bool) -> Optional[dict]:
    """Torch kernel arguments if torch's own convolution computes the same thing.

    That is zero padding, equal on both sides, 1–3 spatial dims, the simplified
    engine and no forced strategy (see :func:`backpack_tn.tn.evaluate.set_native`).
    """
    if not (simplify and native_allowed()):
        return None
    return _native_arguments(geometry)


@functools.lru_cache(maxsize=1024)
def _native_arguments(geometry: ConvGeometry) -> Optional[dict]:
    # cached: per call this is a few microseconds next to small kernels (read only)
    dims = geometry.dims
    if not 1 <= len(dims) <= 3:
        return None
    if any(d.padding_mode != "zeros" or d.pad_left != d.pad_right for d in dims):
        return None
    return dict(
        stride=tuple(d.stride for d in dims),
        padding=tuple(d.pad_left for d in dims),
        dilation=tuple(d.dilation for d in dims),
        groups=geometry.groups,
    )


_TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _convolution_backward(
    grad_output: Tensor,
    x: Optional[Tensor],
    weight: Optional[Tensor],
    native: dict,
    shape: Sequence[int],
) -> Tensor:
    """Torch's convolution backward kernel: input or kernel gradient of ``shape``.

    The input gradient where ``x`` is ``None``, the kernel's where ``weight`` is:
    what ``torch.nn.grad.conv{N}d_input/weight`` run, without their Python wrapper
    (microseconds that matter next to sub-millisecond kernels). The missing tensor
    is only read for its shape, so an expanded scalar stands in for it.
    """
    want_input = x is None
    placeholder = _placeholder(tuple(shape), grad_output.dtype, grad_output.device)
    out = torch.ops.aten.convolution_backward(
        grad_output,
        placeholder if want_input else x,
        weight if want_input else placeholder,
        None,
        native["stride"],
        native["padding"],
        native["dilation"],
        False,
        [0] * len(native["stride"]),
        native["groups"],
        [want_input, not want_input, False],
    )
    return out[0] if want_input else out[1]


@functools.lru_cache(maxsize=256)
def _placeholder(shape: Tuple[int, ...], dtype, device) -> Tensor:
    """A tensor of ``shape`` without memory (one element, expanded), read for its shape.

    Cached: creating it took 2 µs per call, a fifth of a small kernel's launch. Made
    outside inference mode, so that a placeholder first needed under
    ``torch.inference_mode()`` can still be saved for backward by later calls.
    """
    with torch.inference_mode(False):
        return torch.empty(1, dtype=dtype, device=device).expand(*shape)


def _identity(tensor: Tensor) -> Tensor:
    return tensor


#: A decided call: a function of the call's tensors, positional as the public function
#: takes them, that runs what the first calls of that signature chose.
Plan = Callable[..., Tensor]

#: Call signatures (operation, tensor shapes and dtypes, device, hyper-parameters, the
#: engine's settings) whose computation is decided: its :data:`Plan`.
#: Validation, the geometry, the kernel-vs-TN and TN-vs-trick choices and the
#: engine's look-ups depend on nothing else, so a repeated call runs its torch calls
#: and little else. Their 20–40 µs of Python were as long as the kernels on a GPU
#: (H100: forward at 0.76× of a bare ``F.conv2d``; H200: per-sample gradients at
#: 0.66–0.70× of unfold and einsum on ResNet-18's 3×3 layers, 40–60 µs more).
_CALL_PLANS: LRUCache[Plan] = LRUCache("call-plans", maxsize=4096)


def _lookup(
    name: str, tensors: Sequence[Optional[Tensor]], *hyper
) -> Tuple[Optional[tuple], Optional[Plan]]:
    """The call's key in :data:`_CALL_PLANS` and the plan stored under it.

    The key is ``None`` unless every hyper-parameter is exactly an ``int``, ``bool``
    or ``str`` or a tuple of ``int``: then the full path runs (and validates) and
    nothing is remembered. Python's ``1 == 1.0 == True`` would otherwise let a call
    with a float stride, which validation rejects, reuse an int call's entry.
    """
    if not _all_exact(hyper):
        return None, None
    device = tensors[0].device
    described = tuple(None if t is None else (t.shape, t.dtype) for t in tensors)
    types = tuple(map(type, hyper))  # True vs 1
    key = (name, device, described, hyper, types, plan_settings(device))
    return key, _CALL_PLANS.get(key)


def _remember(signature: Optional[tuple], plan: Optional[Plan]) -> None:
    """Keep ``plan`` for later calls of ``signature`` (if both are known)."""
    if signature is not None and plan is not None:
        _CALL_PLANS.put(signature, plan)


def _all_exact(values: tuple) -> bool:
    """Whether every value is exactly an int, bool, str, ``torch.Size`` or int tuple.

    One loop rather than a function per value: it runs on every call.
    """
    for value in values:
        kind = type(value)
        if kind is int or kind is bool or kind is str or kind is torch.Size:
            continue
        if kind is not tuple:
            return False
        for item in value:
            if type(item) is not int:
                return False
    return True


def _finish_nothing(out: Tensor, *tensors: Tensor) -> Tensor:
    return out


class _Network:
    """A network evaluation of a call, as a function of the call's tensors.

    ``arrange`` maps the call's tensors to the named, grouped tensors of the networks;
    ``finish`` maps the result (and the call's tensors) to the returned layout.
    """

    __slots__ = ("formulations", "arrange", "finish")

    def __init__(
        self,
        op: str,
        geometry: ConvGeometry,
        simplify: bool,
        arrange: Callable[..., Dict[str, Tensor]],
        finish: Callable[..., Tensor] = _finish_nothing,
        **options,
    ):
        self.formulations = networks(op, geometry, simplify, **options)
        self.arrange = arrange
        self.finish = finish

    def __call__(self, *tensors: Tensor) -> Tensor:
        return self.finish(
            evaluate(self.formulations, self.arrange(*tensors)), *tensors
        )

    def plan(self, *tensors: Tensor) -> Optional[Plan]:
        """The evaluation without the engine's look-ups, once the engine has decided."""
        run = prepared_run(self.formulations, self.arrange(*tensors))
        if run is None:
            return None
        arrange, finish = self.arrange, self.finish
        return lambda *call: finish(run(arrange(*call)), *call)

    def memory(self, *tensors: Tensor) -> Optional[int]:
        """Estimated peak bytes of the evaluation once decided (else ``None``)."""
        return chosen_memory(self.formulations, self.arrange(*tensors))


def _reshaped(
    op: str,
    geometry: ConvGeometry,
    simplify: bool,
    arrange: Callable[..., Dict[str, Tensor]],
    shape: Tuple[int, ...],
    **options,
) -> _Network:
    """The network evaluation of ``op`` with its result reshaped to ``shape``."""
    return _Network(
        op, geometry, simplify, arrange, lambda out, *_: out.reshape(shape), **options
    )


def _evaluated(
    signature: Optional[tuple],
    op: str,
    geometry: ConvGeometry,
    simplify: bool,
    arrange: Callable[..., Dict[str, Tensor]],
    shape: Tuple[int, ...],
    tensors: Sequence[Tensor],
    **options,
) -> Tensor:
    """A call that is one network evaluation, reshaped to ``shape``; its plan kept."""
    tn = _reshaped(op, geometry, simplify, arrange, shape, **options)
    result = tn(*tensors)
    _remember(signature, tn.plan(*tensors))
    return result


def _plan_of(candidate: Callable[..., Tensor], tensors: Sequence) -> Optional[Plan]:
    """A candidate's plan: a network's prepared evaluation, else the function itself."""
    plan = getattr(candidate, "plan", None)
    return candidate if plan is None else plan(*tensors)


def _chosen(
    key: tuple,
    candidates: Sequence[Callable[..., Tensor]],
    tensors: Sequence,
    device: torch.device,
    choose: Optional[Callable[[Sequence[float]], int]] = None,
) -> Tuple[Tensor, Optional[Plan]]:
    """:func:`fastest` of functions of the call's tensors, and the plan once decided."""
    runs = [functools.partial(c, *tensors) for c in candidates]
    result = fastest(key, runs, device, choose=choose)
    index = fastest_choice(key)
    return result, None if index is None else _plan_of(candidates[index], tensors)


def _kernel_or_tn(
    name: str,
    native: Optional[dict],
    kernel: Callable[..., Tensor],
    tn: _Network,
    geometry: ConvGeometry,
    tensors: Sequence[Optional[Tensor]],
    weight_shape: Sequence[int],
    result_shape: Sequence[int],
    pointwise: Optional[Callable[..., Tensor]] = None,
) -> Tuple[Tensor, Optional[Plan]]:
    """Torch's convolution kernel, or the TN where it measured faster on the problem.

    Torch's (oneDNN/cuDNN) kernels win on most layers but not all: on a CPU the TN
    (a GEMM after a reshape) beats them on non-overlapping patchify stems and on
    some depthwise and wide layers at small maps. The TN must measure more than
    :data:`backpack_tn.tn.evaluate.TIME_TIE` (10 %) faster to replace the kernel,
    and its estimated memory must stay within :data:`TN_MEMORY_FACTOR` times the
    bytes of the call's tensors and result (:func:`_lean_enough`).
    Where torch's kernel does not apply (``native`` is ``None``) the TN runs;
    problems under the autotuning threshold
    (:func:`backpack_tn.tn.evaluate.set_autotune`) are not measured: the kernel runs.
    ``kernel`` and ``tn`` are functions of the call's ``tensors``; so is
    ``pointwise``, a third candidate for 1×1 convolutions (:func:`_pointwise`), which
    needs no memory beyond its result.

    Returns:
        The result, and the call's plan once decided.
    """
    if native is None:
        return tn(*tensors), tn.plan(*tensors)
    enabled, threshold = get_autotune()
    first = tensors[0]
    # 2 · N · C_out · C_in/G · ΠK · ΠO
    flops = (
        2 * first.shape[0] * math.prod(weight_shape) * math.prod(geometry.output_size)
    )
    if not enabled or flops < threshold:
        return kernel(*tensors), kernel
    key = (
        name,
        tuple(None if t is None else tuple(t.shape) for t in tensors),
        geometry,
        first.dtype,
        first.device,
    )
    # the TN replaces the kernel only where it is clearly faster: on ties the kernel
    # stays, whose memory is the stock computation's (Inception-v3's 3×3 32→32 at
    # 149²: both 33 ms, the TN's window contraction 64 MiB against torch's 43 MiB)

    def choose(times: Sequence[float]) -> int:
        index = keep_first(times)
        if index == 1 and not _lean_enough(tn, tensors, result_shape):
            # the TN is out: the kernel, or another candidate clearly faster
            return keep_first([t if i != 1 else math.inf for i, t in enumerate(times)])
        return index

    candidates = [kernel, tn] + ([] if pointwise is None else [pointwise])
    return _chosen(key, candidates, tensors, first.device, choose=choose)


def _pointwise(
    geometry: ConvGeometry, transposed: bool
) -> Optional[Callable[..., Tensor]]:
    """A 1×1 convolution (stride 1, no padding, one group) as one batched matmul.

    The forward pass is ``W @ x[n]`` per sample, the input VJP ``Wᵀ @ g[n]``, with the
    kernel broadcast over the samples: no copy of the input, the result laid out as
    returned. The TN contracts over the whole batch in one GEMM instead, which needs a
    permuted copy of the input; on MobileNet-v2's 1×1 144→24 layer at 56² (batch 8)
    the input VJP took 1.3 ms this way, 3.4 ms as the TN, 4.6 ms as torch's kernel.

    Returns:
        A function of ``(x, weight, bias)`` (forward) or ``(grad_output, weight)``
        (``transposed``: input VJP), or ``None`` where it does not apply.
    """
    if geometry.groups != 1 or any(
        d.kernel_size != 1 or d.stride != 1 or d.pad_left or d.pad_right
        for d in geometry.dims
    ):
        return None
    if transposed:

        def input_vjp(grad_output: Tensor, weight: Tensor) -> Tensor:
            n, c_out = grad_output.shape[:2]
            w = weight.reshape(c_out, -1).t()
            out = torch.matmul(w, grad_output.reshape(n, c_out, -1))
            return out.reshape(n, w.shape[0], *grad_output.shape[2:])

        return input_vjp

    def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        n, c_in = x.shape[:2]
        w = weight.reshape(weight.shape[0], c_in)
        out = torch.matmul(w, x.reshape(n, c_in, -1))
        if bias is not None:  # into the fresh product: no second result-sized tensor
            out = out.add_(bias.reshape(1, -1, 1))
        return out.reshape(n, w.shape[0], *x.shape[2:])

    return forward


#: The TN replaces torch's kernel only if its estimated peak memory is at most this
#: many times the bytes of the call's tensors and result. Torch's kernels need about
#: that much (the CPU benchmark measured 1–3×: a result, a reordered operand); the
#: TN's temporaries can be far larger where it unfolds a large kernel over a small
#: map: ConvNeXt-base's depthwise 7×7 at 7² (batch 8), weight VJP by index patterns
#: 9 ms and 21 MB, torch's kernel 14 ms and 0.6 MB.
TN_MEMORY_FACTOR = 2.0


def _lean_enough(
    tn: _Network, tensors: Sequence[Optional[Tensor]], result_shape: Sequence[int]
) -> bool:
    """Whether the TN's chosen contraction fits :data:`TN_MEMORY_FACTOR` (if known)."""
    memory = tn.memory(*tensors)
    if memory is None:
        # unknown: the TN's prepared entry was evicted (or cleared) between its
        # last measured run and the call that decides; the kernel is the safe side
        return False
    present = [t for t in tensors if t is not None]
    elements = sum(t.numel() for t in present) + math.prod(result_shape)
    return memory <= TN_MEMORY_FACTOR * elements * present[0].element_size()


#: Per-sample weight VJPs try BackPACK's grouped-convolution trick up to this many
#: input channels per group.
_TRICK_MAX_GROUP_CHANNELS = 4


def conv(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    stride: IntOrTuple = 1,
    padding: Padding = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    simplify: bool = True,
) -> Tensor:
    """Convolution forward pass, equal to ``torch.nn.functional.conv{1,2,3}d``.

    Unlike the functional, ``padding_mode`` is supported directly (as ``nn.ConvNd``).

    Args:
        x: Input ``[N, C_in, *I]``.
        weight: Kernel ``[C_out, C_in / G, *K]``.
        bias: Optional bias ``[C_out]``.
        stride: Stride.
        padding: Padding (int, tuple, ``'same'``, ``'valid'``).
        dilation: Dilation.
        groups: Number of channel groups.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
        simplify: Apply structural simplifications.

    Returns:
        Output ``[N, C_out, *O]``.

    Raises:
        ValueError: For inconsistent shapes or invalid hyper-parameters.
    """
    hyper = (stride, padding, dilation, groups, padding_mode, simplify)
    signature, plan = _lookup("forward", (x, weight, bias), *hyper)
    if plan is not None:
        return plan(x, weight, bias)
    num_dims = _spatial_dims(x)
    _check_rank(weight, "weight", num_dims + 2, "[C_out, C_in / groups, *K]")
    geometry = _geometry(
        x.shape, weight.shape[2:], stride, padding, dilation, groups, padding_mode
    )
    c_out = weight.shape[0]
    _check_channels(c_out, groups, "output channels (weight.shape[0])")
    if weight.shape[1] * groups != x.shape[1]:
        raise ValueError(
            f"weight.shape[1] * groups ({weight.shape[1]} * {groups}) must equal the "
            f"input channels ({x.shape[1]})."
        )
    grouped_weight = (groups, c_out // groups, *weight.shape[1:])
    output_shape = (x.shape[0], c_out, *geometry.output_size)
    bias_shape = (1, -1, *([1] * num_dims))

    def arrange(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> dict:
        return {"x": _group_input(x, groups), "w": weight.reshape(grouped_weight)}

    def finish(out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor]):
        out = out.reshape(output_shape)
        return out if bias is None else out + bias.reshape(bias_shape)

    native = _native(geometry, simplify)
    convolve = _TORCH_CONV.get(num_dims)
    result, plan = _kernel_or_tn(
        "forward",
        native,
        lambda x, weight, bias: convolve(x, weight, bias, **native),
        _Network("forward", geometry, simplify, arrange, finish),
        geometry,
        (x, weight, bias),
        weight.shape,
        (x.shape[0], weight.shape[0], *geometry.output_size),
        _pointwise(geometry, transposed=False),
    )
    _remember(signature, plan)
    return result


def unfold(
    x: Tensor,
    kernel_size: IntOrTuple,
    *,
    stride: IntOrTuple = 1,
    padding: Padding = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    simplify: bool = True,
) -> Tensor:
    """Unfolded input (im2col), same values and layout as ``F.unfold``, any N-d.

    Args:
        x: Input ``[N, C, *I]``.
        kernel_size: Kernel size.
        stride: Stride.
        padding: Padding (int, tuple, ``'same'``, ``'valid'``).
        dilation: Dilation.
        groups: Channel groups; only validated (``C`` must be divisible by it).
        padding_mode: Padding mode; padded positions copy input elements.
        simplify: Apply structural simplifications.

    Returns:
        ``[N, C·ΠK, ΠO]``, channel-major within each column as ``F.unfold``.
    """
    hyper = (kernel_size, stride, padding, dilation, groups, padding_mode, simplify)
    signature, plan = _lookup("unfold", (x,), *hyper)
    if plan is not None:
        return plan(x)
    _spatial_dims(x)
    geometry = _geometry(
        x.shape, kernel_size, stride, padding, dilation, groups, padding_mode
    )
    n, c = x.shape[:2]
    shape = (n, c * math.prod(geometry.kernel_size), math.prod(geometry.output_size))

    def ungrouped(x: Tensor) -> dict:
        return {"x": _group_input(x, 1)}

    return _evaluated(signature, "unfold", geometry, simplify, ungrouped, shape, (x,))


def input_vjp(
    grad_output: Tensor,
    weight: Tensor,
    input_shape: Sequence[int],
    *,
    stride: IntOrTuple = 1,
    padding: Padding = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    simplify: bool = True,
) -> Tensor:
    """Vector-Jacobian product with respect to the convolution's input.

    Args:
        grad_output: Gradient w.r.t. the output ``[N, C_out, *O]``.
        weight: Kernel ``[C_out, C_in / G, *K]``.
        input_shape: Shape of the input ``[N, C_in, *I]``.
        stride: Stride.
        padding: Padding (int, tuple, ``'same'``, ``'valid'``).
        dilation: Dilation.
        groups: Number of channel groups.
        padding_mode: Padding mode (padded positions send their gradient to the
            input element they copy).
        simplify: Apply structural simplifications.

    Returns:
        Gradient w.r.t. the input, ``[N, C_in, *I]``.
    """
    if type(input_shape) is not torch.Size:  # a Size holds ints already
        input_shape = tuple(int(s) for s in input_shape)
    hyper = (stride, padding, dilation, groups, padding_mode, simplify)
    signature, plan = _lookup("input_vjp", (grad_output, weight), input_shape, *hyper)
    if plan is not None:
        return plan(grad_output, weight)
    if len(input_shape) < 3:
        raise ValueError(
            f"input_shape must be [N, C_in, *I] with at least one spatial dimension, "
            f"got {input_shape}."
        )
    _check_rank(weight, "weight", len(input_shape), "[C_out, C_in / groups, *K]")
    geometry = _geometry(
        input_shape, weight.shape[2:], stride, padding, dilation, groups, padding_mode
    )
    _check_output(grad_output, "grad_output", geometry, 1)
    c_out = weight.shape[0]
    grouped_weight = (groups, c_out // groups, *weight.shape[1:])

    def arrange(grad_output: Tensor, weight: Tensor) -> dict:
        return {
            "v": _group_input(grad_output, groups),
            "w": weight.reshape(grouped_weight),
        }

    native = _native(geometry, simplify)
    result, plan = _kernel_or_tn(
        "input_vjp",
        native,
        lambda grad_output, weight: _convolution_backward(
            grad_output, None, weight, native, input_shape
        ),
        _reshaped("input_vjp", geometry, simplify, arrange, input_shape),
        geometry,
        (grad_output, weight),
        weight.shape,
        input_shape,
        _pointwise(geometry, transposed=True),
    )
    _remember(signature, plan)
    return result


def _x_and_output(
    x: Tensor,
    grad: Tensor,
    grad_name: str,
    lead: int,
    kernel_size,
    stride,
    padding,
    dilation,
    groups,
    padding_mode,
) -> Tuple[ConvGeometry, Callable[[Tensor, Tensor], dict], Tuple[int, ...]]:
    """Validate an input and a backpropagated tensor.

    Returns:
        The geometry, a function grouping tensors of these shapes into the networks'
        named tensors (``'x'`` and ``'v'`` or, for ``lead == 2``, ``'s'``), and the
        weight shape.
    """
    _spatial_dims(x)
    geometry = _geometry(
        x.shape, kernel_size, stride, padding, dilation, groups, padding_mode
    )
    _check_output(grad, grad_name, geometry, lead)
    if grad.shape[lead - 1] != x.shape[0]:
        raise ValueError(
            f"{grad_name} has batch size {grad.shape[lead - 1]}, x has {x.shape[0]}."
        )
    c_out = grad.shape[lead]
    shape = grad.shape
    grouped = (*shape[:lead], groups, c_out // groups, *shape[lead + 1 :])
    name = "v" if lead == 1 else "s"

    def arrange(x: Tensor, grad: Tensor) -> dict:
        return {"x": _group_input(x, groups), name: grad.reshape(grouped)}

    weight_shape = (c_out, x.shape[1] // groups, *geometry.kernel_size)
    return geometry, arrange, weight_shape


def _grouped_conv_trick(
    native: Optional[dict], weight_shape: Tuple[int, ...]
) -> Optional[Callable[[Tensor, Tensor], Tensor]]:
    """Per-sample kernel gradients from torch's convolution kernel, if sensible.

    BackPACK's trick — samples and channels as channel groups of one forward
    convolution with the output gradients as kernels — beats every contraction when
    groups hold few channels (depthwise, first layers); it takes one convolution
    per input channel of a group, hence only there. Returns a function of the input
    and the output gradient, or ``None`` where torch's kernel does not apply
    (``native`` is ``None``) or the trick is not worth trying.
    """
    if native is None or weight_shape[1] > _TRICK_MAX_GROUP_CHANNELS:
        return None
    groups = native["groups"]
    c_out, per_group = weight_shape[0], weight_shape[1]
    kernel = weight_shape[2:]
    convolve = _TORCH_CONV[len(kernel)]

    def trick(x: Tensor, grad_output: Tensor) -> Tensor:
        # W_n[d, c, k] = Σ_o g[n, d, o] · x_pad[n, c, o·S + k·D]: a forward convolution
        # of every (sample, input channel) with the output gradients of the channels
        # it feeds as kernels — stride and dilation swap roles. One convolution per
        # input channel of a group: the output gradients are the kernels of each as
        # they are (a view, if contiguous), where one convolution for all needs them
        # repeated C_in/G times (BackPACK's way: 68 MB for Inception-v3's stem at
        # batch 8, whose first touch cost more than the convolution).
        n = x.shape[0]
        kernels = grad_output.reshape(n * c_out, 1, *grad_output.shape[2:])
        channels = x.reshape(n, groups, per_group, *x.shape[2:])
        parts = []
        for j in range(per_group):
            inputs = channels[:, :, j].reshape(1, n * groups, *x.shape[2:])
            out = convolve(
                inputs,
                kernels,
                stride=native["dilation"],
                padding=native["padding"],
                dilation=native["stride"],
                groups=n * groups,
            )
            for axis, size in enumerate(kernel):  # output positions beyond the kernel
                out = out.narrow(2 + axis, 0, size)
            parts.append(out.reshape(n, c_out, *kernel))
        return parts[0].unsqueeze(2) if per_group == 1 else torch.stack(parts, 2)

    return trick


def _tn_or_trick(
    name: str,
    tn: _Network,
    finish: Callable[[Tensor], Tensor],
    x: Tensor,
    grad_output: Tensor,
    geometry: ConvGeometry,
    native: Optional[dict],
    weight_shape: Tuple[int, ...],
) -> Tuple[Tensor, Optional[Plan]]:
    """The TN, or ``finish`` of the grouped-conv trick's per-sample gradients.

    Where the trick applies, the faster of the two is measured once per problem.

    Returns:
        The result, and the call's plan once decided.
    """
    trick = _grouped_conv_trick(native, weight_shape)
    if trick is None:
        return tn(x, grad_output), tn.plan(x, grad_output)
    key = (name, tuple(x.shape), tuple(grad_output.shape), geometry, x.dtype)
    return _chosen(
        key + (x.device,),
        [tn, lambda x, grad_output: finish(trick(x, grad_output))],
        (x, grad_output),
        x.device,
    )


def weight_vjp(
    x: Tensor,
    grad_output: Tensor,
    kernel_size: IntOrTuple,
    *,
    stride: IntOrTuple = 1,
    padding: Padding = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    per_sample: bool = False,
    simplify: bool = True,
) -> Tensor:
    """Gradient with respect to the kernel (vector-Jacobian product).

    Args:
        x: Input ``[N, C_in, *I]``.
        grad_output: Gradient w.r.t. the output ``[N, C_out, *O]``.
        kernel_size: Kernel size.
        stride: Stride.
        padding: Padding (int, tuple, ``'same'``, ``'valid'``).
        dilation: Dilation.
        groups: Number of channel groups.
        padding_mode: Padding mode.
        per_sample: Keep the batch axis (per-sample gradients).
        simplify: Apply structural simplifications.

    Returns:
        ``[C_out, C_in / G, *K]``, or ``[N, C_out, C_in / G, *K]`` if ``per_sample``.
    """
    hyper = (kernel_size, stride, padding, dilation, groups, padding_mode)
    signature, plan = _lookup(
        "weight_vjp", (x, grad_output), *hyper, per_sample, simplify
    )
    if plan is not None:
        return plan(x, grad_output)
    geometry, arrange, weight_shape = _x_and_output(
        x, grad_output, "grad_output", 1, *hyper
    )
    native = _native(geometry, simplify)
    shape = (x.shape[0],) * per_sample + weight_shape
    tn = _reshaped(
        "weight_vjp", geometry, simplify, arrange, shape, per_sample=per_sample
    )
    if per_sample:
        result, plan = _tn_or_trick(
            "per_sample", tn, _identity, x, grad_output, geometry, native, weight_shape
        )
    else:
        result, plan = _kernel_or_tn(
            "weight_vjp",
            native,
            lambda x, grad_output: _convolution_backward(
                grad_output, x, None, native, weight_shape
            ),
            tn,
            geometry,
            (x, grad_output),
            weight_shape,
            weight_shape,
        )
    _remember(signature, plan)
    return result


def _kfac_input(
    x, kernel_size, stride, padding, dilation, groups, padding_mode, groups_mode
) -> Tuple[ConvGeometry, Callable[[Tensor], Tensor]]:
    """Validate the input of a KFAC statistic.

    Returns:
        The geometry and the function grouping such an input ``[N, C_in, *I]`` into
        ``[N, G', C_in/G, *I]``: the group average (``G' = 1``) or every group.
    """
    if groups_mode not in GROUPS_MODES:
        raise ValueError(
            f"groups_mode must be one of {GROUPS_MODES}, got {groups_mode!r}."
        )
    _spatial_dims(x)
    geometry = _geometry(
        x.shape, kernel_size, stride, padding, dilation, groups, padding_mode
    )
    if groups_mode == "average":
        return geometry, lambda x: group_average(x, groups).unsqueeze(1)
    return geometry, lambda x: _group_input(x, groups)


def _kfac_runs(
    geometry: ConvGeometry, approx: str, simplify: bool, channels: int
) -> Dict[str, Callable[[Tensor], Tensor]]:
    """The ways to compute a KFAC input factor (unscaled), by name, TN first.

    Each is a function of the grouped input ``[N, G', C_in/G, *I]`` (``channels``
    is ``C_in/G``). The KFAC-expand factor is a Gram matrix, which the engine
    evaluates by its block upper triangle
    (:func:`backpack_tn.tn.evaluate.gram_form`); with stride 1 the shift-structured
    Gram needs far fewer products still, but on small maps of wide layers its box
    sums outweigh them; with a larger stride the same holds over the input's phases
    where kernels are large (polyphase Gram). The caller measures.
    """
    runs = {
        "tn": _Network(
            "kfac_input",
            geometry,
            simplify,
            lambda grouped: {"x": grouped},
            approx=approx,
        )
    }
    if approx != "expand" or not simplify:
        return runs
    if supports_shift_gram(geometry):
        runs["shift"] = _per_group(shift_gram, geometry)
    elif supports_polyphase_gram(geometry):
        poly, tn = polyphase_products(geometry, channels)
        if poly < tn:  # large kernels at a small stride; never 3×3 at stride 2
            runs["polyphase"] = _per_group(polyphase_gram, geometry)
    return runs


def _per_group(
    gram: Callable[[Tensor, ConvGeometry], Tensor], geometry: ConvGeometry
) -> Callable[[Tensor], Tensor]:
    """``gram`` of every group, a function of the grouped input named as ``gram``."""

    def run(grouped: Tensor) -> Tensor:
        return gram(grouped.transpose(0, 1), geometry)  # [G, N, C/G, *I]

    run.__name__ = gram.__name__
    return run


def kfac_input_factor(
    x: Tensor,
    kernel_size: IntOrTuple,
    *,
    stride: IntOrTuple = 1,
    padding: Padding = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    approx: str = "expand",
    groups_mode: str = "average",
    simplify: bool = True,
    scale: Optional[float] = None,
) -> Tensor:
    """Input-based Kronecker factor of KFAC for a convolution (no bias row/column).

    With ``u_{n,o}`` the unfolded input patch of sample ``n`` at output position ``o``:

    * ``approx='expand'``: ``(1/N) Σ_n Σ_o u_{n,o} u_{n,o}ᵀ`` (BackPACK's scale;
      curvlinops additionally divides by the number of output positions).
    * ``approx='reduce'``: ``(1/N) Σ_n ū_n ū_nᵀ`` with ``ū_n`` the mean of ``u_{n,o}``
      over output positions (KFAC-reduce, Eschenhagen et al. 2023).

    Args:
        x: Input ``[N, C_in, *I]``.
        kernel_size: Kernel size.
        stride: Stride.
        padding: Padding (int, tuple, ``'same'``, ``'valid'``).
        dilation: Dilation.
        groups: Number of channel groups.
        padding_mode: Padding mode.
        approx: ``'expand'`` or ``'reduce'``.
        groups_mode: ``'average'`` averages the input over channel groups first
            (curvlinops' convention, one factor); ``'separate'`` returns the exact
            factor of every group.
        simplify: Apply structural simplifications.
        scale: Multiply the sums by this instead of the normalisation above
            (``1/N``, or ``1/N`` and the squared number of output positions for
            ``'reduce'``), e.g. curvlinops' per data point and output position.
            The factor is quadratic in ``x``: where the input has fewer elements
            than the factor, ``x`` is scaled by the square root instead of the
            factor (the factor of a 3×3 512-channel layer at 7×7, batch 8, has 100
            times the input's elements).

    Returns:
        ``[C_in/G·ΠK, C_in/G·ΠK]`` (average) or ``[G, C_in/G·ΠK, C_in/G·ΠK]``
        (separate), rows ordered channel-major as ``F.unfold``.

    Raises:
        ValueError: For unknown ``approx``/``groups_mode`` or invalid hyper-parameters.
    """
    hyper = (kernel_size, stride, padding, dilation, groups, padding_mode)
    signature, plan = _lookup(
        "kfac_input_factor", (x,), *hyper, approx, groups_mode, simplify
    )
    if plan is not None:
        return plan(x, scale)
    if approx not in KFAC_APPROXIMATIONS:
        raise ValueError(
            f"approx must be one of {KFAC_APPROXIMATIONS}, got {approx!r}."
        )
    geometry, group = _kfac_input(x, *hyper, groups_mode)
    channels = x.shape[1] // groups
    runs = list(_kfac_runs(geometry, approx, simplify, channels).values())
    default = 1.0 / x.shape[0]
    if approx == "reduce":
        default /= math.prod(geometry.output_size) ** 2
    dim = channels * math.prod(geometry.kernel_size)
    average = groups_mode == "average"
    factors = 1 if average else groups
    # one multiplication of whichever is smaller, the input or the factor
    on_input = x.numel() < factors * dim * dim

    def scaled(x: Tensor, scale: Optional[float]) -> Tuple[Tensor, float]:
        """The input to contract, and what the contraction's result is scaled by."""
        scale = default if scale is None else scale
        if on_input and scale >= 0:
            return x * math.sqrt(scale), 1.0
        return x, scale

    def finish(out: Tensor, scale: float) -> Tensor:
        if scale != 1.0:
            out = out.mul_(scale)
        out = out.reshape(factors, dim, dim)
        return out[0] if average else out

    x_in, rest = scaled(x, scale)
    grouped = group(x_in)
    if len(runs) > 1:
        key = ("kfac_expand", tuple(grouped.shape), geometry, x.dtype, x.device)
        out, chosen = _chosen(key, runs, (grouped,), x.device)
    else:
        out, chosen = runs[0](grouped), runs[0].plan(grouped)

    if chosen is not None:

        def plan(x: Tensor, scale: Optional[float]) -> Tensor:
            x, rest = scaled(x, scale)
            return finish(chosen(group(x)), rest)

        _remember(signature, plan)
    return finish(out, rest)


def averaged_patches(
    x: Tensor,
    kernel_size: IntOrTuple,
    *,
    stride: IntOrTuple = 1,
    padding: Padding = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    groups_mode: str = "average",
    simplify: bool = True,
) -> Tensor:
    """Per-sample mean of the unfolded input patches over output positions.

    ``ū_n = (1/O) Σ_o u_{n,o}`` — the vector KFAC-reduce builds its input factor from,
    computed by contracting the input with the position-summed index pattern (the
    unfolded input is never formed).

    Args:
        x: Input ``[N, C_in, *I]``.
        kernel_size: Kernel size.
        stride: Stride.
        padding: Padding (int, tuple, ``'same'``, ``'valid'``).
        dilation: Dilation.
        groups: Number of channel groups.
        padding_mode: Padding mode.
        groups_mode: ``'average'`` averages the input over channel groups first
            (curvlinops' convention); ``'separate'`` keeps every group.
        simplify: Apply structural simplifications.

    Returns:
        ``[N, C_in/G·ΠK]`` (average) or ``[N, G, C_in/G·ΠK]`` (separate), entries
        ordered channel-major as ``F.unfold``.

    Raises:
        ValueError: For an unknown ``groups_mode`` or invalid hyper-parameters.
    """
    hyper = (kernel_size, stride, padding, dilation, groups, padding_mode)
    signature, plan = _lookup("averaged_patches", (x,), *hyper, groups_mode, simplify)
    if plan is not None:
        return plan(x)
    geometry, group = _kfac_input(x, *hyper, groups_mode)
    positions = math.prod(geometry.output_size)
    average = groups_mode == "average"
    lead = (x.shape[0], 1 if average else groups, -1)

    def finish(out: Tensor, x: Tensor) -> Tensor:
        out = out.div_(positions).reshape(lead)
        return out[:, 0] if average else out

    tn = _Network("patch_sum", geometry, simplify, lambda x: {"x": group(x)}, finish)
    result = tn(x)
    _remember(signature, tn.plan(x))
    return result


def sqrt_ggn_weight(
    x: Tensor,
    S: Tensor,
    kernel_size: IntOrTuple,
    *,
    stride: IntOrTuple = 1,
    padding: Padding = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    sum_batch: bool = False,
    simplify: bool = True,
) -> Tensor:
    """Transposed weight Jacobian applied to a backpropagated matrix.

    With ``S`` a symmetric factor of the GGN w.r.t. the output this is the GGN's
    square root w.r.t. the kernel (BackPACK's ``SqrtGGN``); in general it is the
    matrix-Jacobian product ``param_mjp`` of BackPACK's derivatives.

    Args:
        x: Input ``[N, C_in, *I]``.
        S: Backpropagated factor ``[V, N, C_out, *O]``.
        kernel_size: Kernel size.
        stride: Stride.
        padding: Padding (int, tuple, ``'same'``, ``'valid'``).
        dilation: Dilation.
        groups: Number of channel groups.
        padding_mode: Padding mode.
        sum_batch: Sum over the batch axis.
        simplify: Apply structural simplifications.

    Returns:
        ``[V, N, C_out, C_in / G, *K]``, or ``[V, C_out, C_in / G, *K]`` if
        ``sum_batch``.
    """
    hyper = (kernel_size, stride, padding, dilation, groups, padding_mode)
    signature, plan = _lookup("sqrt_ggn_weight", (x, S), *hyper, sum_batch, simplify)
    if plan is not None:
        return plan(x, S)
    geometry, arrange, weight_shape = _x_and_output(x, S, "S", 2, *hyper)
    shape = (*(S.shape[:1] if sum_batch else S.shape[:2]), *weight_shape)
    return _evaluated(
        signature,
        "sqrt_ggn",
        geometry,
        simplify,
        arrange,
        shape,
        (x, S),
        sum_batch=sum_batch,
    )


def diag_ggn_weight(
    x: Tensor,
    S: Tensor,
    kernel_size: IntOrTuple,
    *,
    stride: IntOrTuple = 1,
    padding: Padding = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    per_sample: bool = False,
    simplify: bool = True,
) -> Tensor:
    """Diagonal of the GGN w.r.t. the kernel, ``Σ_v (Jᵀ S)²`` summed over the batch.

    Equals BackPACK's ``extract_weight_diagonal`` on the unfolded input.

    Args:
        x: Input ``[N, C_in, *I]``.
        S: Backpropagated factor ``[V, N, C_out, *O]``.
        kernel_size: Kernel size.
        stride: Stride.
        padding: Padding (int, tuple, ``'same'``, ``'valid'``).
        dilation: Dilation.
        groups: Number of channel groups.
        padding_mode: Padding mode.
        per_sample: Keep the batch axis.
        simplify: Apply structural simplifications.

    Returns:
        ``weight.shape``, or ``[N, *weight.shape]`` if ``per_sample``.
    """
    hyper = (kernel_size, stride, padding, dilation, groups, padding_mode)
    signature, plan = _lookup("diag_ggn_weight", (x, S), *hyper, per_sample, simplify)
    if plan is not None:
        return plan(x, S)
    geometry, arrange, weight_shape = _x_and_output(x, S, "S", 2, *hyper)
    shape = (x.shape[0],) * per_sample + weight_shape
    return _evaluated(
        signature,
        "diag_ggn",
        geometry,
        simplify,
        arrange,
        shape,
        (x, S),
        per_sample=per_sample,
    )


def batch_l2_weight(
    x: Tensor,
    grad_output: Tensor,
    kernel_size: IntOrTuple,
    *,
    stride: IntOrTuple = 1,
    padding: Padding = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    simplify: bool = True,
) -> Tensor:
    """Squared L2 norm of every per-sample kernel gradient.

    Chooses between contracting per-sample gradients and the Gram form
    ``Σ_{o,o'} (V_o·V_o')(U_o·U_o')`` (no per-sample gradient) by estimated cost.

    Args:
        x: Input ``[N, C_in, *I]``.
        grad_output: Gradient w.r.t. the output ``[N, C_out, *O]``.
        kernel_size: Kernel size.
        stride: Stride.
        padding: Padding (int, tuple, ``'same'``, ``'valid'``).
        dilation: Dilation.
        groups: Number of channel groups.
        padding_mode: Padding mode.
        simplify: Apply structural simplifications.

    Returns:
        ``[N]``.
    """
    hyper = (kernel_size, stride, padding, dilation, groups, padding_mode)

    def finish(per_sample: Tensor) -> Tensor:
        return per_sample.flatten(1).square().sum(1)

    def batch(weight_shape: Tuple[int, ...]) -> Tuple[int, ...]:
        return tuple(x.shape[:1])

    return _per_sample_statistic(
        "batch_l2", x, grad_output, hyper, simplify, batch, finish
    )


def sum_grad_squared_weight(
    x: Tensor,
    grad_output: Tensor,
    kernel_size: IntOrTuple,
    *,
    stride: IntOrTuple = 1,
    padding: Padding = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    simplify: bool = True,
) -> Tensor:
    """Sum over the batch of squared per-sample kernel gradients (element-wise).

    Args:
        x: Input ``[N, C_in, *I]``.
        grad_output: Gradient w.r.t. the output ``[N, C_out, *O]``.
        kernel_size: Kernel size.
        stride: Stride.
        padding: Padding (int, tuple, ``'same'``, ``'valid'``).
        dilation: Dilation.
        groups: Number of channel groups.
        padding_mode: Padding mode.
        simplify: Apply structural simplifications.

    Returns:
        ``[C_out, C_in / G, *K]``.
    """
    hyper = (kernel_size, stride, padding, dilation, groups, padding_mode)

    def finish(per_sample: Tensor) -> Tensor:
        return per_sample.square().sum(0)

    return _per_sample_statistic(
        "sum_grad_squared", x, grad_output, hyper, simplify, _identity, finish
    )


def _per_sample_statistic(
    op: str,
    x: Tensor,
    grad_output: Tensor,
    hyper: tuple,
    simplify: bool,
    shape: Callable[[Tuple[int, ...]], Tuple[int, ...]],
    finish: Callable[[Tensor], Tensor],
) -> Tensor:
    """A statistic of the per-sample kernel gradients, by its network or by the trick.

    The network ``op`` (result reshaped to ``shape`` of the weight shape), or
    ``finish`` of the per-sample gradients of BackPACK's trick, whichever measured
    faster.
    """
    signature, plan = _lookup(op, (x, grad_output), *hyper, simplify)
    if plan is not None:
        return plan(x, grad_output)
    geometry, arrange, weight_shape = _x_and_output(
        x, grad_output, "grad_output", 1, *hyper
    )
    tn = _reshaped(op, geometry, simplify, arrange, shape(weight_shape))
    native = _native(geometry, simplify)
    result, plan = _tn_or_trick(
        op, tn, finish, x, grad_output, geometry, native, weight_shape
    )
    _remember(signature, plan)
    return result
