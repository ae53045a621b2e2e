r"""Re-run only the rows of saved layer-level results that missed a target.

A full zoo run takes hours on a CPU and most of a lent GPU's time; after a change
that targets the misses, re-measuring those rows is what tells whether they moved::

    python -m backpack_tn.bench.recheck docs/bench/zoo_*_cpu.json --json-dir OUT
    python -m backpack_tn.bench.recheck docs/bench/h200/zoo_*.json --device cuda \
        --json-dir OUT --no-memory

A row *misses* where ``backpack_tn`` is slower than the fastest stock implementation
by more than ``--tolerance`` (1.05×), or needs more than ``--tolerance`` times the
leanest stock implementation's memory and at least ``--min-memory`` bytes (64 KiB)
more: smaller differences are below what the CPU's resident-set readings resolve.
Each layer with a miss is re-run, for the operations that missed, with the batch size,
classes and dtype of the file it came from (its ``meta``). The re-run of each input
file is written to ``JSON_DIR`` under the same name, in the format of
``python -m backpack_tn.bench --json`` (``report`` reads it, ``merge --update``
puts it back into its table), and a table compares every missed row's reading before
and now. With ``--no-memory``, rows that missed by memory only are not re-run; rows
of layers the benchmark does not know are skipped (with a message), and neither kind
counts as fixed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from functools import partial
from typing import Dict, List, Optional, Sequence

import torch

from backpack_tn.bench import report
from backpack_tn.bench.layers import ENGINE_LAYERS, Layer
from backpack_tn.bench.measure import add_memory_rounds_argument
from backpack_tn.bench.run import (
    Measurement,
    device_name,
    mismatches,
    run_layers,
    save_json,
)
from backpack_tn.bench.zoo import ZOO, model_layers

#: Memory differences below this many bytes are not counted as misses.
MIN_MEMORY_BYTES = 1 << 16


def misses(
    rows: Sequence[dict], tolerance: float = 1.05, min_memory: int = MIN_MEMORY_BYTES
) -> Dict[tuple, List[str]]:
    """``{(layer, operation): kinds}`` of the missed rows (``'time'``, ``'memory'``).

    Args:
        rows: Comparisons from :func:`backpack_tn.bench.report.comparisons`.
        tolerance: Allowed ratio (time and memory).
        min_memory: Memory differences below this many bytes are no miss.
    """
    found: Dict[tuple, List[str]] = {}
    for r in rows:
        kinds = []
        if r["speedup"] < 1 / tolerance:
            kinds.append("time")
        ours, stock = r["tn_memory"], r["stock_memory"]
        if (
            ours is not None
            and stock is not None
            and ours > tolerance * stock
            and ours - stock >= min_memory
        ):
            kinds.append("memory")
        if kinds:
            found[(r["layer"], r["operation"])] = kinds
    return found


def find_layer(name: str) -> Layer:
    """The benchmark layer of a result's ``layer`` name (zoo or representative).

    Raises:
        ValueError: For a name that is neither.
    """
    for layer in ENGINE_LAYERS:
        if layer.name == name:
            return layer
    model, _, index = name.rpartition("-")
    if model in ZOO and index.isdigit():
        layers = model_layers(model)
        if int(index) < len(layers):
            return layers[int(index)]
    raise ValueError(f"Unknown benchmark layer {name!r}.")


def reading(row: Optional[dict], kind: str) -> str:
    """A comparison row's reading as a table cell (``kind``: time or memory)."""
    if row is None:
        return "—"
    if kind == "time":
        return (
            f"{row['speedup']:.2f}× ({1e3 * row['tn_time_s']:.2f} ms, {row['fastest']})"
        )
    if not _has_memory(row):
        return "not measured"
    ours, stock = row["tn_memory"], row["stock_memory"]
    ratio = f"{ours / stock:.2f}× " if stock else ""  # a reading of 0: no ratio
    return f"{ratio}({ours / 2**20:.1f} vs {stock / 2**20:.1f} MiB)"


def _has_memory(row: Optional[dict]) -> bool:
    return (
        row is not None
        and row["tn_memory"] is not None
        and row["stock_memory"] is not None
    )


def comparison(
    before: Sequence[dict],
    now: Sequence[dict],
    missed: Dict[tuple, List[str]],
    tolerance: float = 1.05,
    min_memory: int = MIN_MEMORY_BYTES,
) -> str:
    """Markdown: the counts, then every missed row's reading before and now.

    A missed row counts as re-measured if the re-run has it (for memory: with a
    memory reading); the others are counted apart, neither fixed nor missed.
    """
    old = {(r["layer"], r["operation"]): r for r in before}
    new = {(r["layer"], r["operation"]): r for r in now}
    still = misses(now, tolerance, min_memory)

    def measured(key: tuple, kind: str) -> bool:
        return key in new and (kind == "time" or _has_memory(new[key]))

    lines = []
    for kind in ("time", "memory"):
        rows = [key for key, kinds in missed.items() if kind in kinds]
        again = [key for key in rows if measured(key, kind)]
        left = sum(kind in still.get(key, ()) for key in again)
        line = f"- missed by {kind}: {len(rows)} before; re-measured {len(again)}"
        line += f", of which {left} still miss"
        if len(again) < len(rows):
            line += f"; {len(rows) - len(again)} not re-measured"
        lines.append(line)
    lines += [
        "",
        "| layer | operation | missed by | before | now |",
        "|---|---|---|---|---|",
    ]
    for key, kinds in sorted(missed.items()):
        layer, op = key
        description = old[key]["description"]
        for kind in kinds:
            lines.append(
                f"| {layer} ({description}) | {op} | {kind} | "
                f"{reading(old[key], kind)} | {reading(new.get(key), kind)} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    """Re-run the missed rows of each file and print the comparison.

    Returns:
        Exit status (non-zero if some implementation disagrees with the TN result).
    """
    parser = argparse.ArgumentParser(
        prog="python -m backpack_tn.bench.recheck",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("results", nargs="+", help="JSON files from bench --json")
    parser.add_argument(
        "--json-dir", required=True, help="write each file's re-run here (same name)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip memory")
    add_memory_rounds_argument(parser)
    parser.add_argument("--tolerance", type=float, default=1.05)
    parser.add_argument(
        "--min-memory",
        type=int,
        default=MIN_MEMORY_BYTES,
        help="memory differences below this many bytes are no miss",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [os.path.basename(path) for path in args.results]
    if len(set(names)) < len(names):
        parser.error("the result files must have distinct names (outputs share them)")
    # everything is looked up before any measurement: a lent GPU's time is short
    plans = []
    for path in args.results:
        with open(path) as f:
            saved = json.load(f)
        before = report.comparisons(saved["results"])
        missed = misses(before, args.tolerance, args.min_memory)
        ops: Dict[str, List[str]] = defaultdict(list)
        for (name, op), kinds in missed.items():
            if args.no_memory and kinds == ["memory"]:
                continue  # nothing to re-measure without memory readings
            ops[name].append(op)
        layers = {}
        for name in ops:
            try:
                layers[name] = find_layer(name)
            except ValueError as error:
                print(f"skipped: {error}", file=sys.stderr)
        plans.append((path, saved, before, missed, ops, layers))
    os.makedirs(args.json_dir, exist_ok=True)
    bad: List[Measurement] = []
    for path, saved, before, missed, ops, layers in plans:
        meta = dict(saved["meta"])
        meta.update(
            device=device_name(device),
            threads=args.threads,
            torch=torch.__version__,
            command="python -m backpack_tn.bench.recheck "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            rechecked=path,
        )
        out = os.path.join(args.json_dir, os.path.basename(path))
        # one run for all the layers: every timing before any memory reading (which
        # changes how malloc serves big blocks, see bench.measure)
        results = run_layers(
            [layer for _, layer in sorted(layers.items())],
            (),
            meta["batch_size"],
            meta.get("classes", 10),
            getattr(torch, meta.get("dtype", "float32")),
            device,
            args.repeats,
            measure_memory=not args.no_memory,
            with_plain=False,
            memory_rounds=args.memory_rounds,
            # saved as the run goes: a run stopped at a time limit keeps its rows
            on_layer=partial(save_json, path=out, meta=meta),
            layer_operations={name: sorted(ops[name]) for name in layers},
        )
        save_json(results, out, meta)
        now = report.comparisons([r.__dict__ for r in results])
        print(f"## {path} → {out}\n")
        print(comparison(before, now, missed, args.tolerance, args.min_memory))
        print()
        bad += mismatches(results, meta.get("dtype", "float32"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
