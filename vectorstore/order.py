"""Ids in string order as integers, kept as an append-only id list grows.

Rankings here break score ties by id. Comparing strings per tie in Python took a tenth of a
loaded stream processor's samples (the replica's searches over hm, where items share a picture
and title); an integer key per id lets numpy sort scores and ties together in one pass."""

from __future__ import annotations

import numpy as np


class IdOrder:
    """The rank of each id of `ids` (a list that only appends) in string order. A new id costs
    a binary search and a numpy pass, not a re-sort of all of them."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids  # shared, append-only
        self._sorted = np.zeros(0, dtype=object)  # the ids ranked so far, in string order
        self._rank = np.zeros(0, dtype=np.int64)  # by position in `ids`

    def ranks(self) -> np.ndarray:
        """The rank of every id so far, by position (read-only: a new array when ids grow)."""
        if len(self.ids) > len(self._rank):
            new = self.ids[len(self._rank) :]
            order = sorted(range(len(new)), key=new.__getitem__)
            added = np.array([new[j] for j in order], dtype=object)
            at = np.searchsorted(self._sorted, added)  # how many known ids sort before each
            ranks = np.empty(len(new), dtype=np.int64)
            ranks[order] = at + np.arange(len(new))
            self._rank = np.concatenate([self._rank + np.searchsorted(at, self._rank, side="right"), ranks])
            self._sorted = np.insert(self._sorted, at, added)
        return self._rank

    def of(self, positions: np.ndarray) -> np.ndarray:
        return self.ranks()[positions]
