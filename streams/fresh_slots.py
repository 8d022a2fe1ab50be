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

from collections.abc import Sequence

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
            take_tail = j >= len(blend) or (i < len(tail) and tail_odds[min(i, PLACES - 1)] > blend_odds[min(j, PLACES - 1)])
            item = tail[i] if take_tail else blend[j]
            out.append(item)
            placed.add(item)
        return out


def _non_increasing(values: np.ndarray) -> np.ndarray:
    """The closest non-increasing sequence in squared error (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, size]
    for value in values.tolist():
        blocks.append([value, 1.0])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            mean, size = blocks.pop()
            blocks[-1] = [(blocks[-1][0] * blocks[-1][1] + mean * size) / (blocks[-1][1] + size), blocks[-1][1] + size]
    return np.concatenate([np.full(int(size), mean) for mean, size in blocks])
