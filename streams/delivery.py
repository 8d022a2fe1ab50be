"""Delivery mechanics of the stream processor, apart from its product logic (`streams.app`).

Two parts:

- `Delivery`: at-least-once for the agents of one Faust app, whatever the broker. The app asks
  it five things: which of the events that arrived a handler may see (`arrived`: each
  partition's events in offset order, nothing from before Faust's seek), that a handler
  finished a message (`handled`: its offset may now be committed), whether an offset may be
  committed (`may_commit`, Faust's commit guard), to forget revoked partitions (`forget`), and
  to read a stalled partition again (`reread_stalled`, on a timer). Each piece answers a
  defect of faust-streaming 0.15.3 found under SIGKILLs (docs/hardening.md, items 9, 11, 12
  and 13): Faust committed messages it had skipped during a rebalance (the commit guard,
  `streams.faust_fixes.commit_only_handled`), delivered a fetch answered from before its seek
  ahead of the messages the seek reads again, and fetched a newly assigned partition before
  seeking it (`arrived`, `reread_stalled`, `streams.faust_fixes.record_seeks`). The defects
  are in Faust's consumer and fetcher, not in the broker (the embedded broker was checked
  directly: item 9), so these stay on whatever the broker; against Kafka they cost a set
  lookup per message and a comparison per event.
- `BrokerShims`: work-arounds for the embedded Tansu broker of the local stack, all on or all
  off (`StreamsConfig.broker_shims`, `VLM4REC_STREAMS_BROKER_SHIMS`: on by default, as every
  default targets the local stack; off against Apache Kafka, which needs none of them, so a
  Kafka deployment does not run them):
  - a table write's last record alone in its record batch (`streams.changelog`,
    `last_alone`): Tansu reports a partition's end offset as the base offset of its last
    record batch + 1 (Kafka: the last offset + 1), and Faust restores a table up to that end,
    so of a changelog's last batch only the first record came back at recovery
    (docs/hardening.md, item 3). (Until 2026-12-05 a throw-away fence record was written after
    a flush of each write; changelogs written then still hold fences, which readers skip by
    `FENCE_PREFIX`);
  - Faust's consumer fetch wait bounded by `VLM4REC_KAFKA_FETCH_MAX_WAIT_MS` (`install`):
    Tansu answers a fetch only when its wait ends, and Faust hard-codes 1.5 s
    (`streams.faust_fixes.set_fetch_wait`); Kafka answers as soon as data arrives.
  Not shims: the broker-facing defaults that are settings already (the `memory://` table
  store, the short session timeout), and the lag gauge, which only reads one low per
  partition on Tansu.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from aiokafka.errors import IllegalStateError
from faust.types import TP

from streams import faust_fixes

log = logging.getLogger("vlm4rec.streams")

#: messages handled but not yet committed that are remembered at most (`Delivery.handled`)
COMMITTABLE_KEPT = 100_000
#: seconds between seeks back while a partition's next offset has not come (`Delivery.arrived`)
REWIND_EVERY_S = 2.0
#: the keys of the fence records that changelogs written before 2026-12-05 hold (ids never hold
#: control characters): a table restored from one has them, and readers skip them
FENCE_PREFIX = "\x00fence:"


class Message(Protocol):
    topic: str
    partition: int
    offset: int

    @property
    def tp(self) -> TP: ...


class Event(Protocol):
    @property
    def message(self) -> Message: ...


E = TypeVar("E", bound=Event)


class Delivery:
    """Offset order and commit guard for one Faust app's input topics (`inputs`): the topics its
    agents consume, whose offsets at-least-once is about. `app` is read for its consumer only
    (`app.consumer`: seek, earliest_offsets and what Faust sought, `faust_fixes.sought_offsets`)
    until `install` registers with the Faust app itself; `clock` is `time.monotonic`."""

    def __init__(self, app: Any, inputs: Collection[str], clock: Callable[[], float] = time.monotonic) -> None:
        self._app = app
        self.inputs = frozenset(inputs)
        self._clock = clock
        # (topic, partition) -> the offset after the last event handed to a handler (`arrived`)
        self._processed: dict[tuple[str, int], int] = {}
        # partitions being read again (`arrived`): the offset sought back to, and when
        self._rewound: dict[tuple[str, int], tuple[int | None, float]] = {}  # (None: before Faust's seek)
        # messages a handler finished and whose offsets may now be committed (faust_fixes)
        self._committable: set[tuple[str, int, int]] = set()

    def install(self) -> None:
        """Register with the Faust app: the commit guard, the record of Faust's seeks, the
        revoked partitions forgotten, and the re-read of stalled partitions every
        `REWIND_EVERY_S`."""
        app = self._app
        faust_fixes.commit_only_handled(app, self.may_commit)
        faust_fixes.record_seeks()
        app.on_partitions_revoked.connect(self._revoked)
        app.timer(REWIND_EVERY_S)(self.reread_stalled)

    def processed(self, tp: TP) -> int | None:
        """The offset after the last event of `tp` handed to a handler (None: none yet since
        this worker started, or since the partition came back)."""
        return self._processed.get((tp.topic, tp.partition))

    def _revoked(self, sender: Any, revoked: set[TP], **_: Any) -> None:
        self.forget(revoked)

    def forget(self, revoked: Iterable[TP]) -> None:
        """A revoked partition's read position is no longer this worker's to check: when it
        comes back (after a rebalance) its reading starts again at the committed offset."""
        revoked = list(revoked)
        faust_fixes.forget_seeks(self._app.consumer, revoked)
        for tp in revoked:
            key = (tp.topic, tp.partition)
            self._processed.pop(key, None)
            self._rewound.pop(key, None)

    def handled(self, message: Message) -> None:
        """A handler finished `message`: its offset may be committed (`may_commit`)."""
        if len(self._committable) > COMMITTABLE_KEPT:  # keys whose final ack never came
            self._committable.clear()  # (at worst their messages are read again: at-least-once)
        self._committable.add((message.topic, message.partition, message.offset))

    def may_commit(self, message: Message) -> bool:
        """Whether an input message's offset may be committed: only once a handler finished
        it (Faust acknowledges messages it skips during a rebalance too)."""
        if message.topic not in self.inputs:
            return True
        key = (message.topic, message.partition, message.offset)
        if key in self._committable:
            self._committable.discard(key)
            return True
        log.info("not committing %s[%d]@%d: Faust skipped it (rebalance); it is read again", *key)
        return False

    async def arrived(self, events: Sequence[E]) -> list[E]:
        """The events that keep each partition in offset order. After a restart or rebalance
        Faust can deliver a fetch answered from before its seek, jumping ahead of messages it
        then drops as already read (docs/hardening.md, item 11); the profiles' offset marks
        would then skip those as duplicates. An event past the next unhandled offset is
        refused (unhandled and, by the commit guard, uncommitted) and the partition is read
        again from that offset, again every `REWIND_EVERY_S` until that offset comes (here, or
        by `reread_stalled` when nothing newer arrives): a stale fetch can also arrive after
        the seek back, and Faust then drops the re-read messages too (item 12, a stalled item
        agent). Only offsets the broker no longer holds (deleted by retention before this
        worker read them) are a real gap, accepted with an error. A partition's first event is
        judged against the offset Faust sought it to, and events fetched before that seek are
        refused (item 12)."""
        kept = []
        for event in events:
            message = event.message
            key = (message.topic, message.partition)
            expected = self._processed.get(key)
            if expected is None:
                expected = await self._start(message.tp)
                if expected is None:  # fetched before Faust sought it to its commit
                    self._rewound.setdefault(key, (None, self._clock()))
                    continue
            if message.offset > expected:
                now = self._clock()
                if now - self._rewound.get(key, (None, -math.inf))[1] < REWIND_EVERY_S:
                    continue  # a seek back is under way
                earliest = await self._earliest(message.tp)
                if earliest > expected:
                    log.error("%s[%d]: offsets %d-%d were deleted before this worker read them", *key, expected, earliest - 1)
                    self._processed[key] = expected = earliest
                if message.offset > expected:
                    log.warning("%s[%d]: offset %d arrived before %d; reading again from %d", *key, message.offset, expected, expected)
                    self._rewound[key] = (expected, now)
                    await self._seek(message.tp, expected)
                    continue
            self._rewound.pop(key, None)
            self._processed[key] = max(expected, message.offset + 1)
            kept.append(event)
        return kept

    async def _earliest(self, tp: TP) -> int:
        return (await self._app.consumer.earliest_offsets(tp)).get(tp, 0)

    async def _start(self, tp: TP) -> int | None:
        """Where reading `tp` started in this assignment: the offset Faust sought it to, or
        the earliest offset when nothing was committed; None before Faust's seek."""
        sought = faust_fixes.sought_offsets(self._app.consumer)
        if tp not in sought:
            return None
        if sought[tp] is None:
            sought[tp] = await self._earliest(tp)
        return sought[tp]

    async def reread_stalled(self) -> None:
        """Seek back again a partition whose re-read offset has not come `REWIND_EVERY_S`
        after the last seek back, though no later event arrived to prompt `arrived`: the
        re-read messages were dropped behind a stale fetch and nothing newer is coming
        (chaos seed 15: the item agent stalled on four partitions after the replay ended)."""
        now = self._clock()
        for (topic, partition), (offset, when) in list(self._rewound.items()):
            if now - when < REWIND_EVERY_S:
                continue
            tp = TP(topic, partition)
            if offset is None:  # events came before Faust's seek; what it sought to has not
                offset = await self._start(tp)
                if offset is None:
                    continue
            log.warning("%s[%d]: offset %d has not come; reading again from it", topic, partition, offset)
            self._rewound[(topic, partition)] = (offset, now)
            await self._seek(tp, offset)

    async def _seek(self, tp: TP, offset: int) -> None:
        """Read `tp` again from `offset`, unless a rebalance took it away meanwhile (aiokafka
        raises IllegalStateError, which out of a timer would stop the app; the lag timer's
        did, docs/hardening.md): its new owner reads from the committed offset."""
        try:
            await self._app.consumer.seek(tp, offset)
        except IllegalStateError:
            log.info("%s[%d]: not read again from %d: no longer assigned here", tp.topic, tp.partition, offset)
            self._rewound.pop((tp.topic, tp.partition), None)


@dataclass(frozen=True)
class BrokerShims:
    """The embedded broker's work-arounds (see the module docstring), all on or all off."""

    enabled: bool = True
    fetch_max_wait_ms: int = 100

    def install(self) -> None:
        """Patch Faust's consumer, before the app makes it: its fetch wait bounded."""
        if self.enabled:
            faust_fixes.set_fetch_wait(self.fetch_max_wait_ms)
