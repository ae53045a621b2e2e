"""Every distinct convolution of the paper's nine CNNs, as benchmark layers.

The torchvision models are built with ``weights=None`` on the ``meta`` device (no
download, no memory, no compute) and run once on a meta input of the model's usual
size; a pre-forward hook records each ``Conv2d``'s hyper-parameters and input shape.
The DeepOBS problems (3c3d, 2c2d, All-CNN-C) are defined here and in
:mod:`backpack_tn.bench.models`. Layers are deduplicated on (channels, input size,
hyper-parameters).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn

from backpack_tn.bench.layers import Layer
from backpack_tn.bench.models import all_cnn_c


def three_c_three_d(num_classes: int = 10) -> nn.Sequential:
    """DeepOBS' 3c3d for CIFAR-10 (3×32×32): three convolutions, three dense layers."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 5),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(64, 96, 3),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(96, 128, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1),
        nn.Flatten(),
        nn.Linear(128 * 3 * 3, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    )


def two_c_two_d(num_classes: int = 10) -> nn.Sequential:
    """DeepOBS' 2c2d for Fashion-MNIST (1×28×28): two convolutions, two dense layers."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 1024),
        nn.ReLU(),
        nn.Linear(1024, num_classes),
    )


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models as tvm

        kwargs = (
            {"aux_logits": False, "init_weights": False} if "inception" in name else {}
        )
        return getattr(tvm, name)(weights=None, **kwargs)

    return build


#: name → (builder, input shape without batch, source description)
ZOO: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...]]] = {
    "3c3d": (three_c_three_d, (3, 32, 32)),
    "2c2d": (two_c_two_d, (1, 28, 28)),
    "allcnnc": (all_cnn_c, (3, 32, 32)),
    "alexnet": (_torchvision("alexnet"), (3, 224, 224)),
    "resnet18": (_torchvision("resnet18"), (3, 224, 224)),
    "resnext101": (_torchvision("resnext101_32x8d"), (3, 224, 224)),
    "convnext_base": (_torchvision("convnext_base"), (3, 224, 224)),
    "inception_v3": (_torchvision("inception_v3"), (3, 299, 299)),
    "mobilenet_v2": (_torchvision("mobilenet_v2"), (3, 224, 224)),
}


def model_layers(name: str) -> List[Layer]:
    """The distinct ``Conv2d`` layers of one zoo model, in order of first use."""
    build, input_shape = ZOO[name]
    found: Dict[tuple, Layer] = {}

    def record(module: nn.Conv2d, inputs) -> None:
        size = tuple(inputs[0].shape[2:])
        key = (
            module.in_channels,
            module.out_channels,
            size,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
        )
        if key not in found:
            found[key] = Layer(
                f"{name}-{len(found)}",
                name,
                module.in_channels,
                module.out_channels,
                size,
                _compact(module.kernel_size),
                _compact(module.stride),
                module.padding
                if isinstance(module.padding, str)
                else _compact(module.padding),
                _compact(module.dilation),
                module.groups,
            )

    with torch.device("meta"):
        model = build().eval()
        handles = [
            m.register_forward_pre_hook(record)
            for m in model.modules()
            if isinstance(m, nn.Conv2d)
        ]
        with torch.no_grad():
            model(torch.empty(1, *input_shape))
    for handle in handles:
        handle.remove()
    return list(found.values())


def _compact(value):
    """``(3, 3)`` → ``3``; non-square tuples stay."""
    values = tuple(value)
    return values[0] if len(set(values)) == 1 else values


def zoo_layers(models: Sequence[str]) -> List[Layer]:
    """Distinct layers of several zoo models (duplicates across models removed)."""
    layers, seen = [], set()
    for name in models:
        for layer in model_layers(name):
            key = (
                layer.in_channels,
                layer.out_channels,
                layer.input_size,
                layer.kernel_size,
                layer.stride,
                layer.padding,
                layer.dilation,
                layer.groups,
            )
            if key not in seen:
                seen.add(key)
                layers.append(layer)
    return layers
