"""``python -m backpack_tn.bench``: layer-level benchmark of the TN engine."""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch

from backpack_tn.bench import report
from backpack_tn.bench.baselines import OPERATIONS
from backpack_tn.bench.layers import ENGINE_LAYERS
from backpack_tn.bench.measure import add_memory_rounds_argument
from backpack_tn.bench.run import (
    device_name,
    markdown_table,
    mismatches,
    run_layers,
    save_json,
)
from backpack_tn.bench.zoo import ZOO, zoo_layers


def main(argv=None) -> int:
    """Run the benchmark and print a markdown table.

    Args:
        argv: Command-line arguments (default: ``sys.argv``).

    Returns:
        Exit status (non-zero if some implementation disagrees with the TN result).
    """
    names = [layer.name for layer in ENGINE_LAYERS]
    parser = argparse.ArgumentParser(
        prog="python -m backpack_tn.bench",
        description="Compare backpack_tn's TN contractions with the unfold-based "
        "computations of BackPACK/curvlinops and with einconv, per layer of real CNNs.",
    )
    parser.add_argument(
        "--layers",
        nargs="+",
        choices=names,
        help="representative layers (default: all, unless --models is given)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(ZOO),
        help="benchmark every distinct Conv2d of these CNNs (torchvision definitions "
        "with weights=None, DeepOBS problems defined here)",
    )
    parser.add_argument(
        "--max-layers", type=int, help="only the first N layers (quick runs)"
    )
    parser.add_argument(
        "--skip-layers",
        type=int,
        default=0,
        help="skip the first N layers (split a long run into parts; the report "
        "command accepts several JSON files)",
    )
    parser.add_argument("--ops", nargs="+", choices=OPERATIONS, default=OPERATIONS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--classes", type=int, default=10, help="V of the GGN factor S (diag GGN)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip memory")
    add_memory_rounds_argument(parser)
    parser.add_argument("--no-plain", action="store_true", help="skip simplify=False")
    parser.add_argument("--json", help="write the measurements to this JSON file")
    parser.add_argument(
        "--plot", help="write PREFIX_speedup.png and PREFIX_memory.png (matplotlib)"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    layers = []
    if args.layers or not args.models:
        wanted = args.layers or names
        layers = [layer for layer in ENGINE_LAYERS if layer.name in wanted]
    if args.models:
        layers += zoo_layers(args.models)
    layers = layers[args.skip_layers :]
    if args.max_layers:
        layers = layers[: args.max_layers]
    meta = {
        "device": device_name(device),
        "threads": args.threads,
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "classes": args.classes,
        "dtype": args.dtype,
        "command": "python -m backpack_tn.bench " + " ".join(argv or sys.argv[1:]),
    }
    # with --json, what is measured is saved after every layer: a run stopped at a
    # time limit (a lent GPU) keeps its finished layers (memory ``null`` where the
    # memory pass, which follows all timings, had not reached them)
    results = run_layers(
        layers,
        args.ops,
        args.batch_size,
        args.classes,
        getattr(torch, args.dtype),
        device,
        args.repeats,
        measure_memory=not args.no_memory,
        with_plain=not args.no_plain,
        memory_rounds=args.memory_rounds,
        on_layer=partial(save_json, path=args.json, meta=meta) if args.json else None,
    )
    print(f"<!-- {meta} -->")
    print(markdown_table(results))
    rows = report.comparisons([r.__dict__ for r in results])
    print()
    print(report.summary(rows))
    if args.plot:
        report.plot(rows, args.plot)
    if args.json:
        save_json(results, args.json, meta)
    return 1 if mismatches(results, args.dtype) else 0


if __name__ == "__main__":
    sys.exit(main())
