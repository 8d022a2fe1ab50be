"""What users take right after an item (`streams/sequence.py`), and the ranker's use of it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from streams.rank import COLUMN, BlendRanker, RankConfig
from streams.sequence import Transitions
from streams.variants import parse_variants
from test_rank import FAST, Replay, world

DAY = 86400.0


def test_a_transition_weighs_less_the_further_back_its_item_and_has_a_direction() -> None:
    seq = Transitions(steps=3, half_life_s=DAY)
    seq.add("d", ["a", "b", "c"], 0.0)  # c just before d, b two steps back, a three
    assert seq.successors("c") == pytest.approx({"d": 1 / (1 + 1)})  # one transition, smoothed by one of now
    assert seq.successors("b") == pytest.approx({"d": 0.5 / (0.5 + 1)})
    assert seq.successors("a") == pytest.approx({"d": 0.25 / (0.25 + 1)})
    assert seq.successors("d") == {}, "d was never followed by anything"
    seq.add("e", ["x", "y", "z", "a", "b", "c"], 0.0)  # only the last three count
    assert "e" not in seq.successors("x") and "e" in seq.successors("a")


def test_recent_transitions_outweigh_old_ones() -> None:
    seq = Transitions(steps=1, half_life_s=DAY)
    for n in range(4):
        seq.add("old", ["a"], n * 60.0)
    seq.add("new", ["a"], 10 * DAY)  # four transitions ten half-lives ago against one now
    shares = seq.successors("a")
    assert shares["new"] > 100 * shares["old"]
    assert shares["new"] == pytest.approx(1 / (1 + 4 * 2**-10 + 1), rel=1e-5)


def test_a_round_of_queries_scores_each_as_it_would_alone() -> None:
    seq = Transitions(steps=2, half_life_s=DAY)
    rng = np.random.default_rng(3)
    items = [f"i{n}" for n in range(30)]
    for user in range(40):
        walk = list(rng.choice(items, size=6, replace=False))
        for step in range(1, len(walk)):
            seq.add(walk[step], walk[:step], user * 100.0 + step)
    queries = [list(rng.choice(items, size=3, replace=False)) for _ in range(8)] + [[], ["unknown"]]
    starts, found, scores = seq.sparse_many(queries)
    for n, query in enumerate(queries):
        alone: dict[str, float] = {}
        for place, item in enumerate(reversed(query[-2:])):
            for successor, share in seq.successors(item).items():
                alone[successor] = alone.get(successor, 0.0) + 0.5**place * share
        got = {seq.ids[j]: s for j, s in zip(found[starts[n] : starts[n + 1]], scores[starts[n] : starts[n + 1]], strict=True)}
        assert got == pytest.approx(alone)


def test_memory_is_bounded_and_forgetting_re_indexes() -> None:
    seq = Transitions(steps=1, half_life_s=DAY, max_successors=5, max_items=50)
    for n in range(200):
        seq.add(f"next{n}", ["hub"], float(n))
    assert len(seq._out[seq.index["hub"]]) <= 10  # noqa: SLF001 - the bound itself
    generation = seq.generation
    for n in range(200):
        seq.add(f"b{n}", [f"a{n}"], 1000.0 + n)
    assert len(seq) <= 60 and seq.generation > generation
    assert seq.successors("a199") == pytest.approx({"b199": 0.5})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.floats(-1e10, 1e11, allow_nan=False)), min_size=2, max_size=40))
@example([(2, 3.56e9), (6, -1e10), (2, 1e11), (5, -1e10)])  # an early event first: the clock once started at 0
def test_any_valid_times_in_any_order_give_finite_scores(events: list[tuple[int, float]]) -> None:
    """The contract accepts any finite timestamp, in any order: a late event from 1970 after
    one from the year 5000 must neither overflow the weights nor make a score non-finite."""
    seq = Transitions(steps=3, half_life_s=DAY)
    history: list[str] = []
    with np.errstate(over="raise", invalid="raise"):
        for item, ts in events:
            name = f"i{item}"
            if name not in history:
                seq.add(name, history, ts)
                history.append(name)
        _, _, scores = seq.sparse_many([history, history[:1]])
    assert np.isfinite(scores).all() and (scores >= 0).all()


def test_the_ranker_offers_and_scores_what_follows_the_users_last_item() -> None:
    content, ids, _ = world()
    ranker = BlendRanker(RankConfig(**{**FAST.__dict__, "min_groups": 10**6, "sequence_steps": 3}))
    replay = Replay(ranker, content)
    ts = 1_700_000_000.0
    for user in range(6):  # everyone takes ids[1] right after ids[0]
        replay.feed([(f"u{user}", ids[0], ts), (f"u{user}", ids[1], ts + 60.0)])
        ts += 600.0
    replay.feed([("new", ids[0], ts)])
    pool = ranker.candidates([replay.request("new", ts + 60.0)], content)[0]
    row = ranker.stats.index[ids[1]]
    assert row in pool and pool.rr_of("sequence", np.array([row]))[0] == 1.0
    x = ranker._scored([replay.request("new", ts + 60.0)], ranker._round([replay.request("new", ts + 60.0)], content), content)  # noqa: SLF001
    at = int(np.flatnonzero(pool.rows == row)[0])
    assert x[at, COLUMN["seq_recent"]] == pytest.approx(6 / 7, rel=1e-3), "six of six transitions, one of now added"
    assert math.isclose(x[:, COLUMN["seq_recent"]].sum(), x[at, COLUMN["seq_recent"]]), "nothing else follows ids[0]"


def test_the_sequence_signal_is_off_unless_asked_for_and_a_variant_may_drop_its_candidates() -> None:
    assert RankConfig().sequence_steps == 0
    (variant,) = parse_variants([{"name": "features-only", "share": 1.0, "sequence_k": 0}])
    assert variant.config(RankConfig(sequence_steps=3)) == RankConfig(sequence_steps=3, sequence_k=0)


def test_without_steps_there_is_no_sequence_signal() -> None:
    content, ids, _ = world()
    ranker = BlendRanker(RankConfig(**{**FAST.__dict__, "sequence_steps": 0}))
    replay = Replay(ranker, content)
    replay.feed([("a", ids[0], 0.0), ("a", ids[1], 60.0), ("b", ids[0], 120.0)])
    assert len(ranker.seq) == 0
    pool = ranker.candidates([replay.request("b", 180.0)], content)[0]
    assert not pool.rr["sequence"].any()
