"""Shared learning (`streams.observations`): what a stream processor publishes of the
interactions it applies is what every processor's ranker needs to learn from them, and what
cannot be read is skipped and counted, never a stop of the feed."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from streams import metrics
from streams.observations import ObservationFeed, decode, encode
from streams.rank import BlendRanker, RankConfig, Request
from streams.recommend import Observation


def observations() -> list[Observation]:
    profile = np.array([0.6, 0.8, 0.0], dtype=np.float32)
    return [
        Observation(Request(["a", "b"], profile, 10.0), ["a", "b"], True, "c", 10.0),
        Observation(None, ["a", "b", "c"], False, "a", 11.5),
        Observation(Request([], None, 12.0), [], True, "x", 12.0),
    ]


def test_a_batch_round_trips() -> None:
    back = decode(encode(observations()))
    for got, want in zip(back, observations(), strict=True):
        assert (got.recent, got.new, got.item, got.ts) == (want.recent, want.new, want.item, want.ts)
        assert (got.request is None) == (want.request is None)
        if want.request is not None:
            assert got.request is not None and got.request.history == want.request.history and got.request.ts == want.request.ts
            if want.request.profile is None:
                assert got.request.profile is None
            else:
                assert got.request.profile.tobytes() == want.request.profile.tobytes()


def test_the_last_items_and_the_new_flag_record_what_the_whole_history_does() -> None:
    """Counts, co-occurrence and transitions after recording a stream from the observations'
    short `recent` lists equal those from every user's whole history."""
    config = RankConfig(cooc_window=3, sequence_steps=2)
    whole, short = BlendRanker(config), BlendRanker(config)
    rng = np.random.default_rng(3)
    histories: dict[int, list[str]] = {}
    for n in range(3000):
        user, item = int(rng.integers(20)), f"i{int(rng.integers(60))}"
        history = histories.setdefault(user, [])
        whole.record(list(history), item, float(n))
        short.record(history[-short.lookback() :], item, float(n), item not in history)
        if item in history:
            history.remove(item)
        history.append(item)
    assert whole.stats.ids == short.stats.ids
    assert np.array_equal(whole.stats.counts(np.arange(len(whole.stats.ids))), short.stats.counts(np.arange(len(short.stats.ids))))
    queries = [histories[u] for u in sorted(histories)]
    for a, b in zip(whole.cooc.sparse_many(queries), short.cooc.sparse_many(queries), strict=True):
        assert np.array_equal(a, b)
    for a, b in zip(whole.seq.sparse_many(queries), short.seq.sparse_many(queries), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "value",
    [
        b"not json",
        b"[1, 2]",
        json.dumps({"v": 99, "o": []}).encode(),
        json.dumps({"v": 1}).encode(),
        json.dumps({"v": 1, "o": [["a", 1.0, True]]}).encode(),
        json.dumps({"v": 1, "o": [[7, 1.0, True, [], None]]}).encode(),
        json.dumps({"v": 1, "o": [["a", 1.0, "yes", [], None]]}).encode(),
        json.dumps({"v": 1, "o": [["a", 1.0, True, [3], None]]}).encode(),
        json.dumps({"v": 1, "o": [["a", "NaN", True, [], None]]}).encode(),
        json.dumps({"v": 1, "o": [["a", 1.0, True, [], ["h", None, 1.0]]]}).encode(),
        json.dumps({"v": 1, "o": [["a", 1.0, True, "abc", None]]}).encode(),
        json.dumps({"v": 1, "o": [["a", 1.0, True, [], [[], None, "Infinity"]]]}).encode(),
        json.dumps({"v": 1, "o": [["a", 1.0, True, [], [[], "bm90IGZsb2F0cw=", 1.0]]]}).encode(),
        b"\xff\xfe",
    ],
)
def test_anything_else_is_refused_with_a_reason(value: bytes) -> None:
    with pytest.raises(ValueError):
        decode(value)


def test_a_non_finite_profile_arrives_as_no_profile() -> None:
    bad = Observation(Request(["a"], np.array([np.nan, 1.0], dtype=np.float32), 1.0), ["a"], True, "b", 1.0)
    (back,) = decode(encode([bad]))
    assert back.request is not None and back.request.profile is None


class FakeMessage:
    def __init__(self, value: bytes) -> None:
        self._value = value

    def error(self) -> None:
        return None

    def value(self) -> bytes:
        return self._value

    def topic(self) -> str:
        return "obs"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return 5


def test_the_feed_skips_and_counts_what_it_cannot_read_and_hands_on_the_rest() -> None:
    handed: list[Any] = []
    feed = ObservationFeed("obs", {}, "g", handed.extend)
    before = metrics.OBSERVATIONS_REFUSED._value.get()
    feed.follow([FakeMessage(encode(observations()[:1])), FakeMessage(b"garbage"), FakeMessage(encode(observations()[1:]))])
    assert [o.item for o in handed] == ["c", "a", "x"]
    assert metrics.OBSERVATIONS_REFUSED._value.get() == before + 1


class RefusingProducer:
    """Takes messages up to a size, raises beyond it (as librdkafka does past message.max.bytes)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sent: list[bytes] = []

    def send_raw(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        if len(value) > self.limit:
            raise RuntimeError(f"message of {len(value)} bytes is too large")
        self.sent.append(value)

    def refused(self) -> list[str]:
        return []


def test_publishing_splits_big_batches_and_never_raises() -> None:
    """A batch whose sampled observations carry long seen lists goes out in messages that fit;
    one observation too big for any message is counted and dropped, and the batch's handling
    goes on (learning is best effort: a raise here would retry the whole batch for ever)."""
    from streams.app import OBSERVATIONS_MESSAGE_BYTES, StreamsApp, StreamsConfig
    from topics import TopicNames
    from vectorstore import MemoryVectorStore

    app = StreamsApp(StreamsConfig(topics=TopicNames(), app_id="observations-test", learn_from_all=True), MemoryVectorStore())
    producer = RefusingProducer(OBSERVATIONS_MESSAGE_BYTES)
    app._observations_out = producer  # type: ignore[assignment]
    long_seen = [f"item-{n:08d}" for n in range(1000)]
    batch = [Observation(Request(long_seen, None, 1.0), [], True, f"x{n}", 1.0) for n in range(120)]
    app._observed(batch)
    assert len(producer.sent) > 1 and all(len(v) <= OBSERVATIONS_MESSAGE_BYTES for v in producer.sent)
    assert [o.item for v in producer.sent for o in decode(v)] == [o.item for o in batch]
    huge = Observation(Request([f"i{n}" for n in range(60_000)], None, 1.0), [], True, "huge", 1.0)
    before = metrics.LEARN_FAILURES._value.get()
    app._observed([huge])
    assert metrics.LEARN_FAILURES._value.get() == before + 1


def test_the_feed_outlives_a_learner_that_raises() -> None:
    def broken(_: list[Observation]) -> None:
        raise RuntimeError("the event loop is gone")

    feed = ObservationFeed("obs", {}, "g", broken)
    before = metrics.LEARN_FAILURES._value.get()
    feed.follow([FakeMessage(encode(observations()))])
    assert metrics.LEARN_FAILURES._value.get() == before + 1
