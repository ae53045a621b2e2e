"""Layer-level benchmark: ``backpack_tn`` against the stock computations it replaces."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable, Iterable, List, Mapping, Optional, Sequence

import torch
from tqdm import tqdm

from backpack_tn.bench.baselines import (
    STOCK,
    check,
    make_problem,
    tn_implementation,
)
from backpack_tn.bench.layers import Layer
from backpack_tn.bench.measure import interleaved_medians, min_peak_memories


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
    category: str = "general"


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
    memory_rounds: int = 2,
    on_layer: Optional[Callable[[List[Measurement]], None]] = None,
    layer_operations: Optional[Mapping[str, Sequence[str]]] = None,
) -> List[Measurement]:
    """Time (and measure memory of) every implementation of every operation.

    Every implementation's result is checked against ``backpack_tn`` with the same
    channel-group convention; the relative deviation is recorded. All timings run
    before any memory measurement, because measuring CPU memory changes how the
    allocator serves large blocks (see :mod:`backpack_tn.bench.measure`).
    Memory is the least of ``memory_rounds`` readings per implementation, taken in
    rotated order (:func:`backpack_tn.bench.measure.min_peak_memories`).
    ``on_layer`` gets the measurements so far after each layer's timings and after
    each layer's memory readings (e.g. to save them as the run goes).
    ``layer_operations`` (by layer name) replaces ``operations`` per layer: a re-run
    of some operations of some layers still times all of them before measuring any
    memory.
    """
    operations = list(operations)

    def operations_of(layer: Layer) -> List[str]:
        if layer_operations is None:
            return operations
        return list(layer_operations[layer.name])

    results: List[Measurement] = []
    calls = []
    steps = sum(len(operations_of(layer)) for layer in layers)
    steps *= 2 if measure_memory else 1
    bar = tqdm(total=steps, desc="benchmark", leave=False)
    for layer in layers:
        problem = make_problem(layer, batch_size, classes, dtype, device)
        for op in operations_of(layer):
            bar.set_postfix_str(f"time {layer.name} {op}")
            references = {}
            impls = implementations(op, problem, with_plain)
            errors = {}
            for name, (fn, groups_mode) in impls.items():
                result = fn(problem)
                if groups_mode not in references:
                    reference = tn_implementation(op, True, groups_mode)(problem)
                    references[groups_mode] = reference
                errors[name] = check(result, references[groups_mode])
                del result
            del references
            medians = interleaved_medians(
                {name: partial(fn, problem) for name, (fn, _) in impls.items()},
                device,
                repeats,
            )
            for name in impls:
                results.append(
                    Measurement(
                        layer.name,
                        layer.describe(),
                        op,
                        name,
                        medians[name],
                        None,
                        errors[name],
                        layer.category,
                    )
                )
                calls.append((layer, op, name))
            bar.update()
        del problem
        if on_layer is not None:
            on_layer(results)
    if measure_memory:
        measured = iter(results)
        for layer in layers:
            problem = make_problem(layer, batch_size, classes, dtype, device)
            for op in operations_of(layer):
                bar.set_postfix_str(f"memory {layer.name} {op}")
                impls = implementations(op, problem, with_plain)
                peaks = min_peak_memories(
                    {name: partial(fn, problem) for name, (fn, _) in impls.items()},
                    device,
                    memory_rounds,
                )
                for name in impls:
                    row = next(measured)
                    assert row.implementation == name and row.operation == op
                    row.memory_bytes = peaks[name]
                bar.update()
            del problem
            if on_layer is not None:
                on_layer(results)
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


def device_name(device: torch.device) -> str:
    """What a run's ``meta`` records as its device (the GPU's name, or the CPU's)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def mismatches(results: List[Measurement], dtype: str) -> List[Measurement]:
    """Measurements whose result deviates from the TN's beyond ``dtype``'s tolerance.

    Each is printed as ``MISMATCH layer operation implementation: deviation``.
    """
    tolerance = 1e-4 if dtype == "float32" else 1e-10
    bad = [r for r in results if r.rel_error is not None and r.rel_error > tolerance]
    for r in bad:
        print(f"MISMATCH {r.layer} {r.operation} {r.implementation}: {r.rel_error:.2e}")
    return bad
