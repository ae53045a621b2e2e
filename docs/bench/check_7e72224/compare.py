"""The zoo tables' missed rows next to their re-runs (run from the repository root).

A row misses if ``backpack_tn`` is slower than the fastest stock implementation by
more than 1.05x, or needs more than 1.05x and 64 KiB more memory than the leanest.
Prints the counts, then one markdown row per miss with its readings in the tables and
in the three re-runs.
"""

from __future__ import annotations

import collections
import glob
import json
from typing import Dict, Iterable, Optional, Set, Tuple

Row = Tuple[str, str]  # (layer, operation)
FOLDER = "docs/bench/check_7e72224"
RUNS = {
    "7a951fb": f"{FOLDER}/at_7a951fb",
    "7e72224": f"{FOLDER}/at_7e72224",
    "353b1dd": f"{FOLDER}/at_353b1dd",
}


def readings(files: Iterable[str], only: Optional[Set[Row]] = None) -> Dict[Row, dict]:
    """Per (layer, operation): our time and memory against the stock columns."""
    out = {}
    for path in files:
        with open(path) as f:
            results = json.load(f)["results"]
        rows: Dict[tuple, dict] = collections.defaultdict(dict)
        for r in results:
            rows[(r["layer"], r["description"], r["operation"])][
                r["implementation"]
            ] = r
        for (layer, description, op), by_impl in rows.items():
            ours = by_impl.get("tn")
            if (only is not None and (layer, op) not in only) or not ours:
                continue
            stock = [
                r
                for name, r in by_impl.items()
                if name not in ("tn", "tn_unsimplified", "einconv") and r.get("time_s")
            ]
            if ours.get("time_s") is None or not stock:
                continue
            best = min(stock, key=lambda r: r["time_s"])
            ratio = best["time_s"] / ours["time_s"]
            memories = [r["memory_bytes"] for r in stock if r.get("memory_bytes")]
            lean = min(memories) if memories else None
            ours_memory = ours.get("memory_bytes")
            memory_miss = (
                lean is not None
                and ours_memory is not None
                and ours_memory > 1.05 * lean
                and ours_memory - lean > 65536
            )
            out[(layer, op)] = dict(
                description=description,
                ratio=ratio,
                best=best["implementation"],
                slow=ratio < 1 / 1.05,
                memory=memory_miss,
                memory_ratio=None if lean is None else (ours_memory or 0) / lean,
                ours_ms=ours["time_s"] * 1e3,
                best_ms=best["time_s"] * 1e3,
                ours_mib=(ours_memory or 0) / 2**20,
                stock_mib=(lean or 0) / 2**20,
            )
    return out


def cell(reading: Optional[dict], kind: str) -> str:
    """A reading as a table cell: the ratio and the two values."""
    if reading is None:
        return "—"
    if kind == "time":
        return (
            f"{reading['ratio']:.2f}× ({reading['ours_ms']:.2f} vs "
            f"{reading['best_ms']:.2f} ms, {reading['best']})"
        )
    return (
        f"{reading['memory_ratio']:.2f}× ({reading['ours_mib']:.1f} vs "
        f"{reading['stock_mib']:.1f} MiB)"
    )


def main() -> None:
    """Print the counts and the table."""
    table = readings(sorted(glob.glob("docs/bench/zoo_*_cpu.json")))
    missed = {k for k, v in table.items() if v["slow"] or v["memory"]}
    runs = {
        name: readings(glob.glob(f"{folder}/*.json"), missed)
        for name, folder in RUNS.items()
    }
    print(
        f"table rows {len(table)}, missed {len(missed)}: "
        f"{sum(table[k]['slow'] for k in missed)} by time, "
        f"{sum(table[k]['memory'] for k in missed)} by memory"
    )
    for name, run in runs.items():
        print(
            f"re-run at {name}: {len(run)} rows, "
            f"{sum(v['slow'] for v in run.values())} by time, "
            f"{sum(v['memory'] for v in run.values())} by memory"
        )
    print()
    print(
        "| layer | operation | tables | " + " | ".join(f"at {n}" for n in runs) + " |"
    )
    print("|---|---|---|" + "---|" * len(runs))
    for key in sorted(missed):
        row = table[key]
        layer, op = key
        shape, size = row["description"].split(" @")
        for kind in ("time", "memory"):
            if not row["slow" if kind == "time" else "memory"]:
                continue
            cells = [cell(row, kind)] + [
                cell(run.get(key), kind) for run in runs.values()
            ]
            print(
                f"| {layer} ({shape} @{size}) | {op} {kind} | "
                + " | ".join(cells)
                + " |"
            )


if __name__ == "__main__":
    main()
