"""Item-item co-occurrence, kept incrementally as interactions stream in, with bounded memory.

When a user interacts with an item for the first time, the item co-occurs with the user's
`window` most recent distinct earlier items (a session-like neighbourhood, not the whole
history: what a user took just before says more about what comes next than what they took a
year ago, and an update costs O(window), not O(history)). Each item keeps at most
`max_neighbours` neighbours: when a list grows past twice that, the weakest half is dropped
(counts of dropped pairs restart from zero if they come back). At most `max_items` items are
tracked; past that the items that gained a user least recently are forgotten (a stream moves
on: what nobody took for a long time stops mattering, and a fresh item must get a chance to
gather users).

A user's score for a candidate j is the cosine of binary user vectors, summed over the query
items i: cooc(i, j) / sqrt(n_i n_j), with n_i the number of distinct users of i.

Faust-free; the stream processor feeds it per applied interaction and the offline evaluator
feeds it per row of the replay, so both rank with the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

#: neighbour lists kept as arrays (`CoOccurrence._array`): a round of users queries a few
#: thousand items; a list holds at most 2 x `max_neighbours` pairs (16 kB at 500, so 128 MB
#: at most, about 10 MB on hm)
ARRAYS_KEPT = 8192


def summed_per_query(
    owners: Sequence[int], columns: Sequence[np.ndarray], values: np.ndarray, queries: int, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contributions summed per (query, index): `columns[i]` (indices below `size`) belong to
    query `owners[i]`, `values` are their contributions, flat in that order. Returns (starts,
    indices, sums), query n's at [starts[n], starts[n + 1]), indices ascending. A stable sort
    keeps each key's terms in the order given, so a sum is the same float as the query alone
    would get."""
    keys = np.repeat(np.array(owners, dtype=np.int64), [len(c) for c in columns]) * size + np.concatenate(columns)
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    total = np.bincount(np.cumsum(first) - 1, weights=values[order])
    return np.searchsorted(keys[first] // size, np.arange(queries + 1)), keys[first] % size, total


class CoOccurrence:
    def __init__(self, window: int = 50, max_neighbours: int = 500, max_items: int = 500_000) -> None:
        self.window = window
        self.max_neighbours = max_neighbours
        self.max_items = max_items
        self.ids: list[str] = []  # internal index -> item id
        self.index: dict[str, int] = {}
        self._users = np.zeros(1024)  # distinct users per internal index
        self._touched = np.zeros(1024)  # when each item last gained a user (a running count)
        self._adds = 0
        self._neighbours: list[dict[int, float]] = []
        # neighbour lists as arrays sorted by index (`_array`), for the items a ranker queries;
        # an entry is dropped when its list changes
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.generation = 0  # bumped when `_forget` re-indexes: indices held elsewhere are stale

    def __len__(self) -> int:
        return len(self.ids)

    def users(self, item: str) -> int:
        """Distinct users of `item` so far (0 for an unknown item)."""
        n = self.index.get(item)
        return 0 if n is None else int(self._users[n])

    def neighbours(self, item: str) -> dict[str, float]:
        n = self.index.get(item)
        return {} if n is None else {self.ids[j]: c for j, c in self._neighbours[n].items()}

    def _intern(self, item: str) -> int:
        n = self.index.get(item)
        if n is None:
            n = self.index[item] = len(self.ids)
            self.ids.append(item)
            self._neighbours.append({})
            if n >= len(self._users):
                self._users = np.concatenate([self._users, np.zeros(len(self._users))])
                self._touched = np.concatenate([self._touched, np.zeros(len(self._touched))])
        return n

    def add(self, item: str, earlier: Sequence[str]) -> None:
        """A user whose distinct earlier items are `earlier` (oldest first) interacts with
        `item` for the first time. Repeats must not be passed (the caller knows the user's
        history; a repeat would count the user twice)."""
        n = self._intern(item)
        self._users[n] += 1
        self._adds += 1
        self._touched[n] = self._adds
        mine = self._neighbours[n]
        self._arrays.pop(n, None)
        for other in earlier[-self.window :] if self.window else ():
            m = self._intern(other)
            if m == n:
                continue
            self._arrays.pop(m, None)
            mine[m] = mine.get(m, 0.0) + 1.0
            theirs = self._neighbours[m]
            theirs[n] = theirs.get(n, 0.0) + 1.0
            if len(theirs) > 2 * self.max_neighbours:
                self._prune(theirs)
        if len(mine) > 2 * self.max_neighbours:
            self._prune(mine)
        if len(self.ids) > self.max_items * 1.2:
            self._forget()

    def _prune(self, neighbours: dict[int, float]) -> None:
        keep = sorted(neighbours.items(), key=lambda kv: (-kv[1], self.ids[kv[0]]))[: self.max_neighbours]
        neighbours.clear()
        neighbours.update(keep)

    def _forget(self) -> None:
        """Keep the `max_items` items that gained a user most recently, re-indexed."""
        order = sorted(range(len(self.ids)), key=lambda n: -self._touched[n])[: self.max_items]
        new_of = {old: new for new, old in enumerate(order)}
        self.ids = [self.ids[old] for old in order]
        self.index = {item: n for n, item in enumerate(self.ids)}
        self._neighbours = [
            {new_of[j]: c for j, c in self._neighbours[old].items() if j in new_of} for old in order
        ]
        users, touched = np.zeros(max(1024, 2 * len(order))), np.zeros(max(1024, 2 * len(order)))
        users[: len(order)] = self._users[order]
        touched[: len(order)] = self._touched[order]
        self._users, self._touched = users, touched
        self._arrays.clear()
        self.generation += 1

    def sparse(self, query: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """(internal indices, scores) of the items that co-occur with a query item: the sum
        over the query items i of cooc(i, j) / sqrt(n_i n_j). Query items co-occurring with each
        other score too; the caller drops what the user has seen. Its cost follows the query
        items' neighbour lists, not the catalogue."""
        _, found, total = self.sparse_many([list(query)])
        return found, total

    def sparse_many(self, queries: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`sparse` of several queries at once (a ranker's round of users): (starts, internal
        indices, scores), query n's found at [starts[n], starts[n + 1]), indices ascending. One
        numpy pass sums all queries, over neighbour lists kept as arrays while they do not
        change; a score adds the same terms in the same order as the query alone would (a
        stable sort keeps the query order of each (query, index) key's terms), so it is the
        same float."""
        users, size = self._users, len(self.ids)
        columns: list[np.ndarray] = []
        counts: list[np.ndarray] = []
        owners: list[int] = []
        norms: list[float] = []
        for q, query in enumerate(queries):
            for item in query:
                n = self.index.get(item)
                if n is None or users[n] == 0 or not self._neighbours[n]:
                    continue
                found, count = self._array(n)
                columns.append(found)
                counts.append(count)
                owners.append(q)
                norms.append(users[n])
        if not columns:
            return np.zeros(len(queries) + 1, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0)
        lengths = [len(c) for c in columns]
        weights = np.concatenate(counts) / np.repeat(np.sqrt(np.array(norms)), lengths)
        starts, found, total = summed_per_query(owners, columns, weights, len(queries), size)
        np.divide(total, np.sqrt(users[found]), out=total, where=users[found] > 0)
        return starts, found, total

    def _array(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Item n's neighbour list as (indices ascending, counts), kept until the list changes
        (at most `ARRAYS_KEPT` lists: the cache starts over past that)."""
        found = self._arrays.get(n)
        if found is None:
            if len(self._arrays) >= ARRAYS_KEPT:
                self._arrays.clear()
            neighbours = self._neighbours[n]
            keys = np.fromiter(neighbours.keys(), dtype=np.int64, count=len(neighbours))
            order = np.argsort(keys)
            counts = np.fromiter(neighbours.values(), dtype=np.float64, count=len(neighbours))
            found = self._arrays[n] = (keys[order], counts[order])
        return found

    def scores(self, query: Iterable[str]) -> dict[str, float]:
        """`sparse` as {item: score} for the items that score above zero."""
        found, total = self.sparse(query)
        return {self.ids[j]: float(v) for j, v in zip(found.tolist(), total.tolist(), strict=True) if v > 0}
