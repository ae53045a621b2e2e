"""From BackPACK fields to curvlinops operators: diagonal, Kronecker, CG, Lanczos.

After one backward pass with ``backpack_tn.extensions`` (``DiagGGNExact``, ``KFAC``),
the fields BackPACK stores on the parameters become curvlinops
``PyTorchLinearOperator``s through ``backpack_tn.linops.DiagonalLinearOperator`` and
``KroneckerLinearOperator``. They compose with curvlinops' tools. This script, on a
small CNN (float64, cross-entropy, random data):

1. checks the BackPACK GGN diagonal against curvlinops' autograd-based
   ``GGNLinearOperator`` (``e_iᵀ G e_i`` for random coordinates ``i``);
2. solves ``(KFAC + λI) x = g`` with ``curvlinops.CGInverseLinearOperator`` and
   compares with the exact eigendecomposition inverse ``KFAC.inverse(λ)``;
3. solves ``(GGN + λI) x = g`` by CG, plain and preconditioned with the damped
   diagonal and KFAC inverses (counting GGN products). On this random-data problem
   most GGN eigenvalues are tiny, so ``GGN + λI`` is already well conditioned and
   the preconditioners do not pay off (they do on badly scaled problems);
4. runs Lanczos (``scipy.sparse.linalg.eigsh`` on ``op.to_scipy()``) for the top
   eigenvalues of KFAC (checked against the exact ones from the factors), of the
   diagonal and of the GGN;
5. builds ``backpack_tn.linops.DiagGGNLinearOperator`` over a data loader and checks
   that it equals the full-batch BackPACK diagonal and stock BackPACK's.

``python examples/backpack_to_curvlinops.py`` (``--quick`` for a tiny run).
"""

from __future__ import annotations

import argparse
import copy
import warnings

import backpack.extensions as stock
import numpy as np
import torch
from backpack import backpack, extend
from curvlinops import CGInverseLinearOperator, GGNLinearOperator
from scipy.sparse.linalg import eigsh
from torch import nn

import backpack_tn.extensions as tne
from backpack_tn.linops import (
    DiagGGNLinearOperator,
    DiagonalLinearOperator,
    KroneckerLinearOperator,
)

warnings.filterwarnings("ignore", "Full backward hook is firing")
DTYPE = torch.float64


def make_model(channels: int, size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * (size // 2) ** 2, 10),
    )


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


def damping_op(params, damping: float) -> DiagonalLinearOperator:
    """``λ I`` as a curvlinops operator."""
    return DiagonalLinearOperator([torch.full_like(p, damping) for p in params])


class CountForward:
    """Counts forward passes of a model (one per batch and GGN product)."""

    def __init__(self, model: nn.Module):
        self.calls = 0
        model.register_forward_hook(self)

    def __call__(self, *_):
        self.calls += 1


def cg_solve(A, b, tolerance: float = 1e-8, **cg_kwargs) -> list:
    """``A⁻¹ b`` with curvlinops' CG (GPyTorch's ``linear_cg``).

    ``eps`` is ``linear_cg``'s threshold on the *squared* residual norm below which it
    stops updating; its default ``1e-10`` caps the relative residual near ``1e-5``.
    """
    cg = CGInverseLinearOperator(
        A, tolerance=tolerance, eps=1e-20, max_iter=300, **cg_kwargs
    )
    return cg @ b


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-data", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--top-k", type=int, default=5, help="Lanczos eigenvalues")
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_data, args.batch_size, args.channels, args.size = 32, 8, 4, 6
        args.top_k = 3

    torch.manual_seed(0)
    model = make_model(args.channels, args.size).to(DTYPE)
    lossfunc = nn.CrossEntropyLoss()
    X = torch.randn(args.num_data, 3, args.size, args.size, dtype=DTYPE)
    y = torch.randint(0, 10, (args.num_data,))
    params = list(model.parameters())
    print(f"{sum(p.numel() for p in params)} parameters, {args.num_data} data")
    results = {}

    # --- one BackPACK backward pass, TN extensions ----------------------------
    # BackPACK extends a copy: its hooks on the modules would get in the way of
    # curvlinops' functorch transforms (GGNLinearOperator) on ``model``.
    bp_model, bp_loss = extend(copy.deepcopy(model)), extend(nn.CrossEntropyLoss())
    bp_params = list(bp_model.parameters())
    with backpack(tne.DiagGGNExact(), tne.KFAC()):
        bp_loss(bp_model(X), y).backward()
    g = [p.grad.clone() for p in bp_params]
    D = DiagonalLinearOperator.from_backpack(bp_params, "diag_ggn_exact")
    K = KroneckerLinearOperator.from_backpack(bp_params, "kfac")
    # BackPACK's convolution KFAC (KFC, Grosse & Martens 2016) sums over output
    # positions without dividing by their number, so its scale exceeds the GGN's.
    print(f"trace: GGN (= diagonal) {D.trace:.4e}, BackPACK KFAC {K.trace:.4e}")

    # --- 1. the diagonal against curvlinops' GGN --------------------------------
    data = [(X, y)]
    G = GGNLinearOperator(model, lossfunc, params, data, check_deterministic=False)
    idx = torch.randperm(G.shape[1])[:20]
    E = torch.zeros(G.shape[1], len(idx), dtype=DTYPE)
    E[idx, torch.arange(len(idx))] = 1.0
    G_ii = (E * (G @ E)).sum(0)
    D_ii = flat(D.diagonal)[idx]
    results["diag vs GGN"] = ((D_ii - G_ii).abs().max() / G_ii.abs().max()).item()
    print(
        f"1. diag_ggn_exact vs curvlinops GGN on {len(idx)} random coordinates: "
        f"max rel. diff {results['diag vs GGN']:.1e}"
    )

    # --- 2. CG on (KFAC + λI) vs the exact Kronecker inverse -------------------
    lam = args.damping
    x_cg = cg_solve(K + damping_op(params, lam), g)
    x_exact = K.inverse(lam) @ g
    results["CG vs exact"] = (
        (flat(x_cg) - flat(x_exact)).norm() / flat(x_exact).norm()
    ).item()
    print(
        f"2. CG solve of (KFAC + {lam:g} I) x = g vs eigendecomposition inverse: "
        f"rel. diff {results['CG vs exact']:.1e}"
    )

    # --- 3. CG on (GGN + λI), plain and preconditioned ---------------------------
    counter = CountForward(model)
    A = G + damping_op(params, lam)
    preconditioners = {
        "none": None,
        "diag (D + λI)⁻¹": D.inverse(lam),
        "KFAC (K + λI)⁻¹": K.inverse(lam),
    }
    print(f"3. CG on (GGN + {lam:g} I) x = g:")
    for name, P in preconditioners.items():
        kwargs = {} if P is None else {"preconditioner": P.__matmul__}
        counter.calls = 0
        x = cg_solve(A, g, **kwargs)
        residual = ((flat(A @ x) - flat(g)).norm() / flat(g).norm()).item()
        results[f"CG residual ({name})"] = residual
        print(
            f"   preconditioner {name:16s}: {counter.calls:4d} GGN products, "
            f"relative residual {residual:.1e}"
        )

    # --- 4. Lanczos --------------------------------------------------------------
    k = args.top_k
    top = {}
    for name, op in (("KFAC", K), ("diagonal", D), ("GGN", G)):
        top[name] = np.sort(eigsh(op.to_scipy(), k=k, which="LA", tol=1e-10)[0])[::-1]
    # KFAC's exact spectrum: products of the factors' eigenvalues
    exact = []
    for fs in K.factors:
        ev = torch.linalg.eigvalsh(fs[0])
        for f in fs[1:]:
            ev = torch.outer(ev, torch.linalg.eigvalsh(f)).flatten()
        exact.append(ev)
    exact = torch.cat(exact).sort(descending=True).values[:k].numpy()
    results["Lanczos vs exact"] = float(np.abs(top["KFAC"] - exact).max() / exact[0])
    print(f"4. top-{k} eigenvalues (Lanczos, scipy eigsh):")
    for name, ev in top.items():
        print(f"   {name:8s} " + " ".join(f"{e:.4e}" for e in ev))
    print("   KFAC exact " + " ".join(f"{e:.4e}" for e in exact))
    print(f"   KFAC Lanczos vs exact: rel. diff {results['Lanczos vs exact']:.1e}")

    # --- 5. DiagGGNLinearOperator over a data loader ---------------------------------
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, y), batch_size=args.batch_size
    )
    Dl = DiagGGNLinearOperator(model, lossfunc, params, loader, mode="exact")
    bp_model.zero_grad(set_to_none=True)
    with backpack(stock.DiagGGNExact()):
        bp_loss(bp_model(X), y).backward()
    stock_diag = flat(p.diag_ggn_exact for p in bp_params)
    tn_diag = flat(D.diagonal)
    loader_diag = flat(Dl.diagonal)
    results["loader vs full batch"] = (
        (loader_diag - tn_diag).abs().max() / tn_diag.abs().max()
    ).item()
    results["TN vs stock BackPACK"] = (
        (tn_diag - stock_diag).abs().max() / stock_diag.abs().max()
    ).item()
    print(
        f"5. DiagGGNLinearOperator over {len(loader)} batches vs full-batch "
        f"diag_ggn_exact: rel. diff {results['loader vs full batch']:.1e}; "
        f"TN vs stock BackPACK diagonal: {results['TN vs stock BackPACK']:.1e}"
    )
    x_dl = Dl.inverse(lam) @ g
    print(f"   ‖(diag + λI)⁻¹ g‖ = {flat(x_dl).norm():.4e}, trace {Dl.trace:.4e}")

    checks = {k: v for k, v in results.items() if not k.startswith("CG residual")}
    worst = max(checks.values())
    assert worst < 1e-6, results
    assert max(v for k, v in results.items() if k.startswith("CG residual")) < 1e-6
    print(f"OK: all checks pass (max rel. diff {worst:.1e})")
    return results


if __name__ == "__main__":
    main()
