"""BackPACK derivatives of ``Conv{1,2,3}d`` computed with tensor networks.

BackPACK's module extensions get every Jacobian product from a *derivatives* object.
:class:`TNConvDerivatives` is a drop-in for BackPACK's ``Conv{N}DDerivatives``: the
weight Jacobians (per-sample gradients, GGN square roots, ``J_W`` products) come from
:mod:`backpack_tn.functional` — no repeated-input grouped convolution, no unfolded
input. The input Jacobians use tensor networks exactly where BackPACK's
``conv_transpose`` is wrong (``padding='same'``, non-zero ``padding_mode``).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from backpack.core.derivatives.convnd import ConvNDDerivatives
from backpack.utils.subsampling import subsample
from torch import Tensor
from torch.nn import Module

from backpack_tn import functional as tnf


def hyperparameters(module: Module) -> dict:
    """A convolution module's hyper-parameters as ``backpack_tn.functional`` keywords.

    Args:
        module: A ``Conv{1,2,3}d``.

    Returns:
        ``stride``, ``padding``, ``dilation``, ``groups`` and ``padding_mode``.
    """
    return dict(
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=module.groups,
        padding_mode=module.padding_mode,
    )


def native_input_jacobian_ok(module: Module) -> bool:
    """Whether BackPACK's own input Jacobians (torch convolutions) are right.

    They are for zero padding given as numbers; they ignore ``padding_mode`` and
    cannot take ``padding='same'``.
    """
    return module.padding_mode == "zeros" and not isinstance(module.padding, str)


class TNConvDerivatives(ConvNDDerivatives):
    """Derivatives of ``Conv{N}d`` through ``backpack_tn.functional``.

    The input Jacobian products (backpropagation to earlier layers) stay torch's
    convolution kernels where those are right — they are fast and unfold nothing —
    and use tensor networks for ``padding='same'`` and non-zero padding modes.
    """

    def __init__(self, N: int):  # noqa: N803 (BackPACK's argument name)
        """Store the number of spatial dimensions.

        Args:
            N: Number of spatial dimensions (1, 2 or 3).
        """
        super().__init__(N)

    def get_unfolded_input(self, module: Module) -> Tensor:  # noqa: D102
        hyper = hyperparameters(module)
        del hyper["groups"]
        return tnf.unfold(module.input0, module.kernel_size, **hyper)

    def _jac_mat_prod(
        self, module: Module, g_inp: Tuple[Tensor], g_out: Tuple[Tensor], mat: Tensor
    ) -> Tensor:
        if native_input_jacobian_ok(module):
            return super()._jac_mat_prod(module, g_inp, g_out, mat)
        out = tnf.conv(
            mat.flatten(0, 1), module.weight.detach(), **hyperparameters(module)
        )
        return self.reshape_like_output(out, module)

    def _jac_t_mat_prod(
        self,
        module: Module,
        g_inp: Tuple[Tensor],
        g_out: Tuple[Tensor],
        mat: Tensor,
        subsampling: Optional[List[int]] = None,
    ) -> Tensor:
        if native_input_jacobian_ok(module):
            return super()._jac_t_mat_prod(module, g_inp, g_out, mat, subsampling)
        v, n = mat.shape[:2]
        shape = (v * n, *module.input0.shape[1:])
        out = tnf.input_vjp(
            mat.flatten(0, 1), module.weight.detach(), shape, **hyperparameters(module)
        )
        return out.reshape(v, n, *module.input0.shape[1:])

    def _weight_jac_mat_prod(
        self, module: Module, g_inp: Tuple[Tensor], g_out: Tuple[Tensor], mat: Tensor
    ) -> Tensor:
        # One convolution with the V kernels stacked as extra output channels of each
        # group: [V, G·D, C, *K] -> [G·V·D, C, *K].
        v, groups = mat.shape[0], module.groups
        c_out = mat.shape[1]
        kernels = mat.reshape(v, groups, c_out // groups, *mat.shape[2:])
        kernels = kernels.transpose(0, 1).reshape(v * c_out, *mat.shape[2:])
        out = tnf.conv(module.input0, kernels, **hyperparameters(module))
        n, spatial = out.shape[0], out.shape[2:]
        out = out.reshape(n, groups, v, c_out // groups, *spatial)
        return out.transpose(0, 2).transpose(1, 2).reshape(v, n, c_out, *spatial)

    def _weight_jac_t_mat_prod(
        self,
        module: Module,
        g_inp: Tuple[Tensor],
        g_out: Tuple[Tensor],
        mat: Tensor,
        sum_batch: bool = True,
        subsampling: Optional[List[int]] = None,
    ) -> Tensor:
        x = subsample(module.input0, subsampling=subsampling)
        return tnf.sqrt_ggn_weight(
            x, mat, module.kernel_size, sum_batch=sum_batch, **hyperparameters(module)
        )

    def ea_jac_t_mat_jac_prod(
        self, module: Module, g_inp: Tuple[Tensor], g_out: Tuple[Tensor], mat: Tensor
    ) -> Tensor:
        """``Jᵀ M J`` for a batch-averaged output curvature ``M`` (KFRA).

        Args:
            module: The convolution.
            g_inp: Gradients w.r.t. the module input (unused).
            g_out: Gradients w.r.t. the module output (unused).
            mat: ``[out_features, out_features]``.

        Returns:
            ``[in_features, in_features]``.
        """
        if native_input_jacobian_ok(module):
            return super().ea_jac_t_mat_jac_prod(module, g_inp, g_out, mat)
        in_shape, out_shape = module.input0.shape[1:], module.output.shape[1:]
        n_in, n_out = in_shape.numel(), out_shape.numel()
        weight, hyper = module.weight.detach(), hyperparameters(module)

        def jac_t(rows: Tensor) -> Tensor:
            batch = rows.shape[0]
            return tnf.input_vjp(
                rows.reshape(batch, *out_shape), weight, (batch, *in_shape), **hyper
            ).reshape(batch, n_in)

        jac_t_mat = jac_t(mat.reshape(n_out, n_out))  # [n_out, n_in]
        return jac_t(jac_t_mat.t().contiguous()).t()
