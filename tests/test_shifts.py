"""The shift-structured and polyphase Grams (KFAC-expand) against the unfolded input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from unfoldNd import unfoldNd

from backpack_tn import functional as tnf
from backpack_tn.tn import make_geometry
from backpack_tn.tn.shifts import (
    polyphase_gram,
    polyphase_products,
    shift_gram,
    supports_polyphase_gram,
    supports_shift_gram,
)
from tests.cases import CASES, Case, grouped_unfold
from tests.test_functional import close

SIZES = {1: (11,), 2: (9, 7), 3: (6, 5, 4)}
# (kernel, padding, dilation): every tap pair's window cut differently at the borders
GEOMETRIES = [
    (3, 1, 1),
    (3, 0, 1),
    (5, 2, 1),
    (3, 2, 2),  # dilated
    (2, 0, 1),  # even kernel
    (4, "same", 1),  # uneven padding
    (3, "same", 2),
    (3, 3, 1),  # padding beyond K − 1: outputs that read only padding
    ((3, 1, 2), (1, 0, 1), 1),  # per-dimension kernels, some of size 1
]


def _reference(x: torch.Tensor, geometry) -> torch.Tensor:
    """``Σ_n Σ_o u uᵀ`` from an explicitly padded input and ``unfoldNd``."""
    batch, samples, channels, *size = x.shape
    pad = [p for d in reversed(geometry.dims) for p in (d.pad_left, d.pad_right)]
    padded = F.pad(x.reshape(batch * samples, channels, *size), pad)
    kernel = tuple(d.kernel_size for d in geometry.dims)
    dilation = tuple(d.dilation for d in geometry.dims)
    stride = tuple(d.stride for d in geometry.dims)
    u = unfoldNd(padded, kernel, dilation=dilation, stride=stride)
    u = u.reshape(batch, samples, *u.shape[1:])
    return torch.einsum("bnio,bnjo->bij", u, u)


def _grid(sizes, geometries, name):
    """``pytest.param(size, *geometry)`` for every size and fitting geometry."""
    for dims, size in sizes.items():
        for geometry in geometries:
            kernel = geometry[0]
            if isinstance(kernel, tuple) and len(kernel) != dims:
                continue
            yield pytest.param(size, *geometry, id=f"{dims}d-" + name(*geometry))


@pytest.mark.parametrize(
    "size, kernel, padding, dilation",
    _grid(SIZES, GEOMETRIES, lambda k, p, d: f"k{k}-p{p}-d{d}"),
)
def test_shift_gram_equals_unfolded_gram(size, kernel, padding, dilation):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, *size, dtype=torch.float64)  # 2 problems, 3 samples
    geometry = make_geometry(size, kernel, 1, padding, dilation, 1, "zeros")
    close(shift_gram(x, geometry), _reference(x, geometry))


def test_shift_gram_non_contiguous_input():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 9, 4, 8, dtype=torch.float64).transpose(2, 3)  # [1,3,4,9,8]
    geometry = make_geometry((9, 8), 3, 1, 1, 1, 1, "zeros")
    close(shift_gram(x, geometry), _reference(x.contiguous(), geometry))


@pytest.mark.parametrize(
    "stride, padding_mode, kernel",
    [(2, "zeros", 3), (1, "reflect", 3), (1, "zeros", 1)],
)
def test_shift_gram_refuses_what_it_cannot_do(stride, padding_mode, kernel):
    geometry = make_geometry((8, 8), kernel, stride, 1, 1, 1, padding_mode)
    assert not supports_shift_gram(geometry)
    with pytest.raises(ValueError, match="stride 1"):
        shift_gram(torch.zeros(1, 1, 1, 8, 8), geometry)


def _polyphase_offered(case: Case) -> bool:
    geometry = case.geometry()
    if not supports_polyphase_gram(geometry):
        return False
    poly, tn = polyphase_products(geometry, case.c_in // case.groups)
    return poly < tn


STRIDE_ONE = [c for c in CASES if supports_shift_gram(c.geometry())]
STRIDED = [c for c in CASES if _polyphase_offered(c)]
assert STRIDED  # the shared cases keep a strided 5×5 layer


@pytest.mark.parametrize("groups_mode", ["average", "separate"])
@pytest.mark.parametrize("case", STRIDE_ONE + STRIDED, ids=lambda c: c.id)
def test_kfac_expand_candidates_agree(case: Case, groups_mode, monkeypatch):
    """``kfac_input_factor`` measures the TN against the shift or polyphase Gram."""
    x = case.input()
    u = grouped_unfold(case, x)  # [N, G, C/G·K, O]
    if groups_mode == "average":
        u = u.mean(1, keepdim=True)
    expected = torch.einsum("ngio,ngjo->gij", u, u) / x.shape[0]
    if groups_mode == "average":
        expected = expected[0]
    seen = []

    def each(key, runs, device, choose=None):  # every candidate the engine would time
        results = [run() for run in runs]
        seen.append(len(results))
        for result in results[:-1]:  # same numbers (the TN's axes are unflattened)
            close(result.reshape(results[-1].shape), results[-1])
        return results[-1]  # the shift or polyphase Gram's result flows on

    monkeypatch.setattr(tnf, "fastest", each)
    result = tnf.kfac_input_factor(
        x, case.kernel_size, groups_mode=groups_mode, **case.hyper
    )
    assert seen == [2]  # the TN and the shift or polyphase Gram
    close(result, expected)


# --- strided convolutions: the polyphase Gram --------------------------------------

# (kernel, stride, padding, dilation); sizes below are not multiples of the strides
POLY_GEOMETRIES = [
    (7, 2, 3, 1),  # ResNet stem
    (11, 4, 2, 1),  # AlexNet stem
    (3, 2, 1, 1),
    (5, 3, 2, 1),
    (4, 2, 1, 1),  # even kernel
    (3, 2, 0, 2),  # dilation 2 = stride: every tap in one phase
    (5, 2, 4, 1),  # padding beyond the phase's kernel
    ((7, 3, 5), (2, 1, 3), (3, 1, 0), 1),  # per-dimension, one dimension stride 1
]
POLY_SIZES = {1: (23,), 2: (17, 14), 3: (11, 9, 10)}


@pytest.mark.parametrize(
    "size, kernel, stride, padding, dilation",
    _grid(POLY_SIZES, POLY_GEOMETRIES, lambda k, s, p, d: f"k{k}-s{s}-p{p}-d{d}"),
)
def test_polyphase_gram_equals_unfolded_gram(size, kernel, stride, padding, dilation):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 2, *size, dtype=torch.float64)  # 2 problems, 3 samples
    geometry = make_geometry(size, kernel, stride, padding, dilation, 1, "zeros")
    assert supports_polyphase_gram(geometry)
    close(polyphase_gram(x, geometry), _reference(x, geometry))


@pytest.mark.parametrize("groups_mode", ["average", "separate"])
def test_polyphase_candidate_on_a_grouped_stem(groups_mode, monkeypatch):
    """Groups make the polyphase Gram's input a non-contiguous ``[G, N, C/G, …]``."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 19, 16, dtype=torch.float64)
    u = unfoldNd(x, 7, stride=2, padding=3).reshape(3, 2, 2 * 49, -1)  # [N, G, ·, O]
    if groups_mode == "average":
        u = u.mean(1, keepdim=True)
    expected = torch.einsum("ngio,ngjo->gij", u, u) / 3
    names = []

    def each(key, runs, device, choose=None):
        results = [run() for run in runs]
        names.append(getattr(runs[-1], "func", runs[-1]).__name__)
        return results[-1]  # the polyphase Gram's result flows on

    monkeypatch.setattr(tnf, "fastest", each)
    result = tnf.kfac_input_factor(
        x, 7, stride=2, padding=3, groups=2, groups_mode=groups_mode
    )
    assert names[-1] == "polyphase_gram"
    close(result, expected[0] if groups_mode == "average" else expected)


@pytest.mark.parametrize(
    "kernel, stride, padding, padding_mode",
    [(7, 2, 3, "reflect"), (3, 1, 1, "zeros"), (4, 4, 0, "zeros"), (2, 3, 0, "zeros")],
    ids=["padding-mode", "stride-1", "kernel=stride", "kernel<stride"],
)
def test_polyphase_gram_refuses_what_it_cannot_do(
    kernel, stride, padding, padding_mode
):
    geometry = make_geometry((16, 16), kernel, stride, padding, 1, 1, padding_mode)
    assert not supports_polyphase_gram(geometry)
    with pytest.raises(ValueError, match="stride > 1"):
        polyphase_gram(torch.zeros(1, 1, 1, 16, 16), geometry)


def test_polyphase_offered_only_where_it_saves_products():
    stem = make_geometry((224, 224), 7, 2, 3, 1, 1, "zeros")
    poly, tn = polyphase_products(stem, 3)
    assert poly < tn / 2
    strided_3x3 = make_geometry((56, 56), 3, 2, 1, 1, 1, "zeros")
    poly, tn = polyphase_products(strided_3x3, 64)
    assert poly > tn  # 16 (phase, tap) rows per channel instead of 9

    seen = []

    def each(key, runs, device, choose=None):
        seen.append(len(runs))
        return runs[0]()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tnf, "fastest", each)
        tnf.kfac_input_factor(torch.randn(2, 3, 12, 12), 3, stride=2, padding=1)
        assert not seen  # the TN alone: nothing to measure
        tnf.kfac_input_factor(torch.randn(2, 3, 12, 12), 7, stride=2, padding=3)
        assert seen == [2]
