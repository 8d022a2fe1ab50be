"""Every worker follows every embedded item: for its replica of the items collection
(vectorstore/replica.py says why that exists) and for the fresh-item fan-out to its own users
(streams/user_index.py says why that is per worker).

Faust hands a worker only its share of items.embedded's partitions. So the feed is a plain
consumer of its own, assigned every partition (no group: it joins nothing and commits
nothing), on a thread of its own, beside the hot path. It notes where each partition ends,
loads the whole collection into the replica, then reads on from those positions: an item
embedded during the load is read again, which is harmless, and none is missed. Each batch of
events is one `refresh` of their ids from the vector store, then `on_embedded` is handed the
events. When the store fails, the batch is retried with back-off and the replica keeps serving
what it has; its staleness is the gauge `vlm4rec_streams_item_replica_lag_seconds`. Without a
replica the feed starts at the ends and only hands the events on."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from confluent_kafka import Consumer, Message, TopicPartition

from streams import metrics
from topics.events import EventError, ItemEmbedded, decode
from vectorstore import ReplicaVectorStore

log = logging.getLogger("vlm4rec.streams")

T = TypeVar("T")


class ItemFeed:
    def __init__(
        self,
        replica: ReplicaVectorStore | None,
        topic: str,
        kafka: Mapping[str, Any],
        group_id: str,
        on_embedded: Callable[[list[ItemEmbedded]], None],
        batch: int = 500,
        poll_s: float = 0.2,
        retry_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.replica = replica
        self.on_embedded = on_embedded
        self.topic = topic
        self.kafka = {**kafka, "group.id": group_id, "enable.auto.commit": False}
        self.batch = batch
        self.poll_s = poll_s
        self.retry_s = retry_s
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="item-feed", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def run(self) -> None:
        consumer = Consumer(self.kafka)
        try:
            starts = self._until_done("load", "read the item topic's ends", lambda: self._ends(consumer))
            if starts is None or (self.replica is not None and not self._load()):
                return
            log.info("following every partition of %s from %s", self.topic, starts)
            consumer.assign([TopicPartition(self.topic, p, offset) for p, offset in starts.items()])
            while not self._stop.is_set():
                self._follow(consumer.consume(self.batch, timeout=self.poll_s))
        finally:
            consumer.close()

    def _load(self) -> bool:
        assert self.replica is not None
        loaded = self._until_done("load", "load the item replica", self.replica.load)
        if loaded is None:
            return False
        metrics.REPLICA_REFRESHES.labels("load", "ok").inc()
        metrics.REPLICA_ITEMS.set(loaded)
        log.info("item replica loaded: %d items", loaded)
        return True

    def _ends(self, consumer: Consumer) -> dict[int, int]:
        """Where to read from after the load: each partition's end, less one. The embedded
        broker reports an end as the base offset of the last record batch + 1 (Kafka: the
        last offset + 1), so there the last batch is read again; against Kafka one record is.
        Both are harmless: a refresh is idempotent and a repeated fan-out only pushes again."""
        topics = consumer.list_topics(self.topic, timeout=10).topics
        described = topics.get(self.topic)
        if described is None or described.error is not None or not described.partitions:
            raise LookupError(f"topic {self.topic} does not exist yet")
        ends = {}
        for partition in described.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, partition), timeout=10)
            ends[partition] = max(low, high - 1)
        return ends

    def _follow(self, messages: list[Message]) -> None:
        items, stamps = [], []
        for message in messages:
            if message.error() is not None:
                log.warning("item feed: %s", message.error())
                continue
            stamps.append(message.timestamp()[1] / 1000)
            try:
                items.append(decode(ItemEmbedded, message.value()))
            except EventError:  # the items agent logs malformed ones
                continue
        if items:
            oldest = min(stamps)
            metrics.REPLICA_LAG.set(max(0.0, self._clock() - oldest))
            if self._until_done("refresh", "take in embedded items", lambda: self._take(items), oldest) is None:
                return
        if len(messages) < self.batch:  # caught up with the topic
            metrics.REPLICA_LAG.set(0.0)

    def _take(self, items: list[ItemEmbedded]) -> bool:
        if self.replica is not None:
            self.replica.refresh([item.item_id for item in items])
            metrics.REPLICA_REFRESHES.labels("refresh", "ok").inc()
            metrics.REPLICA_ITEMS.set(len(self.replica))
        self.on_embedded(items)
        return True

    def _until_done(self, kind: str, what: str, call: Callable[[], T], lag_from: float | None = None) -> T | None:
        """`call()`, retried with back-off until it succeeds or the feed stops (None)."""
        delay = self.retry_s
        while not self._stop.is_set():
            try:
                return call()
            except Exception as exc:  # noqa: BLE001 - a broker or store outage: the feed outlives it
                metrics.REPLICA_REFRESHES.labels(kind, "failed").inc()
                if lag_from is not None:
                    metrics.REPLICA_LAG.set(max(0.0, self._clock() - lag_from))
                log.warning("item feed could not %s (%s: %s); again in %.0fs", what, type(exc).__name__, exc, delay)
            self._stop.wait(delay)
            delay = min(30.0, delay * 2)
        return None
