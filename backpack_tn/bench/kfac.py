"""curvlinops KFAC/EKFAC factor computation: stock curvlinops vs ``backpack_tn.linops``.

``python -m backpack_tn.bench.kfac --model allcnnc --batch-size 64``

Times ``compute_kronecker_factors()`` (both approximations) and EKFAC's
``compute_eigenvalue_correction()`` (factors precomputed) for curvlinops' operators and
the TN drop-ins, on the same model and data in one process, then measures the peak
memory of each (after all timings, so allocator state does not bias the times).
Models hold only ``Linear``/``Conv2d``/``ReLU``/pooling (curvlinops' supported layers):
All-CNN-C for CIFAR-100 shapes and ResNet-18 without batch normalisation.
"""

from __future__ import annotations

import argparse
import platform
import sys
from typing import Callable, Dict, List

import curvlinops
import torch
from torch import nn
from tqdm import tqdm

from backpack_tn import linops
from backpack_tn.bench.measure import (
    add_memory_rounds_argument,
    median_time,
    min_peak_memories,
)
from backpack_tn.bench.models import all_cnn_c


def resnet18_no_bn(num_classes: int = 10) -> nn.Module:
    """Torchvision's ResNet-18 (``weights=None``), batch norms replaced by identities.

    Leaves ``Conv2d``/``Linear``/``ReLU``/pooling and the residual additions, which
    curvlinops' KFAC supports.
    """
    from torchvision.models import resnet18

    return resnet18(weights=None, num_classes=num_classes, norm_layer=_identity)


def _identity(channels: int) -> nn.Module:
    return nn.Identity()


MODELS: Dict[str, Callable[[], nn.Module]] = {
    "allcnnc": lambda: all_cnn_c(100),
    "resnet18": lambda: resnet18_no_bn(10),
}
INPUTS = {"allcnnc": (3, 32, 32), "resnet18": (3, 224, 224)}
CLASSES = {"allcnnc": 100, "resnet18": 10}
IMPLEMENTATIONS = {
    "curvlinops": (curvlinops.KFACLinearOperator, curvlinops.EKFACLinearOperator),
    "backpack_tn": (linops.KFACLinearOperator, linops.EKFACLinearOperator),
}
JOBS = ["KFAC-expand", "KFAC-reduce", "EKFAC-correction"]


def run(args) -> List[dict]:
    """Time and measure every (job, implementation) pair."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = MODELS[args.model]().to(device)
    loss = nn.CrossEntropyLoss()
    X = torch.randn(args.batch_size, *INPUTS[args.model], device=device)
    y = torch.randint(0, CLASSES[args.model], (args.batch_size,), device=device)
    data = [(X, y)]
    params = [p for p in model.parameters() if p.requires_grad]

    def operator(cls, approx):
        return cls(
            model,
            loss,
            params,
            data,
            fisher_type=args.fisher_type,
            kfac_approx=approx,
            check_deterministic=False,
            num_data=args.batch_size,
            num_per_example_loss_terms=1,
        )

    calls = {}
    for name, (kfac_cls, ekfac_cls) in IMPLEMENTATIONS.items():
        for approx in ("expand", "reduce"):
            op = operator(kfac_cls, approx)
            calls[(f"KFAC-{approx}", name)] = op.compute_kronecker_factors
        ekfac = operator(ekfac_cls, "expand")
        ekfac._compute_eigenvectors()  # the correction alone is measured
        calls[("EKFAC-correction", name)] = ekfac.compute_eigenvalue_correction

    rows = []
    jobs = [(job, impl) for job in args.jobs for impl in IMPLEMENTATIONS]
    for job, impl in tqdm(jobs, desc="time", leave=False):
        seconds = median_time(calls[(job, impl)], device, args.repeats)
        rows.append(
            dict(job=job, implementation=impl, time_s=seconds, memory_bytes=None)
        )
    if args.memory:  # the least of args.memory_rounds readings, rotated order
        measured = {
            i: calls[(r["job"], r["implementation"])] for i, r in enumerate(rows)
        }
        peaks = min_peak_memories(measured, device, args.memory_rounds)
        for i, peak in peaks.items():
            rows[i]["memory_bytes"] = peak
    return rows


def table(rows: List[dict]) -> str:
    """Markdown table: curvlinops vs backpack_tn per job."""
    lines = [
        "| computation | curvlinops [ms] | backpack_tn [ms] | speed-up | "
        "curvlinops peak [MiB] | backpack_tn peak [MiB] |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    by = {(r["job"], r["implementation"]): r for r in rows}
    for job in dict.fromkeys(r["job"] for r in rows):
        stock, ours = by[(job, "curvlinops")], by[(job, "backpack_tn")]

        def mib(r):
            return (
                "—" if r["memory_bytes"] is None else f"{r['memory_bytes'] / 2**20:.0f}"
            )

        lines.append(
            f"| {job} | {1e3 * stock['time_s']:.0f} | {1e3 * ours['time_s']:.0f} | "
            f"{stock['time_s'] / ours['time_s']:.2f}× | {mib(stock)} | {mib(ours)} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m backpack_tn.bench.kfac",
        description="curvlinops KFAC/EKFAC factors: stock vs backpack_tn.linops.",
    )
    parser.add_argument("--model", choices=list(MODELS), default="allcnnc")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--jobs", nargs="+", choices=JOBS, default=JOBS)
    parser.add_argument(
        "--fisher-type", default="empirical", choices=["empirical", "mc", "type-2"]
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
        f"<!-- {args.model}, batch {args.batch_size}, fisher_type {args.fisher_type}, "
        f"{args.device} ({platform.machine()}), {args.threads} thread(s), "
        f"torch {torch.__version__} -->"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
