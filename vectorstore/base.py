"""Vector store interface: upsert by id, fetch by id, batched top-k search."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class CollectionMismatch(RuntimeError):
    """The collection holds vectors of another model, strategy or width. One collection never
    mixes two embedding spaces: distances between them mean nothing."""


@dataclass(frozen=True)
class VectorRecord:
    item_id: str
    vector: np.ndarray
    content_hash: str = ""
    created_at: float = 0.0
    embedded_at: float = 0.0
    meta: Mapping[str, Any] = field(default_factory=dict)  # small JSON: display fields, routing


Hits = list[tuple[str, float]]


class VectorStore(ABC):
    """One collection of L2-normalised item vectors of one embedding space."""

    #: every vector is held in this process's memory, so reading it costs a copy and no more:
    #: a cache in front of the store (`streams.recommend.VectorCache`) would only copy again
    in_memory: bool = False

    @abstractmethod
    def open(self, dim: int, model: str, strategy: str) -> None:
        """Create the collection for this space, or check that the existing one is of it
        (raise `CollectionMismatch` if not)."""

    @abstractmethod
    def space(self) -> tuple[int, str, str] | None:
        """(dim, model, strategy) of the existing collection, None if there is none yet: how a
        reader learns the space the writers chose."""

    @abstractmethod
    def upsert(self, records: Sequence[VectorRecord]) -> None:
        """Insert or replace by `item_id`; re-delivering the same record is harmless."""

    @abstractmethod
    def get_vectors(self, ids: Collection[str]) -> dict[str, np.ndarray]:
        """Vectors of the ids that are stored; missing ids are absent from the result."""

    def get_matrix(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(matrix, at): `matrix[at[j]]` is the vector of `ids[j]`, `at[j]` -1 where it is not
        stored. A ranking round reads thousands of vectors at once: a store that holds them in
        memory hands over its own matrix (read-only: it never changes a row in place once it
        was handed out) instead of a dict of copies."""
        return matrix_of(ids, self.get_vectors(ids))

    @abstractmethod
    def get_hashes(self, ids: Collection[str]) -> dict[str, str]:
        """Content hashes of the ids that are stored (to skip re-embedding unchanged items)."""

    @abstractmethod
    def get_meta(self, ids: Collection[str]) -> dict[str, dict[str, Any]]:
        """The `meta` of the ids that are stored (e.g. an item's title and image for a page)."""

    @abstractmethod
    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: Sequence[Collection[str]] | None = None,
    ) -> list[Hits]:
        """Top `k` (item_id, cosine) per query row, best first, ties by item_id; `exclude[i]`
        holds ids that query i must not return. One call for many queries."""

    @abstractmethod
    def scan(self, batch: int = 1000) -> Iterator[dict[str, np.ndarray]]:
        """Every stored vector once, by id, in batches of at most `batch`: how a replica loads
        the collection. Nothing when the collection does not exist yet."""

    @abstractmethod
    def count(self) -> int:
        """Number of stored items (after every acknowledged upsert)."""

    @abstractmethod
    def drop(self) -> None:
        """Delete the collection and everything in it."""

    def close(self) -> None:
        """Release connections."""


def matrix_of(ids: Sequence[str], vectors: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """`VectorStore.get_matrix` of `ids` from the vectors found for them, stacked."""
    found = np.fromiter((i in vectors for i in ids), dtype=bool, count=len(ids))
    kept = [np.asarray(vectors[i], dtype=np.float32) for i in ids if i in vectors]
    return (np.stack(kept) if kept else np.zeros((0, 0), dtype=np.float32)), np.where(found, np.cumsum(found) - 1, -1)


def rank_hits(pairs: list[tuple[str, float]], k: int, exclude: Collection[str]) -> Hits:
    """Best-first order with ties broken by item_id, excluded ids dropped."""
    kept = [(item_id, score) for item_id, score in pairs if item_id not in exclude]
    kept.sort(key=lambda pair: (-pair[1], pair[0]))
    return kept[:k]
