"""TN KFAC/EKFAC operators and the data-set GGN diagonal vs independent references.

References: curvlinops' own operators on ``Linear``/``Conv2d`` models; for what
curvlinops cannot take (``Conv1d``/``Conv3d``, padding modes, uneven ``'same'``) an
equivalent ``Conv2d`` twin model that curvlinops handles (singleton dimensions,
explicit padding modules); brute-force per-example gradients from autograd for EKFAC's
eigenvalue correction; curvlinops' dense GGN for the diagonal.

Factors must be full rank for an EKFAC comparison: in a degenerate eigenspace the
eigenbasis (and hence the corrected eigenvalues) is arbitrary, so two correct
implementations may differ there. The data sets below are large enough.
"""

from __future__ import annotations

import itertools

import curvlinops
import pytest
import torch
import torch.nn.functional as F
from backpack import backpack, extend
from backpack import extensions as bext
from torch import nn

import backpack_tn
from backpack_tn.linops import (
    DiagGGNLinearOperator,
    EKFACLinearOperator,
    KFACLinearOperator,
    install_curvlinops,
    uninstall_curvlinops,
)

DTYPE = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)
FISHER_TYPES = ["type-2", "mc", "empirical", "forward-only"]


def dense(op) -> torch.Tensor:
    return op @ torch.eye(op.shape[1], dtype=DTYPE)


def loader(input_shape, classes=4, batches=3, batch_size=12, seed=0, target="class"):
    gen = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(batches):
        X = torch.randn(batch_size, *input_shape, generator=gen, dtype=DTYPE)
        if target == "class":
            y = torch.randint(0, classes, (batch_size,), generator=gen)
        elif target == "binary":
            y = torch.randint(0, 2, (batch_size, classes), generator=gen).to(DTYPE)
        else:
            y = torch.randn(batch_size, classes, generator=gen, dtype=DTYPE)
        data.append((X, y))
    return data


def conv2d_net(groups: int = 2) -> nn.Module:
    """Linear/Conv2d CNN with stride, padding and a grouped convolution."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, stride=2),
        nn.Sigmoid(),
        nn.Conv2d(4, 4, 3, groups=groups, padding=1),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 4),
    ).to(DTYPE)


def build(cls, model, loss, data, **kwargs):
    kwargs.setdefault("check_deterministic", False)
    return cls(model, loss, list(model.parameters()), data, **kwargs)


GRID = list(
    itertools.product(
        FISHER_TYPES, ["expand", "reduce"], [True, False], ["mean", "sum"]
    )
)
GRID_IDS = [f"{f}-{a}-{'sep' if s else 'joint'}-{r}" for f, a, s, r in GRID]


@pytest.mark.parametrize("fisher, approx, separate, reduction", GRID, ids=GRID_IDS)
def test_kfac_equals_curvlinops_on_conv2d(fisher, approx, separate, reduction):
    model, data = conv2d_net(), loader((2, 8, 8))
    loss = nn.CrossEntropyLoss(reduction=reduction)
    kw = dict(fisher_type=fisher, kfac_approx=approx, separate_weight_and_bias=separate)
    ours = build(KFACLinearOperator, model, loss, data, **kw)
    ref = build(curvlinops.KFACLinearOperator, model, loss, data, **kw)
    torch.testing.assert_close(dense(ours), dense(ref), **TOL)


EKFAC_GRID = [g for g in GRID if g[0] != "forward-only"]
EKFAC_IDS = [i for g, i in zip(GRID, GRID_IDS) if g[0] != "forward-only"]


@pytest.mark.parametrize(
    "fisher, approx, separate, reduction", EKFAC_GRID, ids=EKFAC_IDS
)
def test_ekfac_equals_curvlinops_on_conv2d(fisher, approx, separate, reduction):
    model, data = conv2d_net(), loader((2, 8, 8), batch_size=24)
    loss = nn.CrossEntropyLoss(reduction=reduction)
    kw = dict(fisher_type=fisher, kfac_approx=approx, separate_weight_and_bias=separate)
    ours = build(EKFACLinearOperator, model, loss, data, **kw)
    ref = build(curvlinops.EKFACLinearOperator, model, loss, data, **kw)
    torch.testing.assert_close(dense(ours), dense(ref), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(
    "loss, target", [(nn.MSELoss(), "regression"), (nn.BCEWithLogitsLoss(), "binary")]
)
@pytest.mark.parametrize("cls", ["KFAC", "EKFAC"])
def test_other_losses_equal_curvlinops(cls, loss, target):
    model, data = conv2d_net(groups=1), loader((2, 8, 8), target=target)
    ours_cls, ref_cls = {
        "KFAC": (KFACLinearOperator, curvlinops.KFACLinearOperator),
        "EKFAC": (EKFACLinearOperator, curvlinops.EKFACLinearOperator),
    }[cls]
    kw = dict(fisher_type="type-2")
    ours, ref = (
        build(ours_cls, model, loss, data, **kw),
        build(ref_cls, model, loss, data, **kw),
    )
    torch.testing.assert_close(dense(ours), dense(ref), rtol=1e-8, atol=1e-12)


def test_properties_and_inverse_like_curvlinops():
    # enough data for full-rank factors: det/logdet are finite
    # (MSE: cross-entropy's gradient covariance is singular, softmax sums to one)
    model = conv2d_net()
    data = loader((2, 8, 8), batch_size=40, target="regression")
    loss = nn.MSELoss()
    ours = build(KFACLinearOperator, model, loss, data, fisher_type="type-2")
    ref = build(curvlinops.KFACLinearOperator, model, loss, data, fisher_type="type-2")
    for name in ["trace", "det", "logdet", "frobenius_norm"]:
        assert torch.isfinite(getattr(ref, name))
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), **TOL)
    v = [torch.randn_like(p) for p in model.parameters()]
    inv_ours = curvlinops.KFACInverseLinearOperator(ours, damping=1e-3)
    inv_ref = curvlinops.KFACInverseLinearOperator(ref, damping=1e-3)
    for a, b in zip(inv_ours @ v, inv_ref @ v):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # scipy export and state_dict round trip
    x = torch.randn(ours.shape[1], dtype=DTYPE)
    torch.testing.assert_close(
        torch.from_numpy(ours.to_scipy() @ x.numpy()), dense(ref) @ x, **TOL
    )
    fresh = build(KFACLinearOperator, model, loss, data, fisher_type="type-2")
    fresh.load_state_dict(ours.state_dict())
    torch.testing.assert_close(dense(fresh), dense(ref), **TOL)


# ---------------------------------------------------------------------------------
# Conv1d / Conv3d / padding modes / uneven 'same' against curvlinops on Conv2d twins
# ---------------------------------------------------------------------------------


class Reshape(nn.Module):
    def __init__(self, *shape):
        super().__init__()
        self.shape = shape

    def forward(self, x):
        return x.reshape(x.shape[0], *self.shape)


class Pad(nn.Module):
    def __init__(self, pad, mode):
        super().__init__()
        self.pad, self.mode = pad, mode

    def forward(self, x):
        return F.pad(x, self.pad, mode=self.mode)


def twin_pair(kind: str):
    """(model, Conv2d twin with the same parameters, input shape) for a case."""
    torch.manual_seed(2)
    if kind == "conv1d":
        conv = nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2)
        twin = nn.Conv2d(3, 4, (1, 3), stride=(1, 2), padding=(0, 2), dilation=(1, 2))
        twin.weight.data = conv.weight.data.unsqueeze(2)
        twin.bias.data = conv.bias.data
        head = [nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 6, 3)]
        model = nn.Sequential(conv, *head)
        twin_model = nn.Sequential(Reshape(3, 1, 11), twin, *head)
        return model, twin_model, (3, 11)
    if kind == "conv3d":
        conv = nn.Conv3d(3, 4, (1, 3, 2), padding=(0, 1, 0), groups=1)
        twin = nn.Conv2d(3, 4, (3, 2), padding=(1, 0))
        twin.weight.data = conv.weight.data.squeeze(2)
        twin.bias.data = conv.bias.data
        head = [nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 5 * 4, 3)]
        model = nn.Sequential(conv, *head)
        twin_model = nn.Sequential(Reshape(3, 5, 5), twin, *head)
        return model, twin_model, (3, 1, 5, 5)
    if kind in ("reflect", "replicate", "circular"):
        conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode=kind, stride=2)
        twin = nn.Conv2d(3, 4, 3, stride=2)
        pad = Pad((1, 1, 1, 1), kind)
    elif kind == "same-uneven":
        conv = nn.Conv2d(3, 4, (4, 2), padding="same", dilation=(1, 2))
        twin = nn.Conv2d(3, 4, (4, 2), dilation=(1, 2))
        pad = Pad((1, 1, 1, 2), "constant")  # torch: the extra row goes right
    else:
        raise ValueError(kind)
    twin.weight.data, twin.bias.data = conv.weight.data, conv.bias.data
    # odd size: with 6, circular padding makes two taps' averaged patches equal
    # (a degenerate KFAC-reduce factor, whose EKFAC eigenbasis is arbitrary)
    out = conv(torch.zeros(1, 3, 7, 7)).shape[1:].numel()
    head = [nn.Sigmoid(), nn.Flatten(), nn.Linear(out, 3)]
    return nn.Sequential(conv, *head), nn.Sequential(pad, twin, *head), (3, 7, 7)


TWINS = ["conv1d", "conv3d", "reflect", "replicate", "circular", "same-uneven"]


@pytest.mark.parametrize("separate", [True, False], ids=["sep", "joint"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("cls", ["KFAC", "EKFAC"])
@pytest.mark.parametrize("kind", TWINS)
def test_beyond_curvlinops_equals_conv2d_twin(kind, cls, approx, separate):
    model, twin, shape = twin_pair(kind)
    model, twin = model.to(DTYPE), twin.to(DTYPE)
    data = loader(shape, classes=3, batch_size=40)
    loss = nn.CrossEntropyLoss()
    kw = dict(
        fisher_type="type-2", kfac_approx=approx, separate_weight_and_bias=separate
    )
    ours_cls, ref_cls = {
        "KFAC": (KFACLinearOperator, curvlinops.KFACLinearOperator),
        "EKFAC": (EKFACLinearOperator, curvlinops.EKFACLinearOperator),
    }[cls]
    ours = build(ours_cls, model, loss, data, **kw)
    ref = build(ref_cls, twin, loss, data, **kw)
    torch.testing.assert_close(dense(ours), dense(ref), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kind", ["conv1d", "same-uneven"])
def test_curvlinops_refuses_or_is_wrong_where_we_are_not(kind):
    """Document why the twins are needed: stock curvlinops cannot be the reference."""
    model, _, shape = twin_pair(kind)
    data = loader(shape, classes=3)
    with pytest.raises((NotImplementedError, RuntimeError)):
        op = build(
            curvlinops.KFACLinearOperator, model.to(DTYPE), nn.CrossEntropyLoss(), data
        )
        dense(op)


def test_stock_curvlinops_silently_wrong_for_padding_mode():
    model, twin, shape = twin_pair("reflect")
    model, twin = model.to(DTYPE), twin.to(DTYPE)
    data, loss = loader(shape, classes=3), nn.CrossEntropyLoss()
    kw = dict(fisher_type="type-2")
    stock = dense(build(curvlinops.KFACLinearOperator, model, loss, data, **kw))
    truth = dense(build(curvlinops.KFACLinearOperator, twin, loss, data, **kw))
    assert not torch.allclose(stock, truth, rtol=1e-3)
    ours = dense(build(KFACLinearOperator, model, loss, data, **kw))
    torch.testing.assert_close(ours, truth, **TOL)


# ---------------------------------------------------------------------------------
# EKFAC eigenvalue correction against brute-force per-example gradients
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("separate", [True, False], ids=["sep", "joint"])
@pytest.mark.parametrize("dims", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_ekfac_correction_equals_per_example_gradients(dims, separate):
    torch.manual_seed(3)
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    size = {1: (9,), 2: (6, 5), 3: (4, 4, 3)}[dims]
    conv = conv_cls(2, 3, 2, padding=1, stride=2, padding_mode="replicate")
    out = conv(torch.zeros(1, 2, *size)).shape[1:].numel()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(out, 3)).to(DTYPE)
    data = loader((2, *size), classes=3, batches=2, batch_size=6)
    loss = nn.CrossEntropyLoss(reduction="sum")
    op = build(
        EKFACLinearOperator,
        model,
        loss,
        data,
        fisher_type="empirical",
        separate_weight_and_bias=separate,
    )
    op._maybe_compute_ekfac()
    q_in = op._input_covariances_eigenvectors["0"]
    q_out = op._gradient_covariances_eigenvectors["0"]

    # per-example gradients of the summed loss, one example at a time
    grads_w, grads_b = [], []
    for X, y in data:
        for n in range(X.shape[0]):
            value = loss(model(X[n : n + 1]), y[n : n + 1])
            gw, gb = torch.autograd.grad(value, [conv.weight, conv.bias])
            grads_w.append(gw.flatten(1))
            grads_b.append(gb)
    gw, gb = torch.stack(grads_w), torch.stack(grads_b)
    corrected = op._corrected_eigenvalues["0"]
    if separate:
        ref_w = torch.einsum("ia,nij,jb->nab", q_out, gw, q_in).square().sum(0)
        ref_b = (gb @ q_out).square().sum(0)
        torch.testing.assert_close(corrected[0], ref_w, **TOL)
        torch.testing.assert_close(corrected[1], ref_b, **TOL)
    else:
        joint = torch.cat([gw, gb.unsqueeze(-1)], dim=-1)
        ref = torch.einsum("ia,nij,jb->nab", q_out, joint, q_in).square().sum(0)
        torch.testing.assert_close(corrected, ref, **TOL)


def test_ekfac_chunking_keeps_result():
    from backpack_tn.tn.evaluate import get_memory_budget, set_memory_budget

    model, data = conv2d_net(), loader((2, 8, 8), batch_size=24)
    loss = nn.CrossEntropyLoss()
    whole = dense(build(EKFACLinearOperator, model, loss, data, fisher_type="type-2"))
    budget = get_memory_budget()
    set_memory_budget(2_000)  # forces one example per chunk
    try:
        chunked = dense(
            build(EKFACLinearOperator, model, loss, data, fisher_type="type-2")
        )
    finally:
        set_memory_budget(budget)
    torch.testing.assert_close(chunked, whole, **TOL)


def test_ekfac_default_chunks_keep_result(monkeypatch):
    """Per-example gradients are chunked by a byte cap, whatever the budget."""
    from backpack_tn.linops import kfac as linops_kfac

    model, data = conv2d_net(), loader((2, 8, 8), batch_size=24)
    loss = nn.CrossEntropyLoss()
    whole = dense(build(EKFACLinearOperator, model, loss, data, fisher_type="type-2"))
    sizes = []
    chunks = linops_kfac._chunks

    def recording(batch_size, bytes_per_example):
        parts = list(chunks(batch_size, bytes_per_example))
        sizes.append(len(parts))
        return parts

    monkeypatch.setattr(linops_kfac, "DEFAULT_CORRECTION_BYTES", 1)  # one example
    monkeypatch.setattr(linops_kfac, "_chunks", recording)
    chunked = dense(build(EKFACLinearOperator, model, loss, data, fisher_type="type-2"))
    assert sizes and all(n == 24 for n in sizes)
    torch.testing.assert_close(chunked, whole, **TOL)


@pytest.mark.parametrize("strategy", [None, "pattern"], ids=["auto", "pattern"])
def test_no_patch_extraction(strategy, monkeypatch):
    """Never curvlinops' unfold-based extractors; with patterns, no unfold at all.

    (The engine's window strategy may build the patches in GEMM layout with torch's
    im2col where autotuning measures it faster, so ``F.unfold`` is only forbidden
    when the pattern strategy is pinned.)
    """
    from backpack_tn.tn.evaluate import force_strategy

    def forbidden(*args, **kwargs):
        raise AssertionError("unfold-based patch extraction was called")

    monkeypatch.setattr(curvlinops.kfac, "extract_patches", forbidden)
    monkeypatch.setattr(curvlinops.kfac, "extract_averaged_patches", forbidden)
    monkeypatch.setattr(curvlinops.ekfac, "extract_patches", forbidden)
    if strategy == "pattern":
        monkeypatch.setattr(F, "unfold", forbidden)
    model, data = conv2d_net(), loader((2, 8, 8))
    with force_strategy(strategy):
        for approx in ["expand", "reduce"]:
            op = build(
                EKFACLinearOperator,
                model,
                nn.CrossEntropyLoss(),
                data,
                kfac_approx=approx,
            )
            dense(op)


def test_unsupported_layer_raises_like_curvlinops():
    model = nn.Sequential(nn.ConvTranspose2d(2, 3, 3), nn.Flatten(), nn.Linear(300, 3))
    data = loader((2, 8, 8), classes=3)
    with pytest.raises(NotImplementedError, match="un-supported layers"):
        build(KFACLinearOperator, model.to(DTYPE), nn.CrossEntropyLoss(), data)
    with pytest.raises(ValueError, match="fisher_type"):
        build(
            KFACLinearOperator,
            conv2d_net(),
            nn.CrossEntropyLoss(),
            data,
            fisher_type="x",
        )


# ---------------------------------------------------------------------------------
# install(): curvlinops' own classes use the TN statistics
# ---------------------------------------------------------------------------------


# --- the backward pass differentiates w.r.t. the layer outputs only ---------------


class ResidualBlock(nn.Module):
    """Conv, in-place ReLU, conv, in-place residual add: the edges must survive."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        out += x
        return self.relu(out)


def residual_net() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(inplace=True),
        ResidualBlock(),
        nn.Flatten(),
        nn.Linear(3 * 6 * 6, 4),
    ).to(DTYPE)


def weight_gradients_seen(model: nn.Module, run) -> int:
    """How many parameter gradients autograd computes while ``run()`` runs."""
    seen = []
    handles = [p.register_hook(lambda g: seen.append(1)) for p in model.parameters()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return len(seen)


BACKPROPAGATING = ["type-2", "mc", "empirical"]


@pytest.mark.parametrize("fisher", BACKPROPAGATING)
@pytest.mark.parametrize("cls", ["KFAC", "EKFAC"])
def test_no_parameter_gradients_and_same_factors(cls, fisher):
    model, data = residual_net(), loader((2, 6, 6), batch_size=30)
    loss = nn.CrossEntropyLoss()
    ours_cls, ref_cls = {
        "KFAC": (KFACLinearOperator, curvlinops.KFACLinearOperator),
        "EKFAC": (EKFACLinearOperator, curvlinops.EKFACLinearOperator),
    }[cls]
    ours = build(ours_cls, model, loss, data, fisher_type=fisher)
    ref = build(ref_cls, model, loss, data, fisher_type=fisher)
    torch.testing.assert_close(dense(ours), dense(ref), rtol=1e-8, atol=1e-12)

    recompute = {
        "KFAC": lambda op: op.compute_kronecker_factors,
        "EKFAC": lambda op: op.compute_eigenvalue_correction,
    }[cls]
    # the stock operator pays a gradient for every parameter, per batch and backward
    assert weight_gradients_seen(model, recompute(ref)) > 0
    assert weight_gradients_seen(model, recompute(ours)) == 0
    model(data[0][0])  # outside a factor computation, no edge is recorded
    assert ours.__dict__.get("_tn_output_edges") is None


def test_only_the_deepest_output_edges_are_differentiated():
    """The backward pass asks for the edges nothing recorded lies below of."""
    from torch.autograd.graph import get_gradient_edge

    from backpack_tn.linops.kfac import _frontier

    torch.manual_seed(5)
    model = residual_net()
    stray = get_gradient_edge(model[0](torch.randn(1, 2, 6, 6, dtype=DTYPE)))
    edges = []  # taken in the hooks: before in-place ReLUs re-bind the outputs
    hooks = [
        m.register_forward_hook(lambda m, i, o: edges.append(get_gradient_edge(o)))
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    output = model(torch.randn(3, 2, 6, 6, dtype=DTYPE))
    for hook in hooks:
        hook.remove()
    assert len(edges) == 4
    assert all(type(e.node).__name__.startswith("Convolution") for e in edges[:3])
    kept = _frontier([stray] + edges, output.grad_fn)  # stray: another graph
    assert [edge.node for edge in kept] == [edges[0].node]  # the first convolution


def test_ekfac_correction_that_computes_its_factors_first():
    """A factor computation nested in the correction leaves its edges recording."""
    model, data = residual_net(), loader((2, 6, 6), batch_size=30)
    loss = nn.CrossEntropyLoss()
    kw = dict(fisher_type="empirical")
    ours = build(EKFACLinearOperator, model, loss, data, **kw)
    reference = dense(build(curvlinops.EKFACLinearOperator, model, loss, data, **kw))
    # forget everything (curvlinops' attributes): the correction computes the factors
    ours._input_covariances.clear()
    ours._gradient_covariances.clear()
    ours._input_covariances_eigenvectors.clear()
    ours._gradient_covariances_eigenvectors.clear()
    ours._corrected_eigenvalues.clear()
    # factors and correction both backpropagate without parameter gradients
    assert weight_gradients_seen(model, ours.compute_eigenvalue_correction) == 0
    torch.testing.assert_close(dense(ours), reference, rtol=1e-8, atol=1e-12)


class TwiceApplied(nn.Module):
    """One convolution applied twice; only one of its outputs reaches the loss."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.head = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        used, unused = self.conv(x), self.conv(2 * x)
        del unused
        return self.head(used.flatten(1))


@pytest.mark.parametrize("cls", ["KFAC", "EKFAC"])
def test_layer_output_that_misses_the_loss(cls):
    """The edge of an output that does not reach the loss is not differentiated."""
    torch.manual_seed(4)
    model, data = TwiceApplied().to(DTYPE), loader((2, 6, 6), batch_size=30)
    ours_cls, ref_cls = {
        "KFAC": (KFACLinearOperator, curvlinops.KFACLinearOperator),
        "EKFAC": (EKFACLinearOperator, curvlinops.EKFACLinearOperator),
    }[cls]
    loss = nn.CrossEntropyLoss()
    ours = build(ours_cls, model, loss, data, fisher_type="empirical")
    ref = build(ref_cls, model, loss, data, fisher_type="empirical")
    torch.testing.assert_close(dense(ours), dense(ref), rtol=1e-8, atol=1e-12)


def test_forward_only_fisher_unchanged():
    model, data = residual_net(), loader((2, 6, 6))
    kw = dict(fisher_type="forward-only")
    ours = build(KFACLinearOperator, model, nn.CrossEntropyLoss(), data, **kw)
    ref = build(curvlinops.KFACLinearOperator, model, nn.CrossEntropyLoss(), data, **kw)
    torch.testing.assert_close(dense(ours), dense(ref), **TOL)


class FailOnce(nn.Module):
    """Raises on its first call: a forward pass that never gets its backward."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("first call fails")
        return x


def test_failed_forward_leaves_no_stale_edges():
    data, loss = loader((2, 6, 6)), nn.CrossEntropyLoss()

    def failed_then_computed(cls):
        torch.manual_seed(3)
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3), FailOnce(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)
        ).to(DTYPE)
        op = build(cls, model, loss, data)
        with pytest.raises(RuntimeError, match="first call fails"):
            op.compute_kronecker_factors()
        # curvlinops leaves its hooks on the model after the exception; later
        # forward passes outside a factor computation must not record edges
        model(data[0][0])
        assert op.__dict__.get("_tn_output_edges") is None
        op.compute_kronecker_factors()  # a stale edge would not be in this graph
        return dense(op)

    torch.testing.assert_close(
        failed_then_computed(KFACLinearOperator),
        failed_then_computed(curvlinops.KFACLinearOperator),
        **TOL,
    )


@pytest.fixture
def restore_install():
    yield
    backpack_tn.uninstall()


@pytest.mark.parametrize("cls", ["KFAC", "EKFAC"])
def test_install_routes_curvlinops_classes(cls, restore_install):
    model, twin, shape = twin_pair("conv1d")
    model, twin = model.to(DTYPE), twin.to(DTYPE)
    data, loss = loader(shape, classes=3, batch_size=40), nn.CrossEntropyLoss()
    stock_cls = getattr(curvlinops, f"{cls}LinearOperator")
    reference = dense(build(stock_cls, twin, loss, data, fisher_type="type-2"))

    backpack_tn.install()
    assert backpack_tn.is_installed()
    op = build(stock_cls, model, loss, data, fisher_type="type-2")
    torch.testing.assert_close(dense(op), reference, rtol=1e-8, atol=1e-12)
    # curvlinops' own class differentiates w.r.t. the layer outputs only, too
    again = (
        op.compute_kronecker_factors
        if cls == "KFAC"
        else op.compute_eigenvalue_correction
    )
    assert weight_gradients_seen(model, again) == 0

    backpack_tn.uninstall()
    assert not backpack_tn.is_installed()
    with pytest.raises(NotImplementedError):
        build(stock_cls, model, loss, data, fisher_type="type-2")


def test_install_curvlinops_alone_and_padding_mode(restore_install):
    model, twin, shape = twin_pair("circular")
    model, twin = model.to(DTYPE), twin.to(DTYPE)
    data, loss = loader(shape, classes=3), nn.CrossEntropyLoss()
    reference = dense(build(curvlinops.KFACLinearOperator, twin, loss, data))
    install_curvlinops()
    try:
        routed = dense(build(curvlinops.KFACLinearOperator, model, loss, data))
    finally:
        uninstall_curvlinops()
    torch.testing.assert_close(routed, reference, **TOL)


# ---------------------------------------------------------------------------------
# DiagGGNLinearOperator
# ---------------------------------------------------------------------------------


def diag_models():
    torch.manual_seed(4)
    yield (
        "conv2d",
        nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, groups=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(48, 3),
        ),
        (2, 4, 4),
    )
    yield (
        "conv1d-same-reflect",
        nn.Sequential(
            nn.Conv1d(2, 4, 4, padding="same", padding_mode="reflect", groups=2),
            nn.Sigmoid(),
            nn.Flatten(),
            nn.Linear(4 * 7, 3),
        ),
        (2, 7),
    )
    yield (
        "conv3d",
        nn.Sequential(
            nn.Conv3d(2, 2, 2, stride=2, dilation=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(2 * 8, 3),
        ),
        (2, 4, 4, 4),
    )


DIAG_MODELS = list(diag_models())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "name, model, shape", DIAG_MODELS, ids=[m[0] for m in DIAG_MODELS]
)
def test_diag_ggn_equals_curvlinops_ggn_diagonal(name, model, shape, reduction):
    model = model.to(DTYPE)
    data = loader(shape, classes=3, batch_size=5)
    loss = nn.CrossEntropyLoss(reduction=reduction)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.full_like(p, 7.0)
    op = DiagGGNLinearOperator(model, loss, params, data)
    ggn = curvlinops.GGNLinearOperator(model, loss, params, data)
    reference = dense(ggn).diagonal()
    torch.testing.assert_close(dense(op), torch.diag(reference), **TOL)
    torch.testing.assert_close(op.trace, reference.sum(), **TOL)
    # the user's gradients are untouched and the model is not hooked by BackPACK
    assert all((p.grad == 7.0).all() for p in params)
    assert not any(m._forward_hooks for m in model.modules())
    # damped inverse
    v = [torch.randn_like(p) for p in params]
    for iv, d, x in zip(op.inverse(0.5) @ v, op.diagonal, v):
        torch.testing.assert_close(iv, x / (d + 0.5), **TOL)


def test_diag_ggn_mc_equals_backpack_with_same_seed():
    name, model, shape = DIAG_MODELS[0]
    model = model.to(DTYPE)
    data = loader(shape, classes=3, batches=1, batch_size=5)
    loss = nn.CrossEntropyLoss()
    params = list(model.parameters())
    op = DiagGGNLinearOperator(
        model, loss, params, data, mode="mc", mc_samples=3, seed=11
    )
    # reference: stock BackPACK on an extended copy, same seed, one batch
    import copy

    ref_model = extend(copy.deepcopy(model))
    ref_loss = extend(nn.CrossEntropyLoss())
    torch.manual_seed(11)
    with backpack(bext.DiagGGNMC(mc_samples=3)):
        ref_loss(ref_model(data[0][0]), data[0][1]).backward()
    for d, p in zip(op.diagonal, ref_model.parameters()):
        torch.testing.assert_close(d, p.diag_ggn_mc, **TOL)
    # the seed makes the operator deterministic
    again = DiagGGNLinearOperator(
        model, loss, params, data, mode="mc", mc_samples=3, seed=11
    )
    torch.testing.assert_close(dense(again), dense(op), **TOL)


def test_diag_ggn_errors():
    name, model, shape = DIAG_MODELS[0]
    data = loader(shape, classes=3)
    params = list(model.parameters())
    with pytest.raises(ValueError, match="mode"):
        DiagGGNLinearOperator(model, nn.CrossEntropyLoss(), params, data, mode="full")
    with pytest.raises(ValueError, match="mc_samples"):
        DiagGGNLinearOperator(model, nn.CrossEntropyLoss(), params, data, mc_samples=0)
    # BackPACK's own error for a layer it has no extension for
    unsupported = nn.Sequential(
        nn.Conv1d(2, 2, 2), nn.Flatten(), nn.Linear(6, 3), nn.LayerNorm(3)
    ).to(DTYPE)
    with pytest.raises(NotImplementedError, match="LayerNorm"):
        _ = DiagGGNLinearOperator(
            unsupported,
            nn.CrossEntropyLoss(),
            list(unsupported.parameters()),
            loader((2, 4), classes=3),
            check_deterministic=False,
        ).diagonal
