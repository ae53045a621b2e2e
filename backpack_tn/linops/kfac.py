"""curvlinops' KFAC and EKFAC operators with tensor-network convolution statistics.

:class:`KFACLinearOperator` and :class:`EKFACLinearOperator` subclass curvlinops'
operators (version 3.0.x) and change only where the numbers of convolutions come from:

* the input covariance of a ``Conv{1,2,3}d`` (KFAC-expand ``Σ_o u_o u_oᵀ`` and
  KFAC-reduce ``ū ūᵀ``) is contracted from the layer input and the index patterns
  (the engine's window strategy may instead build one patch matrix in GEMM layout
  where it measures that faster) — curvlinops unfolds the input (expand) or builds
  dense averaged patterns (reduce), for ``Conv2d`` only;
* EKFAC's eigenvalue correction squares per-example gradients rotated into the
  Kronecker eigenbasis; the per-example gradients come from the TN weight VJP, batch
  chunk by batch chunk, where curvlinops unfolds the whole input first.

Everything else — loss-scale corrections, the ``matmat``, ``trace``/``det``/``logdet``,
``state_dict``, :class:`curvlinops.KFACInverseLinearOperator` — is curvlinops' own, so
the operators are drop-in replacements. Beyond curvlinops they
support ``Conv1d``/``Conv3d``, uneven ``padding='same'`` and every ``padding_mode``
(curvlinops' hooks see the unpadded input and silently treat those as zero padding).

Conventions are curvlinops': channel groups are averaged (one Kronecker factor shared
by all groups), KFAC-expand divides the input covariance by the number of output
positions, and with ``separate_weight_and_bias=False`` the bias is the last input row.

:func:`install_curvlinops` patches the same hooks into curvlinops' own classes, so
code that builds ``curvlinops.KFACLinearOperator`` itself (e.g. laplace-torch) gets the
TN statistics and the extra layers too.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, List, Tuple

import curvlinops
import torch
from curvlinops.ekfac import EKFACLinearOperator as _CurvEKFAC
from curvlinops.kfac import FisherType, KFACType
from curvlinops.kfac import KFACLinearOperator as _CurvKFAC
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn import Conv1d, Conv2d, Conv3d, Linear, Module

from backpack_tn import functional as tnf
from backpack_tn.extensions.derivatives import hyperparameters
from backpack_tn.tn.evaluate import get_memory_budget
from backpack_tn.tn.geometry import make_geometry

__all__ = [
    "KFACLinearOperator",
    "EKFACLinearOperator",
    "install_curvlinops",
    "uninstall_curvlinops",
    "curvlinops_is_installed",
    "FisherType",
    "KFACType",
]

CONVOLUTIONS = (Conv1d, Conv2d, Conv3d)
SUPPORTED_MODULES = (Linear, *CONVOLUTIONS)

# What install_curvlinops() replaces on curvlinops' classes (by the attribute of the
# same name on KFACLinearOperator / EKFACLinearOperator below).
_PATCHED = [
    (_CurvKFAC, "_SUPPORTED_MODULES"),
    (_CurvKFAC, "_hook_accumulate_input_covariance"),
    (_CurvKFAC, "_accumulate_gradient_covariance"),
    (_CurvKFAC, "_compute_loss_and_backward"),
    (_CurvKFAC, "compute_kronecker_factors"),
    (_CurvKFAC, "_register_tensor_hook_on_output_to_accumulate_gradient_covariance"),
    (_CurvEKFAC, "_accumulate_corrected_eigenvalues"),
    (_CurvEKFAC, "compute_eigenvalue_correction"),
    (_CurvEKFAC, "_register_tensor_hook_on_output_to_accumulate_corrected_eigenvalues"),
]
# curvlinops' originals, captured before anything is patched.
_STOCK = {(cls, name): cls.__dict__[name] for cls, name in _PATCHED}

# Fisher types whose factors come from backpropagated gradients of the layer outputs.
_BACKPROPAGATING = (FisherType.TYPE2, FisherType.MC, FisherType.EMPIRICAL)


def _averaged_hyperparameters(module: Module) -> dict:
    """Hyper-parameters for the group-averaged input: one group of ``C_in/G``."""
    return dict(hyperparameters(module), groups=1)


def _num_positions(module: Module, x: Tensor) -> int:
    """Number of output positions ``O`` of a convolution on input ``x``."""
    geometry = make_geometry(x.shape[2:], module.kernel_size, **hyperparameters(module))
    return math.prod(geometry.output_size)


def _check_single_input(inputs: Tuple[Tensor, ...]) -> Tensor:
    if len(inputs) != 1:
        raise ValueError("Modules with multiple inputs are not supported.")
    return inputs[0].data.detach()


def _gradient_scale(op: _CurvKFAC, batch_size: int) -> float:
    """Curvlinops' correction of the gradient outer products for the loss reduction.

    Backpropagated gradients of a mean-reduced loss carry ``1/(N·T)``; the Fisher of
    the data set wants ``1/N_data`` per example, and MC samples are averaged.
    """
    if op._loss_func.reduction == "sum":
        return 1.0 / op._mc_samples
    terms = op._num_per_example_loss_terms
    return (batch_size * terms) ** 2 / (op._N_data * op._mc_samples * terms)


def _joint_bias(op: _CurvKFAC, module_name: str) -> bool:
    params = op._mapping[module_name]
    return "weight" in params and "bias" in params and not op._separate_weight_and_bias


# While an operator computes its factors, ``op.__dict__[_EDGES]`` is the list of the
# gradient edges of the hooked layers' outputs recorded since the last backward pass;
# at any other time (and during the backward pass itself: non-reentrant checkpointing
# re-runs forward hooks there) it is absent or ``None`` and nothing is recorded.
_EDGES = "_tn_output_edges"


def _recording_edge(cls: type, name: str):
    """Curvlinops' forward hook ``name`` of ``cls``, also recording output edges."""
    stock = _STOCK[(cls, name)]

    def hook(self, module: Module, inputs: Tuple[Tensor], output: Tensor, module_name):
        stock(self, module, inputs, output, module_name)
        edges = self.__dict__.get(_EDGES)
        if edges is not None:
            # The edge, not the tensor: an in-place activation after the layer (ReLU
            # in torchvision's ResNets) re-binds the tensor to a later graph node.
            edges.append(get_gradient_edge(output))

    hook.__name__ = hook.__qualname__ = name
    hook.__doc__ = (
        "Forward hook: curvlinops' tensor hook on the layer output, and (while "
        "factors are computed) the output's gradient edge for the backward pass."
    )
    return hook


def _collecting_edges(method):
    """``method`` (a factor computation) with output edges recorded while it runs."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        # nested (EKFAC's correction computes missing factors first): the outer
        # computation records again afterwards
        outer = _EDGES in self.__dict__
        self.__dict__[_EDGES] = []
        try:
            return method(self, *args, **kwargs)
        finally:
            # also after an exception between a forward and its backward pass: the
            # edges would hold that graph and belong to no later loss
            if outer:
                self.__dict__[_EDGES] = []
            else:
                self.__dict__.pop(_EDGES, None)

    return wrapper


def _frontier(edges: List[GradientEdge], root) -> List[GradientEdge]:
    """The recorded edges a backward pass from ``root`` has to be asked for.

    Edges ``root`` cannot reach are dropped (a layer output that does not feed the
    loss: its tensor hook would not fire for curvlinops either), and so are edges
    with another recorded edge below them: the backward pass to the deepest edges
    runs through them, so their tensor hooks fire, and their gradients are not held
    to the end of the backward pass as the returned ones are.
    """
    targets = {edge.node for edge in edges}
    below = {}  # node -> whether a target lies strictly below it
    stack = [root] if root is not None else []
    while stack:
        node = stack[-1]
        if node in below:
            stack.pop()
            continue
        children = [child for child, _ in node.next_functions if child is not None]
        pending = [child for child in children if child not in below]
        if pending:
            stack.extend(pending)
            continue
        stack.pop()
        below[node] = any(child in targets or below[child] for child in children)
    return [edge for edge in edges if edge.node in below and not below[edge.node]]


def _compute_loss_and_backward(self: _CurvKFAC, output: Tensor, y: Tensor) -> None:
    """Curvlinops' backward pass(es), differentiating w.r.t. the layer outputs only.

    The Kronecker factors and EKFAC's correction only read the gradients w.r.t. the
    outputs of the hooked layers (their tensor hooks fire as those are computed);
    curvlinops differentiates w.r.t. the parameters and discards the result, paying
    every layer's weight-gradient contraction. Asking autograd for the deepest
    output edges instead (:func:`_frontier`) gives the same hooks the same tensors
    without that work.

    curvlinops 3.0 passes ``self._params`` to ``torch.autograd.grad`` in the
    backpropagating branches and reads nothing else from it there; the edges stand
    in for it during the call. (Hooks that read ``self.device``/``self.dtype``,
    which look at ``self._params``, would see edges: curvlinops' do not.)
    """
    stock = _STOCK[(_CurvKFAC, "_compute_loss_and_backward")]
    edges = self.__dict__.get(_EDGES)
    if edges is None:  # not within a factor computation of ours
        return stock(self, output, y)
    self.__dict__[_EDGES] = None  # record nothing during the backward pass
    try:
        if self._fisher_type not in _BACKPROPAGATING:
            return stock(self, output, y)
        inputs = _frontier(edges, output.grad_fn)
        if not inputs:
            return stock(self, output, y)
        params = self._params
        self._params = inputs
        try:
            return stock(self, output, y)
        finally:
            self._params = params
    finally:
        self.__dict__[_EDGES] = []  # the next batch's forward pass


class KFACLinearOperator(_CurvKFAC):
    """curvlinops' ``KFACLinearOperator`` with TN convolution statistics.

    Same constructor, methods and conventions as
    :class:`curvlinops.KFACLinearOperator`; supports ``Linear`` and
    ``Conv1d``/``Conv2d``/``Conv3d`` (groups, dilation, stride, every padding and
    ``padding_mode``). See the module docstring for what changes.
    """

    _SUPPORTED_MODULES = SUPPORTED_MODULES
    _compute_loss_and_backward = _compute_loss_and_backward
    compute_kronecker_factors = _collecting_edges(_CurvKFAC.compute_kronecker_factors)
    _register_tensor_hook_on_output_to_accumulate_gradient_covariance = _recording_edge(
        _CurvKFAC,
        "_register_tensor_hook_on_output_to_accumulate_gradient_covariance",
    )

    def _hook_accumulate_input_covariance(
        self, module: Module, inputs: Tuple[Tensor], module_name: str
    ):
        """Forward pre-hook: add a batch's input covariance (TN for convolutions).

        Args:
            module: The layer.
            inputs: Its inputs (exactly one).
            module_name: The layer's name in the model.
        """
        if not isinstance(module, CONVOLUTIONS):
            stock = _STOCK[(_CurvKFAC, "_hook_accumulate_input_covariance")]
            return stock(self, module, inputs, module_name)

        x = _check_single_input(inputs)
        hyper = hyperparameters(module)
        batch_size = x.shape[0]
        # curvlinops normalises both approximations per data point (and expand also
        # per output position); the row/column of a joint bias is Σ_n ū_n / N_data
        # and its corner N/N_data in both cases.
        if self._kfac_approx == KFACType.EXPAND:
            # curvlinops' normalisation in the factor's one scaling pass (on the
            # input where that is smaller: 1/100 of the work on 512-channel layers)
            covariance = tnf.kfac_input_factor(
                x,
                module.kernel_size,
                approx="expand",
                scale=1.0 / (self._N_data * _num_positions(module, x)),
                **hyper,
            )
            means = None
        else:
            means = tnf.averaged_patches(x, module.kernel_size, **hyper)
            covariance = (means.T @ means).div_(self._N_data)

        if _joint_bias(self, module_name):
            if means is None:
                means = tnf.averaged_patches(x, module.kernel_size, **hyper)
            column = means.sum(0).div_(self._N_data)
            corner = column.new_full((1,), batch_size / self._N_data)
            covariance = torch.cat(
                [
                    torch.cat([covariance, column.unsqueeze(1)], dim=1),
                    torch.cat([column, corner]).unsqueeze(0),
                ]
            )

        self._input_covariances = self._set_or_add_(
            self._input_covariances, module_name, covariance
        )

    def _accumulate_gradient_covariance(
        self, grad_output: Tensor, module: Module, module_name: str
    ):
        """Tensor hook: add a batch's output-gradient covariance.

        Like curvlinops, but the channel axis of a convolution's output gradient is
        moved last for any number of spatial dimensions (curvlinops: ``Conv2d`` only).

        Args:
            grad_output: Gradient w.r.t. the layer output.
            module: The layer.
            module_name: The layer's name in the model.
        """
        g = grad_output.data.detach()
        batch_size = g.shape[0]
        if isinstance(module, CONVOLUTIONS):
            g = g.movedim(1, -1)
        g = g.reshape(batch_size, -1, g.shape[-1])  # [N, shared, D_out]
        if self._kfac_approx == KFACType.EXPAND:
            g = g.flatten(0, 1)
        else:
            g = g.sum(1)
        covariance = (g.T @ g).mul_(_gradient_scale(self, batch_size))
        self._gradient_covariances = self._set_or_add_(
            self._gradient_covariances, module_name, covariance
        )


#: EKFAC's rotated per-example gradients are formed in chunks of at most this many
#: bytes (and within the engine's memory budget): they are only squared and summed,
#: and chunks of a few examples keep the GEMMs as efficient (ResNet-18's 512-channel
#: layers: 9 MiB per example, 72 MiB for a batch of 8 at once).
DEFAULT_CORRECTION_BYTES = 32 * 2**20


def _chunks(batch_size: int, bytes_per_example: int):
    """Batch slices for EKFAC's per-example gradients.

    At most :data:`DEFAULT_CORRECTION_BYTES` of them per slice, whose work space also
    fits the engine's memory budget (if one is set).
    """
    size = DEFAULT_CORRECTION_BYTES // bytes_per_example
    budget = get_memory_budget()
    if budget is not None:
        size = min(size, budget // (3 * bytes_per_example))
    size = max(1, size)
    for start in range(0, batch_size, size):
        yield slice(start, min(start + size, batch_size))


def _project_input(module: Module, x: Tensor, q: Tensor, with_bias: bool) -> Tensor:
    """Unfolded input patches projected onto an eigenbasis: ``u_{n,o}ᵀ Q`` ``[N,D,O]``.

    A convolution of ``x`` (groups averaged) whose kernels are the columns of ``Q``
    (the bias row of ``Q`` for a joint bias becomes the convolution's bias), so the
    unfolded input itself is never formed.
    """
    rows = q.shape[0] - 1 if with_bias else q.shape[0]  # rows ordered (c, k…)
    kernel = q[:rows].T.reshape(q.shape[1], x.shape[1], *module.kernel_size)
    bias = q[-1] if with_bias else None
    # tnf.conv runs torch's kernel where it applies, a TN for the other paddings
    out = tnf.conv(x, kernel, bias, **_averaged_hyperparameters(module))
    return out.flatten(2)


def _conv_corrected_eigenvalues(
    op: _CurvEKFAC, grad_output: Tensor, module: Module, module_name: str
) -> None:
    """EKFAC's ``Σ_n (Q_outᵀ G_n Q_in)²`` for a convolution, cheapest order first.

    With ``S`` output positions, ``D_out``/``D_in`` the factor sizes: the output
    gradients are rotated before the per-example contraction when ``S < D_in``
    (``N·S·D_out²`` instead of ``N·D_out²·D_in``); the inputs are projected by a
    convolution when ``S < D_out`` (``N·S·D_in²`` instead of ``N·D_out·D_in²``),
    otherwise per-example gradients come from the TN weight VJP and are rotated.
    """
    g = grad_output.data.detach()
    batch_size = g.shape[0]
    scale = _gradient_scale(op, batch_size)
    q_in = op._input_covariances_eigenvectors.get(module_name)
    q_out = op._gradient_covariances_eigenvectors[module_name]
    g_rot = torch.einsum("nds,da->nas", g.flatten(2), q_out)  # [N, D_out, S]
    positions = g_rot.shape[2]

    def corrections(with_weight: bool, with_bias: bool) -> Tensor:
        if not with_weight:
            return g_rot.sum(2).square_().sum(0)
        x_bar = tnf.group_average(op._cached_activations[module_name], module.groups)
        d_out, d_in = q_out.shape[0], q_in.shape[0]
        result = None
        for rows in _chunks(batch_size, d_out * d_in * g.element_size()):
            if positions < d_out:
                x_rot = _project_input(module, x_bar[rows], q_in, with_bias)
                rotated = g_rot[rows] @ x_rot.transpose(1, 2)
            else:
                per_example = tnf.weight_vjp(
                    x_bar[rows],
                    g_rot[rows].reshape(g[rows].shape),
                    module.kernel_size,
                    per_sample=True,
                    **_averaged_hyperparameters(module),
                ).flatten(2)
                if with_bias:
                    bias_grad = g_rot[rows].sum(2, keepdim=True)
                    per_example = torch.cat([per_example, bias_grad], dim=-1)
                rotated = per_example @ q_in
            part = rotated.square_().sum(0)
            result = part if result is None else result.add_(part)
        return result

    if _joint_bias(op, module_name):
        value = corrections(True, True).mul_(scale)
        op._corrected_eigenvalues = op._set_or_add_(
            op._corrected_eigenvalues, module_name, value
        )
        return
    per_param: Dict[int, Tensor] = op._corrected_eigenvalues.setdefault(module_name, {})
    for name, pos in op._mapping[module_name].items():
        value = corrections(name == "weight", False).mul_(scale)
        op._set_or_add_(per_param, pos, value)


class EKFACLinearOperator(_CurvEKFAC, KFACLinearOperator):
    """curvlinops' ``EKFACLinearOperator`` with TN convolution statistics.

    Same constructor, methods and conventions as
    :class:`curvlinops.EKFACLinearOperator`. The Kronecker factors come from
    :class:`KFACLinearOperator`'s hooks; the eigenvalue correction of a convolution
    squares rotated per-example gradients computed by the TN weight VJP in batch
    chunks of at most :data:`DEFAULT_CORRECTION_BYTES` of per-example gradients,
    within :func:`backpack_tn.tn.evaluate.set_memory_budget`.
    """

    _SUPPORTED_MODULES = SUPPORTED_MODULES
    compute_eigenvalue_correction = _collecting_edges(
        _CurvEKFAC.compute_eigenvalue_correction
    )
    _register_tensor_hook_on_output_to_accumulate_corrected_eigenvalues = (
        _recording_edge(
            _CurvEKFAC,
            "_register_tensor_hook_on_output_to_accumulate_corrected_eigenvalues",
        )
    )

    def _accumulate_corrected_eigenvalues(
        self, grad_output: Tensor, module: Module, module_name: str
    ):
        """Tensor hook: add a batch's corrected eigenvalues (TN for convolutions).

        Args:
            grad_output: Gradient w.r.t. the layer output.
            module: The layer.
            module_name: The layer's name in the model.
        """
        if not isinstance(module, CONVOLUTIONS):
            stock = _STOCK[(_CurvEKFAC, "_accumulate_corrected_eigenvalues")]
            return stock(self, grad_output, module, module_name)
        _conv_corrected_eigenvalues(self, grad_output, module, module_name)


_PATCHES = {
    (cls, name): (
        KFACLinearOperator if cls is _CurvKFAC else EKFACLinearOperator
    ).__dict__[name]
    for cls, name in _PATCHED
}


def install_curvlinops() -> None:
    """Route curvlinops' own ``KFACLinearOperator``/``EKFACLinearOperator`` through TNs.

    Operators constructed afterwards (by any code, e.g. laplace-torch) compute their
    convolution statistics with the TN engine and accept ``Conv1d``/``Conv3d``.
    """
    for (cls, name), value in _PATCHES.items():
        setattr(cls, name, value)


def uninstall_curvlinops() -> None:
    """Restore curvlinops' own KFAC/EKFAC hooks and supported layers."""
    for (cls, name), value in _STOCK.items():
        setattr(cls, name, value)


def curvlinops_is_installed() -> bool:
    """Whether :func:`install_curvlinops` is in effect."""
    return curvlinops.KFACLinearOperator._SUPPORTED_MODULES is SUPPORTED_MODULES
