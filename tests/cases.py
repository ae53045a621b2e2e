"""Convolution configurations shared by the tests, and independent reference code.

References use only torch (``nn.ConvNd``, ``F.pad``, autograd) and ``unfoldNd``, never
``backpack_tn``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from unfoldNd import unfoldNd

INPUT_SIZES = {1: (9,), 2: (9, 7), 3: (6, 5, 4)}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@dataclass(frozen=True)
class Case:
    """One convolution configuration."""

    name: str
    dims: int
    kernel_size: Union[int, Tuple[int, ...]]
    stride: Union[int, Tuple[int, ...]] = 1
    padding: Union[int, str, Tuple[int, ...]] = 0
    dilation: Union[int, Tuple[int, ...]] = 1
    groups: int = 1
    padding_mode: str = "zeros"
    c_in: int = 4
    c_out: int = 6
    batch: int = 3
    input_size: Tuple[int, ...] = field(default=())

    @property
    def id(self) -> str:
        return f"{self.dims}d-{self.name}"

    @property
    def size(self) -> Tuple[int, ...]:
        return self.input_size or INPUT_SIZES[self.dims]

    @property
    def hyper(self) -> dict:
        return dict(
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            padding_mode=self.padding_mode,
        )

    def geometry(self):
        """The engine's geometry of this configuration."""
        from backpack_tn.tn import make_geometry

        return make_geometry(
            self.size,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.padding_mode,
        )

    def module(self, dtype=torch.float64, bias=True) -> nn.Module:
        torch.manual_seed(1)
        return CONV[self.dims](
            self.c_in, self.c_out, self.kernel_size, bias=bias, **self.hyper
        ).to(dtype)

    def input(self, dtype=torch.float64) -> Tensor:
        torch.manual_seed(2)
        return torch.randn(self.batch, self.c_in, *self.size, dtype=dtype)


# name, kernel, stride, padding, dilation, groups, padding_mode, extra
_BASE = [
    ("k3-s1-p1", 3, 1, 1, 1, 1, "zeros", {}),
    ("k3-s2-p0", 3, 2, 0, 1, 1, "zeros", {}),
    ("k3-s2-p1", 3, 2, 1, 1, 1, "zeros", {}),
    ("k3-s3-p1-d2", 3, 3, 1, 2, 1, "zeros", {}),
    ("k3-same-d2", 3, 1, "same", 2, 1, "zeros", {}),
    ("k2-same-uneven", 2, 1, "same", 1, 1, "zeros", {}),
    ("k5-s2-p2", 5, 2, 2, 1, 1, "zeros", {}),
    ("k3-valid-d2", 3, 1, "valid", 2, 1, "zeros", {}),
    ("k1-s1-identity", 1, 1, 0, 1, 1, "zeros", {}),
    ("k1-s2-downsample", 1, 2, 0, 1, 1, "zeros", {}),
    ("k1-s3-d2-downsample", 1, 3, 0, 2, 1, "zeros", {}),
    ("k1-s1-p1", 1, 1, 1, 1, 1, "zeros", {}),
    ("k2-s2-patchify", 2, 2, 0, 1, 1, "zeros", {}),
    ("k3-s3-patchify-crop", 3, 3, 0, 1, 1, "zeros", {}),
    ("k2-s3-dense-gap", 2, 3, 0, 1, 1, "zeros", {}),
    ("k3-s1-p1-groups2", 3, 1, 1, 1, 2, "zeros", {}),
    ("k3-s2-p1-depthwise", 3, 2, 1, 1, 4, "zeros", {"c_out": 8}),
    ("k2-s2-depthwise-patchify", 2, 2, 0, 1, 4, "zeros", {"c_out": 4}),
    ("k3-s1-p1-reflect", 3, 1, 1, 1, 1, "reflect", {}),
    ("k3-s2-p2-replicate", 3, 2, 2, 1, 1, "replicate", {}),
    ("k3-s1-p1-circular", 3, 1, 1, 1, 1, "circular", {}),
    ("k2-same-reflect", 2, 1, "same", 1, 2, "reflect", {}),
    ("k3-same-d2-circular", 3, 1, "same", 2, 1, "circular", {}),
    ("k5-p2-kernel-larger", 5, 1, 2, 1, 1, "zeros", {"input_size": "small"}),
    ("batch1", 3, 2, 1, 1, 1, "zeros", {"batch": 1}),
]

_TUPLE = {
    2: [
        ("tuple-k31-s12-p10-d21", (3, 1), (1, 2), (1, 0), (2, 1), 1, "zeros", {}),
        ("tuple-k24-s24-patchify", (2, 4), (2, 4), 0, 1, 1, "zeros", {}),
        ("tuple-k13-replicate", (1, 3), 1, (0, 1), 1, 2, "replicate", {}),
    ],
    3: [("tuple-k312-s212-p101", (3, 1, 2), (2, 1, 2), (1, 0, 1), 1, 1, "zeros", {})],
}


def _output_ok(case: Case) -> bool:
    """Whether torch accepts the configuration (non-empty output etc.)."""
    try:
        case.module()(case.input())
    except RuntimeError:
        return False
    return True


def _make(dims: int, spec) -> Case:
    name, k, s, p, d, g, mode, extra = spec
    extra = dict(extra)
    if extra.get("input_size") == "small":
        extra["input_size"] = tuple([2, 3, 2][:dims])
    return Case(name, dims, k, s, p, d, g, mode, **extra)


CASES = [
    case
    for dims in (1, 2, 3)
    for case in (_make(dims, spec) for spec in _BASE + _TUPLE.get(dims, []))
    if _output_ok(case)
]


# --- independent references -----------------------------------------------------------


def _padding_amounts(case: Case) -> Tuple[Tuple[int, int], ...]:
    k = _tuple(case.kernel_size, case.dims)
    d = _tuple(case.dilation, case.dims)
    if case.padding == "same":
        return tuple(
            (dd * (kk - 1) // 2, dd * (kk - 1) - dd * (kk - 1) // 2)
            for kk, dd in zip(k, d)
        )
    if case.padding == "valid":
        return ((0, 0),) * case.dims
    return tuple((p, p) for p in _tuple(case.padding, case.dims))


def _tuple(value, dims):
    return (value,) * dims if isinstance(value, int) else tuple(value)


def pad_input(case: Case, x: Tensor) -> Tensor:
    """Explicitly padded input, as ``nn.ConvNd`` would see it."""
    pads = []
    for left, right in reversed(_padding_amounts(case)):
        pads += [left, right]
    mode = "constant" if case.padding_mode == "zeros" else case.padding_mode
    return F.pad(x, pads, mode=mode)


def reference_unfold(case: Case, x: Tensor) -> Tensor:
    """``[N, C·ΠK, ΠO]`` from ``F.pad`` + ``unfoldNd`` (no padding inside unfold)."""
    return unfoldNd(
        pad_input(case, x), case.kernel_size, dilation=case.dilation, stride=case.stride
    )


def grouped_unfold(case: Case, x: Tensor) -> Tensor:
    """Reference unfolded input split into groups: ``[N, G, C_in/G·ΠK, ΠO]``."""
    u = reference_unfold(case, x)
    return u.reshape(u.shape[0], case.groups, -1, u.shape[-1])


def kernel_numel(case: Case) -> int:
    return math.prod(_tuple(case.kernel_size, case.dims))
