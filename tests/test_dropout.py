"""Tensor dropout (``backpack_tn.dropout``).

References are independent of the code under test: torch's ``nn.ConvNd`` and autograd.
The sampled weight gradient for a given set of kept indices is checked against
autograd's weight gradient of the convolution of an explicitly *masked* input
(``x ⊙ mask / p``), which is the estimator's definition written differently.
"""

from __future__ import annotations

import math

import pytest
import torch
from backpack import backpack, extend
from torch import nn

import backpack_tn.extensions as tne
from backpack_tn import dropout as tnd
from tests.cases import CASES, CONV

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _all_axes(dims):
    return ("channel",) + tuple(f"i{d + 1}" for d in range(dims))


def _run_dropout(case, x, conv, keep_prob, axes, generator, grad_out=None):
    """Outputs and gradients of ``conv_tn_dropout``, plus the kept indices it saved.

    The kept indices are read off the tensors saved for backward (the only int64
    ones), in the order of ``axes``.
    """
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = x.detach().clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = tnd.conv_tn_dropout(
            x,
            conv.weight,
            conv.bias,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            keep_prob=keep_prob,
            axes=axes,
            generator=generator,
            padding_mode=conv.padding_mode,
        )
    if grad_out is None:
        grad_out = torch.randn_like(out)
    params = [x, conv.weight] + ([conv.bias] if conv.bias is not None else [])
    grads = torch.autograd.grad(out, params, grad_out)
    kept = [t for t in saved if t.dtype == torch.long]
    return out, grads, kept, grad_out


def _mask(shape, axes, kept, dtype, device):
    """Indicator of the kept input entries, ``[1, C, *I]``."""
    mask = torch.ones(1, *shape[1:], dtype=dtype, device=device)
    for axis, idx in zip(axes, kept):
        dim = 1 if axis == "channel" else 1 + int(axis[1:])
        ind = torch.zeros(shape[dim], dtype=dtype, device=device)
        ind[idx] = 1
        view = [1] * len(shape)
        view[dim] = shape[dim]
        mask = mask * ind.reshape(view)
    return mask


def _autograd(conv, x, grad_out):
    x = x.detach().clone().requires_grad_()
    out = conv(x)
    params = [x, conv.weight] + ([conv.bias] if conv.bias is not None else [])
    return out, torch.autograd.grad(out, params, grad_out)


# --- correctness against autograd ----------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_sampled_gradients_vs_masked_autograd(case):
    """Every hyper-parameter combination: out, input and bias grads exact; the weight
    gradient equals autograd's for the masked, rescaled input (all axes sampled)."""
    conv, x = case.module(), case.input()
    axes = _all_axes(case.dims)
    p = 0.6
    gen = torch.Generator().manual_seed(0)
    out, grads, kept, grad_out = _run_dropout(case, x, conv, p, axes, gen)
    ref_out, ref = _autograd(conv, x, grad_out)
    assert torch.allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    assert torch.allclose(grads[0], ref[0], rtol=1e-10, atol=1e-12)  # input
    assert torch.allclose(grads[2], ref[2], rtol=1e-10, atol=1e-12)  # bias
    assert len(kept) == len(axes)
    mask = _mask(x.shape, axes, kept, x.dtype, x.device) / p ** len(axes)
    _, masked = _autograd(conv, x * mask, grad_out)
    assert torch.allclose(grads[1], masked[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_keep_prob_one_equals_autograd(case):
    conv, x = case.module(), case.input()
    out, grads, kept, grad_out = _run_dropout(case, x, conv, 1.0, "spatial", None)
    ref_out, ref = _autograd(conv, x, grad_out)
    assert kept == []
    assert torch.allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["gather_v", "unfold_x"])
@pytest.mark.parametrize(
    "case",
    [
        c
        for c in CASES
        if c.name
        in (
            "k3-s2-p1",
            "k3-s1-p1-reflect",
            "k3-s1-p1-groups2",
            "k3-s2-p1-depthwise",
            "k3-same-d2-circular",
            "k3-s2-p2-replicate",
        )
    ],
    ids=lambda c: c.id,
)
def test_both_formulations(case, method):
    """Both contraction orders of the sampled weight VJP, for given kept indices."""
    from backpack_tn.tn.geometry import make_geometry

    conv, x = case.module(), case.input()
    gen = torch.Generator().manual_seed(3)
    rows = [
        (torch.rand(s, generator=gen) < 0.6).nonzero().flatten() for s in x.shape[2:]
    ]
    channels = torch.tensor([0, 1, 3])
    x_sub = x[:, channels]
    for d, r in enumerate(rows):
        x_sub = x_sub.index_select(2 + d, r)
    out = conv(x)
    grad_out = torch.randn_like(out)
    geometry = make_geometry(
        x.shape[2:],
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.padding_mode,
    )
    got = tnd.sampled_weight_vjp(
        x_sub, grad_out, geometry, rows, channels, x.shape[1], method=method
    )
    mask = _mask(x.shape, _all_axes(case.dims), [channels, *rows], x.dtype, x.device)
    _, ref = _autograd(conv, x * mask, grad_out)
    assert torch.allclose(got, ref[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dims", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_module_train_eval_and_keep_one(dims, bias):
    torch.manual_seed(0)
    cls = {1: tnd.TNDropoutConv1d, 2: tnd.TNDropoutConv2d, 3: tnd.TNDropoutConv3d}[dims]
    conv = cls(4, 5, 3, padding=1, bias=bias, keep_prob=0.3).double()
    ref = CONV[dims](4, 5, 3, padding=1, bias=bias).double()
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, *([6] * dims), dtype=torch.float64)
    grad_out = torch.randn(2, 5, *([6] * dims), dtype=torch.float64)
    _, exact = _autograd(ref, x, grad_out)
    # training: input gradient exact, weight gradient sampled (differs)
    _, got = _autograd(conv, x, grad_out)
    assert torch.allclose(got[0], exact[0], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got[1], exact[1])
    if bias:
        assert torch.allclose(got[2], exact[2], rtol=1e-10, atol=1e-12)
    # eval, keep_prob=1 and disabled(): the parent's forward, identical gradients
    conv.eval()
    _, got = _autograd(conv, x, grad_out)
    assert all(torch.equal(g, r) for g, r in zip(got, exact))
    conv.train()
    with tnd.disabled():
        assert not conv.sampling
        _, got = _autograd(conv, x, grad_out)
    assert all(torch.equal(g, r) for g, r in zip(got, exact))
    assert conv.sampling
    tnd.convert(conv, keep_prob=1.0)
    assert not conv.sampling
    _, got = _autograd(conv, x, grad_out)
    assert all(torch.equal(g, r) for g, r in zip(got, exact))


# --- statistics ----------------------------------------------------------------------

STAT_CASES = {
    "1d-k3-p1-spatial": (1, dict(padding=1), "spatial", 0.5),
    "2d-k3-s2-spatial": (2, dict(stride=2, padding=1), "spatial", 0.6),
    "2d-k3-channel": (2, dict(padding=1), "channel", 0.4),
    "2d-reflect-channel+i2": (
        2,
        dict(padding=1, padding_mode="reflect"),
        ("channel", "i2"),
        {"channel": 0.5, "i2": 0.7},
    ),
    "3d-k2-groups2-spatial": (3, dict(groups=2), "spatial", 0.7),
}


@pytest.mark.parametrize("name", list(STAT_CASES))
def test_unbiased(name):
    """The mean of S independent estimates converges to the exact weight gradient.

    Each entry of the mean is an average of S i.i.d. draws, so by the central limit
    theorem (mean − true)/(σ/√S) is approximately standard normal, with σ estimated
    by the sample standard deviation. A 5σ bound fails by chance with probability
    ~6e-7 per entry (~1e-4 for the few hundred entries here, a union bound); the
    small atol absorbs entries whose estimate never varies (σ = 0) up to rounding.
    The test also checks that the estimates do vary (the sampling is not a no-op).
    """
    dims, hyper, axes, p = STAT_CASES[name]
    torch.manual_seed(0)
    conv = CONV[dims](
        4, 6, hyper.pop("k", 3 if "groups" not in hyper else 2), **hyper
    ).double()
    x = torch.randn(3, 4, *([7] * dims), dtype=torch.float64)
    grad_out = torch.randn_like(conv(x))
    _, exact = _autograd(conv, x, grad_out)
    gen = torch.Generator().manual_seed(1)
    samples = 400
    draws = torch.stack(
        [
            _run_dropout(None, x, conv, p, axes, gen, grad_out)[1][1]
            for _ in range(samples)
        ]
    )
    mean, std = draws.mean(0), draws.std(0)
    bound = 5 * std / math.sqrt(samples) + 1e-10
    assert ((mean - exact[1]).abs() <= bound).all()
    assert (std > 0).any()


def test_seeded_runs_reproducible():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    grad_out = torch.randn(2, 4, 8, 8, dtype=torch.float64)

    def weight_grad(seed):
        gen = torch.Generator().manual_seed(seed)
        return _run_dropout(None, x, conv, 0.5, "spatial", gen, grad_out)[1][1]

    assert torch.equal(weight_grad(7), weight_grad(7))
    assert not torch.equal(weight_grad(7), weight_grad(8))
    # the modules take a generator too
    module = tnd.convert(nn.Conv2d(3, 4, 3, padding=1).double(), keep_prob=0.5)
    module.generator = torch.Generator().manual_seed(5)
    first = _autograd(module, x, grad_out)[1][1]
    module.generator.manual_seed(5)
    assert torch.equal(first, _autograd(module, x, grad_out)[1][1])


# --- arguments -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(keep_prob=0.0), "keep_prob"),
        (dict(keep_prob=-0.5), "keep_prob"),
        (dict(keep_prob=1.5), "keep_prob"),
        (dict(keep_prob="0.5"), "keep_prob"),
        (dict(keep_prob=True), "keep_prob"),
        (dict(keep_prob=(0.5,), axes=("i1", "i2")), "keep_prob"),
        (dict(keep_prob={"i1": 0.5}, axes="spatial"), "keep_prob"),
        (dict(keep_prob={"i1": 0.5, "i2": 2.0}, axes="spatial"), "keep_prob"),
        (dict(axes="space"), "axes"),
        (dict(axes=("i1", "i3")), "axes"),  # Conv2d has no third spatial axis
        (dict(axes=("i1", "i1")), "axes"),
        (dict(axes=()), "axes"),
        (dict(axes=3), "axes"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else v,
)
def test_bad_arguments(kwargs, match):
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with pytest.raises(ValueError, match=match):
        tnd.conv_tn_dropout(x, w, **kwargs)
    with pytest.raises(ValueError, match=match):
        tnd.TNDropoutConv2d(2, 3, 3, **kwargs)
    model = nn.Sequential(nn.Conv2d(2, 3, 3))
    with pytest.raises(ValueError, match=match):
        tnd.convert(model, **kwargs)
    assert type(model[0]) is nn.Conv2d  # nothing converted


def test_every_index_dropped_gives_zero_weight_gradient():
    """With a tiny keep probability on a short axis nothing is kept (unbiasedness
    allows it); the weight gradient is then zero and the rest still exact."""
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 3, 3, padding=1).double()
    x = torch.randn(2, 2, 3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    out, grads, kept, grad_out = _run_dropout(None, x, conv, 1e-6, "i1", gen)
    assert kept[0].numel() == 0
    _, ref = _autograd(conv, x, grad_out)
    assert torch.equal(grads[1], torch.zeros_like(grads[1]))
    assert torch.allclose(grads[0], ref[0]) and torch.allclose(grads[2], ref[2])


def test_keep_prob_forms():
    assert tnd.resolve_keep_probs(0.5, "spatial", 3) == {
        "i1": 0.5,
        "i2": 0.5,
        "i3": 0.5,
    }
    assert tnd.resolve_keep_probs((0.5, 0.25), ("channel", "i2"), 2) == {
        "channel": 0.5,
        "i2": 0.25,
    }
    assert tnd.resolve_keep_probs({"channel": 1}, "channel", 1) == {"channel": 1.0}


# --- memory --------------------------------------------------------------------------


def _saved_bytes(fn):
    """Bytes of the tensors autograd packs for backward while running ``fn``."""
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return packed


@pytest.mark.parametrize(
    "dims,shape,axes",
    [
        (1, (4, 16, 4096), "i1"),
        (1, (2, 4096, 16), "channel"),
        (2, (2, 8, 256, 256), "spatial"),
    ],
    ids=["1d-spatial", "1d-channel", "2d-spatial-both"],
)
@pytest.mark.parametrize("p", [0.25, 0.5, 0.75])
def test_saved_memory_shrinks_with_keep_prob(dims, shape, axes, p):
    """Saved input bytes = kept fraction × input bytes, and the kept fraction per axis
    is Binomial(size, p)/size: within 5 standard deviations of p."""
    torch.manual_seed(0)
    conv = CONV[dims](shape[1], 2, 3, padding=1)
    x = torch.randn(shape, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    exact = _saved_bytes(lambda: conv(x))
    packed = _saved_bytes(
        lambda: tnd.conv_tn_dropout(
            x, conv.weight, conv.bias, *args, keep_prob=p, axes=axes, generator=gen
        )
    )

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    x_bytes = x.numel() * x.element_size()
    assert nbytes(exact) >= x_bytes  # autograd saves the full input
    kept = [t for t in packed if t.dtype == torch.long]
    floats = [t for t in packed if t.dtype != torch.long]
    # the kernel (for the exact input gradient) and the input slice, nothing else
    assert any(t is conv.weight for t in floats) and len(floats) == 2
    x_sub = next(t for t in floats if t is not conv.weight)
    sizes = [shape[1]] if axes == "channel" else list(shape[2:])
    fraction = math.prod(len(k) / s for k, s in zip(kept, sizes))
    assert x_sub.numel() * x_sub.element_size() == pytest.approx(fraction * x_bytes)
    for k, s in zip(kept, sizes):
        assert abs(len(k) / s - p) <= 5 * math.sqrt(p * (1 - p) / s)
    # E[saved / x_bytes] = p^(number of sampled axes); each axis fraction has
    # relative standard deviation sqrt((1 - p) / (p s)), and these add (to first
    # order) in quadrature for the product: allow 5 of them.
    expected = p ** len(sizes)
    rel = 5 * math.sqrt(sum((1 - p) / (p * s) for s in sizes))
    saved = nbytes(packed) - nbytes([conv.weight]) - nbytes(kept)
    assert saved / x_bytes == pytest.approx(expected, rel=rel)
    # the int64 indices are small next to the input slice
    assert nbytes(kept) < 0.1 * saved


# --- models: convert, state_dict, BackPACK, curvlinops -------------------------------


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=2), nn.ReLU()),
        nn.Conv2d(6, 4, 2, padding="same", padding_mode="reflect"),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    ).double()


def test_convert_in_place_and_state_dict_round_trip():
    model = _model()
    keys = list(model.state_dict())
    weight = model[0].weight
    assert tnd.convert(model, keep_prob=0.5) is model
    assert type(model[0]) is tnd.TNDropoutConv2d
    assert type(model[2][0]) is tnd.TNDropoutConv2d
    assert model[0].weight is weight
    assert list(model.state_dict()) == keys
    fresh = _model()
    fresh.load_state_dict(model.state_dict())
    model.load_state_dict(fresh.state_dict())
    assert "keep_prob=0.5" in repr(model)
    # reconfigure converted modules; a root convolution converts too
    tnd.convert(model, keep_prob=0.25, axes="channel")
    assert model[0].axes == "channel"
    root = tnd.convert(nn.Conv1d(2, 2, 3), keep_prob=0.5)
    assert type(root) is tnd.TNDropoutConv1d


def _backpack_fields(model, x, y):
    model = extend(model)
    lossfunc = extend(nn.CrossEntropyLoss())
    with backpack(
        tne.BatchGrad(),
        tne.SumGradSquared(),
        tne.DiagGGNExact(),
        tne.KFAC(),
        tne.BatchL2Grad(),
    ):
        lossfunc(model(x), y).backward()
    fields = {}
    for name, p in model.named_parameters():
        for field in ("grad_batch", "sum_grad_squared", "diag_ggn_exact", "batch_l2"):
            fields[f"{name}.{field}"] = getattr(p, field)
        for i, factor in enumerate(p.kfac):
            fields[f"{name}.kfac{i}"] = factor
        fields[f"{name}.grad"] = p.grad
    return fields


def test_backpack_fields_exact_on_converted_model():
    """BackPACK's quantities come from the saved module input: exact; only the weight
    gradients of the dropout convolutions differ."""
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (4,))
    ref = _backpack_fields(_model(), x, y)
    converted = tnd.convert(_model(), keep_prob=0.5, generator=torch.Generator())
    got = _backpack_fields(converted, x, y)
    assert set(got) == set(ref)
    for key in ref:
        if "kfac" in key:
            continue  # compared below with identical MC samples
        if (
            key.endswith(".grad")
            and key.split(".")[0] in ("0", "2", "3")
            and ("weight" in key)
        ):
            assert not torch.allclose(got[key], ref[key]), key
        else:
            assert torch.allclose(got[key], ref[key], rtol=1e-10, atol=1e-12), key


def test_backpack_kfac_exact_on_converted_model():
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (4,))
    factors = []
    # the masks draw from their own generator, so both runs see the same MC sample
    converted = tnd.convert(_model(), keep_prob=0.3, generator=torch.Generator())
    for model in (_model(), converted):
        model, lossfunc = extend(model), extend(nn.CrossEntropyLoss())
        torch.manual_seed(3)  # same MC sample for both models
        with backpack(tne.KFAC(), tne.KFLR()):
            lossfunc(model(x), y).backward()
        factors.append([f for p in model.parameters() for f in p.kfac + p.kflr])
    for a, b in zip(*factors):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_curvlinops_exact_on_converted_model():
    """curvlinops' KFAC and backpack_tn.linops' operators use module inputs and
    output gradients (exact); operators that differentiate through the model run
    exactly inside disabled()."""
    from curvlinops import GGNLinearOperator, KFACLinearOperator

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)
    ).double()
    x, y = torch.randn(5, 3, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    loss = nn.CrossEntropyLoss()

    def matrices(m):
        from backpack_tn import linops

        params = [p for p in m.parameters() if p.requires_grad]
        data = [(x, y)]
        eye = torch.eye(sum(p.numel() for p in params), dtype=torch.float64)
        kw = dict(check_deterministic=False)
        ops = [
            KFACLinearOperator(m, loss, params, data, **kw),
            linops.KFACLinearOperator(m, loss, params, data, **kw),
            linops.DiagGGNLinearOperator(m, loss, params, data, **kw),
        ]
        dense = [op @ eye for op in ops]
        with tnd.disabled():
            ggn = GGNLinearOperator(m, loss, params, data, **kw)
            dense.append(ggn @ eye)
        return dense

    ref = matrices(model)
    got = matrices(tnd.convert(model, keep_prob=0.5))
    for a, b in zip(ref, got):
        assert torch.allclose(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_devices(device):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).to(device)
    x = torch.randn(2, 3, 9, 9, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    out, grads, kept, grad_out = _run_dropout(
        None, x, conv, 0.5, ("channel", "i1", "i2"), gen
    )
    _, ref = _autograd(conv, x, grad_out)
    assert torch.allclose(grads[0], ref[0], rtol=1e-4, atol=1e-5)
    mask = _mask(x.shape, ("channel", "i1", "i2"), kept, x.dtype, device) / 0.125
    _, masked = _autograd(conv, x * mask, grad_out)
    assert torch.allclose(grads[1], masked[1], rtol=1e-4, atol=1e-4)
