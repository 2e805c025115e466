"""A thread-safe LRU cache of numpy arrays bounded by their bytes (the screen's NDVI windows, the
co-registration's NIR windows): cachetools' LRUCache with ``getsizeof = nbytes`` behind a lock, since a
worker's threads read the same newest scenes again."""

from __future__ import annotations

import threading
from collections.abc import Hashable

import numpy as np
from cachetools import LRUCache


class ArrayCache:
    """At most ``limit_bytes`` of arrays, least recently used out first. An array larger than the whole cache
    is not kept (cachetools would raise ValueError)."""

    def __init__(self, limit_bytes: int):
        self.items: LRUCache = LRUCache(maxsize=limit_bytes, getsizeof=lambda a: a.nbytes)
        self.lock = threading.Lock()

    def get(self, key: Hashable) -> np.ndarray | None:
        with self.lock:
            return self.items.get(key)

    def put(self, key: Hashable, value: np.ndarray) -> None:
        with self.lock:
            if key not in self.items and value.nbytes <= self.items.maxsize:
                self.items[key] = value

    def clear(self) -> None:
        with self.lock:
            self.items.clear()
