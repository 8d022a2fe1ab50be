"""What users take right after an item: directed item-to-item transitions, kept incrementally as
interactions stream in, recent ones weighing more, with bounded memory.

Co-occurrence (`streams.cooccur`) says which items go together; it has no direction and no
order. A sequence has both: MovieLens users rate the parts of a series in order, shoppers add
the trousers after the jacket. When a user takes an item for the first time, a transition is
counted from each of their last `steps` distinct earlier items to it, weighing 1 from the item
just before, 1/2 from the one before that, and so on. Transitions fade with `half_life_s` of
stream time (weights are stored scaled to a moving origin, as `streams.rank.ItemStats` does), so
what users take after an item now outweighs what they took after it months ago.

A user's score for a candidate b sums, over their last `steps` items a (weighing 1, 1/2, ...),
the share of a's transitions that went to b: w(a -> b) / (W(a) + one transition of now), where
W(a) is all of a's decayed transitions and the added transition keeps an item followed once from
claiming certainty. Each item keeps its `max_successors` strongest successors (the weakest half
is dropped when a list doubles; W(a) still counts them); at most `max_items` items are tracked,
those least recently in a transition go first.

Faust-free; the stream processor and the offline evaluator feed it the same interactions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from streams.cooccur import summed_per_query

#: stored weights are rescaled when the newest is this many half-lives past the origin
REBASE_HALF_LIVES = 50


class Transitions:
    def __init__(self, steps: int = 3, half_life_s: float = 7 * 86400.0, max_successors: int = 200, max_items: int = 500_000) -> None:
        self.steps = steps
        self.half_life_s = half_life_s
        self.max_successors = max_successors
        self.max_items = max_items
        self.ids: list[str] = []  # internal index -> item id
        self.index: dict[str, int] = {}
        self._out: list[dict[int, float]] = []  # successor -> scaled weight
        self._total = np.zeros(1024)  # scaled out-weight per item, pruned successors included
        self._touched = np.zeros(1024)  # when each item last gained a transition (a running count)
        self._adds = 0
        self._origin: float | None = None
        self.clock = -math.inf  # the latest time added (never more than the rebase span past the origin)
        self.generation = 0  # bumped when `_forget` re-indexes: indices held elsewhere are stale

    def __len__(self) -> int:
        return len(self.ids)

    def _intern(self, item: str) -> int:
        n = self.index.get(item)
        if n is None:
            n = self.index[item] = len(self.ids)
            self.ids.append(item)
            self._out.append({})
            if n >= len(self._total):
                self._total = np.concatenate([self._total, np.zeros(len(self._total))])
                self._touched = np.concatenate([self._touched, np.zeros(len(self._touched))])
        return n

    def _scale(self, ts: float) -> float:
        assert self._origin is not None
        return float(np.exp2((ts - self._origin) / self.half_life_s))

    def add(self, item: str, earlier: Sequence[str], ts: float) -> None:
        """A user whose distinct earlier items are `earlier` (oldest first) takes `item` for the
        first time at `ts`."""
        if self.steps <= 0 or not earlier:
            return
        if self._origin is None or ts - self._origin > REBASE_HALF_LIVES * self.half_life_s:
            self._rebase(ts)
        self.clock = max(self.clock, ts)
        # at most the rebase span past the origin (above): never past float range; a late
        # event before the origin weighs its faded share, down to 0
        scale = self._scale(ts)
        n = self._intern(item)
        self._adds += 1
        self._touched[n] = self._adds
        for place, before in enumerate(reversed(earlier[-self.steps :])):
            m = self._intern(before)
            if m == n:
                continue
            weight = scale * 0.5**place
            out = self._out[m]
            out[n] = out.get(n, 0.0) + weight
            self._total[m] += weight
            self._touched[m] = self._adds
            if len(out) > 2 * self.max_successors:
                keep = sorted(out.items(), key=lambda kv: (-kv[1], self.ids[kv[0]]))[: self.max_successors]
                out.clear()
                out.update(keep)
        if len(self.ids) > self.max_items * 1.2:
            self._forget()

    def _rebase(self, ts: float) -> None:
        if self._origin is not None:
            factor = float(np.exp2(-(ts - self._origin) / self.half_life_s))
            self._total *= factor
            for out in self._out:
                for j in out:
                    out[j] *= factor
        self._origin = ts

    def _forget(self) -> None:
        """Keep the `max_items` items most recently in a transition, re-indexed."""
        order = sorted(range(len(self.ids)), key=lambda n: -self._touched[n])[: self.max_items]
        new_of = {old: new for new, old in enumerate(order)}
        self.ids = [self.ids[old] for old in order]
        self.index = {item: n for n, item in enumerate(self.ids)}
        self._out = [{new_of[j]: w for j, w in self._out[old].items() if j in new_of} for old in order]
        total, touched = np.zeros(max(1024, 2 * len(order))), np.zeros(max(1024, 2 * len(order)))
        total[: len(order)] = self._total[order]
        touched[: len(order)] = self._touched[order]
        self._total, self._touched = total, touched
        self.generation += 1

    def successors(self, item: str) -> dict[str, float]:
        """Each successor's share of `item`'s transitions now (the score from one item)."""
        n = self.index.get(item)
        if n is None or self._origin is None:
            return {}
        norm = self._total[n] + self._scale(max(self.clock, self._origin))
        return {self.ids[j]: w / norm for j, w in self._out[n].items()}

    def sparse_many(self, queries: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each query (a user's distinct items, oldest first): (starts, internal indices,
        scores) of the items its last `steps` items were followed by, query n's at
        [starts[n], starts[n + 1]), indices ascending. The query's own items may score; the
        caller drops what the user has seen."""
        owners: list[int] = []
        columns: list[np.ndarray] = []
        weights: list[np.ndarray] = []
        if self._origin is not None and self.steps > 0:
            now = self._scale(max(self.clock, self._origin))
            for q, query in enumerate(queries):
                for place, item in enumerate(reversed(query[-self.steps :])):
                    n = self.index.get(item)
                    if n is None or not self._out[n]:
                        continue
                    out = self._out[n]
                    columns.append(np.fromiter(out.keys(), dtype=np.int64, count=len(out)))
                    weights.append(np.fromiter(out.values(), dtype=np.float64, count=len(out)) * (0.5**place / (self._total[n] + now)))
                    owners.append(q)
        if not columns:
            return np.zeros(len(queries) + 1, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0)
        return summed_per_query(owners, columns, np.concatenate(weights), len(queries), len(self.ids))
