"""``backpack_tn.functional`` against independent references over a config grid."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from backpack_tn import functional as tnf
from backpack_tn.tn import windows
from backpack_tn.tn.evaluate import force_strategy
from tests.cases import CASES, Case, grouped_unfold, reference_unfold

# (simplify, forced strategy): the plain TN, and both strategies of the simplified one
SIMPLIFY = [
    (False, None),
    (True, "pattern"),
    (True, "window"),
    (True, "window-loop"),
    (True, "taps"),
]
# "window" builds these small window operands with F.unfold (plus a permuted copy
# where the layout differs); "window-loop" forces the per-tap loop used for large ones
SIMPLIFY_IDS = ["plain", "pattern", "window", "window-loop", "taps"]
DTYPES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
}


def close(actual: Tensor, expected: Tensor, dtype=torch.float64):
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    scale = expected.abs().max().clamp(min=1.0).item()
    tol = DTYPES[dtype]
    torch.testing.assert_close(
        actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale
    )


def forward_with_grads(case: Case, dtype=torch.float64):
    """Module output, input/weight gradients for a random output gradient (autograd)."""
    module = case.module(dtype)
    x = case.input(dtype).requires_grad_(True)
    out = module(x)
    torch.manual_seed(3)
    grad_out = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, module.weight), grad_out)
    return module, x.detach(), out.detach(), grad_out, gx, gw


def per_sample_grads(case: Case, module, x: Tensor, grad_out: Tensor) -> Tensor:
    """Per-sample weight gradients by an explicit loop over the batch."""
    grads = []
    for n in range(x.shape[0]):
        out = module(x[n : n + 1])
        (g,) = torch.autograd.grad(out, module.weight, grad_out[n : n + 1])
        grads.append(g)
    return torch.stack(grads)


@pytest.fixture(params=CASES, ids=lambda c: c.id)
def case(request) -> Case:
    return request.param


@pytest.fixture(params=SIMPLIFY, ids=SIMPLIFY_IDS)
def simplify(request, monkeypatch) -> bool:
    simplify, strategy = request.param
    if strategy == "window-loop":
        strategy = "window"
        monkeypatch.setattr(windows, "SMALL_WINDOW_ELEMENTS_PER_TAP", 0)
    with force_strategy(strategy):
        yield simplify


def test_conv(case, simplify):
    module, x, out, *_ = forward_with_grads(case)
    result = tnf.conv(
        x, module.weight.detach(), module.bias.detach(), simplify=simplify, **case.hyper
    )
    close(result, out)


def test_unfold(case, simplify):
    x = case.input()
    close(
        tnf.unfold(x, case.kernel_size, simplify=simplify, **case.hyper),
        reference_unfold(case, x),
    )


def test_input_vjp(case, simplify):
    module, x, _, grad_out, gx, _ = forward_with_grads(case)
    result = tnf.input_vjp(
        grad_out, module.weight.detach(), x.shape, simplify=simplify, **case.hyper
    )
    close(result, gx)


@pytest.mark.parametrize("per_sample", [False, True], ids=["summed", "per_sample"])
def test_weight_vjp(case, simplify, per_sample):
    module, x, _, grad_out, _, gw = forward_with_grads(case)
    expected = per_sample_grads(case, module, x, grad_out) if per_sample else gw
    result = tnf.weight_vjp(
        x,
        grad_out,
        case.kernel_size,
        per_sample=per_sample,
        simplify=simplify,
        **case.hyper,
    )
    close(result, expected)


def test_grouped_conv_trick(case):
    """BackPACK's per-sample trick (a torch-kernel candidate) wherever it applies.

    Whether the engine picks it depends on timing, so it is checked on its own.
    """
    from backpack_tn.functional import _geometry, _grouped_conv_trick, _native

    module, x, _, grad_out, _, _ = forward_with_grads(case)
    geometry = _geometry(x.shape, module.kernel_size, **case.hyper)
    native = _native(geometry, True)
    trick = _grouped_conv_trick(native, tuple(module.weight.shape))
    few_channels = case.c_in // case.groups <= 4
    if trick is None:
        zero_padded = all(
            d.padding_mode == "zeros" and d.pad_left == d.pad_right
            for d in geometry.dims
        )
        assert not (few_channels and zero_padded and case.dims <= 3)
        return
    assert few_channels
    close(trick(x, grad_out), per_sample_grads(case, module, x, grad_out))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("groups_mode", ["average", "separate"])
def test_kfac_input_factor(case, simplify, approx, groups_mode):
    x = case.input()
    u = grouped_unfold(case, x)  # [N, G, C/G·K, O]
    if groups_mode == "average":
        u = u.mean(1, keepdim=True)
    if approx == "reduce":
        u = u.mean(-1, keepdim=True)
    expected = torch.einsum("ngio,ngjo->gij", u, u) / x.shape[0]
    if groups_mode == "average":
        expected = expected[0]
    result = tnf.kfac_input_factor(
        x,
        case.kernel_size,
        approx=approx,
        groups_mode=groups_mode,
        simplify=simplify,
        **case.hyper,
    )
    close(result, expected)


_SCALED_FACTORS = {
    # the input is smaller than the factor: scaled by the square root on the input
    # (a negative scale goes to the result)
    "input-scaled": (torch.Size([2, 16, 5, 5]), 3, 2, (0.37, -0.5, 2.0, 0.0, None)),
    # the factor is smaller: scaled on the result
    "result-scaled": (torch.Size([3, 4, 12, 12]), 1, 2, (-0.5, None, 0.37, 0.0, 2.0)),
}


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("groups_mode", ["average", "separate"])
@pytest.mark.parametrize("where", list(_SCALED_FACTORS))
def test_kfac_input_factor_scale(where, groups_mode, approx):
    """A given ``scale`` replaces the default normalisation, call after call."""
    shape, kernel_size, groups, scales = _SCALED_FACTORS[where]
    x = torch.randn(shape, dtype=torch.float64)
    unfolded = torch.nn.functional.unfold(x, kernel_size)  # [N, C·K, O]
    u = unfolded.reshape(shape[0], groups, -1, unfolded.shape[-1])
    if groups_mode == "average":
        u = u.mean(1, keepdim=True)
    if approx == "reduce":
        u = u.mean(-1, keepdim=True) * unfolded.shape[-1]  # summed, not averaged
    sums = torch.einsum("ngio,ngjo->gij", u, u)
    if groups_mode == "average":
        sums = sums[0]
    # the same signature again and again: later calls run the remembered plan
    for scale in scales:
        result = tnf.kfac_input_factor(
            x,
            kernel_size,
            groups=groups,
            approx=approx,
            groups_mode=groups_mode,
            scale=scale,
        )
        if scale is None:  # the default normalisation
            positions = 1 if approx == "expand" else unfolded.shape[-1] ** 2
            scale = 1.0 / (shape[0] * positions)
        close(result, scale * sums)


@pytest.mark.parametrize("groups_mode", ["average", "separate"])
def test_averaged_patches(case, simplify, groups_mode):
    x = case.input()
    u = grouped_unfold(case, x).mean(-1)  # [N, G, C/G·K]
    expected = u.mean(1) if groups_mode == "average" else u
    result = tnf.averaged_patches(
        x, case.kernel_size, groups_mode=groups_mode, simplify=simplify, **case.hyper
    )
    close(result, expected)


def _reference_sqrt_ggn(case: Case, x: Tensor, S: Tensor) -> Tensor:
    u = grouped_unfold(case, x)  # [N, G, C/G·K, O]
    V, N = S.shape[:2]
    s = S.reshape(V, N, case.groups, case.c_out // case.groups, -1)
    jt_s = torch.einsum("vngdo,ngio->vngdi", s, u)
    return jt_s.reshape(
        V, N, case.c_out, case.c_in // case.groups, *case.module().weight.shape[2:]
    )


def _random_S(case: Case, out: Tensor, classes: int = 3) -> Tensor:
    torch.manual_seed(4)
    return torch.randn(classes, *out.shape, dtype=out.dtype)


@pytest.mark.parametrize("sum_batch", [False, True], ids=["per_sample", "summed"])
def test_sqrt_ggn_weight(case, simplify, sum_batch):
    _, x, out, *_ = forward_with_grads(case)
    S = _random_S(case, out)
    result = tnf.sqrt_ggn_weight(
        x, S, case.kernel_size, sum_batch=sum_batch, simplify=simplify, **case.hyper
    )
    expected = _reference_sqrt_ggn(case, x, S)
    close(result, expected.sum(1) if sum_batch else expected)


@pytest.mark.parametrize("per_sample", [False, True], ids=["summed", "per_sample"])
def test_diag_ggn_weight(case, simplify, per_sample):
    _, x, out, *_ = forward_with_grads(case)
    S = _random_S(case, out)
    sqrt = _reference_sqrt_ggn(case, x, S)
    expected = sqrt.pow(2).sum(0) if per_sample else sqrt.pow(2).sum((0, 1))
    result = tnf.diag_ggn_weight(
        x, S, case.kernel_size, per_sample=per_sample, simplify=simplify, **case.hyper
    )
    close(result, expected)


def test_batch_l2_and_sum_grad_squared(case, simplify):
    module, x, _, grad_out, _, _ = forward_with_grads(case)
    grads = per_sample_grads(case, module, x, grad_out)
    l2 = tnf.batch_l2_weight(
        x, grad_out, case.kernel_size, simplify=simplify, **case.hyper
    )
    close(l2, grads.pow(2).flatten(1).sum(1))
    sgs = tnf.sum_grad_squared_weight(
        x, grad_out, case.kernel_size, simplify=simplify, **case.hyper
    )
    close(sgs, grads.pow(2).sum(0))


@pytest.mark.parametrize(
    "shape, groups",
    [((2, 6, 5, 5), 3), ((3, 8, 7), 8), ((2, 8, 3, 4, 5), 4)],
    ids=["2d", "1d-depthwise", "3d"],
)
@pytest.mark.parametrize("gemm_from", [0, 1 << 40], ids=["gemm", "reduction"])
def test_group_average(shape, groups, gemm_from, monkeypatch):
    """Both ways of averaging (a reduction, and the GEMM used for large CPU inputs)."""
    monkeypatch.setattr(tnf, "_GEMM_MEAN_ELEMENTS", gemm_from)
    x = torch.randn(*shape, dtype=torch.float64)
    per_group = x.shape[1] // groups
    expected = (
        sum(x[:, g * per_group : (g + 1) * per_group] for g in range(groups)) / groups
    )
    close(tnf.group_average(x, groups), expected)
    assert tnf.group_average(x, 1) is x


def _quantities(case: Case, module, x: Tensor, grad_out: Tensor, S: Tensor) -> dict:
    """Every function's call on these tensors, and its independent reference."""
    w, b = module.weight.detach(), module.bias.detach()
    k, hyper = case.kernel_size, case.hyper
    xg = x.clone().requires_grad_(True)
    grads = per_sample_grads(case, module, x, grad_out)
    u = grouped_unfold(case, x)  # [N, G, C/G·K, O]
    sqrt = _reference_sqrt_ggn(case, x, S)
    return {
        "conv": (lambda: tnf.conv(x, w, b, **hyper), module(x).detach()),
        "unfold": (lambda: tnf.unfold(x, k, **hyper), reference_unfold(case, x)),
        "input_vjp": (
            lambda: tnf.input_vjp(grad_out, w, x.shape, **hyper),
            torch.autograd.grad(module(xg), xg, grad_out)[0],
        ),
        "weight_vjp": (lambda: tnf.weight_vjp(x, grad_out, k, **hyper), grads.sum(0)),
        "per_sample": (
            lambda: tnf.weight_vjp(x, grad_out, k, per_sample=True, **hyper),
            grads,
        ),
        "kfac": (
            lambda: tnf.kfac_input_factor(x, k, groups_mode="separate", **hyper),
            torch.einsum("ngio,ngjo->gij", u, u) / x.shape[0],
        ),
        "averaged_patches": (
            lambda: tnf.averaged_patches(x, k, **hyper),
            u.mean(-1).mean(1),
        ),
        "diag_ggn": (
            lambda: tnf.diag_ggn_weight(x, S, k, per_sample=True, **hyper),
            sqrt.pow(2).sum(0),
        ),
        "sqrt_ggn": (lambda: tnf.sqrt_ggn_weight(x, S, k, **hyper), sqrt),
        "batch_l2": (
            lambda: tnf.batch_l2_weight(x, grad_out, k, **hyper),
            grads.pow(2).flatten(1).sum(1),
        ),
        "sum_grad_squared": (
            lambda: tnf.sum_grad_squared_weight(x, grad_out, k, **hyper),
            grads.pow(2).sum(0),
        ),
    }


PLAN_CASES = [
    c for c in CASES if c.name in ("k3-s2-p1", "k3-s2-p1-depthwise", "k3-s1-p1-reflect")
]


@pytest.mark.parametrize("measured", [False, True], ids=["estimated", "measured"])
@pytest.mark.parametrize("case", PLAN_CASES, ids=lambda c: c.id)
def test_repeated_calls_compute_from_their_own_tensors(
    case: Case, measured: bool, monkeypatch
):
    """A repeated call runs its signature's plan, on the tensors it is given.

    The third call of every function has new tensors of the first call's shapes: its
    plan must not have kept anything of the first call's tensors.
    """
    import importlib
    import math

    from backpack_tn.tn import cache_stats, clear_caches
    from backpack_tn.tn.evaluate import get_autotune, set_autotune

    # choices are made within the first call (a first call of a torch kernel can
    # take milliseconds, after which choices are measured over the next calls)
    ev = importlib.import_module("backpack_tn.tn.evaluate")
    monkeypatch.setattr(ev, "_OVER_CALLS_SECONDS", math.inf)

    module, x, out, grad_out, *_ = forward_with_grads(case)
    S = _random_S(case, out)
    torch.manual_seed(5)
    others = [torch.randn_like(t) for t in (x, grad_out, S)]
    first = _quantities(case, module, x, grad_out, S)
    second = _quantities(case, module, *others)
    enabled, threshold = get_autotune()
    clear_caches()
    try:
        if measured:  # kernel-vs-TN and TN-vs-trick are timed on these tiny layers
            set_autotune(True, min_flops=0)
        for name, (run, expected) in first.items():
            close(run(), expected)
            hits = cache_stats()["call-plans"].hits
            close(run(), expected)
            again, other = second[name]
            close(again(), other)
            assert cache_stats()["call-plans"].hits == hits + 2, name
    finally:
        set_autotune(enabled, threshold)


def _squared_quantities(case: Case, S: Tensor, simplify: bool) -> dict:
    """The squared quantities as functions of ``(x, grad_out)``: ours, and a reference
    through the unfolded input (``torch`` and ``unfoldNd`` only)."""
    k, hyper = case.kernel_size, case.hyper
    groups, c_out = case.groups, case.c_out

    def per_sample(x, g):  # [N, C_out, C_in/G·ΠK] from the unfolded input
        u = grouped_unfold(case, x)  # [N, G, C/G·K, O]
        g = g.reshape(g.shape[0], groups, c_out // groups, -1)
        return torch.einsum("ngdo,ngio->ngdi", g, u).reshape(g.shape[0], c_out, -1)

    return {
        "diag_ggn": (
            lambda x, g: tnf.diag_ggn_weight(x, S, k, simplify=simplify, **hyper),
            lambda x, g: _reference_sqrt_ggn(case, x, S).pow(2).sum((0, 1)),
        ),
        "diag_ggn_per_sample": (
            lambda x, g: tnf.diag_ggn_weight(
                x, S, k, per_sample=True, simplify=simplify, **hyper
            ),
            lambda x, g: _reference_sqrt_ggn(case, x, S).pow(2).sum(0),
        ),
        "batch_l2": (
            lambda x, g: tnf.batch_l2_weight(x, g, k, simplify=simplify, **hyper),
            lambda x, g: per_sample(x, g).pow(2).flatten(1).sum(1),
        ),
        "sum_grad_squared": (
            lambda x, g: tnf.sum_grad_squared_weight(
                x, g, k, simplify=simplify, **hyper
            ),
            lambda x, g: per_sample(x, g).pow(2).sum(0),
        ),
    }


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.name in ("k3-s2-p1", "k3-s1-p1-reflect")], ids=str
)
def test_squared_quantities_are_differentiable(case: Case, simplify):
    """Gradients through the squared quantities (GGN diagonal, batch L2, summed squared
    gradients) equal autograd's through unfold-based references."""
    _, x, out, grad_out, *_ = forward_with_grads(case)
    quantities = _squared_quantities(case, _random_S(case, out), simplify)
    for run, reference in quantities.values():
        ours = [t.clone().requires_grad_(True) for t in (x, grad_out)]
        theirs = [t.clone().requires_grad_(True) for t in (x, grad_out)]
        result = run(*ours)
        torch.manual_seed(2)
        weights = torch.randn_like(result)
        grads = torch.autograd.grad((result * weights).sum(), ours, allow_unused=True)
        expected_value = reference(*theirs).reshape(result.shape)
        expected = torch.autograd.grad(
            (expected_value * weights).sum(), theirs, allow_unused=True
        )
        for grad, want in zip(grads, expected):
            if want is None:  # the quantity does not depend on it (grad_out: GGN)
                assert grad is None or not grad.abs().max()
            else:
                close(grad, want)


@pytest.mark.parametrize(
    "case",
    [
        c
        for c in CASES
        if c.id in ("2d-k3-s2-p1", "2d-k3-s1-p1-reflect", "1d-k3-s2-p1-depthwise")
    ],
    ids=lambda c: c.id,
)
def test_vmap_over_independent_problems(case: Case, simplify):
    """``torch.func.vmap`` maps every function over a stack of problems (e.g. an
    ensemble), against references computed problem by problem. The squared
    quantities used to check whether to square in place by reading the result's
    data pointer, which a batched tensor does not have."""
    k, hyper = case.kernel_size, case.hyper
    problems = [forward_with_grads(case) for _ in range(2)]
    torch.manual_seed(5)
    problems = [
        (module, x + 0.1 * n, out, grad_out * (n + 1))
        for n, (module, x, out, grad_out, *_) in enumerate(problems)
    ]
    xs = torch.stack([x for _, x, _, _ in problems])
    grad_outs = torch.stack([g for *_, g in problems])
    S = _random_S(case, problems[0][2])
    Ss = torch.stack([S, 2 * S])

    def references(module, x, grad_out, S):
        xr = x.clone().requires_grad_(True)
        gx, gw = torch.autograd.grad(module(xr), (xr, module.weight), grad_out)
        grads = per_sample_grads(case, module, x, grad_out)
        u = grouped_unfold(case, x)
        sqrt = _reference_sqrt_ggn(case, x, S)
        return {
            "input_vjp": gx,
            "weight_vjp": gw,
            "per_sample": grads,
            "batch_l2": grads.pow(2).flatten(1).sum(1),
            "sum_grad_squared": grads.pow(2).sum(0),
            "kfac": torch.einsum("ngio,ngjo->gij", u, u) / x.shape[0],
            "diag_ggn": sqrt.pow(2).sum((0, 1)),
        }

    w = problems[0][0].weight.detach()
    shape = tuple(xs.shape[1:])

    def ours(x, grad_out, S):
        return {
            "input_vjp": tnf.input_vjp(grad_out, w, shape, simplify=simplify, **hyper),
            "weight_vjp": tnf.weight_vjp(x, grad_out, k, simplify=simplify, **hyper),
            "per_sample": tnf.weight_vjp(
                x, grad_out, k, per_sample=True, simplify=simplify, **hyper
            ),
            "batch_l2": tnf.batch_l2_weight(x, grad_out, k, simplify=simplify, **hyper),
            "sum_grad_squared": tnf.sum_grad_squared_weight(
                x, grad_out, k, simplify=simplify, **hyper
            ),
            "kfac": tnf.kfac_input_factor(
                x, k, groups_mode="separate", simplify=simplify, **hyper
            ),
            "diag_ggn": tnf.diag_ggn_weight(x, S, k, simplify=simplify, **hyper),
        }

    # the problems share one module (the same seed): the input VJP's weight
    module = problems[0][0]
    expected = [references(module, x, g, s) for x, g, s in zip(xs, grad_outs, Ss)]
    mapped = torch.func.vmap(ours)(xs, grad_outs, Ss)
    for name, result in mapped.items():
        want = torch.stack([e[name] for e in expected])
        close(result, want.reshape(result.shape))


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.name in ("k3-s2-p1", "k3-s1-p1-reflect")], ids=str
)
def test_squared_quantities_in_forward_mode(case: Case, simplify):
    """Forward-mode AD (dual tensors) through the squared quantities, against
    forward-mode AD through unfold-based references. The in-place square of their
    contraction results gave wrong tangents (a dual tensor does not require grad)."""
    import torch.autograd.forward_ad as fwAD

    _, x, out, grad_out, *_ = forward_with_grads(case)
    quantities = _squared_quantities(case, _random_S(case, out), simplify)
    torch.manual_seed(6)
    tangents = (torch.randn_like(x), torch.randn_like(grad_out))
    for run, reference in quantities.values():
        with fwAD.dual_level():
            inputs = [fwAD.make_dual(t, d) for t, d in zip((x, grad_out), tangents)]
            value, tangent = fwAD.unpack_dual(reference(*inputs))
            primal, ours = fwAD.unpack_dual(run(*inputs))
            close(primal, value.reshape(primal.shape))
            close(ours, tangent.reshape(ours.shape))
