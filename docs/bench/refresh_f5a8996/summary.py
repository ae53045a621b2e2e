"""Per-model summary of the zoo tables: rows, geo-mean, misses by time and by memory.

Run from the repository root: ``python docs/bench/refresh_f5a8996/summary.py``.
A row misses by time if the fastest stock implementation is more than 1.05× faster,
by memory if ours needs more than 1.05× and 64 KiB above the leanest stock reading
(the criteria of ``python -m backpack_tn.bench.recheck``).
"""

import json
import math

from backpack_tn.bench.report import comparisons

FILES = {
    "DeepOBS (3c3d, 2c2d, All-CNN-C)": ["zoo_deepobs_cpu"],
    "ResNet-18": ["zoo_resnet18_cpu"],
    "AlexNet, ConvNeXt-base": ["zoo_alexnet_convnext_cpu"],
    "MobileNet-v2": ["zoo_mobilenet_v2_cpu"],
    "Inception-v3": ["zoo_inception_v3_cpu"],
    "ResNeXt-101": ["zoo_resnext101_cpu", "zoo_resnext101_b_cpu"],
}
SLACK_BYTES = 64 * 2**10


def rows_of(names):
    """The comparison rows of these table files."""
    results = []
    for name in names:
        with open(f"docs/bench/{name}.json") as f:
            results += json.load(f)["results"]
    return comparisons(results)


def memory_miss(r) -> bool:
    """Whether ours needs more than 1.05× and 64 KiB above the leanest stock."""
    tn, stock = r["tn_memory"], r["stock_memory"]
    if tn is None or not stock:
        return False
    return tn > 1.05 * stock and tn - stock > SLACK_BYTES


def line(label, rows):
    """One markdown row: rows, geo-mean, misses by time and by memory."""
    geo = math.exp(sum(math.log(r["speedup"]) for r in rows) / len(rows))
    slow = sum(r["speedup"] < 1 / 1.05 for r in rows)
    heavy = sum(map(memory_miss, rows))
    return f"| {label} | {len(rows)} | {geo:.2f}× | {slow} | {heavy} |"


print("| models | rows | geo-mean speed-up | slower than 1.05× | memory above 1.05× |")
print("|---|---:|---:|---:|---:|")
everything = []
for label, names in FILES.items():
    rows = rows_of(names)
    everything += rows
    print(line(label, rows))
print(line("all nine", everything))
