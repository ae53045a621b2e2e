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
from typing import List, Tuple

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
    """Base of the TN module extensions: TN path where it applies, else BackPACK's.

    Subclasses name BackPACK's module extension they replace in :attr:`STOCK` (module
    path below ``backpack.extensions`` and class name, ``{N}`` standing for the number
    of spatial dimensions) and set up their BackPACK base class in
    :meth:`_init_backpack`.

    Attributes:
        strict: Raise instead of falling back.
    """

    STOCK: Tuple[str, str] = ("", "")

    def __init__(self, N: int, strict: bool = False):  # noqa: N803
        """Set up the extension for ``Conv{N}d``.

        Args:
            N: Number of spatial dimensions (1, 2 or 3).
            strict: Raise :class:`TNFallbackError` instead of falling back.
        """
        self.N, self.strict, self._stock = N, strict, None
        self._init_backpack(N)

    def _init_backpack(self, N: int) -> None:  # noqa: N803
        raise NotImplementedError

    def _stock_extension(self) -> ModuleExtension:
        """BackPACK's own module extension for this (extension, layer) pair."""
        if self._stock is None:
            module, name = (part.format(N=self.N) for part in self.STOCK)
            package = importlib.import_module(f"backpack.extensions.{module}")
            self._stock = getattr(package, name)()
        return self._stock

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
        return self._stock_extension()(extension, module, g_inp, g_out)


def _hyper_call(fn, module: Module, *tensors: Tensor, **options) -> Tensor:
    """``fn(module.input0, *tensors, kernel_size, **hyper-parameters, **options)``."""
    return fn(
        module.input0,
        *tensors,
        module.kernel_size,
        **hyperparameters(module),
        **options,
    )


# --- first order ---------------------------------------------------------------------


class TNBatchGradConv(TNConvExtension, BatchGradBase):
    """``BatchGrad``: per-sample gradients (TN weight Jacobian, no repeated input)."""

    STOCK = ("firstorder.batch_grad.conv{N}d", "BatchGradConv{N}d")

    def _init_backpack(self, N: int) -> None:  # noqa: N803
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
    """``SumGradSquared``: ``Σ_n (∇W_n)²`` as one squared TN."""

    STOCK = ("firstorder.sum_grad_squared.conv{N}d", "SGSConv{N}d")

    def _init_backpack(self, N: int) -> None:  # noqa: N803
        SGSBase.__init__(self, TNConvDerivatives(N), PARAMS)

    def weight(self, ext, module, g_inp, g_out, bpQuantities) -> Tensor:  # noqa: D102, N803
        return _hyper_call(tnf.sum_grad_squared_weight, module, g_out[0])


class TNBatchL2GradConv(TNConvExtension, BatchL2Base):
    """``BatchL2Grad``: per-sample squared norms, Gram form where cheaper."""

    STOCK = ("firstorder.batch_l2_grad.convnd", "BatchL2Conv{N}d")

    def _init_backpack(self, N: int) -> None:  # noqa: N803
        BatchL2Base.__init__(self, PARAMS, TNConvDerivatives(N))

    def weight(self, ext, module, g_inp, g_out, backproped) -> Tensor:  # noqa: D102
        return _hyper_call(tnf.batch_l2_weight, module, g_out[0])


class TNVarianceConv(TNConvExtension, VarianceBaseModule):
    """``Variance``: from the TN summed gradient and sum of squared gradients."""

    STOCK = ("firstorder.variance.conv{N}d", "VarianceConv{N}d")

    def _init_backpack(self, N: int) -> None:  # noqa: N803
        sgs = TNSumGradSquaredConv(N, self.strict)
        VarianceBaseModule.__init__(self, PARAMS, TNGradConv(N), sgs)


# --- second order --------------------------------------------------------------------


class TNDiagGGNConv(TNConvExtension, DiagGGNConvND):
    """``DiagGGNExact``/``DiagGGNMC``: ``Σ_{v,n} (Jᵀ S)²`` as one squared TN."""

    STOCK = ("secondorder.diag_ggn.conv{N}d", "DiagGGNConv{N}d")
    PER_SAMPLE = False

    def _init_backpack(self, N: int) -> None:  # noqa: N803
        DiagGGNConvND.__init__(self, derivatives=TNConvDerivatives(N), params=PARAMS)

    def weight(self, ext, module, grad_inp, grad_out, backproped) -> Tensor:  # noqa: D102
        return _hyper_call(
            tnf.diag_ggn_weight, module, backproped, per_sample=self.PER_SAMPLE
        )


class TNBatchDiagGGNConv(TNDiagGGNConv, BatchDiagGGNConvND):
    """``BatchDiagGGNExact``/``BatchDiagGGNMC``: per-sample GGN diagonals."""

    STOCK = ("secondorder.diag_ggn.conv{N}d", "BatchDiagGGNConv{N}d")
    PER_SAMPLE = True

    def bias(self, ext, module, grad_inp, grad_out, backproped) -> Tensor:  # noqa: D102
        return BatchDiagGGNConvND.bias(
            self, ext, module, grad_inp, grad_out, backproped
        )


class TNDiagHConv(TNConvExtension, DiagHConvND):
    """``DiagHessian``: signed sum of squared TN contractions."""

    STOCK = ("secondorder.diag_hessian.conv{N}d", "DiagHConv{N}d")
    PER_SAMPLE = False

    def _init_backpack(self, N: int) -> None:  # noqa: N803
        DiagHConvND.__init__(self, derivatives=TNConvDerivatives(N), params=PARAMS)

    def weight(self, ext, module, g_inp, g_out, backproped) -> Tensor:  # noqa: D102
        result = None
        for sqrt_h, sign in zip(backproped["matrices"], backproped["signs"]):
            term = _hyper_call(
                tnf.diag_ggn_weight, module, sqrt_h, per_sample=self.PER_SAMPLE
            ).mul_(sign)
            result = term if result is None else result.add_(term)
        if result is None:  # nothing backpropagated: the Hessian block is zero
            shape = (module.input0.shape[0],) * self.PER_SAMPLE + module.weight.shape
            result = module.weight.new_zeros(shape)
        return result


class TNBatchDiagHConv(TNDiagHConv, BatchDiagHConvND):
    """``BatchDiagHessian``: per-sample signed sums."""

    STOCK = ("secondorder.diag_hessian.conv{N}d", "BatchDiagHConv{N}d")
    PER_SAMPLE = True

    def bias(self, ext, module, g_inp, g_out, backproped) -> Tensor:  # noqa: D102
        return BatchDiagHConvND.bias(self, ext, module, g_inp, g_out, backproped)


class TNHBPConv(TNConvExtension, HBPConvNd):
    """``KFAC``/``KFLR``/``KFRA``: TN input factor, expand or reduce, groups averaged.

    The output-side factor is BackPACK's (the backpropagated factor summed over output
    positions). The input-side factor is ``(1/N) Σ_n Σ_o u uᵀ`` (``kfac_approx=
    'expand'``, BackPACK's numbers) or ``(1/N) Σ_n ū ūᵀ`` with ``ū`` the mean patch
    (``'reduce'``). Grouped convolutions, which BackPACK refuses, use the input
    averaged over channel groups (curvlinops' convention), so ``p.kfac`` stays a
    two-factor list.
    """

    STOCK = ("secondorder.hbp.conv{N}d", "HBPConv{N}d")

    def _init_backpack(self, N: int) -> None:  # noqa: N803
        HBPConvNd.__init__(self, N)
        self.derivatives = TNConvDerivatives(N)

    @staticmethod
    def _maybe_raise_groups_not_implemented_error(ext, module) -> None:
        """Grouped convolutions are supported (group-averaged input factor)."""

    def _factors_from_input(self, ext, module: Module) -> List[Tensor]:
        if ExpectationApproximation.should_average_param_jac(ext.get_ea_strategy()):
            raise NotImplementedError("Undefined")
        approx = getattr(ext, "kfac_approx", "expand")
        factor = _hyper_call(
            tnf.kfac_input_factor, module, approx=approx, groups_mode="average"
        )
        return [factor]


class TNSqrtGGNConv(TNConvExtension, SqrtGGNBaseModule):
    """``SqrtGGNExact``/``SqrtGGNMC``: ``Jᵀ S`` per sample as one TN."""

    STOCK = ("secondorder.sqrt_ggn.convnd", "SqrtGGNConv{N}d")

    def _init_backpack(self, N: int) -> None:  # noqa: N803
        SqrtGGNBaseModule.__init__(self, TNConvDerivatives(N), PARAMS)
