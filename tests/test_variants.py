"""streams.variants: parsing, the stable assignment, per-variant ranking and online hits,
without a broker. On the local stack: tests/test_streams.py."""

from __future__ import annotations

import json
import re
import urllib.request
import uuid
from typing import Any

import numpy as np
import pytest

from streams.popularity import RecentPopularity
from streams.profile import Profile
from streams.rank import RankConfig
from streams.recommend import Recommender
from streams.variants import DEFAULT_VARIANT, Assignment, Variant, VariantError, online_hit, parse_variants
from vectorstore import MemoryVectorStore, MilvusVectorStore, VectorRecord

TWO = [{"name": "control", "share": 0.5}, {"name": "no-tail", "share": 0.5, "tail_slots": 0, "popular_k": 10}]


def test_no_variants_means_one_default_for_everyone() -> None:
    (only,) = parse_variants([])
    assert only == Variant(DEFAULT_VARIANT, 1.0) and only.config(RankConfig()) == RankConfig()
    assert Assignment([only]).of("anyone") is only


def test_overrides_reach_the_serving_settings_only() -> None:
    control, no_tail = parse_variants(TWO)
    base = RankConfig(content_k=30)
    assert control.config(base) == base
    assert no_tail.config(base) == RankConfig(content_k=30, tail_slots=0, popular_k=10)
    assert isinstance(no_tail.config(base).popular_k, int)


@pytest.mark.parametrize(("spec", "message"), [
    ([{"name": "a", "share": 0.5}], "add up to 1"),
    ([{"name": "a", "share": 0.5}, {"name": "a", "share": 0.5}], "must differ"),
    ([{"name": "a b", "share": 1}], "name must be"),
    ([{"name": "a", "share": 0}], "share must be"),
    ([{"name": "a", "share": True}], "share must be"),
    ([{"name": "a", "share": 1, "l2": 2.0}], "'l2' cannot be overridden"),
    ([{"name": "a", "share": 1, "tail_slots": 1.5}], "whole number"),
    ([{"name": "a", "share": 1, "fresh_k": -1}], "at least 0"),
    ([{"name": "a", "share": 1, "fresh_window_s": float("nan")}], "at least 0"),
    (["a"], "must be an object"),
])
def test_bad_specifications_say_what_to_fix(spec: list, message: str) -> None:
    with pytest.raises(VariantError, match=message):
        parse_variants(spec)


def test_each_user_is_in_one_variant_stably_and_shares_hold() -> None:
    variants = parse_variants([{"name": "a", "share": 0.2}, {"name": "b", "share": 0.3}, {"name": "c", "share": 0.5}])
    assignment = Assignment(variants)
    users = [f"user-{n}" for n in range(20_000)]
    first = [assignment.of(u).name for u in users]
    assert first == [Assignment(variants).of(u).name for u in users], "the same on every worker and restart"
    for name, share in (("a", 0.2), ("b", 0.3), ("c", 0.5)):
        assert abs(first.count(name) / len(users) - share) < 0.02
    assert assignment.of("\ud800 lone surrogate").name in {"a", "b", "c"}, "any id the contract accepts"


def test_online_hit_counts_the_place_in_the_list() -> None:
    shown = [f"i{n}" for n in range(20)]
    assert online_hit(shown, "i0") == {10: True, 20: True}
    assert online_hit(shown, "i15") == {10: False, 20: True}
    assert online_hit(shown, "nope") == {10: False, 20: False}


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_each_variant_ranks_its_users_with_its_settings() -> None:
    """One round with users of two variants: each list is what its variant's settings give
    when that user is ranked alone with them, and the ranker's own settings are back after."""
    rng = np.random.default_rng(5)
    store = MemoryVectorStore()
    store.open(8, "m", "text")
    vectors = unit(rng.normal(size=(60, 8)))
    store.upsert([VectorRecord(f"i{n:02d}", vectors[n]) for n in range(60)])
    spec = [{"name": "wide", "share": 0.5}, {"name": "narrow", "share": 0.5, "content_k": 3, "tail_slots": 0}]
    variants = parse_variants(spec)
    recommender = Recommender(store, RecentPopularity(3600.0), k=10, variants=variants)
    profiles = [Profile(f"u{n}", vector=vectors[n].astype(np.float64).tolist(), seen=[f"i{n:02d}"]) for n in range(12)]
    lists = recommender.recommend(profiles)
    names = {recommender.variant_of(p.user_id) for p in profiles}
    assert names == {"wide", "narrow"}, "both variants in the round"
    own = recommender.ranker.config
    by_name = {v.name: v for v in variants}
    for profile, hits in zip(profiles, lists, strict=True):
        serving = by_name[recommender.variant_of(profile.user_id)].config(RankConfig())
        alone = Recommender(store, RecentPopularity(3600.0), k=10, rank=serving).recommend([profile])[0]
        assert [i for i, _ in hits] == [i for i, _ in alone], profile.user_id
        assert np.allclose([s for _, s in hits], [s for _, s in alone], atol=1e-6)
    assert recommender.ranker.config is own, "the ranker's own settings are back"
    differ = [p for p in profiles if Recommender(store, RecentPopularity(3600.0), k=10).recommend([p])[0] != Recommender(
        store, RecentPopularity(3600.0), k=10, rank=by_name["narrow"].config(RankConfig())).recommend([p])[0]]
    assert differ, "the variants' settings change some lists: the check above can fail"


# --- on the local stack --------------------------------------------------------------------
@pytest.mark.integration
def test_two_variants_side_by_side_on_the_local_stack(infra: Any) -> None:
    """A real stream processor serving two variants: every push names its user's variant
    (each user in exactly one), and /metrics counts each variant's online hits when users
    click what they were shown."""
    from conftest import isolate
    from test_streams import DIM, ITEMS, MODEL, STRATEGY, Streams, click, recs_for, send

    spec = [{"name": "wide", "share": 0.5}, {"name": "narrow", "share": 0.5, "tail_slots": 0, "popular_k": 5}]
    stack = isolate(infra, uuid.uuid4().hex[:8], VLM4REC_RANK_VARIANTS=json.dumps(spec))
    settings = stack.settings()
    assignment = Assignment(parse_variants(spec))
    users = [f"user-{n}" for n in range(8)]
    expected = {u: assignment.of(u).name for u in users}
    assert set(expected.values()) == {"wide", "narrow"}, "both variants among the users"
    items = MilvusVectorStore(settings.milvus_uri, settings.milvus_collection)
    items.open(DIM, MODEL, STRATEGY)
    items.upsert([VectorRecord(i, v) for i, v in ITEMS.items()])
    streams = Streams(stack)
    streams.start()
    try:
        t = settings.topics.interactions
        send(settings, [(t, click(u, "red-1")) for u in users])
        shown = {u: recs_for(settings, u, 1)[-1] for u in users}
        assert {u: r.variant for u, r in shown.items()} == expected
        # each user takes the first item they were shown: a hit at 10 and at 20
        send(settings, [(t, click(u, shown[u].items[0].item_id, ts=1_700_000_001.0)) for u in users])
        for u in users:
            streams.wait_user(u, 2)
        pushes = recs_for(settings, users[0], 2)
        assert {r.variant for r in pushes} == {expected[users[0]]}, "a user stays in one variant"
        metrics = urllib.request.urlopen(streams.url + "/metrics", timeout=10).read().decode()

        def counter(name: str, **labels: str) -> float:
            for line in re.findall(rf"^{name}\{{(.*)\}} (\S+)$", metrics, re.M):
                if dict(re.findall(r'(\w+)="([^"]*)"', line[0])) == labels:
                    return float(line[1])
            return 0.0

        for name in ("wide", "narrow"):
            members = sum(v == name for v in expected.values())
            assert counter("vlm4rec_streams_online_judged_total", variant=name) == members, metrics[-3000:]
            assert counter("vlm4rec_streams_online_hits_total", variant=name, k="10") == members
            assert counter("vlm4rec_streams_online_hits_total", variant=name, k="20") == members
    finally:
        streams.stop()
        items.close()
