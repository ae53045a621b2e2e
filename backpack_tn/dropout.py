"""Tensor dropout: approximate backpropagation for convolutions (DESIGN §2.4).

The weight gradient of a convolution is the tensor network

    ∇W[g, d, c, k⃗] = Σ_{n, o⃗, i⃗} V[n, g, d, o⃗] · X[n, g, c, i⃗] · Π₁[i₁, o₁, k₁] ⋯

Every contracted index can be sub-sampled with Bernoulli column-row sampling: keep each
index of an axis independently with probability ``p`` and scale the kept terms by
``1/p``; the expectation over the mask is the exact sum, so the estimator is unbiased.
Sampling an index of ``X`` — a spatial input axis ``i₁, i₂, i₃`` or the input-channel
axis — only *slices* ``X`` (and the rows of the matching index pattern ``Π``), so the
forward pass saves a smaller dense tensor for backward and the weight gradient
contracts fewer terms. The forward pass, the input gradient and the bias gradient stay
exact.

Axis names (``axes``):

* ``"channel"`` — input channels ``C_in`` (with groups, each channel of each group is
  kept independently; the gradient of a dropped channel's kernel slice is zero);
* ``"i1"``, ``"i2"``, ``"i3"`` — the first, second and third spatial input dimension
  (``Conv1d`` has ``i1``; ``Conv2d`` ``i1, i2`` = height, width; ``Conv3d`` all three);
* ``"spatial"`` — shorthand for every spatial axis of the convolution, each sampled
  independently (so ``p`` per axis keeps a fraction ``p^d`` of the input);
* or a tuple of the names above.

What is saved for backward: the sampled slice of the input, the kept indices (int64)
and the kernel (needed for the exact input gradient) — not the full input.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from functools import lru_cache
from typing import Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from backpack_tn import functional as tnf
from backpack_tn.tn.geometry import (
    ConvGeometry,
    DimGeometry,
    IntOrTuple,
    Padding,
    make_geometry,
)
from backpack_tn.tn.patterns import source_indices

__all__ = [
    "AXIS_NAMES",
    "TNDropoutConv1d",
    "TNDropoutConv2d",
    "TNDropoutConv3d",
    "conv_tn_dropout",
    "convert",
    "disabled",
    "is_disabled",
    "resolve_keep_probs",
]

#: Names of the axes that can be sampled (``i1``–``i3``: spatial input dimensions).
AXIS_NAMES = ("channel", "i1", "i2", "i3")
#: Shorthands accepted for ``axes``.
AXIS_SHORTHANDS = ("spatial", "channel")

KeepProb = Union[float, Mapping[str, float], Sequence[float]]
Axes = Union[str, Sequence[str]]


# --- arguments -----------------------------------------------------------------------


def _spatial_names(num_dims: int) -> Tuple[str, ...]:
    return tuple(f"i{d + 1}" for d in range(num_dims))


def _resolve_axes(axes: Axes, num_dims: int) -> Tuple[str, ...]:
    valid = ("channel",) + _spatial_names(num_dims)
    if isinstance(axes, str):
        if axes == "spatial":
            return _spatial_names(num_dims)
        if axes in valid:
            return (axes,)
        raise ValueError(
            f"axes must be one of {AXIS_SHORTHANDS}, an axis name of {valid}, or a "
            f"tuple of axis names, got {axes!r}."
        )
    try:
        names = tuple(axes)
    except TypeError:
        raise ValueError(
            f"axes must be one of {AXIS_SHORTHANDS} or a tuple of axis names of "
            f"{valid}, got {axes!r}."
        ) from None
    if not names or any(not isinstance(a, str) or a not in valid for a in names):
        raise ValueError(
            f"axes must be a non-empty tuple of axis names of {valid} (for a "
            f"{num_dims}d convolution), got {axes!r}."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"axes must not repeat an axis, got {axes!r}.")
    return names


def _check_probability(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"{name} must be a float in (0, 1] (or a dict/tuple of them, one per "
            f"axis), got {value!r}."
        )
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}.")
    return value


def resolve_keep_probs(
    keep_prob: KeepProb, axes: Axes, num_dims: int
) -> Dict[str, float]:
    """Validate ``keep_prob`` and ``axes`` and pair them up.

    Args:
        keep_prob: One probability for every sampled axis, a dict ``{axis: p}`` with
            exactly the sampled axes as keys, or a tuple aligned with ``axes``.
        axes: ``"spatial"``, ``"channel"``, an axis name, or a tuple of axis names
            (see :data:`AXIS_NAMES`).
        num_dims: Number of spatial dimensions of the convolution.

    Returns:
        ``{axis: p}`` for every sampled axis, in the order given; axes with ``p = 1``
        are included (callers skip them).

    Raises:
        ValueError: Naming ``keep_prob`` or ``axes`` and the accepted values.
    """
    names = _resolve_axes(axes, num_dims)
    if isinstance(keep_prob, Mapping):
        if set(keep_prob) != set(names):
            raise ValueError(
                f"keep_prob as a dict must have exactly the sampled axes {names} as "
                f"keys, got {tuple(keep_prob)}."
            )
        return {a: _check_probability(keep_prob[a], f"keep_prob[{a!r}]") for a in names}
    if isinstance(keep_prob, (tuple, list)):
        if len(keep_prob) != len(names):
            raise ValueError(
                f"keep_prob as a tuple must have one entry per sampled axis {names}, "
                f"got {keep_prob!r}."
            )
        return {
            a: _check_probability(p, f"keep_prob[{i}]")
            for i, (a, p) in enumerate(zip(names, keep_prob))
        }
    p = _check_probability(keep_prob, "keep_prob")
    return {a: p for a in names}


# --- sampling and the sampled weight VJP ---------------------------------------------


def _sample(
    size: int, p: float, generator: Optional[torch.Generator], device: torch.device
) -> Tensor:
    """Indices kept by independent Bernoulli(``p``) draws, sorted, on ``device``."""
    rng_device = generator.device if generator is not None else device
    mask = torch.rand(size, generator=generator, device=rng_device) < p
    return mask.nonzero().flatten().to(device)


@lru_cache(maxsize=4096)
def _sources(dim: DimGeometry) -> Tensor:
    """``src[o, k]``: input index read by output ``o`` at tap ``k``; ``-1`` = zero pad.

    The index pattern ``Π[i, o, k] = [src[o, k] = i]`` in gather form. Kept on the CPU
    (tiny); callers move it.
    """
    table = source_indices(dim)
    return torch.tensor(
        [[-1 if i is None else i for i in row] for row in table], dtype=torch.long
    ).reshape(dim.output_size, dim.kernel_size)


def _row_positions(dim: DimGeometry, kept: Optional[Tensor], device) -> Tensor:
    """``U[o, k]``: position in the kept rows of the input read by ``(o, k)``.

    This is the sliced pattern ``Π[kept, o, k]`` in gather form; entries that read
    zero padding or a dropped row point at an extra zero slot ``J = len(kept)``.
    """
    src = _sources(dim).to(device)
    size = dim.input_size
    if kept is None:
        return torch.where(src >= 0, src, size)
    position = torch.full((size + 1,), len(kept), dtype=torch.long, device=device)
    position[kept] = torch.arange(len(kept), device=device)
    return position[src]  # src = -1 reads the last slot, i.e. the zero slot


def _output_layers(dim: DimGeometry, positions: Tensor, num_kept: int) -> Tensor:
    """Invert ``U``: ``T[r, k, j]`` = the ``r``-th output ``o`` reading kept row ``j``.

    With zero padding each ``(j, k)`` is read by at most one ``o``; with the
    ``reflect``/``replicate``/``circular`` modes a row can also be read through the
    padding, so the inverse has several layers ``r``. Empty slots point at an extra
    zero slot ``O``.
    """
    num_out, kernel = dim.output_size, dim.kernel_size
    device = positions.device
    o, k = torch.meshgrid(
        torch.arange(num_out, device=device),
        torch.arange(kernel, device=device),
        indexing="ij",
    )
    valid = positions < num_kept
    o, k, j = o[valid], k[valid], positions[valid]
    key = k * num_kept + j
    sorted_key, order = torch.sort(key, stable=True)
    # rank of each entry among those with the same (k, j): its layer
    first = torch.searchsorted(sorted_key, sorted_key)
    rank = torch.arange(len(sorted_key), device=device) - first
    layers = int(rank.max()) + 1 if len(rank) else 1
    table = torch.full(
        (layers, kernel * num_kept), num_out, dtype=torch.long, device=device
    )
    table[rank, sorted_key] = o[order]
    return table


def _flat_index(tables: Sequence[Tensor], sizes: Sequence[int]) -> Tensor:
    """Combine per-dimension gather tables into one index into the flattened grid.

    Args:
        tables: Per dimension ``t_d[a_d, b_d]`` with values in ``[0, sizes[d])``.
        sizes: Size of each dimension of the (row-major) grid being indexed.

    Returns:
        ``idx[a_1, …, a_D, b_1, …, b_D] = Σ_d t_d[a_d, b_d] · stride_d``, flattened.
    """
    num_dims = len(tables)
    strides = [math.prod(sizes[d + 1 :]) for d in range(num_dims)]
    total = None
    for d, (table, stride) in enumerate(zip(tables, strides)):
        shape = [1] * (2 * num_dims)
        shape[d], shape[num_dims + d] = table.shape
        term = (table * stride).reshape(shape)
        total = term if total is None else total + term
    return total.flatten()


def _grid_last(t: Tensor, num_dims: int) -> Tensor:
    """``[N, G, c, *S]`` → ``[G, c, Π(S + 1), N]`` with a zero slot per spatial axis.

    The batch axis goes last so that every gathered grid position is a contiguous
    run of ``N`` values and the result is already the operand of a batched GEMM.
    """
    padded = F.pad(t, (0, 1) * num_dims)
    order = (1, 2, *range(3, 3 + num_dims), 0)
    n, g, c = t.shape[:3]
    return padded.permute(order).reshape(g, c, -1, n)


def _contract(
    x_sub: Tensor,
    v: Tensor,
    geometry: ConvGeometry,
    kept: Sequence[Optional[Tensor]],
    method: Optional[str] = None,
) -> Tensor:
    """Weight VJP ``[G, d, c, *K]`` from the kept input rows, without the full input.

    Two equivalent formulations of ``V · X[kept] · Π[kept]`` (each ``Π`` applied as
    a gather, which is what contracting a 0/1 pattern does); the cheaper is chosen:

    * ``'gather_v'``: bring ``V`` onto the kept input grid, ``Ṽ[g,d,k⃗,j⃗,n] =
      Σ_o⃗ V[n,g,d,o⃗] Π[kept, o⃗, k⃗]``, then one batched GEMM with ``X[kept]`` over
      ``(j⃗, n)``: the work shrinks with the number of kept rows;
    * ``'unfold_x'``: unfold the kept input onto the output grid (dropped rows read
      zeros), ``X̃[g,c,k⃗,o⃗,n]``, then one GEMM with ``V`` over ``(o⃗, n)``: cheaper
      when few input channels are kept.

    Args:
        x_sub: Kept input ``[N, G, c, *J]``.
        v: Output gradient ``[N, G, d, *O]``.
        geometry: Geometry of the full (unsampled) convolution.
        kept: Per spatial dimension, the kept input rows (sorted) or ``None`` (all).
        method: Force ``'gather_v'`` or ``'unfold_x'`` (for tests); default: cheaper.

    Returns:
        The sum over the kept terms, unscaled, ``[G, d, c, *K]``.
    """
    num_dims = len(geometry.dims)
    device = x_sub.device
    kept_sizes = tuple(x_sub.shape[3:])
    n, groups, c_sub = x_sub.shape[:3]
    d_out = v.shape[2]
    kernel = geometry.kernel_size
    if x_sub.numel() == 0:  # every index of some axis was dropped
        return x_sub.new_zeros(groups, d_out, c_sub, *kernel)
    positions = [_row_positions(d, r, device) for d, r in zip(geometry.dims, kept)]
    if method is None:
        gather_cost = d_out * math.prod(kept_sizes)
        unfold_cost = c_sub * math.prod(geometry.output_size)
        method = "gather_v" if gather_cost <= unfold_cost else "unfold_x"
    if method == "gather_v":
        grid = _grid_last(v, num_dims)  # [G, d, Π(O + 1), N]
        layers = [
            _output_layers(d, pos, size).reshape(-1, d.kernel_size, size)
            for d, pos, size in zip(geometry.dims, positions, kept_sizes)
        ]
        padded_out = [o + 1 for o in geometry.output_size]
        gathered = None
        # several layers only for non-zero padding modes (rows read via the padding)
        for combo in _layer_combinations([len(t) for t in layers]):
            tables = [t[r] for t, r in zip(layers, combo)]
            part = grid.index_select(2, _flat_index(tables, padded_out))
            gathered = part if gathered is None else gathered + part
        # [G, d·ΠK, ΠJ·N] @ [G, ΠJ·N, c] → [G, d, ΠK, c]
        x_t = x_sub.permute(1, *range(3, 3 + num_dims), 0, 2).reshape(groups, -1, c_sub)
        out = torch.bmm(gathered.reshape(groups, d_out * math.prod(kernel), -1), x_t)
        out = out.reshape(groups, d_out, *kernel, c_sub)
        return out.permute(0, 1, 2 + num_dims, *range(2, 2 + num_dims))
    if method == "unfold_x":
        grid = _grid_last(x_sub, num_dims)  # [G, c, Π(J + 1), N]
        tables = [pos.t() for pos in positions]  # [K, O] into J + 1 slots
        padded_in = [j + 1 for j in kept_sizes]
        unfolded = grid.index_select(2, _flat_index(tables, padded_in))
        # [G, d, ΠO·N] @ [G, ΠO·N, c·ΠK] → [G, d, c, ΠK]
        v_t = v.permute(1, 2, *range(3, 3 + num_dims), 0).reshape(groups, d_out, -1)
        unfolded = unfolded.reshape(groups, c_sub * math.prod(kernel), -1)
        out = torch.bmm(v_t, unfolded.transpose(1, 2))
        return out.reshape(groups, d_out, c_sub, *kernel)
    raise ValueError(f"method must be 'gather_v' or 'unfold_x', got {method!r}.")


def _layer_combinations(counts: Sequence[int]):
    """All index tuples ``(r_1, …, r_D)`` with ``0 ≤ r_d < counts[d]``."""
    combos = [()]
    for count in counts:
        combos = [c + (r,) for c in combos for r in range(count)]
    return combos


def sampled_weight_vjp(
    x_sub: Tensor,
    grad_output: Tensor,
    geometry: ConvGeometry,
    kept_rows: Sequence[Optional[Tensor]],
    kept_channels: Optional[Tensor],
    in_channels: int,
    method: Optional[str] = None,
) -> Tensor:
    """Weight VJP restricted to kept input rows and channels (no ``1/p`` scaling).

    Args:
        x_sub: The kept slice of the input ``[N, C_kept, *J]``.
        grad_output: Gradient w.r.t. the output ``[N, C_out, *O]``.
        geometry: Geometry of the full convolution (unsampled input sizes).
        kept_rows: Per spatial dimension, sorted kept input indices or ``None``.
        kept_channels: Sorted kept input channels, or ``None`` for all.
        in_channels: Number of input channels of the full input.
        method: Force a formulation (see :func:`_contract`).

    Returns:
        ``[C_out, C_in / G, *K]``; kernel slices of dropped channels are zero.
    """
    groups = geometry.groups
    n, c_out = grad_output.shape[:2]
    per_group = in_channels // groups
    d_out = c_out // groups
    weight_shape = (c_out, per_group, *geometry.kernel_size)
    v = grad_output.reshape(n, groups, d_out, *grad_output.shape[2:])
    if kept_channels is None:
        xs = x_sub.reshape(n, groups, per_group, *x_sub.shape[2:])
        return _contract(xs, v, geometry, kept_rows, method).reshape(weight_shape)
    grad = x_sub.new_zeros(weight_shape)
    if x_sub.numel() == 0:
        return grad
    group_of = torch.div(kept_channels, per_group, rounding_mode="floor")
    if groups == 1:
        result = _contract(x_sub.unsqueeze(1), v, geometry, kept_rows, method)
        grad[:, kept_channels] = result[0]
        return grad
    # Different groups keep different numbers of channels: one contraction per group.
    for g in torch.unique(group_of).tolist():
        sel = (group_of == g).nonzero().flatten()
        xs = x_sub.index_select(1, sel).unsqueeze(1)
        result = _contract(xs, v[:, g : g + 1], geometry, kept_rows, method)
        rows = slice(g * d_out, (g + 1) * d_out)
        grad[rows, kept_channels[sel] - g * per_group] = result[0]
    return grad


# --- forward and input VJP (exact) ---------------------------------------------------

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _pads(geometry: ConvGeometry) -> Tuple[int, ...]:
    """``F.pad`` argument (last dimension first) for the geometry's padding."""
    return tuple(p for d in reversed(geometry.dims) for p in (d.pad_left, d.pad_right))


def _forward(x: Tensor, weight: Tensor, bias, geometry: ConvGeometry, hyper) -> Tensor:
    """The exact convolution, as ``nn.ConvNd`` computes it (all padding modes)."""
    conv = _CONV[len(geometry.dims)]
    mode = hyper["padding_mode"]
    if mode == "zeros":
        return conv(
            x,
            weight,
            bias,
            hyper["stride"],
            hyper["padding"],
            hyper["dilation"],
            hyper["groups"],
        )
    padded = F.pad(x, _pads(geometry), mode=mode)
    return conv(
        padded, weight, bias, hyper["stride"], 0, hyper["dilation"], hyper["groups"]
    )


def _input_vjp(grad_output: Tensor, weight: Tensor, input_shape, geometry, hyper):
    """Exact gradient w.r.t. the input; needs only the kernel, not the input."""
    symmetric = all(d.pad_left == d.pad_right for d in geometry.dims)
    if hyper["padding_mode"] == "zeros" and symmetric:
        # torch's transposed convolution; the input only contributes its shape
        placeholder = grad_output.new_empty(1).expand(input_shape)
        grad, _, _ = torch.ops.aten.convolution_backward(
            grad_output,
            placeholder,
            weight,
            None,
            [d.stride for d in geometry.dims],
            [d.pad_left for d in geometry.dims],
            [d.dilation for d in geometry.dims],
            False,
            [0] * len(geometry.dims),
            geometry.groups,
            [True, False, False],
        )
        return grad
    # Uneven 'same' padding or padding modes that copy input elements: the TN input
    # VJP sends each padded position's gradient to the element it copies.
    return tnf.input_vjp(grad_output, weight, input_shape, **hyper)


class _TNDropoutConvFunction(torch.autograd.Function):
    """Exact convolution whose backward sub-samples the weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, geometry, hyper, keep, generator):
        out = _forward(x, weight, bias, geometry, hyper)
        ctx.geometry, ctx.hyper = geometry, hyper
        ctx.input_shape = tuple(x.shape)
        ctx.has_bias = bias is not None
        ctx.sampled = ()
        ctx.scale = 1.0
        x_sub = None
        kept_tensors = []
        if ctx.needs_input_grad[1]:
            x_sub = x
            sampled = []
            for axis, p in keep.items():
                if p == 1.0:
                    continue
                dim = 1 if axis == "channel" else 1 + int(axis[1:])
                kept = _sample(x.shape[dim], p, generator, x.device)
                x_sub = x_sub.index_select(dim, kept)
                sampled.append(axis)
                kept_tensors.append(kept)
                ctx.scale /= p
            ctx.sampled = tuple(sampled)
        ctx.save_for_backward(
            weight if ctx.needs_input_grad[0] else None, x_sub, *kept_tensors
        )
        return out

    @staticmethod
    def backward(ctx, grad_output):
        weight, x_sub, *kept_tensors = ctx.saved_tensors
        geometry, hyper = ctx.geometry, ctx.hyper
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_vjp(grad_output, weight, ctx.input_shape, geometry, hyper)
        if ctx.needs_input_grad[1]:
            kept = dict(zip(ctx.sampled, kept_tensors))
            rows = [kept.get(f"i{d + 1}") for d in range(len(geometry.dims))]
            grad_w = sampled_weight_vjp(
                x_sub,
                grad_output,
                geometry,
                rows,
                kept.get("channel"),
                ctx.input_shape[1],
            )
            if ctx.scale != 1.0:
                grad_w = grad_w.mul_(ctx.scale)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_output.sum((0, *range(2, grad_output.dim())))
        return grad_x, grad_w, grad_b, None, None, None, None


def conv_tn_dropout(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntOrTuple = 1,
    padding: Padding = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    keep_prob: KeepProb = 0.5,
    axes: Axes = "spatial",
    generator: Optional[torch.Generator] = None,
    padding_mode: str = "zeros",
) -> Tensor:
    """Exact convolution whose weight gradient is estimated by tensor dropout.

    Forward: equal to ``nn.ConvNd`` with the same hyper-parameters. Backward: exact
    input and bias gradients; the weight gradient keeps each index of the sampled
    axes independently with probability ``p`` and scales by ``1/p`` per sampled axis —
    an unbiased estimate. Only the kept slice of ``x`` is saved for backward.

    Args:
        x: Input ``[N, C_in, *I]`` (1, 2 or 3 spatial dimensions).
        weight: Kernel ``[C_out, C_in / G, *K]``.
        bias: Optional bias ``[C_out]``.
        stride: Stride.
        padding: Padding (int, tuple, ``'same'``, ``'valid'``).
        dilation: Dilation.
        groups: Number of channel groups.
        keep_prob: Keep probability in ``(0, 1]``, shared by the sampled axes, or one
            per axis (dict ``{axis: p}`` or tuple aligned with ``axes``).
        axes: ``"spatial"``, ``"channel"``, or a tuple of names from
            :data:`AXIS_NAMES` (``"channel"``, ``"i1"``, ``"i2"``, ``"i3"``).
        generator: Random generator for the masks (default: torch's global RNG).
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.

    Returns:
        Output ``[N, C_out, *O]``.

    Raises:
        ValueError: For an invalid ``keep_prob``, ``axes`` or hyper-parameter.
    """
    num_dims = x.dim() - 2
    if num_dims not in _CONV:
        raise ValueError(
            f"x must have shape [N, C, *I] with 1, 2 or 3 spatial dimensions, got "
            f"shape {tuple(x.shape)}."
        )
    keep = resolve_keep_probs(keep_prob, axes, num_dims)
    geometry = make_geometry(
        x.shape[2:], weight.shape[2:], stride, padding, dilation, groups, padding_mode
    )
    hyper = dict(
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=padding_mode,
    )
    return _TNDropoutConvFunction.apply(
        x, weight, bias, geometry, hyper, keep, generator
    )


# --- modules -------------------------------------------------------------------------

_STATE = threading.local()


def is_disabled() -> bool:
    """Whether tensor dropout is switched off by :func:`disabled` in this thread."""
    return getattr(_STATE, "disabled", 0) > 0


@contextmanager
def disabled() -> Iterator[None]:
    """Context in which every ``TNDropoutConv{1,2,3}d`` computes exact gradients.

    Use it around code that needs the true gradient or differentiates through the
    model more than once (e.g. curvlinops' GGN/Hessian matrix-vector products),
    without switching the model to ``eval()`` (which would also change batch norm).

    Yields:
        Nothing.
    """
    _STATE.disabled = getattr(_STATE, "disabled", 0) + 1
    try:
        yield
    finally:
        _STATE.disabled -= 1


class _TNDropoutMixin:
    """Tensor dropout on top of an ``nn.ConvNd``; exact when off."""

    keep_prob: KeepProb
    axes: Axes
    generator: Optional[torch.Generator]

    def _setup_dropout(
        self,
        keep_prob: KeepProb,
        axes: Axes,
        generator: Optional[torch.Generator],
    ) -> None:
        self._keep = resolve_keep_probs(keep_prob, axes, len(self.kernel_size))
        self.keep_prob, self.axes, self.generator = keep_prob, axes, generator

    @property
    def sampling(self) -> bool:
        """Whether the next forward pass sub-samples the weight gradient."""
        return (
            self.training
            and not is_disabled()
            and any(p < 1.0 for p in self._keep.values())
        )

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        """Exact convolution; in training, the weight gradient is sub-sampled."""
        if not self.sampling:
            return super().forward(input)
        return conv_tn_dropout(
            input,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            keep_prob=self._keep,
            axes=tuple(self._keep),
            generator=self.generator,
            padding_mode=self.padding_mode,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, keep_prob={self.keep_prob}, axes={self.axes!r}"


_DOC = """``nn.Conv{N}d`` with tensor dropout in its weight gradient.

    Same constructor as ``nn.Conv{N}d`` plus keyword-only ``keep_prob``, ``axes`` (see
    :func:`conv_tn_dropout`) and ``generator``. Same parameters and ``state_dict``
    keys. Exact (``nn.Conv{N}d.forward``) in ``eval()`` mode, with ``keep_prob=1``
    and inside :func:`disabled`.
    """


def _make_class(base: type, num_dims: int) -> type:
    def __init__(  # noqa: N807
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        padding: Padding = 0,
        dilation: IntOrTuple = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        keep_prob: KeepProb = 0.5,
        axes: Axes = "spatial",
        generator: Optional[torch.Generator] = None,
    ) -> None:
        base.__init__(
            self,
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
        )
        self._setup_dropout(keep_prob, axes, generator)

    name = f"TNDropoutConv{num_dims}d"
    return type(
        name,
        (_TNDropoutMixin, base),
        {
            "__init__": __init__,
            "__doc__": _DOC.format(N=num_dims),
            "__module__": __name__,
        },
    )


TNDropoutConv1d = _make_class(nn.Conv1d, 1)
TNDropoutConv2d = _make_class(nn.Conv2d, 2)
TNDropoutConv3d = _make_class(nn.Conv3d, 3)

#: Tensor-dropout class for each torch convolution class.
DROPOUT_CLASSES = {
    nn.Conv1d: TNDropoutConv1d,
    nn.Conv2d: TNDropoutConv2d,
    nn.Conv3d: TNDropoutConv3d,
}


def convert(
    model: nn.Module,
    keep_prob: KeepProb = 0.5,
    axes: Axes = "spatial",
    generator: Optional[torch.Generator] = None,
) -> nn.Module:
    """Turn every ``nn.Conv{1,2,3}d`` of a model into its tensor-dropout version.

    Modules are converted in place by swapping their class, so parameters, buffers,
    hooks (BackPACK's ``extend`` included), optimizer references and ``state_dict``
    keys are untouched. Already converted modules get the new settings; subclasses of
    ``nn.ConvNd`` other than the tensor-dropout ones are left alone.

    Args:
        model: The model (a convolution itself is converted too).
        keep_prob: See :func:`conv_tn_dropout`.
        axes: See :func:`conv_tn_dropout`.
        generator: Random generator shared by the converted modules.

    Returns:
        The same model.

    Raises:
        ValueError: For an invalid ``keep_prob`` or ``axes`` (no module is changed).
    """
    convs = [
        m
        for m in model.modules()
        if type(m) in DROPOUT_CLASSES or isinstance(m, _TNDropoutMixin)
    ]
    for num_dims in sorted({len(m.kernel_size) for m in convs}):
        resolve_keep_probs(keep_prob, axes, num_dims)  # validate before changing any
    for module in convs:
        if type(module) in DROPOUT_CLASSES:
            module.__class__ = DROPOUT_CLASSES[type(module)]
        module._setup_dropout(keep_prob, axes, generator)
    return model
