"""The block-triangular symmetric Gram against ``u uᵀ``, and as a KFAC candidate."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from backpack_tn import functional as tnf
from backpack_tn.tn.gram import MIN_BLOCK_ROWS, symmetric_gram
from tests.cases import CASES, Case, grouped_unfold, kernel_numel
from tests.test_functional import close


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


@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
@pytest.mark.parametrize("groups_mode", ["average", "separate"])
def test_kfac_expand_candidates_agree_on_wide_layers(stride, groups_mode, monkeypatch):
    """With ≥ 256 unfolded rows the block-triangular Gram is a candidate: all agree."""
    x = torch.randn(3, 64, 7, 6, dtype=torch.float64)
    groups = 2
    u = F.unfold(x, 3, padding=1, stride=stride)  # [N, C·K, O]
    u = u.reshape(3, groups, -1, u.shape[-1])
    if groups_mode == "average":
        u = u.mean(1, keepdim=True)
    expected = torch.einsum("ngio,ngjo->gij", u, u) / x.shape[0]
    if groups_mode == "average":
        expected = expected[0]
    seen = []

    def each(key, runs, device):  # run every candidate the engine would time
        results = [run() for run in runs]
        seen.append(len(results))
        for result in results[1:]:
            close(result, results[0].reshape(result.shape))
        return results[1]  # the block-triangular Gram's result flows on

    monkeypatch.setattr(tnf, "fastest", each)
    result = tnf.kfac_input_factor(
        x, 3, stride=stride, padding=1, groups=groups, groups_mode=groups_mode
    )
    assert seen == [3 if stride == 1 else 2]  # TN, symmetric Gram (, shift Gram)
    close(result, expected)


def _wide(case: Case) -> Case:
    """``case`` with enough input channels per group for ≥ 256 unfolded rows."""
    per_group = math.ceil(2 * MIN_BLOCK_ROWS / kernel_numel(case))
    return replace(case, c_in=case.groups * per_group, c_out=case.groups, batch=2)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_block_triangular_candidate_over_the_grid(case: Case, monkeypatch):
    """Every padding mode, dimension, dilation, group count; within a memory budget
    that forces one sample per chunk, too."""
    from backpack_tn.tn.evaluate import get_memory_budget, set_memory_budget

    case = _wide(case)
    x = case.input()
    u = grouped_unfold(case, x)  # [N, G, C/G·K, O]
    expected = torch.einsum("ngio,ngjo->gij", u, u)
    geometry, grouped = tnf._kfac_input(
        x, case.kernel_size, *case.hyper.values(), "separate"
    )
    budget = get_memory_budget()
    try:
        for limit in (budget, 1):  # the whole batch at once, one sample at a time
            set_memory_budget(limit)
            runs = tnf._kfac_runs(grouped, geometry, "expand", True)
            close(runs["block-triangular"](), expected)
    finally:
        set_memory_budget(budget)
