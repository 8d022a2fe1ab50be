"""How many places of a list fresh items earn, learnt from the stream (`RankConfig.tail_rule`
"earned").

The blend ranks by the evidence most targets have, so on a stream of mostly known items it
buries tail items (at most one interaction), and where it does rank them, its order among them
need not be content's; a fixed number of places kept for them is tuned to one dataset's share
of fresh targets. Here the first places of a list are merged from two rankings, each place to
the one whose next item is the likelier target:

    P(next target is a tail item) * P(a tail target sits at place i of the content ranking
                                      of the tail candidates the blend left out of its first
                                      places)
    against
    P(a target, of any kind, sits at place j of the blend's ranking of all candidates)

(the content ranking is of what the blend left out, so that a tail target the blend already
shows is not counted twice: the two claims are on different targets, as the greedy merge needs)

The first factor is the stream's decayed share of interactions with tail items (`TailShare`);
the others are decayed histograms of where earlier targets sat in each ranking, measured on the
training examples the ranker already draws (the user's state just before the interaction: no
peeking). Taking places greedily by these odds maximises the expected hits of every prefix when
each ranking's hit chance falls with its place (the histograms are made non-increasing); an
item both rankings hold takes one place. Where content ranks tail targets poorly (a basket's
items bought once, which co-occurrence knows better) the tail earns nothing and the list is the
blend's; where users often take new items that content finds, they get places whatever the
blend thought of them. Faust-free and tested alone (`tests/test_fresh_slots.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

#: places of each ranking whose hit chance is tracked; a target further down counts as missed
PLACES = 50
#: training targets before the odds are trusted; until then the fixed rule serves
MIN_OBSERVED = 30
#: pseudo-count spread over the places, so that a place never seen hit is not impossible and
#: a kind seen a few times does not claim certainty
SMOOTHING = 2.0


def _keep(memory: int) -> float:
    """The decay per observation that weighs about the last `memory` of them."""
    return 1.0 - 1.0 / max(2, memory)


class TailShare:
    """The stream's decayed share of interactions with tail items. Like the item counts it is
    the stream's, not a ranker's: rankers that share the counts share it too (`BlendRanker`'s
    `tail_share`; the one that records an interaction counts it)."""

    def __init__(self, memory: int = 5000) -> None:
        self.keep = _keep(memory)
        self.counts = np.zeros(2)  # decayed (tail interactions, all interactions)

    def interaction(self, tail: bool) -> None:
        """Every recorded interaction: was its item a tail item (at most one interaction) then?"""
        self.counts *= self.keep
        self.counts += (float(tail), 1.0)

    def p(self) -> float:
        return float(self.counts[0] / self.counts[1]) if self.counts[1] > 0 else 0.0


class SlotOdds:
    """Decayed counts: `memory` is about how many recent observations they weigh. `share`: the
    stream's tail share when it is shared with other rankers' odds."""

    def __init__(self, memory: int = 5000, share: TailShare | None = None) -> None:
        self.keep = _keep(memory)
        self.share = TailShare(memory) if share is None else share
        #: decayed hits by place: [0] tail targets in the content ranking of the tail
        #: candidates, [1] every target in the blend's ranking of all candidates
        self.places = np.zeros((2, PLACES))
        self.observed = np.zeros(2)  # decayed targets: [0] tail ones, [1] all, found or not
        self._chances: tuple[np.ndarray, np.ndarray] | None = None  # `chances`, until the next target

    def target(self, place: int | None) -> None:
        """A training example's target: its place (0-based) in the blend's ranking, None when
        the ranking did not hold it."""
        self._count(1, place)

    def tail_target(self, place: int | None) -> None:
        """A training example's target that was a tail item: its place in the content ranking
        of the tail candidates (besides its `target`)."""
        self._count(0, place)

    def _count(self, kind: int, place: int | None) -> None:
        self._chances = None
        self.places[kind] *= self.keep
        self.observed[kind] *= self.keep
        self.observed[kind] += 1.0
        if place is not None and place < PLACES:
            self.places[kind, place] += 1.0

    @property
    def ready(self) -> bool:
        return bool(self.observed[1] >= MIN_OBSERVED)

    def p_tail(self) -> float:
        return self.share.p()

    def chances(self) -> tuple[np.ndarray, np.ndarray]:
        """P(target at place i | it is a tail item) in the content ranking of the tail, and
        P(target at place j) in the blend's, made non-increasing by pooling adjacent places that
        rise (a place seen hit less often than the next one, by chance, must not end the
        ranking's claim)."""
        if self._chances is None:
            smoothed = (self.places + SMOOTHING / PLACES) / (self.observed[:, None] + SMOOTHING)
            self._chances = (_non_increasing(smoothed[0]), _non_increasing(smoothed[1]))
        return self._chances

    def _odds(self) -> tuple[np.ndarray, np.ndarray]:
        tail_chance, blend_chance = self.chances()
        return self.p_tail() * tail_chance, blend_chance

    def tail_places(self, k: int) -> int:
        """How many of the first k places the content ranking of the tail earns when the two
        rankings hold no item in common (what `merge` gives it at most)."""
        return sum(place >= k for place in self.merge(range(k), range(k, 2 * k), k))

    def merge(self, blend: Sequence[int], tail: Sequence[int], k: int) -> list[int]:
        """The first k of the blend's ranking and the content ranking of the tail (candidate
        positions, best first), each place to the ranking whose next item is the likelier
        target (ties to the blend's); an item already placed is passed over, its ranking's
        next place then counting as the next."""
        tail_odds, blend_odds = self._odds()
        return _merge(blend, tail, k, lambda i, j: tail_odds[min(i, PLACES - 1)] > blend_odds[min(j, PLACES - 1)])


class ContentPicks:
    """How many of content's own tail picks a list keeps: the tail items among the first k of
    the content ranking of *all* candidates (what the paper's content-only method shows), learnt
    from the stream under one tail rule.

    Why: the learnt rules give a list the places that maximise its expected hits, and per place
    a known item the blend ranks high is likelier the target than content's best tail item, so
    on a stream where users often take new items that content finds, they give content fewer
    places than a content-only list takes and find fewer of those items than content alone
    (docs/quality.md, docs/fresh-mix). A feed of fresh content must not show its new items less
    well than the paper's method would. So for each training example (the user's state just
    before the interaction: no peeking) the rule's list is scored with its first r picks kept,
    for every r, beside content alone: the kept count is the one with the most hits among those
    that found at least the new targets (items nobody had touched) content alone found. Keeping
    every pick meets that on every example, so there always is one; where the blend finds more
    new targets than content (hm's baskets), it keeps none and costs nothing. Whether a target
    was new is the past's outcome, read only into this one count for all users: no candidate's
    features tell a new item from one touched once."""

    def __init__(self, memory: int = 5000, most: int = 10) -> None:
        self.keep = _keep(memory)
        self.hits = np.zeros(most + 1)  # decayed hits with the first r picks kept, every target
        self.new_hits = np.zeros(most + 1)  # the same, targets nobody had touched before
        self.content_new_hits = 0.0  # decayed new targets among content's picks
        self.observed = 0.0  # decayed examples whose target was a candidate
        self._kept: int | None = None

    def example(self, head: Sequence[int], picks: Sequence[int], target: int, new: bool) -> None:
        """One training example: the rule's first places (`head`, candidate positions), content's
        tail picks (best first), the target's position and whether nobody had touched it."""
        self._kept = None
        found = np.array([target in keep_in(head, picks[:r]) for r in range(len(self.hits))], dtype=float)
        for counts in (self.hits, self.new_hits):
            counts *= self.keep
        self.hits += found
        self.content_new_hits *= self.keep
        if new:
            self.new_hits += found
            self.content_new_hits += float(target in picks)
        self.observed = self.observed * self.keep + 1.0

    @property
    def ready(self) -> bool:
        return self.observed >= MIN_OBSERVED

    def kept(self) -> int:
        """The fewest picks kept with the most hits among the counts that found at least the
        new targets content alone did (0 until `ready`)."""
        if self._kept is None:
            enough = self.new_hits >= self.content_new_hits - 1e-9
            enough[-1] = True  # every pick kept finds what content finds: so on the serving path, never an empty choice
            best = self.hits[enough].max()
            self._kept = int(np.flatnonzero(enough & (self.hits >= best - 1e-9))[0]) if self.ready else 0
        return self._kept


def keep_in(head: Sequence[int], wanted: Sequence[int]) -> list[int]:
    """`head` with the `wanted` items it lacks in the places of its last other items (as many
    as fit), its own order kept for the rest."""
    taken = set(head)
    missing = [j for j in wanted if j not in taken][: len(head)]
    if not missing:
        return list(head)
    keep = set(wanted)
    others = [j for j in head if j not in keep]
    dropped = set(others[max(0, len(others) - len(missing)) :])
    return ([j for j in head if j not in dropped] + missing)[: len(head)]


def _non_increasing(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """The closest non-increasing sequence in (weighted) squared error (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, length]
    for value, weight in zip(values.tolist(), np.ones(len(values)).tolist() if weights is None else weights.tolist(), strict=True):
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            mean, weight, length = blocks.pop()
            total = blocks[-1][1] + weight
            blocks[-1] = [(blocks[-1][0] * blocks[-1][1] + mean * weight) / total, total, blocks[-1][2] + length]
    return np.concatenate([np.full(int(length), mean) for mean, _, length in blocks])


#: upper edges of the place buckets of a ranking: places 0, 1, 2, 3, 4, 5-6, 7-9, 10-14, 15-24,
#: 25-49, and 50 or later (or not ranked) in the last
BUCKET_EDGES = np.array([1, 2, 3, 4, 5, 7, 10, 15, 25, 50])
BUCKETS = len(BUCKET_EDGES) + 1
#: how many places of each ranking are located (`places`); the rest fall in the last bucket
LOCATED = int(BUCKET_EDGES[-1])


def places(order: np.ndarray, size: int) -> np.ndarray:
    """Each of `size` candidates' place in `order` (positions, best first; the first `LOCATED`
    are enough), `LOCATED` for the others."""
    out = np.full(size, LOCATED, dtype=np.int64)
    out[order[:LOCATED]] = np.arange(min(len(order), LOCATED))
    return out


class PlaceOdds:
    """`tail_rule` "calibrated": P(a candidate is the user's next item | where it sits in the
    blend's ranking of all candidates, its kind, and for a tail item where it sits in the content
    ranking of the tail candidates), from decayed counts of candidates and targets per cell of
    (blend place bucket) x (known, or the tail item's content place bucket).

    Why: `SlotOdds` weighs two rankings place by place, each by its unconditional hit chance,
    so a tail item the blend holds in its first places keeps its place whatever content thinks
    of it, and content's best tail items are counted only where the blend left them out: on a
    stream where users often take new items the blend put 5-10 tail items in its first ten in an
    order worse than content's (docs/fresh-mix). Here every candidate gets the chance that its
    two places *together* have earned on this stream, and the first places go to the likeliest:
    where the blend's places of tail items predict targets (hm's baskets) they keep them; where
    content's do, content's tail items rise above the blend's. Estimated from the ranker's
    training examples as `SlotOdds` is (the user's state just before the interaction: no
    peeking), with every candidate counted, so the figures are rates, not shares of hits."""

    def __init__(self, memory: int = 5000) -> None:
        self.keep = _keep(memory)
        #: rows 0..BUCKETS-1: tail candidates by content place bucket; row BUCKETS: known ones;
        #: columns: blend place bucket
        self.targets = np.zeros((BUCKETS + 1, BUCKETS))
        self.candidates = np.zeros((BUCKETS + 1, BUCKETS))
        self.observed = 0.0  # decayed training examples
        self._p: np.ndarray | None = None

    @staticmethod
    def cells(blend_places: np.ndarray, content_places: np.ndarray, tail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each candidate's (row, column) in the tables."""
        row = np.where(tail, np.searchsorted(BUCKET_EDGES, content_places, side="right"), BUCKETS)
        return row, np.searchsorted(BUCKET_EDGES, blend_places, side="right")

    def example(self, blend_places: np.ndarray, content_places: np.ndarray, tail: np.ndarray, target: int | None) -> None:
        """One training example: its candidates' places (`places`; content places matter for
        tail candidates only) and which candidate was taken (None: none of them)."""
        row, column = self.cells(blend_places, content_places, tail)
        self.targets *= self.keep
        self.candidates *= self.keep
        self.observed = self.observed * self.keep + 1.0
        np.add.at(self.candidates, (row, column), 1.0)
        if target is not None:
            self.targets[row[target], column[target]] += 1.0
        self._p = None

    @property
    def ready(self) -> bool:
        return self.observed >= MIN_OBSERVED

    def chances(self) -> np.ndarray:
        """P(target) per cell. A cell's rate is shrunk towards its blend place bucket's rate
        for its kind, and that towards the overall rate, each by one pseudo-target at the
        coarser rate (a cell seen with few candidates says little); then made non-increasing
        along both places (a later place seen hit more often than an earlier one, by chance,
        must not reorder the blend's ranking)."""
        if self._p is None:
            overall = (self.targets.sum() + SMOOTHING / BUCKETS) / (self.candidates.sum() + SMOOTHING)
            p = np.empty_like(self.targets)
            for rows in (slice(0, BUCKETS), slice(BUCKETS, BUCKETS + 1)):
                column_t, column_n = self.targets[rows].sum(axis=0), self.candidates[rows].sum(axis=0)
                by_column = (column_t + 1.0) / (column_n + 1.0 / overall)
                p[rows] = (self.targets[rows] + 1.0) / (self.candidates[rows] + 1.0 / by_column)
            weight = self.candidates + 1.0  # a cell pooled with others counts by its candidates
            p[BUCKETS] = _non_increasing(p[BUCKETS], weight[BUCKETS])
            tail = p[:BUCKETS]
            for _ in range(50):  # alternating along the two places ends in a table monotone in both
                tail = np.array([_non_increasing(r, w) for r, w in zip(tail, weight[:BUCKETS], strict=True)])
                tail = np.array([_non_increasing(c, w) for c, w in zip(tail.T, weight[:BUCKETS].T, strict=True)]).T
                if (np.diff(tail, axis=1) <= 1e-12).all():
                    break
            p[:BUCKETS] = tail
            self._p = p
        return self._p

    def order(self, blend: Sequence[int], tail: Sequence[int], blend_places: np.ndarray, content_places: np.ndarray, is_tail: np.ndarray, k: int) -> list[int]:
        """The first k of the blend's ranking (`blend`, positions best first) and the content
        ranking of the tail candidates it left out (`tail`), each place to the ranking whose
        next item has the higher chance given its own places (ties to the blend's): each
        ranking keeps its order, and an item both hold takes one place."""
        row, column = self.cells(blend_places, content_places, is_tail)
        chance = self.chances()[row, column]
        return _merge(blend, tail, k, lambda i, j: chance[tail[i]] > chance[blend[j]])


def _merge(blend: Sequence[int], tail: Sequence[int], k: int, tail_first: Callable[[int, int], bool]) -> list[int]:
    """The first k of two rankings, each place to the tail's next item (at `tail[i]`) when
    `tail_first(i, j)` says so against the blend's (at `blend[j]`), else to the blend's; an
    item already placed is passed over, its ranking's next place then counting as the next."""
    out: list[int] = []
    placed: set[int] = set()
    i = j = 0
    while len(out) < k:
        while i < len(tail) and tail[i] in placed:
            i += 1
        while j < len(blend) and blend[j] in placed:
            j += 1
        if i >= len(tail) and j >= len(blend):
            break
        take_tail = j >= len(blend) or (i < len(tail) and tail_first(i, j))
        item = tail[i] if take_tail else blend[j]
        out.append(item)
        placed.add(item)
    return out
