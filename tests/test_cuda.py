"""The same computations on a CUDA device, against independent references.

Everything here needs a GPU and is skipped without one (CI has none; these ran on the
lent H100/H200 machines, see ``docs/benchmarks.md``). The references are the same
independent ones as in the CPU tests, computed on the CPU in float64 and moved over:
``tests.cases`` (``F.pad`` + ``unfoldNd``), autograd loops, stock BackPACK and stock
curvlinops run on the same device.

What the CPU suite cannot see and this module targets: tensors created on the wrong
device (index patterns, gather tables, masks), caches keyed without the device, CUDA
timing in the autotuner, and the choice between cuDNN kernels and the TN.
"""

from __future__ import annotations

import os

import curvlinops
import pytest
import torch
from backpack import extensions as bext
from torch import nn

import backpack_tn.extensions as tne
from backpack_tn import functional as tnf
from backpack_tn.linops import (
    DiagGGNLinearOperator,
    EKFACLinearOperator,
    KFACLinearOperator,
)
from backpack_tn.tn.evaluate import force_strategy
from tests.cases import CASES, Case, grouped_unfold, reference_unfold
from tests.test_extensions import (
    ARCHITECTURES,
    EXTENSIONS,
    HBP,
    LOSSES,
    assert_fields_equal,
    make_data,
    make_model,
    run,
    uses_tn,
)
from tests.test_functional import (
    _random_S,
    _reference_sqrt_ggn,
    close,
    forward_with_grads,
    per_sample_grads,
)

# BACKPACK_TN_TEST_DEVICE=cpu runs the module on the CPU (to check the test code
# itself on a machine without a GPU)
CUDA = os.environ.get("BACKPACK_TN_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    CUDA == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
)

# (simplify, forced strategy); None = the engine's own (autotuned, timed on the GPU)
STRATEGIES = [
    (True, None),
    (False, None),
    (True, "pattern"),
    (True, "window"),
    (True, "taps"),
]
STRATEGY_IDS = ["auto", "plain", "pattern", "window", "taps"]


def _references(case: Case) -> dict:
    """Every functional quantity of ``case`` from independent CPU code (float64)."""
    module, x, out, grad_out, gx, gw = forward_with_grads(case)
    grads = per_sample_grads(case, module, x, grad_out)
    S = _random_S(case, out)
    sqrt = _reference_sqrt_ggn(case, x, S)
    u = grouped_unfold(case, x)
    kfac = {}
    for approx in ("expand", "reduce"):
        for groups_mode in ("average", "separate"):
            v = u.mean(1, keepdim=True) if groups_mode == "average" else u
            v = v.mean(-1, keepdim=True) if approx == "reduce" else v
            factor = torch.einsum("ngio,ngjo->gij", v, v) / x.shape[0]
            kfac[approx, groups_mode] = (
                factor[0] if groups_mode == "average" else factor
            )
    patches = u.mean(-1)
    return dict(
        x=x,
        weight=module.weight.detach(),
        bias=module.bias.detach(),
        grad_out=grad_out,
        S=S,
        conv=out,
        unfold=reference_unfold(case, x),
        input_vjp=gx,
        weight_vjp=gw,
        per_sample_grad=grads,
        kfac=kfac,
        averaged_patches={"average": patches.mean(1), "separate": patches},
        sqrt_ggn={False: sqrt, True: sqrt.sum(1)},
        diag_ggn={False: sqrt.pow(2).sum((0, 1)), True: sqrt.pow(2).sum(0)},
        batch_l2=grads.pow(2).flatten(1).sum(1),
        sum_grad_squared=grads.pow(2).sum(0),
    )


def _on_cuda(value):
    return value.to(CUDA) if torch.is_tensor(value) else value


def _check(actual: torch.Tensor, expected: torch.Tensor):
    assert actual.device.type == torch.device(CUDA).type
    close(actual.cpu(), expected)


@pytest.mark.parametrize("simplify, strategy", STRATEGIES, ids=STRATEGY_IDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_functional_on_cuda(case, simplify, strategy):
    """All functional quantities of one configuration, computed on the GPU."""
    ref = _references(case)
    x, w, b, g, S = (_on_cuda(ref[k]) for k in ("x", "weight", "bias", "grad_out", "S"))
    k, hyper = case.kernel_size, dict(case.hyper, simplify=simplify)
    with force_strategy(strategy):
        for _ in range(2):  # the second call of torch's kernels skips the decision
            _check(tnf.conv(x, w, b, **hyper), ref["conv"])
            _check(tnf.input_vjp(g, w, x.shape, **hyper), ref["input_vjp"])
            _check(tnf.weight_vjp(x, g, k, **hyper), ref["weight_vjp"])
        _check(tnf.unfold(x, k, **hyper), ref["unfold"])
        _check(
            tnf.weight_vjp(x, g, k, per_sample=True, **hyper), ref["per_sample_grad"]
        )
        for (approx, groups_mode), expected in ref["kfac"].items():
            _check(
                tnf.kfac_input_factor(
                    x, k, approx=approx, groups_mode=groups_mode, **hyper
                ),
                expected,
            )
        for groups_mode, expected in ref["averaged_patches"].items():
            _check(
                tnf.averaged_patches(x, k, groups_mode=groups_mode, **hyper), expected
            )
        for sum_batch, expected in ref["sqrt_ggn"].items():
            _check(tnf.sqrt_ggn_weight(x, S, k, sum_batch=sum_batch, **hyper), expected)
        for per_sample, expected in ref["diag_ggn"].items():
            _check(
                tnf.diag_ggn_weight(x, S, k, per_sample=per_sample, **hyper), expected
            )
        _check(tnf.batch_l2_weight(x, g, k, **hyper), ref["batch_l2"])
        _check(tnf.sum_grad_squared_weight(x, g, k, **hyper), ref["sum_grad_squared"])


# float32 as users run it: cuDNN may use TF32 for convolutions (PyTorch's default),
# so the check is on the relative norm of the error against float64 references.
FLOAT32_CASES = [c for c in CASES if c.dims == 2]


def _rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual = actual.cpu().double()
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-30))


@pytest.mark.parametrize("case", FLOAT32_CASES, ids=lambda c: c.id)
def test_float32_on_cuda(case):
    ref = _references(case)
    x, w, b, g, S = (
        ref[k].to(CUDA, torch.float32) for k in ("x", "weight", "bias", "grad_out", "S")
    )
    k, hyper = case.kernel_size, case.hyper
    results = {
        "conv": tnf.conv(x, w, b, **hyper),
        "input_vjp": tnf.input_vjp(g, w, x.shape, **hyper),
        "per_sample_grad": tnf.weight_vjp(x, g, k, per_sample=True, **hyper),
        "batch_l2": tnf.batch_l2_weight(x, g, k, **hyper),
    }
    results["kfac"] = tnf.kfac_input_factor(x, k, **hyper)
    results["diag_ggn"] = tnf.diag_ggn_weight(x, S, k, **hyper)
    expected = dict(
        ref, kfac=ref["kfac"]["expand", "average"], diag_ggn=ref["diag_ggn"][False]
    )
    for name, value in results.items():
        assert value.dtype == torch.float32
        assert value.device.type == torch.device(CUDA).type
        assert _rel_error(value, expected[name]) < 5e-3, name


def test_cpu_and_cuda_share_no_cached_tensors():
    """The same shapes alternately on both devices: caches must key on the device."""
    case = next(c for c in CASES if c.id == "2d-k3-s2-p1")
    ref = _references(case)
    for device in ("cpu", CUDA, "cpu", CUDA):
        x, g, S, w, b = (
            ref[k].to(device) for k in ("x", "grad_out", "S", "weight", "bias")
        )
        k = case.kernel_size
        for name, result in (
            ("conv", tnf.conv(x, w, b, **case.hyper)),
            ("input_vjp", tnf.input_vjp(g, w, x.shape, **case.hyper)),
            ("weight_vjp", tnf.weight_vjp(x, g, k, **case.hyper)),
        ):
            assert result.device.type == torch.device(device).type
            close(result.cpu(), ref[name])
        for per_sample in (False, True):
            result = tnf.diag_ggn_weight(x, S, k, per_sample=per_sample, **case.hyper)
            assert result.device.type == device
            close(result.cpu(), ref["diag_ggn"][per_sample])
        grads = tnf.weight_vjp(x, g, k, per_sample=True, **case.hyper)
        close(grads.cpu(), ref["per_sample_grad"])


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c.dims == 2 and c.padding_mode == "zeros"],
    ids=lambda c: c.id,
)
def test_kernel_or_tn_measured_on_cuda(case):
    """torch's kernel against the TN, timed on the GPU (every problem measured)."""
    from backpack_tn.tn.evaluate import get_autotune, set_autotune

    ref = _references(case)
    x, w, b, g = (_on_cuda(ref[k]) for k in ("x", "weight", "bias", "grad_out"))
    k = case.kernel_size
    enabled, threshold = get_autotune()
    set_autotune(True, min_flops=0)
    try:
        for _ in range(2):
            _check(tnf.conv(x, w, b, **case.hyper), ref["conv"])
            _check(tnf.input_vjp(g, w, x.shape, **case.hyper), ref["input_vjp"])
            _check(tnf.weight_vjp(x, g, k, **case.hyper), ref["weight_vjp"])
    finally:
        set_autotune(enabled, threshold)


def _extension_grid():
    for name in EXTENSIONS:
        for dims in (1, 2, 3):
            for arch in ("k3p1-k2s2", "grouped"):
                if arch == "grouped" and (name in HBP or name == "BatchL2Grad"):
                    continue  # stock BackPACK refuses or ignores groups there
                loss = "ce-mean"
                batch = 1 if name == "KFRA" else 3
                yield pytest.param(
                    name, dims, arch, loss, batch, id=f"{name}-{dims}d-{arch}"
                )


@pytest.mark.parametrize("name, dims, arch, loss, batch", list(_extension_grid()))
def test_backpack_fields_equal_stock_on_cuda(name, dims, arch, loss, batch):
    """Our BackPACK fields equal stock BackPACK's, both on the GPU."""
    layers = ARCHITECTURES[arch]
    X, y = (t.to(CUDA) for t in make_data(dims, batch, loss))
    stock = run(
        make_model(dims, layers).to(CUDA), LOSSES[loss](), X, y, getattr(bext, name)()
    )
    extension = getattr(tne, name)()
    assert uses_tn(extension)
    ours = run(make_model(dims, layers).to(CUDA), LOSSES[loss](), X, y, extension)
    for field in ours:
        for t in field if isinstance(field, (list, tuple)) else [field]:
            assert t.device.type == torch.device(CUDA).type
    assert_fields_equal(ours, stock)


def _conv2d_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, stride=2),
        nn.Sigmoid(),
        nn.Conv2d(4, 4, 3, groups=2, padding=1),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 4),
    ).to(CUDA, torch.float64)


def _loader(batches=3, batch_size=24):
    gen = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(batch_size, 2, 8, 8, generator=gen, dtype=torch.float64).to(
                CUDA
            ),
            torch.randint(0, 4, (batch_size,), generator=gen).to(CUDA),
        )
        for _ in range(batches)
    ]


def _dense(op) -> torch.Tensor:
    return op @ torch.eye(op.shape[1], dtype=torch.float64, device=CUDA)


# curvlinops' EKFAC has no forward-only Fisher
OPERATOR_GRID = [
    (cls, approx, fisher)
    for cls in ("KFAC", "EKFAC")
    for approx in ("expand", "reduce")
    for fisher in ("type-2", "mc", "empirical", "forward-only")
    if not (cls == "EKFAC" and fisher == "forward-only")
]


@pytest.mark.parametrize(
    "cls, approx, fisher", OPERATOR_GRID, ids=["-".join(g) for g in OPERATOR_GRID]
)
def test_curvlinops_operators_equal_stock_on_cuda(cls, approx, fisher):
    ours_cls, ref_cls = {
        "KFAC": (KFACLinearOperator, curvlinops.KFACLinearOperator),
        "EKFAC": (EKFACLinearOperator, curvlinops.EKFACLinearOperator),
    }[cls]
    model, data = _conv2d_net(), _loader()
    loss = nn.CrossEntropyLoss()
    kw = dict(fisher_type=fisher, kfac_approx=approx, check_deterministic=False)
    params = list(model.parameters())
    ours = ours_cls(model, loss, params, data, **kw)
    ref = ref_cls(model, loss, params, data, **kw)
    torch.testing.assert_close(_dense(ours), _dense(ref), rtol=1e-8, atol=1e-12)


def test_diag_ggn_operator_equals_curvlinops_ggn_on_cuda():
    model, data = _conv2d_net(), _loader(batch_size=5)
    loss = nn.CrossEntropyLoss()
    params = list(model.parameters())
    op = DiagGGNLinearOperator(model, loss, params, data)
    ggn = curvlinops.GGNLinearOperator(model, loss, params, data)
    reference = _dense(ggn).diagonal()
    torch.testing.assert_close(
        _dense(op), torch.diag(reference), rtol=1e-10, atol=1e-12
    )
