"""Time every candidate that ``kfac_input_factor`` measures for KFAC-expand.

``python -m backpack_tn.bench.candidates [--repeats 3] [--layer 8x512x7x7:k3:s1:p1 …]``

``kfac_input_factor(approx='expand')`` times its candidates once per problem and keeps
the fastest (:func:`backpack_tn.tn.evaluate.fastest`): the tensor network (which the
engine evaluates as a block-triangular Gram, :mod:`backpack_tn.tn.gram`), for
stride 1 the shift-structured Gram and for large strided kernels the polyphase Gram
(:mod:`backpack_tn.tn.shifts`). This prints each
candidate's best-of-``repeats`` time per layer, so the choice can be checked; with
``--plain-gemm`` also the TN evaluated by a full GEMM (``gram_form`` switched off).
Default layers: ResNet-18 / ResNeXt-like shapes at batch 8.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from backpack_tn import functional as tnf
from backpack_tn.tn.evaluate import gram_recognition

DEFAULT_LAYERS = [
    "8x64x56x56:k3:s1:p1",
    "8x256x14x14:k3:s1:p1",
    "8x512x7x7:k3:s1:p1",
    "8x3x224x224:k7:s2:p3",
    "8x128x28x28:k3:s2:p1",
    "8x256x14x14:k3:s2:p1",
    "8x256x28x28:k1:s1:p0",
    "8x1024x14x14:k1:s1:p0",
    "8x2048x7x7:k1:s1:p0",
]


def _full_gemm(run: Callable[[], Tensor]) -> Tensor:
    """``run`` with the engine's Gram recognition off: a full GEMM (reference)."""
    with gram_recognition(False):
        return run()


def time_candidates(
    spec: str, repeats: int, plain_gemm: bool = False
) -> Dict[str, float]:
    """Best-of-``repeats`` seconds of every KFAC-expand candidate on one layer.

    Args:
        spec: ``NxCxHxW:kK:sS:pP:dD`` (batch, channels, input size; kernel, stride,
            padding, dilation; all but the kernel optional).
        repeats: Timed runs per candidate (interleaved, after one untimed run each).
        plain_gemm: Also time the TN as a full GEMM (``'tn-full-gemm'``).

    Returns:
        Seconds by candidate name (``'tn'`` always).

    Raises:
        ValueError: For a malformed spec.
    """
    shape, *hyper = spec.split(":")
    options = {h[0]: int(h[1:]) for h in hyper}
    if "k" not in options or set(options) - set("ksdp"):
        raise ValueError(f"expected NxCxHxW:kK[:sS][:pP][:dD], got {spec!r}")
    x = torch.randn(*map(int, shape.split("x")))
    geometry, group = tnf._kfac_input(
        x,
        options["k"],
        options.get("s", 1),
        options.get("p", 0),
        options.get("d", 1),
        1,
        "zeros",
        "average",
    )
    grouped = group(x)
    runs = {
        name: functools.partial(run, grouped)
        for name, run in tnf._kfac_runs(geometry, "expand", True, x.shape[1]).items()
    }
    if plain_gemm:
        runs["tn-full-gemm"] = functools.partial(_full_gemm, runs["tn"])
    for run in runs.values():  # first calls plan, autotune and allocate
        run()
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            run()  # untimed: the other candidate's freed buffers cost page faults
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m backpack_tn.bench.candidates",
        description="Time every candidate kfac_input_factor measures (KFAC-expand).",
    )
    parser.add_argument(
        "--layer", nargs="+", default=DEFAULT_LAYERS, help="NxCxHxW:kK[:sS][:pP][:dD]"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--plain-gemm", action="store_true", help="also the TN as a full GEMM"
    )
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or 1)
    try:
        names = ["tn", "shift", "polyphase"] + ["tn-full-gemm"] * args.plain_gemm
        print("| layer | " + " | ".join(f"{n} [ms]" for n in names) + " |")
        print("|---|" + "---:|" * len(names))
        for spec in args.layer:
            times = time_candidates(spec, args.repeats, args.plain_gemm)
            cells = [times.get(n) for n in names]
            row = " | ".join("—" if t is None else f"{1e3 * t:.1f}" for t in cells)
            print(f"| {spec} | {row} |")
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
