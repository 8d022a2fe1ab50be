"""Candidates and recommendations from the vector stores, free of Faust.

`items` holds item vectors (written by the embedding workers); `users` holds the profile
vectors of users with history, kept in step with the profile table, so that a fresh item can
find its nearest users (fan-out) with one search."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Sequence

import numpy as np

from streams import metrics
from streams.popularity import RecentPopularity
from streams.profile import Profile
from vectorstore import VectorRecord, VectorStore


class VectorCache:
    """Bounded LRU of item vectors in front of the store: an item a user touches is usually
    touched again soon by others."""

    def __init__(self, store: VectorStore, size: int = 20_000) -> None:
        self.store = store
        self.size = size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, ids: Collection[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        missing = []
        for item_id in ids:
            vector = self._cache.get(item_id)
            if vector is None:
                missing.append(item_id)
            else:
                self._cache.move_to_end(item_id)
                found[item_id] = vector
        if missing:
            fetched = self.store.get_vectors(missing)
            for item_id, vector in fetched.items():
                self._cache[item_id] = vector
            found.update(fetched)
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return found

    def forget(self, item_id: str) -> None:
        """An item was re-embedded: drop its stale vector."""
        self._cache.pop(item_id, None)


class Recommender:
    def __init__(
        self,
        items: VectorStore,
        users: VectorStore,
        popularity: RecentPopularity,
        k: int = 20,
        cache_size: int = 20_000,
    ) -> None:
        self.items = items
        self.users = users
        self.popularity = popularity
        self.k = k
        self.vectors = VectorCache(items, cache_size)

    def recommend(self, profiles: Sequence[Profile], k: int | None = None) -> list[list[tuple[str, float]]]:
        """Top k per user, seen items excluded, in one vector-store call for all users with a
        profile vector; users without one get recent popularity."""
        k = k or self.k
        results: list[list[tuple[str, float]]] = [[] for _ in profiles]
        warm = [(n, p, p.as_array()) for n, p in enumerate(profiles)]
        warm = [(n, p, v) for n, p, v in warm if v is not None]
        if warm:
            queries = np.stack([v for _, _, v in warm])
            metrics.SEARCH_BATCH.observe(len(warm))
            with metrics.SEARCH_SECONDS.labels("items").time():
                hits = self.items.search(queries, k, exclude=[set(p.seen) for _, p, _ in warm])
            for (n, _, _), row in zip(warm, hits, strict=True):
                results[n] = row
        for n, profile in enumerate(profiles):
            if not results[n]:
                results[n] = self.popularity.top(k, exclude=set(profile.seen))
        return results

    def save_profiles(self, profiles: Sequence[Profile], partitions: Sequence[int]) -> None:
        """Keep the `users` collection in step, with the user's stream partition so that a
        fan-out can address it."""
        records = [
            VectorRecord(p.user_id, vector, embedded_at=p.updated_at, meta={"partition": partition})
            for p, partition in zip(profiles, partitions, strict=True)
            if (vector := p.as_array()) is not None
        ]
        if records:
            self.users.upsert(records)

    def nearest_users(self, item_vector: np.ndarray, n: int) -> list[tuple[str, float, int]]:
        """(user_id, cosine, stream partition) of the users whose taste is nearest the item."""
        with metrics.SEARCH_SECONDS.labels("users").time():
            hits = self.users.search(item_vector[None, :], n)[0]
        meta = self.users.get_meta([u for u, _ in hits])
        return [(u, s, int(meta.get(u, {}).get("partition", 0))) for u, s in hits]
