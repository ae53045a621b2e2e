"""Drop-in BackPACK extensions whose convolution quantities come from tensor networks.

Change one import line::

    from backpack_tn.extensions import KFAC, DiagGGNExact, BatchGrad

Each class subclasses BackPACK's extension of the same name, takes the same
constructor arguments (plus keyword-only ``strict``) and saves the same fields; its
``Conv1d``/``Conv2d``/``Conv3d`` module extensions compute with
:mod:`backpack_tn.functional`. ``KFAC``, ``KFLR`` and ``KFRA`` also take
``kfac_approx='expand'|'reduce'``.
"""

from __future__ import annotations

from typing import List, Optional

from backpack import extensions as _bext

from backpack_tn.extensions.modules import TNFallbackError
from backpack_tn.extensions.registry import (
    enabled,
    install,
    is_installed,
    register,
    uninstall,
)

KFAC_APPROXIMATIONS = ("expand", "reduce")

__all__ = [
    "BatchGrad",
    "BatchDiagGGNExact",
    "BatchDiagGGNMC",
    "BatchDiagHessian",
    "BatchL2Grad",
    "DiagGGNExact",
    "DiagGGNMC",
    "DiagHessian",
    "KFAC",
    "KFLR",
    "KFRA",
    "SqrtGGNExact",
    "SqrtGGNMC",
    "SumGradSquared",
    "TNFallbackError",
    "Variance",
    "enabled",
    "install",
    "is_installed",
    "register",
    "uninstall",
]


class BatchGrad(_bext.BatchGrad):
    """BackPACK's ``BatchGrad`` (``grad_batch``) with TN convolutions."""

    def __init__(self, subsampling: Optional[List[int]] = None, *, strict=False):
        """Same arguments as BackPACK's, plus ``strict`` (no fallback to BackPACK)."""
        super().__init__(subsampling=subsampling)
        register(self, strict)


class SumGradSquared(_bext.SumGradSquared):
    """BackPACK's ``SumGradSquared`` (``sum_grad_squared``) with TN convolutions."""

    def __init__(self, *, strict=False):
        """Same arguments as BackPACK's, plus ``strict`` (no fallback to BackPACK)."""
        super().__init__()
        register(self, strict)


class BatchL2Grad(_bext.BatchL2Grad):
    """BackPACK's ``BatchL2Grad`` (``batch_l2``) with TN convolutions."""

    def __init__(self, *, strict=False):
        """Same arguments as BackPACK's, plus ``strict`` (no fallback to BackPACK)."""
        super().__init__()
        register(self, strict)


class Variance(_bext.Variance):
    """BackPACK's ``Variance`` (``variance``) with TN convolutions."""

    def __init__(self, *, strict=False):
        """Same arguments as BackPACK's, plus ``strict`` (no fallback to BackPACK)."""
        super().__init__()
        register(self, strict)


class DiagGGNExact(_bext.DiagGGNExact):
    """BackPACK's ``DiagGGNExact`` (``diag_ggn_exact``) with TN convolutions."""

    def __init__(self, *, strict=False):
        """Same arguments as BackPACK's, plus ``strict`` (no fallback to BackPACK)."""
        super().__init__()
        register(self, strict)


class DiagGGNMC(_bext.DiagGGNMC):
    """BackPACK's ``DiagGGNMC`` (``diag_ggn_mc``) with TN convolutions."""

    def __init__(self, mc_samples: int = 1, *, strict=False):
        """Same arguments as BackPACK's, plus ``strict`` (no fallback to BackPACK)."""
        super().__init__(mc_samples=mc_samples)
        register(self, strict)


class BatchDiagGGNExact(_bext.BatchDiagGGNExact):
    """BackPACK's ``BatchDiagGGNExact`` (``diag_ggn_exact_batch``), TN convolutions."""

    def __init__(self, *, strict=False):
        """Same arguments as BackPACK's, plus ``strict`` (no fallback to BackPACK)."""
        super().__init__()
        register(self, strict)


class BatchDiagGGNMC(_bext.BatchDiagGGNMC):
    """BackPACK's ``BatchDiagGGNMC`` (``diag_ggn_mc_batch``) with TN convolutions."""

    def __init__(self, mc_samples: int = 1, *, strict=False):
        """Same arguments as BackPACK's, plus ``strict`` (no fallback to BackPACK)."""
        super().__init__(mc_samples=mc_samples)
        register(self, strict)


class DiagHessian(_bext.DiagHessian):
    """BackPACK's ``DiagHessian`` (``diag_h``) with TN convolutions."""

    def __init__(self, *, strict=False):
        """Same arguments as BackPACK's, plus ``strict`` (no fallback to BackPACK)."""
        super().__init__()
        register(self, strict)


class BatchDiagHessian(_bext.BatchDiagHessian):
    """BackPACK's ``BatchDiagHessian`` (``diag_h_batch``) with TN convolutions."""

    def __init__(self, *, strict=False):
        """Same arguments as BackPACK's, plus ``strict`` (no fallback to BackPACK)."""
        super().__init__()
        register(self, strict)


class SqrtGGNExact(_bext.SqrtGGNExact):
    """BackPACK's ``SqrtGGNExact`` (``sqrt_ggn_exact``) with TN convolutions."""

    def __init__(self, subsampling: Optional[List[int]] = None, *, strict=False):
        """Same arguments as BackPACK's, plus ``strict`` (no fallback to BackPACK)."""
        super().__init__(subsampling=subsampling)
        register(self, strict)


class SqrtGGNMC(_bext.SqrtGGNMC):
    """BackPACK's ``SqrtGGNMC`` (``sqrt_ggn_mc``) with TN convolutions."""

    def __init__(
        self,
        mc_samples: int = 1,
        subsampling: Optional[List[int]] = None,
        *,
        strict=False,
    ):
        """Same arguments as BackPACK's, plus ``strict`` (no fallback to BackPACK)."""
        super().__init__(mc_samples=mc_samples, subsampling=subsampling)
        register(self, strict)


def _check_approx(kfac_approx: str) -> str:
    if kfac_approx not in KFAC_APPROXIMATIONS:
        raise ValueError(
            f"kfac_approx must be one of {KFAC_APPROXIMATIONS}, got {kfac_approx!r}."
        )
    return kfac_approx


class KFAC(_bext.KFAC):
    """BackPACK's ``KFAC`` (``kfac``) with TN convolutions and KFAC-reduce.

    ``kfac_approx='expand'`` (default) reproduces BackPACK's numbers; ``'reduce'``
    uses the KFAC-reduce input factor (see the docs for both conventions).
    """

    def __init__(
        self, mc_samples: int = 1, kfac_approx: str = "expand", *, strict=False
    ):
        """BackPACK's arguments, ``kfac_approx`` and ``strict``."""
        self.kfac_approx = _check_approx(kfac_approx)
        super().__init__(mc_samples=mc_samples)
        register(self, strict)


class KFLR(_bext.KFLR):
    """BackPACK's ``KFLR`` (``kflr``) with TN convolutions and KFAC-reduce."""

    def __init__(self, kfac_approx: str = "expand", *, strict=False):
        """BackPACK's arguments, ``kfac_approx`` and ``strict``."""
        self.kfac_approx = _check_approx(kfac_approx)
        super().__init__()
        register(self, strict)


class KFRA(_bext.KFRA):
    """BackPACK's ``KFRA`` (``kfra``) with TN convolutions and KFAC-reduce."""

    def __init__(self, kfac_approx: str = "expand", *, strict=False):
        """BackPACK's arguments, ``kfac_approx`` and ``strict``."""
        self.kfac_approx = _check_approx(kfac_approx)
        super().__init__()
        register(self, strict)
