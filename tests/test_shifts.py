"""The shift-structured Gram (KFAC-expand for stride 1) against the unfolded input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from unfoldNd import unfoldNd

from backpack_tn import functional as tnf
from backpack_tn.tn import make_geometry
from backpack_tn.tn.shifts import shift_gram, supports_shift_gram
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
    u = unfoldNd(padded, kernel, dilation=dilation)
    u = u.reshape(batch, samples, *u.shape[1:])
    return torch.einsum("bnio,bnjo->bij", u, u)


def _cases():
    for dims, size in SIZES.items():
        for kernel, padding, dilation in GEOMETRIES:
            if isinstance(kernel, tuple) and len(kernel) != dims:
                continue
            yield pytest.param(
                dims,
                size,
                kernel,
                padding,
                dilation,
                id=f"{dims}d-k{kernel}-p{padding}-d{dilation}",
            )


@pytest.mark.parametrize("dims, size, kernel, padding, dilation", list(_cases()))
def test_shift_gram_equals_unfolded_gram(dims, size, kernel, padding, dilation):
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


STRIDE_ONE = [c for c in CASES if supports_shift_gram(c.geometry())]


@pytest.mark.parametrize("groups_mode", ["average", "separate"])
@pytest.mark.parametrize("case", STRIDE_ONE, ids=lambda c: c.id)
def test_kfac_expand_candidates_agree(case: Case, groups_mode, monkeypatch):
    """``kfac_input_factor`` measures the TN against the shift Gram: both are right."""
    x = case.input()
    u = grouped_unfold(case, x)  # [N, G, C/G·K, O]
    if groups_mode == "average":
        u = u.mean(1, keepdim=True)
    expected = torch.einsum("ngio,ngjo->gij", u, u) / x.shape[0]
    if groups_mode == "average":
        expected = expected[0]
    seen = []

    def each(key, runs, device):  # run every candidate the engine would time
        results = [run() for run in runs]
        seen.append(len(results))
        for result in results[:-1]:  # same numbers (the TN's axes are unflattened)
            close(result.reshape(results[-1].shape), results[-1])
        return results[-1]  # the shift Gram's result flows on

    monkeypatch.setattr(tnf, "fastest", each)
    result = tnf.kfac_input_factor(
        x, case.kernel_size, groups_mode=groups_mode, **case.hyper
    )
    assert seen == [2]  # the TN and the shift Gram
    close(result, expected)
