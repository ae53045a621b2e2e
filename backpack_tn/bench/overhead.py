"""Per-call overhead of ``backpack_tn.functional`` over torch's bare kernels.

Where torch's kernel is chosen (forward pass, input and weight VJP), both sides run the
same kernel, and what is left is Python: validation, the geometry, the kernel-vs-TN
lookup. On a GPU this overhead competes with kernels of tens of microseconds, so it is
measured on a problem small enough that the kernels cost little::

    python -m backpack_tn.bench.overhead [--device cuda] [--all]

``--all`` times every operation of the layer-level benchmark on a tiny layer against
the fastest stock implementation of it.

Times are the best of several batches of calls (host clock; CUDA synchronised at the
end of each batch).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from backpack_tn import functional as tnf


def best_call_time(
    fn: Callable[[], object], device: torch.device, calls: int, batches: int = 5
) -> float:
    """Best over ``batches`` of the mean time per call of ``calls`` calls, in s."""
    best = float("inf")
    for _ in range(batches):
        for _ in range(max(1, calls // 20)):  # warm-up
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def measure(device: torch.device, calls: int = 2000) -> Dict[str, tuple]:
    """``{operation: (torch seconds, backpack_tn seconds)}`` per call."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 5, device=device)
    w = torch.randn(3, 2, 3, 3, device=device)
    b = torch.randn(3, device=device)
    g = torch.randn(1, 3, 5, 5, device=device)
    # what aten needs besides the tensors (torch.nn.grad's wrappers add Python too)
    hyper = ((1, 1), (1, 1), (1, 1), False, (0, 0), 1)
    absent_w = torch.empty(1, device=device).expand(3, 2, 3, 3)
    absent_x = torch.empty(1, device=device).expand(1, 2, 5, 5)
    backward = torch.ops.aten.convolution_backward
    pairs = {
        "forward": (
            lambda: F.conv2d(x, w, b, padding=1),
            lambda: tnf.conv(x, w, b, padding=1),
        ),
        "input_vjp": (
            lambda: backward(g, absent_x, w, None, *hyper, (True, False, False)),
            lambda: tnf.input_vjp(g, w, x.shape, padding=1),
        ),
        "weight_vjp": (
            lambda: backward(g, x, absent_w, None, *hyper, (False, True, False)),
            lambda: tnf.weight_vjp(x, g, 3, padding=1),
        ),
    }
    return {
        name: tuple(best_call_time(fn, device, calls) for fn in fns)
        for name, fns in pairs.items()
    }


def measure_all(device: torch.device, calls: int = 1000) -> Dict[str, tuple]:
    """``{operation: (fastest stock name, its seconds, backpack_tn seconds)}``.

    Every operation of the layer-level benchmark on a tiny layer (3×3, 4 → 4
    channels, 4×4 input, batch 2, 3 classes), where the time is almost all Python and
    launches: the per-call cost of each side.
    """
    from backpack_tn.bench.baselines import STOCK, Problem, tn_implementation

    torch.manual_seed(0)
    module = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False).to(device)
    x = torch.randn(2, 4, 4, 4, device=device)
    grad_output = torch.randn(2, 4, 4, 4, device=device)
    problem = Problem(module, x, grad_output, torch.randn(3, 2, 4, 4, 4, device=device))
    results = {}
    for op, implementations in STOCK.items():
        stock = {
            name: best_call_time(functools.partial(impl.fn, problem), device, calls)
            for name, impl in implementations.items()
            if name != "einconv" and impl.available(problem)
        }
        fastest = min(stock, key=stock.get)
        ours = functools.partial(tn_implementation(op, True), problem)
        results[op] = (fastest, stock[fastest], best_call_time(ours, device, calls))
    return results


def main(argv=None) -> int:
    """Print the overhead table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--all",
        action="store_true",
        help="every benchmark operation against its fastest stock implementation",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.all:
        print("| operation | fastest stock | stock [µs] | backpack_tn [µs] | ratio |")
        print("|---|---|---:|---:|---:|")
        for op, (name, stock, ours) in measure_all(device, args.calls // 2).items():
            print(
                f"| {op} | {name} | {1e6 * stock:.1f} | {1e6 * ours:.1f} | "
                f"{stock / ours:.2f}× |"
            )
        return 0
    print("| operation | torch [µs] | backpack_tn [µs] | overhead [µs] |")
    print("|---|---:|---:|---:|")
    for name, (bare, ours) in measure(device, args.calls).items():
        print(
            f"| {name} | {1e6 * bare:.1f} | {1e6 * ours:.1f} | "
            f"{1e6 * (ours - bare):.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
