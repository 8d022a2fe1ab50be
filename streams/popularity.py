"""Recent popularity: interaction counts that fade with a half-life, for users without
history (cold start) and as a fallback. Kept in memory by each stream worker over the events it
consumes; with several workers each sees its share of the users, which is a fair sample."""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection


class RecentPopularity:
    def __init__(self, half_life_s: float = 6 * 3600, max_items: int = 100_000) -> None:
        self.half_life_s = half_life_s
        self.max_items = max_items
        self._scores: dict[str, float] = {}
        self._origin = 0.0  # scores are stored scaled to this time, so adding is O(1)

    def _scale(self, ts: float) -> float:
        return math.pow(2.0, (ts - self._origin) / self.half_life_s)

    def add(self, item_id: str, ts: float, weight: float = 1.0) -> None:
        if not self._scores or ts - self._origin > 50 * self.half_life_s:  # keep exponents small
            factor = math.pow(2.0, -(ts - self._origin) / self.half_life_s)  # may underflow to 0
            self._scores = {i: s * factor for i, s in self._scores.items()}
            self._origin = ts
        self._scores[item_id] = self._scores.get(item_id, 0.0) + weight * self._scale(ts)
        if len(self._scores) > self.max_items * 1.2:
            keep = heapq.nlargest(self.max_items, self._scores.items(), key=lambda kv: kv[1])
            self._scores = dict(keep)

    def top(self, k: int, exclude: Collection[str] = ()) -> list[tuple[str, float]]:
        """Most popular first, ties by item_id; scores relative to the newest event."""
        best = heapq.nsmallest(
            k + len(exclude),
            ((-s, i) for i, s in list(self._scores.items())),  # a copy: `add` runs on another thread
        )
        return [(i, -s) for s, i in best if i not in exclude][:k]
