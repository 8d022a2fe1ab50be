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
from collections.abc import Collection, Mapping, Sequence
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
    holdout_share: float = 0.1  # newest groups held back from a refit to judge it (`BlendRanker.install`)
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

    def intern(self, items: Sequence[str]) -> np.ndarray:
        """Catalogue row of each item, adding the unknown ones: the ranker works on rows, so
        that a user's candidates cost numpy operations rather than a lookup per candidate."""
        found = list(map(self.index.get, items))
        if None in found:
            found = [self._intern(item) if n is None else n for item, n in zip(items, found, strict=True)]
        return np.array(found, dtype=np.int64)

    def rows(self, items: Sequence[str]) -> np.ndarray:
        """Internal index of each item (-1: never seen), for `counts`, `decayed`, `ages`."""
        index = self.index
        return np.fromiter((index.get(i, -1) for i in items), dtype=np.int64, count=len(items))

    def counts(self, rows: np.ndarray) -> np.ndarray:
        return np.where(rows >= 0, self._counts[np.maximum(rows, 0)], 0.0)

    def _now(self, ts: float) -> np.ndarray:
        """Decayed counts at `ts` of every item known when the memo was made, floored (see the
        module docstring). Shared between callers: read-only."""

        def make() -> np.ndarray:
            size = len(self.ids)
            if self._origin is None:
                return np.zeros((size, 2))
            # never read before the origin: a late event's moment (any timestamp the contract
            # accepts) would scale the counts up by 2^(days / half-life), past float range
            at = max(ts, self._origin)
            out = self._decayed[:size] * np.exp2(-(at - self._origin) / self.half_lives)
            out[out < POP_FLOOR] = 0.0
            return out

        return self._remember("now", ts, make)

    def decayed(self, rows: np.ndarray, ts: float) -> np.ndarray:
        """(len(rows), 2): decayed counts at `ts` (short, long half-life), floored. Rows
        interned since the memo was made have no interactions: 0."""
        now = self._now(ts)
        known = (rows >= 0) & (rows < len(now))
        if not len(now):
            return np.zeros((len(rows), 2))
        return np.where(known[:, None], now[np.where(known, rows, 0)], 0.0)

    def ages_days(self, rows: np.ndarray, ts: float) -> np.ndarray:
        """log1p(days since the declared creation), 0 where none was declared."""
        created = np.where(rows >= 0, self._created[np.maximum(rows, 0)], np.nan)
        return np.where(np.isnan(created), 0.0, np.log1p(np.maximum(0.0, ts - created) / 86400.0))

    def popular(self, k: int, ts: float, exclude: Collection[str]) -> list[str]:
        """Top k by the long-half-life decayed count (above the floor), ties by item_id."""
        rows = self.rows(list(exclude))
        skipped = np.zeros(len(self.ids), dtype=bool)
        skipped[rows[rows >= 0]] = True
        return [self.ids[n] for n in self.popular_rows(k, ts, skipped).tolist()]

    def popular_rows(self, k: int, ts: float, skipped: np.ndarray) -> np.ndarray:
        """`popular` as rows, `skipped[row]` marking the excluded (a catalogue-sized mask)."""
        depth = 1024
        while True:
            ranked = self._popular_ranking(ts, depth)
            kept = ranked[~skipped[ranked]]
            if len(kept) >= k or len(ranked) < depth:
                return kept[:k]
            depth *= 4  # a user who has seen most of the popular items: look deeper

    def _popular_ranking(self, ts: float, depth: int) -> np.ndarray:
        """The `depth` most popular items at `ts`, best first (shared by a round's users)."""

        def make() -> np.ndarray:
            scores = self._now(ts)[:, 1]
            positive = np.flatnonzero(scores > 0)
            return positive[best(scores[positive], positive, self.ids, depth)]

        return self._remember(f"popular {depth}", ts, make)

    def fresh_rows(self, ts: float, window_s: float) -> np.ndarray:
        """Rows of the declared items created in (ts - window_s, ts], in declaration order
        (shared by a round's users)."""

        def make() -> np.ndarray:
            index = self.index
            return np.array([index[i] for created, i in self._fresh if ts - window_s < created <= ts], dtype=np.int64)

        return self._remember(f"fresh {window_s}", ts, make)


class VectorRows:
    """Item vectors of a round as one matrix indexed by catalogue row (`ItemStats` rows): a
    round's users gather their candidates' vectors with one numpy indexing each."""

    def __init__(self, stats: ItemStats, vectors: Mapping[str, np.ndarray]) -> None:
        """`vectors`: the items that have one (their rows are interned)."""
        rows = stats.intern(list(vectors))
        self.dim = next((len(v) for v in vectors.values()), 0)
        self.position = np.full(len(stats.ids), len(rows), dtype=np.int64)  # default: the zero row
        self.position[rows] = np.arange(len(rows))
        self.matrix = np.zeros((len(rows) + 1, self.dim), dtype=np.float32)
        if len(rows):
            self.matrix[: len(rows)] = np.stack([np.asarray(v, dtype=np.float32) for v in vectors.values()])

    @classmethod
    def fetch(cls, stats: ItemStats, rows: np.ndarray, content: ContentSource) -> VectorRows:
        names = stats.ids
        return cls(stats, content.vectors([names[n] for n in rows.tolist()]) if len(rows) else {})

    def has(self, rows: np.ndarray) -> np.ndarray:
        return self.position[rows] < len(self.matrix) - 1

    def take(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), dim), zeros for rows without a vector."""
        return self.matrix[self.position[rows]]


@dataclass
class Group:
    """One training group: features of the positive (row 0) and of its negatives."""

    x: np.ndarray


@dataclass
class Refit:
    """A candidate model (`BlendRanker.train`): its weights (None: no finite fit), the newest
    groups, held back from its training to judge it, and the weights adopted if it passes
    (the same procedure on every group)."""

    weights: np.ndarray | None
    held: list[Group]
    adopted: np.ndarray | None


def _pairs_won(x: np.ndarray, weights: np.ndarray) -> float:
    """Share of a group's negatives that `weights` score below its positive (ties: half);
    a non-finite score wins nothing."""
    scores = x @ weights
    if len(scores) < 2 or not np.isfinite(scores).all():
        return 0.0
    return float(np.mean((scores[0] > scores[1:]) + 0.5 * (scores[0] == scores[1:])))


class PairwiseLogistic:
    """Linear scorer trained with the pairwise logistic loss on (positive - negative)
    differences, standardised, L2-regularised, by Newton's method (a handful of features)."""

    def __init__(self, n_features: int, l2: float) -> None:
        self.l2 = l2
        self.weights: np.ndarray | None = None  # in raw feature units
        self.n_features = n_features

    def fit(self, groups: Sequence[Group]) -> None:
        self.weights = self.fitted(groups)

    def fitted(self, groups: Sequence[Group]) -> np.ndarray | None:
        """Weights fitted to `groups`, without touching the current ones; None when no finite
        weights come out (no usable group, or a numerical failure)."""
        usable = [g.x for g in groups if len(g.x) > 1 and np.isfinite(g.x).all()]
        if not usable:
            return None
        diffs = np.concatenate([x[:1] - x[1:] for x in usable]).astype(np.float64)
        scale = diffs.std(axis=0)
        scale[~(scale >= 1e-9)] = 1.0
        z = diffs / scale
        w = np.zeros(z.shape[1])
        try:
            for _ in range(25):
                margin = z @ w
                p = 1.0 / (1.0 + np.exp(np.clip(margin, -30, 30)))  # d loss / d margin = -p
                grad = -(z.T @ p) / len(z) + self.l2 * w / len(z)
                hess = (z.T * (p * (1 - p))) @ z / len(z) + self.l2 * np.eye(len(w)) / len(z)
                step = np.linalg.solve(hess, grad)
                w -= step
                if np.abs(step).max() < 1e-6:
                    break
        except np.linalg.LinAlgError:
            return None
        weights = w / scale
        return weights if np.isfinite(weights).all() else None

    def score(self, x: np.ndarray) -> np.ndarray:
        assert self.weights is not None
        return x @ self.weights


def _rr(rank: int) -> float:
    return 1.0 / math.log2(1.0 + rank)


_RR = np.array([_rr(rank) for rank in range(1, 1025)])


def _reciprocal_ranks(n: int) -> np.ndarray:
    """1 / log2(1 + rank) for the ranks 1..n."""
    return _RR[:n] if n <= len(_RR) else np.array([_rr(rank) for rank in range(1, n + 1)])


@dataclass
class Candidates:
    """One request's candidates as catalogue rows (ascending, distinct), with each source's
    1 / log2(1 + the candidate's best 1-based rank there) aligned with them (0: not offered)."""

    rows: np.ndarray
    rr: dict[str, np.ndarray]
    names: list[str]  # the catalogue's item ids by row (shared, read-only)
    #: catalogue rows and co-occurrence scores of the request's recent items (sparse)
    cooc: tuple[np.ndarray, np.ndarray] = field(default_factory=lambda: (np.zeros(0, np.int64), np.zeros(0)))

    @classmethod
    def of(cls, offers: Mapping[str, Sequence[np.ndarray]], names: list[str], cooc: tuple[np.ndarray, np.ndarray]) -> Candidates:
        """`offers`: per source, ranked row lists (best first); an item keeps its best rank."""
        lists = [ranked for source in SOURCES for ranked in offers.get(source, ())]
        rows = np.unique(np.concatenate(lists)) if lists else np.zeros(0, np.int64)
        rr = {}
        for source in SOURCES:
            column = np.zeros(len(rows))
            for ranked in offers.get(source, ()):
                if len(ranked):
                    np.maximum.at(column, np.searchsorted(rows, ranked), _reciprocal_ranks(len(ranked)))
            rr[source] = column
        return cls(rows, rr, names, cooc)

    def __contains__(self, row: object) -> bool:
        at = int(np.searchsorted(self.rows, row))
        return at < len(self.rows) and self.rows[at] == row

    @property
    def ids(self) -> list[str]:
        """The candidates' item ids, sorted."""
        return sorted(self.names[n] for n in self.rows.tolist())

    @property
    def sources(self) -> dict[str, dict[str, float]]:
        """source -> {item it offered: its reciprocal rank there}."""
        rows = self.rows.tolist()
        return {
            source: {self.names[n]: rr for n, rr in zip(rows, column.tolist(), strict=True) if rr > 0}
            for source, column in self.rr.items()
        }

    def rr_of(self, source: str, rows: np.ndarray) -> np.ndarray:
        """The source's reciprocal ranks of `rows` (0 for rows that are not candidates)."""
        if not len(self.rows):
            return np.zeros(len(rows))
        at = np.minimum(np.searchsorted(self.rows, rows), len(self.rows) - 1)
        return np.where(self.rows[at] == rows, self.rr[source][at], 0.0)


def best(scores: np.ndarray, rows: np.ndarray, names: Sequence[str], n: int) -> list[int]:
    """Positions of the n highest `scores`, best first, ties by item id (`names[rows[j]]`):
    only the scores at or above the n-th are sorted in Python (a ranker calls it per user)."""
    n = min(n, len(scores))
    if n <= 0:
        return []
    cut = np.partition(scores, len(scores) - n)[len(scores) - n]
    keep = np.flatnonzero(scores >= cut)
    ranked = sorted(zip((-scores[keep]).tolist(), [names[r] for r in rows[keep].tolist()], keep.tolist(), strict=True))
    return [j for _, _, j in ranked[:n]]


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
        self.rejected: dict[str, int] = {}  # refits not adopted, by reason (`install`)
        self.refused_groups = 0  # training groups dropped for non-finite features
        self._rng = np.random.default_rng(config.seed)  # negatives
        self._draw = np.random.default_rng([config.seed, 1])  # which interactions train
        self._cooc_map = np.zeros(0, np.int64)  # co-occurrence index -> catalogue row
        self._cooc_generation = -1
        self._scratch = np.zeros(0)  # see `_features`

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

    def learn(self, requests: Sequence[Request], items: Sequence[str], content: ContentSource, refit: bool = True) -> None:
        """Training groups for interactions about to be recorded: `requests[n]` is the user's
        state just before taking `items[n]`. Call before `record`-ing them. `refit` False: the
        caller refits itself (`refit_due`, `train`, `install`), off the ranking thread."""
        pools = self.candidates(requests, content)
        names = self.stats.ids
        chosen: list[tuple[Request, np.ndarray, Candidates]] = []
        for request, item, pool in zip(requests, items, pools, strict=True):
            row = self.stats.index.get(item)
            if row is None or row not in pool:
                continue  # nothing to learn about ordering the candidates
            negatives = sorted((n for n in pool.rows.tolist() if n != row), key=names.__getitem__)
            if not negatives:
                continue
            take = min(self.config.negatives, len(negatives))
            picked = self._rng.choice(len(negatives), size=take, replace=False)
            chosen.append((request, np.array([row] + [negatives[j] for j in sorted(picked.tolist())]), pool))
        if chosen:
            wanted = [rows for _, rows, _ in chosen] + [self._recent_rows(r) for r, _, _ in chosen]
            vectors = VectorRows.fetch(self.stats, np.unique(np.concatenate(wanted)), content)
            for request, rows, pool in chosen:
                x = self._features(request, rows, vectors, pool).astype(np.float32)
                if not np.isfinite(x).all():  # never let one odd moment into the model
                    self.refused_groups += 1
                    continue
                self.groups.append(Group(x))
                self.new_groups += 1
        if refit:
            self.maybe_refit()

    def maybe_refit(self) -> bool:
        """Refit now if one is due (the offline evaluator's path; the stream processor fits
        beside its hot path with the same three steps, holding the ranker only to snapshot and
        to install)."""
        groups = self.refit_due()
        return groups is not None and self.install(self.train(groups))

    def refit_due(self) -> list[Group] | None:
        """The training groups to fit on, when enough of them are new (a snapshot: the
        buffer may move on while the fit runs)."""
        c = self.config
        due = min(c.refit_every, max(1, int(c.refit_share * len(self.groups))))
        if len(self.groups) >= c.min_groups and (self.fits == 0 or self.new_groups >= due):
            self.new_groups = 0
            return list(self.groups)
        return None

    def train(self, groups: Sequence[Group]) -> Refit:
        """A candidate model: fitted on all but the newest `holdout_share` of `groups`, which
        are kept to judge it against the current one (`install`), and the same procedure
        fitted on all of them, which is what is adopted if the candidate passes (leaving the
        newest groups out of the model in use would cost accuracy: ml100k HR@10 0.169 ->
        0.165). Touches no ranker state, so it may run on another thread."""
        held = max(1, int(self.config.holdout_share * len(groups)))
        candidate = self.model.fitted(groups[:-held])
        return Refit(candidate, list(groups[-held:]), self.model.fitted(groups) if candidate is not None else None)

    def install(self, refit: Refit) -> bool:
        """Adopt the candidate unless its weights are not finite or it orders the held-back
        groups significantly worse than the model in use (or, before the first fit, than the
        prior): one bad batch of training data must not reach every user's ranking. A
        rejected refit is counted in `rejected` with its reason; the current model stays."""
        if refit.weights is None or refit.adopted is None or not np.isfinite([refit.weights, refit.adopted]).all():
            return self._reject("non-finite weights")
        current = self.prior if self.model.weights is None else self.model.weights
        gain = np.array([_pairs_won(g.x, refit.weights) - _pairs_won(g.x, current) for g in refit.held])
        if len(gain) and gain.mean() < -2.0 * gain.std() / math.sqrt(len(gain)):
            return self._reject("worse on held-back groups")
        self.model.weights = refit.adopted
        self.fits += 1
        return True

    def _reject(self, reason: str) -> bool:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        return False

    # --- ranking --------------------------------------------------------------------------
    def candidates(self, requests: Sequence[Request], content: ContentSource) -> list[Candidates]:
        """Union of the sources per request, de-duplicated, seen items dropped. One content
        search for all requests' profile vectors; the neighbour lists are turned into rows once
        per call, popular and fresh items once per moment (`ts`), shared by the requests.
        Candidates are catalogue rows (`ItemStats.intern`), so that a request costs numpy
        operations rather than a lookup per candidate."""
        c, stats = self.config, self.stats
        excluded_ids = [r.excluded() for r in requests]
        excluded = [np.unique(stats.intern(list(e))) for e in excluded_ids]
        profiled = [n for n, r in enumerate(requests) if r.profile is not None]
        hits = (
            content.search(
                np.stack([np.asarray(requests[n].profile, dtype=np.float32) for n in profiled]),
                c.content_k,
                [excluded_ids[n] for n in profiled],
            )
            if profiled
            else []
        )
        offers: list[dict[str, list[np.ndarray]]] = [{} for _ in requests]
        for n, row in zip(profiled, hits, strict=True):
            offers[n]["profile"] = [stats.intern([item for item, _ in row])]
        recent = {i for r in requests for i in r.history[-c.interests :]}
        neighbours = content.neighbours(recent, c.neighbour_depth) if recent and c.interests else {}
        near = {item: stats.intern([i for i, _ in hits]) for item, hits in neighbours.items() if hits}
        self._cooc_rows()  # interns what co-occurs, before the mask is sized
        skipped = np.zeros(len(stats.ids), dtype=bool)  # the request's excluded rows, set in turn
        ranked_fresh: list[tuple[int, np.ndarray]] = []  # (request, its fresh rows) to rank by closeness
        coocs = []
        for n, request in enumerate(requests):
            offer, skip = offers[n], excluded[n]
            skipped[skip] = True
            offer["interests"] = [
                rows[~skipped[rows]][: c.content_k]
                for item in reversed(request.history[-c.interests :])  # the latest first
                if (rows := near.get(item)) is not None
            ]
            found, scores = self._cooc(request)
            coocs.append((found, scores))
            keep = (scores > 0) & ~skipped[found]
            offer["cooc"] = [found[keep][best(scores[keep], found[keep], stats.ids, c.cooc_k)]]
            offer["popular"] = [stats.popular_rows(c.popular_k, request.ts, skipped)]
            fresh = stats.fresh_rows(request.ts, c.fresh_window_s)
            fresh = fresh[~skipped[fresh]]
            if c.fresh_k > 0 and len(fresh) and (request.profile is None or len(fresh) <= c.fresh_k):
                offer["fresh"] = [fresh[-c.fresh_k :]]
            elif c.fresh_k > 0 and len(fresh):
                ranked_fresh.append((n, fresh))
            skipped[skip] = False
        if ranked_fresh:  # the nearest fresh items to each profile, from one gather of vectors
            vectors = VectorRows.fetch(stats, np.unique(np.concatenate([f for _, f in ranked_fresh])), content)
            for n, fresh in ranked_fresh:
                fresh = fresh[vectors.has(fresh)]
                # einsum: a row's dot product does not depend on its place in the matrix, so
                # items with identical vectors tie exactly and the tie goes by item id
                closeness = np.einsum("ij,j->i", vectors.matrix, np.asarray(requests[n].profile, dtype=np.float32))
                closeness = closeness[vectors.position[fresh]].astype(np.float64)
                offers[n]["fresh"] = [fresh[best(closeness, fresh, stats.ids, c.fresh_k)]]
        return [Candidates.of(offer, stats.ids, cooc) for offer, cooc in zip(offers, coocs, strict=True)]

    def _recent_rows(self, request: Request) -> np.ndarray:
        return self.stats.intern(list(request.history[-self.config.interests :]))

    def _cooc(self, request: Request) -> tuple[np.ndarray, np.ndarray]:
        """Catalogue rows and co-occurrence scores of the request's recent items."""
        found, scores = self.cooc.sparse(request.history[-self.config.interests :])
        return self._cooc_rows()[found], scores

    def _cooc_rows(self) -> np.ndarray:
        """Catalogue row of each co-occurrence index (extended as it grows, rebuilt when it
        forgets items)."""
        cooc = self.cooc
        if self._cooc_generation != cooc.generation:
            self._cooc_map, self._cooc_generation = np.zeros(0, np.int64), cooc.generation
        if len(self._cooc_map) < len(cooc.ids):
            self._cooc_map = np.concatenate([self._cooc_map, self.stats.intern(cooc.ids[len(self._cooc_map) :])])
        return self._cooc_map

    def features(
        self,
        request: Request,
        ids: Sequence[str],
        vectors: Mapping[str, np.ndarray],
        pool: Candidates | None = None,
    ) -> np.ndarray:
        """(len(ids), len(FEATURES)) for one user at one moment; `pool`: the candidates the
        sources offered for this request (their ranks there are features)."""
        rows = self.stats.intern(list(ids))
        self._recent_rows(request)  # interned before the vectors' index is sized
        return self._features(request, rows, VectorRows(self.stats, vectors), pool)

    def _features(self, request: Request, rows: np.ndarray, vectors: VectorRows, pool: Candidates | None) -> np.ndarray:
        stats = self.stats
        x = np.zeros((len(rows), len(FEATURES)))
        col = COLUMN
        if vectors.dim:
            matrix = vectors.take(rows)
            if request.profile is not None:
                x[:, col["cos_mean"]] = matrix @ np.asarray(request.profile, dtype=np.float32)
            recent = self._recent_rows(request)
            recent = recent[vectors.has(recent)]
            if len(recent):
                sims = matrix @ vectors.take(recent).T
                x[:, col["cos_max"]] = sims.max(axis=1)
                if recent[-1] == stats.index[request.history[-1]]:
                    x[:, col["cos_last"]] = sims[:, -1]
        cooc_rows, cooc_scores = pool.cooc if pool is not None else self._cooc(request)
        if len(cooc_rows):  # scattered into a catalogue-sized array kept at zero between users
            if len(self._scratch) < len(stats.ids):
                self._scratch = np.zeros(2 * len(stats.ids))
            self._scratch[cooc_rows] = cooc_scores
            x[:, col["cooc_recent"]] = self._scratch[rows]
            self._scratch[cooc_rows] = 0.0
        top = x[:, col["cooc_recent"]].max(initial=0.0)
        if top > 0:
            x[:, col["cooc_rel"]] = x[:, col["cooc_recent"]] / top
        counts = stats.counts(rows)
        x[:, col["pop_count"]] = np.log1p(np.maximum(counts, 1.0))
        decayed = np.log1p(stats.decayed(rows, request.ts))
        x[:, col["pop_short"]], x[:, col["pop_long"]] = decayed[:, 0], decayed[:, 1]
        x[:, col["age"]] = stats.ages_days(rows, request.ts)
        h = math.log1p(len(request.history))
        x[:, col["hist_cos_max"]] = h * x[:, col["cos_max"]]
        x[:, col["hist_cooc"]] = h * x[:, col["cooc_recent"]]
        x[:, col["hist_pop"]] = h * x[:, col["pop_long"]]
        x[:, col["tail_cos_max"]] = np.where(counts <= 1, x[:, col["cos_max"]], 0.0)
        if pool is not None:
            same = rows is pool.rows
            for source in ("profile", "interests", "cooc", "popular"):
                x[:, col[f"rr_{source}"]] = pool.rr[source] if same else pool.rr_of(source, rows)
        return x

    def weights(self) -> dict[str, float]:
        w = self.prior if self.model.weights is None else self.model.weights
        return dict(zip(FEATURES, w.tolist(), strict=True))

    def score(self, x: np.ndarray) -> np.ndarray:
        return x @ self.prior if self.model.weights is None else self.model.score(x)

    def rank(self, requests: Sequence[Request], content: ContentSource, k: int) -> list[Hits]:
        """Top k (item_id, score) per request, best first, ties by item_id."""
        c, names = self.config, self.stats.ids
        pools = self.candidates(requests, content)
        wanted = [p.rows for p in pools] + [self._recent_rows(r) for r in requests]
        vectors = VectorRows.fetch(self.stats, np.unique(np.concatenate(wanted)) if wanted else np.zeros(0, np.int64), content)
        out: list[Hits] = []
        for request, pool in zip(requests, pools, strict=True):
            if not len(pool.rows):
                out.append([])
                continue
            x = self._features(request, pool.rows, vectors, pool)
            scores = self.score(x)
            order = best(scores, pool.rows, names, k + c.tail_slots)
            tail = x[:, COLUMN["pop_count"]] <= math.log1p(1.0)
            head = self._with_tail(order, x[:, COLUMN["cos_mean"]], tail, pool.rows, min(k, c.tail_within))
            taken = set(head)
            top = head + [j for j in order if j not in taken][: k - len(head)]
            out.append([(names[pool.rows[j]], float(scores[j])) for j in top])
        return out

    def _with_tail(self, order: list[int], content: np.ndarray, tail: np.ndarray, rows: np.ndarray, k: int) -> list[int]:
        """The first k of `order`, with up to `tail_slots` of its last known items giving way
        to the tail items (at most one interaction) with the highest `content` score, when too
        few made the top k on their own. Why: a learnt blend rightly ranks by the evidence most
        targets have, which on a stream of mostly known items buries every new one; a feed of
        fresh content must show some, and for items without collaborative evidence the
        content similarity is what there is (docs/quality.md)."""
        top = order[:k]
        want = min(self.config.tail_slots, k) - int(tail[top].sum())
        if want <= 0:
            return top
        open_ = tail.copy()
        open_[top] = False
        spare = np.flatnonzero(open_)
        extra = spare[best(content[spare], rows[spare], self.stats.ids, want)].tolist()
        if not extra:
            return top
        warm = [j for j in top if not tail[j]]
        dropped = set(warm[len(warm) - len(extra) :])
        return [j for j in top if j not in dropped] + extra
