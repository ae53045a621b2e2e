"""``python -m backpack_tn``: BackPACK and curvlinops with and without backpack_tn.

Builds a small CIFAR-size CNN (``--dims 1/3`` for Conv1d/Conv3d variants) on random
data and computes per-sample gradients (BackPACK ``BatchGrad``), KFAC (BackPACK
``KFAC``), the diagonal GGN (BackPACK ``DiagGGNExact``) and KFAC-reduce factors
(curvlinops ``KFACLinearOperator`` vs ``backpack_tn.linops``) with the stock libraries
and with ``backpack_tn``, checks that the numbers agree and prints time and peak
memory side by side.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Callable, List, Optional

import torch
from backpack import backpack, extend
from backpack import extensions as bext
from torch import nn
from tqdm import tqdm

import backpack_tn.extensions as tne
from backpack_tn.bench.measure import median_time, peak_memory

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_SIZE = {1: (128,), 2: (32, 32), 3: (12, 12, 12)}
QUANTITIES = ("per_sample_grad", "kfac", "kfac_reduce", "diag_ggn")
LABELS = {
    "per_sample_grad": "per-sample gradients (BackPACK BatchGrad)",
    "kfac": "KFAC (BackPACK KFAC, 1 MC sample)",
    "kfac_reduce": "KFAC-reduce (curvlinops operator)",
    "diag_ggn": "diagonal GGN (BackPACK DiagGGNExact)",
}


def small_cnn(dims: int = 2, num_classes: int = 10) -> nn.Sequential:
    """A small CNN with the common convolution types (3×3, strided, 1×1, patchify).

    Args:
        dims: Number of spatial dimensions (1, 2 or 3).
        num_classes: Number of outputs.

    Returns:
        The model; its input has 3 channels and spatial size 128, 32×32 or 12×12×12.
    """
    conv = _CONV[dims]
    features = {1: 64 * 32, 2: 64 * 8 * 8, 3: 64 * 3 * 3 * 3}[dims]
    return nn.Sequential(
        conv(3, 32, 3, padding=1),
        nn.ReLU(),
        conv(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        conv(64, 64, 1),  # point-wise
        nn.ReLU(),
        conv(64, 64, 2, stride=2),  # non-overlapping ("patchify") down-sampling
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(features, num_classes),
    )


@dataclass
class Row:
    """One quantity: stock and backpack_tn measurements."""

    quantity: str
    stock_time: Optional[float] = None
    tn_time: Optional[float] = None
    stock_memory: Optional[int] = None
    tn_memory: Optional[int] = None
    error: Optional[float] = None
    note: str = ""


def _max_rel_error(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        scale = y.abs().max().clamp(min=1e-30)
        worst = max(worst, float((x - y).abs().max() / scale))
    return worst


def _backpack_job(model, lossfunc, X, y, extension: Callable, fields):
    """A function running one BackPACK backward pass, returning the fields."""

    def run():
        model.zero_grad()
        torch.manual_seed(1)  # the same MC samples for stock and TN
        with backpack(extension()):
            lossfunc(model(X), y).backward()
        values = []
        for p in model.parameters():
            for field in fields:
                if hasattr(p, field):
                    value = getattr(p, field)
                    values.extend(value if isinstance(value, list) else [value])
                    delattr(p, field)
        return values

    return run


def _curvlinops_job(cls, model, X, y):
    def run():
        op = cls(
            model,
            nn.CrossEntropyLoss(),
            [p for p in model.parameters()],
            [(X, y)],
            kfac_approx="reduce",
            fisher_type="empirical",
            check_deterministic=False,
            num_data=X.shape[0],
            num_per_example_loss_terms=1,
        )
        op.compute_kronecker_factors()
        names = sorted(op._input_covariances)
        return [op._input_covariances[n] for n in names] + [
            op._gradient_covariances[n] for n in sorted(op._gradient_covariances)
        ]

    return run


def main(argv=None) -> int:
    """Run the comparison and print the table.

    Args:
        argv: Command-line arguments (default: ``sys.argv``).

    Returns:
        Exit status: 0 if every quantity agrees, 1 otherwise.
    """
    parser = argparse.ArgumentParser(
        prog="python -m backpack_tn",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    parser.add_argument(
        "--dims",
        type=int,
        choices=(1, 2, 3),
        default=2,
        help="model: CNN with Conv1d, Conv2d (default, CIFAR-size) or Conv3d layers",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="e.g. cpu, cuda")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument(
        "--quantities",
        nargs="+",
        choices=QUANTITIES,
        default=list(QUANTITIES),
        help="what to compute (default: all)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls each")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)

    import curvlinops

    from backpack_tn import linops

    # BackPACK's hooks on the first layer, whose input needs no gradient: harmless
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = small_cnn(args.dims).to(device=device, dtype=dtype)
    plain_model = copy.deepcopy(model)  # curvlinops: no BackPACK hooks
    model, lossfunc = extend(model), extend(nn.CrossEntropyLoss())
    X = torch.randn(args.batch_size, 3, *_SIZE[args.dims], device=device, dtype=dtype)
    y = torch.randint(0, 10, (args.batch_size,), device=device)

    jobs = {
        "per_sample_grad": (bext.BatchGrad, tne.BatchGrad, ["grad_batch"]),
        "kfac": (bext.KFAC, tne.KFAC, ["kfac"]),
        "diag_ggn": (bext.DiagGGNExact, tne.DiagGGNExact, ["diag_ggn_exact"]),
    }
    calls = {}
    for quantity in args.quantities:
        if quantity == "kfac_reduce":
            stock = None
            if args.dims == 2:  # curvlinops 3.0 supports Conv2d only
                stock = _curvlinops_job(
                    curvlinops.KFACLinearOperator, plain_model, X, y
                )
            ours = _curvlinops_job(linops.KFACLinearOperator, plain_model, X, y)
        else:
            stock_ext, tn_ext, fields = jobs[quantity]
            stock = _backpack_job(model, lossfunc, X, y, stock_ext, fields)
            ours = _backpack_job(model, lossfunc, X, y, tn_ext, fields)
        calls[quantity] = (stock, ours)

    tolerance = 1e-4 if dtype == torch.float32 else 1e-10
    rows, ok = [], True
    steps = 2 * len(calls)
    with tqdm(total=steps, desc="measuring", file=sys.stderr, leave=False) as bar:
        for quantity, (stock, ours) in calls.items():
            row = Row(LABELS[quantity])
            tn_values = ours()
            if stock is None:
                row.note = "stock: Conv1d/Conv3d unsupported"
            else:
                row.error = _max_rel_error(tn_values, stock())
                ok &= row.error <= tolerance
                row.stock_time = median_time(stock, device, args.repeats)
            row.tn_time = median_time(ours, device, args.repeats)
            rows.append(row)
            bar.update()
        # memory last: measuring it changes how the CPU allocator serves blocks
        for row, (stock, ours) in zip(rows, calls.values()):
            row.tn_memory = peak_memory(ours, device)
            if stock is not None:
                row.stock_memory = peak_memory(partial(stock), device)
            bar.update()

    print(
        f"stock BackPACK/curvlinops vs backpack_tn: {args.dims}d CNN, batch "
        f"{args.batch_size}, {args.dtype}, {device}, {torch.get_num_threads()} threads"
    )
    header = (
        f"{'quantity':<42} {'stock [ms]':>10} {'TN [ms]':>8} {'speed-up':>8} "
        f"{'stock MiB':>9} {'TN MiB':>7} {'max rel diff':>12}  agree"
    )
    print(header)
    print("-" * len(header))

    def fmt(value, scale, spec):
        width = int("".join(c for c in spec.split(".")[0] if c.isdigit()))
        return format(value * scale, spec) if value is not None else "—".rjust(width)

    for r in rows:
        speed = f"{r.stock_time / r.tn_time:>7.2f}x" if r.stock_time else f"{'—':>8}"
        agree = "—" if r.error is None else ("yes" if r.error <= tolerance else "NO")
        print(
            f"{r.quantity:<42} {fmt(r.stock_time, 1e3, '>10.1f')} "
            f"{fmt(r.tn_time, 1e3, '>8.1f')} {speed} "
            f"{fmt(r.stock_memory, 2**-20, '>9.1f')} "
            f"{fmt(r.tn_memory, 2**-20, '>7.1f')}"
            f" {fmt(r.error, 1, '>12.1e')}  {agree} {r.note}"
        )
    print(
        "\ntimes: median of repeated forward+backward passes (BackPACK) or factor "
        "computations (curvlinops); memory: peak extra memory of one call "
        "(process RSS on CPU, allocator peak on CUDA)."
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
