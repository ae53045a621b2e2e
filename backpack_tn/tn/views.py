"""Reading input-like tensors through :class:`~backpack_tn.tn.network.SpatialView`s.

Slices, row gathers (padding modes that copy input elements), zero padding and
window cuts of the trailing spatial axes, plus the inverse used to put a result that
lives on the input grid back to full size.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from backpack_tn.tn.cache import LRUCache
from backpack_tn.tn.network import SpatialView

Shape = Tuple[int, ...]


_INDICES: LRUCache[Tensor] = LRUCache("gather_indices", maxsize=256)


def gather_rows(tensor: Tensor, axis: int, index: Tuple[int, ...]) -> Tensor:
    """``tensor.index_select(axis, index)`` with the index tensor cached per device.

    Used for padding modes that copy input elements: the rows of the padded axis.
    """
    rows = _INDICES.get_or_create(
        (index, tensor.device), lambda: torch.tensor(index, device=tensor.device)
    )
    return tensor.index_select(axis, rows)


def _view_length(view: SpatialView) -> int:
    if view.index is not None:
        rows = len(view.index)
    else:
        rows = len(range(view.start, view.stop, view.step))
    return rows + sum(view.pad)


def viewed_shape(shape: Shape, views: Tuple[SpatialView, ...]) -> Shape:
    """Shape of a tensor after :func:`apply_views`, without touching data."""
    lead = len(shape) - len(views)
    out = list(shape[:lead])
    for view in views:
        if view.split:
            out.extend(view.split[::2])
        elif view.window:
            out.extend((view.window[0], view.window[2]))
        else:
            out.append(_view_length(view))
    return tuple(out)


def apply_views(tensor: Tensor, views: Tuple[SpatialView, ...]) -> Tensor:
    """Slice, gather, pad and cut windows on the trailing spatial axes.

    Everything but the gather and the zero padding is a view of the input.
    """
    lead = tensor.dim() - len(views)
    # Walk backwards so turning an axis into two does not shift the ones to visit.
    for pos in reversed(range(lead, tensor.dim())):
        view = views[pos - lead]
        if view.index is not None:
            tensor = gather_rows(tensor, pos, view.index)
        elif (view.start, view.stop, view.step) != (0, tensor.shape[pos], 1):
            index = (slice(None),) * pos + (slice(view.start, view.stop, view.step),)
            tensor = tensor[index]
        if any(view.pad):
            pad = [0] * (2 * (tensor.dim() - pos))
            pad[-2:] = view.pad
            tensor = F.pad(tensor, pad)
        if view.split:
            out, stride, kernel = view.split
            shape = tensor.shape
            tensor = tensor.reshape(*shape[:pos], out, stride, *shape[pos + 1 :])
            if kernel != stride:
                tensor = tensor.narrow(pos + 1, 0, kernel)
        elif view.window:
            out, stride, kernel, dilation = view.window
            span = dilation * (kernel - 1) + 1
            tensor = tensor.unfold(pos, span, stride).movedim(-1, pos + 1)
            if dilation > 1:
                index = (slice(None),) * (pos + 1) + (slice(None, None, dilation),)
                tensor = tensor[index]
    return tensor


def embed(result: Tensor, views: Tuple[SpatialView, ...], sizes: Shape) -> Tensor:
    """Inverse of :func:`_apply_views`: scatter ``result`` into zeros of full size."""
    lead = result.dim() - sum(2 if v.split else 1 for v in views)
    # On the enlarged zero tensor the zero-padding of a view is real storage.
    # (Only slices and non-overlapping splits occur here: see conv.py.)
    views = tuple(replace(v, stop=v.stop + v.pad[1], pad=(0, 0)) for v in views)
    padded = [max(size, v.stop) for size, v in zip(sizes, views)]
    full = result.new_zeros(*result.shape[:lead], *padded)
    target = apply_views(full, views)
    target.copy_(result)  # the views are genuine views of ``full``: writes land in it
    crop = (slice(None),) * lead + tuple(slice(0, s) for s in sizes)
    return full[crop]
