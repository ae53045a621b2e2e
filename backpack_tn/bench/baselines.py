"""The computations ``backpack_tn`` replaces, called from the installed libraries.

Every implementation takes a :class:`Problem` and returns the quantity in the layout of
``backpack_tn.functional``, so results can be checked against each other.

* ``unfold``: BackPACK's way — ``backpack.utils.conv.unfold_input`` (im2col), then the
  einsum BackPACK uses (KFAC input factor, ``extract_weight_diagonal``) or the
  equivalent one for per-sample gradients / KFAC-reduce; channel groups are averaged
  as curvlinops does where BackPACK has no grouped version.
* ``backpack``: BackPACK's per-sample weight Jacobian (grouped-convolution trick).
* ``curvlinops``: curvlinops' patch extractors (2d only).
* ``einconv``: the paper's reference TN implementation (``einconv`` 0.1.0).
* ``torch``: PyTorch's own convolution kernels (forward, and the input/weight VJPs
  autograd runs), the baseline for the operations BackPACK does not replace.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Dict, Optional

import torch
from backpack.core.derivatives.conv1d import Conv1DDerivatives
from backpack.core.derivatives.conv2d import Conv2DDerivatives
from backpack.core.derivatives.conv3d import Conv3DDerivatives
from backpack.utils.conv import extract_weight_diagonal, unfold_input
from torch import Tensor, einsum, nn

from backpack_tn import functional as tnf
from backpack_tn.extensions.derivatives import hyperparameters
from backpack_tn.tn.evaluate import force_strategy


@dataclass
class Problem:
    """Inputs of one layer-level measurement."""

    module: nn.Module
    x: Tensor
    grad_output: Tensor  # [N, C_out, *O]
    S: Tensor  # [V, N, C_out, *O]

    @cached_property
    def hyper(self) -> dict:
        """The module's hyper-parameters as functional keywords, read once.

        A user reads them once too; timings should not include it.
        """
        return hyperparameters(self.module)


@dataclass(frozen=True)
class Implementation:
    """One way to compute an operation.

    Attributes:
        fn: Computes the quantity from a problem.
        groups_mode: For KFAC factors, the channel-group convention of the result.
        available: Whether it applies to the problem (e.g. 2d only).
    """

    fn: Callable[[Problem], Tensor]
    groups_mode: str = "average"
    available: Callable[[Problem], bool] = lambda p: True


def _grouped_unfold(p: Problem) -> Tensor:
    u = unfold_input(p.module, p.x)  # [N, C_in·K, O]
    return u.reshape(u.shape[0], p.module.groups, -1, u.shape[-1])


def _unfold_kfac(p: Problem, reduce: bool) -> Tensor:
    u = _grouped_unfold(p).mean(1)  # curvlinops' group average; G = 1: BackPACK
    if reduce:
        u = u.mean(-1, keepdim=True)
    return einsum("bik,bjk->ij", u, u) / u.shape[0]


def _curvlinops_kfac(p: Problem, reduce: bool) -> Tensor:
    from curvlinops.kfac_utils import extract_averaged_patches, extract_patches

    m = p.module
    args = (p.x, m.kernel_size, m.stride, m.padding, m.dilation, m.groups)
    if reduce:
        u = extract_averaged_patches(*args)  # [N, C·K]
        return einsum("bi,bj->ij", u, u) / u.shape[0]
    u = extract_patches(*args)  # [N, O, C·K]
    return einsum("boi,boj->ij", u, u) / u.shape[0]


def _einconv_kfac(p: Problem, reduce: bool) -> Tensor:
    if reduce:
        from einconv.expressions.convNd_kfac_reduce import einsum_expression
    else:
        from einconv.expressions.convNd_kfc import einsum_expression
    m = p.module
    eq, operands, shape = einsum_expression(
        p.x, m.kernel_size, m.stride, m.padding, m.dilation, m.groups
    )
    return einsum(eq, *operands).reshape(shape)


def _unfold_per_sample(p: Problem) -> Tensor:
    u = _grouped_unfold(p)  # [N, G, C·K, O]
    n, g = u.shape[:2]
    v = p.grad_output.reshape(n, g, -1, u.shape[-1])
    return einsum("ngio,ngdo->ngdi", u, v).reshape(n, *p.module.weight.shape)


_DERIVATIVES = {1: Conv1DDerivatives, 2: Conv2DDerivatives, 3: Conv3DDerivatives}


def _backpack_per_sample(p: Problem) -> Tensor:
    module = p.module
    derivatives = _DERIVATIVES[p.x.dim() - 2]()
    # BackPACK reads the forward pass' tensors from these attributes.
    module.input0, module.output = p.x, p.grad_output
    try:
        mat = p.grad_output.unsqueeze(0)
        result = derivatives.param_mjp(
            "weight", module, None, None, mat, sum_batch=False
        )
    finally:
        del module.input0, module.output
    return result[0]


def _backpack_diag_ggn(p: Problem) -> Tensor:
    return extract_weight_diagonal(p.module, unfold_input(p.module, p.x), p.S)


def _is_2d(p: Problem) -> bool:
    return p.x.dim() == 4


def _numeric_zero_padding(p: Problem) -> bool:
    return p.module.padding_mode == "zeros" and not isinstance(p.module.padding, str)


def _torch_grad(kind: str):
    """``torch.nn.grad.conv{N}d_{kind}``: what autograd runs for a convolution."""

    def run(p: Problem) -> Tensor:
        m = p.module
        fn = getattr(torch.nn.grad, f"conv{p.x.dim() - 2}d_{kind}")
        args = (m.stride, m.padding, m.dilation, m.groups)
        if kind == "input":
            return fn(p.x.shape, m.weight.detach(), p.grad_output, *args)
        return fn(p.x, m.weight.shape, p.grad_output, *args)

    return run


def _torch_forward(p: Problem) -> Tensor:
    return p.module._conv_forward(p.x, p.module.weight.detach(), None)


def _einconv(kind: str):
    def run(p: Problem) -> Tensor:
        m = p.module
        w = m.weight.detach()
        if kind == "forward":
            from einconv.expressions.convNd_forward import einsum_expression

            eq, ops, shape = einsum_expression(
                p.x, w, m.stride, m.padding, m.dilation, m.groups
            )
        elif kind == "input_vjp":
            from einconv.expressions.convNd_input_vjp import einsum_expression

            eq, ops, shape = einsum_expression(
                w,
                p.grad_output,
                p.x.shape[2:],
                m.stride,
                m.padding,
                m.dilation,
                m.groups,
            )
        else:
            from einconv.expressions.convNd_weight_vjp import einsum_expression

            eq, ops, shape = einsum_expression(
                p.x,
                p.grad_output,
                m.kernel_size,
                m.dilation,
                m.padding,
                m.stride,
                m.groups,
            )
        return einsum(eq, *ops).reshape(shape)

    return run


def _unfold_batch_l2(p: Problem) -> Tensor:
    return _unfold_per_sample(p).flatten(1).square().sum(1)


def _backpack_diag_ggn_per_sample(p: Problem) -> Tensor:
    return extract_weight_diagonal(
        p.module, unfold_input(p.module, p.x), p.S, sum_batch=False
    )


STOCK: Dict[str, Dict[str, Implementation]] = {
    "kfac_expand": {
        "unfold": Implementation(lambda p: _unfold_kfac(p, False)),
        "curvlinops": Implementation(
            lambda p: _curvlinops_kfac(p, False), available=_is_2d
        ),
        "einconv": Implementation(lambda p: _einconv_kfac(p, False), "separate"),
    },
    "kfac_reduce": {
        "unfold": Implementation(lambda p: _unfold_kfac(p, True)),
        "curvlinops": Implementation(
            lambda p: _curvlinops_kfac(p, True), available=_is_2d
        ),
        "einconv": Implementation(lambda p: _einconv_kfac(p, True), "separate"),
    },
    "per_sample_grad": {
        "unfold": Implementation(_unfold_per_sample),
        "backpack": Implementation(_backpack_per_sample),
    },
    "diag_ggn": {"backpack": Implementation(_backpack_diag_ggn)},
    "diag_ggn_per_sample": {"backpack": Implementation(_backpack_diag_ggn_per_sample)},
    "batch_l2": {"unfold": Implementation(_unfold_batch_l2)},
    "forward": {
        "torch": Implementation(_torch_forward),
        "einconv": Implementation(_einconv("forward"), available=_numeric_zero_padding),
    },
    "input_vjp": {
        "torch": Implementation(_torch_grad("input"), available=_numeric_zero_padding),
        "einconv": Implementation(
            _einconv("input_vjp"), available=_numeric_zero_padding
        ),
    },
    "weight_vjp": {
        "torch": Implementation(_torch_grad("weight"), available=_numeric_zero_padding),
        "einconv": Implementation(
            _einconv("weight_vjp"), available=_numeric_zero_padding
        ),
    },
}


def tn_implementation(
    op: str,
    simplify: bool,
    groups_mode: str = "average",
    strategy: Optional[str] = None,
):
    """The ``backpack_tn`` implementation of an operation.

    Args:
        op: One of :data:`OPERATIONS`.
        simplify: Use the simplified networks.
        groups_mode: Channel-group convention for KFAC factors.
        strategy: Force the ``'pattern'`` or ``'window'`` strategy (default: the
            engine's choice).

    Returns:
        A function of a :class:`Problem`.
    """

    def run(p: Problem) -> Tensor:
        if strategy is None:
            return compute(p)
        with force_strategy(strategy):
            return compute(p)

    def compute(p: Problem) -> Tensor:
        k = p.module.kernel_size
        if op in ("kfac_expand", "kfac_reduce"):
            approx = op.split("_")[1]
            return tnf.kfac_input_factor(
                p.x,
                k,
                approx=approx,
                groups_mode=groups_mode,
                simplify=simplify,
                **p.hyper,
            )
        if op == "per_sample_grad":
            return tnf.weight_vjp(
                p.x, p.grad_output, k, per_sample=True, simplify=simplify, **p.hyper
            )
        if op in ("diag_ggn", "diag_ggn_per_sample"):
            return tnf.diag_ggn_weight(
                p.x,
                p.S,
                k,
                per_sample=op == "diag_ggn_per_sample",
                simplify=simplify,
                **p.hyper,
            )
        if op == "batch_l2":
            return tnf.batch_l2_weight(
                p.x, p.grad_output, k, simplify=simplify, **p.hyper
            )
        if op == "forward":
            return tnf.conv(p.x, p.module.weight.detach(), simplify=simplify, **p.hyper)
        if op == "input_vjp":
            return tnf.input_vjp(
                p.grad_output,
                p.module.weight.detach(),
                p.x.shape,
                simplify=simplify,
                **p.hyper,
            )
        if op == "weight_vjp":
            return tnf.weight_vjp(p.x, p.grad_output, k, simplify=simplify, **p.hyper)
        raise ValueError(f"Unknown operation {op!r}.")

    return run


OPERATIONS = tuple(STOCK)


def make_problem(
    layer, batch_size: int, classes: int, dtype, device, seed: int = 0
) -> Problem:
    """Random input, output gradient and GGN factor for a benchmark layer."""
    torch.manual_seed(seed)
    module = layer.module(dtype, device)
    x = torch.randn(batch_size, layer.in_channels, *layer.input_size, dtype=dtype)
    out_shape = (batch_size, layer.out_channels, *layer.output_size)
    grad_output = torch.randn(out_shape, dtype=dtype)
    S = torch.randn(classes, *out_shape, dtype=dtype)
    return Problem(module, x.to(device), grad_output.to(device), S.to(device))


def check(result: Tensor, reference: Tensor) -> Optional[float]:
    """Relative max-deviation of ``result`` from ``reference``."""
    scale = reference.abs().max().clamp(min=1e-30)
    return float((result - reference).abs().max() / scale)
