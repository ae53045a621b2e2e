"""Merge repeated benchmark runs: per measurement the fastest time of all runs.

``python -m backpack_tn.bench.merge OUT.json RUN1.json RUN2.json …`` — on a shared
machine, interference only ever slows a run down, so the minimum over runs (taken for
every implementation alike) is the most faithful estimate. Memory and errors come from
the last run.
"""

from __future__ import annotations

import json
import sys


def merge(paths):
    """Merge runs of the same benchmark command (same measurements, same order)."""
    runs = [json.load(open(path)) for path in paths]
    merged = runs[-1]
    for i, result in enumerate(merged["results"]):
        times = [run["results"][i]["time_s"] for run in runs]
        assert all(
            run["results"][i]["implementation"] == result["implementation"]
            for run in runs
        ), "runs differ"
        result["time_s"] = min(times)
        result["times_s"] = times
    merged["meta"]["runs"] = len(runs)
    merged["meta"]["merge"] = "minimum time over runs"
    return merged


def main(argv=None) -> int:
    """Command-line entry point."""
    out, *paths = argv if argv is not None else sys.argv[1:]
    with open(out, "w") as f:
        json.dump(merge(paths), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
