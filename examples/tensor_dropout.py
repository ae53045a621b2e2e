"""Tensor dropout on All-CNN-C: gradient error vs saved memory, spatial vs channel.

All-CNN-C (Springenberg et al., 2015) for CIFAR-100 shapes (3×32×32 inputs, 100
classes), untrained, on SYNTHETIC data (standard-normal images, uniform labels): the
question is how well the sub-sampled weight gradient approximates the exact one, which
needs no real data. For every keep probability ``p`` and both ways of sampling —
``spatial`` (each of the two spatial input axes kept with probability ``p``, so a
fraction ``p²`` of every convolution input is saved) and ``channel`` (input channels
kept with probability ``p``) — it measures

* the relative error ``‖ĝ − g‖ / ‖g‖`` of the convolution weight gradients (all conv
  layers concatenated; biases are exact anyway), mean over ``--seeds`` masks;
* the bytes the convolutions save for backward (their input slices; measured with
  ``torch.autograd.graph.saved_tensors_hooks``), relative to exact autograd; and the
  whole model's saved bytes (unique storages), once with torch's ReLU (which keeps its
  output, i.e. the next convolution's full input, alive) and once with a ReLU that
  saves a boolean mask instead;
* the backward time relative to exact autograd (median of ``--repeats``).

``python examples/tensor_dropout.py --out docs/dropout`` writes ``tensor_dropout.png``
and ``tensor_dropout.md`` there; ``--quick`` is a tiny run for the tests.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from typing import Dict, List

import torch
from torch import nn

from backpack_tn import dropout as tnd
from backpack_tn.bench.models import all_cnn_c

AXES = ("spatial", "channel")


class _MaskReLUFunction(torch.autograd.Function):
    """ReLU that saves a boolean mask (1 byte/entry) instead of its output."""

    @staticmethod
    def forward(ctx, x):
        positive = x > 0
        ctx.save_for_backward(positive)
        return x * positive

    @staticmethod
    def backward(ctx, grad):
        (positive,) = ctx.saved_tensors
        return grad * positive


class MaskReLU(nn.Module):
    """``nn.ReLU`` whose backward needs only the sign pattern of its input."""

    def forward(self, x):
        return _MaskReLUFunction.apply(x)


def mask_relus(model: nn.Module) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.ReLU):
            setattr(model, name, MaskReLU())
        else:
            mask_relus(child)
    return model


def conv_weights(model: nn.Module) -> List[nn.Parameter]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]


def weight_gradient(model: nn.Module, x, y) -> torch.Tensor:
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, conv_weights(model))
    return torch.cat([g.flatten() for g in grads])


def saved_bytes(model: nn.Module, x) -> Dict[str, int]:
    """Bytes saved for backward by one forward pass: by the convolutions, in total.

    Parameters are not counted (they live anyway). Tensors sharing a storage (a ReLU
    output that is also the next convolution's input) count once in the total.
    """
    params = {p.data_ptr() for p in model.parameters()}
    inside_conv = [False]
    records = []

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            records.append((storage.data_ptr(), storage.nbytes(), inside_conv[0]))
        return t

    def enter(*_):
        inside_conv[0] = True

    def leave(*_):
        inside_conv[0] = False

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles += [
                m.register_forward_pre_hook(enter),
                m.register_forward_hook(leave),
            ]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    for h in handles:
        h.remove()
    del out
    conv = {ptr: n for ptr, n, in_conv in records if in_conv}
    total = {ptr: n for ptr, n, _ in records}
    return {"conv": sum(conv.values()), "total": sum(total.values())}


def _one_backward(model, x, y) -> float:
    loss = nn.functional.cross_entropy(model(x), y)
    start = time.perf_counter()
    loss.backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def backward_times(exact: nn.Module, other: nn.Module, x, y, repeats: int):
    """Median ``loss.backward()`` times (forward not timed) of two models.

    The two are timed alternately, so a change in background load hits both.
    """
    _one_backward(exact, x, y)  # warm-up: caches, allocator
    _one_backward(other, x, y)
    pairs = [
        (_one_backward(exact, x, y), _one_backward(other, x, y)) for _ in range(repeats)
    ]
    return statistics.median(p[0] for p in pairs), statistics.median(
        p[1] for p in pairs
    )


def run(args) -> List[dict]:
    torch.manual_seed(0)
    model = all_cnn_c(num_classes=100)
    x = torch.randn(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 100, (args.batch_size,))
    exact = weight_gradient(model, x, y)
    exact_saved = saved_bytes(model, x)
    exact_saved_mask = saved_bytes(mask_relus(copy.deepcopy(model)), x)
    exact_times = []
    rows = []
    for axes in AXES:
        for p in args.keep_probs:
            converted = tnd.convert(copy.deepcopy(model), keep_prob=p, axes=axes)
            errors = []
            for seed in range(args.seeds):
                gen = torch.Generator().manual_seed(seed)
                for m in converted.modules():
                    if isinstance(m, nn.Conv2d):
                        m.generator = gen
                g = weight_gradient(converted, x, y)
                errors.append(float((g - exact).norm() / exact.norm()))
            saved = saved_bytes(converted, x)
            saved_mask = saved_bytes(mask_relus(copy.deepcopy(converted)), x)
            rows.append(
                dict(
                    axes=axes,
                    keep_prob=p,
                    error=statistics.mean(errors),
                    error_std=statistics.stdev(errors) if len(errors) > 1 else 0.0,
                    conv_memory=saved["conv"] / exact_saved["conv"],
                    total_memory=saved["total"] / exact_saved["total"],
                    total_memory_mask=saved_mask["total"] / exact_saved_mask["total"],
                )
            )
            t_exact, t_dropout = backward_times(model, converted, x, y, args.repeats)
            exact_times.append(t_exact)
            rows[-1]["time"] = t_dropout / t_exact
            r = rows[-1]
            print(
                f"{axes:8s} p={p:<5} error {r['error']:.3f}  conv memory "
                f"{r['conv_memory']:.3f}  backward time {r['time']:.2f}x",
                flush=True,
            )
    return rows, exact_saved, statistics.median(exact_times)


def table(rows, exact_saved, exact_time, args) -> str:
    lines = [
        f"All-CNN-C, CIFAR-100 shapes, synthetic data, batch size {args.batch_size}, "
        f"{args.seeds} seeds, float32, CPU ({platform.processor() or 'unknown'}, "
        f"{torch.get_num_threads()} threads), torch {torch.__version__}.",
        "",
        f"Exact autograd: convolutions save {exact_saved['conv'] / 2**20:.1f} MiB, the "
        f"model {exact_saved['total'] / 2**20:.1f} MiB (unique storages); backward "
        f"{exact_time * 1e3:.0f} ms (median of {args.repeats}).",
        "",
        "| axes | keep_prob | rel. error ‖ĝ−g‖/‖g‖ (mean ± std) | conv saved "
        "(rel.) | model saved, torch ReLU (rel.) | model saved, mask ReLU (rel.) | "
        "backward time (rel.) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['axes']} | {r['keep_prob']} | {r['error']:.3f} ± "
            f"{r['error_std']:.3f} | {r['conv_memory']:.3f} | "
            f"{r['total_memory']:.3f} | {r['total_memory_mask']:.3f} | "
            f"{r['time']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def verdict(rows) -> str:
    """Compare the axes at equal conv memory by interpolating the error curves."""
    import numpy as np

    curves = {}
    for axes in AXES:
        pts = sorted((r["conv_memory"], r["error"]) for r in rows if r["axes"] == axes)
        curves[axes] = (np.array([m for m, _ in pts]), np.array([e for _, e in pts]))
    lo = max(c[0].min() for c in curves.values())
    hi = min(c[0].max() for c in curves.values())
    if lo >= hi:
        return "The memory ranges of the two sampling schemes do not overlap."
    grid = np.linspace(lo, hi, 20)
    spatial = np.interp(grid, *curves["spatial"])
    channel = np.interp(grid, *curves["channel"])
    share = float((spatial < channel).mean())
    return (
        f"At equal convolution memory (interpolated over {lo:.2f}–{hi:.2f} of exact), "
        f"spatial sampling has the lower error on {share:.0%} of the range "
        f"(mean error ratio spatial/channel {float((spatial / channel).mean()):.2f})."
    )


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for axes, marker in zip(AXES, "os"):
        sel = [r for r in rows if r["axes"] == axes]
        mem = [r["conv_memory"] for r in sel]
        ax1.errorbar(
            mem,
            [r["error"] for r in sel],
            yerr=[r["error_std"] for r in sel],
            marker=marker,
            label=axes,
            capsize=3,
        )
        for r in sel:
            ax1.annotate(
                f"p={r['keep_prob']}",
                (r["conv_memory"], r["error"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax2.plot(mem, [r["time"] for r in sel], marker=marker, label=axes)
    ax1.set_xlabel("bytes saved by the convolutions (relative to exact)")
    ax1.set_ylabel("relative gradient error ‖ĝ−g‖/‖g‖")
    ax1.set_title("All-CNN-C (CIFAR-100 shapes, synthetic data)")
    ax2.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax2.set_xlabel("bytes saved by the convolutions (relative to exact)")
    ax2.set_ylabel("backward time (relative to exact autograd)")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--keep-probs", type=float, nargs="+", default=[0.9, 0.75, 0.5, 0.25, 0.1]
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="docs/dropout")
    parser.add_argument("--quick", action="store_true", help="tiny run (for tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.seeds, args.repeats = 2, 2, 1
        args.keep_probs = [0.75, 0.5, 0.25, 0.1]
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, exact_saved, exact_time = run(args)
    os.makedirs(args.out, exist_ok=True)
    text = table(rows, exact_saved, exact_time, args) + "\n" + verdict(rows) + "\n"
    with open(os.path.join(args.out, "tensor_dropout.md"), "w") as f:
        f.write(text)
    plot(rows, os.path.join(args.out, "tensor_dropout.png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
