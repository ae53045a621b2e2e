"""Tensor-network (einsum) convolutions for BackPACK and curvlinops.

The convolution quantities of BackPACK and curvlinops (unfolded inputs, per-sample
gradients, Kronecker factors, GGN diagonals) computed as tensor-network contractions
instead of im2col, following *Convolutions and More as Einsum* (Dangel, NeurIPS 2024).
"""

from backpack_tn import functional
from backpack_tn._install import enabled, install, is_installed, uninstall
from backpack_tn.tn import cache_stats, clear_caches, set_memory_budget

__version__ = "0.1.0"

__all__ = [
    "functional",
    "install",
    "uninstall",
    "is_installed",
    "enabled",
    "cache_stats",
    "clear_caches",
    "set_memory_budget",
    "__version__",
]
