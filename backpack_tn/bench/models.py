"""Model-level benchmark: BackPACK ``backward()``, stock vs ``backpack_tn`` extensions.

``python -m backpack_tn.bench.models --model allcnnc --batch-size 64``
"""

from __future__ import annotations

import argparse
import platform
import sys
from functools import partial
from typing import Callable, Dict, List

import torch
from backpack import backpack, extend
from backpack import extensions as bext
from torch import nn
from tqdm import tqdm

import backpack_tn.extensions as tne
from backpack_tn import clear_caches
from backpack_tn.bench.measure import (
    add_memory_rounds_argument,
    median_time,
    min_peak_memories,
    settle,
)


def all_cnn_c(num_classes: int = 100) -> nn.Sequential:
    """All-CNN-C (Springenberg et al., 2015) as in DeepOBS, for 3×32×32 inputs."""

    def conv(c_in, c_out, k, stride=1, padding=1):
        return [nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding), nn.ReLU()]

    return nn.Sequential(
        *conv(3, 96, 3),
        *conv(96, 96, 3),
        *conv(96, 96, 3, stride=2),
        *conv(96, 192, 3),
        *conv(192, 192, 3),
        *conv(192, 192, 3, stride=2),
        *conv(192, 192, 3, padding=0),
        *conv(192, 192, 1, padding=0),
        *conv(192, num_classes, 1, padding=0),
        nn.AvgPool2d(6),
        nn.Flatten(),
    )


def resnet18(num_classes: int = 10) -> nn.Module:
    """Torchvision's ResNet-18 (``weights=None``), in eval mode for BackPACK."""
    from torchvision.models import resnet18 as tv_resnet18

    return tv_resnet18(weights=None, num_classes=num_classes).eval()


MODELS: Dict[str, Callable[[], nn.Module]] = {
    "allcnnc": lambda: all_cnn_c(100),
    "resnet18": lambda: resnet18(10),
}
INPUTS = {"allcnnc": (3, 32, 32), "resnet18": (3, 224, 224)}
CLASSES = {"allcnnc": 100, "resnet18": 10}
EXTENSIONS = [
    "BatchGrad",
    "SumGradSquared",
    "BatchL2Grad",
    "Variance",
    "DiagGGNMC",
    "DiagGGNExact",
    "KFAC",
    "KFLR",
]


def run(args) -> List[dict]:
    """Time and measure every (extension, implementation) pair.

    Each pass is timed once on its first call and then as the median of
    ``args.repeats`` calls. ``backpack_tn``'s caches are emptied before its first
    call of each extension, so that call autotunes every problem afresh, as in a new
    process.
    """
    torch.manual_seed(0)
    model = MODELS[args.model]().to(args.device)
    model = extend(model, use_converter=args.model == "resnet18")
    lossfunc = extend(nn.CrossEntropyLoss())
    X = torch.randn(args.batch_size, *INPUTS[args.model], device=args.device)
    y = torch.randint(0, CLASSES[args.model], (args.batch_size,), device=args.device)
    device = torch.device(args.device)

    def backward(make_extension):
        model.zero_grad()
        extensions = [] if make_extension is None else [make_extension()]
        with backpack(*extensions):
            lossfunc(model(X), y).backward()
        for p in model.parameters():  # drop the fields: measure one pass only
            for field in (
                "grad_batch",
                "sum_grad_squared",
                "batch_l2",
                "variance",
                "diag_ggn_mc",
                "diag_ggn_exact",
                "kfac",
                "kflr",
            ):
                if hasattr(p, field):
                    delattr(p, field)

    jobs = [("none", "plain backward", None)]
    for name in args.extensions:
        jobs.append((name, "stock", getattr(bext, name)))
        jobs.append((name, "backpack_tn", getattr(tne, name)))
    rows = []
    for extension, implementation, factory in tqdm(jobs, desc="time", leave=False):
        try:
            if implementation == "backpack_tn":  # a first call: nothing tuned yet
                clear_caches()
            # backpack_tn measures its candidates on a problem's first calls
            # (autotuning): the first pass, then the steady state after the warm-up
            first = median_time(partial(backward, factory), device, 1, warmup=0)
            # passes that still measured candidates (problems of 5 ms or more are
            # measured over calls, one candidate per call), then the steady state
            measuring: List[float] = []
            settle(partial(backward, factory), measuring=measuring)
            seconds = median_time(
                partial(backward, factory), device, args.repeats, warmup=0
            )
            error = None
        except Exception as exc:  # stock BackPACK refuses some layers
            first, seconds, measuring = None, None, []
            error = f"{type(exc).__name__}: {str(exc)[:80]}"
        rows.append(
            dict(
                extension=extension,
                implementation=implementation,
                first_s=first,
                measuring_s=measuring,
                time_s=seconds,
                memory_bytes=None,
                error=error,
            )
        )
    if args.memory:
        # the least of args.memory_rounds readings per pass, in rotated order: one
        # reading of a ResNet-18 pass varied by ~100 MiB from run to run
        measured = {
            i: partial(backward, factory)
            for i, (row, (_, _, factory)) in enumerate(zip(rows, jobs))
            if row["error"] is None
        }
        peaks = min_peak_memories(measured, device, args.memory_rounds)
        for i, peak in peaks.items():
            rows[i]["memory_bytes"] = peak
    return rows


def table(rows: List[dict]) -> str:
    """Markdown table: time and memory of stock and TN per extension, and ratios."""
    lines = [
        "| extension | stock [ms] | backpack_tn [ms] | speed-up | stock peak [MiB] | "
        "backpack_tn peak [MiB] | stock first call [ms] | "
        "backpack_tn first call [ms] | backpack_tn later passes measuring |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r["extension"], r["implementation"]): r for r in rows}
    plain = by[("none", "plain backward")]
    lines.append(
        f"| plain backward | {1e3 * plain['time_s']:.0f} | | | "
        f"{(plain['memory_bytes'] or 0) / 2**20:.0f} | | "
        f"{1e3 * plain['first_s']:.0f} | | |"
    )
    for ext in dict.fromkeys(r["extension"] for r in rows if r["extension"] != "none"):
        stock, ours = by[(ext, "stock")], by[(ext, "backpack_tn")]

        def ms(r, key="time_s"):
            return "fails" if r[key] is None else f"{1e3 * r[key]:.0f}"

        def mib(r):
            return (
                "—" if r["memory_bytes"] is None else f"{r['memory_bytes'] / 2**20:.0f}"
            )

        ratio = (
            f"{stock['time_s'] / ours['time_s']:.2f}×"
            if stock["time_s"] and ours["time_s"]
            else "—"
        )
        passes = ours.get("measuring_s") or []
        measured = f"{len(passes)} ({sum(passes):.1f} s)" if passes else "0"
        lines.append(
            f"| {ext} | {ms(stock)} | {ms(ours)} | {ratio} | {mib(stock)} "
            f"| {mib(ours)} | {ms(stock, 'first_s')} | {ms(ours, 'first_s')} "
            f"| {measured} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m backpack_tn.bench.models")
    parser.add_argument("--model", choices=list(MODELS), default="allcnnc")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--extensions", nargs="+", choices=EXTENSIONS, default=EXTENSIONS
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    add_memory_rounds_argument(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args)
    print(
        f"<!-- {args.model}, batch {args.batch_size}, {args.device} "
        f"({platform.machine()}), {args.threads} thread(s), "
        f"torch {torch.__version__} -->"
    )
    print(table(rows))
    for r in rows:
        if r["error"]:
            print(f"- {r['extension']} ({r['implementation']}): {r['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
