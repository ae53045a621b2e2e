r"""Check the engine's cost model against measurements on real layers.

Every contraction the engine evaluates for the zoo's layers (KFAC factors, per-sample
gradients, batch L2, GGN diagonals) is recorded; each of its candidates is timed; then
the choice the cost model leads to — the cheapest estimate below the autotuning
threshold, the fastest measured among the plausible ones above it — is compared with
the fastest candidate, for the current constants and a grid of alternatives (and,
separately, the engine's actual rule, which may keep a leaner candidate within 10 %
of the fastest)::

    python -m backpack_tn.bench.calibrate --models 3c3d 2c2d allcnnc --batch-size 32 \\
        --json deepobs.json
    python -m backpack_tn.bench.calibrate --models mobilenet_v2 resnet18 --json b.json
    python -m backpack_tn.bench.calibrate --analyse deepobs.json b.json

The regret of a choice is its time over the fastest candidate's. Autotuning is
assumed to measure the plausible candidates as they were measured here.
Candidates are timed as autotuning times them (the generic executor, batch chunks as
the memory budget asks, results made contiguous), not as the prepared call that runs
afterwards; the choice between the engine's TN and torch's kernels or BackPACK's
trick (``functional``) is not covered.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import json
import math
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence
from unittest import mock

import torch

from backpack_tn import functional
from backpack_tn.bench.baselines import make_problem, tn_implementation
from backpack_tn.bench.measure import interleaved_medians
from backpack_tn.bench.zoo import ZOO, zoo_layers

# the module, not the function of the same name that ``backpack_tn.tn`` exports
_ev = importlib.import_module("backpack_tn.tn.evaluate")

#: Operations whose TN runs through the engine's candidates.
OPERATIONS = (
    "kfac_expand",
    "kfac_reduce",
    "per_sample_grad",
    "batch_l2",
    "diag_ggn",
    "diag_ggn_per_sample",
)


@contextmanager
def _constants(call: float, copy: float) -> Iterator[None]:
    """Both devices' cost constants set to ``call`` and ``copy`` (restored after)."""
    saved = _ev.CALL_COST, _ev.COPY_COST, _ev.CUDA_COSTS
    _ev.CALL_COST, _ev.COPY_COST = call, copy
    _ev.CUDA_COSTS = _ev.DeviceCosts(copy, call, saved[2].slack)
    try:
        yield
    finally:
        _ev.CALL_COST, _ev.COPY_COST, _ev.CUDA_COSTS = saved


def current_constants(device: str) -> tuple:
    """``(call, copy, threshold, prune, slack)`` the engine uses on ``device``."""
    costs = _ev.device_costs(torch.device(device))
    threshold = _ev._SETTINGS["autotune_min_flops"]
    return costs.call, costs.copy, threshold, _ev.AUTOTUNE_PRUNE, costs.slack


#: Constants the summary compares with the current ones, per device type.
GRIDS = {
    "cpu": ((2e5, 1e6, 2e6), (16.0, 64.0), (1e7, 2e6), (0.0, 2e8)),
    "cuda": ((1e8, 3e8, 1e9, 3e9), (32.0, 128.0, 512.0), (2e6,), (0.0, 2e10)),
}

#: Default of ``--max-cost`` per device type: on a GPU every torch call is priced at
#: 10⁹ (``evaluate.CUDA_COSTS``), so the CPU's bound would skip every contraction.
MAX_COST = {"cpu": 1e9, "cuda": 1e11}


def _cost_terms(formulations, shapes, dtype, device) -> List[List[float]]:
    """Per candidate: (FLOPs, torch calls, copied elements); costs are linear."""
    costs = {}
    for call, copy in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0)):
        with _constants(call, copy):
            costs[call, copy] = [
                c.cost for c in _ev.candidates(formulations, shapes, dtype, device)
            ]
    return [
        [base, calls - base, copies - base]
        for base, calls, copies in zip(
            costs[0.0, 0.0], costs[1.0, 0.0], costs[0.0, 1.0]
        )
    ]


def _run(candidate, tensors, chunks: int) -> torch.Tensor:
    return _ev._execute(candidate, tensors, chunks).contiguous()


def record(
    models: Sequence[str],
    max_layers: Optional[int],
    batch_size: int,
    classes: int,
    max_cost: float,
    repeats: int,
    device: torch.device,
    on_layer: Optional[Callable[[List[dict]], None]] = None,
) -> List[dict]:
    """Time every candidate of every recorded contraction (see the module docstring).

    ``on_layer`` gets the rows so far after every layer (e.g. to save them: a run
    stopped at a time limit keeps what it measured).
    """
    dtype = torch.float32
    rows: List[dict] = []
    for layer in zoo_layers(models)[:max_layers]:
        problem = make_problem(layer, batch_size, classes, dtype, device)
        for op in OPERATIONS:
            seen: Dict[tuple, tuple] = {}

            def spy(formulations, tensors, seen=seen):
                shapes = {k: tuple(t.shape) for k, t in tensors.items()}
                seen.setdefault(
                    (id(formulations), tuple(sorted(shapes.items()))),
                    (formulations, dict(tensors)),
                )
                return _ev.evaluate(formulations, tensors)

            # without autotuning, only the TN runs (not a torch-kernel alternative
            # whose choice may be cached) and no candidate is timed twice
            tuning = _ev.get_autotune()
            _ev.set_autotune(False)
            try:
                with mock.patch.object(functional, "evaluate", spy):
                    tn_implementation(op, True)(problem)
            finally:
                _ev.set_autotune(*tuning)
            for formulations, tensors in seen.values():
                shapes = {k: tuple(t.shape) for k, t in tensors.items()}
                options = _ev.candidates(formulations, shapes, dtype, device)
                if len(options) < 2 or min(c.cost for c in options) > max_cost:
                    continue
                runs = {
                    str(i): functools.partial(
                        _run, c, tensors, _ev._chunks(c, shapes, dtype)
                    )
                    for i, c in enumerate(options)
                }
                times = interleaved_medians(runs, device, repeats)
                rows.append(
                    dict(
                        layer=layer.name,
                        operation=op,
                        device=device.type,
                        candidates=[
                            f"{c.executor}/{c.network.strategy}/{c.network.label}"
                            for c in options
                        ],
                        terms=_cost_terms(formulations, shapes, dtype, device),
                        times=[times[str(i)] for i in range(len(options))],
                        memory=[c.memory for c in options],
                    )
                )
        del problem
        if on_layer is not None:
            on_layer(rows)
    return rows


def regret(
    rows: Sequence[dict],
    call: float,
    copy: float,
    threshold: float,
    prune: Optional[float] = None,
    slack: Optional[float] = None,
    memory_rule: bool = False,
) -> List[float]:
    """Time of the engine's choice over the fastest candidate's, per problem.

    Among the measured candidates the fastest is chosen, or with ``memory_rule`` the
    leaner of about equally fast ones (``evaluate.prefer_memory``; rows recorded with
    memory estimates only): the time that rule trades for memory, apart from the
    cost model's own misses.
    """
    out = []
    for row in rows:
        cost = [f + call * n + copy * e for f, n, e in row["terms"]]
        pick = min(range(len(cost)), key=cost.__getitem__)
        if cost[pick] >= threshold:
            measured = _ev.plausible(cost, prune, slack)
            times = [row["times"][i] for i in measured]
            if memory_rule and "memory" in row:
                memory = [row["memory"][i] for i in measured]
                pick = measured[_ev.prefer_memory(times, memory)]
            else:
                pick = measured[min(range(len(times)), key=times.__getitem__)]
        out.append(row["times"][pick] / min(row["times"]))
    return out


def summary(rows: Sequence[dict]) -> str:
    """Markdown table: regret of the choices for the current and other constants.

    The rows must come from one device type (rows recorded before the field existed
    count as CPU rows).
    """
    devices = {row.get("device", "cpu") for row in rows}
    if len(devices) != 1:
        raise ValueError(
            f"rows from {len(devices)} device types, summarise one at a time: "
            f"{sorted(devices)}"
        )
    device = devices.pop()
    current = current_constants(device)
    grid = [current]
    for call, copy, threshold, slack in itertools.product(
        *GRIDS.get(device, GRIDS["cpu"])
    ):
        setting = (call, copy, threshold, _ev.AUTOTUNE_PRUNE, slack)
        if setting not in grid:
            grid.append(setting)
    lines = [
        f"{len(rows)} contractions with several candidates ({device}).",
        "",
        "| CALL_COST | COPY_COST | threshold | prune | slack | geo-mean regret | "
        "choices > 1.05× slower | worst |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for setting in grid:
        values = regret(rows, *setting[:3], prune=setting[3], slack=setting[4])
        geo = math.exp(sum(map(math.log, values)) / len(values))
        bad = sum(v > 1.05 for v in values)
        mark = " (current)" if setting == current else ""
        lines.append(
            f"| {setting[0]:.0e}{mark} | {setting[1]:g} | {setting[2]:.0e} | "
            f"{setting[3]:g} | {setting[4]:.0e} | {geo:.3f} | {bad} | "
            f"{max(values):.2f}× |"
        )
    with_memory = [r for r in rows if "memory" in r]
    if with_memory:
        values = regret(
            with_memory, *current[:3], current[3], current[4], memory_rule=True
        )
        geo = math.exp(sum(map(math.log, values)) / len(values))
        bad = sum(v > 1.05 for v in values)
        lines += [
            "",
            f"With the memory tie-break (current constants, {len(values)} "
            f"contractions): geo-mean regret {geo:.3f}, {bad} choices > 1.05× "
            f"slower, worst {max(values):.2f}×.",
        ]
    worst = sorted(zip(regret(rows, *current), rows), key=lambda p: -p[0])
    lines += ["", "Worst choices with the current constants:", ""]
    for value, row in worst[:10]:
        if value <= 1.05:
            break
        pairs = zip(row["candidates"], row["times"])
        times = ", ".join(f"{name} {1e3 * t:.2f} ms" for name, t in pairs)
        lines.append(f"- {row['layer']} {row['operation']}: {value:.2f}× ({times})")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m backpack_tn.bench.calibrate",
        description="Time every candidate the engine considers on the zoo's layers "
        "and compare the engine's choices with the fastest.",
    )
    parser.add_argument("--models", nargs="+", choices=list(ZOO))
    parser.add_argument("--max-layers", type=int, help="only the first N layers")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument(
        "--max-cost",
        type=float,
        help="skip contractions whose cheapest estimate exceeds this (long runs; "
        "default 1e9 on a CPU, 1e11 on a GPU)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument(
        "--analyse", nargs="+", metavar="JSON", help="summarise saved measurements"
    )
    args = parser.parse_args(argv)
    rows: List[dict] = []
    if args.analyse:
        for path in args.analyse:
            with open(path) as f:
                saved = json.load(f)
            # rows written before they named their device: the run's --device
            kind = torch.device(saved.get("meta", {}).get("device") or "cpu").type
            for row in saved["rows"]:
                row.setdefault("device", kind)
            rows += saved["rows"]
    if args.models:
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)

        def save(recorded: List[dict]) -> None:
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"meta": vars(args), "rows": recorded}, f, indent=1)

        try:
            rows += record(
                args.models,
                args.max_layers,
                args.batch_size,
                args.classes,
                args.max_cost
                if args.max_cost is not None
                else MAX_COST.get(torch.device(args.device).type, 1e9),
                args.repeats,
                torch.device(args.device),
                on_layer=save,
            )
        finally:
            torch.set_num_threads(threads)
    if not rows:
        parser.error("nothing to summarise: give --models or --analyse")
    try:
        print(summary(rows))
    except ValueError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
