"""How many places of a list fresh items earn, learnt from the stream (`RankConfig.tail_rule`
"earned").

The blend ranks by the evidence most targets have, so on a stream of mostly known items it
buries every tail item (at most one interaction), and a fixed number of places kept for them is
tuned to one dataset's share of fresh targets: where users rarely turn to new items it wastes
places, where they often do it buries them. Here the number of the first places that go to tail
items is learnt: each place to the kind whose next item is the likelier target,

    P(next target is a tail item) * P(a tail target sits at place i of the content ranking
                                      of the tail candidates)
    against
    P(next target is known) * P(a known target sits at place j of the blend's ranking of
                                the known candidates)

The first factor is the stream's decayed share of interactions with tail items; the second is a
decayed histogram of where earlier targets sat in each ranking, measured on the training
examples the ranker already draws (the user's state just before the interaction: no peeking).
Taking places greedily by these odds maximises the expected hits of every prefix when each
ranking's hit chance falls with its place (the histograms are made non-increasing). The tail's
ranking is by content, the paper's ranking, because that is what fills the places the count
gives it (`BlendRanker._with_tail`); the list itself stays the blend's order, so tail items the
blend already ranks high count towards it. Faust-free and tested alone
(`tests/test_fresh_slots.py`).
"""

from __future__ import annotations

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
        self.places = np.zeros((2, PLACES))  # decayed hits by place: [0] tail targets, [1] known
        self.observed = np.zeros(2)  # decayed targets of each kind, found or not
        self._chances: tuple[np.ndarray, np.ndarray] | None = None  # `chances`, until the next target

    def target(self, tail: bool, place: int | None) -> None:
        """A training example's target: its place (0-based) in its kind's ranking, None when
        the ranking did not hold it."""
        kind = 0 if tail else 1
        self._chances = None
        self.places[kind] *= self.keep
        self.observed[kind] *= self.keep
        self.observed[kind] += 1.0
        if place is not None and place < PLACES:
            self.places[kind, place] += 1.0

    @property
    def ready(self) -> bool:
        return bool(self.observed.sum() >= MIN_OBSERVED)

    def p_tail(self) -> float:
        return self.share.p()

    def chances(self) -> tuple[np.ndarray, np.ndarray]:
        """P(target at place i | its kind) for the tail and the known ranking, made
        non-increasing by pooling adjacent places that rise (a place seen hit less often than
        the next one, by chance, must not end the ranking's claim)."""
        if self._chances is None:
            smoothed = (self.places + SMOOTHING / PLACES) / (self.observed[:, None] + SMOOTHING)
            self._chances = (_non_increasing(smoothed[0]), _non_increasing(smoothed[1]))
        return self._chances

    def tail_places(self, k: int) -> int:
        """How many of the first k places the tail earns: the tail's share when both rankings
        are long enough, places taken one by one by the likelier kind (ties to the known)."""
        p = self.p_tail()
        tail_chance, known_chance = self.chances()
        tail_odds, known_odds = p * tail_chance, (1.0 - p) * known_chance
        tail = known = 0
        for _ in range(k):
            if tail_odds[min(tail, PLACES - 1)] > known_odds[min(known, PLACES - 1)]:
                tail += 1
            else:
                known += 1
        return tail


def _non_increasing(values: np.ndarray) -> np.ndarray:
    """The closest non-increasing sequence in squared error (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, size]
    for value in values.tolist():
        blocks.append([value, 1.0])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            mean, size = blocks.pop()
            blocks[-1] = [(blocks[-1][0] * blocks[-1][1] + mean * size) / (blocks[-1][1] + size), blocks[-1][1] + size]
    return np.concatenate([np.full(int(size), mean) for mean, size in blocks])
