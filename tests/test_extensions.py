"""BackPACK integration: every field equals stock BackPACK's where BackPACK is right."""

from __future__ import annotations

import gc

import pytest
import torch
from backpack import backpack, extend
from backpack import extensions as bext
from backpack.custom_module.branching import SumModule
from torch import nn

import backpack_tn.extensions as tne
from backpack_tn.extensions import modules as tnm

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SIZE = {1: (10,), 2: (8, 7), 3: (6, 5, 5)}

# Conv layer hyper-parameters of the test models: (c_out, kernel, stride, padding,
# dilation, groups, bias); the input has 4 channels.
ARCHITECTURES = {
    "k3p1-k2s2": [(6, 3, 1, 1, 1, 1, True), (4, 2, 2, 0, 1, 1, False)],
    "k3s2d2-k1": [(6, 3, 2, 2, 2, 1, True), (5, 1, 1, 0, 1, 1, True)],
    "grouped": [(6, 3, 1, 1, 1, 2, True), (6, 3, 2, 1, 1, 6, True)],
}

EXTENSIONS = [
    "BatchGrad",
    "SumGradSquared",
    "BatchL2Grad",
    "Variance",
    "DiagGGNExact",
    "DiagGGNMC",
    "BatchDiagGGNExact",
    "BatchDiagGGNMC",
    "DiagHessian",
    "BatchDiagHessian",
    "KFAC",
    "KFLR",
    "KFRA",
    "SqrtGGNExact",
    "SqrtGGNMC",
]
HBP = ("KFAC", "KFLR", "KFRA")
LOSSES = {
    "ce-mean": lambda: nn.CrossEntropyLoss(reduction="mean"),
    "ce-sum": lambda: nn.CrossEntropyLoss(reduction="sum"),
    "mse-mean": lambda: nn.MSELoss(reduction="mean"),
    "mse-sum": lambda: nn.MSELoss(reduction="sum"),
}


def make_model(dims: int, layers, classes: int = 3, padding_mode="zeros"):
    torch.manual_seed(0)
    modules, c_in = [], 4
    for c_out, k, s, p, d, g, bias in layers:
        modules += [
            CONV[dims](c_in, c_out, k, s, p, d, g, bias, padding_mode=padding_mode),
            nn.Sigmoid(),
        ]
        c_in = c_out
    modules.append(nn.Flatten())
    model = nn.Sequential(*modules).double()
    features = model(torch.zeros(1, 4, *SIZE[dims], dtype=torch.float64)).shape[1]
    model.append(nn.Linear(features, classes).double())
    return model


def make_data(dims: int, batch: int, loss: str, classes: int = 3):
    torch.manual_seed(1)
    X = torch.randn(batch, 4, *SIZE[dims], dtype=torch.float64)
    if loss.startswith("ce"):
        y = torch.randint(0, classes, (batch,))
    else:
        y = torch.randn(batch, classes, dtype=torch.float64)
    return X, y


def run(model, lossfunc, X, y, extension, seed: int = 2):
    """One backward pass with an extension; returns the fields of all parameters."""
    model, lossfunc = extend(model), extend(lossfunc)
    model.zero_grad()
    torch.manual_seed(seed)  # MC extensions draw the same samples in both runs
    with backpack(extension):
        lossfunc(model(X), y).backward()
    return [getattr(p, extension.savefield) for p in model.parameters()]


def assert_fields_equal(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        if isinstance(e, (list, tuple)):
            assert_fields_equal(a, e)
        else:
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-13)


def uses_tn(extension) -> bool:
    """Whether all conv classes map to TN module extensions (BackPACK's private map)."""
    mapping = extension._BackpropExtension__module_extensions
    return all(isinstance(mapping.get(c), tnm.TNConvExtension) for c in CONV.values())


def _stock_comparable():
    """(extension, dims, arch, loss, batch) where stock BackPACK runs and is right.

    Left out, each with its own test against an independent reference:
    grouped KFAC/KFLR/KFRA (BackPACK refuses; test_kflr_factors_vs_independent_
    reference), grouped BatchL2Grad (BackPACK ignores groups; test_first_order_vs_
    autograd), KFRA with MSELoss (stock BackPACK 1.7.1 crashes in float64: ``eye(D)``
    without dtype in ``MSELossDerivatives._sum_hessian``). KFRA runs with N = 1 only:
    its batch-averaged backpropagation is quadratic in the feature count.
    """
    for name in EXTENSIONS:
        for dims in (1, 2, 3):
            for arch, layers in ARCHITECTURES.items():
                grouped = any(g > 1 for *_, g, _ in layers)
                if grouped and (name in HBP or name == "BatchL2Grad"):
                    continue
                for loss in LOSSES:
                    if name == "KFRA" and loss.startswith("mse"):
                        continue
                    for batch in (1,) if name == "KFRA" else (1, 3):
                        yield pytest.param(
                            name,
                            dims,
                            arch,
                            loss,
                            batch,
                            id=f"{name}-{dims}d-{arch}-{loss}-N{batch}",
                        )


@pytest.mark.parametrize("name,dims,arch,loss,batch", list(_stock_comparable()))
def test_fields_equal_stock_backpack(name, dims, arch, loss, batch):
    layers = ARCHITECTURES[arch]
    X, y = make_data(dims, batch, loss)
    stock = run(make_model(dims, layers), LOSSES[loss](), X, y, getattr(bext, name)())
    extension = getattr(tne, name)()
    assert uses_tn(extension)
    ours = run(make_model(dims, layers), LOSSES[loss](), X, y, extension)
    assert_fields_equal(ours, stock)


def autograd_per_sample(model, lossfunc, X, y):
    """Per-sample gradients of the (batch-reduced) loss by an explicit loop."""
    scale = 1.0 / X.shape[0] if lossfunc.reduction == "mean" else 1.0
    grads = []
    for n in range(X.shape[0]):
        model.zero_grad()
        out = model(X[n : n + 1])
        loss = type(lossfunc)(reduction="sum")(out, y[n : n + 1]) * scale
        if isinstance(lossfunc, nn.MSELoss) and lossfunc.reduction == "mean":
            loss = loss / y.shape[1]  # MSE's mean also runs over the features
        grads.append([g.clone() for g in torch.autograd.grad(loss, model.parameters())])
    return [torch.stack(gs) for gs in zip(*grads)]


@pytest.mark.parametrize("loss", ["ce-mean", "mse-sum"])
@pytest.mark.parametrize("arch", ["grouped", "k3p1-k2s2"])
@pytest.mark.parametrize("dims", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_first_order_vs_autograd(dims, arch, loss):
    """BatchGrad, BatchL2Grad, SumGradSquared against autograd per-sample loops.

    Stock BackPACK's BatchL2Grad ignores channel groups (its einsum contracts all
    input with all output channels), so for grouped convolutions this is the check.
    """
    X, y = make_data(dims, 3, loss)
    layers = ARCHITECTURES[arch]
    expected = autograd_per_sample(make_model(dims, layers), LOSSES[loss](), X, y)
    fields = {}
    for name in ("BatchGrad", "BatchL2Grad", "SumGradSquared"):
        fields[name] = run(
            make_model(dims, layers), LOSSES[loss](), X, y, getattr(tne, name)()
        )
    assert_fields_equal(fields["BatchGrad"], expected)
    assert_fields_equal(
        fields["BatchL2Grad"], [g.flatten(1).pow(2).sum(1) for g in expected]
    )
    assert_fields_equal(fields["SumGradSquared"], [g.pow(2).sum(0) for g in expected])


@pytest.mark.parametrize("name", ["BatchGrad", "SqrtGGNExact", "SqrtGGNMC"])
def test_subsampling(name):
    X, y = make_data(2, 4, "ce-mean")
    layers = ARCHITECTURES["k3p1-k2s2"]
    stock = run(
        make_model(2, layers),
        LOSSES["ce-mean"](),
        X,
        y,
        getattr(bext, name)(subsampling=[0, 2]),
    )
    ours = run(
        make_model(2, layers),
        LOSSES["ce-mean"](),
        X,
        y,
        getattr(tne, name)(subsampling=[0, 2]),
    )
    assert_fields_equal(ours, stock)


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv2(self.act(self.conv1(x))) + x)


@pytest.mark.parametrize(
    "name", ["BatchGrad", "DiagGGNExact", "DiagGGNMC", "SqrtGGNExact", "BatchL2Grad"]
)
def test_branched_resnet_block(name):
    def model():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(4, 4, 3, padding=1),
            ResBlock(4),
            nn.Flatten(),
            nn.Linear(4 * 8 * 7, 3),
        ).double()

    X, y = make_data(2, 3, "ce-mean")
    results = []
    for lib in (bext, tne):
        net = extend(model(), use_converter=True)
        assert any(isinstance(m, SumModule) for m in net.modules())
        results.append(run(net, nn.CrossEntropyLoss(), X, y, getattr(lib, name)()))
    assert_fields_equal(results[1], results[0])


def test_kfac_approx_validation():
    with pytest.raises(ValueError, match="kfac_approx"):
        tne.KFAC(kfac_approx="full")
    assert tne.KFLR(kfac_approx="reduce").kfac_approx == "reduce"


def test_register_into_existing_extension():
    ext = bext.DiagGGNExact()
    assert not uses_tn(ext)
    assert tne.register(ext) is ext and uses_tn(ext)
    with pytest.raises(ValueError, match="no convolution extension"):
        tne.register(bext.GGNMP(), strict=True)
    other = bext.GGNMP()
    assert tne.register(other) is other  # non-strict: left alone


def test_install_uninstall_restore_backpack():
    from backpack.extensions.backprop_extension import BackpropExtension

    original = BackpropExtension.__init__
    assert not tne.is_installed()
    with tne.enabled():
        assert tne.is_installed()
        inside = bext.KFLR()
        assert uses_tn(inside)
    assert not tne.is_installed() and BackpropExtension.__init__ is original
    after = bext.KFLR()
    assert not uses_tn(after)
    tne.install()
    try:
        assert uses_tn(bext.BatchGrad())
    finally:
        tne.uninstall()
    assert BackpropExtension.__init__ is original
    # a stock extension built after uninstall gives stock numbers
    X, y = make_data(2, 3, "ce-mean")
    layers = ARCHITECTURES["k3p1-k2s2"]
    ours = run(make_model(2, layers), nn.CrossEntropyLoss(), X, y, inside)
    stock = run(make_model(2, layers), nn.CrossEntropyLoss(), X, y, after)
    assert_fields_equal(ours, stock)


def test_fallback_warns_once_then_matches_backpack(monkeypatch):
    monkeypatch.setattr(tnm, "tn_unsupported", lambda module: "pretend-unsupported")
    monkeypatch.setattr(tnm, "_WARNED", set())
    X, y = make_data(2, 3, "ce-mean")
    layers = ARCHITECTURES["k3p1-k2s2"]
    stock = run(make_model(2, layers), nn.CrossEntropyLoss(), X, y, bext.DiagGGNExact())
    with pytest.warns(UserWarning, match="falling back to BackPACK") as record:
        ours = run(
            make_model(2, layers), nn.CrossEntropyLoss(), X, y, tne.DiagGGNExact()
        )
    assert len([r for r in record if "falling back" in str(r.message)]) == 1
    assert_fields_equal(ours, stock)
    with pytest.raises(tnm.TNFallbackError, match="strict"):
        run(
            make_model(2, layers),
            nn.CrossEntropyLoss(),
            X,
            y,
            tne.DiagGGNExact(strict=True),
        )
    # where BackPACK is known to be wrong, falling back is an error
    reflect = make_model(2, layers, padding_mode="reflect")
    with pytest.raises(tnm.TNFallbackError, match="wrong"):
        run(reflect, nn.CrossEntropyLoss(), X, y, tne.DiagGGNExact())


def test_repeated_backward_keeps_memory_flat():
    """Like BackPACK's memory-leak test: no tensors accumulate across iterations."""
    X, y = make_data(2, 3, "ce-mean")
    model = extend(make_model(2, ARCHITECTURES["k3p1-k2s2"]))
    lossfunc = extend(nn.CrossEntropyLoss())
    extensions = [tne.BatchGrad(), tne.DiagGGNExact(), tne.KFLR(), tne.BatchL2Grad()]

    def step():
        model.zero_grad()
        with backpack(*extensions):
            lossfunc(model(X), y).backward()

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o))

    step()
    before = live_tensors()
    for _ in range(5):
        step()
    assert live_tensors() <= before


# --- beyond stock BackPACK: independent references ------------------------------------


def reference_input_factor(module, x, approx):
    """KFAC input factor from F.pad + unfoldNd, groups averaged (curvlinops' way)."""
    from tests.cases import Case, reference_unfold

    case = Case(
        "ref",
        x.dim() - 2,
        module.kernel_size,
        module.stride,
        module.padding,
        module.dilation,
        module.groups,
        module.padding_mode,
        input_size=tuple(x.shape[2:]),
    )
    u = reference_unfold(case, x)  # [N, C_in·K, O]
    u = u.reshape(u.shape[0], module.groups, -1, u.shape[-1]).mean(1)
    if approx == "reduce":
        u = u.mean(-1, keepdim=True)
    return torch.einsum("nio,njo->ij", u, u) / x.shape[0]


def conv_inputs(model, X):
    inputs = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o: inputs.__setitem__(m, i[0].detach()))
        for m in model.modules()
        if isinstance(m, tuple(CONV.values()))
    ]
    model(X)
    for h in hooks:
        h.remove()
    return inputs


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("dims", [1, 2, 3], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize(
    "arch,padding_mode",
    [("grouped", "zeros"), ("k3s2d2-k1", "zeros"), ("k3s2d2-k1", "circular")],
    ids=["grouped", "dense", "circular"],
)
def test_kflr_factors_vs_independent_reference(arch, padding_mode, dims, approx):
    """KFLR = [B, A]: A from F.pad + unfoldNd; B = Σ s̄ s̄ᵀ is the exact GGN block of
    the layer's bias (s̄ = bias Jacobianᵀ × square root), from curvlinops' dense GGN."""
    X, y = make_data(dims, 3, "ce-mean")
    layers = ARCHITECTURES[arch]
    model = make_model(dims, layers, padding_mode=padding_mode)
    ggn = dense_ggn(model, nn.CrossEntropyLoss(), X, y)  # before BackPACK touches it
    params = list(model.parameters())
    offsets = dict(
        zip(
            map(id, params),
            torch.tensor([0] + [p.numel() for p in params]).cumsum(0).tolist(),
        )
    )
    inputs = conv_inputs(model, X)
    ours = make_model(dims, layers, padding_mode=padding_mode)
    run(ours, nn.CrossEntropyLoss(), X, y, tne.KFLR(kfac_approx=approx))
    for m_ref, m in zip(
        inputs, [m for m in ours.modules() if m.__class__ in CONV.values()]
    ):
        start = offsets[id(m_ref.bias)]
        B_ref = ggn[
            start : start + m_ref.bias.numel(), start : start + m_ref.bias.numel()
        ]
        B, A = m.weight.kflr
        torch.testing.assert_close(B, B_ref, rtol=1e-10, atol=1e-13)
        A_ref = reference_input_factor(m, inputs[m_ref], approx)
        torch.testing.assert_close(A, A_ref, rtol=1e-10, atol=1e-13)
        (B_bias,) = m.bias.kflr
        torch.testing.assert_close(B_bias, B_ref, rtol=1e-10, atol=1e-13)


def dense_ggn(model, lossfunc, X, y):
    """The exact GGN matrix from curvlinops (independent of BackPACK and TNs)."""
    from curvlinops import GGNLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    G = GGNLinearOperator(model, lossfunc, params, [(X, y)], check_deterministic=False)
    dim = sum(p.numel() for p in params)
    return G @ torch.eye(dim, dtype=torch.float64)


def dense_ggn_diagonal(model, lossfunc, X, y):
    """Exact GGN diagonal, per parameter, from :func:`dense_ggn`."""
    params = [p for p in model.parameters() if p.requires_grad]
    diag = dense_ggn(model, lossfunc, X, y).diagonal()
    return list(diag.split([p.numel() for p in params]))


BEYOND = {
    "same": ([(6, 3, 1, "same", 2, 1, True), (4, 2, 1, "same", 1, 2, True)], "zeros"),
    "reflect": (ARCHITECTURES["k3p1-k2s2"], "reflect"),
    "replicate": ([(6, 3, 2, 2, 1, 2, True), (4, 3, 1, 1, 1, 1, True)], "replicate"),
    "circular-same": ([(6, 2, 1, "same", 1, 1, True)], "circular"),
}


@pytest.mark.parametrize("dims", [1, 2, 3], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("config", list(BEYOND))
def test_beyond_backpack_vs_independent_references(config, dims):
    """'same' padding and non-zero padding modes, where stock BackPACK is wrong."""
    layers, mode = BEYOND[config]
    X, y = make_data(dims, 3, "ce-mean")
    lossfunc = nn.CrossEntropyLoss()
    # first order: autograd loops
    expected = autograd_per_sample(
        make_model(dims, layers, padding_mode=mode), lossfunc, X, y
    )
    grads = run(
        make_model(dims, layers, padding_mode=mode), lossfunc, X, y, tne.BatchGrad()
    )
    assert_fields_equal(grads, expected)
    l2 = run(
        make_model(dims, layers, padding_mode=mode), lossfunc, X, y, tne.BatchL2Grad()
    )
    assert_fields_equal(l2, [g.flatten(1).pow(2).sum(1) for g in expected])
    # second order: the dense GGN (also checks backpropagation through the TN Jacobians)
    reference = dense_ggn_diagonal(
        make_model(dims, layers, padding_mode=mode), nn.CrossEntropyLoss(), X, y
    )
    model = make_model(dims, layers, padding_mode=mode)
    diag = run(model, lossfunc, X, y, tne.DiagGGNExact())
    assert_fields_equal([d.flatten() for d in diag], reference)
    # the exact square root reproduces the same diagonal
    sqrt = run(
        make_model(dims, layers, padding_mode=mode), lossfunc, X, y, tne.SqrtGGNExact()
    )
    assert_fields_equal([s.pow(2).sum((0, 1)).flatten() for s in sqrt], reference)
    # KFLR input factor: F.pad + unfoldNd
    model = make_model(dims, layers, padding_mode=mode)
    inputs = list(conv_inputs(model, X).values())
    run(model, lossfunc, X, y, tne.KFLR())
    convs = [m for m in model.modules() if m.__class__ in CONV.values()]
    for m, x in zip(convs, inputs):
        torch.testing.assert_close(
            m.weight.kflr[1],
            reference_input_factor(m, x, "expand"),
            rtol=1e-10,
            atol=1e-13,
        )


def test_stock_backpack_is_wrong_for_padding_modes():
    """Documents why the above is needed: stock BackPACK's BatchGrad is off."""
    layers, mode = BEYOND["reflect"]
    X, y = make_data(2, 3, "ce-mean")
    expected = autograd_per_sample(
        make_model(2, layers, padding_mode=mode), nn.CrossEntropyLoss(), X, y
    )
    stock = run(
        make_model(2, layers, padding_mode=mode),
        nn.CrossEntropyLoss(),
        X,
        y,
        bext.BatchGrad(),
    )
    assert not torch.allclose(stock[0], expected[0])
