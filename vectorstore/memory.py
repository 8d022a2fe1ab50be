"""An in-process vector store: exact search with numpy.

For unit tests, offline evaluation and tiny deployments; same contract as Milvus."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from typing import Any

import numpy as np

from vectorstore.base import CollectionMismatch, Hits, VectorRecord, VectorStore, rank_hits


class MemoryVectorStore(VectorStore):
    in_memory = True

    def __init__(self) -> None:
        self._space: tuple[int, str, str] | None = None
        self._index: dict[str, int] = {}
        self._ids: list[str] = []
        self._rows: list[np.ndarray] = []
        self._hashes: list[str] = []
        self._meta: list[dict[str, Any]] = []
        self._matrix: np.ndarray | None = None  # stacked rows, rebuilt after a change

    def open(self, dim: int, model: str, strategy: str) -> None:
        space = (dim, model, strategy)
        if self._space is not None and self._space != space:
            raise CollectionMismatch(f"store holds {self._space}, asked for {space}")
        self._space = space

    def space(self) -> tuple[int, str, str] | None:
        return self._space

    def upsert(self, records: Sequence[VectorRecord]) -> None:
        if self._space is None:
            raise RuntimeError("open() the store first")
        for record in records:
            vector = np.asarray(record.vector, dtype=np.float32)
            row = self._index.get(record.item_id)
            if row is None:
                self._index[record.item_id] = len(self._ids)
                self._ids.append(record.item_id)
                self._rows.append(vector)
                self._hashes.append(record.content_hash)
                self._meta.append(dict(record.meta))
            else:
                self._rows[row] = vector
                self._hashes[row] = record.content_hash
                self._meta[row] = dict(record.meta)
        self._matrix = None

    def get_vectors(self, ids: Collection[str]) -> dict[str, np.ndarray]:
        return {i: self._rows[self._index[i]].copy() for i in ids if i in self._index}

    def get_hashes(self, ids: Collection[str]) -> dict[str, str]:
        return {i: self._hashes[self._index[i]] for i in ids if i in self._index}

    def get_meta(self, ids: Collection[str]) -> dict[str, dict[str, Any]]:
        return {i: dict(self._meta[self._index[i]]) for i in ids if i in self._index}

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: Sequence[Collection[str]] | None = None,
    ) -> list[Hits]:
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if not self._ids:
            return [[] for _ in range(len(queries))]
        if self._matrix is None:
            self._matrix = np.stack(self._rows)
        scores = queries @ self._matrix.T
        results = []
        for row, query_scores in enumerate(scores):
            skip = exclude[row] if exclude is not None else ()
            take = min(len(self._ids), k + len(skip))
            top = np.argpartition(-query_scores, take - 1)[:take]
            # scores equal to the k-th may sit outside `top`; include every tie for a stable order
            threshold = query_scores[top].min()
            candidates = np.flatnonzero(query_scores >= threshold)
            pairs = [(self._ids[j], float(query_scores[j])) for j in candidates]
            results.append(rank_hits(pairs, k, skip))
        return results

    def scan(self, batch: int = 1000) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self._ids), batch):
            yield {i: self._rows[self._index[i]].copy() for i in self._ids[start : start + batch]}

    def count(self) -> int:
        return len(self._ids)

    def drop(self) -> None:
        self.__init__()
