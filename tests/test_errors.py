"""Bad input gets a ``ValueError`` that names the offending argument."""

from __future__ import annotations

import pytest
import torch

from backpack_tn import functional as tnf

X = torch.randn(2, 4, 8, 8)
W = torch.randn(6, 4, 3, 3)
V = torch.randn(2, 6, 6, 6)

BAD = [
    (
        "groups-input",
        lambda: tnf.conv(X, torch.randn(6, 4, 3, 3), groups=3),
        "divisible by groups",
    ),
    (
        "groups-output",
        lambda: tnf.conv(X, torch.randn(5, 2, 3, 3), groups=2),
        "output channels",
    ),
    (
        "weight-channels",
        lambda: tnf.conv(X, torch.randn(6, 3, 3, 3)),
        r"weight.shape\[1\]",
    ),
    ("x-rank", lambda: tnf.conv(torch.randn(4, 8), W), "x must have shape"),
    (
        "weight-rank",
        lambda: tnf.conv(X, torch.randn(6, 4, 3)),
        "weight must have 4 dimensions",
    ),
    (
        "kernel-tuple",
        lambda: tnf.unfold(X, (3, 3, 3)),
        "kernel_size must have 2 entries",
    ),
    (
        "stride-tuple",
        lambda: tnf.unfold(X, 3, stride=(1,)),
        "stride must have 2 entries",
    ),
    (
        "padding-tuple",
        lambda: tnf.unfold(X, 3, padding=(1, 1, 1)),
        "padding must have 2 entries",
    ),
    (
        "dilation-tuple",
        lambda: tnf.unfold(X, 3, dilation=(1, 2, 1)),
        "dilation must have 2 entries",
    ),
    ("kernel-zero", lambda: tnf.unfold(X, 0), "kernel_size must be positive"),
    ("stride-zero", lambda: tnf.unfold(X, 3, stride=0), "stride must be positive"),
    (
        "dilation-negative",
        lambda: tnf.unfold(X, 3, dilation=-1),
        "dilation must be positive",
    ),
    (
        "padding-negative",
        lambda: tnf.unfold(X, 3, padding=-1),
        "padding must be non-negative",
    ),
    ("padding-string", lambda: tnf.unfold(X, 3, padding="full"), "padding must be"),
    ("same-strided", lambda: tnf.unfold(X, 3, stride=2, padding="same"), "stride > 1"),
    (
        "padding-mode",
        lambda: tnf.unfold(X, 3, padding=1, padding_mode="mirror"),
        "padding_mode",
    ),
    (
        "reflect-too-large",
        lambda: tnf.unfold(X, 3, padding=8, padding_mode="reflect"),
        "reflect",
    ),
    ("kernel-too-large", lambda: tnf.unfold(X, 9), "output would be empty"),
    (
        "groups-zero",
        lambda: tnf.kfac_input_factor(X, 3, groups=0),
        "groups must be a positive",
    ),
    (
        "approx",
        lambda: tnf.kfac_input_factor(X, 3, approx="full"),
        "approx must be one of",
    ),
    (
        "groups-mode",
        lambda: tnf.kfac_input_factor(X, 3, groups_mode="sum"),
        "groups_mode",
    ),
    (
        "grad-output-size",
        lambda: tnf.weight_vjp(X, torch.randn(2, 6, 5, 5), 3),
        "output size",
    ),
    (
        "grad-output-rank",
        lambda: tnf.weight_vjp(X, torch.randn(2, 6, 36), 3),
        "grad_output must have",
    ),
    (
        "grad-output-batch",
        lambda: tnf.weight_vjp(X, torch.randn(3, 6, 6, 6), 3),
        "batch size",
    ),
    ("S-rank", lambda: tnf.diag_ggn_weight(X, V, 3), "S must have 5 dimensions"),
    ("input-shape", lambda: tnf.input_vjp(V, W, (2, 4)), "input_shape"),
    ("input-vjp-out", lambda: tnf.input_vjp(V, W, (2, 4, 9, 9)), "output size"),
]


@pytest.mark.parametrize("call,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
