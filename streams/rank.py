"""The product's ranking: candidates from several sources, blended by a small model that the
stream trains on its own earlier interactions. Faust-free numpy, so that the stream processor
(`streams.recommend`) and the offline evaluator (`vlm4rec eval`, method `default`) run the very
same code.

Sources (union, de-duplicated, the user's own items dropped):
- content: nearest items (vector ANN) to the user's semantic profile (the mean of the history's
  unit vectors, the paper's profile) and to each of the user's last `interests` items (several
  profile vectors, so that one mean does not blur distinct tastes). The latter are the items'
  own `neighbour_depth` nearest neighbours less what the user has seen, cut to `content_k`:
  one list per item, shared by every user who touched it;
- co-occurrence with the user's recent items (`streams.cooccur.CoOccurrence`, incremental);
- recent popularity (exponentially decayed interaction counts);
- fresh items: items with a declared creation time (`created_at`) in the last
  `fresh_window_s`, nearest to the profile first.

Features of a (user, candidate) pair (`FEATURES`): the content cosines (to the mean profile,
the best of the last items, the last item), co-occurrence with the last items (raw and relative
to the best candidate), popularity (all-time count, decayed counts at two half-lives), the
item's age since its declared creation, the user's history length crossed with the main
signals (how much to trust content vs. collaborative evidence depends on it), the content
cosine of items seen at most once (content is all the evidence they have), and each source's
normalised score: 1 / log2(1 + the candidate's rank there).

The model is a pairwise logistic regression (RankNet with a linear scorer): a sampled
interaction whose item is among the candidates the sources offered for that user at that moment
is a positive, compared with negatives sampled from the same candidates (the model's job is to
order the candidates; an interaction the sources missed says nothing about that order, and
training on it taught the model to prefer what the sources do not offer). Groups are built
from the state just *before* the interaction and kept in a bounded buffer of the most recent
ones. Every interaction is sampled until the first fit (`min_groups` groups), then
`train_rate` of them; the model is refit after `refit_share` of the buffer (at most
`refit_every` groups) is new. Until the first fit the ranking is the paper's (cosine to the
mean profile). What is fixed here is the procedure, not weights per dataset.

No peeking at publication: an item's age is taken from a declared `created_at` only. Where an
item is "published" at its first interaction (a replay without `created_at`), its age and the
fact that nobody touched it before would point straight at the interaction about to happen, so
neither is a feature: counts are floored at 1 (a fresh item looks like any item seen once) and
decayed counts below `POP_FLOOR` read as 0.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Callable, Protocol, TypeVar

import numpy as np

from streams.cooccur import CoOccurrence

Hits = list[tuple[str, float]]
T = TypeVar("T")

FEATURES = (
    "cos_mean",  # cosine to the mean profile
    "cos_max",  # best cosine to one of the last `interests` items
    "cos_last",  # cosine to the last item
    "cooc_recent",  # co-occurrence with the last `interests` items
    "cooc_rel",  # cooc_recent / the best cooc_recent among the candidates
    "pop_count",  # log1p(interactions so far, floored at 1)
    "pop_short",  # log1p(decayed count, short half-life)
    "pop_long",  # log1p(decayed count, long half-life)
    "age",  # log1p(days since the declared created_at); 0 when not declared
    "hist_cos_max",  # log1p(history length) x cos_max
    "hist_cooc",  # log1p(history length) x cooc_recent
    "hist_pop",  # log1p(history length) x pop_long
    "tail_cos_max",  # cos_max for items with at most one interaction (content is all they have)
    "rr_profile",  # 1 / log2(1 + rank) in the mean-profile ANN hits (0: not among them)
    "rr_interests",  # the same, best over the last items' ANN hits
    "rr_cooc",  # the same in the co-occurrence source
    "rr_popular",  # the same in the recent-popularity source
)
SOURCES = ("profile", "interests", "cooc", "popular", "fresh")
COLUMN = {f: j for j, f in enumerate(FEATURES)}
#: what ranks before the model has seen enough of the stream: the paper's cosine to the mean
PRIOR = {"cos_mean": 1.0, "pop_long": 1e-6}  # (popularity only breaks ties)
#: decayed counts below this read as 0 (see the module docstring)
POP_FLOOR = 0.05


class ContentSource(Protocol):
    """The item vectors of one embedding space: a vector store (Milvus online, an exact index
    offline)."""

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Collection[str]]) -> list[Hits]:
        """Top k (item_id, cosine) per query row, best first; `exclude[i]` never returned."""

    def vectors(self, ids: Collection[str]) -> Mapping[str, np.ndarray]:
        """Unit vectors of the ids that have one."""

    def neighbours(self, items: Collection[str], depth: int) -> Mapping[str, Hits]:
        """The `depth` nearest items of each item that has a vector (itself included), best
        first. Unlike a profile, an item's neighbours hardly change, so the stream processor
        caches them: one search per item now and then, not per user and interaction."""


@dataclass(frozen=True)
class RankConfig:
    content_k: int = 50  # ANN hits per profile vector
    neighbour_depth: int = 100  # nearest neighbours looked at per recent item (before the seen are dropped)
    interests: int = 5  # last items used as profile vectors (and by cos_max / cooc_recent)
    cooc_k: int = 100  # co-occurrence candidates
    cooc_window: int = 50  # earlier items a new interaction co-occurs with
    cooc_neighbours: int = 500  # neighbours kept per item
    popular_k: int = 50  # recent-popularity candidates
    fresh_k: int = 20  # fresh-item candidates
    fresh_window_s: float = 7 * 86400.0
    short_half_life_s: float = 86400.0
    long_half_life_s: float = 7 * 86400.0
    train_rate: float = 0.1  # share of interactions that become training groups
    warmup_rate: float = 1.0  # the same until the first fit
    negatives: int = 50  # sampled negatives per group
    buffer: int = 5000  # training groups kept (the most recent)
    refit_every: int = 500  # new groups between fits at most
    refit_share: float = 0.1  # ... and at least this share of the buffer (refits follow a young stream closely)
    min_groups: int = 200  # groups before the first fit
    l2: float = 1.0
    seed: int = 0
    tail_slots: int = 1  # of the first `tail_within` places, kept for items with at most one interaction (by cosine to the profile)
    tail_within: int = 10


@dataclass
class Request:
    """One user at one moment: `history` holds the user's distinct items ordered by their
    latest interaction, oldest first; `profile` the unit semantic profile (None: no signal)."""

    history: Sequence[str]
    profile: np.ndarray | None
    ts: float
    exclude: Collection[str] = ()  # beside the history

    def excluded(self) -> set[str]:
        return set(self.history) | set(self.exclude)


class ItemStats:
    """Interaction counts per item: all-time, and decayed at two half-lives (stored scaled to a
    moving origin so that adding is O(1)); declared creation times for the fresh source."""

    def __init__(self, short_half_life_s: float, long_half_life_s: float, fresh_kept: int = 10_000) -> None:
        self.half_lives = np.array([short_half_life_s, long_half_life_s])
        self.ids: list[str] = []
        self.index: dict[str, int] = {}
        self._counts = np.zeros(1024)
        self._decayed = np.zeros((1024, 2))  # scaled to 2^((ts - origin) / half-life)
        self._origin: float | None = None
        self.clock = 0.0  # the latest interaction time seen: the stream's "now"
        self._created = np.full(1024, np.nan)  # declared creation times by index; NaN: none
        self._fresh: deque[tuple[float, str]] = deque(maxlen=fresh_kept)
        # a refresh round asks for the decayed counts and the top items of one moment once per
        # user: computed once per (moment, state) instead
        self._version = 0
        self._memo: dict[tuple[str, float, int], object] = {}

    def _intern(self, item: str) -> int:
        n = self.index.get(item)
        if n is None:
            n = self.index[item] = len(self.ids)
            self.ids.append(item)
            if n >= len(self._counts):
                self._counts = np.concatenate([self._counts, np.zeros(len(self._counts))])
                self._decayed = np.concatenate([self._decayed, np.zeros_like(self._decayed)])
                self._created = np.concatenate([self._created, np.full(len(self._created), np.nan)])
        return n

    def _remember(self, what: str, ts: float, make: Callable[[], T]) -> T:
        key = (what, ts, self._version)
        found = self._memo.get(key)
        if found is None:
            if len(self._memo) > 8:
                self._memo.clear()
            found = self._memo[key] = make()
        return found  # type: ignore[return-value]

    def add(self, item: str, ts: float) -> None:
        self._version += 1
        n = self._intern(item)
        self._counts[n] += 1
        self.clock = max(self.clock, ts)
        if self._origin is None or ts - self._origin > 50 * self.half_lives.min():
            self._rebase(ts)
        assert self._origin is not None
        self._decayed[n] += np.exp2((ts - self._origin) / self.half_lives)

    def _rebase(self, ts: float) -> None:
        if self._origin is not None:
            self._decayed *= np.exp2(-(ts - self._origin) / self.half_lives)
        self._origin = ts

    def declare(self, item: str, created_at: float) -> None:
        """An item with a declared creation time (items.new `created_at`)."""
        n = self._intern(item)
        if np.isnan(self._created[n]):  # the first declaration stands
            self._version += 1
            self._created[n] = created_at
            self._fresh.append((created_at, item))

    def count(self, item: str) -> int:
        n = self.index.get(item)
        return 0 if n is None else int(self._counts[n])

    def rows(self, items: Sequence[str]) -> np.ndarray:
        """Internal index of each item (-1: never seen), for `counts`, `decayed`, `ages`."""
        index = self.index
        return np.fromiter((index.get(i, -1) for i in items), dtype=np.int64, count=len(items))

    def counts(self, rows: np.ndarray) -> np.ndarray:
        return np.where(rows >= 0, self._counts[np.maximum(rows, 0)], 0.0)

    def _now(self, ts: float) -> np.ndarray:
        """Decayed counts of every known item at `ts`, floored (see the module docstring).
        Shared between callers: read-only."""

        def make() -> np.ndarray:
            size = len(self.ids)
            if self._origin is None:
                return np.zeros((size, 2))
            out = self._decayed[:size] * np.exp2(-(ts - self._origin) / self.half_lives)
            out[out < POP_FLOOR] = 0.0
            return out

        return self._remember("now", ts, make)

    def decayed(self, rows: np.ndarray, ts: float) -> np.ndarray:
        """(len(rows), 2): decayed counts at `ts` (short, long half-life), floored."""
        now = self._now(ts)
        if not len(now):
            return np.zeros((len(rows), 2))
        return np.where((rows >= 0)[:, None], now[np.maximum(rows, 0)], 0.0)

    def ages_days(self, rows: np.ndarray, ts: float) -> np.ndarray:
        """log1p(days since the declared creation), 0 where none was declared."""
        created = np.where(rows >= 0, self._created[np.maximum(rows, 0)], np.nan)
        return np.where(np.isnan(created), 0.0, np.log1p(np.maximum(0.0, ts - created) / 86400.0))

    def popular(self, k: int, ts: float, exclude: Collection[str]) -> list[str]:
        """Top k by the long-half-life decayed count (above the floor), ties by item_id."""
        take = k + len(exclude)
        ranked = self._popular_ranking(ts)
        if take > len(ranked) and len(ranked) < int((self._now(ts)[:, 1] > 0).sum()):
            ranked = self._ranking(self._now(ts)[:, 1], take)
        return [i for i in ranked if i not in exclude][:k]

    def _popular_ranking(self, ts: float, depth: int = 1024) -> list[str]:
        """The `depth` most popular items at `ts`, best first (shared by a round's users)."""
        return self._remember("popular", ts, lambda: self._ranking(self._now(ts)[:, 1], depth))

    def _ranking(self, scores: np.ndarray, take: int) -> list[str]:
        take = min(len(scores), take)
        if take <= 0:
            return []
        top = np.argpartition(-scores, take - 1)[:take]
        return [i for _, i in sorted((-scores[n], self.ids[n]) for n in top if scores[n] > 0)]

    def fresh(self, ts: float, window_s: float) -> list[str]:
        """Declared items created in (ts - window_s, ts]."""
        return [i for created, i in self._fresh if ts - window_s < created <= ts]


class VectorTable(Mapping[str, np.ndarray]):
    """Item vectors as one matrix with an id index: a round's users gather their candidates'
    rows with one lookup pass instead of stacking a vector per candidate."""

    def __init__(self, vectors: Mapping[str, np.ndarray]) -> None:
        self.index = {item: n for n, item in enumerate(vectors)}
        self.dim = next((len(v) for v in vectors.values()), 0)
        rows = [np.asarray(v, dtype=np.float32) for v in vectors.values()]
        self.matrix = np.stack(rows + [np.zeros(self.dim, np.float32)]) if self.dim else np.zeros((1, 0), np.float32)

    def take(self, ids: Sequence[str]) -> np.ndarray:
        """(len(ids), dim), zeros for ids without a vector."""
        index, missing = self.index, len(self.index)
        return self.matrix[np.fromiter((index.get(i, missing) for i in ids), dtype=np.int64, count=len(ids))]

    def __getitem__(self, item: str) -> np.ndarray:
        return self.matrix[self.index[item]]

    def __contains__(self, item: object) -> bool:
        return item in self.index

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


@dataclass
class Group:
    """One training group: features of the positive (row 0) and of its negatives."""

    x: np.ndarray


class PairwiseLogistic:
    """Linear scorer trained with the pairwise logistic loss on (positive - negative)
    differences, standardised, L2-regularised, by Newton's method (a handful of features)."""

    def __init__(self, n_features: int, l2: float) -> None:
        self.l2 = l2
        self.weights: np.ndarray | None = None  # in raw feature units
        self.n_features = n_features

    def fit(self, groups: Sequence[Group]) -> None:
        diffs = np.concatenate([g.x[:1] - g.x[1:] for g in groups if len(g.x) > 1]).astype(np.float64)
        scale = diffs.std(axis=0)
        scale[scale < 1e-9] = 1.0
        z = diffs / scale
        w = np.zeros(z.shape[1])
        for _ in range(25):
            margin = z @ w
            p = 1.0 / (1.0 + np.exp(np.clip(margin, -30, 30)))  # d loss / d margin = -p
            grad = -(z.T @ p) / len(z) + self.l2 * w / len(z)
            hess = (z.T * (p * (1 - p))) @ z / len(z) + self.l2 * np.eye(len(w)) / len(z)
            step = np.linalg.solve(hess, grad)
            w -= step
            if np.abs(step).max() < 1e-6:
                break
        self.weights = w / scale

    def score(self, x: np.ndarray) -> np.ndarray:
        assert self.weights is not None
        return x @ self.weights


def _rr(rank: int) -> float:
    return 1.0 / math.log2(1.0 + rank)


_RR = [_rr(rank) for rank in range(1, 1025)]


@dataclass
class Candidates:
    ids: list[str]
    #: source -> {item it offered: 1 / log2(1 + its best 1-based rank there)}
    sources: dict[str, dict[str, float]] = field(default_factory=lambda: {s: {} for s in SOURCES})

    #: co-occurrence scores of the request's recent items over the `CoOccurrence` index
    cooc: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def offer(self, source: str, ranked: Sequence[str]) -> None:
        """`ranked`: best first; an item keeps its best rank."""
        offered = self.sources[source]
        get = offered.get
        for position, item in enumerate(ranked):
            rr = _RR[position] if position < len(_RR) else _rr(position + 1)
            if get(item, 0.0) < rr:
                offered[item] = rr

    def sources_union(self) -> set[str]:
        return set().union(*(set(o) for o in self.sources.values()))


class BlendRanker:
    """Candidates, features and the online-trained blend. Not thread-safe: the stream
    processor calls it from its single vector-store thread."""

    def __init__(
        self, config: RankConfig | None = None, stats: ItemStats | None = None, cooc: CoOccurrence | None = None
    ) -> None:
        """`stats` and `cooc`: counts shared with other rankers over the same stream (each
        interaction then `record`-ed by one of them only)."""
        self.config = config = config or RankConfig()
        self.stats = ItemStats(config.short_half_life_s, config.long_half_life_s) if stats is None else stats
        self.cooc = CoOccurrence(config.cooc_window, config.cooc_neighbours) if cooc is None else cooc
        self.model = PairwiseLogistic(len(FEATURES), config.l2)
        self.prior = np.array([PRIOR.get(f, 0.0) for f in FEATURES])
        self.groups: deque[Group] = deque(maxlen=config.buffer)
        self.new_groups = 0
        self.fits = 0
        self._rng = np.random.default_rng(config.seed)  # negatives
        self._draw = np.random.default_rng([config.seed, 1])  # which interactions train

    # --- the stream flows in --------------------------------------------------------------
    def sample_rate(self) -> float:
        """The share of interactions that become training groups: `warmup_rate` until the
        first fit (a fresh ranker learns as soon as it can), then `train_rate`."""
        return self.config.train_rate if self.fits else self.config.warmup_rate

    def wants_example(self) -> bool:
        """Draw whether the next interaction becomes a training group (seeded)."""
        return bool(self._draw.random() < self.sample_rate())

    def record(self, history: Sequence[str], item: str, ts: float) -> None:
        """Fold one applied interaction in; `history` is the user's distinct items before it
        (oldest first by latest interaction)."""
        self.stats.add(item, ts)
        if item not in history:
            self.cooc.add(item, history)

    def learn(self, requests: Sequence[Request], items: Sequence[str], content: ContentSource) -> None:
        """Training groups for interactions about to be recorded: `requests[n]` is the user's
        state just before taking `items[n]`. Call before `record`-ing them."""
        pools = self.candidates(requests, content)
        for request, item, pool in zip(requests, items, pools, strict=True):
            if item not in pool.sources_union():
                continue  # nothing to learn about ordering the candidates
            negatives = [i for i in pool.ids if i != item]
            if not negatives:
                continue
            take = min(self.config.negatives, len(negatives))
            chosen = self._rng.choice(len(negatives), size=take, replace=False)
            ids = [item] + [negatives[j] for j in sorted(chosen.tolist())]
            vectors = content.vectors(ids + list(request.history[-self.config.interests :]))
            x = self.features(request, ids, vectors, pool)
            self.groups.append(Group(x.astype(np.float32)))
            self.new_groups += 1
        self.maybe_refit()

    def maybe_refit(self) -> bool:
        c = self.config
        due = min(c.refit_every, max(1, int(c.refit_share * len(self.groups))))
        if len(self.groups) >= c.min_groups and (self.fits == 0 or self.new_groups >= due):
            self.model.fit(list(self.groups))
            self.new_groups = 0
            self.fits += 1
            return True
        return False

    # --- ranking --------------------------------------------------------------------------
    def candidates(self, requests: Sequence[Request], content: ContentSource) -> list[Candidates]:
        """Union of the sources per request, de-duplicated, seen items dropped. One content
        search for all requests' profile vectors."""
        c = self.config
        excluded = [r.excluded() for r in requests]
        profiled = [n for n, r in enumerate(requests) if r.profile is not None]
        hits = (
            content.search(
                np.stack([np.asarray(requests[n].profile, dtype=np.float32) for n in profiled]),
                c.content_k,
                [excluded[n] for n in profiled],
            )
            if profiled
            else []
        )
        out = [Candidates([]) for _ in requests]
        for n, row in zip(profiled, hits, strict=True):
            out[n].offer("profile", [item for item, _ in row])
        recent = {i for r in requests for i in r.history[-c.interests :]}
        neighbours = content.neighbours(recent, c.neighbour_depth) if recent and c.interests else {}
        for n, request in enumerate(requests):
            pool = out[n]
            for item in reversed(request.history[-c.interests :]):  # the latest first
                if near := neighbours.get(item):
                    pool.offer("interests", [i for i, _ in near if i not in excluded[n]][: c.content_k])
            pool.cooc = recent_co = self._cooc(request)
            pool.offer("cooc", self._top(recent_co, self.cooc.ids, c.cooc_k, excluded[n]))
            pool.offer("popular", self.stats.popular(c.popular_k, request.ts, excluded[n]))
            fresh = [i for i in self.stats.fresh(request.ts, c.fresh_window_s) if i not in excluded[n]]
            pool.offer("fresh", self._nearest(request, fresh, content, c.fresh_k))
            pool.ids = sorted(pool.sources_union())
        return out

    def _cooc(self, request: Request) -> np.ndarray:
        return self.cooc.dense(request.history[-self.config.interests :])

    @staticmethod
    def _top(scores: np.ndarray, ids: Sequence[str], k: int, exclude: Collection[str]) -> list[str]:
        """The k best positive scores, ties by id, excluded ids dropped."""
        take = min(int((scores > 0).sum()), k + len(exclude))
        if take <= 0:
            return []
        top = np.argpartition(-scores, take - 1)[:take]
        best = sorted((-scores[n], ids[n]) for n in top if scores[n] > 0)
        return [i for _, i in best if i not in exclude][:k]

    @staticmethod
    def _nearest(request: Request, ids: list[str], content: ContentSource, k: int) -> list[str]:
        if not ids or k <= 0:
            return []
        if request.profile is None or len(ids) <= k:
            return ids[-k:]
        vectors = content.vectors(ids)
        scored = sorted(((-float(np.dot(vectors[i], request.profile)), i) for i in ids if i in vectors))
        return [i for _, i in scored[:k]]

    def features(
        self,
        request: Request,
        ids: Sequence[str],
        vectors: Mapping[str, np.ndarray],
        pool: Candidates | None = None,
    ) -> np.ndarray:
        """(len(ids), len(FEATURES)) for one user at one moment; `pool`: the candidates the
        sources offered for this request (their ranks there are features)."""
        c = self.config
        n = len(ids)
        x = np.zeros((n, len(FEATURES)))
        col = COLUMN
        table = vectors if isinstance(vectors, VectorTable) else VectorTable(vectors)
        if table.dim:
            matrix = table.take(ids)
            if request.profile is not None:
                x[:, col["cos_mean"]] = matrix @ np.asarray(request.profile, dtype=np.float32)
            recent = [table[i] for i in request.history[-c.interests :] if i in table]
            if recent:
                sims = matrix @ np.stack(recent).T.astype(np.float32)
                x[:, col["cos_max"]] = sims.max(axis=1)
                if request.history[-1] in table:
                    x[:, col["cos_last"]] = sims[:, -1]
        recent_co = pool.cooc if pool is not None else self._cooc(request)
        x[:, col["cooc_recent"]] = self.cooc.lookup(recent_co, ids)
        top = x[:, col["cooc_recent"]].max(initial=0.0)
        if top > 0:
            x[:, col["cooc_rel"]] = x[:, col["cooc_recent"]] / top
        rows = self.stats.rows(ids)
        counts = self.stats.counts(rows)
        x[:, col["pop_count"]] = np.log1p(np.maximum(counts, 1.0))
        decayed = np.log1p(self.stats.decayed(rows, request.ts))
        x[:, col["pop_short"]], x[:, col["pop_long"]] = decayed[:, 0], decayed[:, 1]
        x[:, col["age"]] = self.stats.ages_days(rows, request.ts)
        h = math.log1p(len(request.history))
        x[:, col["hist_cos_max"]] = h * x[:, col["cos_max"]]
        x[:, col["hist_cooc"]] = h * x[:, col["cooc_recent"]]
        x[:, col["hist_pop"]] = h * x[:, col["pop_long"]]
        x[:, col["tail_cos_max"]] = np.where(counts <= 1, x[:, col["cos_max"]], 0.0)
        if pool is not None:
            position = {item: j for j, item in enumerate(ids)}
            for source in ("profile", "interests", "cooc", "popular"):
                column = x[:, col[f"rr_{source}"]]
                for item, rr in pool.sources[source].items():
                    if (j := position.get(item)) is not None:
                        column[j] = rr
        return x

    def weights(self) -> dict[str, float]:
        w = self.prior if self.model.weights is None else self.model.weights
        return dict(zip(FEATURES, w.tolist(), strict=True))

    def score(self, x: np.ndarray) -> np.ndarray:
        return x @ self.prior if self.model.weights is None else self.model.score(x)

    def rank(self, requests: Sequence[Request], content: ContentSource, k: int) -> list[Hits]:
        """Top k (item_id, score) per request, best first, ties by item_id."""
        c = self.config
        pools = self.candidates(requests, content)
        wanted = {i for p in pools for i in p.ids} | {i for r in requests for i in r.history[-c.interests :]}
        vectors = VectorTable(content.vectors(wanted) if wanted else {})
        out: list[Hits] = []
        for request, pool in zip(requests, pools, strict=True):
            if not pool.ids:
                out.append([])
                continue
            x = self.features(request, pool.ids, vectors, pool)
            scores = self.score(x)
            order = np.argsort(-scores, kind="stable")  # pool.ids is sorted: ties by item_id
            tail = x[:, COLUMN["pop_count"]] <= math.log1p(1.0)
            head = self._with_tail(order, x[:, COLUMN["cos_mean"]], tail, min(k, c.tail_within))
            taken = set(head)
            top = head + [j for j in order.tolist() if j not in taken][: k - len(head)]
            out.append([(pool.ids[j], float(scores[j])) for j in top])
        return out

    def _with_tail(self, order: np.ndarray, content: np.ndarray, tail: np.ndarray, k: int) -> list[int]:
        """The first k of `order`, with up to `tail_slots` of its last known items giving way
        to the tail items (at most one interaction) with the highest `content` score, when too
        few made the top k on their own. Why: a learnt blend rightly ranks by the evidence most
        targets have, which on a stream of mostly known items buries every new one; a feed of
        fresh content must show some, and for items without collaborative evidence the
        content similarity is what there is (docs/quality.md)."""
        top = order[:k].tolist()
        want = min(self.config.tail_slots, k) - int(tail[order[:k]].sum())
        if want <= 0:
            return top
        chosen = set(top)
        by_content = np.argsort(-content, kind="stable")  # only when a slot is to fill: a hot path
        extra = [j for j in by_content.tolist() if tail[j] and j not in chosen][:want]
        if not extra:
            return top
        warm = [j for j in top if not tail[j]]
        dropped = set(warm[len(warm) - len(extra) :])
        return [j for j in top if j not in dropped] + extra
