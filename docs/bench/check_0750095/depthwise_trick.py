"""Depthwise 7×7 weight VJP as one grouped convolution, against torch's kernel.

ConvNeXt-base's depthwise layers (batch 8): the kernel gradient of channel ``c`` is
``Σ_n xcorr(pad(x[n, c]), g[n, c])``, i.e. one convolution with the channels as groups
and the samples as input channels. Time (median of three timings of three calls) and
peak memory (least of two readings). Run pinned to one core::

    taskset -c 1 python docs/bench/check_0750095/depthwise_trick.py
"""

from __future__ import annotations

import timeit

import torch
import torch.nn.functional as F

from backpack_tn.bench.measure import peak_memory


def _calls(channels: int, size: int, n: int = 8, k: int = 7, pad: int = 3) -> dict:
    x = torch.randn(n, channels, size, size)
    g = torch.randn(n, channels, size, size)
    stand_in = torch.empty(1).expand(channels, 1, k, k)

    def kernel():
        return torch.ops.aten.convolution_backward(
            g,
            x,
            stand_in,
            None,
            (1, 1),
            (pad, pad),
            (1, 1),
            False,
            (0, 0),
            channels,
            (False, True, False),
        )[1]

    def grouped():
        padded = F.pad(x, (pad,) * 4).transpose(0, 1)  # [C, N, H+2p, W+2p]
        inputs = padded.reshape(1, channels * n, size + 2 * pad, size + 2 * pad)
        weight = g.transpose(0, 1)  # [C, N, O1, O2]
        return F.conv2d(inputs, weight, groups=channels).reshape(channels, 1, k, k)

    return {"kernel": kernel, "grouped convolution": grouped}


def main() -> None:
    """Print time, memory and the deviation per layer."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for channels, size in ((1024, 7), (512, 14), (256, 28)):
        calls = _calls(channels, size)
        error = (calls["grouped convolution"]() - calls["kernel"]()).abs().max()
        shown = []
        for label, call in calls.items():
            ms = sorted(timeit.repeat(call, number=3, repeat=3))[1] / 3 * 1e3
            mib = min(peak_memory(call, torch.device("cpu")) for _ in range(2)) / 2**20
            shown.append(f"{label} {ms:.2f} ms {mib:.1f} MiB")
        print(
            f"{channels} channels at {size}²: "
            + ", ".join(shown)
            + f" (max deviation {error:.1e})"
        )


if __name__ == "__main__":
    main()
