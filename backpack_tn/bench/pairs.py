"""Pairwise contraction steps: one planned ``bmm`` against ``torch.einsum``.

Runs the engine's operations on the zoo's layers, records every two-operand step its
contraction plans run (equation, operand shapes and strides), then times each step
both ways in one process, interleaved::

    python -m backpack_tn.bench.pairs --models 3c3d 2c2d allcnnc --batch-size 32
    python -m backpack_tn.bench.pairs --models resnet18 --batch-size 8 --all

By default only the steps the engine plans as a ``bmm`` are timed
(:func:`backpack_tn.tn.pairs.compile_pair`'s rules); ``--all`` times every step
``bmm`` can express (copies included), the measurement behind those rules.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import math
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from backpack_tn.bench.baselines import make_problem, tn_implementation
from backpack_tn.bench.zoo import ZOO, model_layers
from backpack_tn.tn import clear_caches
from backpack_tn.tn.pairs import compile_pair

#: The operations whose contractions run pairwise steps (forward and VJPs mostly run
#: torch's kernels).
OPERATIONS = (
    "per_sample_grad",
    "diag_ggn",
    "diag_ggn_per_sample",
    "kfac_expand",
    "kfac_reduce",
    "batch_l2",
)


def record_steps(
    models: Sequence[str], batch_size: int, classes: int = 10
) -> Dict[tuple, int]:
    """Every distinct two-operand step the engine's plans run on these models' layers.

    Returns:
        ``{(equation, shape_a, strides_a, shape_b, strides_b): count}``.
    """
    engine = importlib.import_module("backpack_tn.tn.evaluate")
    seen: Dict[tuple, int] = {}
    planner = engine.compile_pair

    def recording(equation, a, b, *args, **kwargs):
        key = (equation, tuple(a.shape), a.stride(), tuple(b.shape), b.stride())
        seen[key] = seen.get(key, 0) + 1
        return planner(equation, a, b, *args, **kwargs)

    clear_caches()  # plans made before would not record their steps
    engine.compile_pair = recording
    try:
        for model in models:
            for layer in model_layers(model):
                problem = make_problem(
                    layer, batch_size, classes, torch.float32, torch.device("cpu")
                )
                for op in OPERATIONS:
                    run = tn_implementation(op, True)
                    for _ in range(3):  # past the engine's measuring calls
                        run(problem)
    finally:
        engine.compile_pair = planner
        clear_caches()
    return seen


def _median(values: List[float]) -> float:
    return sorted(values)[len(values) // 2]


def time_steps(steps: Sequence[tuple], every: bool = False) -> List[dict]:
    """Median seconds of ``torch.einsum`` and of the planned ``bmm`` per step.

    Args:
        steps: Keys of :func:`record_steps`.
        every: Time every step ``bmm`` can express (``allow_copy``), not only those
            the engine plans.

    Returns:
        One row per planned step: equation, shapes, both times, their ratio.
    """
    rows = []
    for equation, shape_a, strides_a, shape_b, strides_b in steps:
        a = torch.empty_strided(shape_a, strides_a).normal_()
        b = torch.empty_strided(shape_b, strides_b).normal_()
        pair = compile_pair(equation, a, b, allow_copy=every)
        if pair is None:
            continue
        einsum = functools.partial(torch.einsum, equation, a, b)
        planned = functools.partial(pair, a, b)
        start = time.perf_counter()
        einsum()
        once = time.perf_counter() - start
        samples = max(3, min(50, int(0.2 / max(once, 1e-6))))
        times: Dict[str, List[float]] = {"einsum": [], "bmm": []}
        for _ in range(samples):  # interleaved: both see the same machine state
            for name, fn in (("einsum", einsum), ("bmm", planned)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        t_einsum, t_bmm = _median(times["einsum"]), _median(times["bmm"])
        rows.append(
            {
                "equation": equation,
                "shapes": (shape_a, shape_b),
                "einsum_s": t_einsum,
                "bmm_s": t_bmm,
                "speedup": t_einsum / t_bmm,
            }
        )
    return sorted(rows, key=lambda r: r["speedup"])


def main(argv: Optional[List[str]] = None) -> int:
    """Print the timed steps, slowest ratio first."""
    parser = argparse.ArgumentParser(
        prog="python -m backpack_tn.bench.pairs",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--models", nargs="+", choices=sorted(ZOO), default=["3c3d"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--all", action="store_true", help="every step bmm can express, copies too"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = record_steps(args.models, args.batch_size)
    rows = time_steps(list(steps), every=args.all)
    print(f"{len(steps)} distinct two-operand steps, {len(rows)} timed as a bmm")
    if rows:
        logs = [math.log(r["speedup"]) for r in rows]
        print(f"einsum / bmm: geo-mean {math.exp(sum(logs) / len(logs)):.2f}×")
    print("| einsum / bmm | equation | shapes | einsum [ms] | bmm [ms] |")
    print("|---:|---|---|---:|---:|")
    for r in rows:
        print(
            f"| {r['speedup']:.2f}× | `{r['equation']}` | {r['shapes'][0]} × "
            f"{r['shapes'][1]} | {1e3 * r['einsum_s']:.3f} | {1e3 * r['bmm_s']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
