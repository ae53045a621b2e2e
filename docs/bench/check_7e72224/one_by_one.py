"""1×1 layers where the TN beat torch's kernel: the TN's GEMM vs a copy-free one.

The TN evaluates a 1×1 forward pass (input VJP) as one GEMM over the whole batch,
which needs a permuted copy of the input (output gradient); a batched matmul with the
kernel broadcast over the samples needs no copy. Median of five timings of five calls,
in ms, on the persistent memory rows of the re-check (batch 8). Run pinned to one
core::

    taskset -c 0 python docs/bench/check_7e72224/one_by_one.py
"""

from __future__ import annotations

import timeit

import torch

# (row, C_in, C_out, spatial size, forward or input VJP)
ROWS = [
    ("mobilenet_v2-24 input VJP", 576, 160, 7, "input_vjp"),
    ("mobilenet_v2-25 forward", 160, 960, 7, "forward"),
    ("mobilenet_v2-28 input VJP", 960, 320, 7, "input_vjp"),
    ("mobilenet_v2-28 forward", 960, 320, 7, "forward"),
    ("mobilenet_v2-29 forward", 320, 1280, 7, "forward"),
    ("mobilenet_v2-29 input VJP", 320, 1280, 7, "input_vjp"),
    ("resnext101-14 input VJP", 1024, 2048, 14, "input_vjp"),
    ("resnext101-16 forward", 2048, 2048, 7, "forward"),
]


def _calls(c_in: int, c_out: int, size: int, op: str, n: int = 8) -> dict:
    """Torch's kernel, the GEMM over the batch and the copy-free matmul of one row."""
    w = torch.randn(c_out, c_in)
    if op == "forward":
        x = torch.randn(n, c_in, size, size)
        flat = x.flatten(2)
        return {
            "kernel": lambda: torch.nn.functional.conv2d(x, w[:, :, None, None]),
            "GEMM over the batch": lambda: torch.einsum("oc,ncs->nos", w, flat),
            "copy-free matmul": lambda: torch.matmul(w, flat),
        }
    g = torch.randn(n, c_out, size, size)
    flat = g.flatten(2)
    shape = (n, c_in, size, size)
    return {
        "kernel": lambda: torch.nn.grad.conv2d_input(shape, w[:, :, None, None], g),
        "GEMM over the batch": lambda: torch.einsum("oc,nos->ncs", w, flat),
        "copy-free matmul": lambda: torch.matmul(w.t(), flat),
    }


def main() -> None:
    """Print the three times per row."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for name, c_in, c_out, size, op in ROWS:
        times = {}
        for label, call in _calls(c_in, c_out, size, op).items():
            for _ in range(3):
                call()
            times[label] = sorted(timeit.repeat(call, number=5, repeat=5))[2] / 5 * 1e3
        shown = ", ".join(f"{label} {ms:.2f}" for label, ms in times.items())
        print(f"{name}: {shown}")


if __name__ == "__main__":
    main()
