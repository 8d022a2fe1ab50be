"""A plain consumer that follows every partition of one topic, on a thread of its own.

Faust hands a stream processor only its share of a topic's partitions; what every processor
must see whole (embedded items for its replica and fan-out, `streams.item_feed`; the others'
observations to learn from, `streams.observations`) is read by one of these instead: assigned
every partition (no group: it joins nothing and commits nothing), from where each partition
ends when it starts, beside the hot path. Whatever fails (the broker, what the subclass does
with a batch) is retried with back-off until it succeeds or the feed stops."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from confluent_kafka import Consumer, Message, TopicPartition

from streams.backoff import Backoff

log = logging.getLogger("vlm4rec.streams")

T = TypeVar("T")


class EveryPartition:
    """Subclasses say what to do before following (`prepare`) and with each batch (`follow`)."""

    thread_name = "feed"

    def __init__(
        self,
        topic: str,
        kafka: Mapping[str, Any],
        group_id: str,
        batch: int = 500,
        poll_s: float = 0.2,
        retry_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.topic = topic
        self.kafka = {**kafka, "group.id": group_id, "enable.auto.commit": False}
        self.batch = batch
        self.poll_s = poll_s
        self.retry_s = retry_s
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def run(self) -> None:
        consumer = Consumer(self.kafka)
        try:
            starts = self._until_done("load", f"read the ends of {self.topic}", lambda: self._ends(consumer))
            if starts is None or not self.prepare():
                return
            log.info("following every partition of %s from %s", self.topic, starts)
            consumer.assign([TopicPartition(self.topic, p, offset) for p, offset in starts.items()])
            while not self._stop.is_set():
                self.follow(consumer.consume(self.batch, timeout=self.poll_s))
        finally:
            consumer.close()

    def prepare(self) -> bool:
        """Work before following, once the ends are known; False: the feed stopped meanwhile."""
        return True

    def follow(self, messages: list[Message]) -> None:
        raise NotImplementedError

    def failed(self, kind: str, lag_from: float | None) -> None:
        """A call of `_until_done` failed (for the subclass's metrics)."""

    def _ends(self, consumer: Consumer) -> dict[int, int]:
        """Where to read from: each partition's end, less one. The embedded broker reports an
        end as the base offset of the last record batch + 1 (Kafka: the last offset + 1), so
        there the last batch is read again; against Kafka one record is. Subclasses handle a
        record twice harmlessly (an item refresh is idempotent, a fan-out only pushes again,
        one observation more is learnt)."""
        topics = consumer.list_topics(self.topic, timeout=10).topics
        described = topics.get(self.topic)
        if described is None or described.error is not None or not described.partitions:
            raise LookupError(f"topic {self.topic} does not exist yet")
        ends = {}
        for partition in described.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, partition), timeout=10)
            ends[partition] = max(low, high - 1)
        return ends

    def _until_done(self, kind: str, what: str, call: Callable[[], T], lag_from: float | None = None) -> T | None:
        """`call()`, retried with back-off until it succeeds or the feed stops (None)."""
        backoff = Backoff(first_s=self.retry_s)
        while not self._stop.is_set():
            try:
                return call()
            except Exception as exc:  # noqa: BLE001 - a broker or store outage: the feed outlives it
                self.failed(kind, lag_from)
                delay = backoff.next()
                log.warning("%s could not %s (%s: %s); again in %.0fs", self.thread_name, what, type(exc).__name__, exc, delay)
            self._stop.wait(delay)
        return None
