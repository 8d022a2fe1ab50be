"""Candidates and recommendations from the vector stores, free of Faust.

`items` holds item vectors (written by the embedding workers); `users` holds the profile
vectors of users with history, kept in step with the profile table, so that a fresh item can
find its nearest users (fan-out) with one search.

Ranking is `streams.rank.BlendRanker` (the code `vlm4rec eval` scores as `default`): Milvus ANN
candidates for the user's profile and last items, co-occurrence, recent popularity and fresh
items, blended by a model the worker trains on the interactions it applies (`observe`). Its
state (counts, co-occurrence, the model) lives in the worker's memory, like recent popularity:
each worker learns from the users it owns, and a restarted worker starts learning again (it
ranks by the profile cosine until its first fit)."""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Collection, Sequence

import numpy as np

from streams import metrics
from streams.popularity import RecentPopularity
from streams.profile import Profile
from streams.rank import BlendRanker, Hits, RankConfig, Request
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


class StoreContent:
    """`streams.rank.ContentSource` over the items collection: ANN search there, vectors
    through the cache."""

    def __init__(self, store: VectorStore, cache: VectorCache) -> None:
        self.store = store
        self.cache = cache

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Collection[str]]) -> list[Hits]:
        return self.store.search(queries, k, exclude=list(exclude))

    def vectors(self, ids: Collection[str]) -> dict[str, np.ndarray]:
        return self.cache.get(ids)


#: (the user's state just before the interaction, or None when it is not a training example;
#: the user's distinct items before it; the item; the interaction's ts)
Observation = tuple[Request | None, list[str], str, float]


class Recommender:
    def __init__(
        self,
        items: VectorStore,
        users: VectorStore,
        popularity: RecentPopularity,
        k: int = 20,
        cache_size: int = 20_000,
        rank: RankConfig | None = None,
    ) -> None:
        self.items = items
        self.users = users
        self.popularity = popularity
        self.k = k
        self.vectors = VectorCache(items, cache_size)
        self.content = StoreContent(items, self.vectors)
        self.ranker = BlendRanker(rank)
        # the training-example draw happens on the caller's thread (see `observation`)
        self._draw = random.Random(self.ranker.config.seed)

    def request(self, profile: Profile) -> Request:
        """The user as the ranker sees them now (the stream clock: the latest event time)."""
        return Request(list(profile.seen), profile.as_array(), max(self.ranker.stats.clock, profile.updated_at))

    def observation(self, profile: Profile, item_id: str, ts: float) -> Observation:
        """Taken just before `profile` applies the interaction (cheap: the request, with its
        profile vector, only for the sampled share)."""
        sampled = self._draw.random() < self.ranker.sample_rate()
        request = Request(list(profile.seen), profile.as_array(), ts) if sampled else None
        return request, list(profile.seen), item_id, ts

    def observe(self, observations: Sequence[Observation]) -> None:
        """Fold applied interactions into the ranker, in order: the sampled ones first become
        training groups from the state before the batch, then every one is recorded (and the
        model is refit when due)."""
        learning = [(r, item) for r, _, item, _ in observations if r is not None]
        if learning:
            self.ranker.learn([r for r, _ in learning], [i for _, i in learning], self.content)
        for _, history, item, ts in observations:
            self.ranker.record(history, item, ts)

    def declare(self, item_id: str, created_at: float) -> None:
        """An embedded item with a declared creation time: a candidate of the fresh source."""
        self.ranker.stats.declare(item_id, created_at)

    def recommend(self, profiles: Sequence[Profile], k: int | None = None) -> list[list[tuple[str, float]]]:
        """Top k per user, seen items excluded: the blend over Milvus ANN (one search call for
        all users' profile vectors), co-occurrence, recent popularity and fresh candidates;
        users left without a candidate get recent popularity."""
        k = k or self.k
        metrics.SEARCH_BATCH.observe(len(profiles))
        with metrics.SEARCH_SECONDS.labels("items").time():
            results = self.ranker.rank([self.request(p) for p in profiles], self.content, k)
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
