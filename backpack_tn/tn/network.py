"""Symbolic tensor networks and the simplification passes of DESIGN §2.3.

A :class:`TensorNetwork` is a pure description: named axes per operand, how each
input-like operand is *viewed* (sliced / reshaped) before contraction, which index
patterns take part, and the output axes. It is built from hyper-parameters alone, is
hashable, and is cached; no tensor exists until :mod:`backpack_tn.tn.evaluate`
materialises the operands.

Simplifications are decided per spatial dimension by :func:`plan_dim`:

* ``identity`` (``K = S = 1``, no padding): the pattern is ``δ_io``; it is dropped, the
  input axis *is* the output axis and the size-1 kernel axis disappears.
* ``downsample`` (``K = 1 < S``, no padding): slice ``X[..., ::S]``, then identity.
* ``dense`` (``S ≥ K``, no padding, no dilation): slice/zero-pad ``X`` to ``O·S``,
  reshape ``i → (o, s)`` and keep ``s < K``; the pattern disappears.
* ``crop``: input rows no output reads are sliced off and the pattern shrinks to match.
* ``reduce`` (KFAC-reduce only): ``Σ_o Π`` is pre-contracted to ``Π̄[i, k]``; for dense
  dimensions the sum over ``o`` simply stays in the contraction.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import FrozenSet, Optional, Tuple

import opt_einsum

from backpack_tn.tn.geometry import DimGeometry
from backpack_tn.tn.patterns import structure, touched_rows

Axes = Tuple[str, ...]


@dataclass(frozen=True)
class SpatialView:
    """How one spatial axis of an input-like tensor is read before contraction.

    Applied in this order: slice ``[start:stop:step]``; or, if ``index`` is given,
    gather those rows instead (padding modes that copy input elements); append
    ``pad = (before, after)`` zeros; then either cut into non-overlapping windows
    (``split = (O, S, K)``: reshape to ``(O, S)``, keep ``(O, K)``) or into
    overlapping ones (``window = (O, S, K, D)``: a strided view, no copy). Both
    window forms turn the axis into the two axes ``(o, k)``.
    """

    start: int
    stop: int
    step: int = 1
    pad: Tuple[int, int] = (0, 0)
    index: Optional[Tuple[int, ...]] = None
    split: Optional[Tuple[int, int, int]] = None
    window: Optional[Tuple[int, int, int, int]] = None


@dataclass(frozen=True)
class DimPlan:
    """Simplification decision for one spatial dimension.

    Attributes:
        geometry: The dimension's geometry.
        kind: ``'identity'``, ``'downsample'``, ``'dense'``, ``'crop'``,
            ``'general'`` (contract with the pattern) or ``'window'`` (apply the
            pattern as a strided view of the padded input).
        view: How the input axis is read.
        x_roles: Roles of the axes the viewed input axis becomes: ``('o',)``,
            ``('o', 'k')`` or ``('i',)``.
        pattern_rows: Input rows of the pattern still needed, or ``None`` if the
            pattern was eliminated.
    """

    geometry: DimGeometry
    kind: str
    view: SpatialView
    x_roles: Tuple[str, ...]
    pattern_rows: Optional[Tuple[int, int]]

    @property
    def drops_kernel_axis(self) -> bool:
        """Whether the (size-1) kernel axis vanishes from the network."""
        return self.kind in ("identity", "downsample")


def plan_dim(dim: DimGeometry, simplify: bool = True, windows: bool = False) -> DimPlan:
    """Decide how to treat one spatial dimension (DESIGN §2.3).

    Args:
        dim: Geometry of the dimension.
        simplify: If ``False``, always contract with the full pattern.
        windows: Replace patterns that survive simplification by a strided window
            view of the (padded) input: im2col as a view, contracted by BLAS.

    Returns:
        The dimension's plan.
    """
    size, out, stride, kernel = (
        dim.input_size,
        dim.output_size,
        dim.stride,
        dim.kernel_size,
    )
    kind = structure(dim) if simplify else "general"
    if kind == "identity":
        return DimPlan(dim, kind, SpatialView(0, size), ("o",), None)
    if kind == "downsample":
        return DimPlan(dim, kind, SpatialView(0, size, stride), ("o",), None)
    if kind == "dense" and windows and simplify and kernel > 1:
        # the window variant of a non-overlapping kernel: materialised directly in
        # GEMM layout (torch's im2col where it applies) instead of a permuted reshape
        return DimPlan(dim, "window", _window_view(dim), ("o", "k"), None)
    if kind == "dense":
        length = out * stride
        view = SpatialView(
            0,
            min(size, length),
            pad=(0, max(0, length - size)),
            split=(out, stride, kernel),
        )
        return DimPlan(dim, kind, view, ("o", "k"), None)
    if windows and simplify:
        return DimPlan(dim, "window", _window_view(dim), ("o", "k"), None)
    if kind == "crop":
        start, stop = touched_rows(dim)
        return DimPlan(dim, kind, SpatialView(start, stop), ("i",), (start, stop))
    return DimPlan(dim, "general", SpatialView(0, size), ("i",), (0, size))


def _window_view(dim: DimGeometry) -> SpatialView:
    """Strided-window view: pad (zeros, or gather copied rows), then windows."""
    window = (dim.output_size, dim.stride, dim.kernel_size, dim.dilation)
    # Only the first ``span`` rows of the padded axis are read.
    span = (dim.output_size - 1) * dim.stride + dim.dilation * (dim.kernel_size - 1) + 1
    if dim.padding_mode == "zeros" or not dim.padded:
        before = min(dim.pad_left, span)
        stop = min(max(span - dim.pad_left, 0), dim.input_size)
        after = span - before - stop
        return SpatialView(0, stop, pad=(before, after), window=window)
    index = tuple(dim.resolve(j) for j in range(-dim.pad_left, span - dim.pad_left))
    return SpatialView(0, dim.input_size, index=index, window=window)


@dataclass(frozen=True)
class PatternRef:
    """An index-pattern operand: dimension, kept rows, summed over ``o`` or not."""

    geometry: DimGeometry
    rows: Tuple[int, int]
    reduced: bool = False


@dataclass(frozen=True)
class Operand:
    """One operand of a tensor network.

    Attributes:
        source: Name of the tensor argument (``'x'``, ``'w'``, ``'v'``, ``'s'``) the
            operand is read from, or ``None`` for an index pattern.
        axes: Axis names after viewing, before dropping size-1 kernel axes.
        views: Views applied to the trailing spatial axes of the source tensor (empty
            for tensors that are used as they are).
        pattern: The pattern this operand is, if ``source`` is ``None``.
        layout: If not ``None``, the viewed tensor is permuted to this axis order and
            copied to contiguous memory (window views, which BLAS would copy anyway:
            choosing the order makes that copy the only one).
    """

    source: Optional[str]
    axes: Axes
    views: Tuple[SpatialView, ...] = ()
    pattern: Optional[PatternRef] = None
    layout: Optional[Axes] = None

    @property
    def contracted_axes(self) -> Axes:
        """Axis names in the order the contraction sees them."""
        return self.layout if self.layout is not None else self.axes


@dataclass(frozen=True)
class TensorNetwork:
    """A contraction with named axes plus the cheap element-wise epilogue around it.

    Attributes:
        operands: The operands.
        output: Axis names of the contraction result (before dropping).
        dropped: Size-1 kernel axes removed by the identity/down-sampling passes; they
            are squeezed from operands and left out of the equation.
        square_sum: If not ``None``, the contraction result is squared element-wise and
            these axes are summed (diagonal GGN, batch L2, sum of squared gradients).
        output_views: For results living on the input grid (input VJP): the views that
            map the full input axes to the result's trailing axes, used to embed the
            result back into a zero tensor of the input's shape.
        plans: The per-dimension simplification decisions (for inspection).
        label: Name of the formulation (e.g. ``'per_sample'``, ``'gram'``).
    """

    operands: Tuple[Operand, ...]
    output: Axes
    dropped: FrozenSet[str] = frozenset()
    square_sum: Optional[Axes] = None
    output_views: Tuple[SpatialView, ...] = ()
    plans: Tuple[DimPlan, ...] = ()
    label: str = "tn"

    def kept(self, axes: Axes) -> Axes:
        """``axes`` without the dropped ones."""
        return tuple(a for a in axes if a not in self.dropped)

    @property
    def result_axes(self) -> Axes:
        """Axes of the final result (after dropping and the square-sum epilogue)."""
        summed = set(self.square_sum or ())
        return tuple(a for a in self.kept(self.output) if a not in summed)

    @cached_property
    def equation(self) -> str:
        """The einsum equation of the contraction, one letter per named axis."""
        names: list = []
        for op in self.operands:
            names.extend(a for a in self.kept(op.contracted_axes) if a not in names)
        sym = {name: opt_einsum.get_symbol(i) for i, name in enumerate(names)}

        def term(axes: Axes) -> str:
            return "".join(sym[a] for a in self.kept(axes))

        inputs = ",".join(term(op.contracted_axes) for op in self.operands)
        return f"{inputs}->{term(self.output)}"

    @property
    def strategy(self) -> str:
        """``'window'`` if patterns are applied as strided views, else ``'pattern'``."""
        return "window" if "window" in self.kinds else "pattern"

    @property
    def kinds(self) -> Tuple[str, ...]:
        """Simplification applied per spatial dimension."""
        return tuple(p.kind for p in self.plans)

    def describe(self) -> str:
        """Human-readable summary with named axes (einops style)."""
        parts = []
        for op in self.operands:
            name = op.source or (
                "Π̄" if op.pattern is not None and op.pattern.reduced else "Π"
            )
            parts.append(f"{name}[{' '.join(self.kept(op.contracted_axes))}]")
        out = " ".join(self.kept(self.output))
        text = f"{', '.join(parts)} -> {out}"
        if self.square_sum:
            text += f"; square, sum over {' '.join(self.square_sum)}"
        return text


# --- helpers used by the operation builders in conv.py -------------------------------


def axis(role: str, dim: int, tag: str = "") -> str:
    """Name of the axis with role ``i``/``o``/``k`` of spatial dimension ``dim``."""
    return f"{role}{dim + 1}{tag}"


def input_side(
    source: str,
    plans: Tuple[DimPlan, ...],
    leading: Axes,
    tags: dict,
    reduced: bool = False,
) -> Tuple[Operand, ...]:
    """Operands that read an input-like tensor through the index patterns.

    Args:
        source: Tensor argument name (usually ``'x'``).
        plans: Per-dimension plans.
        leading: Names of the non-spatial leading axes (e.g. ``('n', 'g', 'c')``).
        tags: Suffix per role (``'i'``, ``'o'``, ``'k'``) to tell apart copies of the
            same side in one network (e.g. ``{'i': "'", 'k': "'"}`` for the second
            input of a Kronecker factor, sharing ``o``).
        reduced: Use ``Π̄ = Σ_o Π`` and drop ``o`` (KFAC-reduce).

    Returns:
        The input operand followed by the remaining pattern operands.
    """
    spatial, patterns = [], []
    for d, plan in enumerate(plans):
        spatial.extend(axis(r, d, tags.get(r, "")) for r in plan.x_roles)
        if plan.pattern_rows is not None:
            i, o, k = (axis(r, d, tags.get(r, "")) for r in "iok")
            ref = PatternRef(plan.geometry, plan.pattern_rows, reduced)
            patterns.append(Operand(None, (i, k) if reduced else (i, o, k), (), ref))
    x = Operand(source, leading + tuple(spatial), tuple(p.view for p in plans))
    return (x, *patterns)


def kernel_axes(plans: Tuple[DimPlan, ...], tag: str = "") -> Axes:
    """Kernel axes ``k1 … kd`` (with an optional tag)."""
    return tuple(axis("k", d, tag) for d in range(len(plans)))


def output_axes(plans: Tuple[DimPlan, ...], tag: str = "") -> Axes:
    """Output spatial axes ``o1 … od`` (with an optional tag)."""
    return tuple(axis("o", d, tag) for d in range(len(plans)))


def dropped_kernel_axes(plans: Tuple[DimPlan, ...], tags: Tuple[str, ...] = ("",)):
    """Kernel axes eliminated by identity/down-sampling dimensions, for every tag."""
    return frozenset(
        axis("k", d, tag)
        for d, p in enumerate(plans)
        if p.drops_kernel_axis
        for tag in tags
    )
