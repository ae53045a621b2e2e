"""curvlinops integration.

* :class:`KFACLinearOperator`, :class:`EKFACLinearOperator` — drop-in subclasses of
  curvlinops' operators whose convolution statistics come from tensor networks, for
  ``Linear`` and ``Conv1d``/``Conv2d``/``Conv3d`` (groups, every padding and
  ``padding_mode``); :func:`install_curvlinops` patches curvlinops' own classes.
* :class:`DiagGGNLinearOperator` — the exact (or MC) GGN diagonal over a data loader,
  through BackPACK and ``backpack_tn``.
* Bridges from BackPACK fields: :class:`DiagonalLinearOperator`,
  :class:`KroneckerLinearOperator`.
"""

from backpack_tn.linops.bridges import DiagonalLinearOperator, KroneckerLinearOperator
from backpack_tn.linops.diag_ggn import DiagGGNLinearOperator
from backpack_tn.linops.kfac import (
    EKFACLinearOperator,
    FisherType,
    KFACLinearOperator,
    KFACType,
    curvlinops_is_installed,
    install_curvlinops,
    uninstall_curvlinops,
)

__all__ = [
    "KFACLinearOperator",
    "EKFACLinearOperator",
    "DiagGGNLinearOperator",
    "DiagonalLinearOperator",
    "KroneckerLinearOperator",
    "FisherType",
    "KFACType",
    "install_curvlinops",
    "uninstall_curvlinops",
    "curvlinops_is_installed",
]
