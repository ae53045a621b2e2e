"""curvlinops integration.

So far: bridges from BackPACK fields to curvlinops linear operators
(:class:`DiagonalLinearOperator`, :class:`KroneckerLinearOperator`). The TN
``KFACLinearOperator``/``EKFACLinearOperator`` drop-ins are not built yet.
"""

from backpack_tn.linops.bridges import DiagonalLinearOperator, KroneckerLinearOperator

__all__ = ["DiagonalLinearOperator", "KroneckerLinearOperator"]
