"""TN module extensions for ``Conv{1,2,3}d``, one small class per BackPACK extension.

Each class subclasses BackPACK's own module extension for convolutions and swaps in
:class:`~backpack_tn.extensions.derivatives.TNConvDerivatives`; where BackPACK computes
a quantity from the unfolded input, the class overrides that parameter function with
the matching :mod:`backpack_tn.functional` call. BackPACK still does the
backpropagation; only the convolution's numbers come from tensor networks.

All classes share :class:`TNConvExtension`, which decides per module whether the TN path
applies and otherwise falls back to BackPACK's extension (see DESIGN §4).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Callable, List, Tuple

import torch
from backpack.extensions.firstorder.batch_grad.batch_grad_base import BatchGradBase
from backpack.extensions.firstorder.batch_l2_grad.batch_l2_base import BatchL2Base
from backpack.extensions.firstorder.gradient.base import GradBaseModule
from backpack.extensions.firstorder.sum_grad_squared.sgs_base import SGSBase
from backpack.extensions.firstorder.variance.variance_base import VarianceBaseModule
from backpack.extensions.module_extension import ModuleExtension
from backpack.extensions.secondorder.diag_ggn.convnd import (
    BatchDiagGGNConvND,
    DiagGGNConvND,
)
from backpack.extensions.secondorder.diag_hessian.convnd import (
    BatchDiagHConvND,
    DiagHConvND,
)
from backpack.extensions.secondorder.hbp.convnd import HBPConvNd
from backpack.extensions.secondorder.hbp.hbp_options import ExpectationApproximation
from backpack.extensions.secondorder.sqrt_ggn.base import SqrtGGNBaseModule
from torch import Tensor
from torch.nn import Module

from backpack_tn import functional as tnf
from backpack_tn.extensions.derivatives import TNConvDerivatives, hyperparameters

PARAMS = ["bias", "weight"]
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_WARNED: set = set()


class TNFallbackError(RuntimeError):
    """The TN path does not cover a module and falling back is not allowed."""


def stock_is_wrong(module: Module) -> str | None:
    """Why stock BackPACK gives wrong numbers (or fails) for a convolution, if it does.

    Args:
        module: A ``Conv{1,2,3}d``.

    Returns:
        A reason, or ``None`` if BackPACK handles the configuration.
    """
    if module.padding_mode != "zeros":
        return (
            f"padding_mode={module.padding_mode!r}: BackPACK unfolds the unpadded "
            "input with zero padding"
        )
    if isinstance(module.padding, str) and module.padding == "same":
        return "padding='same': BackPACK's convolution Jacobians do not support it"
    return None


def tn_unsupported(module: Module) -> str | None:
    """Why the TN path cannot handle a module, if it cannot.

    Args:
        module: A ``Conv{1,2,3}d``.

    Returns:
        A reason, or ``None`` if the TN path applies.
    """
    if module.weight.dtype not in _SUPPORTED_DTYPES:
        return f"dtype {module.weight.dtype} is not a real floating-point type"
    return None


class TNConvExtension(ModuleExtension):
    """Mixin: use the TN path where it applies, otherwise BackPACK's own extension.

    Attributes:
        strict: Raise instead of falling back.
    """

    def __init__(self, stock: Callable[[], ModuleExtension], strict: bool = False):
        """Remember how to build BackPACK's extension for fallback.

        Args:
            stock: Zero-argument factory of BackPACK's module extension.
            strict: Raise :class:`TNFallbackError` instead of falling back.
        """
        self._make_stock = stock
        self._stock = None
        self.strict = strict

    def __call__(self, extension, module: Module, g_inp, g_out) -> None:
        """Run the TN extension, or fall back to BackPACK's for unsupported modules."""
        reason = tn_unsupported(module)
        if reason is None:
            return super().__call__(extension, module, g_inp, g_out)
        name = f"{type(extension).__name__} on {type(module).__name__}"
        if self.strict:
            raise TNFallbackError(f"backpack_tn: {name}: {reason} (strict=True).")
        wrong = stock_is_wrong(module)
        if wrong is not None:
            raise TNFallbackError(
                f"backpack_tn cannot handle {name} ({reason}) and stock BackPACK is "
                f"wrong there ({wrong})."
            )
        key = (type(self).__name__, reason)
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(
                f"backpack_tn: {name}: {reason}; falling back to BackPACK.",
                stacklevel=2,
            )
        if self._stock is None:
            self._stock = self._make_stock()
        return self._stock(extension, module, g_inp, g_out)


def _stock(module: str, name: str) -> Callable[[], ModuleExtension]:
    """Factory of BackPACK's module extension ``{name}`` in ``{module}``."""

    def make() -> ModuleExtension:
        package = importlib.import_module(f"backpack.extensions.{module}")
        return getattr(package, name)()

    return make


# --- first order ---------------------------------------------------------------------


class TNBatchGradConv(TNConvExtension, BatchGradBase):
    """``BatchGrad``: per-sample gradients (TN weight Jacobian, no repeated input)."""

    def __init__(self, N: int, strict: bool = False):  # noqa: N803
        """Set up for ``Conv{N}d``.

        Args:
            N: Number of spatial dimensions.
            strict: Raise instead of falling back to BackPACK.
        """
        TNConvExtension.__init__(
            self,
            _stock(f"firstorder.batch_grad.conv{N}d", f"BatchGradConv{N}d"),
            strict,
        )
        BatchGradBase.__init__(self, TNConvDerivatives(N), PARAMS)


class TNGradConv(GradBaseModule):
    """Summed gradient through TN derivatives (used by ``Variance``)."""

    def __init__(self, N: int):  # noqa: N803
        """Set up for ``Conv{N}d``.

        Args:
            N: Number of spatial dimensions.
        """
        super().__init__(derivatives=TNConvDerivatives(N), params=PARAMS)


class TNSumGradSquaredConv(TNConvExtension, SGSBase):
    """``SumGradSquared``: ``Σ_n (∇W_n)²`` without storing all per-sample gradients."""

    def __init__(self, N: int, strict: bool = False):  # noqa: N803
        """Set up for ``Conv{N}d``.

        Args:
            N: Number of spatial dimensions.
            strict: Raise instead of falling back to BackPACK.
        """
        TNConvExtension.__init__(
            self,
            _stock(f"firstorder.sum_grad_squared.conv{N}d", f"SGSConv{N}d"),
            strict,
        )
        SGSBase.__init__(self, TNConvDerivatives(N), PARAMS)

    def weight(self, ext, module, g_inp, g_out, bpQuantities) -> Tensor:  # noqa: D102, N803
        return tnf.sum_grad_squared_weight(
            module.input0, g_out[0], module.kernel_size, **hyperparameters(module)
        )


class TNBatchL2GradConv(TNConvExtension, BatchL2Base):
    """``BatchL2Grad``: per-sample squared norms, Gram form where cheaper."""

    def __init__(self, N: int, strict: bool = False):  # noqa: N803
        """Set up for ``Conv{N}d``.

        Args:
            N: Number of spatial dimensions.
            strict: Raise instead of falling back to BackPACK.
        """
        TNConvExtension.__init__(
            self, _stock("firstorder.batch_l2_grad.convnd", f"BatchL2Conv{N}d"), strict
        )
        BatchL2Base.__init__(self, PARAMS, TNConvDerivatives(N))

    def weight(self, ext, module, g_inp, g_out, backproped) -> Tensor:  # noqa: D102
        return tnf.batch_l2_weight(
            module.input0, g_out[0], module.kernel_size, **hyperparameters(module)
        )


class TNVarianceConv(TNConvExtension, VarianceBaseModule):
    """``Variance``: from the TN summed gradient and sum of squared gradients."""

    def __init__(self, N: int, strict: bool = False):  # noqa: N803
        """Set up for ``Conv{N}d``.

        Args:
            N: Number of spatial dimensions.
            strict: Raise instead of falling back to BackPACK.
        """
        TNConvExtension.__init__(
            self, _stock(f"firstorder.variance.conv{N}d", f"VarianceConv{N}d"), strict
        )
        VarianceBaseModule.__init__(
            self, PARAMS, TNGradConv(N), TNSumGradSquaredConv(N, strict)
        )


# --- second order --------------------------------------------------------------------


def _diag(module: Module, S: Tensor, per_sample: bool) -> Tensor:  # noqa: N803
    return tnf.diag_ggn_weight(
        module.input0,
        S,
        module.kernel_size,
        per_sample=per_sample,
        **hyperparameters(module),
    )


class TNDiagGGNConv(TNConvExtension, DiagGGNConvND):
    """``DiagGGNExact``/``DiagGGNMC``: ``Σ_{v,n} (Jᵀ S)²`` as one squared TN."""

    def __init__(self, N: int, strict: bool = False):  # noqa: N803
        """Set up for ``Conv{N}d``.

        Args:
            N: Number of spatial dimensions.
            strict: Raise instead of falling back to BackPACK.
        """
        TNConvExtension.__init__(
            self, _stock(f"secondorder.diag_ggn.conv{N}d", f"DiagGGNConv{N}d"), strict
        )
        DiagGGNConvND.__init__(self, derivatives=TNConvDerivatives(N), params=PARAMS)

    def weight(self, ext, module, grad_inp, grad_out, backproped) -> Tensor:  # noqa: D102
        return _diag(module, backproped, per_sample=False)


class TNBatchDiagGGNConv(TNConvExtension, BatchDiagGGNConvND):
    """``BatchDiagGGNExact``/``BatchDiagGGNMC``: per-sample GGN diagonals."""

    def __init__(self, N: int, strict: bool = False):  # noqa: N803
        """Set up for ``Conv{N}d``.

        Args:
            N: Number of spatial dimensions.
            strict: Raise instead of falling back to BackPACK.
        """
        TNConvExtension.__init__(
            self,
            _stock(f"secondorder.diag_ggn.conv{N}d", f"BatchDiagGGNConv{N}d"),
            strict,
        )
        BatchDiagGGNConvND.__init__(
            self, derivatives=TNConvDerivatives(N), params=PARAMS
        )

    def weight(self, ext, module, grad_inp, grad_out, backproped) -> Tensor:  # noqa: D102
        return _diag(module, backproped, per_sample=True)


def _signed_diag(module: Module, backproped: dict, per_sample: bool) -> Tensor:
    result = None
    for sqrt_h, sign in zip(backproped["matrices"], backproped["signs"]):
        term = _diag(module, sqrt_h, per_sample) * sign
        result = term if result is None else result.add_(term)
    if result is None:
        shape = module.weight.shape
        if per_sample:
            shape = (module.input0.shape[0], *shape)
        result = module.weight.new_zeros(shape)
    return result


class TNDiagHConv(TNConvExtension, DiagHConvND):
    """``DiagHessian``: signed sum of squared TN contractions."""

    def __init__(self, N: int, strict: bool = False):  # noqa: N803
        """Set up for ``Conv{N}d``.

        Args:
            N: Number of spatial dimensions.
            strict: Raise instead of falling back to BackPACK.
        """
        TNConvExtension.__init__(
            self, _stock(f"secondorder.diag_hessian.conv{N}d", f"DiagHConv{N}d"), strict
        )
        DiagHConvND.__init__(self, derivatives=TNConvDerivatives(N), params=PARAMS)

    def weight(self, ext, module, g_inp, g_out, backproped) -> Tensor:  # noqa: D102
        return _signed_diag(module, backproped, per_sample=False)


class TNBatchDiagHConv(TNConvExtension, BatchDiagHConvND):
    """``BatchDiagHessian``: per-sample signed sums."""

    def __init__(self, N: int, strict: bool = False):  # noqa: N803
        """Set up for ``Conv{N}d``.

        Args:
            N: Number of spatial dimensions.
            strict: Raise instead of falling back to BackPACK.
        """
        TNConvExtension.__init__(
            self,
            _stock(f"secondorder.diag_hessian.conv{N}d", f"BatchDiagHConv{N}d"),
            strict,
        )
        BatchDiagHConvND.__init__(self, derivatives=TNConvDerivatives(N), params=PARAMS)

    def weight(self, ext, module, g_inp, g_out, backproped) -> Tensor:  # noqa: D102
        return _signed_diag(module, backproped, per_sample=True)


class TNHBPConv(TNConvExtension, HBPConvNd):
    """``KFAC``/``KFLR``/``KFRA``: TN input factor, expand or reduce, groups averaged.

    The output-side factor is BackPACK's (the backpropagated factor summed over output
    positions). The input-side factor is ``(1/N) Σ_n Σ_o u uᵀ`` (``kfac_approx=
    'expand'``, BackPACK's numbers) or ``(1/N) Σ_n ū ūᵀ`` with ``ū`` the mean patch
    (``'reduce'``). Grouped convolutions, which BackPACK refuses, use the input
    averaged over channel groups (curvlinops' convention), so ``p.kfac`` stays a
    two-factor list.
    """

    def __init__(self, N: int, strict: bool = False):  # noqa: N803
        """Set up for ``Conv{N}d``.

        Args:
            N: Number of spatial dimensions.
            strict: Raise instead of falling back to BackPACK.
        """
        TNConvExtension.__init__(
            self, _stock(f"secondorder.hbp.conv{N}d", f"HBPConv{N}d"), strict
        )
        HBPConvNd.__init__(self, N)
        self.derivatives = TNConvDerivatives(N)

    @staticmethod
    def _maybe_raise_groups_not_implemented_error(ext, module) -> None:
        """Grouped convolutions are supported (group-averaged input factor)."""

    def _factors_from_input(self, ext, module: Module) -> List[Tensor]:
        if ExpectationApproximation.should_average_param_jac(ext.get_ea_strategy()):
            raise NotImplementedError("Undefined")
        approx = getattr(ext, "kfac_approx", "expand")
        factor = tnf.kfac_input_factor(
            module.input0,
            module.kernel_size,
            approx=approx,
            groups_mode="average",
            **hyperparameters(module),
        )
        return [factor]


class TNSqrtGGNConv(TNConvExtension, SqrtGGNBaseModule):
    """``SqrtGGNExact``/``SqrtGGNMC``: ``Jᵀ S`` per sample as one TN."""

    def __init__(self, N: int, strict: bool = False):  # noqa: N803
        """Set up for ``Conv{N}d``.

        Args:
            N: Number of spatial dimensions.
            strict: Raise instead of falling back to BackPACK.
        """
        TNConvExtension.__init__(
            self, _stock("secondorder.sqrt_ggn.convnd", f"SqrtGGNConv{N}d"), strict
        )
        SqrtGGNBaseModule.__init__(self, TNConvDerivatives(N), PARAMS)


ModuleFactory = Callable[[int, bool], ModuleExtension]
TN_CLASSES: Tuple[type, ...] = (
    TNBatchGradConv,
    TNSumGradSquaredConv,
    TNBatchL2GradConv,
    TNVarianceConv,
    TNDiagGGNConv,
    TNBatchDiagGGNConv,
    TNDiagHConv,
    TNBatchDiagHConv,
    TNHBPConv,
    TNSqrtGGNConv,
)
