"""The operations of DESIGN §2.2 as symbolic tensor networks, for any number of dims.

Tensors enter with their channel axis split into groups (``functional.py`` does the
reshape): input ``x[n, g, c, *I]``, kernel ``w[g, d, c, *K]``, output gradient
``v[n, g, d, *O]``, backpropagated GGN factor ``s[v, n, g, d, *O]``.

Each builder returns one or more *formulations* (equivalent networks); the engine picks
one per call (see :mod:`backpack_tn.tn.evaluate`). Besides the simplified pattern
network, every operation whose result is not on the input grid gets a *window* variant
in which surviving patterns are applied as strided views of the padded input
(im2col as a view) — cheaper where one-hot pattern contractions would dominate.
Builders are pure functions of the geometry and options and are cached.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Tuple

from backpack_tn.tn.cache import LRUCache
from backpack_tn.tn.geometry import ConvGeometry
from backpack_tn.tn.network import (
    DimPlan,
    Operand,
    TensorNetwork,
    dropped_kernel_axes,
    input_side,
    kernel_axes,
    output_axes,
    plan_dim,
)

Formulations = Tuple[TensorNetwork, ...]

_NETWORKS: LRUCache[Formulations] = LRUCache("networks", maxsize=1024)

# Tags telling apart the two copies of the input side in quadratic quantities.
_PRIME = "'"


def _plans(
    geometry: ConvGeometry, simplify: bool, windows: bool = False
) -> Tuple[DimPlan, ...]:
    return tuple(plan_dim(d, simplify, windows) for d in geometry.dims)


def _forward(plans) -> Formulations:
    x_side = input_side("x", plans, ("n", "g", "c"), {})
    w = Operand("w", ("g", "d", "c") + kernel_axes(plans))
    out = ("n", "g", "d") + output_axes(plans)
    return (TensorNetwork((*x_side, w), out, dropped_kernel_axes(plans), plans=plans),)


def _unfold(plans) -> Formulations:
    x_side = input_side("x", plans, ("n", "g", "c"), {})
    out = ("n", "g", "c") + kernel_axes(plans) + output_axes(plans)
    return (TensorNetwork(x_side, out, dropped_kernel_axes(plans), plans=plans),)


def _input_vjp(plans) -> Formulations:
    x, *patterns = input_side("x", plans, ("n", "g", "c"), {})
    v = Operand("v", ("n", "g", "d") + output_axes(plans))
    w = Operand("w", ("g", "d", "c") + kernel_axes(plans))
    net = TensorNetwork(
        (v, w, *patterns),
        x.axes,
        dropped_kernel_axes(plans),
        output_views=x.views,
        plans=plans,
    )
    return (net,)


def _weight_vjp(plans, per_sample: bool) -> Formulations:
    v = Operand("v", ("n", "g", "d") + output_axes(plans))
    x_side = input_side("x", plans, ("n", "g", "c"), {})
    out = ("n",) * per_sample + ("g", "d", "c") + kernel_axes(plans)
    return (TensorNetwork((v, *x_side), out, dropped_kernel_axes(plans), plans=plans),)


def _kfac_input(plans, approx: str) -> Formulations:
    reduced = approx == "reduce"
    # expand: both copies share the output position o (Σ_o u_o u_oᵀ);
    # reduce: each copy sums over its own o (ū ūᵀ with ū = Σ_o u_o).
    tags = {"i": _PRIME, "k": _PRIME, **({"o": _PRIME} if reduced else {})}
    first = input_side("x", plans, ("n", "g", "c"), {}, reduced)
    second = input_side("x", plans, ("n", "g", "c" + _PRIME), tags, reduced)
    out = ("g", "c") + kernel_axes(plans) + ("c" + _PRIME,) + kernel_axes(plans, _PRIME)
    dropped = dropped_kernel_axes(plans, ("", _PRIME))
    return (TensorNetwork((*first, *second), out, dropped, plans=plans),)


def _patch_sum(plans) -> Formulations:
    # Σ_o u_{n,o}: the reduced pattern Π̄ = Σ_o Π carries the sum over positions.
    x_side = input_side("x", plans, ("n", "g", "c"), {}, reduced=True)
    out = ("n", "g", "c") + kernel_axes(plans)
    return (TensorNetwork(x_side, out, dropped_kernel_axes(plans), plans=plans),)


def _sqrt_ggn(plans, square_sum=None, label="tn", keep_n=True) -> TensorNetwork:
    s = Operand("s", ("v", "n", "g", "d") + output_axes(plans))
    x_side = input_side("x", plans, ("n", "g", "c"), {})
    out = ("v",) + ("n",) * keep_n + ("g", "d", "c") + kernel_axes(plans)
    dropped = dropped_kernel_axes(plans)
    return TensorNetwork(
        (s, *x_side), out, dropped, square_sum, plans=plans, label=label
    )


def _batch_l2(plans) -> Formulations:
    """Two equivalent networks for ``‖∇W_n‖²``; the engine picks the cheaper."""
    (per_sample,) = _weight_vjp(plans, per_sample=True)
    weight_axes = ("g", "d", "c") + kernel_axes(plans)
    per_sample = TensorNetwork(
        per_sample.operands,
        per_sample.output,
        per_sample.dropped,
        square_sum=weight_axes,
        plans=plans,
        label="per_sample",
    )
    # Gram form Σ_{o,o'} (V_o·V_o')(U_o·U_o'): never forms a per-sample gradient.
    tags = {"i": _PRIME, "o": _PRIME}
    v1 = Operand("v", ("n", "g", "d") + output_axes(plans))
    v2 = Operand("v", ("n", "g", "d") + output_axes(plans, _PRIME))
    x1 = input_side("x", plans, ("n", "g", "c"), {})
    x2 = input_side("x", plans, ("n", "g", "c"), tags)
    gram = TensorNetwork(
        (v1, v2, *x1, *x2),
        ("n",),
        dropped_kernel_axes(plans),
        plans=plans,
        label="gram",
    )
    return (per_sample, gram)


def _sum_grad_squared(plans) -> Formulations:
    (per_sample,) = _weight_vjp(plans, per_sample=True)
    net = TensorNetwork(
        per_sample.operands,
        per_sample.output,
        per_sample.dropped,
        square_sum=("n",),
        plans=plans,
        label="per_sample",
    )
    return (net,)


def _build(op: str, plans, options: tuple) -> Formulations:
    opts = dict(options)
    if op == "forward":
        return _forward(plans)
    if op == "unfold":
        return _unfold(plans)
    if op == "input_vjp":
        return _input_vjp(plans)
    if op == "weight_vjp":
        return _weight_vjp(plans, opts["per_sample"])
    if op == "kfac_input":
        return _kfac_input(plans, opts["approx"])
    if op == "patch_sum":
        return _patch_sum(plans)
    if op == "sqrt_ggn":
        return (_sqrt_ggn(plans, keep_n=not opts["sum_batch"]),)
    if op == "diag_ggn":
        summed = ("v", "n") if not opts["per_sample"] else ("v",)
        return (_sqrt_ggn(plans, summed, "square_sum"),)
    if op == "batch_l2":
        return _batch_l2(plans)
    if op == "sum_grad_squared":
        return _sum_grad_squared(plans)
    raise ValueError(f"Unknown operation {op!r}.")


def _with_window_layouts(net: TensorNetwork) -> TensorNetwork:
    """Lay out each window-viewed operand as (result axes…, contracted axes…).

    The contiguous copy of a window view is then already in the shape a batched GEMM
    wants (for the input: F.unfold's ``[n, g, c, k…, o…]``), so BLAS copies nothing
    more.
    """
    operands = []
    for op in net.operands:
        if any(v.window for v in op.views):
            kept = [a for a in net.output if a in op.axes]
            rest = [a for a in op.axes if a not in kept]
            op = replace(op, layout=tuple(kept + rest))
        operands.append(op)
    return replace(net, operands=tuple(operands))


def networks(
    op: str, geometry: ConvGeometry, simplify: bool = True, **options
) -> Formulations:
    """Return the (cached) formulations of an operation for a convolution geometry.

    Args:
        op: One of ``'forward'``, ``'unfold'``, ``'input_vjp'``, ``'weight_vjp'``,
            ``'kfac_input'``, ``'patch_sum'``, ``'sqrt_ggn'``, ``'diag_ggn'``,
            ``'batch_l2'``, ``'sum_grad_squared'``.
        geometry: The convolution's geometry.
        simplify: Apply the simplifications of DESIGN §2.3.
        **options (bool | str): Operation options (``per_sample``, ``approx``).

    Returns:
        Equivalent tensor networks computing the operation.
    """
    options_key = tuple(sorted(options.items()))
    key = (op, geometry, simplify, options_key)

    def build() -> Formulations:
        formulations = _build(op, _plans(geometry, simplify), options_key)
        window_plans = _plans(geometry, simplify, windows=True)
        # Strided-window variants where a pattern survived simplification; not for
        # results on the input grid (overlapping windows would need a scatter-add).
        if op != "input_vjp" and any(p.kind == "window" for p in window_plans):
            windowed = _build(op, window_plans, options_key)
            formulations += tuple(_with_window_layouts(net) for net in windowed)
        return formulations

    return _NETWORKS.get_or_create(key, build)
