"""Candidates and recommendations from the vector stores, free of Faust.

`items` holds item vectors (written by the embedding workers; in the stream processor, its
in-process replica).

Ranking is `streams.rank.BlendRanker` (the code `vlm4rec eval` scores as `default`): Milvus ANN
candidates for the user's profile and last items, co-occurrence, recent popularity and fresh
items, blended by a model the worker trains on the interactions it applies (`observe`). Its
state (counts, co-occurrence, the model) lives in the worker's memory, like recent popularity:
each worker learns from every worker's interactions (`streams.observations`; or, with shared
learning off, from the users it owns), and a restarted worker starts learning again (it ranks
by the profile cosine until its first fit)."""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np

from streams import metrics
from streams.popularity import RecentPopularity
from streams.profile import Profile
from streams.rank import LEARNT_TAIL_RULES, BlendRanker, Hits, NeighbourList, RankConfig, Request
from streams.variants import Assignment, Variant, parse_variants
from vectorstore import VectorStore
from vectorstore.base import matrix_of

log = logging.getLogger("vlm4rec.streams")

#: users whose ranking failure was logged; each is logged once (bounded memory)
FAILURES_LOGGED = 10_000
#: the made-up user of `Recommender.warm_up` (no event can carry a control character)
WARM_UP_USER = "\x00warm-up"


class VectorCache:
    """Bounded LRU of item vectors in front of the store: an item a user touches is usually
    touched again soon by others. A store that holds its vectors in memory (the replica) is
    read directly: an LRU in front of it only copied every vector twice. Thread-safe: the
    profile agent and the recs refresher look vectors up from two threads (the store is
    called outside the lock)."""

    def __init__(self, store: VectorStore, size: int = 20_000) -> None:
        self.store = store
        self.size = size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ids: Collection[str]) -> dict[str, np.ndarray]:
        if self.store.in_memory:
            return self.store.get_vectors(ids)
        found: dict[str, np.ndarray] = {}
        missing = []
        with self._lock:
            for item_id in ids:
                vector = self._cache.get(item_id)
                if vector is None:
                    missing.append(item_id)
                else:
                    self._cache.move_to_end(item_id)
                    found[item_id] = vector
        if missing:
            fetched = self.store.get_vectors(missing)
            with self._lock:
                for item_id, vector in fetched.items():
                    self._cache[item_id] = vector
                while len(self._cache) > self.size:
                    self._cache.popitem(last=False)
            found.update(fetched)
        return found

    def get_matrix(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """`VectorStore.get_matrix` through the cache."""
        if self.store.in_memory:
            return self.store.get_matrix(ids)
        return matrix_of(ids, self.get(ids))

    def forget(self, item_id: str) -> None:
        """An item was re-embedded: drop its stale vector."""
        with self._lock:
            self._cache.pop(item_id, None)


class StoreContent:
    """`streams.rank.ContentSource` over the items collection: ANN search there, vectors
    through the cache, and items' neighbour lists kept for `neighbour_ttl_s` (bounded LRU).

    Without the neighbour cache every refreshed user cost one search per recent item, five
    times the searches of the profile alone, and the search rate of Milvus Lite (about 500 to
    1,000 queries/s on two cores) bounded the stream. A cached list misses items embedded
    since it was fetched; they still reach users through the profile search, the fresh source
    and the fan-out."""

    def __init__(
        self,
        store: VectorStore,
        cache: VectorCache,
        neighbour_ttl_s: float = 60.0,
        neighbour_lists: int = 20_000,
        clock: Callable[[], float] = time.monotonic,
        search_slack: int = 14,
    ) -> None:
        self.store = store
        self.cache = cache
        self.search_slack = search_slack
        self.neighbour_ttl_s = neighbour_ttl_s
        self.neighbour_lists = neighbour_lists
        self._clock = clock
        self._neighbours: OrderedDict[str, tuple[float, int, Hits]] = OrderedDict()
        self._lock = threading.Lock()  # the lists are read from two threads; the store is called outside it

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Collection[str]]) -> list[Hits]:
        """One store call at one limit, `k + search_slack` (64 for the default k of 50: Milvus
        Lite's cost steps with the limit), whatever each row excludes; the
        excluded are dropped here. Asking the store to skip a user's seen items made the limit
        grow with their history, and Milvus Lite's cost grows with the hits it returns (256
        queries: 0.56 s at limit 64, 7.6 s at 1,024). A user whose nearest items are mostly
        seen gets fewer than k hits from this source; the other sources fill the list."""
        return self.filtered(self.raw_search(queries, k), k, exclude)

    def raw_search(self, queries: np.ndarray, k: int) -> list[Hits]:
        """The store's answer for `search(queries, k, ...)`, before anything is excluded."""
        return self.store.search(queries, k + self.search_slack)

    @staticmethod
    def filtered(rows: Sequence[Hits], k: int, exclude: Sequence[Collection[str]]) -> list[Hits]:
        return [[(i, s) for i, s in hits if i not in skip][:k] for hits, skip in zip(rows, exclude, strict=True)]

    def vectors(self, ids: Collection[str]) -> dict[str, np.ndarray]:
        return self.cache.get(ids)

    def matrix(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.cache.get_matrix(ids)

    def neighbours(self, items: Collection[str], depth: int) -> dict[str, Hits]:
        now = self._clock()
        found: dict[str, Hits] = {}
        missing = []
        with self._lock:
            for item in sorted(items):  # one batch order, whatever the set order: a product's last bit depends on it
                kept = self._neighbours.get(item)
                if kept is not None and kept[1] == depth and now - kept[0] < self.neighbour_ttl_s:
                    self._neighbours.move_to_end(item)
                    found[item] = kept[2]
                else:
                    missing.append(item)
        vectors = self.cache.get(missing) if missing else {}
        if vectors:
            ids = [i for i in missing if i in vectors]  # sorted, cached or not
            hits = [NeighbourList(row) for row in self.store.search(np.stack([vectors[i] for i in ids]), depth)]
            with self._lock:
                for item, row in zip(ids, hits, strict=True):
                    found[item] = row
                    self._neighbours[item] = (now, depth, row)
                    self._neighbours.move_to_end(item)
                while len(self._neighbours) > self.neighbour_lists:
                    self._neighbours.popitem(last=False)
        return found

    def forget(self, item_id: str) -> None:
        """An item was (re-)embedded: drop its stale vector and neighbour list."""
        self.cache.forget(item_id)
        with self._lock:
            self._neighbours.pop(item_id, None)


class Prefetched:
    """The content source of one ranking (or learning) call, whose vector-store round trips
    were made before the ranker's lock was taken: the profile search of every request, and
    the neighbour lists of their recent items (into `StoreContent`'s cache). Held under the
    lock, a search of Milvus Lite (0.5 s for a round of 256) kept the learner and the ranking
    thread waiting on each other (measured: rank 1.4-2.5 s per round at 500-2000/s)."""

    def __init__(self, content: StoreContent, requests: Sequence[Request], config: RankConfig) -> None:
        self.content = content
        self.k = config.content_k
        profiles = [np.asarray(r.profile, dtype=np.float32) for r in requests if r.profile is not None]
        self.queries = np.stack(profiles) if profiles else np.zeros((0, 0), np.float32)
        self.rows = content.raw_search(self.queries, self.k) if profiles else []
        recent = {i for r in requests for i in r.history[-config.interests :]} if config.interests else set()
        if recent:
            content.neighbours(recent, config.neighbour_depth)

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Collection[str]]) -> list[Hits]:
        """The prefetched answer when the ranker asks what was prefetched (it always does;
        anything else is searched now)."""
        if k == self.k and queries.shape == self.queries.shape and np.array_equal(queries, self.queries):
            return self.content.filtered(self.rows, k, exclude)
        return self.content.search(queries, k, exclude)

    def vectors(self, ids: Collection[str]) -> dict[str, np.ndarray]:
        return self.content.vectors(ids)

    def matrix(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.content.matrix(ids)

    def neighbours(self, items: Collection[str], depth: int) -> dict[str, Hits]:
        return self.content.neighbours(items, depth)


@dataclass(frozen=True)
class Observation:
    """One applied interaction as the ranker learns from it (`Recommender.observe`): small,
    since with `--streams N` every stream processor learns every processor's observations
    (`streams.observations`)."""

    request: Request | None  # the user's state just before it; None: not a training example
    recent: list[str]  # the user's last distinct items before a new one (`BlendRanker.lookback`)
    new: bool  # the user had not taken the item before
    item: str
    ts: float


def observation_of(profile: Profile, item_id: str, ts: float, sampled: bool, lookback: int) -> Observation:
    """An interaction as the ranker learns from it, taken just before `profile` applies it
    (cheap: the request, with its profile vector, only for the `sampled` share; a repeat is
    only counted, a new item with the user's last `lookback` items)."""
    request = Request(list(profile.seen), profile.as_array(), ts) if sampled else None
    new = item_id not in profile.seen
    recent = profile.seen[-lookback:] if new else []
    return Observation(request, recent, new, item_id, ts)


class Recommender:
    """The ranker behind the stream processor, used from two threads: the ranking thread
    (`recommend`, `embedded`) and the learner (`observe`). `lock` guards the ranker's state;
    the learner holds it to build training groups and to count interactions, but not while a
    refit is fitted, so that a fit never holds up a round."""

    def __init__(
        self,
        items: VectorStore,
        popularity: RecentPopularity,
        k: int = 20,
        cache_size: int = 20_000,
        rank: RankConfig | None = None,
        neighbour_ttl_s: float = 60.0,
        variants: Sequence[Variant] = (),
    ) -> None:
        """`variants`: the ranking variants served side by side (`streams.variants`); none:
        everyone gets the ranker's own settings, as variant `default`."""
        self.items = items
        self.popularity = popularity
        self.k = k
        self.vectors = VectorCache(items, cache_size)
        self.content = StoreContent(items, self.vectors, neighbour_ttl_s)
        self.ranker = BlendRanker(rank)
        self.assignment = Assignment(variants or parse_variants([]))
        self._serving = {v.name: v.config(self.ranker.config) for v in self.assignment.variants}
        self.ranker.learns_places = {c.tail_rule for c in self._serving.values()} & set(LEARNT_TAIL_RULES)
        self.ranker.learns_picks = {c.tail_rule for c in self._serving.values() if c.content_picks} & set(LEARNT_TAIL_RULES)
        self.lock = threading.Lock()
        # the training-example draw happens on the caller's thread (see `observation`)
        self._draw = random.Random(self.ranker.config.seed)
        self._logged: OrderedDict[str, None] = OrderedDict()

    def request(self, profile: Profile, now: float | None = None, place: Sequence[str] = ()) -> Request:
        """The user as the ranker sees them at `now`, by default the stream clock (the latest
        event time, theirs included); `place`: the fresh items fanned out to them
        (`Request.place`)."""
        ts = max(self.ranker.stats.clock, profile.updated_at) if now is None else now
        return Request(list(profile.seen), profile.as_array(), ts, place=tuple(place))

    def observation(self, profile: Profile, item_id: str, ts: float) -> Observation:
        """Taken just before `profile` applies the interaction (`observation_of`)."""
        return observation_of(profile, item_id, ts, self._draw.random() < self.ranker.sample_rate(), self.ranker.lookback())

    def popular(self, taken: Sequence[tuple[str, float]]) -> None:
        """Applied interactions as (item_id, ts), for recent popularity."""
        for item_id, ts in taken:
            self.popularity.add(item_id, ts, 1.0)

    def observe(self, observations: Sequence[Observation], learn_max: int | None = None) -> None:
        """Fold applied interactions into the ranker, in order: the sampled ones first become
        training groups from the state before the batch, then every one is recorded, then the
        model is refit when due. `learn_max`: at most this many groups (the latest), so that
        a learner that fell behind catches up; every interaction is still counted.

        Learning is best effort: a batch whose groups cannot be built (the vector store
        failed, an odd request) is logged and counted and its interactions are still
        recorded; retrying it could only stall the counts behind it."""
        learning = [(o.request, o.item) for o in observations if o.request is not None]
        if learn_max is not None:
            learning = learning[max(0, len(learning) - learn_max) :]
        if learning:
            requests = [r for r, _ in learning]
            try:
                source = Prefetched(self.content, requests, self.ranker.config)
                with self.lock:
                    self.ranker.learn(requests, [i for _, i in learning], source, refit=False)
            except Exception as exc:  # noqa: BLE001 - see the docstring
                metrics.LEARN_FAILURES.inc()
                log.warning("%d training groups not built: %s: %s", len(learning), type(exc).__name__, exc)
        with self.lock:
            for o in observations:
                self.ranker.record(o.recent, o.item, o.ts, o.new)
            refused, self.ranker.refused_groups = self.ranker.refused_groups, 0
            due = self.ranker.refit_due()
            fresh_places = self.ranker.fresh_places()
        metrics.TRAINING_GROUPS_REFUSED.inc(refused)
        metrics.RANKER_INTERACTIONS.inc(len(observations))
        for (rule, kind), places in fresh_places.items():
            metrics.FRESH_PLACES.labels(rule, kind).set(places)
        if due is not None:
            self.refit(due)

    def refit(self, groups: Sequence) -> bool:
        """Fit a candidate on a snapshot of the groups outside the lock; install it (or
        reject it, counted and logged) under the lock."""
        with metrics.STAGE_SECONDS.labels("refit").time():
            candidate = self.ranker.train(groups)
        with self.lock:
            accepted = self.ranker.install(candidate)
            reason = self.ranker.last_rejection
        if accepted:
            metrics.REFITS.labels("accepted").inc()
            return True
        metrics.REFITS.labels(reason).inc()
        log.warning("refit rejected (%s); the current model stays", reason)
        return False

    def forget(self, item_ids: Sequence[str]) -> None:
        """Items (re-)embedded by any worker: what was cached of them is stale."""
        for item_id in item_ids:
            self.content.forget(item_id)

    def embedded(self, items: Sequence[tuple[str, float | None]]) -> None:
        """Items (re-)embedded since the last call, as (item_id, declared created_at): those
        with a creation time are candidates of the fresh source. (What was cached of them was
        dropped by `forget` when the item feed took them in.)"""
        with self.lock:
            for item_id, created_at in items:
                if created_at is not None:
                    self.ranker.stats.declare(item_id, created_at)

    def recommend(
        self, profiles: Sequence[Profile], k: int | None = None, places: Sequence[Sequence[str]] | None = None
    ) -> list[list[tuple[str, float]]]:
        """Top k per user, seen items excluded: the blend over Milvus ANN (one search call for
        all users' profile vectors), co-occurrence, recent popularity and fresh candidates;
        users left without a candidate get recent popularity. The users of each ranking
        variant are ranked together, with that variant's settings (`variant_of`). `places`:
        per user, the fresh items whose fan-out made their list due (`Request.place`).

        One user never fails the others: when the round's ranking raises while the vector
        store answers, each user is ranked alone, and a user whose ranking still fails, or
        whose scores are not finite, gets the fallback (`_fallback`). When the store does not
        answer, the error is raised for the caller to retry the round later."""
        k = k or self.k
        metrics.SEARCH_BATCH.observe(len(profiles))
        # one moment for the round, as all its users are served now: the ranker's popularity
        # and freshness work is per moment, and a moment per user took a fifth of its samples
        # at 1,000/s (docs/streaming.md)
        now = max([self.ranker.stats.clock, *(p.updated_at for p in profiles)])
        requests = [self.request(p, now, places[n] if places else ()) for n, p in enumerate(profiles)]
        groups: dict[str, list[int]] = {}
        for n, profile in enumerate(profiles):
            groups.setdefault(self.assignment.of(profile.user_id).name, []).append(n)
        results: list[Hits | None] = [None] * len(profiles)
        for name, members in groups.items():
            serving = self._serving[name]
            group = [requests[n] for n in members]
            try:
                with metrics.SEARCH_SECONDS.labels("items").time():
                    source = Prefetched(self.content, group, serving)
                with metrics.STAGE_SECONDS.labels("rank_wait").time():
                    self.lock.acquire()
                try:
                    ranked: list[Hits | None] = list(self.ranker.rank(group, source, k, serving))
                finally:
                    self.lock.release()
            except Exception:
                if not self._store_answers():
                    raise
                ranked = [self._alone(requests[n], profiles[n], k, serving) for n in members]
            for n, hits in zip(members, ranked, strict=True):
                results[n] = hits
        out = []
        for profile, hits in zip(profiles, results, strict=True):
            if hits is not None and not all(math.isfinite(score) for _, score in hits):
                self._failed(profile.user_id, "non-finite score")
                hits = None
            if hits is None:
                hits = self._fallback(profile, k)
            elif not hits:
                hits = self.popularity.top(k, exclude=set(profile.seen))
            out.append(hits)
        return out

    def variant_of(self, user_id: str) -> str:
        """The ranking variant that serves the user (`streams.variants`)."""
        return self.assignment.of(user_id).name

    def warm_up(self) -> None:
        """Rank once for a made-up user whose history is one stored item, so that the first
        real round does not pay for the store's and the ranker's first calls. Nothing is
        pushed or learnt."""
        space = self.items.space()
        if space is None:
            return
        probe = np.full((1, space[0]), 1.0 / math.sqrt(space[0]), dtype=np.float32)
        hits = self.items.search(probe, 1)[0]
        if not hits:
            return
        item = hits[0][0]
        vector = self.vectors.get([item]).get(item)
        if vector is not None:
            self.recommend([Profile(WARM_UP_USER, vector=np.asarray(vector, dtype=np.float64).tolist(), seen=[item])])

    def _alone(self, request: Request, profile: Profile, k: int, serving: RankConfig) -> Hits | None:
        try:
            with self.lock:
                return self.ranker.rank([request], self.content, k, serving)[0]
        except Exception as exc:  # noqa: BLE001 - this user's ranking, isolated
            self._failed(profile.user_id, f"{type(exc).__name__}: {exc}")
            return None

    def _store_answers(self) -> bool:
        """Whether the items collection answers now: tells a user's failure from an outage."""
        try:
            self.items.space()
            return True
        except Exception:  # noqa: BLE001 - any failure means it does not answer
            return False

    def _failed(self, user_id: str, reason: str) -> None:
        metrics.RANK_FALLBACKS.inc()
        if user_id not in self._logged:
            log.error("ranking failed for user %r (%s); they get the fallback list", user_id, reason)
            self._logged[user_id] = None
            if len(self._logged) > FAILURES_LOGGED:
                self._logged.popitem(last=False)

    def _fallback(self, profile: Profile, k: int) -> Hits:
        """Content only (nearest items to the profile, seen excluded), else recent popularity."""
        vector = profile.as_array()
        if vector is not None:
            try:
                hits = self.content.search(vector[None, :], k, [set(profile.seen)])[0]
                if hits and all(math.isfinite(s) for _, s in hits):
                    return [(i, float(s)) for i, s in hits]
            except Exception as exc:  # noqa: BLE001 - popularity is the last resort
                log.warning("fallback search for user %r failed: %s", profile.user_id, exc)
        return self.popularity.top(k, exclude=set(profile.seen))
