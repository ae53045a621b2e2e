"""Putting the TN convolution extensions into BackPACK extensions.

Three ways in, from explicit to global:

* :func:`register` — into one existing BackPACK extension instance;
* the drop-in classes of :mod:`backpack_tn.extensions` (which call :func:`register`);
* :func:`install` / :func:`uninstall` / :func:`enabled` — every BackPACK extension
  *constructed* while installed gets the TN convolution extensions, so code that builds
  BackPACK extensions itself (laplace-torch, for one) benefits unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Type

from backpack import extensions as bext
from backpack.extensions.backprop_extension import BackpropExtension
from torch.nn import Conv1d, Conv2d, Conv3d

from backpack_tn.dropout import TNDropoutConv1d, TNDropoutConv2d, TNDropoutConv3d
from backpack_tn.extensions import modules as tnm

#: TN module extension class for each BackPACK extension class.
TN_MODULE_EXTENSIONS: Dict[Type[BackpropExtension], type] = {
    bext.BatchGrad: tnm.TNBatchGradConv,
    bext.SumGradSquared: tnm.TNSumGradSquaredConv,
    bext.BatchL2Grad: tnm.TNBatchL2GradConv,
    bext.Variance: tnm.TNVarianceConv,
    bext.DiagGGNExact: tnm.TNDiagGGNConv,
    bext.DiagGGNMC: tnm.TNDiagGGNConv,
    bext.BatchDiagGGNExact: tnm.TNBatchDiagGGNConv,
    bext.BatchDiagGGNMC: tnm.TNBatchDiagGGNConv,
    bext.DiagHessian: tnm.TNDiagHConv,
    bext.BatchDiagHessian: tnm.TNBatchDiagHConv,
    bext.KFAC: tnm.TNHBPConv,
    bext.KFLR: tnm.TNHBPConv,
    bext.KFRA: tnm.TNHBPConv,
    bext.SqrtGGNExact: tnm.TNSqrtGGNConv,
    bext.SqrtGGNMC: tnm.TNSqrtGGNConv,
}

CONVOLUTIONS = {1: Conv1d, 2: Conv2d, 3: Conv3d}

# BackPACK looks module extensions up by exact class, so the tensor-dropout
# convolutions (backpack_tn.dropout) are registered as the convolutions they are:
# their BackPACK quantities come from the saved module input and stay exact.
DROPOUT_CONVOLUTIONS = {1: TNDropoutConv1d, 2: TNDropoutConv2d, 3: TNDropoutConv3d}


def tn_module_extension_class(extension: BackpropExtension) -> Optional[type]:
    """The TN module extension for an extension (by class, subclasses included)."""
    for cls in type(extension).__mro__:
        if cls in TN_MODULE_EXTENSIONS:
            return TN_MODULE_EXTENSIONS[cls]
    return None


def register(extension: BackpropExtension, strict: bool = False) -> BackpropExtension:
    """Make a BackPACK extension compute its ``Conv{1,2,3}d`` quantities with TNs.

    The tensor-dropout convolutions ``TNDropoutConv{1,2,3}d`` are registered too.

    Args:
        extension: An instance of a BackPACK extension (``BatchGrad()``, ``KFAC()``, …).
        strict: If ``True``, a module the TN path cannot handle raises
            :class:`~backpack_tn.extensions.modules.TNFallbackError` instead of
            falling back to BackPACK's computation.

    Returns:
        The same extension, modified in place.

    Raises:
        ValueError: If ``extension`` has no TN counterpart and ``strict`` is set.
    """
    tn_class = tn_module_extension_class(extension)
    if tn_class is None:
        if strict:
            supported = ", ".join(cls.__name__ for cls in TN_MODULE_EXTENSIONS)
            raise ValueError(
                f"backpack_tn has no convolution extension for "
                f"{type(extension).__name__}; supported: {supported}."
            )
        return extension
    for classes in (CONVOLUTIONS, DROPOUT_CONVOLUTIONS):
        for dims, conv in classes.items():
            extension.set_module_extension(conv, tn_class(dims, strict), overwrite=True)
    return extension


_ORIGINAL_INIT = BackpropExtension.__init__


def _init_with_tn(self: BackpropExtension, *args, **kwargs) -> None:
    _ORIGINAL_INIT(self, *args, **kwargs)
    register(self)


def install() -> None:
    """Route every BackPACK extension constructed from now on through the TN path.

    Extensions constructed before are unaffected (use :func:`register` on them).
    """
    BackpropExtension.__init__ = _init_with_tn


def uninstall() -> None:
    """Restore BackPACK: extensions constructed from now on are stock again."""
    BackpropExtension.__init__ = _ORIGINAL_INIT


def is_installed() -> bool:
    """Whether :func:`install` is in effect."""
    return BackpropExtension.__init__ is _init_with_tn


@contextmanager
def enabled() -> Iterator[None]:
    """Context in which newly constructed BackPACK extensions use the TN path.

    Yields:
        Nothing.
    """
    was_installed = is_installed()
    install()
    try:
        yield
    finally:
        if not was_installed:
            uninstall()
