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
  `fresh_window_s`, nearest to the profile first;
- what users took right after the user's last items (`streams.sequence.Transitions`), when
  `sequence_steps` is above 0 (off by default: docs/quality.md).

Features of a (user, candidate) pair (`FEATURES`): the content cosines (to the mean profile,
the best of the last items, the last item), co-occurrence with the last items (raw and relative
to the best candidate), popularity (all-time count, decayed counts at two half-lives), the
item's age since its declared creation, the user's history length crossed with the main
signals (how much to trust content vs. collaborative evidence depends on it), the content
cosine of items seen at most once (content is all the evidence they have), the share of the
last items' transitions that went to the candidate, and each source's normalised score:
1 / log2(1 + the candidate's rank there).

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
neither is a feature: counts are floored at 1 (a fresh item looks like any item seen once),
decayed counts below `POP_FLOOR` read as 0, and so do the decayed counts of an item with at
most one interaction. Without that last rule an item touched once in the last days had a
decayed count and a never-touched one had none: on a stream with no signal at all, published
at first interaction and spanning two days, `default` scored HR@10 0.07-0.09 where chance is
0.007 (`tests/test_evaluate.py`, the no-signal test).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Callable, Protocol, TypeVar

import numpy as np

from streams.cooccur import CoOccurrence
from streams.fresh_slots import LOCATED, ContentPicks, PlaceOdds, SlotOdds, TailShare, keep_in, places
from streams.sequence import Transitions
from vectorstore.base import matrix_of
from vectorstore.order import IdOrder

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
    "seq_recent",  # share of the last items' transitions that went to it (`streams.sequence`)
    "rr_sequence",  # 1 / log2(1 + rank) in the sequence source
)
SOURCES = ("profile", "interests", "cooc", "popular", "fresh", "sequence")
#: the sources whose ranks are features (`rr_*`); fresh items are ranked by closeness alone
RANKED_SOURCES = ("profile", "interests", "cooc", "popular", "sequence")
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

    def matrix(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """`vectors` for a round's thousands of ids (`vectorstore.VectorStore.get_matrix`):
        (matrix, at), `matrix[at[j]]` the unit vector of `ids[j]`, `at[j]` -1 where it has
        none; read-only."""

    def neighbours(self, items: Collection[str], depth: int) -> Mapping[str, Hits]:
        """The `depth` nearest items of each item that has a vector (itself included), best
        first. Unlike a profile, an item's neighbours hardly change, so the stream processor
        caches them: one search per item now and then, not per user and interaction."""


class NeighbourList(list[tuple[str, float]]):
    """A neighbour list a content source keeps and hands back as the same object while it is
    current: the ranker remembers its catalogue rows on it (`rows`: (the ranker's `ItemStats`,
    the rows)), so that they live and die with the list."""

    __slots__ = ("rows",)

    def __init__(self, hits: Hits) -> None:
        super().__init__(hits)
        self.rows: tuple[ItemStats, np.ndarray] | None = None


#: how a list makes room for tail items (`RankConfig.tail_rule`)
TAIL_RULES = ("fixed", "earned", "calibrated")
#: the tail rules whose odds are learnt from the training examples (`BlendRanker._observe_places`)
LEARNT_TAIL_RULES = ("earned", "calibrated")


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
    tail_slots: int = 1  # of the first `tail_within` places, at least this many kept for items with at most one interaction (by cosine to the profile)
    tail_within: int = 10
    #: "earned": the first `tail_within` places merged from the blend's ranking and the content
    #: ranking of tail items by odds learnt from the stream (`streams.fresh_slots.SlotOdds`);
    #: "calibrated": the first `tail_within` places to the candidates whose place in the blend's
    #: ranking, kind and (tail items) place in content's ranking of the tail have been likeliest
    #: to be taken on the stream (`streams.fresh_slots.PlaceOdds`); either with at least
    #: `tail_slots` tail items; "fixed": the `tail_slots` above, whatever the stream
    #: (docs/quality.md measures them)
    tail_rule: str = "earned"
    #: under a learnt `tail_rule`, the first `tail_within` places also keep as many of content's
    #: own tail picks (the tail items among the first `tail_within` of the content ranking of all
    #: candidates: what the content-only method shows) as the stream says a list needs to find at
    #: least the new items (nobody had touched them) that content alone finds
    #: (`streams.fresh_slots.ContentPicks`); False: none
    content_picks: bool = True
    sequence_k: int = 50  # candidates from what users took right after the user's last items
    #: earlier items a new interaction is a transition from (`streams.sequence`); 0: no sequence
    #: signal, the default: with 3 it measured within the intervals of the blend without it on
    #: ml100k and hm (docs/quality.md)
    sequence_steps: int = 0
    sequence_half_life_s: float = 7 * 86400.0  # how fast transitions fade
    #: of the first `tail_within` places of a list that a fresh item's fan-out made due, how many
    #: go to the items it was fanned out for (`Request.place`, the newest first) when the blend
    #: ranked them lower: a new item reaches the users nearest it at once, which is what the
    #: fan-out is for, instead of waiting for a list whose blend puts it first (p99 7-8 s at
    #: 100-1,000/s, docs/streaming.md). 0: a fan-out's list is ranked like any other
    fanout_places: int = 1

    def __post_init__(self) -> None:
        if self.tail_rule not in TAIL_RULES:
            raise ValueError(f"tail_rule must be one of {', '.join(TAIL_RULES)}, not {self.tail_rule!r}")

    def sample_rate(self, fitted: bool) -> float:
        """The share of interactions that become training groups: `warmup_rate` until the
        first fit (a fresh ranker learns as soon as it can), then `train_rate`."""
        return self.train_rate if fitted else self.warmup_rate

    def lookback(self) -> int:
        """How many of a user's last items the ranker's `record` reads (co-occurrence and
        transitions)."""
        return max(self.cooc_window, self.sequence_steps, 1)


@dataclass
class Request:
    """One user at one moment: `history` holds the user's distinct items ordered by their
    latest interaction, oldest first; `profile` the unit semantic profile (None: no signal)."""

    history: Sequence[str]
    profile: np.ndarray | None
    ts: float
    exclude: Collection[str] = ()  # beside the history
    #: fresh items whose fan-out chose this user as one of their nearest (oldest first): offered
    #: as candidates and held in the first `tail_within` places (`RankConfig.fanout_places`)
    place: Sequence[str] = ()

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
        try:  # all known, the common case: no list in between (a round interns 100,000 ids)
            return np.fromiter(map(self.index.__getitem__, items), dtype=np.int64, count=len(items))
        except KeyError:
            return np.array([self._intern(item) for item in items], dtype=np.int64)

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
            out[self._counts[:size] <= 1] = 0.0  # a touch or none: the same (module docstring)
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
    """Item vectors of a round by catalogue row (`ItemStats` rows): a round's users gather
    their candidates' vectors with one numpy indexing each, from the content source's own
    matrix where it has one (`ContentSource.matrix`: the replica's, not a copy)."""

    def __init__(self, stats: ItemStats, rows: np.ndarray, matrix: np.ndarray, at: np.ndarray) -> None:
        """`matrix[at[j]]`: the vector of catalogue row `rows[j]` (`at[j]` -1: none)."""
        self.dim = matrix.shape[1] if (at >= 0).any() else 0
        self.position = np.full(len(stats.ids), -1, dtype=np.int64)
        self.position[rows] = at
        self.matrix = matrix

    @classmethod
    def of(cls, stats: ItemStats, vectors: Mapping[str, np.ndarray]) -> VectorRows:
        """`vectors`: the items that have one (their rows are interned)."""
        ids = list(vectors)
        return cls(stats, stats.intern(ids), *matrix_of(ids, vectors))

    @classmethod
    def fetch(cls, stats: ItemStats, rows: np.ndarray, content: ContentSource) -> VectorRows:
        """The vectors of catalogue `rows`, read as one matrix (`ContentSource.matrix`)."""
        names = stats.ids
        if not len(rows):
            return cls(stats, rows, np.zeros((0, 0), np.float32), rows)
        return cls(stats, rows, *content.matrix([names[n] for n in rows.tolist()]))

    def has(self, rows: np.ndarray) -> np.ndarray:
        return self.position[rows] >= 0

    def take(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), dim), zeros for rows without a vector."""
        at = self.position[rows]
        missing = at < 0
        if not missing.any():
            return self.matrix[at]
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        out[~missing] = self.matrix[at[~missing]]
        return out


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


#: rows of the differences a fit's Newton step works on at once (`PairwiseLogistic.fitted`)
FIT_ROWS = 16_384


def _differences(xs: Sequence[np.ndarray]) -> np.ndarray:
    """(positive - negative) rows of every group, in one float64 array filled in place: a
    full buffer is 250,000 rows, and the lists of differences, their concatenation, its
    scaled copy and the Hessian's weighted copy each took that again (the ranking process's
    memory rose ~80 MB at every refit, docs/hardening.md)."""
    out = np.empty((sum(len(x) - 1 for x in xs), xs[0].shape[1]))
    at = 0
    for x in xs:
        np.subtract(x[:1], x[1:], out=out[at : at + len(x) - 1])
        at += len(x) - 1
    return out


def _chunks(z: np.ndarray) -> Iterator[np.ndarray]:
    return (z[start : start + FIT_ROWS] for start in range(0, len(z), FIT_ROWS))


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
        z = _differences(usable)
        mean = z.mean(axis=0)
        scale = np.sqrt(sum(((part - mean) ** 2).sum(axis=0) for part in _chunks(z)) / len(z))  # z.std(axis=0), a chunk at a time
        scale[~(scale >= 1e-9)] = 1.0
        z /= scale
        w = np.zeros(z.shape[1])
        try:
            for _ in range(25):
                grad, hess = np.zeros(len(w)), np.zeros((len(w), len(w)))
                for part in _chunks(z):
                    p = 1.0 / (1.0 + np.exp(np.clip(part @ w, -30, 30)))  # d loss / d margin = -p
                    grad -= part.T @ p
                    hess += (part.T * (p * (1 - p))) @ part
                grad = grad / len(z) + self.l2 * w / len(z)
                hess = hess / len(z) + self.l2 * np.eye(len(w)) / len(z)
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
    #: catalogue rows and transition scores from the request's last items (sparse)
    seq: tuple[np.ndarray, np.ndarray] = field(default_factory=lambda: (np.zeros(0, np.int64), np.zeros(0)))

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


#: per request n, catalogue rows and scores at [starts[n], starts[n + 1]): (starts, rows, scores)
Sparse = tuple[np.ndarray, np.ndarray, np.ndarray]


def _no_sparse(requests: int) -> Sparse:
    return np.zeros(requests + 1, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0)


@dataclass
class Round:
    """A round's candidates, flat: request n's are `rows[starts[n]:starts[n + 1]]` (ascending,
    distinct), with the sources' reciprocal ranks aligned with `rows`, and its co-occurrence
    scores (all it co-occurs with, seen or not) at `cooc_rows[cooc_starts[n]:cooc_starts[n + 1]]`.
    Flat so that the round's features come from numpy passes over all its (request,
    candidate) pairs, not a Python loop per user."""

    starts: np.ndarray
    rows: np.ndarray
    rr: dict[str, np.ndarray]
    cooc_starts: np.ndarray
    cooc_rows: np.ndarray
    cooc_scores: np.ndarray
    names: list[str]
    #: the requests' transition scores (`streams.sequence`), flat as the co-occurrence ones
    seq: Sparse = field(default_factory=lambda: _no_sparse(0))

    @classmethod
    def of(
        cls,
        requests: int,
        size: int,
        offers: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]],
        cooc: Sparse,
        names: list[str],
        seq: Sparse | None = None,
    ) -> Round:
        """`offers`: per source, (request, row, 1-based rank in its list) triples of ranked
        lists; a request's candidate keeps its best rank per source. `size`: rows are below it."""
        parts = [(source, part) for source in SOURCES for part in offers.get(source, ())]
        owner = np.concatenate([p[0] for _, p in parts] + [np.zeros(0, np.int64)])
        keys, inverse = np.unique(owner * size + np.concatenate([p[1] for _, p in parts] + [np.zeros(0, np.int64)]), return_inverse=True)
        ranks = np.concatenate([p[2] for _, p in parts] + [np.zeros(0, np.int64)])
        reciprocal = _reciprocal_ranks(int(ranks.max(initial=0)))
        source_of = np.repeat([SOURCES.index(s) for s, _ in parts], [len(p[0]) for _, p in parts])
        rr = {}
        for n, source in enumerate(SOURCES):
            column = np.zeros(len(keys))
            offered = source_of == n
            np.maximum.at(column, inverse[offered], reciprocal[ranks[offered] - 1])
            rr[source] = column
        starts = np.searchsorted(keys // size, np.arange(requests + 1)) if size else np.zeros(requests + 1, np.int64)
        return cls(starts, keys % max(size, 1), rr, *cooc, names, _no_sparse(requests) if seq is None else seq)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, n: int) -> Candidates:
        at, to = self.starts[n], self.starts[n + 1]
        cooc = slice(self.cooc_starts[n], self.cooc_starts[n + 1])
        seq_starts, seq_rows, seq_scores = self.seq
        seq = slice(seq_starts[n], seq_starts[n + 1])
        return Candidates(
            self.rows[at:to], {s: v[at:to] for s, v in self.rr.items()}, self.names, (self.cooc_rows[cooc], self.cooc_scores[cooc]),
            (seq_rows[seq], seq_scores[seq]),
        )


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


def best_by(scores: np.ndarray, ties: np.ndarray, n: int) -> np.ndarray:
    """`best` with the item ids' order given as integers (`IdOrder`): positions of the n
    highest `scores`, best first, ties by `ties` ascending. Called per request of a round: a
    partition per request costs less than one sort of the round's (request, candidate) pairs
    (2 ms against 17 ms for 256 requests of 350 candidates)."""
    n = min(n, len(scores))
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    keep = np.flatnonzero(scores >= np.partition(scores, len(scores) - n)[len(scores) - n])
    return keep[np.lexsort((ties[keep], -scores[keep]))][:n]


def _left_out_by_content(ranked: list[int], content: np.ndarray, tail: np.ndarray, ties: np.ndarray, k: int) -> list[int]:
    """The content ranking (first k) of the tail candidates the blend left out of its first k."""
    left_out = tail.copy()
    left_out[ranked[:k]] = False
    fresh = np.flatnonzero(left_out)
    return fresh[best_by(content[fresh], ties[fresh], k)].tolist()


def _place(j: int, scores: np.ndarray, ties: np.ndarray, among: np.ndarray | None = None) -> int:
    """Candidate j's place (0-based) in the order of `scores`, ties by `ties` ascending as
    `best_by` breaks them, counting only the candidates `among` marks."""
    ahead = (scores > scores[j]) | ((scores == scores[j]) & (ties < ties[j]))
    return int((ahead if among is None else ahead & among).sum())


def _looked_up(sparse: Sparse, owner: np.ndarray, rows: np.ndarray, size: int) -> np.ndarray:
    """The score `sparse` gives each (request `owner[i]`, row `rows[i]`) pair, 0 where none;
    looked up by `request * size + row` key. `size`: rows are below it."""
    starts, found, scores = sparse
    if not len(found):
        return np.zeros(len(rows))
    keys = np.repeat(np.arange(len(starts) - 1), np.diff(starts)) * size + found
    order = np.argsort(keys)
    keys, values = keys[order], scores[order]
    wanted = owner * size + rows
    at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    return np.where(keys[at] == wanted, values[at], 0.0)


def _segment_ranks(owner: np.ndarray, requests: int) -> np.ndarray:
    """1-based place of each element within its request's run (`owner` ascending)."""
    starts = np.searchsorted(owner, np.arange(requests))
    return np.arange(1, len(owner) + 1) - starts[owner]


class Excluded:
    """What each request of a round excludes (its history and `exclude`), as sorted
    `request * size + row` keys: one numpy lookup answers for (request, row) pairs of every
    request at once."""

    def __init__(self, rows: np.ndarray, owners: np.ndarray, size: int) -> None:
        """`rows[i]` is excluded by request `owners[i]`; rows are below `size`."""
        self.rows, self.owners, self.size = rows, owners, size
        self.keys = np.unique(owners * size + rows)

    def of(self, owners: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Whether request `owners[i]` excludes `rows[i]`."""
        keys = owners * self.size + rows
        if not len(self.keys):
            return np.zeros(len(keys), dtype=bool)
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return self.keys[at] == keys

    def most(self, requests: np.ndarray) -> int:
        """The most rows one of `requests` excludes."""
        return int(np.bincount(self.owners, minlength=int(requests.max()) + 1)[requests].max())

    def among(self, requests: np.ndarray, listed: np.ndarray) -> np.ndarray:
        """(len(requests), len(listed)): whether each request excludes each of the distinct
        rows `listed`. Costs the excluded rows and the matrix, not a lookup per pair."""
        where = np.full(self.size, -1)
        where[listed] = np.arange(len(listed))
        local = np.full(int(max(self.owners.max(initial=0), requests.max(initial=0))) + 1, -1)
        local[requests] = np.arange(len(requests))
        hit = (local[self.owners] >= 0) & (where[self.rows] >= 0)
        out = np.zeros((len(requests), len(listed)), dtype=bool)
        out[local[self.owners[hit]], where[self.rows[hit]]] = True
        return out


class BlendRanker:
    """Candidates, features and the online-trained blend. Not thread-safe: the stream
    processor calls it from its single vector-store thread."""

    def __init__(
        self,
        config: RankConfig | None = None,
        stats: ItemStats | None = None,
        cooc: CoOccurrence | None = None,
        seq: Transitions | None = None,
        tail_share: TailShare | None = None,
    ) -> None:
        """`stats`, `cooc`, `seq` and `tail_share`: counts shared with other rankers over the
        same stream (each interaction then `record`-ed by one of them only)."""
        self.config = config = config or RankConfig()
        self.stats = ItemStats(config.short_half_life_s, config.long_half_life_s) if stats is None else stats
        self.cooc = CoOccurrence(config.cooc_window, config.cooc_neighbours) if cooc is None else cooc
        self.seq = Transitions(config.sequence_steps, config.sequence_half_life_s) if seq is None else seq
        self.model = PairwiseLogistic(len(FEATURES), config.l2)
        self.prior = np.array([PRIOR.get(f, 0.0) for f in FEATURES])
        self.groups: deque[Group] = deque(maxlen=config.buffer)
        self.new_groups = 0
        self.fits = 0
        self.rejected: dict[str, int] = {}  # refits not adopted, by reason (`install`)
        self.last_rejection = ""  # the reason of the latest refit not adopted
        self.refused_groups = 0  # training groups dropped for non-finite features
        self._rng = np.random.default_rng(config.seed)  # negatives
        self._draw = np.random.default_rng([config.seed, 1])  # which interactions train
        # co-occurrence and transition indices -> catalogue rows: (map, generation) per counter
        self._row_maps: dict[str, tuple[np.ndarray, int]] = {}
        self._names = IdOrder(self.stats.ids)  # a round's ties by item id
        self.slots = SlotOdds(config.buffer, tail_share)  # what fresh items earn (`tail_rule` "earned")
        self.place_odds = PlaceOdds(config.buffer)  # what every candidate's places earn ("calibrated")
        #: how many of content's tail picks each learnt rule's lists keep (`content_picks`)
        self.picks = {rule: ContentPicks(config.buffer, config.tail_within) for rule in LEARNT_TAIL_RULES}
        #: the learnt tail rules whose odds learning keeps (scoring each training round to see
        #: where its targets sat costs the round's features a second time; a caller that serves
        #: a variant with another rule adds it)
        self.learns_places = {config.tail_rule} & set(LEARNT_TAIL_RULES)
        #: the learnt tail rules served with `content_picks`, whose picks count learning keeps
        #: (scoring each example's list with 0..10 picks; a subset of `learns_places`)
        self.learns_picks = set(self.learns_places) if config.content_picks else set()

    # --- the stream flows in --------------------------------------------------------------
    def sample_rate(self) -> float:
        """`RankConfig.sample_rate` for this ranker, fitted or not."""
        return self.config.sample_rate(self.fits > 0)

    def wants_example(self) -> bool:
        """Draw whether the next interaction becomes a training group (seeded)."""
        return bool(self._draw.random() < self.sample_rate())

    def record(self, history: Sequence[str], item: str, ts: float, new: bool | None = None) -> None:
        """Fold one applied interaction in; `history` is the user's distinct items before it
        (oldest first by latest interaction), or only the last `lookback()` of them when `new`
        says whether the item is among all of them (the stream processor's observations)."""
        self.slots.share.interaction(self.stats.count(item) <= 1)
        self.stats.add(item, ts)
        if new is None:
            new = item not in history
        if new:
            self.cooc.add(item, history)
            self.seq.add(item, history, ts)

    def lookback(self) -> int:
        """How many of a user's last items `record` reads (`RankConfig.lookback`)."""
        return self.config.lookback()

    def learn(self, requests: Sequence[Request], items: Sequence[str], content: ContentSource, refit: bool = True) -> None:
        """Training groups for interactions about to be recorded: `requests[n]` is the user's
        state just before taking `items[n]`. Call before `record`-ing them. `refit` False: the
        caller refits itself (`refit_due`, `train`, `install`), off the ranking thread."""
        drawn = self._round(requests, content)
        pools = [drawn[n] for n in range(len(drawn))]
        if requests and self.learns_places:
            self._observe_places(requests, items, drawn, content)
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
                x = self._group_features(request, rows, vectors, pool).astype(np.float32)
                if not np.isfinite(x).all():  # never let one odd moment into the model
                    self.refused_groups += 1
                    continue
                self.groups.append(Group(x))
                self.new_groups += 1
        if refit:
            self.maybe_refit()

    def _observe_places(self, requests: Sequence[Request], items: Sequence[str], drawn: Round, content: ContentSource) -> None:
        """Where each training example's target sat just before it was taken, for the learnt
        tail rules served (`learns_places`). "earned" (`SlotOdds`): the target's place in the
        blend's ranking of all candidates, and for a tail item its place in the content ranking
        of the tail candidates the blend left out of its first `tail_within` (None when the
        blend had it there: content would add nothing). "calibrated" (`PlaceOdds`): every
        candidate's places in the blend's ranking and the content ranking of the tail, and which
        was taken. Ties by item id, as the lists break them (a user without a profile gives
        every candidate the same content score: counting ties as ahead of the target would place
        every such tail target first)."""
        x = self._scored(requests, drawn, content)
        tail = x[:, COLUMN["pop_count"]] <= math.log1p(1.0)
        content_score = x[:, COLUMN["cos_mean"]]
        ties = self._names.of(drawn.rows)
        calibrated, earned = "calibrated" in self.learns_places, "earned" in self.learns_places
        head_k = self.config.tail_within
        for n, (at, to) in enumerate(zip(drawn.starts[:-1].tolist(), drawn.starts[1:].tolist(), strict=True)):
            count = self.stats.count(items[n])
            target_tail = count <= 1
            row = self.stats.index.get(items[n])
            found = np.flatnonzero(drawn.rows[at:to] == row) if row is not None else np.zeros(0, np.int64)
            order = ties[at:to]
            # scored where a rule reads it: "earned" only for a target among the candidates
            score = self.score(x[at:to]) if len(found) or calibrated else None
            if calibrated and score is not None:
                blend_places, content_places = self._places(score, content_score[at:to], tail[at:to], order)
                self.place_odds.example(blend_places, content_places, tail[at:to], int(found[0]) if len(found) else None)
            if len(found) and score is not None and self.learns_picks:
                self._observe_picks(score, content_score[at:to], tail[at:to], order, drawn.rows[at:to], int(found[0]), count == 0, head_k)
            if not earned:
                continue
            if len(found) == 0:
                self.slots.target(None)
                if target_tail:
                    self.slots.tail_target(None)
                continue
            j = int(found[0])
            assert score is not None  # a target was found
            self.slots.target(_place(j, score, order))
            if target_tail:
                left_out = tail[at:to].copy()
                left_out[best_by(score, order, self.config.tail_within)] = False
                self.slots.tail_target(_place(j, content_score[at:to], order, left_out) if left_out[j] else None)

    def _observe_picks(
        self, score: np.ndarray, content: np.ndarray, tail: np.ndarray, ties: np.ndarray, rows: np.ndarray, target: int, new: bool, k: int
    ) -> None:
        """A training example for `ContentPicks` under each learnt rule served with picks: the
        rule's first k places as it would serve them, without content's picks."""
        picks = self._content_picks(content, tail, ties, k)
        ranked = best_by(score, ties, 2 * k).tolist()
        for rule in self.learns_picks:
            self.picks[rule].example(self._head(rule, ranked, score, content, tail, ties, rows, k), picks, target, new)

    @staticmethod
    def _content_picks(content: np.ndarray, tail: np.ndarray, ties: np.ndarray, k: int) -> list[int]:
        """The tail candidates among the first k of the content ranking of all candidates."""
        return [j for j in best_by(content, ties, k).tolist() if tail[j]]

    @staticmethod
    def _places(score: np.ndarray, content: np.ndarray, tail: np.ndarray, ties: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A request's candidates' places in the blend's ranking and in content's ranking of
        the tail candidates (`PlaceOdds`; the first `LOCATED` of each)."""
        fresh = np.flatnonzero(tail)
        by_content = fresh[best_by(content[fresh], ties[fresh], LOCATED)]
        return places(best_by(score, ties, LOCATED), len(score)), places(by_content, len(score))

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
        self.last_rejection = reason
        return False

    # --- ranking --------------------------------------------------------------------------
    def candidates(self, requests: Sequence[Request], content: ContentSource) -> list[Candidates]:
        """Union of the sources per request, de-duplicated, seen items dropped (`_round`)."""
        pools = self._round(requests, content)
        return [pools[n] for n in range(len(pools))]

    def _round(self, requests: Sequence[Request], content: ContentSource) -> Round:
        """`candidates` of a whole round, flat. One content search for all requests' profile
        vectors, one `neighbours` call and one co-occurrence pass for all their recent items,
        popular and fresh items once per moment (`ts`); every source's lists for all requests
        come from numpy passes over (request, row) pairs, keyed `request * catalogue size + row`,
        rather than a Python loop per user. Candidates are catalogue rows (`ItemStats.intern`)."""
        c, stats, count = self.config, self.stats, len(requests)
        excluded_ids = [r.excluded() for r in requests]
        excluded = stats.intern([i for e in excluded_ids for i in e])
        excluded_of = np.repeat(np.arange(count), [len(e) for e in excluded_ids])
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
        hit_rows = stats.intern([item for row in hits for item, _ in row])
        placed = [self._placed(r) for r in requests]
        placed_rows = stats.intern([i for p in placed for i in p])
        placed_of = np.repeat(np.arange(count, dtype=np.int64), [len(p) for p in placed])
        recent = [r.history[-c.interests :] for r in requests]
        wanted = {i for items in recent for i in items}
        neighbours = content.neighbours(wanted, c.neighbour_depth) if wanted and c.interests else {}
        near = self._near_rows(neighbours)
        cooc_map = self._cooc_rows()  # interns what co-occurs or follows: the catalogue is complete from here
        seq_map = self._seq_rows()
        size = len(stats.ids)
        excluded_keys = Excluded(excluded, excluded_of, size)

        profile_of = np.repeat(np.array(profiled, dtype=np.int64), [len(row) for row in hits])
        offers: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {
            "profile": [(profile_of, hit_rows, _segment_ranks(profile_of, count))],
            "interests": [],
            "popular": [],
            "fresh": [],
        }
        lists = [(n, near[item]) for n, items in enumerate(recent) for item in reversed(items) if item in near]  # the latest first
        if lists:
            length = np.array([len(rows) for _, rows in lists])
            flat = np.concatenate([rows for _, rows in lists])
            owner = np.repeat([n for n, _ in lists], length)
            kept = ~excluded_keys.of(owner, flat)
            running = np.cumsum(kept)
            first = np.cumsum(length) - length
            place = running - np.repeat(running[first] - kept[first], length)  # 1-based among its list's kept
            take = kept & (place <= c.content_k)
            offers["interests"].append((owner[take], flat[take], place[take]))
        if len(placed_rows):  # not a ranked source: membership alone, no feature of its own
            kept = ~excluded_keys.of(placed_of, placed_rows)
            offers["fresh"].append((placed_of[kept], placed_rows[kept], np.ones(int(kept.sum()), dtype=np.int64)))
        cooc_starts, found, scores = self.cooc.sparse_many(recent)
        found = cooc_map[found]
        cooc_of = np.repeat(np.arange(count), np.diff(cooc_starts))
        keep = (scores > 0) & ~excluded_keys.of(cooc_of, found)
        offers["cooc"] = [self._top(cooc_of[keep], found[keep], scores[keep], c.cooc_k, count)]
        seq_starts, seq_found, seq_scores = self.seq.sparse_many([r.history for r in requests])
        seq_found = seq_map[seq_found]
        if c.sequence_k > 0 and len(seq_found):
            seq_of = np.repeat(np.arange(count), np.diff(seq_starts))
            keep = (seq_scores > 0) & ~excluded_keys.of(seq_of, seq_found)
            offers["sequence"] = [self._top(seq_of[keep], seq_found[keep], seq_scores[keep], c.sequence_k, count)]
        moments: dict[float, list[int]] = {}
        for n, r in enumerate(requests):
            moments.setdefault(r.ts, []).append(n)
        fresh = [self._of_moment(requests, np.array(members), excluded_keys, offers) for members in moments.values()]
        owner = np.concatenate([owner for owner, _ in fresh] + [np.zeros(0, np.int64)])
        rows = np.concatenate([rows for _, rows in fresh] + [np.zeros(0, np.int64)])
        if len(rows):  # the nearest fresh items to each profile, from one gather of vectors
            vectors = VectorRows.fetch(stats, np.unique(rows), content)
            owner, rows = owner[vectors.has(rows)], rows[vectors.has(rows)]
            profiles = np.zeros((count, vectors.dim), dtype=np.float32)
            for n in np.unique(owner).tolist():
                profiles[n] = np.asarray(requests[n].profile, dtype=np.float32)
            # einsum: a row's dot product does not depend on its place in the matrix, so items
            # with identical vectors tie exactly and the tie goes by item id
            closeness = np.einsum("ij,ij->i", vectors.take(rows), profiles[owner]).astype(np.float64)
            order = np.argsort(owner, kind="stable")
            offers["fresh"].append(self._top(owner[order], rows[order], closeness[order], c.fresh_k, count))
        return Round.of(count, size, offers, (cooc_starts, found, scores), stats.ids, (seq_starts, seq_found, seq_scores))

    def _of_moment(
        self, requests: Sequence[Request], members: np.ndarray, excluded: Excluded, offers: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The popular and fresh offers of the requests `members`, all of one moment, added to
        `offers`; returns the (request, row) pairs of the fresh items to rank by closeness to
        the request's profile (it has one, and more fresh items than `fresh_k`)."""
        c, stats = self.config, self.stats
        ts = requests[members[0]].ts
        if c.popular_k > 0:  # deep enough that every member keeps popular_k past what it excludes
            ranked = stats.popular_rows(c.popular_k + excluded.most(members), ts, np.zeros(excluded.size, dtype=bool))
            shown = ~excluded.among(members, ranked)
            place = np.cumsum(shown, axis=1)
            i, j = np.nonzero(shown & (place <= c.popular_k))
            offers["popular"].append((members[i], ranked[j], place[i, j]))
        fresh = stats.fresh_rows(ts, c.fresh_window_s)
        if c.fresh_k <= 0 or not len(fresh):
            return members[:0], fresh[:0]
        kept = ~excluded.among(members, fresh)
        total = kept.sum(axis=1)
        plain = np.array([requests[n].profile is None for n in members.tolist()]) | (total <= c.fresh_k)
        after = np.cumsum(kept[:, ::-1], axis=1)[:, ::-1]  # kept items at or after each
        i, j = np.nonzero(kept & plain[:, None] & (after <= c.fresh_k))  # the latest fresh_k, in declaration order
        offers["fresh"].append((members[i], fresh[j], np.minimum(total[i], c.fresh_k) - after[i, j] + 1))
        i, j = np.nonzero(kept & ~plain[:, None])
        return members[i], fresh[j]

    def _near_rows(self, neighbours: Mapping[str, Hits]) -> dict[str, np.ndarray]:
        """The catalogue rows of each item's neighbour list, remembered on a `NeighbourList`
        (the stream processor caches its lists for a minute and hands back the very objects
        round after round), instead of interning some 100,000 ids a round again."""
        near: dict[str, np.ndarray] = {}
        missing: list[tuple[str, Hits]] = []
        for item, hits in neighbours.items():
            kept = getattr(hits, "rows", None)
            if kept is not None and kept[0] is self.stats:
                near[item] = kept[1]
            elif hits:
                missing.append((item, hits))
        if missing:
            rows = self.stats.intern([i for _, hits in missing for i, _ in hits])
            ends = np.cumsum([len(hits) for _, hits in missing]).tolist()
            for (item, hits), end in zip(missing, ends, strict=True):
                near[item] = rows[end - len(hits) : end]
                if isinstance(hits, NeighbourList):
                    kept_rows = near[item].copy()
                    kept_rows.flags.writeable = False  # shared by every later round
                    hits.rows = (self.stats, kept_rows)
        return near

    def _top(self, owner: np.ndarray, rows: np.ndarray, scores: np.ndarray, n: int, requests: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each request's n best rows by score, ties by item id (`best` per request), as
        (request, row, 1-based place); `owner` ascending."""
        starts = np.searchsorted(owner, np.arange(requests + 1)).tolist()
        ties = self._names.of(rows)
        picked = [at + best_by(scores[at:to], ties[at:to], n) for at, to in zip(starts[:-1], starts[1:], strict=True) if at < to]
        taken = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
        owner = owner[taken]
        return owner, rows[taken], _segment_ranks(owner, requests)

    def _recent_rows(self, request: Request) -> np.ndarray:
        return self.stats.intern(list(request.history[-self.config.interests :]))

    def _seq(self, request: Request) -> tuple[np.ndarray, np.ndarray]:
        """Catalogue rows and transition scores from the request's last items."""
        _, found, scores = self.seq.sparse_many([request.history])
        return self._seq_rows()[found], scores

    def _cooc(self, request: Request) -> tuple[np.ndarray, np.ndarray]:
        """Catalogue rows and co-occurrence scores of the request's recent items."""
        found, scores = self.cooc.sparse(request.history[-self.config.interests :])
        return self._cooc_rows()[found], scores

    def _cooc_rows(self) -> np.ndarray:
        return self._rows_of("cooc", self.cooc)

    def _seq_rows(self) -> np.ndarray:
        return self._rows_of("seq", self.seq)

    def _rows_of(self, name: str, counter: CoOccurrence | Transitions) -> np.ndarray:
        """Catalogue row of each index of a co-occurrence or transition counter (extended as
        it grows, rebuilt when it forgets items)."""
        rows, generation = self._row_maps.get(name, (np.zeros(0, np.int64), -1))
        if generation != counter.generation:
            rows = np.zeros(0, np.int64)
        if len(rows) < len(counter.ids):
            rows = np.concatenate([rows, self.stats.intern(counter.ids[len(rows) :])])
        self._row_maps[name] = (rows, counter.generation)
        return rows

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
        vector_rows = VectorRows.of(self.stats, vectors)
        if pool is not None:
            return self._group_features(request, rows, vector_rows, pool)
        return self._features(request, rows, vector_rows)

    def _features(self, request: Request, rows: np.ndarray, vectors: VectorRows) -> np.ndarray:
        """`_round_features` of one request outside any round: no source ranks."""
        found, scores = self._cooc(request)
        seq_rows, seq_scores = self._seq(request)
        cooc = (np.array([0, len(found)]), found, scores)
        seq = (np.array([0, len(seq_rows)]), seq_rows, seq_scores)
        return self._round_features([request], np.array([0, len(rows)]), rows, vectors, None, cooc, seq)

    def _group_features(self, request: Request, rows: np.ndarray, vectors: VectorRows, pool: Candidates) -> np.ndarray:
        """A training group's features: `rows` (its positive and negatives) are some of the
        request's candidates `pool`, and every feature is what that row would have when the
        request is ranked. `cooc_rel` is relative to the best of all the candidates, not of the
        group's few rows: measured on the group, a positive with any co-occurrence was most
        often its group's best (1.0 in training, less when ranked)."""
        found, scores = pool.cooc
        rr = {s: pool.rr_of(s, rows) for s in RANKED_SOURCES}
        top = np.array([scores[np.isin(found, pool.rows)].max(initial=0.0)])
        cooc = (np.array([0, len(found)]), found, scores)
        seq = (np.array([0, len(pool.seq[0])]), *pool.seq)
        return self._round_features([request], np.array([0, len(rows)]), rows, vectors, rr, cooc, seq, top)

    def _round_features(
        self,
        requests: Sequence[Request],
        starts: np.ndarray,
        rows: np.ndarray,
        vectors: VectorRows,
        rr: Mapping[str, np.ndarray] | None,
        cooc: Sparse,
        seq: Sparse,
        cooc_top: np.ndarray | None = None,
    ) -> np.ndarray:
        """(len(rows), len(FEATURES)): request n's candidates are `rows[starts[n]:starts[n + 1]]`;
        `rr`: their sources' reciprocal ranks, aligned with `rows` (None: not candidates of a
        round); `cooc` and `seq`: the requests' co-occurrence and transition scores, flat as in
        `Round`; `cooc_top`: per
        request, the best `cooc_recent` among all its candidates when `rows` are only some of them
        (a training group), else the best among `rows`. Everything is one
        numpy pass over the round but the cosines: those are one matrix product per request, the
        very products of the per-user code, since a BLAS product's last bit depends on the
        matrix's shape and a different bit may reorder ties (tests/rank_reference.py)."""
        stats, col, count = self.stats, COLUMN, len(requests)
        lengths = np.diff(starts)
        owner = np.repeat(np.arange(count), lengths)
        x = np.zeros((len(rows), len(FEATURES)))
        if vectors.dim:
            cos_mean, cos_last = col["cos_mean"], col["cos_last"]
            index = stats.index
            recents = [self._recent_rows(r) for r in requests]
            recents = [recent[vectors.has(recent)] for recent in recents]
            # each request's cosines to its recent items, padded: one max over the round
            sims_of = np.full((max(map(len, recents), default=0), len(rows)), -np.inf, dtype=np.float32)
            for request, recent, at, to in zip(requests, recents, starts[:-1].tolist(), starts[1:].tolist(), strict=True):
                if at == to:
                    continue
                matrix = vectors.take(rows[at:to])
                if request.profile is not None:
                    x[at:to, cos_mean] = matrix @ np.asarray(request.profile, dtype=np.float32)
                if len(recent):
                    sims = matrix @ vectors.take(recent).T
                    sims_of[: len(recent), at:to] = sims.T
                    if recent[-1] == index[request.history[-1]]:
                        x[at:to, cos_last] = sims[:, -1]
            if len(sims_of):
                with_recent = np.repeat([len(recent) > 0 for recent in recents], lengths)
                x[:, col["cos_max"]] = np.where(with_recent, sims_of.max(axis=0), 0.0)
        x[:, col["cooc_recent"]] = _looked_up(cooc, owner, rows, len(stats.ids))
        x[:, col["seq_recent"]] = _looked_up(seq, owner, rows, len(stats.ids))
        cooc_recent = x[:, col["cooc_recent"]]
        top = np.zeros(count)
        filled = lengths > 0
        if cooc_top is not None:
            top = np.asarray(cooc_top, dtype=np.float64)
        elif filled.any():
            top[filled] = np.maximum.reduceat(cooc_recent, starts[:-1][filled])
        top = np.repeat(np.maximum(top, 0.0), lengths)
        np.divide(cooc_recent, top, out=x[:, col["cooc_rel"]], where=top > 0)
        counts = stats.counts(rows)
        x[:, col["pop_count"]] = np.log1p(np.maximum(counts, 1.0))
        moments: dict[float, list[int]] = {}
        for n, request in enumerate(requests):
            moments.setdefault(request.ts, []).append(n)
        for ts, members in moments.items():
            if len(moments) == 1:
                at = slice(None)
            else:
                member = np.zeros(count, dtype=bool)
                member[members] = True
                at = np.repeat(member, lengths)
            decayed = np.log1p(stats.decayed(rows[at], ts))
            x[at, col["pop_short"]], x[at, col["pop_long"]] = decayed[:, 0], decayed[:, 1]
            x[at, col["age"]] = stats.ages_days(rows[at], ts)
        h = np.repeat([math.log1p(len(r.history)) for r in requests], lengths)
        x[:, col["hist_cos_max"]] = h * x[:, col["cos_max"]]
        x[:, col["hist_cooc"]] = h * x[:, col["cooc_recent"]]
        x[:, col["hist_pop"]] = h * x[:, col["pop_long"]]
        x[:, col["tail_cos_max"]] = np.where(counts <= 1, x[:, col["cos_max"]], 0.0)
        if rr is not None:
            for source in RANKED_SOURCES:
                x[:, col[f"rr_{source}"]] = rr[source]
        return x

    def weights(self) -> dict[str, float]:
        w = self.prior if self.model.weights is None else self.model.weights
        return dict(zip(FEATURES, w.tolist(), strict=True))

    def score(self, x: np.ndarray) -> np.ndarray:
        return x @ self.prior if self.model.weights is None else self.model.score(x)

    def rank(self, requests: Sequence[Request], content: ContentSource, k: int, serving: RankConfig | None = None) -> list[Hits]:
        """Top k (item_id, score) per request, best first, ties by item_id. A round is ranked
        at once: its candidates (`_round`) and features (`_round_features`) come from numpy
        passes over all its (request, candidate) pairs; what is left per request is its scores
        (one product each), its best k and the places of tail items (`best_by`; `_earned`,
        `_with_tail`).

        `serving`: the settings to rank with instead of the ranker's own, for a ranking variant
        (`streams.variants`; only serving settings may differ). The caller serialises it with
        learning, which reads the ranker's own settings (`Recommender.lock`)."""
        if serving is not None and serving != self.config:
            own, self.config = self.config, serving
            try:
                return self.rank(requests, content, k)
            finally:
                self.config = own
        c, names = self.config, self.stats.ids
        if not requests:
            return []
        pools = self._round(requests, content)
        x = self._scored(requests, pools, content)
        ties = self._names.of(pools.rows)
        tail = x[:, COLUMN["pop_count"]] <= math.log1p(1.0)
        content_score = x[:, COLUMN["cos_mean"]]
        head_k = min(k, c.tail_within)
        earned = c.tail_rule == "earned" and self.slots.ready
        calibrated = c.tail_rule == "calibrated" and self.place_odds.ready
        picks = self.picks.get(c.tail_rule) if c.content_picks else None
        kept = picks.kept() if picks is not None else 0
        out: list[Hits] = []
        for request, at, to in zip(requests, pools.starts[:-1].tolist(), pools.starts[1:].tolist(), strict=True):
            if at == to:
                out.append([])
                continue
            scores = self.score(x[at:to])  # one product per request: the per-user code's float to the bit
            ranked = best_by(scores, ties[at:to], k + max(c.tail_slots, head_k if earned or calibrated else 0)).tolist()
            rows = pools.rows[at:to]
            head = self._head(c.tail_rule, ranked, scores, content_score[at:to], tail[at:to], ties[at:to], rows, head_k)
            if kept:
                head = keep_in(head, self._content_picks(content_score[at:to], tail[at:to], ties[at:to], head_k)[:kept])
            if placed := self._placed(request):
                head = self._with_placed(head, placed, rows)
            taken = set(head)
            top = head + [j for j in ranked if j not in taken][: k - len(head)]
            out.append(list(zip([names[r] for r in rows[top].tolist()], scores[top].tolist(), strict=True)))
        return out

    def _scored(self, requests: Sequence[Request], pools: Round, content: ContentSource) -> np.ndarray:
        """The features of a round's (request, candidate) pairs."""
        wanted = np.unique(np.concatenate([pools.rows] + [self._recent_rows(r) for r in requests]))
        vectors = VectorRows.fetch(self.stats, wanted, content)
        cooc = (pools.cooc_starts, pools.cooc_rows, pools.cooc_scores)
        return self._round_features(requests, pools.starts, pools.rows, vectors, pools.rr, cooc, pools.seq)

    def _head(
        self, rule: str, ranked: list[int], scores: np.ndarray, content: np.ndarray, tail: np.ndarray, ties: np.ndarray, rows: np.ndarray, k: int
    ) -> list[int]:
        """The first k places of a request's list under a tail rule (before content's picks
        and a fan-out's items): `ranked` (the blend's order, at least 2k long) merged by the
        rule's odds once they are trusted, then `tail_slots` kept for tail items."""
        if rule == "calibrated" and self.place_odds.ready:
            order = self._calibrated(ranked, scores, content, tail, ties, k)
        elif rule == "earned" and self.slots.ready:
            order = self._earned(ranked, content, tail, ties, k)
        else:
            order = ranked
        return self._with_tail(order, content, tail, rows, k)

    def _earned(self, ranked: list[int], content: np.ndarray, tail: np.ndarray, ties: np.ndarray, k: int) -> list[int]:
        """The first k places: `ranked` (the blend's order) merged with the content ranking of
        the tail candidates it left out of its first k, by the learnt odds (`SlotOdds.merge`)."""
        return self.slots.merge(ranked, _left_out_by_content(ranked, content, tail, ties, k), k)

    def _calibrated(self, ranked: list[int], scores: np.ndarray, content: np.ndarray, tail: np.ndarray, ties: np.ndarray, k: int) -> list[int]:
        """The first k places: `ranked` (the blend's order) merged with the content ranking of
        the tail candidates it left out of its first k, by each item's chance given its places
        in both (`PlaceOdds.order`)."""
        blend_places, content_places = self._places(scores, content, tail, ties)
        by_content = _left_out_by_content(ranked, content, tail, ties, k)
        return self.place_odds.order(ranked, by_content, blend_places, content_places, tail, k)

    def tail_places(self, k: int) -> int:
        """Of the first k places, how many are kept for tail items at least: `tail_slots`, or
        under `tail_rule` "earned" what the learnt odds give the content ranking of the tail
        when that is more (`SlotOdds.tail_places`; the blend's own tail items come on top)."""
        c = self.config
        floor = min(c.tail_slots, k)
        if c.tail_rule != "earned" or not self.slots.ready:
            return floor
        return max(floor, self.slots.tail_places(k))

    def fresh_places(self) -> dict[tuple[str, str], int]:
        """What the stream has earned tail items of the first `tail_within` places, per learnt
        rule served: ("earned", "earned") the places the learnt odds give the content ranking of
        the tail (`SlotOdds.tail_places`, before the `tail_slots` floor), and (rule,
        "content_picks") the content picks every list keeps."""
        out = {(rule, "content_picks"): self.picks[rule].kept() for rule in sorted(self.learns_picks)}
        if "earned" in self.learns_places:
            out[("earned", "earned")] = self.slots.tail_places(self.config.tail_within) if self.slots.ready else 0
        return out

    def _placed(self, request: Request) -> list[str]:
        """The newest `fanout_places` of the request's fan-out items."""
        places = self.config.fanout_places
        return list(dict.fromkeys(request.place))[-places:] if places > 0 and request.place else []

    def _with_placed(self, head: list[int], placed: list[str], rows: np.ndarray) -> list[int]:
        """`head` with the fan-out's items (`Request.place`) that the blend left out of it in
        the places of its last other items (a placed item is a candidate unless the user has
        it already)."""
        index = self.stats.index
        return keep_in(head, np.flatnonzero(np.isin(rows, [index[i] for i in placed if i in index])).tolist())

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
