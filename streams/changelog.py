"""Table writes sent to their changelog as whole record batches, bypassing Faust's producer buffer.

A Faust table sends each `table[key] = value` on its own: the record goes to Faust's producer
buffer, which a task drains one `send` at a time, each a few coroutines deep on the event loop
the profile agent shares with the consumer and the pushes. At 1,000 interactions/s that was
most of the agent's time per batch (the write and its flush, 0.45-0.73 ms per event,
docs/streaming.md). `ChangelogWriter.write` sets the table's local store and hands each
changelog partition's records to aiokafka as one record batch (`create_batch`, `send_batch`):
the same bytes as Faust's own writes (the changelog topic's `prepare_key`/`prepare_value`), one
future per batch.

Batch boundaries are chosen here, not by the producer, which is what the embedded broker needs:
Tansu reports a partition's end offset as the base offset of its last record batch + 1, and
Faust restores a table up to that end, so of a changelog's last batch only its first record
came back (docs/hardening.md, item 3; `tests/test_delivery.py` shows it). With `last_alone`
(the broker shims, `streams.delivery.BrokerShims`) each partition's last record of a write
goes in a batch of its own: the reported end is then the true end, with no flush to wait for
and no fence record. aiokafka sends one batch per partition per request and one request per
broker at a time, so the batches land in the order they were handed over.

Nothing is awaited but the hand-over: Faust flushes its producer (aiokafka's included) before
it commits the offsets of the events that made the writes, so a crash before delivery
re-delivers the events, as before. A hand-over the producer refuses (no metadata, its buffer
full past its timeout: the broker is away) is tried again until it is taken: the store already
holds the values, and a re-run of the agent's batch would find its events applied and write
nothing. A batch aiokafka gives up delivering is logged (as Faust logs its own).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiokafka.errors import KafkaError
from faust.exceptions import NotReady
from faust.types import TP

from streams.backoff import Backoff

log = logging.getLogger("vlm4rec.streams")

#: seconds between tries to hand a batch over while the producer refuses it, at most
RETRY_MAX_S = 30.0


class ChangelogWriter:
    """Writes (partition, key, value) triples of one table: local store, then changelog."""

    def __init__(self, last_alone: bool) -> None:
        self.last_alone = last_alone

    async def write(self, producer: Any, table: Any, writes: Sequence[tuple[int, Any, Any]]) -> None:
        """Set each key in `table`'s store and hand its changelog record to `producer`
        (Faust's aiokafka producer service), the records of each partition in batches, the
        last of them on its own with `last_alone`. Keys of a later triple win."""
        if not writes:
            return
        by_partition: dict[int, dict[Any, Any]] = {}
        for partition, key, value in writes:  # before any wait: a round may read them at once
            table.data[key] = value
            by_partition.setdefault(partition, {})[key] = value
        kafka = await _aiokafka(producer)
        topic = table.changelog_topic
        name = topic.get_topic_name()
        for partition, records in by_partition.items():
            encoded = [
                (topic.prepare_key(key, table.key_serializer)[0], topic.prepare_value(value, table.value_serializer)[0])
                for key, value in records.items()
            ]
            parts = [encoded[:-1], encoded[-1:]] if self.last_alone else [encoded]
            for part in parts:
                await self._send(kafka, table, name, partition, part)

    @staticmethod
    async def _send(kafka: Any, table: Any, name: str, partition: int, records: list[tuple[bytes, bytes]]) -> None:
        """`records` in as few batches as the producer's batch size allows (a batch takes its
        first record whatever its size), each closed before it is handed over (so that no
        other send joins it)."""
        at = 0
        while at < len(records):
            batch = kafka.create_batch()
            start = at
            while at < len(records) and batch.append(key=records[at][0], value=records[at][1], timestamp=None) is not None:
                at += 1
            batch.close()
            count = at - start
            delivery = await _handed_over(kafka, batch, name, partition, count)
            delivery.add_done_callback(lambda done, count=count: _persisted(table, name, partition, done, count))


async def _aiokafka(producer: Any) -> Any:
    """Faust's aiokafka producer, on this loop (Faust 0.15.3's `_ensure_producer`), waited for
    while Faust has not started it."""

    async def started() -> Any:
        return producer._ensure_producer()

    return await _until_taken(started, NotReady, "changelog: the producer is not started yet")


async def _handed_over(kafka: Any, batch: Any, name: str, partition: int, count: int) -> Any:
    """`send_batch`, tried again with back-off while the producer refuses the batch."""
    return await _until_taken(
        lambda: kafka.send_batch(batch, name, partition=partition), KafkaError,
        f"changelog {name}[{partition}]: {count} records not taken by the producer",
    )


async def _until_taken(attempt: Callable[[], Awaitable[Any]], refused: type[Exception], what: str) -> Any:
    """`attempt()`'s answer, tried again with back-off (0.5 s doubling to `RETRY_MAX_S`)
    while it raises `refused`."""
    backoff = Backoff(most_s=RETRY_MAX_S)
    while True:
        try:
            return await attempt()
        except refused as exc:
            delay = backoff.next()
            log.warning("%s (%r); again in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)


def _persisted(table: Any, name: str, partition: int, done: Any, count: int) -> None:
    """What Faust does when a changelog record is delivered: the store remembers the offset it
    holds (a no-op in memory; RocksDB skips what it has at recovery)."""
    if done.cancelled():
        return
    if done.exception() is not None:
        log.error("changelog %s[%d]: %d records not delivered: %r", name, partition, count, done.exception())
        return
    table.data.set_persisted_offset(TP(name, partition), done.result().offset + count - 1)
