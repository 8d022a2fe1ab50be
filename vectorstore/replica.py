"""An in-process replica of one collection: exact cosine search in memory, writes and misses
through to the source store.

Why it exists: the stream processor searched Milvus on every round (each user's profile, the
neighbour lists of their recent items) and again for every training group, and Milvus Lite
spent 57-86 % of a core on those searches: it bounded the stream at about 210 recs/s on two
cores. A catalogue of fresh content is small next to memory (4 bytes per dimension per item:
17,000 items of 384 dimensions take 26 MB, a million take 1.5 GB), and an exact search over it
is one matrix product. So the stream processor keeps the items here, loads them once with
`load`, and is told what changed with `refresh` (`streams.item_feed` reads every partition of
items.embedded for it). An id it does not hold yet is read through from the source, so a
fresh item a fan-out ranks is never missing. Before `load` has finished, searches go to the
source. Catalogues beyond memory turn it off (`VLM4REC_STREAMS_ITEM_REPLICA=false`) and Milvus
serves every search."""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from vectorstore.base import Hits, VectorRecord, VectorStore
from vectorstore.order import IdOrder


class ReplicaVectorStore(VectorStore):
    """Reads from memory once loaded; everything else is the source's. Thread-safe: the
    stream processor searches from its round and its learner while the feed refreshes."""

    def __init__(self, source: VectorStore) -> None:
        self.source = source
        self._lock = threading.Lock()
        self._index: dict[str, int] = {}
        self._ids: list[str] = []
        self._order = IdOrder(self._ids)  # ties by id (`_top_many`)
        self._matrix = np.zeros((0, 0), dtype=np.float32)  # rows beyond len(_ids) are spare capacity
        self.loaded = False

    # --- kept in step ----------------------------------------------------------------------
    def load(self) -> int:
        """Replace the contents with the whole source collection; returns the number of items."""
        with self._lock:
            self._clear()
        for batch in self.source.scan():
            self._install(batch)
        with self._lock:
            self.loaded = True
            return len(self._ids)

    def refresh(self, ids: Collection[str]) -> int:
        """Read these ids again from the source (they were embedded or re-embedded); returns
        how many the source holds. An id the source does not hold is left as it is."""
        found = self.source.get_vectors(ids) if ids else {}
        self._install(found)
        return len(found)

    def put(self, vectors: Mapping[str, np.ndarray]) -> None:
        """Hold these vectors, read from the source elsewhere (a ranking process is handed
        what its stream processor's item feed took in, so that both search the same items)."""
        self._install(vectors)

    def __len__(self) -> int:
        return len(self._ids)

    def _clear(self) -> None:
        self._index, self._ids = {}, []
        self._order = IdOrder(self._ids)
        self._matrix = np.zeros((0, 0), dtype=np.float32)

    def _install(self, vectors: Mapping[str, np.ndarray]) -> None:
        if not vectors:
            return
        rows = {i: _unit(v) for i, v in vectors.items()}
        dim = len(next(iter(rows.values())))
        with self._lock:
            if self._matrix.shape[1] != dim:  # first rows, or the collection was dropped for another space
                self._clear()
                self._matrix = np.zeros((0, dim), dtype=np.float32)
            new = [i for i in rows if i not in self._index]
            needed = len(self._ids) + len(new)
            if needed > len(self._matrix):
                grown = np.zeros((max(needed, 2 * len(self._matrix), 1024), dim), dtype=np.float32)
                grown[: len(self._ids)] = self._matrix[: len(self._ids)]
                self._matrix = grown
            elif len(new) < len(rows):  # a row changes: copy first, a reader may hold the matrix (`get_matrix`)
                self._matrix = self._matrix.copy()
            for item_id in new:
                self._index[item_id] = len(self._ids)
                self._ids.append(item_id)
            for item_id, vector in rows.items():
                self._matrix[self._index[item_id]] = vector

    # --- the store's contract ----------------------------------------------------------------
    def open(self, dim: int, model: str, strategy: str) -> None:
        self.source.open(dim, model, strategy)

    def space(self) -> tuple[int, str, str] | None:
        return self.source.space()

    def upsert(self, records: Sequence[VectorRecord]) -> None:
        self.source.upsert(records)
        self._install({r.item_id: np.asarray(r.vector, dtype=np.float32) for r in records})

    def get_vectors(self, ids: Collection[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        missing = []
        with self._lock:
            for item_id in ids:
                row = self._index.get(item_id)
                if row is None:
                    missing.append(item_id)
                else:
                    found[item_id] = self._matrix[row].copy()
        if missing:
            fetched = self.source.get_vectors(missing)
            self._install(fetched)
            found.update((i, np.asarray(v, dtype=np.float32)) for i, v in fetched.items())
        return found

    @property  # type: ignore[override]
    def in_memory(self) -> bool:
        return self.loaded

    def get_matrix(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The replica's own matrix, no copy (`_install` never changes a row in place); an id
        not held yet is read through, as `get_vectors` does."""
        with self._lock:
            index = self._index
            at = np.fromiter((index.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))
            if (at >= 0).all():
                return self._matrix, at
        return super().get_matrix(ids)

    def get_hashes(self, ids: Collection[str]) -> dict[str, str]:
        return self.source.get_hashes(ids)

    def get_meta(self, ids: Collection[str]) -> dict[str, dict[str, Any]]:
        return self.source.get_meta(ids)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: Sequence[Collection[str]] | None = None,
    ) -> list[Hits]:
        if not self.loaded:
            return self.source.search(queries, k, exclude)
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        skips = list(exclude) if exclude is not None else [()] * len(queries)
        with self._lock:
            n = len(self._ids)
            if n == 0 or len(queries) == 0:
                return [[] for _ in range(len(queries))]
            # the product over whole blocks of `_contenders`, when the spare rows (zeros) reach
            # that far: its padding columns are then set instead of copying every score
            width = _blocks(n, min(n, k))[0] if k > 0 else n
            rows = self._matrix[: width if width <= len(self._matrix) else n]
            padded = _unit_rows(queries) @ rows.T
            padded[:, n:] = -np.inf
            scores = padded[:, :n]
            ids = self._ids[:n]
            ranks = self._order.ranks()[:n]
        plain = [row for row, skip in enumerate(skips) if not skip]
        if len(plain) == len(scores):
            return _top_many(scores, ids, ranks, k, padded)
        out = dict(zip(plain, _top_many(scores[plain], ids, ranks, k), strict=True)) if plain else {}
        return [out[row] if row in out else _top(scores[row], ids, ranks, k, skips[row]) for row in range(len(scores))]

    def scan(self, batch: int = 1000) -> Iterator[dict[str, np.ndarray]]:
        return self.source.scan(batch)

    def count(self) -> int:
        return self.source.count()

    def drop(self) -> None:
        self.source.drop()
        with self._lock:
            self._clear()

    def close(self) -> None:
        self.source.close()


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


def _top_many(scores: np.ndarray, ids: list[str], ranks: np.ndarray, k: int, padded: np.ndarray | None = None) -> list[Hits]:
    """`_top` of every row with nothing to skip, best first, ties by id (`ranks`: each
    column's id's place in string order, `vectorstore.order.IdOrder`), in a few passes over
    the whole matrix (the stream processor's searches: one per round for all its users).
    One sort by (row, -score, id) orders every row's `_contenders`, ties included. It
    replaced a partition of every row (44 of the 90 ms of a search of 256 rows over 17,000
    items) and a Python sort of every row with a tie (most of hm's rows: items share a
    picture and title). A NaN score is never returned. `padded`: `scores` with -inf columns
    after them, if the caller has it (`_contenders` then needs no copy)."""
    count, width = scores.shape
    take = min(width, k)
    if take <= 0:
        return [[] for _ in range(count)]
    row, col, value = _contenders(scores, take, padded)
    order = np.lexsort((ranks[col], -value, row))
    row, col, value = row[order], col[order].tolist(), value[order].tolist()
    starts = np.searchsorted(row, np.arange(count + 1)).tolist()
    out: list[Hits] = []
    for at, end in zip(starts[:-1], starts[1:], strict=True):
        end = min(end, at + take)
        out.append(list(zip([ids[j] for j in col[at:end]], value[at:end], strict=True)))
    return out


def _blocks(width: int, take: int) -> tuple[int, int]:
    """(padded width, columns per block) of `_contenders`: at least `4 x take` blocks (or one
    column each when that is fewer), every block of the same size."""
    size = -(-width // (4 * take))
    return -(-width // size) * size, size


def _contenders(scores: np.ndarray, take: int, padded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, column, score) of every score at or above its row's cut, a score that at least
    `take` (<= the width) of the row reach and close below its take-th best: the take-th best
    of the maxima of blocks of columns. At least `take` blocks hold columns (4 x take blocks,
    or one column each when that is fewer), so each of the take best blocks holds a column at
    or above the cut, and only the blocks whose maximum reaches it are looked into."""
    count, width = scores.shape
    full, size = _blocks(width, take)
    blocks = full // size
    if full == width:
        padded = scores
    elif padded is None or padded.shape[1] < full:
        padded = np.full((count, full), -np.inf, dtype=scores.dtype)
        padded[:, :width] = scores
    cells = padded[:, :full].reshape(count, blocks, size)
    maxima = np.fmax.reduce(cells, axis=2)  # NaN only where every column is
    maxima[np.isnan(maxima)] = -np.inf  # a NaN column reaches no cut
    cut = np.partition(maxima, blocks - take, axis=1)[:, blocks - take]
    row, block = np.nonzero(maxima >= cut[:, None])
    inside = cells[row, block]
    at, offset = np.nonzero((inside >= cut[row][:, None]) & (block[:, None] * size + np.arange(size) < width))
    return row[at], block[at] * size + offset, inside[at, offset]


def _top(scores: np.ndarray, ids: list[str], ranks: np.ndarray, k: int, skip: Collection[str]) -> Hits:
    """The best `k` not in `skip`, ties by id (`ranks`, as in `_top_many`): every score equal
    to the cut-off is kept before ordering, so that a tie never depends on the partition's
    order."""
    take = min(len(ids), k + len(skip))
    if take <= 0:
        return []
    top = np.argpartition(-scores, take - 1)[:take]
    cols = np.flatnonzero(scores >= scores[top].min())
    cols = cols[np.lexsort((ranks[cols], -scores[cols]))]
    hits = list(zip([ids[j] for j in cols.tolist()], scores[cols].tolist(), strict=True))
    return [hit for hit in hits if hit[0] not in skip][:k] if skip else hits[:k]
