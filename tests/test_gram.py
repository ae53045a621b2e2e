"""The block-triangular symmetric Gram against ``u uᵀ``, and as a KFAC candidate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backpack_tn import functional as tnf
from backpack_tn.tn.gram import symmetric_gram
from tests.test_functional import close


@pytest.mark.parametrize(
    "batch, rows, inner, blocks",
    [
        (1, 10, 7, 1),
        (2, 10, 7, 3),  # rows not divisible by the blocks
        (3, 64, 5, 8),
        (1, 5, 40, 8),  # more blocks than rows fit: blocks of one row
        (2, 300, 20, None),  # the default block count
    ],
    ids=["one-block", "uneven", "batched", "tiny-blocks", "default"],
)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
def test_symmetric_gram(batch, rows, inner, blocks, contiguous):
    u = torch.randn(batch, inner, rows, dtype=torch.float64).transpose(1, 2)
    if contiguous:
        u = u.contiguous()
    close(symmetric_gram(u, blocks), u @ u.transpose(1, 2))


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
