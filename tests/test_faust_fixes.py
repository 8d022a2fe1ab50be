"""The corrections to Faust's commit bookkeeping (streams/faust_fixes.py), on stand-ins for
its consumer state; `tests/test_chaos.py` checks the effect end to end."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import faust
import pytest
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


def _in_order_harness(
    monkeypatch: pytest.MonkeyPatch, app_id: str, clock: list[float], earliest: dict[TP, int]
) -> tuple[Any, list[tuple[TP, int]], Any]:
    """A StreamsApp whose consumer seeks into a list and reports `earliest` as the broker's
    first offsets; `clock[0]` is time.monotonic() for `_in_order`."""
    from streams import app as streams_app
    from streams.app import StreamsApp, StreamsConfig
    from topics import TopicNames
    from vectorstore import MemoryVectorStore

    streams = StreamsApp(StreamsConfig(topics=TopicNames(), app_id=app_id), MemoryVectorStore(), MemoryVectorStore())
    seeks: list[tuple[TP, int]] = []

    async def seek(tp: TP, offset: int) -> None:
        seeks.append((tp, offset))

    async def earliest_offsets(*tps: TP) -> dict[TP, int]:
        return {tp: earliest.get(tp, 0) for tp in tps}

    consumer = streams.app.consumer
    consumer.seek = seek  # type: ignore[method-assign]
    consumer.earliest_offsets = earliest_offsets  # type: ignore[method-assign]
    monkeypatch.setattr(streams_app, "time", SimpleNamespace(monotonic=lambda: clock[0], time=time.time))

    def offsets(*numbers: int) -> list[int]:
        events = [SimpleNamespace(message=SimpleNamespace(topic=TOPIC.topic, partition=0, offset=n, tp=TOPIC)) for n in numbers]
        return [e.message.offset for e in asyncio.run(streams._in_order(events))]

    return streams, seeks, offsets


def test_events_past_the_next_unhandled_offset_are_refused_and_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from streams.app import REWIND_EVERY_S

    clock, earliest = [100.0], {}
    streams, seeks, offsets = _in_order_harness(monkeypatch, "in-order-test", clock, earliest)
    faust_fixes.record_seeks()
    streams.app.consumer._vlm4rec_sought = {TOPIC: 5}
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
    asyncio.run(streams._reread_stalled())
    assert len(seeks) == 4, "not before REWIND_EVERY_S"
    clock[0] += REWIND_EVERY_S + 0.5
    asyncio.run(streams._reread_stalled())
    assert seeks[-1] == (TOPIC, 13) and len(seeks) == 5
    assert offsets(13, 14, 15) == [13, 14, 15]
    clock[0] += REWIND_EVERY_S + 0.5
    asyncio.run(streams._reread_stalled())
    assert len(seeks) == 5, "13 came: nothing to read again"
    # offsets the broker no longer holds (retention) are a real gap: read on from the first kept
    earliest[TOPIC] = 16
    clock[0] += REWIND_EVERY_S + 0.5
    assert offsets(17) == [] and seeks[-1] == (TOPIC, 16)
    assert offsets(16, 17) == [16, 17]
    earliest[TOPIC] = 30
    clock[0] += REWIND_EVERY_S + 0.5
    assert offsets(30) == [30], "18-29 are gone; 30 is the first offset there is"


def test_a_partition_is_expected_first_at_the_offset_faust_sought_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """Faust resumes fetching a partition before it seeks it to the committed offset: a
    restarted worker's first events came from past the commit (chaos seeds 11 and 12), and
    accepting them made Faust drop the messages in between."""
    from streams.app import REWIND_EVERY_S

    clock = [100.0]
    streams, seeks, offsets = _in_order_harness(monkeypatch, "sought-test", clock, {TOPIC: 3})
    consumer = streams.app.consumer
    assert offsets(1145, 1146) == [] and seeks == [], "before the seek: refused, Faust seeks anyway"
    consumer._vlm4rec_sought = {TOPIC: 1144}  # what perform_seek recorded (faust_fixes.record_seeks)
    asyncio.run(streams._reread_stalled())
    assert seeks == [], "the seek itself may bring 1144"
    clock[0] += REWIND_EVERY_S + 0.5
    asyncio.run(streams._reread_stalled())
    assert seeks == [(TOPIC, 1144)], "it did not: read again from the sought offset"
    assert offsets(1145) == [] and len(seeks) == 1
    assert offsets(1144, 1145) == [1144, 1145]
    streams._forget_partitions(None, {TOPIC})  # revoked, then assigned again after others read on
    assert TOPIC not in consumer._vlm4rec_sought
    assert offsets(1201) == [], "reassigned, not sought yet"
    consumer._vlm4rec_sought[TOPIC] = 1200
    clock[0] += REWIND_EVERY_S + 0.5
    assert offsets(1201) == [] and seeks[-1] == (TOPIC, 1200)
    assert offsets(1200, 1201) == [1200, 1201]
    streams._forget_partitions(None, {TOPIC})
    consumer._vlm4rec_sought[TOPIC] = None  # nothing committed: the earliest offset, 3
    assert offsets(4) == [] and seeks[-1] == (TOPIC, 3)
    assert offsets(3, 4) == [3, 4]


def test_perform_seek_is_recorded_per_assignment() -> None:
    other = TP("interactions", 1)

    async def seek_to_committed() -> dict[TP, int]:
        return {TOPIC: 7, other: 0}  # 0: nothing committed there (Faust records None)

    consumer = SimpleNamespace(
        _read_offset=defaultdict(lambda: None),
        _committed_offset=defaultdict(lambda: None),
        seek_to_committed=seek_to_committed,
        assignment=lambda: {TOPIC, other},
    )
    faust_fixes.record_seeks()
    assert faust_fixes.sought_offsets(consumer) == {}, "not sought yet"
    asyncio.run(Consumer.perform_seek(consumer))
    assert faust_fixes.sought_offsets(consumer) == {TOPIC: 7, other: None}
    faust_fixes.forget_seeks(consumer, {TOPIC})
    assert faust_fixes.sought_offsets(consumer) == {other: None}


def test_streams_ack_through_the_guard_not_the_compiled_iterator() -> None:
    """Faust's compiled stream iterator inlines Consumer.ack, so an agent iterating events one
    by one committed events the guard had refused (chaos seeds 11 and 15: 98 and 252 lost)."""
    from faust import streams as faust_streams
    from faust.types.tuples import ConsumerMessage

    app = faust.App("iterator-test", broker="kafka://127.0.0.1:1")
    refused: list[int] = []
    faust_fixes.commit_only_handled(app, lambda m: refused.append(m.offset) or False)
    assert faust_streams._CStreamIterator is None

    async def iterate_one_event() -> None:
        stream = app.channel().stream()
        for offset in (7, 8):
            message = ConsumerMessage(
                TOPIC.topic, 0, offset, 0.0, 0, None, b"k", b"v", None, 1, 1, generation_id=app.consumer_generation_id
            )
            await stream.channel.put(faust.Event(app, b"k", b"v", {}, message))
        events = stream.events().__aiter__()
        await asyncio.wait_for(events.__anext__(), 5)  # offset 7: the agent refuses it
        await asyncio.wait_for(events.__anext__(), 5)  # asking for the next, Faust acks 7

    app.flow_control.resume()
    asyncio.run(iterate_one_event())
    assert refused[:1] == [7], "the final ack went through the guard"
    assert not app.consumer._acked[TOPIC], "and the guard kept it out of the commit"


def test_the_fixes_refuse_a_faust_release_or_internals_they_were_not_measured_on() -> None:
    faust_fixes.check_faust(faust_fixes.FAUST_VERSION)
    with pytest.raises(ImportError, match="faust-streaming=="):
        faust_fixes.check_faust("0.16.0")

    class Moved:
        pass

    with pytest.raises(ImportError, match="Moved._new_offset"):
        faust_fixes.check_faust(faust_fixes.FAUST_VERSION, ((Moved, "_new_offset"),))
