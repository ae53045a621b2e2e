"""``python -m backpack_tn``: TN vs unfold on the conv layers of a small CNN.

Builds a small CIFAR-size CNN (``--dims 1/2/3`` for Conv1d/2d/3d variants), runs a
forward and backward pass on random data to collect each convolution's input, output
gradient and a random GGN factor, then computes per-sample gradients, both KFAC input
factors and the diagonal GGN with ``backpack_tn``'s tensor networks and with the
unfold-based computations of BackPACK / curvlinops, checks that they agree and prints
time and peak-memory ratios.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from typing import Dict, List

import torch
from torch import nn
from tqdm import tqdm

from backpack_tn.bench.baselines import STOCK, Problem, check, tn_implementation
from backpack_tn.bench.measure import median_time, peak_memory

QUANTITIES = {
    "per_sample_grad": ("per-sample gradients", "unfold"),
    "kfac_expand": ("KFAC-expand input factor", "unfold"),
    "kfac_reduce": ("KFAC-reduce input factor", "unfold"),
    "diag_ggn": ("diagonal GGN", "backpack"),
}

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_SIZE = {1: (256,), 2: (32, 32), 3: (12, 12, 12)}


def small_cnn(dims: int = 2, num_classes: int = 10) -> nn.Sequential:
    """A small CNN with the common convolution types (3×3, strided, 1×1, patchify).

    Args:
        dims: Number of spatial dimensions (1, 2 or 3).
        num_classes: Number of outputs.

    Returns:
        The model; its input has 3 channels and spatial size 256, 32×32 or 12×12×12.
    """
    conv = _CONV[dims]
    return nn.Sequential(
        conv(3, 16, 3, padding=1),
        nn.ReLU(),
        conv(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        conv(32, 32, 3, padding=1, groups=32),  # depthwise
        conv(32, 64, 1),  # point-wise
        nn.ReLU(),
        conv(64, 64, 2, stride=2),  # patchify-style down-sampling
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.Flatten(2),
        nn.Flatten(),
        nn.LazyLinear(num_classes),
    )


def collect_problems(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: int
) -> List[Problem]:
    """Forward/backward once; return one problem per convolution layer."""
    inputs: Dict[nn.Module, torch.Tensor] = {}
    grads: Dict[nn.Module, torch.Tensor] = {}

    def hook(module, inp, out):
        inputs[module] = inp[0].detach()
        out.register_hook(lambda grad: grads.__setitem__(module, grad.detach()))

    handles = [
        module.register_forward_hook(hook)
        for module in model.modules()
        if isinstance(module, tuple(_CONV.values()))
    ]
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    for handle in handles:
        handle.remove()
    problems = []
    for module, inp in inputs.items():
        g = grads[module]
        S = torch.randn(classes, *g.shape, dtype=g.dtype, device=g.device)
        problems.append(Problem(module, inp, g, S))
    return problems


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
        "--dims", type=int, choices=(1, 2, 3), default=2, help="Conv1d/2d/3d model"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument(
        "--quantities", nargs="+", choices=list(QUANTITIES), default=list(QUANTITIES)
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = small_cnn(args.dims)
    x = torch.randn(args.batch_size, 3, *_SIZE[args.dims])
    model(x)  # initialise the lazy layer
    model = model.to(device=device, dtype=dtype)
    x = x.to(device=device, dtype=dtype)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    problems = collect_problems(model, x, y, classes=10)

    tolerance = 1e-4 if dtype == torch.float32 else 1e-10
    rows, ok = [], True
    steps = 2 * len(problems) * len(args.quantities)
    with tqdm(total=steps, desc="measuring", file=sys.stderr, leave=False) as bar:
        for op in args.quantities:
            label, stock_name = QUANTITIES[op]
            stock = STOCK[op][stock_name].fn
            tn = tn_implementation(op, simplify=True)
            t_tn = t_stock = 0.0
            error = 0.0
            for problem in problems:
                run_tn, run_stock = partial(tn, problem), partial(stock, problem)
                error = max(error, check(run_stock(), run_tn()))
                t_tn += median_time(run_tn, device, args.repeats)
                t_stock += median_time(run_stock, device, args.repeats)
                bar.update()
            ok &= error <= tolerance
            rows.append([label, stock_name, t_tn, t_stock, 0, 0, error, tn, stock])
        # memory last: measuring it changes how the CPU allocator serves blocks
        for row in rows:
            tn, stock = row[7], row[8]
            for problem in problems:
                row[4] = max(row[4], peak_memory(partial(tn, problem), device) or 0)
                row[5] = max(row[5], peak_memory(partial(stock, problem), device) or 0)
                bar.update()

    print(
        f"backpack_tn vs unfold-based computation: {args.dims}d CNN, "
        f"{len(problems)} conv layers, batch {args.batch_size}, {args.dtype}, "
        f"{device}, {torch.get_num_threads()} threads"
    )
    header = (
        f"{'quantity':<26} {'stock':<9} {'TN [ms]':>9} {'stock [ms]':>11} "
        f"{'speed-up':>9} {'TN MiB':>8} {'stock MiB':>10} {'max rel err':>12}  agree"
    )
    print(header)
    print("-" * len(header))
    for label, stock_name, t_tn, t_stock, m_tn, m_stock, error, *_ in rows:
        print(
            f"{label:<26} {stock_name:<9} {1e3 * t_tn:>9.1f} {1e3 * t_stock:>11.1f} "
            f"{t_stock / t_tn:>8.2f}x {m_tn / 2**20:>8.1f} {m_stock / 2**20:>10.1f} "
            f"{error:>12.1e}  {'yes' if error <= tolerance else 'NO'}"
        )
    print(
        "\ntimes: sum over layers of the median of repeated calls; memory: largest "
        "peak extra memory of one layer's call."
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
