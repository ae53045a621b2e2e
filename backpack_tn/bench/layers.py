"""Benchmark convolution layers taken from real CNNs.

Each layer is described by its hyper-parameters and input shape, so no model (and no
torchvision) is needed to benchmark it; the source network is named for reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import nn

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@dataclass(frozen=True)
class Layer:
    """One convolution layer and the input it sees."""

    name: str
    source: str
    in_channels: int
    out_channels: int
    input_size: Tuple[int, ...]
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1

    @property
    def hyper(self) -> dict:
        """Hyper-parameters as keyword arguments of ``backpack_tn.functional``."""
        return dict(
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
        )

    @property
    def output_size(self) -> Tuple[int, ...]:
        """Spatial output size."""
        span = self.dilation * (self.kernel_size - 1) + 1
        return tuple(
            (i + 2 * self.padding - span) // self.stride + 1 for i in self.input_size
        )

    def module(self, dtype=torch.float32, device="cpu") -> nn.Module:
        """The ``nn.ConvNd`` with these hyper-parameters (random weights)."""
        conv = _CONV[len(self.input_size)]
        return conv(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            **self.hyper,
        ).to(dtype=dtype, device=device)

    def describe(self) -> str:
        """Short description, e.g. ``3x3 s2 p1 64→128 @56x56``."""
        size = "x".join(map(str, self.input_size))
        k = "x".join([str(self.kernel_size)] * len(self.input_size))
        groups = f" g{self.groups}" if self.groups > 1 else ""
        return (
            f"{k} s{self.stride} p{self.padding}{groups} "
            f"{self.in_channels}→{self.out_channels} @{size}"
        )


#: Six representative layers of real CNNs (torchvision definitions), plus the wide
#: late layer where curvlinops' averaged-pattern KFAC-reduce is hard to beat.
ENGINE_LAYERS = (
    Layer("3x3-s1", "ResNet-18 layer2", 128, 128, (28, 28), 3, 1, 1),
    Layer("3x3-s2", "ResNet-18 layer2.0.conv1", 64, 128, (56, 56), 3, 2, 1),
    Layer("1x1-s1", "MobileNet-v2 expansion", 24, 144, (56, 56), 1),
    Layer("1x1-s2", "ResNet-18 layer2 downsample", 64, 128, (56, 56), 1, 2),
    Layer("7x7-s2-stem", "ResNet-18 conv1", 3, 64, (224, 224), 7, 2, 3),
    Layer("4x4-s4-patchify", "ConvNeXt-base stem", 3, 128, (224, 224), 4, 4),
    Layer("dw3x3-s1", "MobileNet-v2 depthwise", 144, 144, (56, 56), 3, 1, 1, 1, 144),
    Layer("dw3x3-s2", "MobileNet-v2 depthwise", 144, 144, (56, 56), 3, 2, 1, 1, 144),
    Layer("3x3-s1-512", "ResNet-18 layer4", 512, 512, (7, 7), 3, 1, 1),
)
