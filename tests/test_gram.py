"""The block-triangular symmetric Gram against ``u uᵀ``, and the engine's use of it."""

from __future__ import annotations

import math
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from backpack_tn import functional as tnf
from backpack_tn.tn import make_geometry, networks
from backpack_tn.tn.evaluate import (
    force_strategy,
    get_memory_budget,
    gram_form,
    gram_recognition,
    halves_form,
    set_memory_budget,
)
from backpack_tn.tn.gram import MIN_BLOCK_ROWS, symmetric_gram
from backpack_tn.tn.network import Operand, TensorNetwork
from tests.cases import CASES, Case, grouped_unfold, kernel_numel
from tests.test_functional import close

evaluate_module = sys.modules["backpack_tn.tn.evaluate"]
gram_module = sys.modules["backpack_tn.tn.gram"]


@pytest.mark.parametrize(
    "batch, rows, inner, blocks",
    [
        (1, 10, 7, 1),
        (2, 10, 7, 3),  # rows not divisible by the blocks
        (3, 64, 5, 8),
        (1, 5, 40, 8),  # more blocks than rows fit: blocks of one row
        (2, 300, 20, None),  # the default block count
        (1, 0, 3, 2),  # no rows
    ],
    ids=["one-block", "uneven", "batched", "tiny-blocks", "default", "empty"],
)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
def test_symmetric_gram(batch, rows, inner, blocks, contiguous):
    u = torch.randn(batch, inner, rows, dtype=torch.float64).transpose(1, 2)
    if contiguous:
        u = u.contiguous()
    result, expected = symmetric_gram(u, blocks), u @ u.transpose(1, 2)
    if rows:
        close(result, expected)
    assert result.shape == expected.shape


def test_symmetric_gram_rejects_no_blocks():
    with pytest.raises(ValueError, match="positive"):
        symmetric_gram(torch.randn(1, 4, 3), blocks=0)


def _kfac_networks(geometry, approx: str, strategy: str) -> list:
    """The KFAC input-factor networks of one strategy."""
    return [
        net
        for net in networks("kfac_input", geometry, approx=approx)
        if net.strategy == strategy
    ]


def _count_grams(monkeypatch) -> list:
    """Record the matrix shape of every ``symmetric_gram`` call the engine makes."""
    grams = []

    def counted(matrix, blocks=None):
        grams.append(matrix.shape)
        return symmetric_gram(matrix, blocks)

    monkeypatch.setattr(evaluate_module, "symmetric_gram", counted)
    return grams


def _wide(case: Case) -> Case:
    """``case`` with enough input channels per group for ≥ 256 unfolded rows."""
    per_group = math.ceil(2 * MIN_BLOCK_ROWS / kernel_numel(case))
    return replace(case, c_in=case.groups * per_group, c_out=case.groups, batch=2)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("strategy", [None, "window", "pattern"])
def test_kfac_expand_as_a_gram_over_the_grid(case: Case, strategy, monkeypatch):
    """The engine evaluates the KFAC-expand network as a symmetric Gram where its
    form allows (window operands, 1×1 layers), with ≥ 256 rows in several blocks,
    whole batch or one sample per chunk; every other evaluation stays exact too."""
    case = _wide(case)
    x = case.input()
    u = grouped_unfold(case, x)  # [N, G, C/G·K, O]
    expected = torch.einsum("ngio,ngjo->gij", u, u) / x.shape[0]
    grams = _count_grams(monkeypatch)
    # blocks even for these short inner dimensions (the engine's rule: ≥ 256 columns)
    monkeypatch.setattr(gram_module, "MIN_INNER", 0)
    budget = get_memory_budget()
    try:
        for limit in (budget, 1):  # whole batch, one sample per chunk
            set_memory_budget(limit)
            with force_strategy(strategy):
                result = tnf.kfac_input_factor(
                    x, case.kernel_size, groups_mode="separate", **case.hyper
                )
            close(result, expected)
    finally:
        set_memory_budget(budget)
    if strategy == "window" and case.padding_mode == "zeros":
        assert grams and all(rows >= 2 * MIN_BLOCK_ROWS for _, rows, _ in grams)


def test_gram_form_only_for_gram_networks():
    geometry = make_geometry((8, 8), 3, 1, 1)
    for approx in ("expand", "reduce"):
        window = _kfac_networks(geometry, approx, "window")
        forms = [gram_form(net) for net in window]
        assert window and all(form is not None for form in forms)
        # KFAC-reduce: each operand sums its own output positions first
        assert all(bool(form[3]) == (approx == "reduce") for form in forms)
    for op, options in [("forward", {}), ("input_vjp", {}), ("batch_l2", {})]:
        for net in networks(op, geometry, **options):
            assert gram_form(net) is None, (op, net.equation)
    # pattern networks of KFAC-reduce have more than two operands
    for net in networks("kfac_input", geometry, approx="reduce"):
        if net.strategy == "pattern":
            assert gram_form(net) is None, net.equation


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("strategy", [None, "window", "pattern"])
def test_kfac_reduce_as_a_gram_of_summed_windows(case: Case, strategy, monkeypatch):
    """KFAC-reduce: where both operands are one window view (or strided view) of
    the input, its output positions are summed once and the rest is a Gram; the
    factor equals the unfold reference either way, with Gram recognition on or
    off."""
    x = case.input()
    u = grouped_unfold(case, x).mean(-1)  # [N, G, C/G·K]
    expected = torch.einsum("ngi,ngj->gij", u, u) / x.shape[0]
    grams = _count_grams(monkeypatch)
    for recognised in (True, False):
        with gram_recognition(recognised), force_strategy(strategy):
            result = tnf.kfac_input_factor(
                x,
                case.kernel_size,
                approx="reduce",
                groups_mode="separate",
                **case.hyper,
            )
        close(result, expected)
    if strategy == "window" and case.padding_mode == "zeros":
        # N samples are the inner dimension of the Gram, the patch the rows
        assert grams and all(shape[-1] == x.shape[0] for shape in grams)


def test_gram_recognition_can_be_switched_off():
    x = torch.randn(2, 32, 6, 6, dtype=torch.float64)
    u = F.unfold(x, 3, padding=1, stride=2)
    expected = torch.einsum("nio,njo->ij", u, u) / x.shape[0]
    with gram_recognition(False):
        close(tnf.kfac_input_factor(x, 3, stride=2, padding=1), expected)
    close(tnf.kfac_input_factor(x, 3, stride=2, padding=1), expected)


def test_halves_form_only_for_symmetric_networks():
    """Pattern networks of both KFAC factors are Gram matrices of their first half;
    no other operation's network is (the batch L2 Gram form squares a product of
    two different operands per side)."""
    geometry = make_geometry((8, 8), 3, 2, 1)
    for approx in ("expand", "reduce"):
        pattern = _kfac_networks(geometry, approx, "pattern")
        assert pattern and all(halves_form(net) is not None for net in pattern)
    for op, options in [
        ("forward", {}),
        ("input_vjp", {}),
        ("batch_l2", {}),
        ("weight_vjp", {"per_sample": True}),
        ("diag_ggn", {"per_sample": False}),
    ]:
        for net in networks(op, geometry, **options):
            assert halves_form(net) is None, (op, net.equation)
    # halves reading different patterns are not a Gram matrix
    (net,) = _kfac_networks(geometry, "expand", "pattern")
    other = make_geometry((8, 8), 3, 1, 1)
    (moved,) = _kfac_networks(other, "expand", "pattern")
    half = len(net.operands) // 2
    mixed = replace(net, operands=net.operands[:half] + moved.operands[half:])
    assert halves_form(mixed) is None


@pytest.mark.parametrize(
    "axes, output, recogniser",
    [
        # two axes of the first half onto one of the second: (Σx)²·Σx², not (Σx)⁴
        ((("n", "a"), ("n", "b"), ("n", "c"), ("n", "c")), ("n",), halves_form),
        (
            (("n", "r"), ("n", "a"), ("n", "s"), ("n", "s")),
            ("n", "r", "s"),
            halves_form,
        ),
        # a diagonal in one of the two operands
        ((("n", "a", "b"), ("n", "c", "c")), ("n",), gram_form),
    ],
    ids=["halves-merged-axes", "halves-rows", "gram-diagonal"],
)
def test_no_gram_without_a_renaming(axes, output, recogniser):
    """Networks whose sides are not renamings of each other are no Gram matrix, and
    the engine evaluates them exactly."""
    net = TensorNetwork(tuple(Operand("x", a) for a in axes), output)
    assert recogniser(net) is None
    x = torch.rand(3, *(4,) * (len(axes[0]) - 1), dtype=torch.float64)
    expected = torch.einsum(net.equation, *(x,) * len(axes))  # diagonals included
    close(evaluate_module._run_einsum(net, {"x": x}), expected)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_pattern_networks_as_the_gram_of_a_half(case: Case, approx, monkeypatch):
    """The pattern network of a KFAC factor contracts one half (the unfolded or
    averaged input) and takes its symmetric Gram: the same factor as unfold, whole
    batch or in chunks, and as with Gram recognition off."""
    x = case.input()
    u = grouped_unfold(case, x)  # [N, G, C/G·K, O]
    if approx == "reduce":
        u = u.mean(-1, keepdim=True)
    expected = torch.einsum("ngio,ngjo->gij", u, u) / x.shape[0]
    halves = []

    def counted(form, operands):
        halves.append(form)
        return halves_gram(form, operands)

    halves_gram = evaluate_module._halves_gram
    monkeypatch.setattr(evaluate_module, "_halves_gram", counted)
    budget = get_memory_budget()
    used = []  # per evaluation: whether the halves Gram ran
    try:
        # whole batch (the prepared contraction), one sample per chunk (the
        # chunked executor), recognition off
        for limit, recognised in ((budget, True), (1, True), (budget, False)):
            set_memory_budget(limit)
            before = len(halves)
            with gram_recognition(recognised), force_strategy("pattern"):
                result = tnf.kfac_input_factor(
                    x,
                    case.kernel_size,
                    approx=approx,
                    groups_mode="separate",
                    **case.hyper,
                )
            close(result, expected)
            used.append(len(halves) > before)
    finally:
        set_memory_budget(budget)
    patterns = _kfac_networks(case.geometry(), approx, "pattern")
    # used on both paths wherever a pattern network has halves (1×1 layers have two
    # operands: gram_form's case)
    has_halves = any(halves_form(net) is not None for net in patterns)
    assert used == [has_halves, has_halves, False]
