"""Bridges from BackPACK fields to curvlinops operators, against dense references."""

from __future__ import annotations

import pytest
import torch
from backpack import backpack, extend
from curvlinops import CGInverseLinearOperator
from torch import nn

import backpack_tn.extensions as tne
from backpack_tn.linops import DiagonalLinearOperator, KroneckerLinearOperator


def trained_fields(extension, dims: int = 2):
    torch.manual_seed(0)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    size = {1: (9,), 2: (7, 6), 3: (5, 4, 4)}[dims]
    model = nn.Sequential(
        conv(3, 4, 3, padding=1), nn.Sigmoid(), conv(4, 2, 2, stride=2), nn.Flatten()
    ).double()
    features = model(torch.zeros(1, 3, *size, dtype=torch.float64)).shape[1]
    model.append(nn.Linear(features, 3).double())
    model, lossfunc = extend(model), extend(nn.CrossEntropyLoss())
    X = torch.randn(4, 3, *size, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    with backpack(extension):
        lossfunc(model(X), y).backward()
    return list(model.parameters())


def dense(op) -> torch.Tensor:
    dim = sum(s.numel() for s in op._in_shape)
    return op @ torch.eye(dim, dtype=op.dtype)


def dense_kronecker(params, field):
    blocks = []
    for p in params:
        factors = getattr(p, field)
        block = factors[0]
        for f in factors[1:]:
            block = torch.kron(block, f)
        blocks.append(block)
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("dims", [1, 2, 3], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("field", ["kflr", "kfac"])
def test_kronecker_operator_matches_dense(field, dims):
    ext = tne.KFLR() if field == "kflr" else tne.KFAC(mc_samples=2)
    params = trained_fields(ext, dims)
    K = KroneckerLinearOperator.from_backpack(params, field)
    reference = dense_kronecker(params, field)
    torch.testing.assert_close(dense(K), reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(K.trace, reference.trace(), rtol=1e-10, atol=1e-12)
    # tensor-list format and SciPy export
    vec = [torch.randn_like(p) for p in params]
    out = K @ vec
    flat = reference @ torch.cat([v.flatten() for v in vec])
    torch.testing.assert_close(torch.cat([o.flatten() for o in out]), flat)
    scipy_out = K.to_scipy() @ torch.cat([v.flatten() for v in vec]).numpy()
    torch.testing.assert_close(torch.from_numpy(scipy_out), flat)
    # Lanczos (SciPy's eigsh on the exported operator): the top eigenvalues
    from scipy.sparse.linalg import eigsh

    top = eigsh(K.to_scipy(), k=3, which="LA", return_eigenvectors=False)
    expected_top = torch.linalg.eigvalsh(reference)[-3:]
    torch.testing.assert_close(torch.from_numpy(top).sort().values, expected_top)
    # exact damped inverse vs dense inverse, and vs curvlinops' CG
    damping = 1e-2
    inverse = torch.linalg.inv(
        reference + damping * torch.eye(len(reference), dtype=reference.dtype)
    )
    torch.testing.assert_close(dense(K.inverse(damping)), inverse, rtol=1e-8, atol=1e-8)
    # curvlinops' CG on K + λI (well conditioned with λ = 1) agrees with the inverse
    identity = DiagonalLinearOperator([torch.ones_like(p) for p in params])
    cg = CGInverseLinearOperator(K + 1.0 * identity, tolerance=1e-10, max_iter=500)
    b = torch.randn(len(reference), dtype=reference.dtype)
    # (GPyTorch's CG stops at a residual of ~1e-6 here: compare at that accuracy)
    expected = dense(K.inverse(1.0)) @ b
    assert (cg @ b - expected).norm() <= 1e-3 * expected.norm()


@pytest.mark.parametrize(
    "field", ["diag_ggn_exact", "diag_ggn_mc", "diag_h", "sum_grad_squared"]
)
def test_diagonal_operator_matches_dense(field):
    ext = {
        "diag_ggn_exact": tne.DiagGGNExact,
        "diag_ggn_mc": tne.DiagGGNMC,
        "diag_h": tne.DiagHessian,
        "sum_grad_squared": tne.SumGradSquared,
    }[field]()
    params = trained_fields(ext)
    D = DiagonalLinearOperator.from_backpack(params, field)
    diagonal = torch.cat([getattr(p, field).flatten() for p in params])
    torch.testing.assert_close(dense(D), torch.diag(diagonal))
    torch.testing.assert_close(D.trace, diagonal.sum())
    if field != "diag_h":  # the Hessian diagonal may be indefinite
        damping = 1e-3
        torch.testing.assert_close(
            dense(D.inverse(damping)), torch.diag(1 / (diagonal + damping))
        )


def test_bridge_errors():
    params = trained_fields(tne.DiagGGNExact())
    with pytest.raises(ValueError, match="no field 'kfac'"):
        KroneckerLinearOperator.from_backpack(params, "kfac")
    with pytest.raises(ValueError, match="savefield must be one of"):
        DiagonalLinearOperator.from_backpack(params, "grad_batch")
    with pytest.raises(ValueError, match="do not match"):
        KroneckerLinearOperator([[torch.eye(2), torch.eye(3)]], [(7,)])
    negative = DiagonalLinearOperator([-torch.ones(3)])
    with pytest.raises(ValueError, match="increase damping"):
        negative.inverse(0.5)
