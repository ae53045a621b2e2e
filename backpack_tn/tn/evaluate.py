"""Choose how to evaluate an operation, materialise its operands, contract them.

An operation arrives as one or more equivalent formulations
(:func:`backpack_tn.tn.conv.networks`). A *candidate* is a formulation plus an
executor:

* ``pattern`` — the simplified network, contracted by ``opt_einsum`` (patterns as
  small dense tensors);
* ``window`` — patterns applied as strided windows of the input, materialised once
  in GEMM-ready layout (im2col without a padded copy), then contracted;
* ``taps`` — window formulations contracted one kernel tap at a time on strided views
  (:mod:`backpack_tn.tn.windows`): no unfolded input at all;
* ``per_class`` — networks squared and summed over the classes of ``S`` (diagonal
  GGN) contracted one class slice ``S[v]`` at a time: no copy of ``S``.

Every candidate is planned with ``opt_einsum`` for the concrete shapes (plans cached per
equation, shapes, dtype and device). Small problems take the candidate with the lowest
estimated cost (FLOPs plus copies). Larger ones are *measured* on the real inputs in
interleaved rounds, and the fastest per (operation, shapes, dtype, device) is cached,
or the leaner of about equally fast ones (memory estimates): within the first call
where one run is short, otherwise over the first calls, one candidate per call
(:func:`_measure`). Every call returns a measured run's own result, so little is
computed in vain.
:func:`set_autotune` turns this off. If the chosen plan's largest intermediate exceeds
the memory budget (:func:`set_memory_budget`), the batch is processed in chunks.
Finally the choice is kept as a *prepared call* per shapes and settings: later calls
run its torch calls without re-deciding anything.
"""

from __future__ import annotations

import functools
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import (
    Callable,
    Dict,
    Hashable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

import opt_einsum
import torch
from torch import Tensor
from torch.autograd import forward_ad

from backpack_tn.tn import windows
from backpack_tn.tn.cache import LRUCache
from backpack_tn.tn.devices import is_cuda
from backpack_tn.tn.gram import product_fraction, symmetric_gram
from backpack_tn.tn.network import Operand, TensorNetwork
from backpack_tn.tn.pairs import compile_pair
from backpack_tn.tn.patterns import index_pattern
from backpack_tn.tn.views import apply_views, embed, viewed_shape
from backpack_tn.tn.windows import (
    im2col,
    run_taps,
    supports_direct_windows,
    supports_taps,
    unfold_mode,
    window_builder,
    window_dims,
)

Shape = Tuple[int, ...]
STRATEGIES = ("pattern", "window", "taps", "per_class")

#: FLOP-equivalents of copying one element (memory-bound work is far slower per
#: element than a fused multiply-add in a GEMM).
COPY_COST = 16.0

#: FLOP-equivalents of one kernel launch / Python-level torch call, so that tiny
#: problems prefer the candidate with the fewest calls. A small einsum call takes
#: 10–20 µs on a CPU (one index-pattern step of a 7×7 depthwise KFAC factor: 18 µs),
#: the time of ~10⁶ FLOPs of a GEMM at ~100 GFLOP/s (one core of the benchmark
#: machine). The previous value, 2·10⁵, made five tiny einsum calls look cheaper than
#: one ``im2col`` and one GEMM that ran twice as fast
#: (``python -m backpack_tn.bench.calibrate``, docs/engine.md).
CALL_COST = 1e6

#: Autotuning measures only candidates estimated at most this many times as costly as
#: the cheapest, so one first call never runs a hopeless candidate ...
AUTOTUNE_PRUNE = 2.0

#: ... or, for small problems, at most this many FLOP-equivalents (≈ 2 ms) more: the
#: model misjudges small problems by more than 2× (per-tap loops on depthwise layers
#: ran 1.7–2× faster than the candidate estimated cheapest). Measuring such a
#: candidate costs at most ~40 ms once per problem shape (ten rounds of two runs).
AUTOTUNE_SLACK = 2e8


@dataclass(frozen=True)
class DeviceCosts:
    """The cost model's constants for one device type, in FLOP-equivalents.

    Attributes:
        copy: Per element copied (:data:`COPY_COST` on a CPU).
        call: Per torch call (:data:`CALL_COST` on a CPU).
        slack: Autotuning's absolute margin (:data:`AUTOTUNE_SLACK` on a CPU).
    """

    copy: float
    call: float
    slack: float


#: The constants on a CUDA GPU, in FLOP-equivalents of a float32 GEMM at
#: ~4·10¹³ FLOP/s (an H100 without TF32). Estimated from the first H100 run
#: (``docs/benchmarks.md``), not calibrated like the CPU's: a small torch call (an
#: einsum step with its permuted copies, one tap of a per-tap loop) took 10–25 µs,
#: ≈ 10⁹ FLOP-equivalents, so on that GPU the number of calls decides problems of up
#: to ~10¹⁰ FLOPs; a copy moves 8 bytes per element at ~3 TB/s (≈ 100 FLOPs).
CUDA_COSTS = DeviceCosts(copy=128.0, call=1e9, slack=2e10)


def device_costs(device: torch.device) -> DeviceCosts:
    """The cost-model constants for ``device`` (the CPU's are read at call time)."""
    if is_cuda(device):
        return CUDA_COSTS
    return DeviceCosts(COPY_COST, CALL_COST, AUTOTUNE_SLACK)


def plausible(
    costs: Sequence[float],
    prune: Optional[float] = None,
    slack: Optional[float] = None,
) -> List[int]:
    """Indices of the candidates autotuning measures, given their estimated costs.

    Those within ``prune`` times the cheapest estimate or ``slack`` above it
    (defaults: :data:`AUTOTUNE_PRUNE`, :data:`AUTOTUNE_SLACK`).
    """
    prune = AUTOTUNE_PRUNE if prune is None else prune
    slack = AUTOTUNE_SLACK if slack is None else slack
    least = min(costs)
    bound = max(prune * least, least + slack)
    return [i for i, cost in enumerate(costs) if cost <= bound]


_SETTINGS: Dict[str, object] = {
    "budget": 2**30,  # bytes of the largest intermediate before batch chunking
    "forced": None,  # a strategy pinned by force_strategy
    "autotune": True,
    "autotune_min_flops": 2e6,  # below (a few tens of µs): the cost model decides
    "native": True,  # forward/input VJP/weight VJP may run torch's own kernels
    "gram": True,  # Gram networks by their block upper triangle (gram_form)
}


def set_native(enabled: bool) -> None:
    """Allow (default) or forbid torch's convolution kernels for plain convolutions.

    The forward pass and the summed input/weight VJPs of a zero-padded convolution are
    what torch's (cuDNN/oneDNN) kernels compute, and they beat the contractions on
    most layers, so ``backpack_tn.functional`` runs them there — measured once per
    problem against the TN where autotuning is on and the problem is above its
    threshold (:func:`set_autotune`; the TN wins e.g. on patchify stems). Everything
    else (padding modes, uneven ``'same'``, per-sample and second-order quantities)
    is a TN.

    Args:
        enabled: Whether the dispatch is allowed.
    """
    _SETTINGS["native"] = bool(enabled)


def native_allowed() -> bool:
    """Whether torch's kernels may be used (allowed and no strategy is forced)."""
    return bool(_SETTINGS["native"]) and _SETTINGS["forced"] is None


def set_memory_budget(num_bytes: Optional[int]) -> None:
    """Bound the largest intermediate of a contraction; ``None`` disables chunking.

    Args:
        num_bytes: Budget in bytes (default 1 GiB) or ``None``.

    Raises:
        ValueError: If the budget is not positive.
    """
    if num_bytes is not None and num_bytes <= 0:
        raise ValueError(f"memory budget must be positive or None, got {num_bytes}.")
    _SETTINGS["budget"] = num_bytes


def get_memory_budget() -> Optional[int]:
    """Current memory budget in bytes (``None``: unbounded)."""
    return _SETTINGS["budget"]


def set_autotune(enabled: bool, min_flops: Optional[float] = None) -> None:
    """Measure candidates on the first calls (default) or always trust the cost model.

    Args:
        enabled: Whether to autotune.
        min_flops: Problems whose cheapest candidate is estimated below this many
            FLOP-equivalents are never measured (default ``2e6``: a few tens of µs
            on a CPU). On a GPU every torch call is priced at 10⁹
            (:data:`CUDA_COSTS`), so there every problem with a choice is measured.
    """
    _SETTINGS["autotune"] = bool(enabled)
    if min_flops is not None:
        _SETTINGS["autotune_min_flops"] = float(min_flops)


def get_autotune() -> Tuple[bool, float]:
    """Whether autotuning is on, and its FLOP threshold."""
    return bool(_SETTINGS["autotune"]), float(_SETTINGS["autotune_min_flops"])


@contextmanager
def gram_recognition(enabled: bool) -> Iterator[None]:
    """Within the context, evaluate Gram networks by their block upper triangle or not.

    On by default (:func:`gram_form`); off gives the plain GEMM, for comparisons.

    Args:
        enabled: Whether Gram networks are recognised.

    Yields:
        Nothing.
    """
    previous = _SETTINGS["gram"]
    _SETTINGS["gram"] = bool(enabled)
    try:
        yield
    finally:
        _SETTINGS["gram"] = previous


@contextmanager
def force_strategy(strategy: Optional[str]) -> Iterator[None]:
    """Within the context, use only candidates of one strategy where available.

    For benchmarks and tests; normal use lets the engine choose. Operations without
    a candidate of that strategy use their others.

    Args:
        strategy: ``'pattern'``, ``'window'``, ``'taps'``, ``'per_class'`` or
            ``None`` (automatic).

    Yields:
        Nothing.

    Raises:
        ValueError: For an unknown strategy.
    """
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(
            f"strategy must be one of {STRATEGIES} or None, got {strategy!r}."
        )
    previous = _SETTINGS["forced"]
    _SETTINGS["forced"] = strategy
    try:
        yield
    finally:
        _SETTINGS["forced"] = previous


# --- contraction plans ---------------------------------------------------------------


@dataclass(frozen=True)
class ContractionPlan:
    """A planned contraction: its executor (operands -> result) and cost estimates."""

    expression: Callable
    flops: float
    largest_intermediate: int  # elements
    peak_elements: int = 0  # intermediates alive at once, see _peak_elements


_PLANS: LRUCache[ContractionPlan] = LRUCache("contractions", maxsize=1024)
_PLANNING_SECONDS = [0.0]  # total time spent planning; autotuning discounts it


def _presummed(
    equation: str, shapes: Sequence[Shape]
) -> Tuple[str, Tuple[Shape, ...], float]:
    """``equation`` without the axes that only one operand has and the result lacks.

    ``torch.einsum`` sums such axes of an operand before any product; ``opt_einsum``
    prices them inside the pairwise product, as if the product ran over them too (the
    window network of a KFAC-reduce factor, whose output axes each operand sums on
    its own: 8·10¹¹ FLOPs estimated, 3·10⁸ run). Returns the reduced equation and
    shapes, and the additions of the sums (one per element of a reduced operand).
    """
    inputs, output = equation.split("->")
    terms = inputs.split(",")
    count: Dict[str, int] = {}
    for term in terms:
        for char in set(term):
            count[char] = count.get(char, 0) + 1
    new_terms, new_shapes, presum = [], [], 0.0
    for term, shape in zip(terms, shapes):
        keep = [i for i, c in enumerate(term) if count[c] > 1 or c in output]
        if keep and len(keep) < len(term):
            presum += math.prod(shape)
            term = "".join(term[i] for i in keep)
            shape = tuple(shape[i] for i in keep)
        new_terms.append(term)
        new_shapes.append(tuple(shape))
    return ",".join(new_terms) + "->" + output, tuple(new_shapes), presum


def _pairwise(contraction_list) -> Callable:
    """Run ``opt_einsum``'s planned steps as direct torch calls.

    Each step has one or two operands. A two-operand step runs as one ``bmm`` laid
    out on the plan's first run (:func:`backpack_tn.tn.pairs.compile_pair`), any
    other as ``torch.einsum``; ``opt_einsum``'s own executor adds tens of
    microseconds of Python per step (character conversion, ``tensordot``
    reshapes), and ``torch.einsum`` decides its layout again on every call, both of
    which decide sub-millisecond problems.
    """
    steps = tuple((tuple(inds), equation) for inds, _, equation, *_ in contraction_list)
    # per step: a pair function, or None for torch.einsum; set once, by the first run
    # that completes (one assignment: runs in several threads each plan their own)
    compiled: List[Optional[tuple]] = [None]

    def run(*operands: Tensor) -> Tensor:
        operands = list(operands)
        pairs = compiled[0]
        planned = [] if pairs is None else None
        for step, (inds, equation) in enumerate(steps):
            # ``inds`` are sorted descending, the order of ``equation``'s inputs
            picked = [operands.pop(i) for i in inds]
            if pairs is None:
                pair = compile_pair(equation, *picked) if len(picked) == 2 else None
                planned.append(pair)
            else:
                pair = pairs[step]
            if pair is None:
                operands.append(torch.einsum(equation, *picked))
            else:
                operands.append(pair(*picked))
        if pairs is None:
            compiled[0] = tuple(planned)
        return operands[0]

    run.steps = len(steps)
    return run


def _peak_elements(
    equation: str, shapes: Sequence[Shape], contraction_list: Sequence[tuple]
) -> int:
    """Estimated elements of the intermediates alive at once while a plan runs.

    Each step holds the intermediates still alive (its own inputs included) and its
    result. An intermediate a step consumes is counted twice: its index order is
    ``opt_einsum``'s, rarely the batched-GEMM layout, so ``torch.einsum`` copies it
    (AlexNet's 5×5 64→192 per-sample gradients by index patterns, batch 8: 38 MiB of
    intermediates, 70 MiB measured peak, 66 MiB estimated). The operands passed in
    (inputs, unfolded windows) are laid out for the GEMM by the networks and not
    counted here.
    """
    inputs = equation.split("->")[0]
    size: Dict[str, int] = {}
    for term, shape in zip(inputs.split(","), shapes):
        size.update(zip(term, shape))
    alive = [None] * len(shapes)  # elements of intermediates, None for inputs
    peak = 0
    for inds, _, step, *_ in contraction_list:
        picked = [alive.pop(i) for i in inds]
        held = sum(a for a in alive if a is not None)
        consumed = sum(a for a in picked if a is not None)
        result = math.prod(size[c] for c in step.split("->")[1])
        peak = max(peak, held + 2 * consumed + result)
        alive.append(result)
    return peak


def _plan(equation: str, shapes: Sequence[Shape], dtype, device) -> ContractionPlan:
    def create() -> ContractionPlan:
        start = time.perf_counter()
        try:
            return _create()
        finally:
            _PLANNING_SECONDS[0] += time.perf_counter() - start

    def _create() -> ContractionPlan:
        # plan (and price) as torch.einsum runs it: axes of one operand only are
        # summed before its first product
        reduced, reduced_shapes, presum = _presummed(equation, shapes)
        _, info = opt_einsum.contract_path(reduced, *reduced_shapes, shapes=True)
        expression = opt_einsum.contract_expression(
            equation, *shapes, optimize=info.path
        )
        return ContractionPlan(
            _pairwise(expression.contraction_list),
            float(info.opt_cost) + presum,
            int(info.largest_intermediate),
            _peak_elements(equation, shapes, expression.contraction_list),
        )

    return _PLANS.get_or_create((equation, tuple(shapes), dtype, device), create)


# --- operands ------------------------------------------------------------------------


def _operand_shape(net: TensorNetwork, op: Operand, shapes: Mapping[str, Shape]):
    if op.source is None:
        ref = op.pattern
        rows = ref.rows[1] - ref.rows[0]
        g = ref.geometry
        full = (
            (rows, g.kernel_size)
            if ref.reduced
            else (rows, g.output_size, g.kernel_size)
        )
    else:
        full = viewed_shape(shapes[op.source], op.views)
    sizes = dict(zip(op.axes, full))
    return tuple(sizes[a] for a in net.kept(op.contracted_axes))


def _materialise_all(
    net: TensorNetwork, tensors: Mapping[str, Tensor], dtype, device
) -> list:
    """All operands; an input read twice the same way is prepared once."""
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
        key, drop = _operand_key(net, op)
        if key not in done:
            done[key] = _prepare_operand(net, op, tensors[op.source], drop)
        operands.append(done[key])
    return operands


def _operand_key(net: TensorNetwork, op: Operand) -> Tuple[tuple, tuple]:
    """What identifies a prepared input operand, and its dropped axis positions.

    Copies of one input (e.g. both sides of a Kronecker factor) differ in axis names
    only: keyed by the permutation, the unfolded input is built once.
    """
    drop = tuple(p for p, a in enumerate(op.axes) if a in net.dropped)
    layout = None if op.layout is None else tuple(map(op.axes.index, op.layout))
    return (op.source, op.views, drop, layout), drop


def _direct_windows(net: TensorNetwork, op: Operand, drop: tuple) -> bool:
    """Whether the operand is unfolded straight into its layout (``im2col``)."""
    return op.layout is not None and not drop and supports_direct_windows(op, net.plans)


def _prepare_operand(net: TensorNetwork, op: Operand, tensor: Tensor, drop) -> Tensor:
    if _direct_windows(net, op, drop):
        return im2col(tensor, op, net.plans, op.layout)
    tensor = apply_views(tensor, op.views)
    tensor = tensor.squeeze(drop) if drop else tensor
    if op.layout is not None:
        kept = net.kept(op.axes)
        perm = [kept.index(a) for a in net.kept(op.layout)]
        # Window views would be copied by every BLAS call anyway: copy once, in the
        # layout the contraction wants.
        tensor = tensor.permute(perm).contiguous()
    return tensor


def _contract(net: TensorNetwork, operands: list, epilogue: bool = True) -> Tensor:
    """Contract materialised operands (plan from the cache) and apply the epilogue."""
    # both symmetric forms need the second half of the operands to be the first's
    # tensors: checked before looking the forms up (per tap of a per-tap loop)
    half = len(operands) // 2
    if len(operands) % 2 == 0 and operands[0] is operands[half]:
        result = _by_symmetry(symmetry_forms(net), operands)
        if result is not None:
            return result
    tensor = operands[0]
    shapes = [tuple(o.shape) for o in operands]
    plan = _plan(net.equation, shapes, tensor.dtype, tensor.device)
    result = plan.expression(*operands)
    if not (net.square_sum and epilogue):
        return result
    return _square_sum(net, result, operands)


GramForm = Tuple[Tuple[int, ...], int, int, Tuple[int, ...]]


@lru_cache(maxsize=1024)
def gram_form(net: TensorNetwork) -> Optional[GramForm]:
    """Whether ``net`` is the Gram matrix of one operand: ``T Tᵀ`` per batch index.

    That is two operands reading one source the same way, whose axes agree except
    for renamed *row* axes, and a result ``(batch…, rows…, rows'…)``: the shared axes
    in the result are batch axes, the others are summed — the KFAC-expand factor,
    ``Σ_{n,o} u uᵀ``. A GEMM computes both triangles of the symmetric result;
    :func:`~backpack_tn.tn.gram.symmetric_gram` about half of the products.

    A renamed axis that is not in the result is summed by each operand on its own
    (KFAC-reduce: ``Σ_n (Σ_o u)(Σ_o' u)ᵀ``). Summed once on the shared operand, it
    leaves a Gram matrix; ``torch.einsum`` would sum it once per operand.

    Args:
        net: A network.

    Returns:
        ``(perm, batch axes, row axes, presum)``: ``presum`` are the operand's axes
        summed first; ``perm`` orders the remaining axes as
        ``(batch…, rows…, summed…)``; or ``None``.
    """
    if len(net.operands) != 2 or net.square_sum:
        return None
    a, b = net.operands
    if a.source is None or (a.source, a.views) != (b.source, b.views):
        return None
    if _operand_key(net, a)[0] != _operand_key(net, b)[0]:
        return None  # built differently: not one tensor at run time
    axes_a = net.kept(a.contracted_axes)  # as materialised
    axes_b = net.kept(b.contracted_axes)
    if len(axes_a) != len(axes_b):
        return None
    if len(set(axes_a)) != len(axes_a) or len(set(axes_b)) != len(axes_b):
        return None  # a diagonal: the position-wise renaming is no bijection
    out = list(net.kept(net.output))
    partner = {x: y for x, y in zip(axes_a, axes_b) if x != y}
    if set(partner.values()) & set(axes_a):
        return None
    # renamed on both sides and in neither result: each operand sums its own
    own = [x for x in axes_a if x in partner and x not in out]
    if any(partner[x] in out for x in own):
        return None
    partner = {x: y for x, y in partner.items() if x not in own}
    batch = [x for x in out if x in axes_a and x not in partner]
    rows = [x for x in out if x in partner]
    kept = [x for x in axes_a if x not in own]
    summed = [x for x in kept if x not in partner and x not in out]
    if out != batch + rows + [partner[x] for x in rows] or len(rows) != len(partner):
        return None
    perm = tuple(kept.index(x) for x in batch + rows + summed)
    presum = tuple(axes_a.index(x) for x in own)
    return perm, len(batch), len(rows), presum


def _gram(tensor: Tensor, form: GramForm) -> Tensor:
    """The Gram network's result for its one operand (see :func:`gram_form`)."""
    perm, num_batch, num_rows, presum = form
    if presum:
        tensor = tensor.sum(presum)
    # the identity for operands in GEMM layout
    return _gram_of(tensor.permute(perm), num_batch, num_rows)


def _gram_of(tensor: Tensor, num_batch: int, num_rows: int) -> Tensor:
    """Symmetric Gram of ``(batch…, rows…, inner…)``: ``(batch…, rows…, rows…)``."""
    batch = tensor.shape[:num_batch]
    rows = tensor.shape[num_batch : num_batch + num_rows]
    # a copy only where the operand is not laid out for the GEMM (e.g. 1×1 layers)
    matrix = tensor.reshape(math.prod(batch), math.prod(rows), -1)
    return symmetric_gram(matrix).reshape(*batch, *rows, *rows)


def _gram_flops(batch: int, rows: int, inner: int, device) -> float:
    """FLOPs of ``symmetric_gram`` on a ``[batch, rows, inner]`` operand."""
    products = 2.0 * batch * rows * rows * inner  # a full GEMM, as opt_einsum counts
    return products * product_fraction(rows, inner, device)


@dataclass(frozen=True)
class HalvesForm:
    """A network that is the Gram matrix of its first half's result.

    See :func:`halves_form`.

    Attributes:
        half: Number of operands in each half.
        equation: Einsum equation of the first half, with result
            ``(batch…, rows…, inner…)``.
        num_batch: Number of batch axes.
        num_rows: Number of row axes.
    """

    half: int
    equation: str
    num_batch: int
    num_rows: int


@lru_cache(maxsize=1024)
def halves_form(net: TensorNetwork) -> Optional[HalvesForm]:
    """Whether ``net`` is ``T Tᵀ`` for ``T`` the contraction of its first half.

    The second half of the operands must read the same sources, views and index
    patterns as the first, with renamed *row* axes and renamed private ones. Then
    ``T`` keeps the axes the halves share (batch axes in the result, the *inner*
    axes summed between them) and the row axes, and the network is ``T``'s Gram
    matrix over the inner axes. The KFAC-reduce pattern network
    ``x, Π, Π, x', Π', Π' -> rows, rows'`` is one: ``torch.einsum`` would contract
    the same half twice, then multiply.

    Args:
        net: A network.

    Returns:
        The form, or ``None`` (also for two operands: see :func:`gram_form`).
    """
    ops = net.operands
    if len(ops) < 4 or len(ops) % 2 or net.square_sum:
        return None
    half = len(ops) // 2
    for a, b in zip(ops[:half], ops[half:]):
        if (a.source, a.views, a.pattern) != (b.source, b.views, b.pattern):
            return None
        if _operand_key(net, a)[0] != _operand_key(net, b)[0]:
            return None  # built differently: not the same tensors at run time
    inputs, out = net.equation.split("->")
    terms = inputs.split(",")
    first, second = "".join(terms[:half]), "".join(terms[half:])
    partner: Dict[str, str] = {}
    for ta, tb in zip(terms[:half], terms[half:]):
        if len(ta) != len(tb):
            return None
        for x, y in zip(ta, tb):
            if partner.setdefault(x, y) != y:
                return None
    if len(set(partner.values())) != len(partner):
        return None  # two axes of one half onto one of the other: not a renaming
    renamed = {x: y for x, y in partner.items() if x != y}
    if set(renamed.values()) & set(first) or set(renamed) & set(second):
        return None
    shared = [x for x in dict.fromkeys(first) if x not in renamed]
    batch = [x for x in out if x in shared]
    rows = [x for x in out if x in renamed]
    if list(out) != batch + rows + [renamed[x] for x in rows]:
        return None
    inner = [x for x in shared if x not in out]
    equation = f"{','.join(terms[:half])}->{''.join(batch + rows + inner)}"
    return HalvesForm(half, equation, len(batch), len(rows))


def _halves_cost(
    form: HalvesForm, net: TensorNetwork, op_shapes: list, dtype, device
) -> Tuple[float, int]:
    """FLOPs and torch calls of evaluating ``net`` by :func:`_halves_gram`."""
    terms = net.equation.split("->")[0].split(",")
    size = {c: n for t, s in zip(terms, op_shapes) for c, n in zip(t, s)}
    letters = form.equation.split("->")[1]
    counts = (form.num_batch, form.num_rows)
    batch = math.prod(size[c] for c in letters[: counts[0]])
    rows = math.prod(size[c] for c in letters[counts[0] : sum(counts)])
    inner = math.prod(size[c] for c in letters[sum(counts) :])
    plan = _plan(form.equation, op_shapes[: form.half], dtype, device)
    gram = _gram_flops(batch, rows, inner, device)
    return plan.flops + gram, plan.expression.steps + 1


def _same_halves(operands: list, form: HalvesForm) -> bool:
    """Whether the materialised halves are the same tensors (shared when built)."""
    return all(a is b for a, b in zip(operands[: form.half], operands[form.half :]))


def _halves_gram(form: HalvesForm, operands: list) -> Tensor:
    """The network's result as the Gram matrix of its first half's contraction."""
    half = operands[: form.half]
    shapes = [tuple(o.shape) for o in half]
    plan = _plan(form.equation, shapes, half[0].dtype, half[0].device)
    return _gram_of(plan.expression(*half), form.num_batch, form.num_rows)


Symmetry = Tuple[Optional[GramForm], Optional[HalvesForm]]


def symmetry_forms(net: TensorNetwork) -> Symmetry:
    """:func:`gram_form` and :func:`halves_form` of ``net`` (Gram recognition on)."""
    if not _SETTINGS["gram"]:
        return None, None
    return gram_form(net), halves_form(net)


def _by_symmetry(forms: Symmetry, operands: list) -> Optional[Tensor]:
    """The network's result as a symmetric Gram, or ``None``.

    ``None`` also where the operands were not built as one tensor (or one half) as
    the form requires.
    """
    gram, halves = forms
    if gram is not None and operands[0] is operands[1]:
        return _gram(operands[0], gram)
    if halves is not None and _same_halves(operands, halves):
        return _halves_gram(halves, operands)
    return None


def _squared_dims(net: TensorNetwork) -> Tuple[int, ...]:
    """Positions of the squared-and-summed axes in the contraction result."""
    out = net.kept(net.output)
    return tuple(out.index(a) for a in net.square_sum if a in out)


def _square(result: Tensor, operands: list) -> Tensor:
    """``result²``, in place where the contraction result is fresh memory.

    Not in place where autograd records the result: the product's backward needs
    the factor the in-place square would overwrite; nor for a forward-mode dual
    tensor, whose tangent the in-place square gets wrong (``y = 3`` with tangent 1
    squared in place had tangent 12, not 6).
    """
    if (
        result.requires_grad
        or forward_ad.unpack_dual(result).tangent is not None
        or _may_alias(result, operands)
    ):
        return result * result
    return result.mul_(result)


def _may_alias(result: Tensor, operands: list) -> bool:
    """Whether ``result`` may share memory with an operand (a contraction viewed it).

    Tensors without storage, such as the batched tensors of ``torch.func.vmap``,
    count as aliasing: their memory cannot be checked.
    """
    try:
        pointer = result.data_ptr()
        return any(pointer == t.data_ptr() for t in operands)
    except RuntimeError:
        return True


def _square_sum(net: TensorNetwork, result: Tensor, operands: list) -> Tensor:
    """The epilogue of a squared network: square, then sum the squared axes."""
    return _square(result, operands).sum(_squared_dims(net))


# --- executors -----------------------------------------------------------------------


def _run_einsum(net: TensorNetwork, tensors: Mapping[str, Tensor]) -> Tensor:
    any_tensor = next(iter(tensors.values()))
    operands = _materialise_all(net, tensors, any_tensor.dtype, any_tensor.device)
    return _contract(net, operands)


def _axis_sizes(net: TensorNetwork, shapes: Mapping[str, Shape]) -> Dict[str, int]:
    sizes: Dict[str, int] = {}
    for op in net.operands:
        sizes.update(zip(net.kept(op.contracted_axes), _operand_shape(net, op, shapes)))
    return sizes


def _run_taps(net: TensorNetwork, tensors: Mapping[str, Tensor]) -> Tensor:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    return run_taps(net, tensors, _axis_sizes(net, shapes), _contract)


def _class_axis(net: TensorNetwork) -> Optional[Tuple[int, int]]:
    """(operand index, axis position) of the class axis ``v`` that the epilogue sums.

    ``None`` unless the network squares and sums over ``v`` and ``v`` lives on one
    operand used in its stored layout (the backpropagated factor ``S``).
    """
    if not net.square_sum or "v" not in net.square_sum:
        return None
    holders = [i for i, op in enumerate(net.operands) if "v" in op.axes]
    if len(holders) != 1 or net.operands[holders[0]].layout is not None:
        return None
    op = net.operands[holders[0]]
    return holders[0], net.kept(op.contracted_axes).index("v")


def _run_per_class(net: TensorNetwork, tensors: Mapping[str, Tensor]) -> Tensor:
    """One contraction per class of ``S``, squared results accumulated.

    ``S`` is stored ``[V, N, ...]``; a contraction that batches over ``n`` (one GEMM per
    sample) first copies it to ``[N, V, ...]`` — as much memory traffic as ``S`` has
    elements, which on few-channel layers costs more than the GEMM (2c2d's first
    layer: ~6 of 14 ms). Each class slice ``S[v]`` is already ``[N, ...]``-contiguous:
    ``V`` contractions, no copy. The operands are materialised once (window operands
    included); steps of the plan that do not involve ``S`` (pattern networks may
    contract the input with its patterns first) run once per class — the cost
    estimate counts them ``V`` times. Squares are accumulated in one pass per class
    (``addcmul_``) and summed over the other squared axes (``n``) once at the end:
    squaring, summing and adding each class's result separately read and wrote it
    four times, which doubled the time of per-sample diagonals of wide layers
    (All-CNN-C 3×3 192→192 at 16², batch 32: 930 vs 420 ms for the single contraction).
    """
    index, position = _class_axis(net)
    any_tensor = next(iter(tensors.values()))
    operands = _materialise_all(net, tensors, any_tensor.dtype, any_tensor.device)
    factor = operands[index]
    squares = None
    for v in range(factor.shape[position]):
        operands[index] = factor.narrow(position, v, 1)
        part = _contract(net, operands, epilogue=False)  # class axis of size 1
        if squares is None:
            squares = _square(part, operands)
        else:
            squares.addcmul_(part, part)
    return squares.sum(_squared_dims(net))


#: Executors by name: ``(network, tensors) -> result with network.result_axes``.
EXECUTORS: Dict[str, Callable[[TensorNetwork, Mapping[str, Tensor]], Tensor]] = {
    "einsum": _run_einsum,
    "taps": _run_taps,
    "per_class": _run_per_class,
}


@dataclass(frozen=True)
class Candidate:
    """A formulation, how to execute it, and its estimated cost and memory."""

    network: TensorNetwork
    executor: str
    cost: float
    largest_intermediate: int
    shapes: Tuple[Shape, ...] = ()  # operand shapes (patterns included)
    memory: int = 0  # estimated elements of temporaries alive at once, result included

    @property
    def strategy(self) -> str:
        """``'pattern'``, ``'window'``, ``'taps'`` or ``'per_class'``."""
        if self.executor in ("taps", "per_class"):
            return self.executor
        return self.network.strategy


def candidates(
    formulations: Sequence[TensorNetwork],
    shapes: Mapping[str, Shape],
    dtype: torch.dtype,
    device: torch.device,
) -> List[Candidate]:
    """All ways to evaluate the formulations, with cost estimates.

    The estimate is ``opt_einsum``'s FLOP count plus :data:`COPY_COST` per element
    copied (unfolded inputs, per-tap slices), one per element of a squared epilogue
    and :data:`CALL_COST` per torch call (which decides tiny problems); on a GPU the
    constants of :func:`device_costs`. The memory
    estimate counts the operands a candidate builds (unfolded inputs, the copy of
    ``S``, per-tap slices), the intermediates alive at once and the result; it breaks
    ties between candidates that measure about as fast (:data:`TIME_TIE`).

    Args:
        formulations: Equivalent networks.
        shapes: Shapes of the tensor arguments by name.
        dtype: Data type of the computation.
        device: Device of the computation.

    Returns:
        The candidates (forced strategy applied).
    """
    result = []
    costs = device_costs(device)
    copy_cost, call_cost = costs.copy, costs.call
    for net in formulations:
        op_shapes = [_operand_shape(net, op, shapes) for op in net.operands]
        plan = _plan(net.equation, op_shapes, dtype, device)
        # unfolded (window) operands are built once each: (torch calls, copies)
        windowed = {
            (op.source, op.views): _window_cost(net, op, shapes[op.source], s, device)
            for op, s in zip(net.operands, op_shapes)
            if op.layout
        }
        copied = sum(elements for _, elements in windowed.values())
        taps = math.prod(
            p.geometry.kernel_size for p in net.plans if p.kind == "window"
        )
        window_calls = sum(n for n, _ in windowed.values())
        epilogue_calls = 2 if net.square_sum else 0  # square, sum
        calls = plan.expression.steps + window_calls + epilogue_calls
        sizes = _axis_sizes(net, shapes)
        # elements of the contraction result and of the returned result (after a
        # square-sum epilogue)
        contracted = math.prod(sizes[a] for a in net.kept(net.output))
        final = math.prod(sizes[a] for a in net.result_axes)
        epilogue = float(contracted) if net.square_sum else 0.0
        base = plan.flops + epilogue
        form, halves = symmetry_forms(net)
        if form is not None:  # evaluated as a symmetric Gram: fewer products
            perm, num_batch, num_rows, presum = form
            shape = [n for i, n in enumerate(op_shapes[0]) if i not in presum]
            batch = math.prod(shape[i] for i in perm[:num_batch])
            rows = math.prod(shape[i] for i in perm[num_batch:][:num_rows])
            inner = math.prod(shape[i] for i in perm[num_batch + num_rows :])
            base = _gram_flops(batch, rows, inner, device) + epilogue
            if presum:  # one sum of the operand, then the Gram of what is left
                calls += 1
                base += math.prod(op_shapes[0])
        if halves is not None:  # one half contracted, then its symmetric Gram
            base, steps = _halves_cost(halves, net, op_shapes, dtype, device)
            calls += steps - plan.expression.steps
        classes = _class_axis(net)
        # batching over samples, one contraction copies S [V, N, ...] to [N, V, ...]
        s_copy = math.prod(op_shapes[classes[0]]) if classes else 0
        cost = base + copy_cost * (copied + s_copy) + call_cost * calls
        op_shapes = tuple(op_shapes)
        memory = copied + s_copy + plan.peak_elements
        result.append(
            Candidate(net, "einsum", cost, plan.largest_intermediate, op_shapes, memory)
        )
        if supports_taps(net):
            # every tap reads a strided slice of the input and the output-side
            # operands restricted to the tap's valid outputs (BLAS copies both)
            others = sum(
                math.prod(s)
                for op, s in zip(net.operands, op_shapes)
                if op.source not in (None, "x")
                and any(a.startswith("o") for a in op.axes)
            )
            cost = base + copy_cost * (copied + taps * others) + call_cost * 4 * taps
            # the accumulated result, one tap's part (before a square-sum epilogue)
            # and its operand slices: an input slice is a tap's share of the
            # unfolded input; an output-side slice is copied, then permuted into
            # GEMM layout (profiled on a GGN diagonal: two copies each; counted
            # twice for every output-side operand, an upper bound elsewhere)
            part = contracted
            if any(a.startswith("k") for a in net.kept(net.output)):
                part //= taps
            memory = final + part + copied // taps + 2 * others
            result.append(
                Candidate(
                    net, "taps", cost, plan.largest_intermediate, op_shapes, memory
                )
            )
        if classes is not None and op_shapes[classes[0]][classes[1]] > 1:
            # V contractions of one class each: the same products without copying S
            index, position = classes
            one = list(op_shapes)
            one[index] = one[index][:position] + (1,) + one[index][position + 1 :]
            per_class = _plan(net.equation, one, dtype, device)
            count = op_shapes[index][position]
            # per class: the plan's steps and one multiply-accumulate; one sum
            calls = count * (per_class.expression.steps + 1) + 1 + window_calls
            cost = (
                count * per_class.flops
                + epilogue
                + copy_cost * copied
                + call_cost * calls
            )
            # one class's intermediates and result, the accumulated squares and
            # the final sum over the other squared axes (as large as the squares
            # for per-sample results; profiled)
            memory = copied + per_class.peak_elements + contracted // count + final
            result.append(
                Candidate(
                    net,
                    "per_class",
                    cost,
                    per_class.largest_intermediate,
                    op_shapes,
                    memory,
                )
            )
    forced = _SETTINGS["forced"]
    if forced is not None:
        result = [c for c in result if c.strategy == forced] or result
    return result


def _window_cost(
    net: TensorNetwork, op: Operand, source: Shape, shape: Shape, device=None
) -> Tuple[int, int]:
    """Torch calls and copied elements to build a window operand (as ``im2col``)."""
    elements = math.prod(shape)
    if not _direct_windows(net, op, _operand_key(net, op)[1]):
        return 1, elements  # views, then one contiguous copy
    lead = tuple(source[: len(source) - len(net.plans)])
    dims = window_dims(net.plans)
    limit = windows.small_window_limit(device)
    mode = unfold_mode(lead, dims, op, op.layout, len(net.plans), limit)
    if mode == "natural":
        return 1, elements
    if mode == "permuted":
        return 2, 2 * elements
    return math.prod(d.kernel_size for d in dims), elements


def _chunks(candidate: Candidate, shapes: Mapping[str, Shape], dtype) -> int:
    """Batch chunks that bring the candidate's largest intermediate within budget.

    One (no chunking) where it fits, where an operand lacks the batch, and where
    chunks would not help: the chunk's largest intermediate (planned at the chunk's
    batch, where ``opt_einsum`` may choose another path) is no smaller, as where the
    samples are contracted first (a depthwise 7×7 weight VJP by index patterns keeps
    a ``[G, K1, O1, I2, K2]`` intermediate whatever the batch); or the estimate with
    chunks (:func:`chunked_memory`: the result twice) is no lower, as for per-sample
    gradients whose result is most of the memory (a budget doubled their peak).
    """
    budget = _SETTINGS["budget"]
    item = torch.empty((), dtype=dtype).element_size()
    needed = candidate.largest_intermediate * item
    if budget is None or needed <= budget:
        return 1
    net = candidate.network
    if not all("n" in op.axes for op in net.operands if op.source in ("x", "v", "s")):
        return 1
    batch = shapes["x"][0] if "x" in shapes else shapes["v"][0]
    chunks = max(1, min(batch, math.ceil(needed / budget)))
    if chunks == 1:
        return 1
    if _largest(net, _with_batch(net, shapes, math.ceil(batch / chunks)), dtype) >= (
        _largest(net, shapes, dtype)
    ):
        return 1
    if chunked_memory(candidate, shapes, chunks) >= candidate.memory:
        return 1
    return chunks


def _with_batch(
    net: TensorNetwork, shapes: Mapping[str, Shape], batch: int
) -> Dict[str, Shape]:
    """The source shapes with the batch axis of each source that has one resized."""
    # ``n`` is a leading axis of each source that has it (as in :func:`_execute`)
    resized = dict(shapes)
    for op in net.operands:
        if op.source is not None and "n" in op.axes:
            shape = list(shapes[op.source])
            shape[op.axes.index("n")] = batch
            resized[op.source] = tuple(shape)
    return resized


def _largest(net: TensorNetwork, shapes: Mapping[str, Shape], dtype) -> int:
    """Elements of the network's largest intermediate for these source shapes."""
    op_shapes = [_operand_shape(net, op, shapes) for op in net.operands]
    # planned on the meta device: only the sizes are wanted
    return _plan(net.equation, op_shapes, dtype, _META).largest_intermediate


_META = torch.device("meta")


def _execute(
    candidate: Candidate, tensors: Mapping[str, Tensor], chunks: int
) -> Tensor:
    net = candidate.network
    run = EXECUTORS[candidate.executor]
    if chunks == 1:
        return run(net, tensors)
    # ``n`` is a leading axis: its position is the same before and after views.
    batch_axis = {
        op.source: op.axes.index("n")
        for op in net.operands
        if op.source is not None and "n" in op.axes
    }
    name, pos = next(iter(batch_axis.items()))
    batch = tensors[name].shape[pos]
    size = math.ceil(batch / chunks)
    result_axes = net.result_axes
    keep_n = "n" in result_axes
    pieces, total = [], None
    for start in range(0, batch, size):
        length = min(size, batch - start)
        chunk = {
            k: t.narrow(batch_axis[k], start, length) if k in batch_axis else t
            for k, t in tensors.items()
        }
        part = run(net, chunk)
        if keep_n:
            pieces.append(part)
        else:
            total = part if total is None else total.add_(part)
    return torch.cat(pieces, result_axes.index("n")) if keep_n else total


_TUNED: LRUCache[int] = LRUCache("autotune", maxsize=1024)

#: Autotuning times the candidates in interleaved rounds (A B, B A, A B, ...): at
#: least ``_MIN_ROUNDS`` of them; after that, candidates that have not yet spent
#: ``_MIN_MEASURE_SECONDS`` (cheap ones, whose single runs are noisy) run more rounds,
#: at most ``_MAX_ROUNDS`` in all. In a round a short candidate runs twice in a row
#: and the second run is timed: right after another candidate freed its buffers, a
#: run pays page faults and cold caches that say nothing about repeated calls of
#: that candidate (timed alone, such first runs made the engine keep a 1.6x slower
#: candidate). A long one runs once (``_LONG_RUN_SECONDS``). A candidate's fastest
#: timed run counts. Timing one candidate after the
#: other instead of interleaving let a noisy spell (another process) hit one
#: candidate only and fix a wrong choice for the rest of the process.
_MIN_MEASURE_SECONDS = 0.02
_MIN_ROUNDS = 2
_MAX_ROUNDS = 10

#: A run at least this long is its own sample: no warm-up run before it. Its
#: one-time costs are a small part of it, and the candidate's second round (every
#: candidate has at least two) is not its first run any more. Warming up doubled
#: the first call of long candidates: ``DiagGGNExact`` on ResNet-18 (batch 8, one
#: thread) took 63 s the first time against 11 s afterwards.
_LONG_RUN_SECONDS = 0.05

#: A problem whose first run takes at least this long is measured over its next
#: calls, one candidate per call (:func:`_measure`), in the same rounds and with the
#: same warm-up runs. Measuring within the first call cost ResNet-18's first
#: ``BatchL2Grad`` pass (batch 8, one thread) 2.3 s of 4.3 s, on problems of a few
#: to 50 ms; later passes take 1.7 s.
_OVER_CALLS_SECONDS = 0.005

#: Runs measured within this fraction of the fastest count as equally fast (the
#: spread of repeated measurements here) ...
TIME_TIE = 0.1
#: ... and among them the one with the least estimated memory runs, if it needs at
#: most this fraction of the fastest one's. Index-pattern and window contractions of
#: per-sample gradients often measure within a few per cent of each other while one
#: holds 1.5x the other's temporaries (AlexNet 5x5 64->192 at 27^2, batch 8:
#: 70 vs 45 MiB, the unfold baseline 45 MiB); picking by time alone made the peak
#: memory a coin toss.
MEMORY_SAVING = 0.75


def _tied(times: Sequence[float], tie: float) -> Tuple[int, List[int]]:
    """The fastest run and all runs within ``tie`` of its time (it included)."""
    best = min(range(len(times)), key=lambda i: times[i])
    bound = times[best] + tie * abs(times[best])
    return best, [i for i in range(len(times)) if i == best or times[i] <= bound]


def prefer_memory(
    times: Sequence[float],
    memory: Sequence[float],
    tie: Optional[float] = None,
    saving: Optional[float] = None,
) -> int:
    """Index of the candidate to keep, given measured times and memory estimates.

    Args:
        times: Each candidate's measured time.
        memory: Each candidate's estimated memory (any unit).
        tie: Times within this fraction of the fastest count as equal
            (default :data:`TIME_TIE`).
        saving: A tied candidate replaces the fastest only if it needs at most this
            fraction of its memory (default :data:`MEMORY_SAVING`).

    Returns:
        The fastest candidate, or the leanest tied one if it saves enough memory.
    """
    tie = TIME_TIE if tie is None else tie
    saving = MEMORY_SAVING if saving is None else saving
    best, tied = _tied(times, tie)
    leanest = min(tied, key=lambda i: (memory[i], times[i]))
    return leanest if memory[leanest] <= saving * memory[best] else best


def _timed(
    run: Callable[[], Tensor], device: torch.device
) -> Tuple[Tensor, Optional[float]]:
    """``run()`` and its wall-clock time in seconds, planning time discounted.

    The time is ``None`` if the run measured another problem's candidates (a choice
    nested in this one, e.g. the TN's contraction inside a kernel-vs-TN choice): it
    says nothing about the run's steady state.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    measured = _MEASUREMENTS[0]
    start, planning = time.perf_counter(), _PLANNING_SECONDS[0]
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start - (_PLANNING_SECONDS[0] - planning)
    return result, None if _MEASUREMENTS[0] != measured else elapsed


def _round_runs(order: List[int], rounds: int, spent: Sequence[float]) -> List[int]:
    """The runs of round ``rounds`` (counted from 0), in the order they run.

    All runs in the first :data:`_MIN_ROUNDS` rounds, later only those that have
    spent under :data:`_MIN_MEASURE_SECONDS`; every other round in reverse order.
    """
    if rounds % 2:
        order = order[::-1]
    return [i for i in order if rounds < _MIN_ROUNDS or spent[i] < _MIN_MEASURE_SECONDS]


def _time_interleaved(
    runs: Sequence[Callable[[], Tensor]],
    device: torch.device,
    choose: Optional[Callable[[Sequence[float]], int]] = None,
) -> Tuple[Tensor, int]:
    """Time equivalent runs in interleaved rounds; return the chosen result and index.

    In each round a candidate runs once, timed; if that run was short (under
    :data:`_LONG_RUN_SECONDS`) it only warmed up, and a second run is timed (the
    first pays one-time costs: fresh allocations, cold caches). Every candidate gets
    at least :data:`_MIN_ROUNDS` samples, so a long candidate's cold first run is
    never its only one. Planning time (first use of an einsum expression) is
    discounted. The fastest run is chosen, or the one ``choose`` picks given each
    run's fastest time (e.g. :func:`prefer_memory`). At most two results are alive
    at once: the fastest run's so far and the one being timed.
    """
    spent = [0.0] * len(runs)
    best = [math.inf] * len(runs)
    winner, winner_time, winner_result = 0, math.inf, None

    def timed_run(i: int) -> Tuple[Tensor, float]:
        return _timed(runs[i], device)

    for rounds in range(_MAX_ROUNDS):
        timed = _round_runs(list(range(len(runs))), rounds, spent)
        if not timed:
            break
        for i in timed:
            result, elapsed = timed_run(i)
            if elapsed is None or elapsed < _LONG_RUN_SECONDS:
                # that run only warmed up (or measured a nested choice): time another
                del result
                result, elapsed = timed_run(i)
            if elapsed is None:  # not a sample
                continue
            spent[i] += elapsed
            best[i] = min(best[i], elapsed)
            if elapsed < winner_time:
                winner, winner_time, winner_result = i, elapsed, result
            del result
    chosen = winner if choose is None else choose(best)
    if chosen != winner or winner_result is None:  # one more run, this call only
        del winner_result
        return runs[chosen](), chosen
    return winner_result, winner


def _measured_run(
    candidate: Candidate, tensors: Mapping[str, Tensor], shapes: Mapping[str, Shape]
) -> Callable[[], Tensor]:
    """A candidate's run as autotuning times it: batch-chunked, result contiguous.

    Making the result contiguous is part of the run: callers reshape results to their
    target shapes, and a strided einsum result pays its copy there (ResNeXt-101's
    grouped 7×7 per-sample gradients: a 38 MB result with strides 576/192 in its last
    axes took longer to copy than the contraction that the measurement had preferred
    by 10 %).
    """
    chunks = _chunks(candidate, shapes, next(iter(tensors.values())).dtype)
    return lambda: _execute(candidate, tensors, chunks).contiguous()


def _memory(candidate: Candidate, shapes: Mapping[str, Shape], dtype) -> float:
    """A candidate's memory estimate, batch chunking accounted for."""
    return chunked_memory(candidate, shapes, _chunks(candidate, shapes, dtype))


@dataclass
class _Exploration:
    """A problem measured over its calls: the rounds so far, what is left of one."""

    best: List[float]  # fastest time per run
    spent: List[float]  # time measured per run
    queue: List[int]  # runs left in the current round, in order
    order: List[int]  # the first round's order (later rounds alternate)
    signature: Hashable  # identifies the list of runs
    rounds: int = 1  # rounds begun

    def next_round(self) -> bool:
        """Queue the next round's runs (as :func:`_time_interleaved` picks them)."""
        if self.rounds >= _MAX_ROUNDS:
            return False
        self.queue = _round_runs(self.order, self.rounds, self.spent)
        self.rounds += 1
        return bool(self.queue)


_EXPLORING: LRUCache[_Exploration] = LRUCache("exploring", maxsize=1024)
_EXPLORATION_RUNS = [0]  # calls that ran a candidate under measurement
_MEASUREMENTS = [0]  # calls of _measure: a run during which it grew measured others
_IN_CALL = [0]  # measurements within one call in progress (_time_interleaved)


def exploration_runs() -> int:
    """How many calls so far ran a candidate whose choice was still being measured.

    Long problems are measured over their first calls (:func:`_tune`): each such call
    runs one candidate. Benchmarks of steady-state times call a function until this
    count stops growing (:func:`backpack_tn.bench.measure.settle`).
    """
    return _EXPLORATION_RUNS[0]


def _measure(
    key: tuple,
    runs: Sequence[Callable[[], Tensor]],
    device: torch.device,
    choose: Optional[Callable[[Sequence[float]], int]] = None,
    first: int = 0,
    signature: Optional[Hashable] = None,
) -> Tuple[Tensor, int, Optional[int]]:
    """One call of a problem whose choice among equivalent ``runs`` is not made yet.

    The first call for ``key`` runs ``runs[first]``, timed (twice if it took from
    :data:`_OVER_CALLS_SECONDS` to :data:`_LONG_RUN_SECONDS`: a first run pays
    one-time costs). If that run is short (under :data:`_OVER_CALLS_SECONDS`), all
    runs are measured right away, in interleaved rounds (:func:`_time_interleaved`).
    Otherwise measuring them now
    would multiply this call's time by several times their number (``DiagGGNExact``
    on ResNet-18, batch 8: 36 s instead of 11 s, for candidates within 15 % of each
    other). Instead each of the next calls runs one of them, timed, in the same
    rounds: A B C, C B A, ... (``first`` is A), at least :data:`_MIN_ROUNDS`, more for
    runs that have spent less than :data:`_MIN_MEASURE_SECONDS`, at most
    :data:`_MAX_ROUNDS`, a run under :data:`_LONG_RUN_SECONDS` after a warm-up run as
    within one call. The call that completes the rounds makes
    the choice. Every call thus returns a real result, and measuring costs only the
    differences between the runs. Each run is timed where it really runs, amid the
    caller's other work. ``runs`` must list the same computations in the same order
    on every call (on that call's tensors). A run during which a nested choice was
    measured is no sample (:func:`_timed`) and runs again on the next call, so the
    outer choice times the nested one's choice; a nested choice that is measured over
    calls makes the outer one measured over calls too, and inside a measurement
    within one call a nested choice is measured within it as well. A run that raises
    ends the measuring (the next call starts afresh).

    Args:
        key: Identifies the problem.
        runs: Zero-argument functions computing the same result.
        device: Device of the computation (CUDA is synchronised for timing).
        choose: Picks the index to keep from each run's fastest time (default: the
            fastest).
        first: The run tried first (the cheapest estimate, or the preferred one).
        signature: Identifies the list of runs (default: their number); measuring
            over calls starts afresh if it changes.

    Returns:
        The result of this call, the index of the run that computed it, and the
        chosen index (``None`` while measuring goes on over the next calls).
    """
    choose = choose or (lambda times: min(range(len(times)), key=times.__getitem__))
    signature = len(runs) if signature is None else signature
    _MEASUREMENTS[0] += 1
    exploring = _EXPLORING.get(key)
    if exploring is not None and exploring.signature != signature:
        _EXPLORING.pop(key)  # other runs than before: start afresh
        exploring = None
    if exploring is None:
        explored = _EXPLORATION_RUNS[0]
        result, elapsed = _timed(runs[first], device)
        if len(runs) == 1:
            return result, first, first
        # a nested choice measured over calls (it advanced): so is this one
        spread = _EXPLORATION_RUNS[0] != explored
        if not spread and (
            elapsed is None or _OVER_CALLS_SECONDS <= elapsed < _LONG_RUN_SECONDS
        ):
            # a first run pays one-time costs (a tiny problem's first kernel call
            # can take milliseconds; a nested choice measured itself within it): a
            # second run tells short from long
            del result
            result, elapsed = _timed(runs[first], device)
            spread = _EXPLORATION_RUNS[0] != explored
        over_calls = spread or (elapsed is not None and elapsed >= _OVER_CALLS_SECONDS)
        # inside a measurement within one call, a nested choice is measured within
        # it too: over calls, that measurement would time unchosen candidates
        if over_calls and not _IN_CALL[0]:
            order = [first] + [i for i in range(len(runs)) if i != first]
            best, spent = [math.inf] * len(runs), [0.0] * len(runs)
            queue = order[1:]
            if elapsed is None:  # no sample yet: the first round starts over
                queue = order[:]
            else:
                best[first] = spent[first] = elapsed
            _EXPLORING.put(key, _Exploration(best, spent, queue, order, signature))
            _EXPLORATION_RUNS[0] += 1
            return result, first, None
        del result  # short: that run warmed up; measure them all now
        _IN_CALL[0] += 1
        try:
            result, index = _time_interleaved(runs, device, choose)
        finally:
            _IN_CALL[0] -= 1
        return result, index, index
    ran = exploring.queue[0]
    try:
        result, elapsed = _timed(runs[ran], device)
        if elapsed is not None and elapsed < _LONG_RUN_SECONDS:
            # as within one call, that run only warmed up: a cold run of a 13 ms
            # kernel read 17 ms, and the TN once replaced it at 0.80x of its speed
            del result
            result, elapsed = _timed(runs[ran], device)
    except BaseException:  # e.g. out of memory: no half-done state survives
        _EXPLORING.pop(key)
        raise
    _EXPLORATION_RUNS[0] += 1
    if elapsed is None:  # not a sample (a nested choice was measured): run it again
        return result, ran, None
    exploring.queue.pop(0)
    exploring.best[ran] = min(exploring.best[ran], elapsed)
    exploring.spent[ran] += elapsed
    if exploring.queue or exploring.next_round():
        return result, ran, None
    _EXPLORING.pop(key)
    return result, ran, choose(exploring.best)


def _tune(
    key: tuple,
    options: Sequence[Candidate],
    cheapest: int,
    tensors: Mapping[str, Tensor],
    shapes: Mapping[str, Shape],
    device: torch.device,
) -> Tuple[Tensor, int, Optional[int]]:
    """One call of a network problem whose candidate is not chosen yet.

    The plausible candidates (:func:`plausible`) are measured, the cheapest estimate
    first (:func:`_measure`, each run as :func:`_measured_run`), and the fastest is
    kept, or the leaner of about equally fast ones (:func:`prefer_memory`; the memory
    estimates account for batch chunking). The choice is cached.

    Returns:
        This call's result, the index into ``options`` of the candidate that
        computed it, and the chosen index (``None`` while measuring goes on).
    """
    dtype = next(iter(tensors.values())).dtype
    slack = device_costs(device).slack
    measured = plausible([c.cost for c in options], slack=slack)
    runs = [_measured_run(options[i], tensors, shapes) for i in measured]
    memory = [_memory(options[i], shapes, dtype) for i in measured]
    result, ran, pick = _measure(
        key,
        runs,
        device,
        lambda times: prefer_memory(times, memory),
        measured.index(cheapest),
        tuple(measured),
    )
    if pick is None:
        return result, measured[ran], None
    _TUNED.put(key, measured[pick])
    return result, measured[ran], measured[pick]


def chunked_memory(candidate: Candidate, shapes: Mapping[str, Shape], chunks: int):
    """A candidate's memory estimate when the batch runs in ``chunks`` pieces.

    The temporaries shrink with the chunk; the result is held twice: the pieces and
    their concatenation (per-sample results), or the running sum and the piece
    added to it (summed ones).
    """
    if chunks == 1:
        return candidate.memory
    net = candidate.network
    sizes = _axis_sizes(net, shapes)
    result = math.prod(sizes[a] for a in net.result_axes)
    return 2 * result + max(candidate.memory - result, 0) / chunks


def _prepared_einsum(
    candidate: Candidate, shapes: Mapping[str, Shape], dtype, device
) -> Callable:
    """``_run_einsum`` specialised to one candidate and one set of input shapes.

    What ``_materialise_all`` and ``_contract`` decide per call (which operands are
    shared, how a window operand is unfolded, the contraction plan, the epilogue) is
    decided here once; the returned function runs the torch calls only.
    """
    net = candidate.network
    builders: list = []  # (source name, tensor -> operand)
    slots: list = []  # per operand: index into the built list, or a pattern reference
    shared: Dict[tuple, int] = {}
    for op in net.operands:
        if op.source is None:
            slots.append(op.pattern)
            continue
        key, drop = _operand_key(net, op)
        if key not in shared:
            if _direct_windows(net, op, drop):
                build = window_builder(
                    shapes[op.source], op, net.plans, op.layout, device
                )
            else:
                build = functools.partial(_prepare_operand, net, op, drop=drop)
            shared[key] = len(builders)
            builders.append((op.source, build))
        slots.append(shared[key])
    plan: list = []  # the contraction plan, looked up on the first call
    symmetry = symmetry_forms(net)

    def run(tensors: Mapping[str, Tensor]) -> Tensor:
        built = [build(tensors[source]) for source, build in builders]
        operands = [
            built[s]
            if isinstance(s, int)
            else index_pattern(
                s.geometry, rows=s.rows, reduced=s.reduced, dtype=dtype, device=device
            )
            for s in slots
        ]
        result = _by_symmetry(symmetry, operands)
        if result is not None:
            return result
        if not plan:
            sizes = [tuple(o.shape) for o in operands]
            plan.append(_plan(net.equation, sizes, dtype, device))
        if not net.square_sum:
            return plan[0].expression(*operands)
        return _square_sum(net, plan[0].expression(*operands), operands)

    return run


def _prepared(
    candidate: Candidate, shapes: Mapping[str, Shape], chunks: int, dtype, device
) -> Callable:
    """The chosen candidate as a function of the tensors, result embedded."""
    plain = EXECUTORS.get(candidate.executor) is _run_einsum  # not replaced by a user
    if plain and chunks == 1:
        run = _prepared_einsum(candidate, shapes, dtype, device)
    else:
        run = functools.partial(_execute, candidate, chunks=chunks)
    net = candidate.network
    if not net.output_views:
        return run
    sizes = tuple(p.geometry.input_size for p in net.plans)
    return lambda tensors: embed(run(tensors), net.output_views, sizes)


_CANDIDATES: LRUCache[tuple] = LRUCache("candidates", maxsize=1024)
_FASTEST: LRUCache[int] = LRUCache("kernel-choice", maxsize=1024)
_PREPARED: LRUCache[Callable] = LRUCache("prepared", maxsize=1024)


def keep_first(times: Sequence[float], tie: Optional[float] = None) -> int:
    """0 unless another run measured more than ``tie`` faster (:data:`TIME_TIE`)."""
    best, tied = _tied(times, TIME_TIE if tie is None else tie)
    return 0 if 0 in tied else best


def fastest(
    key: tuple,
    runs: Sequence[Callable[[], Tensor]],
    device: torch.device,
    choose: Optional[Callable[[Sequence[float]], int]] = None,
) -> Tensor:
    """Run the fastest of equivalent computations, measured once per ``key``.

    For choices outside one tensor network (e.g. a TN vs a torch kernel): the runs
    are timed on the first call for ``key``, or over its first calls where one run
    is long (:func:`_measure`), and the choice is cached; afterwards only the chosen
    run runs. Without autotuning (or with a forced strategy) the first run is used.

    Args:
        key: Identifies the problem (shapes, hyper-parameters, dtype, device).
        runs: Zero-argument functions computing the same result, preferred first.
        device: Device of the computation (CUDA is synchronised for timing).
        choose: Picks the run to keep from each run's best time, called once the
            runs are measured (default: the fastest). :func:`keep_first` keeps the
            first run unless another measured more than :data:`TIME_TIE` faster:
            for torch's kernels, which need what the stock computation needs,
            against a TN that may hold more temporaries.

    Returns:
        The result of the chosen run.
    """
    if not _measuring():
        return runs[0]()
    index = _FASTEST.get(key)
    if index is not None:
        return runs[index]()
    result, _, index = _measure(key, runs, device, choose)
    if index is not None:
        _FASTEST.put(key, index)
    return result


def fastest_choice(key: tuple) -> Optional[int]:
    """The index :func:`fastest` runs for ``key`` now, or ``None`` if not yet chosen.

    ``None`` also while the choice is measured over calls (:func:`_measure`).
    """
    return _FASTEST.peek(key) if _measuring() else 0


def _measuring() -> bool:
    """Whether :func:`fastest` measures (autotuning on, no strategy forced)."""
    return bool(_SETTINGS["autotune"]) and _SETTINGS["forced"] is None


def _rank(formulations, shapes, dtype, device) -> tuple:
    options = candidates(formulations, shapes, dtype, device)
    cheapest = min(range(len(options)), key=lambda i: options[i].cost)
    return formulations, options, cheapest


def plan_settings(device: torch.device) -> tuple:
    """Every setting that changes what the engine runs on ``device`` (a cache key).

    :func:`evaluate`'s choices, and (``native``) whether torch's kernels may run.
    """
    return (
        _SETTINGS["native"],
        _SETTINGS["forced"],
        _SETTINGS["autotune"],
        _SETTINGS["autotune_min_flops"],
        _SETTINGS["budget"],
        _SETTINGS["gram"],
        windows.small_window_limit(device),
    )


def _tensors_key(tensors: Mapping[str, Tensor]) -> tuple:
    """``(sorted (name, shape) pairs, dtype, device)`` of an evaluation's tensors."""
    any_tensor = next(iter(tensors.values()))
    shapes = tuple(sorted((name, tuple(t.shape)) for name, t in tensors.items()))
    return shapes, any_tensor.dtype, any_tensor.device


def _prepared_key(formulations: Sequence[TensorNetwork], key: tuple) -> tuple:
    # ``formulations`` come from a cache and are immutable: key by identity; the
    # entries keep them alive, so the identity cannot be reused while cached.
    # Every setting that changes the choice is part of the key.
    return (id(formulations), key, *plan_settings(key[2]))


def prepared_run(
    formulations: Sequence[TensorNetwork], tensors: Mapping[str, Tensor]
) -> Optional[Callable[[Mapping[str, Tensor]], Tensor]]:
    """What :func:`evaluate` runs for these networks and tensor shapes, once decided.

    ``None`` until a call of :func:`evaluate` has chosen the candidate (the first
    call, or the last measuring call where candidates are measured over calls).
    The function takes tensors of the same shapes, dtype and device and returns what
    :func:`evaluate` would; callers keep it to skip the look-ups on repeated calls.
    """
    return _PREPARED.peek(_prepared_key(formulations, _tensors_key(tensors)))


def chosen_memory(
    formulations: Sequence[TensorNetwork], tensors: Mapping[str, Tensor]
) -> Optional[int]:
    """Estimated peak bytes of what :func:`evaluate` runs for these tensor shapes.

    The memory estimate of the chosen candidate (:attr:`Candidate.memory`, batch
    chunking accounted for), or ``None`` until a call of :func:`evaluate` has chosen
    it (as for :func:`prepared_run`).
    """
    prepared = prepared_run(formulations, tensors)
    return None if prepared is None else prepared.memory


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
    key = _tensors_key(tensors)
    prepared_key = _prepared_key(formulations, key)
    prepared = _PREPARED.get(prepared_key)
    if prepared is not None:
        return prepared(tensors)
    sorted_shapes, dtype, device = key
    shapes = dict(sorted_shapes)
    # the estimates depend on the device's cost constants and window rule (both
    # fixed per device type, but patched by calibration and tests)
    options_key = (
        id(formulations),
        _SETTINGS["forced"],
        _SETTINGS["gram"],
        key,
        device_costs(device),
        windows.small_window_limit(device),
    )
    formulations, options, cheapest = _CANDIDATES.get_or_create(
        options_key, lambda: _rank(formulations, shapes, dtype, device)
    )
    # The equations and input shapes alone do not identify a problem: two strides
    # over the same input share both (the pattern operands' shapes tell them apart).
    key = (
        tuple((c.network.equation, c.executor, c.shapes) for c in options),
        key,
        _SETTINGS["gram"],
    )
    tune = (
        _SETTINGS["autotune"]
        and len(options) > 1
        and options[cheapest].cost >= _SETTINGS["autotune_min_flops"]
    )
    index = _TUNED.get(key) if tune else cheapest
    result = None
    if index is None:  # first calls: measure the plausible candidates
        result, ran, index = _tune(key, options, cheapest, tensors, shapes, device)
        if index is None:  # measuring goes on over the next calls: nothing prepared
            return _embedded(result, options[ran].network)
        result = _embedded(result, options[ran].network)
    best = options[index]
    # later calls with these shapes run the choice directly (plan once, run many)
    chunks = _chunks(best, shapes, dtype)
    prepared = _prepared(best, shapes, chunks, dtype, device)
    prepared.formulations = formulations  # keeps the identity in the key alive
    itemsize = torch.empty((), dtype=dtype).element_size()
    prepared.memory = int(chunked_memory(best, shapes, chunks) * itemsize)
    _PREPARED.put(prepared_key, prepared)
    return prepared(tensors) if result is None else result


def _embedded(result: Tensor, net: TensorNetwork) -> Tensor:
    """A candidate's result on the full input grid (if the network needs embedding)."""
    if not net.output_views:
        return result
    sizes = tuple(p.geometry.input_size for p in net.plans)
    return embed(result, net.output_views, sizes)
