"""Quick start: BackPACK with tensor-network convolutions by changing one import.

``backpack_tn.extensions`` provides drop-in versions of BackPACK's extensions. The
backward pass is BackPACK's; only the convolution quantities (per-sample gradients,
GGN diagonals, Kronecker factors) are contracted as tensor networks instead of being
computed from the unfolded (im2col) input.

This script extends a small CNN with BackPACK, runs one backward pass with
``BatchGrad``, ``DiagGGNExact`` and ``KFAC`` from ``backpack_tn.extensions``, reads the
fields BackPACK stores on every parameter (``grad_batch``, ``diag_ggn_exact``,
``kfac``), then repeats the pass with stock ``backpack.extensions`` and prints the
largest absolute difference per field (float64, so the agreement is to round-off).
It also shows KFAC-reduce, which stock BackPACK does not offer.

``python examples/backpack_quickstart.py`` (``--quick`` for a tiny run).
"""

from __future__ import annotations

import argparse
import warnings

import backpack.extensions as stock
import torch
from backpack import backpack, extend
from torch import nn

# The one-line change: import the extensions from backpack_tn instead of BackPACK.
from backpack_tn.extensions import KFAC, BatchGrad, DiagGGNExact

# BackPACK's hook on the first layer, whose input needs no gradient (harmless).
warnings.filterwarnings("ignore", "Full backward hook is firing")


def make_model(channels: int, size: int) -> nn.Sequential:
    """A small CNN for ``3×size×size`` inputs (``size`` even)."""
    # (BackPACK's average-pooling derivatives build float32 kernels, so a float64
    # model flattens instead of pooling.)
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, stride=2, padding=1, dilation=1),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=2, dilation=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * channels * (size // 2) ** 2, 10),
    )


def backward_fields(model, lossfunc, X, y, extensions) -> dict:
    """One BackPACK backward pass; returns the stored fields by parameter name."""
    model.zero_grad(set_to_none=True)
    with backpack(*extensions):
        lossfunc(model(X), y).backward()
    fields = {}
    for name, p in model.named_parameters():
        fields[name] = {
            "grad": p.grad.clone(),
            "grad_batch": p.grad_batch.clone(),
            "diag_ggn_exact": p.diag_ggn_exact.clone(),
            "kfac": [f.clone() for f in p.kfac],
        }
        for attr in ("grad_batch", "diag_ggn_exact", "kfac"):
            delattr(p, attr)
    return fields


def max_abs_diff(a, b) -> float:
    if isinstance(a, list):
        return max(max_abs_diff(x, y) for x, y in zip(a, b))
    return (a - b).abs().max().item()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--size", type=int, default=16, help="input height/width")
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.channels, args.size = 4, 4, 8

    torch.manual_seed(0)
    dtype = torch.float64  # compare to round-off
    model = extend(make_model(args.channels, args.size).to(dtype))
    lossfunc = extend(nn.CrossEntropyLoss())
    X = torch.randn(args.batch_size, 3, args.size, args.size, dtype=dtype)
    y = torch.randint(0, 10, (args.batch_size,))

    # --- backpack_tn: the README snippet --------------------------------------
    # KFAC is Monte-Carlo: fix the seed so both passes draw the same samples.
    torch.manual_seed(1)
    tn = backward_fields(
        model, lossfunc, X, y, [BatchGrad(), DiagGGNExact(), KFAC(mc_samples=1)]
    )
    print("Fields after backward with backpack_tn.extensions:")
    for name, f in tn.items():
        kfac = " ⊗ ".join("x".join(map(str, k.shape)) for k in f["kfac"])
        print(
            f"  {name:10s} grad_batch {tuple(f['grad_batch'].shape)}, "
            f"diag_ggn_exact {tuple(f['diag_ggn_exact'].shape)}, kfac [{kfac}]"
        )

    # --- the same pass with stock BackPACK --------------------------------------
    # (Timings: ``python -m backpack_tn`` and docs/benchmarks.md.)
    stock_exts = [stock.BatchGrad(), stock.DiagGGNExact(), stock.KFAC(mc_samples=1)]
    torch.manual_seed(1)
    ref = backward_fields(model, lossfunc, X, y, stock_exts)
    diffs = {
        field: max(max_abs_diff(tn[n][field], ref[n][field]) for n in tn)
        for field in ("grad", "grad_batch", "diag_ggn_exact", "kfac")
    }
    # sanity: per-sample gradients of a mean loss sum to the gradient
    sum_check = max(
        (tn[n]["grad_batch"].sum(0) - tn[n]["grad"]).abs().max().item() for n in tn
    )
    print("\nbackpack_tn vs stock BackPACK (max |difference| over all parameters):")
    print("| field | max abs diff |")
    print("|---|---|")
    for field, d in diffs.items():
        print(f"| {field} | {d:.2e} |")
    print(f"sum of grad_batch vs grad: {sum_check:.2e}")

    # --- beyond stock BackPACK: KFAC-reduce ------------------------------------
    torch.manual_seed(1)
    model.zero_grad(set_to_none=True)
    with backpack(KFAC(kfac_approx="reduce")):
        lossfunc(model(X), y).backward()
    A = model[0].weight.kfac[1]
    print(f"KFAC-reduce input factor of the first conv: {tuple(A.shape)}")

    worst = max(diffs.values())
    assert worst < 1e-10, f"backpack_tn differs from BackPACK by {worst}"
    print(f"OK: all fields equal stock BackPACK's (max diff {worst:.1e})")
    return diffs


if __name__ == "__main__":
    main()
