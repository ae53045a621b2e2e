"""Which device a computation runs on, for the rules that differ on a GPU."""

from __future__ import annotations

import torch


def is_cuda(device) -> bool:
    """Whether ``device`` (a ``torch.device``, a string or ``None``) is a CUDA GPU."""
    if device is None:
        return False
    if not isinstance(device, torch.device):  # a string: parse it once here
        device = torch.device(device)
    return device.type == "cuda"
