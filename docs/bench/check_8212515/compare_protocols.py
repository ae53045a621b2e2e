"""Zoo rows measured with the old benchmark protocol against the fixed one.

Old: warm-up of up to five calls, glibc's dynamic mmap threshold; new: 50 ms of
warm-up, one fixed allocator state. Row by row, per file: ``OLD_DIR/NAME`` against
``NEW_DIR/NAME``. Run from the repository root::

    python docs/bench/check_8212515/compare_protocols.py docs/bench/check_e8b2a0a \
        docs/bench/check_8212515 zoo_deepobs_cpu.json zoo_resnet18_cpu.json
    python docs/bench/check_8212515/compare_protocols.py docs/bench \
        docs/bench/check_0750095 zoo_alexnet_convnext_cpu.json zoo_mobilenet_v2_cpu.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from typing import Dict, Tuple

from backpack_tn.bench.recheck import misses
from backpack_tn.bench.report import comparisons, geometric_mean


def rows(path: str) -> Dict[tuple, dict]:
    """Comparison rows of one file by (layer, operation)."""
    with open(path) as f:
        results = json.load(f)["results"]
    return {(r["layer"], r["operation"]): r for r in comparisons(results)}


def summary(by_key: Dict[tuple, dict]) -> Dict[str, Tuple[int, float, float, int, int]]:
    """Per operation: rows, geo-mean speed-up, minimum, time misses, memory misses."""
    missed = misses(list(by_key.values()))
    per_op: Dict[str, list] = defaultdict(list)
    for key, row in by_key.items():
        per_op[row["operation"]].append((key, row))
    out = {}
    for op, items in per_op.items():
        speedups = [row["speedup"] for _, row in items]
        kinds = [missed.get(key, []) for key, _ in items]
        out[op] = (
            len(items),
            geometric_mean(speedups),
            min(speedups),
            sum("time" in k for k in kinds),
            sum("memory" in k for k in kinds),
        )
    return out


def main(old_dir: str, new_dir: str, names) -> None:
    """Print one table per file: old → new per operation, then the new misses."""
    for name in names:
        old, new = rows(f"{old_dir}/{name}"), rows(f"{new_dir}/{name}")
        common = sorted(set(old) & set(new))
        old = {k: old[k] for k in common}
        new = {k: new[k] for k in common}
        before, after = summary(old), summary(new)
        speed = [
            geometric_mean([r["speedup"] for r in run.values()]) for run in (old, new)
        ]
        slow = [
            len([k for k, v in misses(list(run.values())).items() if "time" in v])
            for run in (old, new)
        ]
        print(
            f"## {name}: {len(common)} rows; geo-mean {speed[0]:.2f}× → "
            f"{speed[1]:.2f}×; slower than 1.05×: {slow[0]} → {slow[1]}\n"
        )
        print(
            "| operation | rows | geo-mean | min | slower than 1.05× | memory misses |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for op, (n, g0, m0, s0, k0) in before.items():
            _, g1, m1, s1, k1 = after[op]
            print(
                f"| {op} | {n} | {g0:.2f} → {g1:.2f}× | {m0:.2f} → {m1:.2f}× "
                f"| {s0} → {s1} | {k0} → {k1} |"
            )
        late = sorted(
            (r["speedup"], k) for k, r in new.items() if r["speedup"] < 1 / 1.05
        )
        print(
            "\nslower than 1.05× now: "
            + ", ".join(f"{layer} {op} {s:.2f}×" for s, (layer, op) in late)
            + "\n"
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
