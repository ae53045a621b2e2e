"""A small bounded least-recently-used cache with hit/miss statistics.

The engine caches index patterns, simplified networks and contraction plans. Each cache
is bounded so long-running jobs with many layer shapes cannot grow memory without limit
(cached patterns live on the device they were requested on).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, TypeVar

import torch

V = TypeVar("V")

_REGISTRY: dict[str, LRUCache] = {}


@dataclass
class CacheStats:
    """Counters of one cache.

    Attributes:
        hits: Look-ups answered from the cache.
        misses: Look-ups that had to compute the value.
        size: Entries currently held.
        maxsize: Bound on the number of entries.
    """

    hits: int
    misses: int
    size: int
    maxsize: int


class LRUCache(Generic[V]):
    """Bounded mapping that evicts the least recently used entry when full."""

    def __init__(self, name: str, maxsize: int):
        """Create an empty cache and register it under ``name``.

        Args:
            name: Name under which :func:`cache_stats` reports the cache.
            maxsize: Maximum number of entries; must be positive.

        Raises:
            ValueError: If ``maxsize`` is not positive.
        """
        if maxsize <= 0:
            raise ValueError(f"maxsize must be positive, got {maxsize}.")
        self.name = name
        self.maxsize = maxsize
        self._data: OrderedDict[Hashable, V] = OrderedDict()
        self.hits = 0
        self.misses = 0
        _REGISTRY[name] = self

    def get_or_create(self, key: Hashable, factory: Callable[[], V]) -> V:
        """Return the value under ``key``; compute it with ``factory`` if absent.

        Args:
            key: Hashable key.
            factory: Zero-argument function producing the value on a miss.

        Returns:
            The cached or freshly computed value.
        """
        try:
            value = self._data[key]
        except KeyError:
            self.misses += 1
            # outside inference mode: a tensor made for a first call under
            # ``torch.inference_mode()`` must serve later calls that autograd records
            # (inference tensors cannot be saved for backward)
            with torch.inference_mode(False):
                value = factory()
            self._data[key] = value
            if len(self._data) > self.maxsize:
                self._data.popitem(last=False)
            return value
        self.hits += 1
        self._data.move_to_end(key)
        return value

    def get(self, key: Hashable) -> V | None:
        """Return the value under ``key`` (counted as hit) or ``None`` (a miss)."""
        if key in self._data:
            self.hits += 1
            self._data.move_to_end(key)
            return self._data[key]
        self.misses += 1
        return None

    def peek(self, key: Hashable) -> V | None:
        """The value under ``key`` or ``None``, without counting or reordering."""
        return self._data.get(key)

    def put(self, key: Hashable, value: V) -> None:
        """Store ``value`` under ``key``, evicting the oldest entry if full."""
        self._data[key] = value
        self._data.move_to_end(key)
        if len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def pop(self, key: Hashable) -> V | None:
        """Remove and return the value under ``key`` (``None`` if absent)."""
        return self._data.pop(key, None)

    def clear(self) -> None:
        """Drop all entries and reset the statistics."""
        self._data.clear()
        self.hits = self.misses = 0

    def stats(self) -> CacheStats:
        """Return the current counters."""
        return CacheStats(self.hits, self.misses, len(self._data), self.maxsize)

    def __len__(self) -> int:
        return len(self._data)


def cache_stats() -> dict[str, CacheStats]:
    """Statistics of every engine cache, keyed by cache name."""
    return {name: cache.stats() for name, cache in _REGISTRY.items()}


def clear_caches() -> None:
    """Empty every engine cache (e.g. to release patterns held on a GPU)."""
    for cache in _REGISTRY.values():
        cache.clear()
