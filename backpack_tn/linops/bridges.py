"""curvlinops linear operators built from BackPACK fields.

After a backward pass with BackPACK (or ``backpack_tn``) extensions, these wrap the
stored quantities so curvlinops' tools apply to them: ``@`` with tensors or tensor
lists, ``to_scipy()``, trace/diagonal estimators, ``CGInverseLinearOperator``, Lanczos.

* :class:`DiagonalLinearOperator` — from ``diag_ggn_exact``, ``diag_ggn_mc``,
  ``diag_h`` or ``sum_grad_squared``;
* :class:`KroneckerLinearOperator` — block diagonal, one Kronecker product per
  parameter, from ``kfac``, ``kflr`` or ``kfra``.

Both offer exact damped inverses (``.inverse(damping)``).
"""

from __future__ import annotations

from typing import Iterable, List, Sequence

import torch
from curvlinops._torch_base import PyTorchLinearOperator
from torch import Tensor

DIAGONAL_FIELDS = ("diag_ggn_exact", "diag_ggn_mc", "diag_h", "sum_grad_squared")
KRONECKER_FIELDS = ("kfac", "kflr", "kfra")


def _field(params: Iterable[Tensor], savefield: str, allowed: Sequence[str]) -> list:
    if savefield not in allowed:
        raise ValueError(f"savefield must be one of {allowed}, got {savefield!r}.")
    values = []
    for i, p in enumerate(params):
        if not hasattr(p, savefield):
            raise ValueError(
                f"parameter {i} (shape {tuple(p.shape)}) has no field {savefield!r}: "
                "run backward inside backpack(...) with the matching extension first."
            )
        values.append(getattr(p, savefield))
    if not values:
        raise ValueError("params is empty.")
    return values


def _kron_apply(factors: List[Tensor], x: Tensor) -> Tensor:
    """``(F_1 ⊗ … ⊗ F_k) x`` for ``x`` of shape ``[*param_shape, columns]``."""
    y = x.reshape(*[f.shape[1] for f in factors], x.shape[-1])
    for axis, f in enumerate(factors):  # each factor acts along its own axis
        y = torch.tensordot(f, y, dims=([1], [axis])).movedim(0, axis)
    return y.reshape(x.shape)


class DiagonalLinearOperator(PyTorchLinearOperator):
    """Diagonal matrix over a list of parameter-shaped tensors."""

    SELF_ADJOINT = True

    def __init__(self, diagonal: List[Tensor]):
        """Store the diagonal.

        Args:
            diagonal: One tensor per parameter, each of that parameter's shape.
        """
        self._diagonal = [d.detach() for d in diagonal]
        shapes = [tuple(d.shape) for d in self._diagonal]
        super().__init__(shapes, shapes)

    @classmethod
    def from_backpack(
        cls, params: Iterable[Tensor], savefield: str = "diag_ggn_exact"
    ) -> DiagonalLinearOperator:
        """The diagonal stored by a BackPACK extension on ``params``.

        Args:
            params: Parameters carrying the field.
            savefield: ``'diag_ggn_exact'``, ``'diag_ggn_mc'``, ``'diag_h'`` or
                ``'sum_grad_squared'``.

        Returns:
            The operator.
        """
        return cls(_field(params, savefield, DIAGONAL_FIELDS))

    def _matmat(self, X: List[Tensor]) -> List[Tensor]:
        return [d.unsqueeze(-1) * x for d, x in zip(self._diagonal, X)]

    @property
    def diagonal(self) -> List[Tensor]:
        """The diagonal in tensor-list format."""
        return self._diagonal

    @property
    def trace(self) -> Tensor:
        """Sum of the diagonal."""
        return sum(d.sum() for d in self._diagonal)

    def inverse(self, damping: float = 0.0) -> DiagonalLinearOperator:
        """``(D + damping·I)⁻¹``.

        Args:
            damping: Non-negative damping.

        Returns:
            The inverse as a diagonal operator.

        Raises:
            ValueError: If the damped diagonal has non-positive entries.
        """
        damped = [d + damping for d in self._diagonal]
        if any((d <= 0).any() for d in damped):
            raise ValueError(
                "the damped diagonal has non-positive entries; increase damping."
            )
        return DiagonalLinearOperator([1.0 / d for d in damped])

    @property
    def device(self) -> torch.device:  # noqa: D102
        return self._diagonal[0].device

    @property
    def dtype(self) -> torch.dtype:  # noqa: D102
        return self._diagonal[0].dtype


class KroneckerLinearOperator(PyTorchLinearOperator):
    """Block-diagonal matrix with one Kronecker product ``B ⊗ A (⊗ …)`` per parameter.

    The factors follow BackPACK's convention: for a weight of shape
    ``[C_out, C_in, *K]`` with factors ``[B, A]``, ``B`` acts on the first axis and
    ``A`` on the flattened remaining ones, i.e. ``(B ⊗ A) vec(W)`` with row-major
    ``vec``; a single factor (bias) acts on the whole parameter.
    """

    SELF_ADJOINT = True

    def __init__(self, factors: List[List[Tensor]], shapes: List[Sequence[int]]):
        """Store the factors.

        Args:
            factors: Per parameter, a list of square symmetric factors whose sizes
                multiply to the parameter's number of elements.
            shapes: The parameters' shapes.

        Raises:
            ValueError: If factor sizes do not match a parameter's size.
        """
        self._factors = [[f.detach() for f in fs] for fs in factors]
        for fs, shape in zip(self._factors, shapes):
            sizes = [f.shape[0] for f in fs]
            if any(f.shape != (n, n) for f, n in zip(fs, sizes)) or torch.Size(
                shape
            ).numel() != int(torch.tensor(sizes).prod()):
                raise ValueError(
                    f"factors of shapes {[tuple(f.shape) for f in fs]} do not match "
                    f"a parameter of shape {tuple(shape)}."
                )
        shapes = [tuple(s) for s in shapes]
        super().__init__(shapes, shapes)

    @classmethod
    def from_backpack(
        cls, params: Iterable[Tensor], savefield: str = "kfac"
    ) -> KroneckerLinearOperator:
        """The Kronecker factors stored by ``KFAC``/``KFLR``/``KFRA`` on ``params``.

        Args:
            params: Parameters carrying the field.
            savefield: ``'kfac'``, ``'kflr'`` or ``'kfra'``.

        Returns:
            The operator.
        """
        params = list(params)
        return cls(
            _field(params, savefield, KRONECKER_FIELDS), [p.shape for p in params]
        )

    def _matmat(self, X: List[Tensor]) -> List[Tensor]:
        return [_kron_apply(fs, x) for fs, x in zip(self._factors, X)]

    @property
    def factors(self) -> List[List[Tensor]]:
        """The Kronecker factors per parameter."""
        return self._factors

    @property
    def trace(self) -> Tensor:
        """``Σ_blocks Π_factors tr(F)``."""
        total = 0.0
        for fs in self._factors:
            block = 1.0
            for f in fs:
                block = block * f.trace()
            total = total + block
        return total

    def inverse(self, damping: float = 0.0) -> PyTorchLinearOperator:
        """Exact ``(K + damping·I)⁻¹`` via eigendecompositions of the factors.

        Args:
            damping: Non-negative damping added to the whole block (not per factor).

        Returns:
            The inverse as a linear operator.
        """
        return _EigenKroneckerInverse(self, damping)

    @property
    def device(self) -> torch.device:  # noqa: D102
        return self._factors[0][0].device

    @property
    def dtype(self) -> torch.dtype:  # noqa: D102
        return self._factors[0][0].dtype


class _EigenKroneckerInverse(PyTorchLinearOperator):
    """``(⊗ Q_i Λ_i Q_iᵀ + λ I)⁻¹ = (⊗ Q_i) diag(1 / (⊗ λ_i + λ)) (⊗ Q_i)ᵀ``."""

    SELF_ADJOINT = True

    def __init__(self, K: KroneckerLinearOperator, damping: float):  # noqa: N803
        self._eig = []
        for fs in K.factors:
            evals, evecs = zip(*(torch.linalg.eigh(f) for f in fs))
            scale = evals[0]
            for ev in evals[1:]:
                scale = scale.unsqueeze(-1) * ev
            denominator = scale + damping
            if (denominator <= 0).any():
                raise ValueError(
                    "the damped Kronecker block is not positive definite; "
                    "increase damping."
                )
            self._eig.append((list(evecs), 1.0 / denominator))
        self._device, self._dtype = K.device, K.dtype
        super().__init__(K._in_shape, K._out_shape)

    def _matmat(self, X: List[Tensor]) -> List[Tensor]:
        out = []
        for (evecs, inv), x in zip(self._eig, X):
            y = _kron_apply([q.T for q in evecs], x)  # into the eigenbasis
            y = (y.reshape(*inv.shape, -1) * inv.unsqueeze(-1)).reshape(x.shape)
            out.append(_kron_apply(evecs, y))  # and back
        return out

    @property
    def device(self) -> torch.device:  # noqa: D102
        return self._device

    @property
    def dtype(self) -> torch.dtype:  # noqa: D102
        return self._dtype
