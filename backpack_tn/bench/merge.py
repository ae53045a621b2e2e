"""Combine layer-level benchmark JSON files (``python -m backpack_tn.bench --json``).

Two ways, both writing one JSON file (and with ``--markdown`` the table and summary the
benchmark command prints):

* ``python -m backpack_tn.bench.merge OUT.json RUN1.json RUN2.json …`` — repeated
  runs of the same command: per measurement the fastest time of all runs. On a shared
  machine interference only ever slows a run down, so the minimum over runs (taken for
  every implementation alike) is the most faithful estimate. Memory and errors come
  from the last run.
* ``python -m backpack_tn.bench.merge --concat OUT.json PART1.json PART2.json …`` — a
  long run split into parts with ``--max-layers``/``--skip-layers``: the measurements
  one after the other, the metadata of the first part with ``command`` replaced by
  ``--command`` if given.
* ``python -m backpack_tn.bench.merge --update OUT.json BASE.json NEWER.json …`` —
  some operations re-run later (``--ops``) on the same layers: every (layer,
  operation) the newer files measured replaces the base's measurements of it, in
  place; the rest of the base stays. ``--command`` (required) records what was run.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional, Sequence

#: What identifies a measurement, and run metadata that need not agree.
_KEY = ("layer", "description", "operation", "implementation")
_VARYING_META = ("command", "runs", "merge", "parts", "rechecked")


def merge(paths: Sequence[str]) -> dict:
    """Merge runs of the same benchmark command (same measurements, same order).

    Args:
        paths: JSON files of the runs.

    Returns:
        The last run, with every time replaced by the minimum over runs (the single
        times under ``times_s``).

    Raises:
        ValueError: If the runs measured different things or ran with different
            settings (batch size, dtype, device, ...).
    """
    runs = [_load(path) for path in paths]
    _check_meta(runs)
    merged = runs[-1]
    keys = [_key(r) for r in merged["results"]]
    if any([_key(r) for r in run["results"]] != keys for run in runs):
        raise ValueError("the runs measured different things; use --concat")
    for i, result in enumerate(merged["results"]):
        times = [run["results"][i]["time_s"] for run in runs]
        result["time_s"] = min(times)
        result["times_s"] = times
    merged["meta"]["runs"] = len(runs)
    merged["meta"]["merge"] = "minimum time over runs"
    return merged


def concat(paths: Sequence[str], command: Optional[str] = None) -> dict:
    """Concatenate the parts of a split run.

    Args:
        paths: JSON files of the parts, in order.
        command: The command line to record (default: the first part's).

    Returns:
        One result set with all parts' measurements.

    Raises:
        ValueError: If the parts ran with different settings or overlap.
    """
    parts = [_load(path) for path in paths]
    _check_meta(parts)
    results = [r for p in parts for r in p["results"]]
    if len({_key(r) for r in results}) != len(results):
        raise ValueError("the parts overlap (a measurement appears twice)")
    meta = dict(parts[0]["meta"])
    if command is not None:
        meta["command"] = command
    meta["parts"] = len(parts)
    return {"meta": meta, "results": results}


def update(paths: Sequence[str], command: str) -> dict:
    """Replace a base run's measurements of the (layer, operation)s re-run later.

    A re-run row without a memory reading keeps the base's reading of the same
    implementation (a time-only re-run must not erase the memory column).

    Args:
        paths: The base JSON file, then the newer ones (applied in order).
        command: The command lines to record (base and re-runs).

    Returns:
        The base result set with the re-measured operations replaced.

    Raises:
        ValueError: If the runs ran with different settings, or a newer file
            measured a layer or operation the base does not have.
    """
    base, *newer = [_load(path) for path in paths]
    _check_meta([base, *newer])
    results = base["results"]
    for run in newer:
        groups: dict = {}
        for r in run["results"]:
            groups.setdefault(
                (r["layer"], r["description"], r["operation"]), []
            ).append(r)
        for group, rows in groups.items():
            where = [
                i
                for i, r in enumerate(results)
                if (r["layer"], r["description"], r["operation"]) == group
            ]
            if not where:
                raise ValueError(f"the base has no measurement of {group}")
            # a re-run without memory readings (--no-memory) keeps the base's
            old = {results[i]["implementation"]: results[i] for i in where}
            rows = [
                r
                if r.get("memory_bytes") is not None or r["implementation"] not in old
                else {**r, "memory_bytes": old[r["implementation"]].get("memory_bytes")}
                for r in rows
            ]
            keep = [r for i, r in enumerate(results) if i not in where]
            results = keep[: where[0]] + rows + keep[where[0] :]
    meta = dict(base["meta"])
    meta["command"] = command
    meta["merge"] = "operations re-run later replace the base's"
    return {"meta": meta, "results": results}


def _key(result: dict) -> tuple:
    return tuple(result.get(k) for k in _KEY)


def _check_meta(runs: Sequence[dict]) -> None:
    def settings(run: dict) -> dict:
        return {k: v for k, v in run["meta"].items() if k not in _VARYING_META}

    if any(settings(run) != settings(runs[0]) for run in runs):
        raise ValueError("the files come from runs with different settings")


def markdown(merged: dict) -> str:
    """The table and per-operation summary that the benchmark command prints."""
    from backpack_tn.bench import report
    from backpack_tn.bench.run import Measurement, markdown_table

    fields = Measurement.__dataclass_fields__
    measurements = [
        Measurement(**{k: v for k, v in r.items() if k in fields})
        for r in merged["results"]
    ]
    summary = report.summary(report.comparisons(merged["results"]))
    return f"<!-- {merged['meta']} -->\n{markdown_table(measurements)}\n\n{summary}\n"


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m backpack_tn.bench.merge",
        description="Combine layer-level benchmark JSON files: the minimum time over "
        "repeated runs (default) or the parts of a split run (--concat).",
    )
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("runs", nargs="+", help="JSON files from --json")
    parser.add_argument(
        "--concat", action="store_true", help="the inputs are parts of one run"
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="the first input is a base run, the others re-ran some of its operations",
    )
    parser.add_argument(
        "--command", help="command line to record (with --concat or --update)"
    )
    parser.add_argument("--markdown", help="also write the table and summary here")
    args = parser.parse_args(argv)
    if args.concat and args.update:
        parser.error("--concat and --update exclude each other")
    if args.command is not None and not (args.concat or args.update):
        parser.error("--command only applies with --concat or --update")
    if args.update:
        if args.command is None or len(args.runs) < 2:
            parser.error("--update needs a base, at least one newer run and --command")
        merged = update(args.runs, args.command)
    elif args.concat:
        merged = concat(args.runs, args.command)
    else:
        merged = merge(args.runs)
    with open(args.out, "w") as f:
        json.dump(merged, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(merged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
