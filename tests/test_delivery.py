"""Delivery mechanics of the stream processor (streams/delivery.py) on a stand-in consumer, no
broker: offset order, re-reads, the commit guard's bookkeeping, and the broker shims' switch.
`tests/test_chaos.py` checks the effect end to end."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import faust
import pytest
from faust.types import TP

from streams import delivery as delivery_module
from streams import faust_fixes
from streams.delivery import REWIND_EVERY_S, Delivery

TOPIC = TP("items.embedded", 0)


class FakeConsumer:
    """Seeks into a list, reports `earliest` as the broker's first offsets, and holds what
    Faust's `perform_seek` recorded (`faust_fixes.record_seeks`) as the real one does."""

    def __init__(self, earliest: dict[TP, int]) -> None:
        self.earliest = earliest
        self.seeks: list[tuple[TP, int]] = []
        setattr(self, faust_fixes.SOUGHT_ATTRIBUTE, {})

    async def seek(self, tp: TP, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def earliest_offsets(self, *tps: TP) -> dict[TP, int]:
        return {tp: self.earliest.get(tp, 0) for tp in tps}

    def sought(self, offsets: dict[TP, int | None]) -> None:
        getattr(self, faust_fixes.SOUGHT_ATTRIBUTE).update(offsets)


def harness(clock: list[float], earliest: dict[TP, int]) -> tuple[Delivery, FakeConsumer, Any]:
    consumer = FakeConsumer(earliest)
    delivery = Delivery(SimpleNamespace(consumer=consumer), {TOPIC.topic}, clock=lambda: clock[0])

    def offsets(*numbers: int) -> list[int]:
        events = [SimpleNamespace(message=message(n)) for n in numbers]
        return [e.message.offset for e in asyncio.run(delivery.arrived(events))]

    return delivery, consumer, offsets


def message(offset: int, topic: TP = TOPIC) -> SimpleNamespace:
    return SimpleNamespace(topic=topic.topic, partition=topic.partition, offset=offset, tp=topic)


def test_events_past_the_next_unhandled_offset_are_refused_and_read_again() -> None:
    clock, earliest = [100.0], {}
    delivery, consumer, offsets = harness(clock, earliest)
    seeks = consumer.seeks
    consumer.sought({TOPIC: 5})
    assert offsets(5, 6) == [5, 6]
    assert offsets(9, 10) == [] and seeks == [(TOPIC, 7)], "7 and 8 come first: read again from 7"
    assert offsets(5, 7, 8, 9) == [5, 7, 8, 9], "a re-delivery and the rest, in order"
    # a stale fetch after the seek back: Faust drops the re-read 10-11, so seek again, later
    assert offsets(12) == [] and seeks[-1] == (TOPIC, 10)
    assert offsets(13) == [] and len(seeks) == 2, "no seek storm while one is under way"
    clock[0] += REWIND_EVERY_S + 0.5
    assert offsets(14) == [] and seeks[-1] == (TOPIC, 10) and len(seeks) == 3
    assert offsets(10, 11, 12) == [10, 11, 12]
    # ... and when nothing newer comes to prompt it, the timer seeks back again
    assert offsets(15) == [] and seeks[-1] == (TOPIC, 13) and len(seeks) == 4
    asyncio.run(delivery.reread_stalled())
    assert len(seeks) == 4, "not before REWIND_EVERY_S"
    clock[0] += REWIND_EVERY_S + 0.5
    asyncio.run(delivery.reread_stalled())
    assert seeks[-1] == (TOPIC, 13) and len(seeks) == 5
    assert offsets(13, 14, 15) == [13, 14, 15]
    clock[0] += REWIND_EVERY_S + 0.5
    asyncio.run(delivery.reread_stalled())
    assert len(seeks) == 5, "13 came: nothing to read again"
    # offsets the broker no longer holds (retention) are a real gap: read on from the first kept
    earliest[TOPIC] = 16
    clock[0] += REWIND_EVERY_S + 0.5
    assert offsets(17) == [] and seeks[-1] == (TOPIC, 16)
    assert offsets(16, 17) == [16, 17]
    earliest[TOPIC] = 30
    clock[0] += REWIND_EVERY_S + 0.5
    assert offsets(30) == [30], "18-29 are gone; 30 is the first offset there is"
    assert delivery.processed(TOPIC) == 31


def test_a_partition_is_expected_first_at_the_offset_faust_sought_to() -> None:
    """Faust resumes fetching a partition before it seeks it to the committed offset: a
    restarted worker's first events came from past the commit (chaos seeds 11 and 12), and
    accepting them made Faust drop the messages in between."""
    clock = [100.0]
    delivery, consumer, offsets = harness(clock, {TOPIC: 3})
    seeks = consumer.seeks
    assert offsets(1145, 1146) == [] and seeks == [], "before the seek: refused, Faust seeks anyway"
    consumer.sought({TOPIC: 1144})
    asyncio.run(delivery.reread_stalled())
    assert seeks == [], "the seek itself may bring 1144"
    clock[0] += REWIND_EVERY_S + 0.5
    asyncio.run(delivery.reread_stalled())
    assert seeks == [(TOPIC, 1144)], "it did not: read again from the sought offset"
    assert offsets(1145) == [] and len(seeks) == 1
    assert offsets(1144, 1145) == [1144, 1145]
    delivery.forget({TOPIC})  # revoked, then assigned again after others read on
    assert TOPIC not in faust_fixes.sought_offsets(consumer) and delivery.processed(TOPIC) is None
    assert offsets(1201) == [], "reassigned, not sought yet"
    consumer.sought({TOPIC: 1200})
    clock[0] += REWIND_EVERY_S + 0.5
    assert offsets(1201) == [] and seeks[-1] == (TOPIC, 1200)
    assert offsets(1200, 1201) == [1200, 1201]
    delivery.forget({TOPIC})
    consumer.sought({TOPIC: None})  # nothing committed: the earliest offset, 3
    assert offsets(4) == [] and seeks[-1] == (TOPIC, 3)
    assert offsets(3, 4) == [3, 4]


def test_partitions_are_ordered_apart() -> None:
    other = TP(TOPIC.topic, 1)
    delivery, consumer, _ = harness([100.0], {})
    consumer.sought({TOPIC: 0, other: 40})
    events = [SimpleNamespace(message=message(n, tp)) for tp, n in [(TOPIC, 0), (other, 40), (TOPIC, 2), (other, 41)]]
    kept = asyncio.run(delivery.arrived(events))
    assert [(e.message.partition, e.message.offset) for e in kept] == [(0, 0), (1, 40), (1, 41)]
    assert consumer.seeks == [(TOPIC, 1)], "only the partition with a hole is read again"


def test_only_messages_a_handler_finished_may_be_committed_and_once() -> None:
    delivery, _, _ = harness([100.0], {})
    skipped, done = message(7), message(8)
    assert not delivery.may_commit(skipped), "Faust skipped it during a rebalance: read it again"
    delivery.handled(done)
    assert delivery.may_commit(done)
    assert not delivery.may_commit(done), "its key is used up by the commit's ack"
    assert delivery.may_commit(message(3, TP("recs", 0))), "not an input topic: Faust's own business"


def test_handled_keys_whose_ack_never_came_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery_module, "COMMITTABLE_KEPT", 2)
    delivery, _, _ = harness([100.0], {})
    for offset in range(3):
        delivery.handled(message(offset))
    delivery.handled(message(3))  # over the bound: the forgotten ones are read again at worst
    assert [delivery.may_commit(message(n)) for n in range(4)] == [False, False, False, True]


def test_install_guards_the_apps_commits_and_forgets_revoked_partitions() -> None:
    app = faust.App("delivery-install-test", broker="kafka://127.0.0.1:1")
    delivery = Delivery(app, {TOPIC.topic})
    delivery.install()
    assert getattr(app, faust_fixes.GUARD_ATTRIBUTE) == delivery.may_commit
    setattr(app.consumer, faust_fixes.SOUGHT_ATTRIBUTE, {TOPIC: 5})
    asyncio.run(delivery.arrived([SimpleNamespace(message=message(5))]))
    assert delivery.processed(TOPIC) == 6
    asyncio.run(app.on_partitions_revoked.send({TOPIC}))
    assert delivery.processed(TOPIC) is None and TOPIC not in faust_fixes.sought_offsets(app.consumer)


def test_faust_batches_its_records_as_usual_with_the_shims_on_or_off() -> None:
    from streams.app import StreamsApp, StreamsConfig
    from topics import TopicNames
    from vectorstore import MemoryVectorStore

    def app(app_id: str, shims: bool) -> faust.App:
        config = StreamsConfig(topics=TopicNames(), app_id=app_id, broker_shims=shims)
        return StreamsApp(config, MemoryVectorStore()).app

    for app_id, shims in (("shims-on", True), ("shims-off", False)):
        batch = app(app_id, shims).conf.producer_max_batch_size
        assert batch == StreamsConfig.producer_batch_bytes > 1, "lone last records make recovery exact, not batches of one"


@pytest.mark.integration
@pytest.mark.parametrize("broker", ["tansu_broker", "own_broker"])
def test_tansu_ends_a_partition_at_its_last_batch_and_the_own_broker_at_its_last_record(broker: str, request: pytest.FixtureRequest) -> None:
    """The misbehaviour `streams.changelog` works around (`last_alone`), shown on the real
    Tansu broker: after one batch of five records its end offset is the batch's base + 1
    (Kafka: 5); after a record flushed on its own it is exact again. If this starts failing
    on Tansu, Tansu was fixed and the shim can go. The project's own broker is exact throughout."""
    import uuid

    from confluent_kafka import Consumer, Producer, TopicPartition

    from topics.admin import create_topics

    kafka = {"bootstrap.servers": request.getfixturevalue(broker)}
    topic = f"quirk-{uuid.uuid4().hex[:8]}"
    create_topics(kafka, {topic: 1})
    producer = Producer({**kafka, "linger.ms": 200})
    for n in range(5):
        producer.produce(topic, value=f"r{n}".encode(), partition=0)
    assert producer.flush(10) == 0
    consumer = Consumer({**kafka, "group.id": f"quirk-{uuid.uuid4().hex[:8]}"})
    try:
        assert consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10) == (0, 1 if broker == "tansu_broker" else 5)
        producer.produce(topic, value=b"fence", partition=0)
        assert producer.flush(10) == 0
        assert consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10) == (0, 6)
    finally:
        consumer.close()


def test_a_partition_taken_away_before_its_seek_back_is_dropped_not_raised() -> None:
    """A rebalance between the timer's look at a stalled partition and its seek: aiokafka
    raises IllegalStateError, which out of a timer stops the whole app. Now the partition's
    re-read is dropped (its new owner reads from the committed offset)."""
    from aiokafka.errors import IllegalStateError

    clock = [100.0]
    delivery, consumer, offsets = harness(clock, {})
    consumer.sought({TOPIC: 5})
    assert offsets(5, 9) == [5] and consumer.seeks == [(TOPIC, 6)]

    async def taken_away(tp: TP, offset: int) -> None:
        raise IllegalStateError(f"Partition {tp} is not assigned")

    consumer.seek = taken_away
    clock[0] += REWIND_EVERY_S + 0.5
    asyncio.run(delivery.reread_stalled())
    assert not delivery._rewound, "nothing left to re-read here"
