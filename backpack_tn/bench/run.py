"""Layer-level benchmark: ``backpack_tn`` against the stock computations it replaces."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import partial
from typing import Iterable, List, Optional, Sequence

import torch
from tqdm import tqdm

from backpack_tn.bench.baselines import (
    STOCK,
    check,
    make_problem,
    tn_implementation,
)
from backpack_tn.bench.layers import Layer
from backpack_tn.bench.measure import median_time, peak_memory


@dataclass
class Measurement:
    """One (layer, operation, implementation) measurement."""

    layer: str
    description: str
    operation: str
    implementation: str
    time_s: float
    memory_bytes: Optional[int]
    rel_error: Optional[float]


def implementations(op: str, problem, with_plain: bool = True):
    """All applicable implementations of an operation: TN first, then stock ones.

    ``tn`` is the engine's automatic choice; with ``with_plain`` also each strategy
    forced (``tn-pattern``, ``tn-window``, ``tn-taps``) and the unsimplified network
    (``tn-plain``).
    """
    impls = {"tn": (tn_implementation(op, True), "average")}
    if with_plain:
        for strategy in ("pattern", "window", "taps"):
            impls[f"tn-{strategy}"] = (
                tn_implementation(op, True, strategy=strategy),
                "average",
            )
        impls["tn-plain"] = (tn_implementation(op, False), "average")
    for name, impl in STOCK[op].items():
        if impl.available(problem):
            impls[name] = (impl.fn, impl.groups_mode)
    return impls


def run_layers(
    layers: Sequence[Layer],
    operations: Iterable[str],
    batch_size: int,
    classes: int,
    dtype: torch.dtype,
    device: torch.device,
    repeats: int,
    measure_memory: bool = True,
    with_plain: bool = True,
) -> List[Measurement]:
    """Time (and measure memory of) every implementation of every operation.

    Every implementation's result is checked against ``backpack_tn`` with the same
    channel-group convention; the relative deviation is recorded.
    """
    operations = list(operations)
    results: List[Measurement] = []
    bar = tqdm(total=len(layers) * len(operations), desc="benchmark", leave=False)
    for layer in layers:
        problem = make_problem(layer, batch_size, classes, dtype, device)
        for op in operations:
            bar.set_postfix_str(f"{layer.name} {op}")
            references = {}
            for name, (fn, groups_mode) in implementations(
                op, problem, with_plain
            ).items():
                result = fn(problem)
                if groups_mode not in references:
                    references[groups_mode] = tn_implementation(op, True, groups_mode)(
                        problem
                    )
                error = check(result, references[groups_mode])
                del result
                call = partial(fn, problem)
                seconds = median_time(call, device, repeats)
                memory = peak_memory(call, device) if measure_memory else None
                results.append(
                    Measurement(
                        layer.name,
                        layer.describe(),
                        op,
                        name,
                        seconds,
                        memory,
                        error,
                    )
                )
            bar.update()
    bar.close()
    return results


def markdown_table(results: List[Measurement]) -> str:
    """Results as a markdown table with times and memory relative to ``tn``."""
    base = {(r.layer, r.operation): r for r in results if r.implementation == "tn"}
    lines = [
        "| layer | operation | implementation | time [ms] | time / tn | "
        "peak extra memory [MiB] | memory / tn | rel. error |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        tn = base[(r.layer, r.operation)]
        mem = "n/a" if r.memory_bytes is None else f"{r.memory_bytes / 2**20:.1f}"
        if r.memory_bytes is None or not tn.memory_bytes:
            mem_ratio = "n/a"
        else:
            mem_ratio = f"{r.memory_bytes / tn.memory_bytes:.2f}"
        err = "n/a" if r.rel_error is None else f"{r.rel_error:.1e}"
        lines.append(
            f"| {r.layer} ({r.description}) | {r.operation} | {r.implementation} | "
            f"{1e3 * r.time_s:.2f} | {r.time_s / tn.time_s:.2f} | {mem} | "
            f"{mem_ratio} | {err} |"
        )
    return "\n".join(lines)


def save_json(results: List[Measurement], path: str, meta: dict) -> None:
    """Write measurements and run metadata as JSON."""
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": [asdict(r) for r in results]}, f, indent=1)
