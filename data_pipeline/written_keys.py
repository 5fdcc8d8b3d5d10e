"""The keys a writer has written so far, kept to refuse a duplicate without a per-record Python set.

A set costs ~100 B per key; keys written in increasing order (the usual case: 0, 1, 2, ...) only need
the running maximum and a sorted int64 log (8 B per key) for a binary search; only keys written out of
order go into a small set.
"""

from __future__ import annotations

import numpy as np

__all__ = ["WrittenKeys"]


class WrittenKeys:
    """``seen(key)`` after ``add(key)``: membership of the integer keys added so far."""

    def __init__(self) -> None:
        self._max_key: int | None = None
        self._log = np.empty(1024, dtype=np.int64)
        self._logged = 0
        self._out_of_order: set[int] = set()

    def seen(self, key: int) -> bool:
        """Whether ``key`` was added before."""
        if self._max_key is None or key > self._max_key:
            return False
        if key in self._out_of_order:
            return True
        i = int(np.searchsorted(self._log[:self._logged], key))
        return i < self._logged and int(self._log[i]) == key

    def add(self, key: int) -> None:
        """Remember ``key`` (the caller checked :meth:`seen` first)."""
        if self._max_key is not None and key < self._max_key:
            self._out_of_order.add(key)
            return
        if self._logged == len(self._log):
            self._log = np.resize(self._log, 2 * len(self._log))
        self._log[self._logged] = key
        self._logged += 1
        self._max_key = key
