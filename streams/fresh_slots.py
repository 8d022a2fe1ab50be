"""How many places of a list fresh items earn, learnt from the stream (`RankConfig.tail_rule`
"earned").

A list mixes two rankings, both by the blend's score: of the known items, and of the tail items
(at most one interaction), whose evidence is mostly their content. The blend alone ranks by the
evidence most targets have, so on a stream of mostly known items it buries every tail item. A fixed number of tail places is tuned to one dataset's share of
fresh targets: where users rarely turn to new items it wastes places, where they often do it
buries them. Here each place goes to the ranking whose next item is the likelier target:

    P(next target is a tail item) * P(a tail target sits at place i of the tail ranking)
    against
    P(next target is known) * P(a known target sits at place j of the blend's ranking)

The first factor is the stream's decayed share of interactions with tail items; the second is a
decayed histogram of where earlier targets sat in each ranking, measured on the training
examples the ranker already draws (the user's state just before the interaction: no peeking).
Merging two ranked lists greedily by these odds maximises the expected hits of every prefix
when each list's hit chance falls with its place (the histograms are made non-increasing).
Faust-free and tested alone (`tests/test_fresh_slots.py`).
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


class SlotOdds:
    """Decayed counts: `memory` is about how many recent observations they weigh."""

    def __init__(self, memory: int = 5000) -> None:
        self.keep = 1.0 - 1.0 / max(2, memory)
        self.tail_share = np.zeros(2)  # decayed (tail interactions, all interactions)
        self.places = np.zeros((2, PLACES))  # decayed hits by place: [0] tail targets, [1] known
        self.observed = np.zeros(2)  # decayed targets of each kind, found or not
        self._chances: tuple[np.ndarray, np.ndarray] | None = None  # `chances`, until the next target

    def interaction(self, tail: bool) -> None:
        """Every recorded interaction: was its item a tail item (at most one interaction) then?"""
        self.tail_share *= self.keep
        self.tail_share += (float(tail), 1.0)

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
        return float(self.tail_share[0] / self.tail_share[1]) if self.tail_share[1] > 0 else 0.0

    def chances(self) -> tuple[np.ndarray, np.ndarray]:
        """P(target at place i | its kind) for the tail and the known ranking, made
        non-increasing by pooling adjacent places that rise (a place seen hit less often than
        the next one, by chance, must not end the ranking's claim)."""
        if self._chances is None:
            smoothed = (self.places + SMOOTHING / PLACES) / (self.observed[:, None] + SMOOTHING)
            self._chances = (_non_increasing(smoothed[0]), _non_increasing(smoothed[1]))
        return self._chances

    def merge(self, known: Sequence[int], tail: Sequence[int], k: int) -> list[int]:
        """The first k of two rankings (candidate positions, best first), each place to the
        ranking whose next item is the likelier target; ties to the known ranking."""
        p = self.p_tail()
        tail_chance, known_chance = self.chances()
        tail_odds, known_odds = p * tail_chance, (1.0 - p) * known_chance
        out: list[int] = []
        i = j = 0
        while len(out) < k and (i < len(tail) or j < len(known)):
            take_tail = j >= len(known) or (
                i < len(tail) and tail_odds[min(i, PLACES - 1)] > known_odds[min(j, PLACES - 1)]
            )
            if take_tail:
                out.append(tail[i])
                i += 1
            else:
                out.append(known[j])
                j += 1
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
