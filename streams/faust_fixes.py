"""Corrections to faust-streaming that the stream processor needs, applied at class level once
per process (each is idempotent). Each one is a measured defect, described where it is fixed.

They live apart from `streams.app` so that the app reads as the product's logic and what is
patched into Faust is in one place, to drop when a Faust release fixes it."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from faust import Worker
from faust import __version__ as faust_version
from faust import streams as faust_streams
from faust.app.router import Router
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import Message

log = logging.getLogger("vlm4rec.streams")

#: the faust-streaming release whose internals these fixes patch (pinned in pyproject.toml)
FAUST_VERSION = "0.15.3"
#: (owner, attribute) of every internal patched or relied on here
PATCHED = (
    (faust_aiokafka.AIOKafkaConsumerThread, "_create_worker_consumer"),
    (faust_streams, "_CStreamIterator"),
    (faust_consumer.Consumer, "ack"),
    (faust_consumer.Consumer, "_new_offset"),
    (faust_consumer.Consumer, "_add_gap"),
    (faust_consumer.Consumer, "perform_seek"),
    (faust_consumer.Consumer, "_acked"),
    (faust_consumer.Consumer, "_committed_offset"),
    (faust_consumer.Consumer, "_gap"),
    (Router, "_get_serialized_key"),
    (Worker, "_schedule_shutdown"),
)


def check_faust(version: str, patched: tuple[tuple[object, str], ...] = PATCHED) -> None:
    """Fail loudly at import when Faust is not the release these fixes were measured on, or
    an internal they patch has moved: patching a renamed method silently does nothing, and
    the at-least-once guarantees would be lost without a sign."""
    if version != FAUST_VERSION:
        raise ImportError(
            f"streams.faust_fixes patches faust-streaming {FAUST_VERSION} internals, found {version}: "
            f"install faust-streaming=={FAUST_VERSION}, or re-check every fix against the new release"
        )
    missing = [
        f"{getattr(owner, '__name__', owner)}.{name}"
        for owner, name in patched
        if not hasattr(owner, name) and name not in getattr(owner, "__annotations__", {})
    ]
    if missing:
        raise ImportError(f"faust-streaming internals patched by streams.faust_fixes have moved: {', '.join(missing)}")


check_faust(faust_version)

#: the `Faust.App` attribute holding an app's commit guard (see `commit_only_handled`)
GUARD_ATTRIBUTE = "_vlm4rec_commit_guard"


def set_fetch_wait(ms: int) -> None:
    """Make Faust's consumer wait at most `ms` for data in a fetch.

    Faust hard-codes `fetch_max_wait_ms=1500` for its consumer. Kafka answers a fetch as soon as
    data arrives, but the embedded broker answers only when that wait ends (measured: 10 ms
    from produce to consume with a 100 ms wait, up to 1.5 s with 1.5 s), so every interaction
    waited 0.75 s on average before the profile agent saw it. aiokafka reads the value from its
    consumer when the consumer starts, after Faust's factory made it."""
    thread = faust_aiokafka.AIOKafkaConsumerThread
    make = getattr(thread, "_vlm4rec_original_factory", thread._create_worker_consumer)
    thread._vlm4rec_original_factory = make

    def create(self: Any, transport: Any) -> Any:
        consumer = make(self, transport)
        consumer._fetch_max_wait_ms = ms
        return consumer

    thread._create_worker_consumer = create


def commit_only_handled(app: Any, handled: Callable[[Message], bool]) -> None:
    """Let `app`'s consumer commit a message's offset only if `handled(message)` says the
    product handled it, and never past an offset that is not acknowledged yet.

    Two defects in faust-streaming 0.x together lost events after a restart or rebalance
    (found with `vlm4rec chaos`, docs/hardening.md item 9):
    - a stream *skips* a message fetched under an older consumer generation, or while flow is
      suspended for a rebalance, and acknowledges it anyway (`Stream._py_aiter`), so its offset
      is committed although no agent saw it, and the seek after the rebalance starts past it;
    - `Consumer._new_offset` holds a commit back only when the first acknowledged offset is
      *more than one* above the committed one, but the committed offset is the next one to
      read: a single unacknowledged message right at it (one in flight, or one skipped as
      above) was committed over.
    With both fixed, a skipped message stays uncommitted and is read again after the seek.
    A third path is closed too: when offsets arrive out of order (a fetch answered from before
    a seek), Faust counts the offsets it jumped over as done (`Consumer._add_gap`, meant for
    compacted topics; the product's topics are not compacted). Here they stay uncommitted:
    at worst a partition's commits wait for the next restart, which reads them again.

    Faust's compiled stream iterator (`faust._cython.streams.StreamIterator.after`) inlines
    `Consumer.ack` and so would bypass the guard for every agent that iterates a stream event
    by event (`async for`, `events()`): the item agent's refused and skipped events were
    committed that way (docs/hardening.md, item 13). Streams therefore use Faust's
    pure-Python iterator, which acks through `Consumer.ack`."""
    faust_streams._CStreamIterator = None
    setattr(app, GUARD_ATTRIBUTE, handled)
    consumer_class = faust_consumer.Consumer
    if getattr(consumer_class, "_vlm4rec_guarded", False):
        return
    ack, new_offset, add_gap = consumer_class.ack, consumer_class._new_offset, consumer_class._add_gap

    def guarded_ack(self: Any, message: Message) -> bool:
        guard = getattr(self.app, GUARD_ATTRIBUTE, None)
        if guard is not None and not guard(message):
            return False
        return ack(self, message)

    def next_offset(self: Any, tp: Any) -> int | None:
        acked, committed = self._acked[tp], self._committed_offset[tp]
        if acked and committed is not None and not self._gap[tp] and min(acked) > committed:
            return None  # the offset at `committed` is not acknowledged yet
        return new_offset(self, tp)

    async def no_gap_for_guarded(self: Any, tp: Any, offset_from: int, offset_to: int) -> None:
        if getattr(self.app, GUARD_ATTRIBUTE, None) is None:
            await add_gap(self, tp, offset_from, offset_to)
            return
        log.warning(
            "offsets %d-%d of %s arrived out of order (a fetch from before a seek); they are not "
            "counted as done, so they are read again after the next restart or rebalance",
            offset_from, offset_to, tp,
        )

    consumer_class.ack = guarded_ack
    consumer_class._add_gap = no_gap_for_guarded
    consumer_class._new_offset = next_offset
    consumer_class._vlm4rec_guarded = True


#: the consumer attribute holding what `perform_seek` sought each partition to (`record_seeks`)
SOUGHT_ATTRIBUTE = "_vlm4rec_sought"


def record_seeks() -> None:
    """Make every Faust consumer remember which partitions its last `perform_seek` sought to
    their committed offsets, and to which (None: nothing committed).

    Faust resumes fetching a newly assigned partition *before* it seeks it to the committed
    offset (`Recovery._resume_streams`: `resume_partitions`, then `perform_seek`), so the
    first events of a partition can come from wherever the fetcher was, ahead of the commit;
    the stream processor must not judge them before the seek is done (docs/hardening.md, item
    12). `forget_seeks` drops revoked partitions, so a reassigned one waits for its new seek."""
    consumer_class = faust_consumer.Consumer
    if getattr(consumer_class, "_vlm4rec_seeks_recorded", False):
        return
    perform_seek = consumer_class.perform_seek

    async def recorded(self: Any) -> None:
        await perform_seek(self)
        sought = getattr(self, SOUGHT_ATTRIBUTE, None)
        if sought is None:
            sought = {}
            setattr(self, SOUGHT_ATTRIBUTE, sought)
        for tp in self.assignment():
            sought[tp] = self._committed_offset.get(tp)

    consumer_class.perform_seek = recorded
    consumer_class._vlm4rec_seeks_recorded = True


def sought_offsets(consumer: Any) -> dict[Any, int | None]:
    """Partition -> the offset `perform_seek` sought it to in its current assignment (None:
    nothing committed, reading starts at the earliest offset); absent: not sought yet."""
    return getattr(consumer, SOUGHT_ATTRIBUTE, None) or {}


def forget_seeks(consumer: Any, partitions: Any) -> None:
    sought = getattr(consumer, SOUGHT_ATTRIBUTE, None)
    if sought is not None:
        for tp in partitions:
            sought.pop(tp, None)


class SourceKeyRouter(Router):
    """Routes a request for a table key (`App.table_route`: `/users/<id>`, the page's user
    views) to the worker that owns the key's partition as the source events place it.

    Faust writes a table entry to the changelog partition of the event being processed, the
    interaction's partition: the hash of its raw key (the user id's bytes). Its router hashed
    the key as the changelog serialises it (JSON: the id in quotes), another partition for
    about half the users with two partitions and more with more, so with `--streams N` their
    requests went to a worker that does not hold them: 404 for users who exist
    (tests/test_faust_fixes.py shows the two placements). A key given as text is hashed as
    its UTF-8 bytes, as producers send it."""

    @classmethod
    def _get_serialized_key(cls, table: Any, key: Any) -> bytes:
        if isinstance(key, str):
            return key.encode()
        return super()._get_serialized_key(table, key)


#: exit status of a stream processor that did not stop within its deadline
STOP_DEADLINE_EXIT = 3


class DeadlineWorker(Worker):
    """A Faust worker that exits at most `stop_timeout_s` after it is told to stop.

    Told to stop (SIGTERM, SIGINT), Faust stops its services in order, and its Kafka producer
    and consumer wait for their broker for as long as it takes: a stream processor whose broker
    was already gone (the whole stack stopped at once: `vlm4rec soak` or `vlm4rec up` killed,
    each child told by the kernel) was still "stopping" minutes later, holding its port
    (`tests/test_streams.py::test_a_stream_processor_stops_when_its_broker_is_gone`). Leaving
    then loses nothing: an event's offset is committed only once its profile update is written
    (`commit_only_handled`), so what this worker had not committed is read again by whoever
    owns the partition next, and a profile skips what it already applied."""

    def __init__(self, *args: Any, stop_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_timeout_s = stop_timeout_s
        self._deadline: threading.Thread | None = None

    def _schedule_shutdown(self, signal: Any) -> None:
        if self._deadline is None:
            self._deadline = threading.Thread(target=self._exit_at_deadline, name="stop-deadline", daemon=True)
            self._deadline.start()
        super()._schedule_shutdown(signal)

    def _exit_at_deadline(self) -> None:
        time.sleep(self.stop_timeout_s)
        log.error(
            "still stopping %.0f s after the stop signal (is the broker gone?): exiting now; events "
            "not committed yet are read again by the partitions' next owner", self.stop_timeout_s,
        )
        logging.shutdown()
        os._exit(STOP_DEADLINE_EXIT)
