"""The corrections to Faust's commit bookkeeping (streams/faust_fixes.py), on stand-ins for
its consumer state; `tests/test_chaos.py` checks the effect end to end."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from types import SimpleNamespace

import faust
from faust.transport.consumer import Consumer
from faust.types import TP
from intervaltree import IntervalTree

from streams import faust_fixes

TOPIC = TP("items.embedded", 0)


def consumer_state(committed: int | None, acked: list[int]) -> SimpleNamespace:
    state = SimpleNamespace(
        _acked=defaultdict(list), _acked_index=defaultdict(set), _committed_offset=defaultdict(lambda: None), _gap=defaultdict(IntervalTree)
    )
    state._acked[TOPIC] = list(acked)
    state._acked_index[TOPIC] = set(acked)
    state._committed_offset[TOPIC] = committed
    return state


def test_no_commit_over_an_unacknowledged_offset_at_the_committed_one() -> None:
    faust_fixes.commit_only_handled(faust.App("fixes-test-1"), lambda _m: True)
    # committed 20 means "read 20 next": 20 is in flight (or was skipped), 21 and 22 are done
    assert Consumer._new_offset(consumer_state(20, [21, 22]), TOPIC) is None
    assert Consumer._new_offset(consumer_state(20, [20, 21, 23]), TOPIC) == 22
    assert Consumer._new_offset(consumer_state(0, [1]), TOPIC) is None, "offset 0 is an offset too"
    assert Consumer._new_offset(consumer_state(None, [5, 6]), TOPIC) == 7, "nothing committed yet: as before"


def test_a_message_the_guard_refuses_is_not_acknowledged() -> None:
    asked: list[int] = []

    def handled(message: SimpleNamespace) -> bool:
        asked.append(message.offset)
        return False  # e.g. a message Faust skipped during a rebalance: no handler saw it

    app = faust.App("fixes-test-2")
    faust_fixes.commit_only_handled(app, handled)
    skipped = SimpleNamespace(topic=TOPIC.topic, partition=0, offset=7, acked=False, tp=TOPIC)
    assert Consumer.ack(SimpleNamespace(app=app), skipped) is False
    assert asked == [7] and not skipped.acked, "it stays unacknowledged, so it is read again after the seek"


def test_offsets_jumped_over_are_not_counted_as_done() -> None:
    app = faust.App("fixes-test-3")
    faust_fixes.commit_only_handled(app, lambda _m: True)
    state = consumer_state(20, [])
    state.app = app
    asyncio.run(Consumer._add_gap(state, TOPIC, 21, 24))
    assert not state._gap[TOPIC], "a fetch from before a seek must not commit what nobody handled"
    assert Consumer._new_offset(consumer_state(20, [25]), TOPIC) is None


def test_events_past_the_next_unhandled_offset_are_refused_and_read_again() -> None:
    from streams.app import MAX_REWINDS, StreamsApp, StreamsConfig
    from topics import TopicNames
    from vectorstore import MemoryVectorStore

    streams = StreamsApp(StreamsConfig(topics=TopicNames(), app_id="in-order-test"), MemoryVectorStore(), MemoryVectorStore())
    seeks: list[tuple[TP, int]] = []

    async def seek(tp: TP, offset: int) -> None:
        seeks.append((tp, offset))

    streams.app.consumer.seek = seek  # type: ignore[method-assign]

    def event(offset: int) -> SimpleNamespace:
        return SimpleNamespace(message=SimpleNamespace(topic=TOPIC.topic, partition=0, offset=offset, tp=TOPIC))

    def offsets(events: list) -> list[int]:
        return [e.message.offset for e in asyncio.run(streams._in_order(events))]

    assert offsets([event(5), event(6)]) == [5, 6]
    assert offsets([event(9), event(10)]) == [] and seeks == [(TOPIC, 7)], "7 and 8 come first: read again from 7"
    assert offsets([event(5), event(7), event(8), event(9)]) == [5, 7, 8, 9], "a re-delivery and the rest, in order"
    for _ in range(MAX_REWINDS):  # offsets 10-11 never come (deleted by retention)
        assert offsets([event(12)]) == []
        assert offsets([event(10 - 1)]) == [9]
    assert offsets([event(12)]) == [12], "a gap that stays after the rewinds is real: go on"


def test_a_partition_is_expected_first_at_the_offset_faust_sought_to() -> None:
    """A stale fetch after a restart delivered offset 1145 before 1144, where reading started;
    Faust then dropped 1144 as already read, and one interaction was never counted."""
    from streams.app import StreamsApp, StreamsConfig
    from topics import TopicNames
    from vectorstore import MemoryVectorStore

    streams = StreamsApp(StreamsConfig(topics=TopicNames(), app_id="sought-test"), MemoryVectorStore(), MemoryVectorStore())
    seeks: list[tuple[TP, int]] = []

    async def seek(tp: TP, offset: int) -> None:
        seeks.append((tp, offset))

    consumer = streams.app.consumer
    consumer.seek = seek  # type: ignore[method-assign]

    def event(offset: int) -> SimpleNamespace:
        return SimpleNamespace(message=SimpleNamespace(topic=TOPIC.topic, partition=0, offset=offset, tp=TOPIC))

    def offsets(events: list) -> list[int]:
        return [e.message.offset for e in asyncio.run(streams._in_order(events))]

    consumer._committed_offset[TOPIC] = 1144  # what perform_seek records
    assert offsets([event(1145), event(1146)]) == [] and seeks == [(TOPIC, 1144)]
    assert offsets([event(1144), event(1145)]) == [1144, 1145]
    streams._forget_partitions(None, {TOPIC})  # revoked, then assigned again after others read on
    consumer._committed_offset[TOPIC] = 1200
    assert offsets([event(1201)]) == [] and seeks[-1] == (TOPIC, 1200)
    assert offsets([event(1200), event(1201)]) == [1200, 1201]
