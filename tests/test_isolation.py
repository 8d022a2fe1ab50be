"""No valid event, user or refit stops recommendations for the others (issue 16, item 5).

The serving path from a profile to a pushed list, without a broker: `streams.rank`,
`streams.profile`, `streams.recommend` and the stream processor's push, over the in-memory
vector store. The property test drives random streams of events the contract accepts."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams import metrics
from streams.app import MAX_FUTURE_S, Due, StreamsApp, StreamsConfig
from streams.background import Backlog
from streams.popularity import RecentPopularity
from streams.profile import MAX_WEIGHT, Profile, ProfileRule
from streams.rank import FEATURES, BlendRanker, Group, ItemStats, RankConfig, Refit, Request
from streams.recommend import Recommender
from topics import Interaction, TopicNames
from topics.events import DEFAULT_EVENT_WEIGHTS, MAX_TIMESTAMP

from vectorstore import MemoryVectorStore, VectorRecord

N_ITEMS, DIM = 40, 8
NOW = 1_700_000_000.0
FAST = RankConfig(train_rate=1.0, warmup_rate=1.0, min_groups=5, refit_every=5, negatives=5, content_k=10)


def catalogue(seed: int = 3) -> tuple[MemoryVectorStore, list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"i{n:02d}" for n in range(N_ITEMS)]
    store = MemoryVectorStore()
    store.open(DIM, "test", "text")
    store.upsert([VectorRecord(i, v, created_at=NOW) for i, v in zip(ids, vectors, strict=True)])
    return store, ids, vectors


def recommender(store: MemoryVectorStore, rank: RankConfig = FAST) -> Recommender:
    return Recommender(store, RecentPopularity(), k=5, rank=rank)


def feed(rec: Recommender, vectors: dict[str, np.ndarray], events: list[tuple[str, str, str, float | None, float]], rule: ProfileRule) -> dict[str, Profile]:
    """Apply events the way the profile agent does (observation, profile, popularity), one
    observed batch per event so that refits happen along the stream."""
    profiles: dict[str, Profile] = {}
    for user, item, event, value, ts in events:
        profile = profiles.setdefault(user, Profile(user))
        observation = rec.observation(profile, item, ts)
        profile.apply(item, vectors[item], event, value, ts, rule)
        rec.popularity.add(item, ts, 1.0)
        rec.observe([observation])
    return profiles


# --- one odd timestamp ----------------------------------------------------------------------------


def test_decayed_counts_stay_finite_for_a_moment_long_before_the_stream_clock() -> None:
    """The reported failure: an interaction dated 1970 after a 2023 stream made `_now` raise 2
    to a power past float range, and the next refit learnt non-finite weights."""
    stats = ItemStats(86400.0, 7 * 86400.0)
    for n in range(5):
        stats.add(f"i{n}", NOW + n)
    rows = stats.rows([f"i{n}" for n in range(5)])
    for ts in (0.0, NOW - 400 * 86400, NOW, MAX_TIMESTAMP):
        assert np.isfinite(stats.decayed(rows, ts)).all(), ts


def test_a_late_event_yields_finite_training_groups_and_a_finite_model() -> None:
    store, ids, vectors = catalogue()
    rec = recommender(store)
    by_id = dict(zip(ids, vectors, strict=True))
    events = [(f"u{n % 4}", ids[n % N_ITEMS], "click", None, NOW + 60 * n) for n in range(60)]
    events.insert(30, ("u1", ids[7], "click", None, 0.0))  # valid: unix time 0
    profiles = feed(rec, by_id, events, ProfileRule())
    assert rec.ranker.fits >= 1 and np.isfinite(rec.ranker.model.weights).all()
    assert all(np.isfinite(g.x).all() for g in rec.ranker.groups)
    for hits in rec.recommend(list(profiles.values())):
        assert hits and all(math.isfinite(s) for _, s in hits)


# --- any valid stream -----------------------------------------------------------------------------

TIMESTAMPS = st.one_of(
    st.floats(min_value=0.0, max_value=MAX_TIMESTAMP, allow_nan=False),
    st.sampled_from([0.0, 1.0, NOW, NOW + 1e-6, MAX_TIMESTAMP]),
)
VALUES = st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([-1e308, 1e308, 0.0]))
EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["u0", "u1", "u2", "neg"]),
        st.integers(0, N_ITEMS - 1),
        st.sampled_from(sorted(DEFAULT_EVENT_WEIGHTS)),
        VALUES,
        TIMESTAMPS,
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=EVENTS)
def test_every_user_of_any_valid_stream_gets_a_finite_list(events: list[tuple[str, int, str, float | None, float]]) -> None:
    """Any timestamps the contract accepts, in any order, any finite value, users of only
    negative events (`neg` only hides and skips): every user gets a non-empty list of finite
    scores that passes the Recs contract, and no non-finite number reaches the model."""
    store, ids, vectors = catalogue()
    by_id = dict(zip(ids, vectors, strict=True))
    rule = ProfileRule(weights=DEFAULT_EVENT_WEIGHTS, rating_neutral=3.0, half_life_s=86400.0)
    rows = []
    for user, n, event, value, ts in events:
        Interaction(user_id=user, item_id=ids[n], event=event, value=value, ts=ts)  # the contract accepts it
        rows.append((user, ids[n], "hide" if user == "neg" else event, value, ts))
    rec = recommender(store)
    profiles = feed(rec, by_id, rows, rule)
    assert all(np.isfinite(g.x).all() for g in rec.ranker.groups)
    assert rec.ranker.model.weights is None or np.isfinite(rec.ranker.model.weights).all()
    for profile, hits in zip(profiles.values(), rec.recommend(list(profiles.values())), strict=True):
        assert hits, profile.user_id
        assert all(math.isfinite(s) for _, s in hits)
        assert not {i for i, _ in hits} & set(profile.seen) or len(profile.seen) == N_ITEMS


def test_an_extreme_rating_cannot_overflow_a_profile() -> None:
    rule = ProfileRule(rating_neutral=3.0)
    assert rule.weight("rating", 1e308) == MAX_WEIGHT and rule.weight("rating", -1e308) == -MAX_WEIGHT
    profile = Profile("u")
    vector = np.ones(DIM, dtype=np.float32)
    for n in range(50):
        profile.apply(f"i{n}", vector, "rating", 1e308, NOW, rule)
    assert profile.as_array() is not None and np.isfinite(profile.as_array()).all()
    assert Profile("v", vector=[math.inf] * DIM).as_array() is None


# --- a bad refit ----------------------------------------------------------------------------------


def _groups(n: int, signal: float, seed: int) -> list[Group]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.normal(size=(6, len(FEATURES)))
        x[0, 0] += signal  # the positive stands out on cos_mean when signal > 0
        out.append(Group(x))
    return out


def test_a_refit_with_non_finite_weights_is_rejected_and_the_model_stays() -> None:
    ranker = BlendRanker(FAST)
    weights = np.arange(len(FEATURES), dtype=float)
    ranker.model.weights = weights
    assert not ranker.install(Refit(None, _groups(5, 1.0, 0), None))
    assert not ranker.install(Refit(np.full(len(FEATURES), np.nan), _groups(5, 1.0, 0), np.full(len(FEATURES), np.nan)))
    assert ranker.model.weights is weights and ranker.rejected == {"non-finite weights": 2}
    bad = _groups(10, 1.0, 0)
    bad[3].x[2, 4] = np.inf
    assert ranker.model.fitted(bad) is not None, "a group with a non-finite feature is left out of a fit"


def test_a_refit_that_orders_the_held_back_groups_worse_is_rejected() -> None:
    ranker = BlendRanker(FAST)
    good = np.zeros(len(FEATURES))
    good[0] = 1.0
    ranker.model.weights = good
    held = _groups(200, 3.0, 1)
    assert not ranker.install(Refit(-good, held, -good)), "a model that ranks the positive last"
    assert ranker.model.weights is good and ranker.rejected == {"worse on held-back groups": 1}
    assert ranker.last_rejection == "worse on held-back groups"
    better = good * 2
    assert ranker.install(Refit(better, held, better)) and ranker.model.weights is better


def test_training_learns_on_the_rest_and_adopts_the_fit_on_every_group() -> None:
    ranker = BlendRanker(FAST)
    groups = _groups(100, 2.0, 2)
    refit = ranker.train(groups)
    assert len(refit.held) == 10 and refit.held == groups[-10:]
    np.testing.assert_allclose(refit.adopted, ranker.model.fitted(groups))
    assert ranker.install(refit) and ranker.model.weights is refit.adopted and ranker.fits == 1


# --- one user's ranking -----------------------------------------------------------------------------


def _profiles(ids: list[str], vectors: np.ndarray) -> list[Profile]:
    out = []
    for u in range(4):
        profile = Profile(f"u{u}")
        for n in range(3):
            profile.apply(ids[u * 3 + n], vectors[u * 3 + n], "click", None, NOW + n, ProfileRule())
        out.append(profile)
    return out


def test_a_user_whose_ranking_fails_gets_the_fallback_and_the_others_their_blend(monkeypatch: pytest.MonkeyPatch) -> None:
    store, ids, vectors = catalogue()
    rec = recommender(store)
    profiles = _profiles(ids, vectors)
    expected = rec.recommend(profiles)
    rank = rec.ranker.rank

    def poisoned(requests: list[Request], content: object, k: int, serving: RankConfig | None = None) -> list:
        if any(ids[3] in r.history for r in requests):  # u1's history
            raise ValueError("odd user")
        return rank(requests, content, k, serving)

    monkeypatch.setattr(rec.ranker, "rank", poisoned)
    before = metrics.RANK_FALLBACKS._value.get()
    lists = rec.recommend(profiles)
    assert lists[0] == expected[0] and lists[2:] == expected[2:]
    assert lists[1] and all(math.isfinite(s) for _, s in lists[1]) and not {i for i, _ in lists[1]} & set(profiles[1].seen)
    assert metrics.RANK_FALLBACKS._value.get() == before + 1


def test_a_model_with_non_finite_scores_serves_the_content_fallback_to_everyone() -> None:
    store, ids, vectors = catalogue()
    rec = recommender(store)
    profiles = _profiles(ids, vectors)
    rec.ranker.model.weights = np.full(len(FEATURES), np.nan)
    for profile, hits in zip(profiles, rec.recommend(profiles), strict=True):
        assert len(hits) == 5 and all(math.isfinite(s) for _, s in hits)
        nearest = store.search(profile.as_array()[None, :], 5, [set(profile.seen)])[0]
        assert [i for i, _ in hits] == [i for i, _ in nearest]


def test_when_the_vector_store_is_down_the_round_fails_for_a_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    store, ids, vectors = catalogue()
    rec = recommender(store)
    profiles = _profiles(ids, vectors)

    def down(*args: object, **kwargs: object) -> None:
        raise ConnectionError("milvus is down")

    monkeypatch.setattr(store, "search", down)
    monkeypatch.setattr(store, "space", down)
    with pytest.raises(ConnectionError):
        rec.recommend(profiles)
    monkeypatch.undo()
    assert all(rec.recommend(profiles)), "recs resume once it answers"


# --- the stream processor's boundary ------------------------------------------------------------------


def test_an_interaction_dated_far_ahead_is_read_at_the_allowed_limit() -> None:
    late = Interaction(user_id="u", item_id="i", event="click", ts=MAX_TIMESTAMP)
    now = time.time()
    clamped = StreamsApp._dated(late)
    assert now + MAX_FUTURE_S <= clamped.ts <= time.time() + MAX_FUTURE_S
    ordinary = Interaction(user_id="u", item_id="i", event="click", ts=now)
    assert StreamsApp._dated(ordinary) is ordinary


def test_a_list_that_fails_the_contract_is_counted_and_not_pushed() -> None:
    app = StreamsApp(StreamsConfig(topics=TopicNames(), app_id="isolation-test"), MemoryVectorStore())
    before = metrics.RECS_INVALID._value.get()
    assert not app._push("u", [("i", math.nan)], "interaction")
    assert metrics.RECS_INVALID._value.get() == before + 1 and "u" not in app.last_recs


def round_app(monkeypatch: pytest.MonkeyPatch, users: str) -> StreamsApp:
    """A stream processor (no broker) whose users are due in order, each with a profile."""
    app = StreamsApp(StreamsConfig(topics=TopicNames(), app_id="isolation-test", refresh_max=2), MemoryVectorStore())
    stored = {u: Profile(u, seen=[f"item-{u}"]).to_dict() for u in users}
    monkeypatch.setattr(app, "stored_profile", stored.get)
    app.model = "test"
    for n, user in enumerate(users):
        app._mark_due(user, Due(0, arrived=NOW + n))
    return app


def test_rounds_push_every_due_user_once_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    app = round_app(monkeypatch, "abcde")
    pushed: list[str] = []
    monkeypatch.setattr(app, "_push", lambda user, items, trigger, answers=None: pushed.append(user) or True)

    async def drain() -> None:
        while app.due:
            await app._refresh_round()

    asyncio.run(drain())
    assert pushed == list("abcde"), "three rounds of at most two, oldest first"


def test_a_failed_round_puts_its_users_back_first_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    app = round_app(monkeypatch, "abcde")

    def down(profiles: object, k: int | None = None, places: object = None) -> list[list[tuple[str, float]]]:
        app._mark_due("a", Due(0, arrived=NOW - 5))  # a's earlier event, re-delivered meanwhile
        raise ConnectionError("vector store down")

    monkeypatch.setattr(app.ranking, "recommend", down)

    async def one_round() -> None:
        with pytest.raises(ConnectionError):
            await app._refresh_round()

    asyncio.run(one_round())
    assert list(app.due) == list("abcde"), "a and b are back before c, d and e"
    assert [due.arrived for due in app.due.values()] == [NOW - 5] + [NOW + n for n in range(1, 5)], "the older arrival wins"


# --- work beside the hot path ------------------------------------------------------------------------


def test_a_backlog_coalesces_by_key_retries_what_may_succeed_and_reports_its_age() -> None:
    clock = [100.0]
    calls: list[list[str]] = []
    failures = [1]

    def handle(values: list[str]) -> None:
        calls.append(list(values))
        if failures[0]:
            failures[0] -= 1
            raise ConnectionError("store down")

    backlog: Backlog[str, str] = Backlog("learn", handle, retry=True, clock=lambda: clock[0])
    backlog.put("a", "a1")
    clock[0] = 103.0
    backlog.put("b", "b1")
    backlog.put("a", "a2")  # replaces a1, keeps its place and age
    assert len(backlog) == 2 and backlog.lag() == 0.0 + 3.0

    async def drain() -> None:
        task = asyncio.create_task(backlog.run())
        while backlog.handled < 2:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(drain())
    assert calls == [["a2", "b1"], ["a2", "b1"]] and backlog.lag() == 0.0


def test_a_backlog_without_retry_drops_a_failed_batch_and_goes_on() -> None:
    calls: list[list[int]] = []

    def handle(values: list[int]) -> None:
        calls.append(list(values))
        if values == [1]:
            raise ValueError("bad batch")

    backlog: Backlog[int, int] = Backlog("learn", handle, retry=False)

    async def drain() -> None:
        task = asyncio.create_task(backlog.run())
        backlog.put(1, 1)
        while not calls:
            await asyncio.sleep(0.01)
        backlog.put(2, 2)
        while backlog.handled < 1:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(drain())
    assert calls == [[1], [2]] and len(backlog) == 0


def test_warming_up_ranks_over_stored_items_without_learning_or_counting() -> None:
    store, _, _ = catalogue()
    rec = recommender(store)
    rec.warm_up()
    assert rec.ranker.stats.ids, "the ranking ran: its candidates were interned"
    assert not rec.ranker.groups
    assert rec.ranker.stats.clock == 0.0 and rec.ranker.fits == 0
    empty = MemoryVectorStore()
    recommender(empty).warm_up()  # no collection yet: nothing to do


def test_with_a_ranking_process_two_rounds_are_in_flight_and_pushed_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next round is sent while the ranking process ranks this one (at most two at a time);
    they are answered and pushed in the order they were sent, so a user marked again during a
    round gets the later push last."""
    from concurrent.futures import Future

    from streams.ranking_process import RankingProcess

    app = round_app(monkeypatch, "abcde")
    sent: list[tuple[list[str], Future]] = []

    class Child(RankingProcess):
        def __init__(self) -> None:  # no process: the test answers the calls
            pass

        def submit_recommend(self, profiles, k=None, places=None):  # noqa: ANN001, ANN201 - the test's stand-in
            future: Future = Future()
            sent.append(([p.user_id for p in profiles], future))
            return future

    app.ranking = Child()
    pushed: list[str] = []
    monkeypatch.setattr(app, "_push", lambda user, items, trigger, answers=None: pushed.append(user) or True)

    async def run() -> None:
        refresher = asyncio.ensure_future(app._refresher())
        await asyncio.sleep(0.01)
        assert [users for users, _ in sent] == [["a", "b"], ["c", "d"]], "two rounds in flight, the third waits"
        app._mark_due("a", Due(0, arrived=NOW + 10))  # a clicks again while its first round is out
        sent[0][1].set_result([[("x", 1.0)]] * 2)
        await asyncio.sleep(0.01)
        assert pushed == ["a", "b"]
        assert [users for users, _ in sent][2] == ["e", "a"], "the next round starts when one ends"
        sent[1][1].set_result([[("x", 1.0)]] * 2)
        sent[2][1].set_result([[("x", 1.0)]] * 2)
        await asyncio.sleep(0.01)
        refresher.cancel()

    asyncio.run(run())
    assert pushed == ["a", "b", "c", "d", "e", "a"]
    assert not app.due


def test_a_partition_taken_away_mid_report_is_skipped_and_the_others_reported() -> None:
    """The lag timer read the assignment, then a rebalance (a second stream processor joining)
    took a partition away before `position`: aiokafka's IllegalStateError crashed the stream
    processor. Now that partition is skipped."""
    from aiokafka.errors import IllegalStateError
    from faust.types import TP

    app = StreamsApp(StreamsConfig(topics=TopicNames(), app_id="isolation-test"), MemoryVectorStore())
    kept, taken = TP(app.config.topics.interactions, 0), TP(app.config.topics.interactions, 1)

    class Rebalanced:
        def assignment(self) -> set[TP]:
            return {kept, taken}

        async def highwaters(self, *tps: TP) -> dict[TP, int]:
            return {tp: 10 for tp in tps}

        async def position(self, tp: TP) -> int:
            if tp == taken:
                raise IllegalStateError(f"Partition {tp} is not assigned")
            return 4

    try:
        asyncio.run(app._report_lag_of(Rebalanced()))
        assert metrics.CONSUMER_LAG.labels(kept.topic, "0")._value.get() == 6
    finally:
        metrics.CONSUMER_LAG.clear()  # other tests read the gauge as this process's own
