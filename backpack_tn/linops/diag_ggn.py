"""The diagonal of the GGN over a data set, as a curvlinops linear operator.

curvlinops 3.0 has no exact GGN diagonal (only estimators); building it from
per-sample Jacobians is infeasible for CNNs. :class:`DiagGGNLinearOperator` runs
BackPACK's ``DiagGGNExact``/``DiagGGNMC`` with ``backpack_tn``'s convolution
extensions once per mini-batch of a data loader and sums the results with curvlinops'
normalisation, so the operator equals the diagonal of
``curvlinops.GGNLinearOperator(model_func, loss_func, params, data)`` (exact mode).
"""

from __future__ import annotations

import copy
from collections.abc import MutableMapping
from typing import Callable, Iterable, List, Optional, Tuple, Union

import torch
from backpack import backpack, extend
from curvlinops._torch_base import CurvatureLinearOperator
from torch import Tensor
from torch.nn import Module, Parameter

from backpack_tn.extensions import DiagGGNExact, DiagGGNMC
from backpack_tn.linops.bridges import DiagonalLinearOperator

MODES = ("exact", "mc")


def _shared_copy(module: Module) -> Module:
    """A deep copy of ``module`` that shares its parameters and buffers."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


class DiagGGNLinearOperator(CurvatureLinearOperator):
    """Diagonal of the generalized Gauss-Newton matrix, accumulated over ``data``.

    Uses curvlinops' constructor conventions. BackPACK extends copies of
    ``model_func`` and ``loss_func`` that share their parameters and buffers (the
    user's modules stay un-hooked). A model that needs BackPACK's converter (e.g.
    residual additions) should be passed as ``extend(model, use_converter=True)``.
    The diagonal is computed on the first product (or :meth:`compute_diagonal`) and
    cached; parameters' ``.grad`` are left as they were.
    """

    SELF_ADJOINT = True

    def __init__(
        self,
        model_func: Module,
        loss_func: Module,
        params: List[Parameter],
        data: Iterable[Tuple[Union[Tensor, MutableMapping], Tensor]],
        progressbar: bool = False,
        check_deterministic: bool = True,
        mode: str = "exact",
        mc_samples: int = 1,
        seed: int = 2147483647,
        num_data: Optional[int] = None,
        batch_size_fn: Optional[Callable[[Union[MutableMapping, Tensor]], int]] = None,
    ):
        """Set up the operator.

        Args:
            model_func: The neural network (an ``nn.Module`` BackPACK can extend).
            loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
            params: The parameters whose diagonal block is represented.
            data: Mini-batches ``(X, y)``, e.g. a ``DataLoader``.
            progressbar: Show a progress bar while looping over the data.
            check_deterministic: Check that model and data are deterministic.
            mode: ``'exact'`` (``DiagGGNExact``) or ``'mc'`` (``DiagGGNMC``).
            mc_samples: Monte-Carlo samples per datum for ``mode='mc'``.
            seed: Seed of the Monte-Carlo sampling (the global RNG state is restored).
            num_data: Number of data points (inferred from ``data`` if ``None``).
            batch_size_fn: Batch size of a non-tensor ``X``.

        Raises:
            ValueError: For an unknown ``mode``, ``mc_samples < 1`` or a model that
                is not an ``nn.Module``.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}.")
        if not isinstance(model_func, Module) or not isinstance(loss_func, Module):
            raise ValueError(
                "model_func and loss_func must be torch.nn.Modules (BackPACK extends "
                "modules)."
            )
        self._mode, self._mc_samples, self._seed = mode, mc_samples, seed
        self._diagonal: Optional[List[Tensor]] = None
        # BackPACK's hooks break functorch transforms and in-place ops on outputs:
        # extend copies that share the parameters and buffers, not the user's modules.
        self._backpack_model = extend(_shared_copy(model_func))
        self._backpack_loss = extend(_shared_copy(loss_func))
        super().__init__(
            model_func,
            loss_func,
            params,
            data,
            progressbar=progressbar,
            check_deterministic=check_deterministic,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
        )

    def _extension(self):
        if self._mode == "exact":
            return DiagGGNExact()
        return DiagGGNMC(mc_samples=self._mc_samples)

    def compute_diagonal(self) -> List[Tensor]:
        """Accumulate the diagonal over the data (one backward pass per batch).

        Returns:
            The diagonal in tensor-list format (cached for later products).

        Raises:
            ValueError: If BackPACK produced no diagonal for a parameter (it lives in
                a layer BackPACK does not support).
        """
        savefield = "diag_ggn_exact" if self._mode == "exact" else "diag_ggn_mc"
        # backward() accumulates into .grad (in place): park the user's gradients.
        owners = list(self._model_func.parameters()) + list(self._params)
        saved_grads = [p.grad for p in owners]
        for p in owners:
            p.grad = None
        diagonal = [torch.zeros_like(p) for p in self._params]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self._seed)
            for X, y in self._loop_over_data(desc="diag_ggn"):
                factor = self._get_normalization_factor(X, y)
                loss = self._backpack_loss(self._backpack_model(X), y)
                with backpack(self._extension()):
                    loss.backward()
                for i, (p, total) in enumerate(zip(self._params, diagonal)):
                    value = getattr(p, savefield, None)
                    if value is None:
                        raise ValueError(
                            f"BackPACK computed no {savefield} for parameter {i} "
                            f"(shape {tuple(p.shape)}): is it in a supported layer?"
                        )
                    total.add_(value, alpha=factor)
                    delattr(p, savefield)
        for p, grad in zip(owners, saved_grads):
            p.grad = grad
        self._diagonal = diagonal
        return diagonal

    @property
    def diagonal(self) -> List[Tensor]:
        """The diagonal in tensor-list format (computed on first access)."""
        if self._diagonal is None:
            self.compute_diagonal()
        return self._diagonal

    def _matmat(self, M: List[Tensor]) -> List[Tensor]:
        return [d.unsqueeze(-1) * m for d, m in zip(self.diagonal, M)]

    @property
    def trace(self) -> Tensor:
        """Sum of the diagonal."""
        return sum(d.sum() for d in self.diagonal)

    def inverse(self, damping: float = 0.0) -> DiagonalLinearOperator:
        """``(D + damping·I)⁻¹`` as a diagonal operator.

        Args:
            damping: Non-negative damping.

        Returns:
            The inverse.
        """
        return DiagonalLinearOperator(self.diagonal).inverse(damping)
