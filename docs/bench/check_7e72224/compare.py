"""The zoo tables' missed rows next to their re-runs (run from the repository root).

A row misses as ``python -m backpack_tn.bench.recheck`` defines it: slower than the
fastest stock implementation by more than 1.05×, or more than 1.05× and 64 KiB more
memory than the leanest. Prints the counts, then one markdown row per miss with its
readings in the tables and in the three re-runs.
"""

from __future__ import annotations

import glob
import json
from typing import Dict, List

from backpack_tn.bench.recheck import misses, reading
from backpack_tn.bench.report import comparisons

FOLDER = "docs/bench/check_7e72224"
RUNS = {
    "7a951fb": f"{FOLDER}/at_7a951fb",
    "7e72224": f"{FOLDER}/at_7e72224",
    "353b1dd": f"{FOLDER}/at_353b1dd",
}


def rows(pattern: str) -> Dict[tuple, dict]:
    """Comparison rows of every file matching ``pattern``, by (layer, operation)."""
    results: List[dict] = []
    for path in sorted(glob.glob(pattern)):
        with open(path) as f:
            results += json.load(f)["results"]
    return {(r["layer"], r["operation"]): r for r in comparisons(results)}


def main() -> None:
    """Print the counts and the table."""
    table = rows("docs/bench/zoo_*_cpu.json")
    missed = misses(list(table.values()))
    runs = {name: rows(f"{folder}/*.json") for name, folder in RUNS.items()}
    total = {kind: sum(kind in kinds for kinds in missed.values()) for kind in KINDS}
    print(
        f"table rows {len(table)}, missed {len(missed)}: "
        f"{total['time']} by time, {total['memory']} by memory"
    )
    still = {name: misses(list(run.values())) for name, run in runs.items()}
    for name, found in still.items():
        counts = {
            kind: sum(kind in found.get(key, ()) for key in missed) for kind in KINDS
        }
        print(
            f"re-run at {name}: {counts['time']} by time, {counts['memory']} by memory"
        )
    print()
    print(
        "| layer | operation | tables | " + " | ".join(f"at {n}" for n in runs) + " |"
    )
    print("|---|---|---|" + "---|" * len(runs))
    for key, kinds in sorted(missed.items()):
        layer, op = key
        for kind in kinds:
            cells = [reading(table[key], kind)]
            cells += [reading(run.get(key), kind) for run in runs.values()]
            description = table[key]["description"]
            print(
                f"| {layer} ({description}) | {op} {kind} | " + " | ".join(cells) + " |"
            )


KINDS = ("time", "memory")

if __name__ == "__main__":
    main()
