"""Offline evaluation, exactly as ../shared/EVAL.md says: a prequential leave-last-out replay.

The sorted interaction stream is walked once. State (interaction counts, a trailing window,
every user's distinct history, the user-item pairs behind item co-occurrence) grows one row at
a time; when the walk reaches a target row, every method scores every published item from the
state *before* that row, and the target's rank is recorded. Content methods rank with the
profile and ranking code of `streams.profile` (`mean_profile`, `Ranker`), the code the stream
processor runs.

Adding a method is one function `(state, target) -> scores over stream.item_ids` (higher is
better) and one entry in `METHODS`. A method that defines a fallback returns
`lexicographic(primary, fallback)`; the ranker breaks the remaining ties by item_id.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from streams.profile import Ranker, mean_profile
from streams.cooccur import CoOccurrence
from streams.rank import BlendRanker, Hits, ItemStats, RankConfig, Request
from streams.variants import Variant
from vlm4rec.evaluation.blas import single_threaded_blas
from vlm4rec.evaluation.dataset import Dataset, publish_times
from vlm4rec.evaluation.embedcache import EmbeddingCache, embed_items
from workers.backends.base import EmbeddingBackend
from workers.embedder import Embedder, Strategy
from images.loader import ImageLimits, ImageLoader

KS = (10, 20)
#: recent_popularity's trailing window. A week: long enough that a sparse catalogue (hm: about
#: 40 purchases a day) has counts to rank by, short enough to follow what is selling now.
WINDOW_DAYS = 7.0
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 5
#: the embedding strategy of the product's blend (the semantic source inside `default`)
DEFAULT_STRATEGY: Strategy = "text"
#: what the `default` method is: the product's ranking (`streams.rank.BlendRanker`)
DEFAULT_IS = f"blend({DEFAULT_STRATEGY})"


@dataclass(frozen=True)
class Stream:
    """The dataset as the evaluator walks it: integer indices, interactions sorted by ts."""

    name: str
    item_ids: list[str]  # every item that is ever published; the index of an item
    published_at: np.ndarray  # float64 per item
    user_ids: list[str]
    users: np.ndarray  # int64 per row, in stream order
    items: np.ndarray  # int64 per row
    ts: np.ndarray  # float64 per row
    #: declared creation times (items.csv `created_at`) by item index; items published at
    #: their first interaction are absent
    created_at: Mapping[int, float] = field(default_factory=dict)


def build_stream(dataset: Dataset) -> Stream:
    """`dataset.interactions` is already sorted by ts, stable (EVAL.md step 1)."""
    published = publish_times(dataset.items, dataset.interactions)
    item_ids = sorted(published)
    item_index = {item_id: n for n, item_id in enumerate(item_ids)}
    user_index: dict[str, int] = {}
    for row in dataset.interactions:
        user_index.setdefault(row.user_id, len(user_index))
    rows = dataset.interactions
    return Stream(
        name=dataset.name,
        item_ids=item_ids,
        published_at=np.array([published[i] for i in item_ids], dtype=np.float64),
        user_ids=list(user_index),
        users=np.array([user_index[r.user_id] for r in rows], dtype=np.int64),
        items=np.array([item_index[r.item_id] for r in rows], dtype=np.int64),
        ts=np.array([r.ts for r in rows], dtype=np.float64),
        created_at={item_index[i.item_id]: float(i.created_at) for i in dataset.items if i.created_at is not None and i.item_id in item_index},
    )


def select_targets(stream: Stream) -> np.ndarray:
    """Row positions of the targets, ascending: each user's last row, when the user has at
    least 2 earlier rows and the last item is not among them (EVAL.md step 3)."""
    last: dict[int, int] = {}
    rows: dict[int, int] = {}
    first_pair: dict[tuple[int, int], int] = {}
    for position, (user, item) in enumerate(zip(stream.users.tolist(), stream.items.tolist(), strict=True)):
        last[user] = position
        rows[user] = rows.get(user, 0) + 1
        first_pair.setdefault((user, item), position)
    return np.array(
        sorted(
            position
            for user, position in last.items()
            if rows[user] >= 3 and first_pair[(user, int(stream.items[position]))] == position
        ),
        dtype=np.int64,
    )


class ContentIndex:
    """One strategy's item vectors (rows aligned with `stream.item_ids`; a zero row for an item
    without a vector). Identical vectors are scored once, so identical items get bit-identical
    scores and the tie rule, not floating-point noise, orders them."""

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = np.asarray(vectors, dtype=np.float32)
        unique, inverse = np.unique(self.vectors, axis=0, return_inverse=True)
        self._unique = unique
        self._inverse = inverse.reshape(-1)

    def scores(self, history: Sequence[int]) -> np.ndarray:
        """Cosine of every item to the user's profile: the mean of the distinct history items'
        unit vectors (the streams' `mean_profile`). No usable history: all zeros."""
        profile = mean_profile(self.vectors[list(history)])
        if profile is None:
            return np.zeros(len(self.vectors))
        return (self._unique @ profile)[self._inverse]


class StreamState:
    """What is known just before row `position` of the stream; `advance` folds rows in."""

    def __init__(self, stream: Stream, content: Mapping[str, ContentIndex], window_days: float) -> None:
        n_items, n_rows = len(stream.item_ids), len(stream.users)
        self.stream = stream
        self.content = content
        self.window_s = window_days * 86400.0
        self.position = 0
        self.counts = np.zeros(n_items)  # interactions so far
        self.window = np.zeros(n_items)  # interactions in the trailing window (see `at`)
        self.item_users = np.zeros(n_items)  # distinct users so far
        self.history: list[list[int]] = [[] for _ in stream.user_ids]  # distinct, oldest first
        self._seen: list[set[int]] = [set() for _ in stream.user_ids]
        # distinct (user, item) pairs in order of first occurrence; the first `pairs` are known
        self.pair_users = np.zeros(n_rows, dtype=np.int64)
        self.pair_items = np.zeros(n_rows, dtype=np.int64)
        self.pairs = 0
        self._tail = 0  # first row still inside the window

    def advance(self, to: int) -> None:
        stream = self.stream
        for position in range(self.position, to):
            user, item = int(stream.users[position]), int(stream.items[position])
            self.counts[item] += 1
            self.window[item] += 1
            if item not in self._seen[user]:
                self._seen[user].add(item)
                self.history[user].append(item)
                self.item_users[item] += 1
                self.pair_users[self.pairs] = user
                self.pair_items[self.pairs] = item
                self.pairs += 1
        self.position = max(self.position, to)

    def at(self, ts: float) -> None:
        """Shrink the window to the rows with ts > `ts` - W (EVAL.md); target times only grow
        along the walk, so rows leave it once."""
        stream = self.stream
        while self._tail < self.position and stream.ts[self._tail] <= ts - self.window_s:
            self.window[stream.items[self._tail]] -= 1
            self._tail += 1


#: a target more than this after the user's previous interaction is a later visit (EVAL.md)
LATER_VISIT_S = 3600.0


@dataclass(frozen=True)
class Target:
    row: int
    user: int
    item: int
    ts: float
    cold: bool  # the item had no interaction before the target
    later: bool = False  # more than LATER_VISIT_S after the user's previous interaction


def previous_ts(stream: Stream) -> np.ndarray:
    """Per row, the ts of the same user's previous row in the sorted stream (NaN for a
    user's first)."""
    order = np.lexsort((np.arange(len(stream.users)), stream.users))
    previous = np.full(len(order), np.nan)
    same = stream.users[order][1:] == stream.users[order][:-1]
    previous[order[1:][same]] = stream.ts[order[:-1][same]]
    return previous


def lexicographic(primary: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """One score that orders by `primary`, then by `fallback`: the dense rank of `primary`
    times a stride larger than any `fallback` (non-negative integers), exact in float64."""
    _, rank = np.unique(primary, return_inverse=True)
    return rank.reshape(-1) * (float(fallback.max(initial=0.0)) + 1.0) + fallback


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
    row is recorded once into the counts and co-occurrence the rankers share (they do not
    depend on the embedding)."""

    def __init__(self, stream: Stream, config: RankConfig | None = None) -> None:
        self.stream = stream
        self.config = config or RankConfig()
        self.blends: list[Blend] = []
        self.stats = ItemStats(self.config.short_half_life_s, self.config.long_half_life_s)
        self.cooc = CoOccurrence(self.config.cooc_window, self.config.cooc_neighbours)
        for item, created in sorted(stream.created_at.items(), key=lambda kv: (kv[1], kv[0])):
            self.stats.declare(stream.item_ids[item], created)
        # per user: distinct items by latest interaction, oldest first (the profile's `seen`)
        self.recent: list[dict[str, None]] = [{} for _ in stream.user_ids]
        self.position = 0

    def add(self, index: ContentIndex) -> Blend:
        blend = Blend(self, OfflineContent(self.stream, index), BlendRanker(self.config, self.stats, self.cooc))
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
    walk = shared.setdefault("blend", BlendWalk(stream))
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


def method_of(name: str, variants: Sequence[Variant] = ()) -> Method:
    """A method of `METHODS`, `blend:STRATEGY` (the blend over another semantic source) or
    `variant:NAME` (`default` with one of `variants`' serving settings)."""
    if name.startswith("blend:"):
        return blend(name.split(":", 1)[1])  # type: ignore[arg-type]
    if name.startswith("variant:"):
        wanted = name.split(":", 1)[1]
        return variant(next(v for v in variants if v.name == wanted).config(RankConfig()))
    return METHODS[name]


# --- the walk ----------------------------------------------------------------------------


def states(
    stream: Stream, content_indexes: Mapping[str, ContentIndex], window_days: float = WINDOW_DAYS
) -> Iterator[tuple[StreamState, Target]]:
    """Walk the stream once; at each target, yield the state just before it (every earlier row,
    same-ts rows included: EVAL.md step 4) and the target."""
    state = StreamState(stream, content_indexes, window_days)
    previous = previous_ts(stream)
    for row in select_targets(stream).tolist():
        state.advance(row)
        item, ts = int(stream.items[row]), float(stream.ts[row])
        state.at(ts)
        later = bool(ts - previous[row] > LATER_VISIT_S)  # a target always has earlier rows
        yield state, Target(row, int(stream.users[row]), item, ts, cold=bool(state.counts[item] == 0), later=later)


def recommend(
    state: StreamState, target: Target, method: str, ranker: Ranker, k: int = max(KS), scorer: Scorer | None = None
) -> list[str]:
    """The method's top k for the target: items published up to and including the target's ts,
    the user's own history excluded, ties by item_id (the `Ranker`). A stateful method passes
    its walk's `scorer`."""
    stream = state.stream
    candidates = stream.published_at <= target.ts
    history = state.history[target.user]
    k = min(k, int(candidates.sum()) - int(candidates[history].sum()))
    score = scorer if scorer is not None else METHODS[method].scorer(stream, state.content)
    scores = np.where(candidates, score(state, target), -np.inf)
    return [item_id for item_id, _ in ranker.top_k(scores, k, [stream.item_ids[i] for i in history])]


@dataclass
class MethodResult:
    ranks: list[int]  # per target: 1-based rank in the top 20, 0 when not in it
    recommended: set[str]  # distinct items in any top 10
    tops: list[list[str]] = field(default_factory=list)  # per target: the top 10 (for subsets' coverage)


def walk(
    stream: Stream,
    methods: Sequence[str],
    content_indexes: Mapping[str, ContentIndex],
    window_days: float = WINDOW_DAYS,
    progress: bool = False,
    variants: Sequence[Variant] = (),
) -> tuple[list[Target], dict[str, MethodResult]]:
    """Every target scored by every method (`variant:NAME` methods from `variants`)."""
    ranker = Ranker(stream.item_ids)
    shared: dict[str, Any] = {}
    scorers = {m: method_of(m, variants).scorer(stream, content_indexes, shared) for m in methods}
    results = {m: MethodResult([], set()) for m in methods}
    targets: list[Target] = []
    n_targets = len(select_targets(stream)) if progress else None
    walked = tqdm(states(stream, content_indexes, window_days), total=n_targets, desc="score", unit="target", disable=not progress)
    for state, target in walked:
        targets.append(target)
        wanted = stream.item_ids[target.item]
        for name in methods:
            top = recommend(state, target, name, ranker, scorer=scorers[name])
            results[name].ranks.append(top.index(wanted) + 1 if wanted in top else 0)
            results[name].recommended.update(top[: KS[0]])
            results[name].tops.append(top[: KS[0]])
    return targets, results


def bootstrap_resamples(n_targets: int, n: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(n, n_targets) indices of targets drawn with replacement: one fixed set, shared by every
    method, so that their intervals are comparable."""
    return np.random.default_rng(seed).integers(0, n_targets, size=(n, n_targets))


def summarise(
    ranks: Sequence[int], targets: Sequence[Target], recommended: set[str], published: int, resamples: np.ndarray
) -> dict[str, Any]:
    """EVAL.md's metrics for one method: over all targets, the cold ones and the later visits
    (None for a subset without targets)."""
    cold = np.array([t.cold for t in targets], dtype=bool)
    later = np.array([t.later for t in targets], dtype=bool)
    rank = np.asarray(ranks, dtype=np.float64)
    hits = {k: (rank > 0) & (rank <= k) for k in KS}  # per target
    gains = {k: np.where(hits[k], 1.0 / np.log2(np.maximum(rank, 1) + 1), 0.0) for k in KS}
    out: dict[str, Any] = {}
    for k in KS:
        out[f"HR@{k}"] = float(hits[k].mean())
        out[f"NDCG@{k}"] = float(gains[k].mean())
    hit10 = hits[10].astype(np.float64)
    out["coverage@10"] = len(recommended) / published
    low, high = np.percentile(hit10[resamples].mean(axis=1), [2.5, 97.5])
    out["HR@10_ci"] = [float(low), float(high)]
    out["HR@10_cold"] = float(hit10[cold].mean()) if cold.any() else None
    out["HR@10_later"] = float(hit10[later].mean()) if later.any() else None
    out["NDCG@10_later"] = float(gains[10][later].mean()) if later.any() else None
    ordered = ["HR@10", "NDCG@10", "HR@20", "NDCG@20", "coverage@10", "HR@10_ci", "HR@10_cold", "HR@10_later", "NDCG@10_later"]
    return {key: out[key] for key in ordered}


def evaluate(
    stream: Stream,
    methods: Sequence[str],
    content_indexes: Mapping[str, ContentIndex],
    window_days: float = WINDOW_DAYS,
    progress: bool = False,
    variants: Sequence[Variant] = (),
) -> dict[str, Any]:
    """The report of issue 5: {"dataset", "targets", "cold_targets", "later_targets", "default",
    "methods"};
    when `default` runs, also "blend_by_strategy": the same blend with each other embedding
    strategy at hand as its semantic source (issue 6), on the same targets; with `variants`,
    "variants": `default` ranked with each ranking variant's serving settings, on the same
    targets (the offline side of the online per-variant hit rates)."""
    compared = [s for s in BLEND_STRATEGIES if s in content_indexes] if "default" in methods else []
    extra = [f"blend:{s}" for s in compared if s != DEFAULT_STRATEGY] + [f"variant:{v.name}" for v in variants]
    with single_threaded_blas():
        targets, results = walk(stream, list(methods) + extra, content_indexes, window_days, progress, variants)
    if not targets:
        raise ValueError(f"{stream.name}: no user has a target (a last interaction after 2 others, not a repeat)")
    published = int((stream.published_at <= targets[-1].ts).sum())
    resamples = bootstrap_resamples(len(targets))

    def summary(name: str) -> dict[str, Any]:
        return summarise(results[name].ranks, targets, results[name].recommended, published, resamples)

    report: dict[str, Any] = {
        "dataset": stream.name,
        "targets": len(targets),
        "cold_targets": sum(t.cold for t in targets),
        "later_targets": sum(t.later for t in targets),
        "default": DEFAULT_IS,
        "methods": {m: summary(m) for m in methods},
    }
    if compared:
        report["blend_by_strategy"] = {
            s: report["methods"]["default"] if s == DEFAULT_STRATEGY else summary(f"blend:{s}") for s in compared
        }
    if variants:
        report["variants"] = {v.name: {"share": v.share, "overrides": dict(v.overrides), **summary(f"variant:{v.name}")} for v in variants}
    return report


# --- output ------------------------------------------------------------------------------


def _metric_rows(first_column: str, methods: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """A Markdown table of the report's metrics, one row per method."""

    def num(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        f"| {first_column} | HR@10 | HR@10 95% CI | NDCG@10 | HR@20 | NDCG@20 | coverage@10 | HR@10 cold | HR@10 later | NDCG@10 later |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        low, high = m["HR@10_ci"]
        lines.append(
            f"| {name} | {num(m['HR@10'])} | {num(low)}–{num(high)} | {num(m['NDCG@10'])} | "
            f"{num(m['HR@20'])} | {num(m['NDCG@20'])} | {num(m['coverage@10'])} | {num(m['HR@10_cold'])} | "
            f"{num(m.get('HR@10_later'))} | {num(m.get('NDCG@10_later'))} |"
        )
    return lines


def markdown_table(report: Mapping[str, Any]) -> str:
    lines = [
        f"{report['dataset']}: {report['targets']} targets, {report['cold_targets']} cold, "
        f"{report.get('later_targets', 'n/a')} later visits (> 1 h after the user's previous "
        f"interaction) (`default` = `{report['default']}`)",
        "",
        *_metric_rows("method", report["methods"]),
    ]
    if report.get("blend_by_strategy"):
        lines += [
            "",
            "The blend with each embedding strategy as its semantic source (`default` uses "
            f"`{DEFAULT_STRATEGY}`):",
            "",
            *_metric_rows("semantic source", report["blend_by_strategy"]),
        ]
    if report.get("variants"):
        lines += [
            "",
            "`default` with each ranking variant's serving settings (VLM4REC_RANK_VARIANTS), on all targets:",
            "",
            *_metric_rows("variant", {f"{n} {json.dumps(v['overrides']) if v['overrides'] else '(no overrides)'}": v
                                      for n, v in report["variants"].items()}),
        ]
    return "\n".join(lines) + "\n"


def plot(report: Mapping[str, Any], path: Path) -> None:
    """HR@10 of every method with its 95% bootstrap interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["methods"])
    values = np.array([report["methods"][n]["HR@10"] for n in names])
    ci = np.array([report["methods"][n]["HR@10_ci"] for n in names]).reshape(-1, 2)
    errors = np.stack([values - ci[:, 0], ci[:, 1] - values])
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(names), 4.0))
    ax.bar(names, values, yerr=errors, capsize=4, color="#4c72b0")
    ax.set_ylabel("HR@10 (95% bootstrap CI)")
    ax.set_title(f"{report['dataset']}: {report['targets']} targets, {report['cold_targets']} cold")
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: Mapping[str, Any], out: Path) -> tuple[Path, Path]:
    """`out` (JSON), and beside it the Markdown table (.md) and the chart (.png)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    table, chart = out.with_suffix(".md"), out.with_suffix(".png")
    table.write_text(markdown_table(report))
    plot(report, chart)
    return table, chart


def content_matrix(stream: Stream, vectors: Mapping[str, np.ndarray], dim: int) -> np.ndarray:
    """Rows aligned with `stream.item_ids`; zeros for items without a vector (cosine 0 to
    every profile, so content neither favours nor hides them)."""
    matrix = np.zeros((len(stream.item_ids), dim), dtype=np.float32)
    for n, item_id in enumerate(stream.item_ids):
        vector = vectors.get(item_id)
        if vector is not None:
            matrix[n] = vector
    return matrix



def embed_content(
    dataset: Dataset,
    stream: Stream,
    strategies: Sequence[Strategy],
    backend: EmbeddingBackend,
    cache: EmbeddingCache,
    progress: bool = False,
) -> tuple[dict[str, ContentIndex], dict[str, str]]:
    """A `ContentIndex` per strategy over the published items (cached vectors reused), and the
    items left without a vector in some strategy, with the reason. Images are read from the
    dataset folder only."""
    published = set(stream.item_ids)
    items = [item for item in dataset.items if item.item_id in published]
    loader = ImageLoader(ImageLimits(file_roots=(dataset.root,)))
    vectors, failed = embed_items(items, strategies, backend, loader, cache, progress=progress)
    indexes = {
        s: ContentIndex(content_matrix(stream, vectors[s], Embedder(backend, s).dim)) for s in strategies
    }
    return indexes, failed
