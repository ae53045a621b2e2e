"""The tensor-network engine: index patterns, symbolic networks, cached evaluation.

This package knows nothing about BackPACK or curvlinops. ``backpack_tn.functional`` is
its public tensor API.
"""

from backpack_tn.tn.cache import cache_stats, clear_caches
from backpack_tn.tn.conv import networks
from backpack_tn.tn.evaluate import evaluate, get_memory_budget, set_memory_budget
from backpack_tn.tn.geometry import ConvGeometry, DimGeometry, make_geometry
from backpack_tn.tn.network import TensorNetwork, plan_dim
from backpack_tn.tn.patterns import index_pattern, structure

__all__ = [
    "ConvGeometry",
    "DimGeometry",
    "TensorNetwork",
    "cache_stats",
    "clear_caches",
    "evaluate",
    "get_memory_budget",
    "index_pattern",
    "make_geometry",
    "networks",
    "plan_dim",
    "set_memory_budget",
    "structure",
]
