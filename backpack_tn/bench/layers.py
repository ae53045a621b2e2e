"""Benchmark convolution layers taken from real CNNs.

Each layer is described by its hyper-parameters and input shape, so no model (and no
torchvision) is needed to benchmark it; the source network is named for reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple, Union

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
    kernel_size: Union[int, Tuple[int, ...]]
    stride: Union[int, Tuple[int, ...]] = 1
    padding: Union[int, str, Tuple[int, ...]] = 0
    dilation: Union[int, Tuple[int, ...]] = 1
    groups: int = 1

    def _per_dim(self, value) -> Tuple[int, ...]:
        if isinstance(value, int):
            return (value,) * len(self.input_size)
        return tuple(value)

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
        if self.padding == "same":
            return tuple(self.input_size)
        padding = 0 if self.padding == "valid" else self.padding
        return tuple(
            (i + 2 * p - d * (k - 1) - 1) // s + 1
            for i, k, s, p, d in zip(
                self.input_size,
                self._per_dim(self.kernel_size),
                self._per_dim(self.stride),
                self._per_dim(padding),
                self._per_dim(self.dilation),
            )
        )

    @property
    def category(self) -> str:
        """The paper's layer category: general, dense, mixed-dense or down-sampling.

        Per dimension a kernel is *dense* if it tiles the input without overlap or gap
        (``K = S``, no padding or dilation; 1×1 stride 1 included), *down-sampling* if
        it is a single tap skipping positions (``K = 1 < S``), else *general*.
        """
        padding = 0 if self.padding in ("same", "valid") else self.padding
        kinds = set()
        for k, s, p, d in zip(
            self._per_dim(self.kernel_size),
            self._per_dim(self.stride),
            self._per_dim(padding),
            self._per_dim(self.dilation),
        ):
            if k == 1 and s > 1:
                kinds.add("down-sampling")
            elif k == s and p == 0 and (d == 1 or k == 1) and self.padding != "same":
                kinds.add("dense")
            else:
                kinds.add("general")
        if kinds == {"general"}:
            return "general"
        if "general" in kinds:
            return "mixed-dense"
        return "down-sampling" if "down-sampling" in kinds else "dense"

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

        def fmt(value) -> str:
            dims = self._per_dim(value) if not isinstance(value, str) else (value,)
            return "x".join(map(str, dims)) if len(set(dims)) > 1 else str(dims[0])

        size = "x".join(map(str, self.input_size))
        k = "x".join(map(str, self._per_dim(self.kernel_size)))
        groups = f" g{self.groups}" if self.groups > 1 else ""
        dilation = f" d{fmt(self.dilation)}" if fmt(self.dilation) != "1" else ""
        return (
            f"{k} s{fmt(self.stride)} p{fmt(self.padding)}{dilation}{groups} "
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
