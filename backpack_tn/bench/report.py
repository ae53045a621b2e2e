"""Summaries and plots of layer-level benchmark results (JSON from ``--json``).

``python -m backpack_tn.bench.report RESULTS.json [--plot PREFIX]`` prints, per
operation, how ``backpack_tn`` (``tn``) compares with the *fastest* stock
implementation on every layer (the issue's "never slower" target), the geometric-mean
speed-up, the memory ratio and the median speed-up over unfolding (im2col, what the
paper compares with), and with ``--plot`` writes two PNGs (matplotlib):

* ``PREFIX_speedup.png`` — fastest-stock time / TN time per operation, one dot per
  layer, coloured by layer category (general / dense / mixed-dense / down-sampling);
* ``PREFIX_memory.png`` — TN vs stock peak extra memory (lowest-memory stock
  implementation), log-log with the diagonal.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from typing import Dict, List, Optional

CATEGORY_COLOURS = {
    "general": "tab:blue",
    "dense": "tab:orange",
    "mixed-dense": "tab:green",
    "down-sampling": "tab:red",
}
STOCK_IMPLEMENTATIONS = ("unfold", "backpack", "curvlinops", "torch")


def comparisons(results: List[dict]) -> List[dict]:
    """One row per (layer, operation): TN vs the fastest / leanest stock method.

    einconv is reported separately (it is a TN library, not what we replace).
    """
    groups: Dict[tuple, Dict[str, dict]] = defaultdict(dict)
    for r in results:
        groups[(r["layer"], r["operation"])][r["implementation"]] = r
    rows = []
    for (layer, op), impls in groups.items():
        tn = impls.get("tn")
        stock = [impls[n] for n in STOCK_IMPLEMENTATIONS if n in impls]
        if tn is None or not stock:
            continue
        fastest = min(stock, key=lambda r: r["time_s"])
        with_memory = [r for r in stock if r.get("memory_bytes") is not None]
        leanest = min(with_memory, key=lambda r: r["memory_bytes"], default=None)
        einconv = impls.get("einconv")
        unfold = impls.get("unfold")
        rows.append(
            dict(
                layer=layer,
                description=tn.get("description", ""),
                category=tn.get("category", "general"),
                operation=op,
                tn_time_s=tn["time_s"],
                fastest=fastest["implementation"],
                speedup=fastest["time_s"] / tn["time_s"],
                tn_memory=tn.get("memory_bytes"),
                stock_memory=None if leanest is None else leanest["memory_bytes"],
                leanest=None if leanest is None else leanest["implementation"],
                einconv_speedup=None
                if einconv is None
                else einconv["time_s"] / tn["time_s"],
                unfold_speedup=None
                if unfold is None
                else unfold["time_s"] / tn["time_s"],
            )
        )
    return rows


def geometric_mean(values: List[float]) -> Optional[float]:
    """Geometric mean (``None`` for no values)."""
    values = [v for v in values if v and v > 0]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summary(rows: List[dict], tolerance: float = 1.05) -> str:
    """Markdown summary per operation and the layers that miss the target."""
    lines = [
        "| operation | layers | geo-mean speed-up vs fastest stock | min | "
        f"layers slower than {tolerance:.2f}× | TN memory ≤ stock | vs einconv (min) "
        "| vs unfold (median) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_op: Dict[str, List[dict]] = defaultdict(list)
    for r in rows:
        by_op[r["operation"]].append(r)
    for op, op_rows in by_op.items():
        speedups = [r["speedup"] for r in op_rows]
        slower = sum(s < 1 / tolerance for s in speedups)
        mem = [r for r in op_rows if r["tn_memory"] is not None and r["stock_memory"]]
        leaner = sum(r["tn_memory"] <= r["stock_memory"] for r in mem)
        einconv = [r["einconv_speedup"] for r in op_rows if r["einconv_speedup"]]
        unfold = [r["unfold_speedup"] for r in op_rows if r["unfold_speedup"]]
        lines.append(
            f"| {op} | {len(op_rows)} | {geometric_mean(speedups):.2f}× | "
            f"{min(speedups):.2f}× | {slower} | {leaner}/{len(mem)} | "
            + (f"{min(einconv):.2f}× |" if einconv else "— |")
            + (f" {statistics.median(unfold):.2f}× |" if unfold else " — |")
        )
    overall = geometric_mean([r["speedup"] for r in rows])
    lines.append("")
    lines.append(
        f"Geometric-mean speed-up over all layers and operations: {overall:.2f}×"
    )
    misses = sorted(
        (r for r in rows if r["speedup"] < 1 / tolerance), key=lambda r: r["speedup"]
    )
    if misses:
        lines.append("")
        lines.append(f"Slower than the fastest stock implementation (> {tolerance}×):")
        lines.append("")
        for r in misses:
            lines.append(
                f"- {r['operation']} on {r['layer']} ({r['description']}): "
                f"{r['speedup']:.2f}× vs {r['fastest']}"
            )
    return "\n".join(lines)


def plot(rows: List[dict], prefix: str) -> List[str]:
    """Write the speed-up and memory plots; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    operations = list(dict.fromkeys(r["operation"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.2 * len(operations) + 3, 4.5))
    for i, op in enumerate(operations):
        op_rows = [r for r in rows if r["operation"] == op]
        for j, r in enumerate(op_rows):
            jitter = (j / max(len(op_rows) - 1, 1) - 0.5) * 0.5
            ax.scatter(
                i + jitter,
                r["speedup"],
                s=14,
                color=CATEGORY_COLOURS.get(r["category"], "grey"),
            )
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(operations)), operations, rotation=30, ha="right")
    ax.set_ylabel("fastest stock time / backpack_tn time")
    for category, colour in CATEGORY_COLOURS.items():
        ax.scatter([], [], color=colour, label=category)
    ax.legend(fontsize=8)
    fig.tight_layout()
    speed_file = f"{prefix}_speedup.png"
    fig.savefig(speed_file, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    pairs = [
        (r["stock_memory"] / 2**20, r["tn_memory"] / 2**20, r["category"])
        for r in rows
        if r["tn_memory"] and r["stock_memory"]
    ]
    for stock, tn, category in pairs:
        ax.scatter(stock, tn, s=14, color=CATEGORY_COLOURS.get(category, "grey"))
    if pairs:
        low = min(min(p[0], p[1]) for p in pairs) * 0.8
        high = max(max(p[0], p[1]) for p in pairs) * 1.2
        ax.plot([low, high], [low, high], color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("stock peak extra memory [MiB] (leanest stock)")
    ax.set_ylabel("backpack_tn peak extra memory [MiB]")
    fig.tight_layout()
    memory_file = f"{prefix}_memory.png"
    fig.savefig(memory_file, dpi=120)
    plt.close(fig)
    return [speed_file, memory_file]


def main(argv=None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m backpack_tn.bench.report",
        description="Summarise (and plot) layer-level benchmark JSON files.",
    )
    parser.add_argument("results", nargs="+", help="JSON files from --json")
    parser.add_argument("--plot", help="prefix of the PNG files to write")
    args = parser.parse_args(argv)
    results = []
    for path in args.results:
        with open(path) as f:
            results.extend(json.load(f)["results"])
    rows = comparisons(results)
    print(summary(rows))
    if args.plot:
        for name in plot(rows, args.plot):
            print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
