"""The corrections to Faust's commit bookkeeping (streams/faust_fixes.py), on stand-ins for
its consumer state; the stream processor's use of them is in `tests/test_delivery.py`, and
`tests/test_chaos.py` checks the effect end to end."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from types import SimpleNamespace

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


def test_table_requests_are_routed_by_the_raw_key_as_producers_place_users() -> None:
    """Faust's router hashed a table key as its changelog serialises it (JSON, in quotes),
    while the user's entry lives in the partition of the user's events, placed by the hash of
    the raw key: most users' requests went to another worker. The router we give Faust
    hashes the raw key."""
    from aiokafka.partitioner import DefaultPartitioner
    from faust.app.router import Router

    app = faust.App("fixes-router", Router=faust_fixes.SourceKeyRouter)
    table = app.Table("profiles", default=None, partitions=4)
    assert Router._get_serialized_key(table, "u1") == b'"u1"'
    assert app.router._get_serialized_key(table, "u1") == b"u1"
    hashed = DefaultPartitioner()  # murmur2, as the product's producers (topics/producer.py)
    everyone = [0, 1, 2, 3]
    users = [f"user-{n}" for n in range(200)]
    elsewhere = [u for u in users if hashed(Router._get_serialized_key(table, u), everyone, everyone) != hashed(u.encode(), everyone, everyone)]
    assert len(elsewhere) > 100, "Faust's own placement differs for most users"
    assert all(hashed(app.router._get_serialized_key(table, u), everyone, everyone) == hashed(u.encode(), everyone, everyone) for u in users)
