"""Profile maths and ranking (pure functions shared by streams and the evaluator)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from streams.popularity import RecentPopularity
from streams.profile import Profile, ProfileRule, Ranker, mean_profile, top_k

X, Y = np.array([1.0, 0.0]), np.array([0.0, 3.0])


def test_default_rule_is_the_mean_of_distinct_items() -> None:
    p = Profile("u")
    rule = ProfileRule()
    p.apply("a", X, "click", None, 1, rule)
    p.apply("b", Y, "view", None, 2, rule)
    p.apply("a", X, "purchase", None, 3, rule)  # repeat: counted, but not added again
    assert p.count == 3 and p.seen == ["b", "a"]
    assert np.allclose(p.as_array(), [2**-0.5, 2**-0.5])
    assert np.allclose(p.as_array(), mean_profile([X, Y]))


def test_event_weights_and_negative_events_pull_away() -> None:
    rule = ProfileRule(weights={"like": 3.0, "hide": -1.0}, distinct=False)
    p = Profile("u")
    p.apply("a", X, "like", None, 1, rule)
    p.apply("b", Y, "click", None, 2, rule)  # unknown weight: default 1
    assert p.as_array()[0] > p.as_array()[1]
    p.apply("c", np.array([1.0, 0.2]), "hide", None, 3, rule)
    assert p.as_array()[1] > 0.3  # pushed away from the hidden direction


def test_rating_scales_around_neutral() -> None:
    rule = ProfileRule(rating_neutral=3.0)
    assert rule.weight("rating", 5) == 1.0
    assert rule.weight("rating", 1) == -1.0
    assert rule.weight("rating", 3) == 0.0
    assert ProfileRule().weight("rating", 1) == 1.0  # plain mean ignores the value


def test_time_decay_halves_old_signal() -> None:
    rule = ProfileRule(half_life_s=10.0)
    p = Profile("u")
    p.apply("a", X, "click", None, 0, rule)
    p.apply("b", Y, "click", None, 10, rule)
    assert np.allclose(p.vector, [0.5, 1.0])


def test_offsets_make_re_delivery_harmless() -> None:
    p = Profile("u")
    assert not p.already_seen("interactions:1", 5)
    p.mark_seen("interactions:1", 5)
    assert p.already_seen("interactions:1", 5) and p.already_seen("interactions:1", 4)
    assert not p.already_seen("interactions:2", 5)


def test_a_deferred_interaction_counts_once_whichever_way_it_comes_back() -> None:
    p = Profile("u")
    p.await_origin("interactions:1:3")
    p.await_origin("interactions:1:3")
    assert p.take_awaited("interactions:1:3"), "its first release counts"
    assert not p.take_awaited("interactions:1:3"), "a second release of it does not"
    assert not p.take_awaited("interactions:1:4"), "nor one of an interaction applied directly"
    assert Profile.from_dict(p.to_dict()).awaiting == []


def test_profile_round_trips_as_json_dict() -> None:
    p = Profile("u")
    p.apply("a", X, "click", None, 1.5, ProfileRule())
    p.mark_seen("t:0", 3)
    again = Profile.from_dict(json.loads(json.dumps(p.to_dict())))
    assert again == p


def test_the_vector_round_trips_exactly_packed_and_from_older_changelogs() -> None:
    """The profile read back is the one in memory, to the bit (the vector is float32 in both);
    the two older formats (float64 packed, a JSON list) are still read."""
    vector = [0.1, -1e-30, 1e30, 1 / 3, float("nan")]
    profile = Profile("u", vector=vector)
    packed = profile.to_dict()
    assert isinstance(packed["vector32"], str) and "vector" not in packed
    back = Profile.from_dict(json.loads(json.dumps(packed))).vector
    assert back is not None and back.tobytes() == profile.vector.tobytes()
    assert back.tolist()[:4] == np.asarray(vector[:4], dtype=np.float32).tolist()
    older = {k: v for k, v in packed.items() if k != "vector32"}
    as_f8 = base64.b64encode(np.asarray(vector, dtype="<f8").tobytes()).decode()
    assert Profile.from_dict({**older, "vector": as_f8}).vector.tolist()[:4] == back.tolist()[:4]
    assert Profile.from_dict({**older, "vector": [0.25, 0.5]}).vector.tolist() == [0.25, 0.5]
    assert Profile.from_dict({**older, "vector": None}).vector is None
    assert Profile.from_dict({**packed, "vector32": None}).vector is None


def test_a_move_past_float32_range_is_refused_and_the_profile_keeps_its_vector() -> None:
    p = Profile("u", vector=[3e38, 0.0])
    before = p.vector.copy()
    assert not p._pulled(np.array([1.0, 0.0]), 1e38, 1.0, ProfileRule())
    assert p.vector.tobytes() == before.tobytes()


def test_bounded_seen_and_history() -> None:
    rule = ProfileRule(max_seen=3, max_history=2)
    p = Profile("u")
    for n in range(10):
        p.apply(f"i{n}", X, "click", None, n, rule)
    assert p.seen == ["i7", "i8", "i9"] and len(p.history) == 2


def test_user_without_vector() -> None:
    p = Profile("u")
    p.apply("a", None, "click", None, 1, ProfileRule())
    assert p.as_array() is None and p.count == 1


def test_ranker_ties_by_item_id_and_exclusions() -> None:
    ranker = Ranker(["d", "c", "b", "a", "e"])
    scores = np.array([1.0, 2.0, 2.0, 0.5, 2.0])
    assert ranker.top_k(scores, 3) == [("b", 2.0), ("c", 2.0), ("e", 2.0)]
    assert ranker.top_k(scores, 3, exclude={"b", "zzz"}) == [("c", 2.0), ("e", 2.0), ("d", 1.0)]
    assert ranker.top_k(scores, 10, exclude={"a", "b", "c", "d", "e"}) == []
    assert top_k(np.array([1, 1, 1.0]), ["10", "9", "1"], 2) == [("1", 1.0), ("10", 1.0)]


def test_recent_popularity_fades() -> None:
    pop = RecentPopularity(half_life_s=10)
    pop.add("old", 1_700_000_000, 3)
    pop.add("new", 1_700_000_030, 1)  # 3 half-lives later: old is worth 3/8
    assert [i for i, _ in pop.top(2)] == ["new", "old"]
    assert pop.top(5, exclude={"new"})[0][0] == "old"
    pop.add("much-later", 1_700_000_000 + 10_000, 1)  # rescaling must not overflow
    assert pop.top(1)[0][0] == "much-later"


@pytest.mark.parametrize("n", [1, 5])
def test_mean_profile_is_unit(n: int) -> None:
    vectors = np.random.default_rng(n).normal(size=(n, 4))
    assert np.linalg.norm(mean_profile(vectors)) == pytest.approx(1.0, abs=1e-6)
    assert mean_profile([]) is None


def test_a_repeat_moves_the_profile_by_the_difference_of_its_most_telling_event() -> None:
    """With distinct items (the default) an item pulls once, with the weight of its most
    telling event: a hide after a view turns the view's pull into the hide's; a view after a
    purchase leaves the purchase; an item first met without a vector pulls fully later."""
    rule = ProfileRule(weights={"view": 0.5, "purchase": 3.0, "hide": -2.0})
    liked, other = np.array([1.0, 0.0]), np.array([0.0, 1.0])

    def after(*events: tuple[str, np.ndarray | None, str]) -> np.ndarray:
        p = Profile("u")
        for ts, (item, vector, event) in enumerate(events):
            p.apply(item, vector, event, None, float(ts), rule)
        again = Profile.from_dict(json.loads(json.dumps(p.to_dict())))  # the pulls survive the table
        assert again.pulls == p.pulls and len(p.pulls) == len(p.seen)
        return np.asarray(p.vector)

    assert np.allclose(after(("o", other, "view"), ("a", liked, "view"), ("a", liked, "hide")), [-2.0, 0.5])
    assert np.allclose(after(("o", other, "view"), ("a", liked, "purchase"), ("a", liked, "view")), [3.0, 0.5])
    assert np.allclose(after(("a", liked, "hide"), ("a", liked, "purchase")), [3.0, 0.0]), "a changed mind"
    assert np.allclose(after(("a", None, "view"), ("o", other, "view"), ("a", liked, "view")), [0.5, 0.5])


def test_a_profile_written_before_pulls_were_kept_reads_its_items_at_the_default_weight() -> None:
    legacy = {"user_id": "u", "vector": [1.0, 0.0], "count": 1, "seen": ["a"], "history": [["a", "click", 1.0]]}
    p = Profile.from_dict(legacy)
    assert p.pulls == [None]
    p.apply("a", X, "hide", None, 2.0, ProfileRule(weights={"hide": -2.0}))
    assert np.allclose(p.vector, [-2.0, 0.0]) and p.pulls == [-2.0]


def test_the_table_values_history_is_invisible_to_the_garbage_collector_and_the_json_the_same() -> None:
    """A stream processor holds every user's table value: a tracked container per recent
    interaction made each full collection walk them all (docs/hardening.md, the own broker's soak)."""
    import gc
    import json

    profile = Profile("u1", history=[("i1", "click", 1.0), ("i2", "buy", 2.0)])
    stored = profile.to_dict()
    gc.collect()
    assert not any(gc.is_tracked(entry) for entry in stored["history"])
    assert json.loads(json.dumps(stored))["history"] == [["i1", "click", 1.0], ["i2", "buy", 2.0]]
    assert Profile.from_dict(json.loads(json.dumps(stored))).history == profile.history
