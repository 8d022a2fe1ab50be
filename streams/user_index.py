"""The profile vectors of the users this worker owns, in memory, for the fresh-item fan-out.
Free of Faust.

Until 2026-12-04 every changed profile was upserted to a Milvus `users` collection once a
second, and the worker that owned a fresh item's partition searched it for the nearest users
of all workers. Those upserts were most of Milvus Lite's load under the stream benchmark (a
quarter of a core at 250-1,000 interactions/s) and their serialisation a share of the stream
processor's interpreter, for a collection nothing else read. Now each worker follows every
fresh item (`streams.item_feed`) and pushes it to the nearest of its own users: the union over
the workers approximates the global nearest, each worker taking its share of `fanout_users`
(in proportion to the partitions it owns), and nothing is written anywhere."""

from __future__ import annotations

import math
import threading
from collections.abc import Collection, Iterable

import numpy as np


class UserIndex:
    """user -> (unit profile vector, stream partition). Thread-safe: the profile agent writes
    it on the event loop while the item feed's thread asks it for the nearest users."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._row: dict[str, int] = {}
        self._users: list[str | None] = []
        self._partitions = np.zeros(0, dtype=np.int64)
        self._live = np.zeros(0, dtype=bool)
        self._matrix = np.zeros((0, 0), dtype=np.float32)
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self._row)

    def put(self, user_id: str, vector: np.ndarray | None, partition: int) -> None:
        """The user's current unit vector (None: no direction, the user leaves the index)."""
        with self._lock:
            if vector is None:
                self._remove(user_id)
                return
            vector = np.asarray(vector, dtype=np.float32)
            if self._matrix.shape[1] != len(vector):  # first user, or another embedding space
                self._clear(len(vector))
            row = self._row.get(user_id)
            if row is None:
                row = self._free.pop() if self._free else self._grow()
                self._row[user_id] = row
                self._users[row] = user_id
            self._matrix[row] = vector
            self._partitions[row] = partition
            self._live[row] = True

    def drop_partitions(self, partitions: Collection[int]) -> None:
        """Partitions revoked from this worker: their users are another worker's now."""
        with self._lock:
            for user_id, row in list(self._row.items()):
                if int(self._partitions[row]) in partitions:
                    self._remove(user_id)

    def replace(self, entries: Iterable[tuple[str, np.ndarray | None, int]]) -> None:
        """Everything at once (after a rebalance, from the profile table)."""
        with self._lock:
            self._clear(self._matrix.shape[1])
        for user_id, vector, partition in entries:
            self.put(user_id, vector, partition)

    def nearest(self, vector: np.ndarray, n: int) -> list[tuple[str, float, int]]:
        """(user_id, cosine, partition) of the `n` users nearest `vector`, best first."""
        query = np.asarray(vector, dtype=np.float32)
        norm = float(np.linalg.norm(query))
        with self._lock:
            size = len(self._users)
            if n <= 0 or not self._row or norm == 0 or len(query) != self._matrix.shape[1]:
                return []
            scores = self._matrix[:size] @ (query / norm)
            scores[~self._live[:size]] = -np.inf
            take = min(n, len(self._row))
            top = np.argpartition(-scores, take - 1)[:take]
            top = top[np.argsort(-scores[top], kind="stable")]
            return [(str(self._users[j]), float(scores[j]), int(self._partitions[j])) for j in top.tolist()]

    def _remove(self, user_id: str) -> None:
        row = self._row.pop(user_id, None)
        if row is not None:
            self._users[row] = None
            self._live[row] = False
            self._free.append(row)

    def _clear(self, dim: int) -> None:
        self._row, self._users, self._free = {}, [], []
        self._partitions = np.zeros(0, dtype=np.int64)
        self._live = np.zeros(0, dtype=bool)
        self._matrix = np.zeros((0, dim), dtype=np.float32)

    def _grow(self) -> int:
        row = len(self._users)
        if row == len(self._matrix):
            capacity = max(1024, 2 * len(self._matrix))
            self._matrix = np.concatenate([self._matrix, np.zeros((capacity - row, self._matrix.shape[1]), np.float32)])
            self._partitions = np.concatenate([self._partitions, np.zeros(capacity - row, np.int64)])
            self._live = np.concatenate([self._live, np.zeros(capacity - row, bool)])
        self._users.append(None)
        return row


def fanout_share(fanout_users: int, owned: int, partitions: int) -> int:
    """This worker's share of a fresh item's `fanout_users`: in proportion to the partitions
    it owns, rounded up (so that a worker with any users pushes to at least one)."""
    if fanout_users <= 0 or owned <= 0 or partitions <= 0:
        return 0
    return math.ceil(fanout_users * min(owned, partitions) / partitions)
