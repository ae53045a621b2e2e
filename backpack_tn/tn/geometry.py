"""Convolution hyper-parameters: validation and normalisation to per-dimension geometry.

Everything downstream (patterns, simplifications, networks) is keyed by the frozen,
hashable objects defined here, so they double as cache keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence, Tuple, Union

IntOrTuple = Union[int, Sequence[int]]
Padding = Union[int, Sequence[int], str]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
PADDING_STRINGS = ("same", "valid")


@dataclass(frozen=True)
class DimGeometry:
    """Geometry of one spatial dimension of a convolution.

    Attributes:
        input_size: Unpadded input size ``I``.
        kernel_size: Kernel size ``K``.
        stride: Stride ``S``.
        dilation: Dilation ``D``.
        pad_left: Padding before the input ``P``.
        pad_right: Padding after the input (differs from ``P`` for uneven ``'same'``).
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
    """

    input_size: int
    kernel_size: int
    stride: int
    dilation: int
    pad_left: int
    pad_right: int
    padding_mode: str

    @property
    def output_size(self) -> int:
        """Output size ``O = ⌊(I + P + P_right − D(K−1) − 1)/S⌋ + 1``."""
        span = self.dilation * (self.kernel_size - 1) + 1
        padded = self.input_size + self.pad_left + self.pad_right
        return (padded - span) // self.stride + 1

    @property
    def padded(self) -> bool:
        """Whether any padding is applied in this dimension."""
        return self.pad_left > 0 or self.pad_right > 0

    def source_index(self, o: int, k: int) -> int | None:
        """Input index that output ``o`` reads at kernel tap ``k``.

        Padded positions map to the input element they copy (``'reflect'``,
        ``'replicate'``, ``'circular'``) or to ``None`` (``'zeros'``).

        Args:
            o: Output index.
            k: Kernel index.

        Returns:
            The input index, or ``None`` if the position is zero padding.
        """
        return self.resolve(o * self.stride + k * self.dilation - self.pad_left)

    def resolve(self, i: int) -> int | None:
        """Input element at position ``i`` of the padded axis (``0`` = first input).

        Args:
            i: Position relative to the unpadded input; negative or ``≥ I`` inside
                the padding.

        Returns:
            The input index copied there, or ``None`` for zero padding.
        """
        size = self.input_size
        if 0 <= i < size:
            return i
        if self.padding_mode == "zeros":
            return None
        if self.padding_mode == "replicate":
            return min(max(i, 0), size - 1)
        if self.padding_mode == "circular":
            return i % size
        # reflect (without repeating the edge element); validated to need one bounce
        return -i if i < 0 else 2 * (size - 1) - i


@dataclass(frozen=True)
class ConvGeometry:
    """All spatial dimensions plus the channel-group count of a convolution."""

    dims: Tuple[DimGeometry, ...]
    groups: int

    # Geometries key every cache of a call: their hash and sizes are computed once
    # (immutable, so caching is safe; equality still compares the fields).
    def __hash__(self) -> int:
        return self._hash

    @cached_property
    def _hash(self) -> int:
        return hash((self.dims, self.groups))

    @cached_property
    def input_size(self) -> Tuple[int, ...]:
        """Unpadded spatial input sizes."""
        return tuple(d.input_size for d in self.dims)

    @cached_property
    def kernel_size(self) -> Tuple[int, ...]:
        """Kernel sizes."""
        return tuple(d.kernel_size for d in self.dims)

    @cached_property
    def output_size(self) -> Tuple[int, ...]:
        """Spatial output sizes."""
        return tuple(d.output_size for d in self.dims)


def _as_tuple(value: IntOrTuple, num_dims: int, name: str) -> Tuple[int, ...]:
    """Expand an int to a tuple of length ``num_dims``; check lengths and positivity."""
    if isinstance(value, int) and not isinstance(value, bool):
        values = (value,) * num_dims
    else:
        try:
            values = tuple(int(v) for v in value)
        except TypeError:
            raise ValueError(
                f"{name} must be an int or a tuple of {num_dims} ints, got {value!r}."
            ) from None
        if len(values) != num_dims:
            raise ValueError(
                f"{name} must have {num_dims} entries (one per spatial dimension), "
                f"got {value!r}."
            )
    return values


def _check_positive(values: Tuple[int, ...], name: str) -> None:
    if any(v <= 0 for v in values):
        raise ValueError(f"{name} must be positive, got {values}.")


def make_geometry(
    input_size: Sequence[int],
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    padding: Padding = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> ConvGeometry:
    """Validate convolution hyper-parameters and normalise them per dimension.

    Accepts the same values as ``torch.nn.ConvNd``: ints or tuples, and the padding
    strings ``'same'`` (torch's convention: the extra element of an odd total padding
    goes to the right) and ``'valid'``.

    Args:
        input_size: Unpadded spatial input sizes (one per spatial dimension).
        kernel_size: Kernel size.
        stride: Stride.
        padding: Padding as int, tuple, ``'same'`` or ``'valid'``.
        dilation: Dilation.
        groups: Number of channel groups.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.

    Returns:
        The normalised geometry.

    Raises:
        ValueError: Naming the offending argument, for wrong tuple lengths, non-positive
            sizes, unknown strings, ``'same'`` with stride > 1, an empty output, or a
            padding too large for ``'reflect'``/``'circular'`` (as torch).
    """
    input_size = tuple(int(i) for i in input_size)
    num_dims = len(input_size)
    if num_dims == 0:
        raise ValueError("input must have at least one spatial dimension.")
    _check_positive(input_size, "input spatial size")
    kernel = _as_tuple(kernel_size, num_dims, "kernel_size")
    strides = _as_tuple(stride, num_dims, "stride")
    dilations = _as_tuple(dilation, num_dims, "dilation")
    _check_positive(kernel, "kernel_size")
    _check_positive(strides, "stride")
    _check_positive(dilations, "dilation")
    if not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"groups must be a positive int, got {groups!r}.")
    if padding_mode not in PADDING_MODES:
        raise ValueError(
            f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}."
        )

    if isinstance(padding, str):
        if padding not in PADDING_STRINGS:
            raise ValueError(
                f"padding must be an int, a tuple or one of {PADDING_STRINGS}, "
                f"got {padding!r}."
            )
        if padding == "same":
            if any(s != 1 for s in strides):
                raise ValueError("padding='same' is not supported for stride > 1.")
            totals = [d * (k - 1) for k, d in zip(kernel, dilations)]
            pads = tuple((t // 2, t - t // 2) for t in totals)
        else:
            pads = ((0, 0),) * num_dims
    else:
        sym = _as_tuple(padding, num_dims, "padding")
        if any(p < 0 for p in sym):
            raise ValueError(f"padding must be non-negative, got {sym}.")
        pads = tuple((p, p) for p in sym)

    dims = []
    for i, k, s, d, (pl, pr) in zip(input_size, kernel, strides, dilations, pads):
        mode = padding_mode if (pl or pr) else "zeros"  # no padding: mode is moot
        if mode == "reflect" and max(pl, pr) >= i:
            raise ValueError(
                f"padding_mode='reflect' needs padding < input size, got padding "
                f"{(pl, pr)} for input size {i}."
            )
        if mode == "circular" and max(pl, pr) > i:
            raise ValueError(
                f"padding_mode='circular' needs padding <= input size, got padding "
                f"{(pl, pr)} for input size {i}."
            )
        dim = DimGeometry(i, k, s, d, pl, pr, mode)
        if dim.output_size <= 0:
            raise ValueError(
                f"kernel_size {k} with dilation {d} does not fit the padded input of "
                f"size {i + pl + pr}: the output would be empty."
            )
        dims.append(dim)
    return ConvGeometry(tuple(dims), groups)
