"""The methods an offline evaluation compares: each is `(state, target) -> scores over
stream.item_ids` (higher is better) and one entry in `METHODS`; the product's blend
(`default`, `blend:STRATEGY`) and the ranking variants (`variant:NAME`) walk the stream with the
stream processor's own ranker (`streams.rank`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from streams.profile import Ranker
from streams.cooccur import CoOccurrence
from streams.fresh_slots import TailShare
from streams.sequence import Transitions
from streams.rank import LEARNT_TAIL_RULES, BlendRanker, Hits, ItemStats, RankConfig, Request
from streams.variants import Variant
from workers.embedder import Strategy
from vlm4rec.evaluation.stream import ContentIndex, DEFAULT_STRATEGY, KS, Stream, StreamState, Target, lexicographic

# --- methods: (state, target) -> one score per item of stream.item_ids ---------------------

Scorer = Callable[[StreamState, Target], np.ndarray]


def popularity(state: StreamState, target: Target) -> np.ndarray:
    """Interactions so far, most first."""
    return state.counts


def recent_popularity(state: StreamState, target: Target) -> np.ndarray:
    """Interactions in the trailing WINDOW_DAYS, then all-time popularity."""
    return lexicographic(state.window, state.counts)


def item_knn(state: StreamState, target: Target) -> np.ndarray:
    """Item-item co-occurrence over the interactions so far (`co_occurrence`), then popularity."""
    return lexicographic(co_occurrence(state, target.user), state.counts)


def co_occurrence(state: StreamState, user: int) -> np.ndarray:
    """score(j) = sum over the user's distinct history items i of cooc(i, j) / sqrt(n_i n_j),
    where cooc(i, j) is the number of users who interacted with both so far and n_i the number
    who interacted with i: the cosine of the items' binary user vectors.

    Computed from the user-item pairs so far, without the item-item matrix (17k items squared
    would not fit): each user v weighs w_v = sum of 1/sqrt(n_i) over the history items v has,
    and score(j) = 1/sqrt(n_j) * sum of w_v over the users v of j."""
    n = len(state.counts)
    users, items = state.pair_users[: state.pairs], state.pair_items[: state.pairs]
    inv_sqrt = np.zeros(n)
    np.divide(1.0, np.sqrt(state.item_users), out=inv_sqrt, where=state.item_users > 0)
    in_history = np.zeros(n, dtype=bool)
    in_history[state.history[user]] = True
    shared = in_history[items]
    weights = np.bincount(users[shared], weights=inv_sqrt[items[shared]], minlength=len(state.history))
    return np.bincount(items, weights=weights[users], minlength=n) * inv_sqrt


def content(strategy: Strategy) -> Scorer:
    """Cosine to the mean profile of the user's distinct history items, in `strategy`'s space."""

    def score(state: StreamState, target: Target) -> np.ndarray:
        return state.content[strategy].scores(state.history[target.user])

    return score


class OfflineContent:
    """`streams.rank.ContentSource` over one strategy's item vectors, as the vector store would
    hold them at the moment `ts`: only items published by then, only items with a vector.
    Search is exact (Milvus Lite's FLAT index is exact too); ties by item_id."""

    def __init__(self, stream: Stream, index: ContentIndex) -> None:
        vectors = index.vectors.astype(np.float32)
        norms = np.linalg.norm(vectors, axis=1)
        self.has = norms > 0
        self.unit = np.divide(vectors, np.maximum(norms, 1e-12)[:, None]).astype(np.float32)
        unique, inverse = np.unique(self.unit, axis=0, return_inverse=True)
        self._unique, self._inverse = unique, inverse.reshape(-1)
        self.stream = stream
        self.index = {item_id: n for n, item_id in enumerate(stream.item_ids)}
        self.tiebreak = Ranker(stream.item_ids).tiebreak
        self.ts = np.inf

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Any]) -> list[Hits]:
        stream = self.stream
        allowed = self.has & (stream.published_at <= self.ts)
        scores = (self._unique @ np.asarray(queries, dtype=np.float32).T)[self._inverse].T.astype(np.float64)
        scores[:, ~allowed] = -np.inf
        rows_of: dict[int, list[int]] = {}
        for row, skip in enumerate(exclude):
            rows_of.setdefault(id(skip), []).append(row)
        for rows in rows_of.values():
            skipped = [self.index[i] for i in exclude[rows[0]] if i in self.index]
            scores[np.ix_(rows, skipped)] = -np.inf
        take = min(k, scores.shape[1])
        if take <= 0:
            return [[] for _ in exclude]
        kth = -np.partition(-scores, take - 1, axis=1)[:, take - 1]
        out: list[Hits] = []
        for row, threshold in zip(scores, kth.tolist(), strict=True):
            top = np.flatnonzero(row >= max(threshold, -np.finfo(np.float64).max))  # every tie of the k-th
            top = top[np.lexsort((self.tiebreak[top], -row[top]))][:take]
            out.append(list(zip([stream.item_ids[j] for j in top], row[top].tolist(), strict=True)))
        return out

    def vectors(self, ids: Any) -> dict[str, np.ndarray]:
        index, has = self.index, self.has
        return {i: self.unit[index[i]] for i in ids if i in index and has[index[i]]}

    def matrix(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        index, has = self.index, self.has
        at = np.fromiter((index[i] if i in index and has[index[i]] else -1 for i in ids), dtype=np.int64, count=len(ids))
        return self.unit, at

    def neighbours(self, items: Any, depth: int) -> dict[str, Hits]:
        """Exact and current (the stream processor's cached lists can be a minute old)."""
        vectors = self.vectors(items)
        if not vectors:
            return {}
        ids = list(vectors)
        hits = self.search(np.stack([vectors[i] for i in ids]), depth, [()] * len(ids))
        return dict(zip(ids, hits, strict=True))

class BlendWalk:
    """The product's rankers of one walk, one per semantic source, advanced together row by
    row: each ranker that samples a row first learns from the state just before it, then the
    row is recorded once into the counts, co-occurrence and tail share the rankers share (they
    do not depend on the embedding)."""

    def __init__(self, stream: Stream, config: RankConfig | None = None) -> None:
        self.stream = stream
        self.config = config or RankConfig()
        self.blends: list[Blend] = []
        self.stats = ItemStats(self.config.short_half_life_s, self.config.long_half_life_s)
        self.cooc = CoOccurrence(self.config.cooc_window, self.config.cooc_neighbours)
        self.seq = Transitions(self.config.sequence_steps, self.config.sequence_half_life_s)
        self.tail_share = TailShare(self.config.buffer)
        for item, created in sorted(stream.created_at.items(), key=lambda kv: (kv[1], kv[0])):
            self.stats.declare(stream.item_ids[item], created)
        # per user: distinct items by latest interaction, oldest first (the profile's `seen`)
        self.recent: list[dict[str, None]] = [{} for _ in stream.user_ids]
        self.position = 0

    def add(self, index: ContentIndex) -> Blend:
        ranker = BlendRanker(self.config, self.stats, self.cooc, self.seq, self.tail_share)
        blend = Blend(self, OfflineContent(self.stream, index), ranker)
        self.blends.append(blend)
        return blend

    def advance(self, to: int) -> None:
        stream = self.stream
        for position in range(self.position, to):
            user, item_n, ts = int(stream.users[position]), int(stream.items[position]), float(stream.ts[position])
            item = stream.item_ids[item_n]
            recent = self.recent[user]
            for blend in self.blends:
                if blend.ranker.wants_example():
                    blend.content.ts = ts
                    blend.ranker.learn([blend.request(user, ts)], [item], blend.content)
            history = list(recent)
            if self.blends:
                self.blends[0].ranker.record(history, item, ts)  # the shared counts, once
            if item not in recent:
                for blend in self.blends:
                    blend.fold(user, item_n)
            recent.pop(item, None)
            recent[item] = None
        self.position = max(self.position, to)


class Blend:
    """`default` (or the blend over another semantic source): the product's ranking,
    `streams.rank.BlendRanker`, walked along the stream (`BlendWalk`). At a target it has
    folded in every row before the target and none at or after it."""

    def __init__(self, walk: BlendWalk, content: OfflineContent, ranker: BlendRanker) -> None:
        self.walk, self.content, self.ranker = walk, content, ranker
        # the semantic profile per user: the sum of the distinct history items' unit vectors,
        # kept as rows arrive (its direction is `mean_profile` of the history)
        self.sums = np.zeros((len(walk.stream.user_ids), content.unit.shape[1]))

    @classmethod
    def alone(cls, stream: Stream, index: ContentIndex, config: RankConfig | None = None) -> Blend:
        return BlendWalk(stream, config).add(index)

    def fold(self, user: int, item: int) -> None:
        if self.content.has[item]:
            self.sums[user] += self.content.unit[item]

    def request(self, user: int, ts: float) -> Request:
        total = self.sums[user]
        norm = float(np.linalg.norm(total))
        profile = (total / norm).astype(np.float32) if norm > 1e-9 else None
        return Request(list(self.walk.recent[user]), profile, ts)

    def advance(self, to: int) -> None:
        self.walk.advance(to)

    def __call__(self, state: StreamState, target: Target) -> np.ndarray:
        return self.scores(state, target)

    def scores(self, state: StreamState, target: Target, serving: RankConfig | None = None) -> np.ndarray:
        """The ranking at the target as scores over the catalogue, with the ranker's own
        settings or a ranking variant's (`serving`)."""
        self.walk.advance(target.row)
        self.content.ts = target.ts
        top = self.ranker.rank([self.request(target.user, target.ts)], self.content, max(KS), serving)[0]
        primary = np.zeros(len(self.walk.stream.item_ids))
        for position, (item_id, _) in enumerate(top):
            primary[self.content.index[item_id]] = len(top) - position
        return lexicographic(primary, state.counts)


@dataclass(frozen=True)
class Method:
    score: Scorer | None = None  # stateless methods
    strategy: Strategy | None = None  # the item vectors the method reads, if any
    #: stateful methods: a fresh scorer per walk, from the stream, the content indexes and a
    #: dict the walk's scorers share
    make: Callable[[Stream, Mapping[str, ContentIndex], dict[str, Any]], Scorer] | None = None

    def scorer(
        self, stream: Stream, content_indexes: Mapping[str, ContentIndex], shared: dict[str, Any] | None = None
    ) -> Scorer:
        if self.make is not None:
            return self.make(stream, content_indexes, {} if shared is None else shared)
        assert self.score is not None
        return self.score


def _blend_of(stream: Stream, indexes: Mapping[str, ContentIndex], shared: dict[str, Any], strategy: Strategy) -> Blend:
    """The walk's blend over `strategy` (made once: `default` and the ranking variants share
    it, and with it the model it learns)."""
    walk = shared.setdefault("blend", BlendWalk(stream, shared.get("rank")))
    if f"blend:{strategy}" not in shared:
        shared[f"blend:{strategy}"] = walk.add(indexes[strategy])
    return shared[f"blend:{strategy}"]


def blend(strategy: Strategy) -> Method:
    """The product's blend over `strategy`'s vectors; the blends of one walk share a
    `BlendWalk`."""

    def make(stream: Stream, indexes: Mapping[str, ContentIndex], shared: dict[str, Any]) -> Scorer:
        return _blend_of(stream, indexes, shared, strategy)

    return Method(strategy=strategy, make=make)


def variant(serving: RankConfig) -> Method:
    """`default` ranked with a ranking variant's serving settings (`streams.variants`): the
    same walk and the same learnt model, as in the stream processor."""

    def make(stream: Stream, indexes: Mapping[str, ContentIndex], shared: dict[str, Any]) -> Scorer:
        shared_blend = _blend_of(stream, indexes, shared, DEFAULT_STRATEGY)
        shared_blend.ranker.learns_places |= {serving.tail_rule} & set(LEARNT_TAIL_RULES)
        if serving.content_picks:
            shared_blend.ranker.learns_picks |= {serving.tail_rule} & set(LEARNT_TAIL_RULES)
        return lambda state, target: shared_blend.scores(state, target, serving)

    return Method(strategy=DEFAULT_STRATEGY, make=make)


METHODS: dict[str, Method] = {
    "popularity": Method(popularity),
    "recent_popularity": Method(recent_popularity),
    "item_knn": Method(item_knn),
    "image": Method(content("image"), "image"),
    "text": Method(content("text"), "text"),
    "describe": Method(content("describe"), "describe"),
    "fused": Method(content("fused"), "fused"),
    "default": blend(DEFAULT_STRATEGY),
}
#: the strategy comparison inside the blend (reported beside `methods` when `default` runs)
BLEND_STRATEGIES: tuple[Strategy, ...] = ("image", "text", "describe", "fused")


def strategies_of(methods: Sequence[str]) -> list[Strategy]:
    """The embedding strategies the chosen methods need, in a stable order."""
    return list(dict.fromkeys(s for m in methods if (s := METHODS[m].strategy) is not None))


def method_of(name: str, variants: Sequence[Variant] = (), rank: RankConfig | None = None) -> Method:
    """A method of `METHODS`, `blend:STRATEGY` (the blend over another semantic source) or
    `variant:NAME` (`default` with one of `variants`' serving settings over `rank`'s)."""
    if name.startswith("blend:"):
        return blend(name.split(":", 1)[1])  # type: ignore[arg-type]
    if name.startswith("variant:"):
        wanted = name.split(":", 1)[1]
        return variant(next(v for v in variants if v.name == wanted).config(rank or RankConfig()))
    return METHODS[name]
