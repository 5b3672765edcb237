"""A small in-process LRU bounded by a total weight (bytes, or 1 per entry)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """Least-recently-used eviction once the weights of the entries pass `capacity`."""

    def __init__(self, capacity: int, weigh: Callable[[V], int] = lambda _: 1) -> None:
        self._capacity = capacity
        self._weigh = weigh
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._weight = 0

    def get(self, key: K) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        weight = self._weigh(value)
        if weight > self._capacity:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._weight -= self._weigh(old)
        self._entries[key] = value
        self._weight += weight
        while self._weight > self._capacity:
            _, evicted = self._entries.popitem(last=False)
            self._weight -= self._weigh(evicted)

    def __len__(self) -> int:
        return len(self._entries)
