"""Every worker follows every embedded item: for its replica of the items collection
(vectorstore/replica.py says why that exists) and for the fresh-item fan-out to its own users
(streams/user_index.py says why that is per worker).

Faust hands a worker only its share of items.embedded's partitions. So the feed follows every
partition itself (`streams.follow.EveryPartition`). It notes where each partition ends,
loads the whole collection into the replica, then reads on from those positions: an item
embedded during the load is read again, which is harmless, and none is missed. Each batch of
events is one `refresh` of their ids from the vector store, then `on_embedded` is handed the
events. When the store fails, the batch is retried with back-off and the replica keeps serving
what it has; its staleness is the gauge `vlm4rec_streams_item_replica_lag_seconds`. Without a
replica the feed starts at the ends and only hands the events on."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import Message

from streams import metrics
from streams.follow import EveryPartition
from topics.events import EventError, ItemEmbedded, decode
from vectorstore import ReplicaVectorStore

log = logging.getLogger("vlm4rec.streams")


class ItemFeed(EveryPartition):
    thread_name = "item-feed"

    def __init__(
        self,
        replica: ReplicaVectorStore | None,
        topic: str,
        kafka: Mapping[str, Any],
        group_id: str,
        on_embedded: Callable[[list[ItemEmbedded]], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(topic, kafka, group_id, **kwargs)
        self.replica = replica
        self.on_embedded = on_embedded

    def prepare(self) -> bool:
        return self.replica is None or self._load()

    def _load(self) -> bool:
        assert self.replica is not None
        loaded = self._until_done("load", "load the item replica", self.replica.load)
        if loaded is None:
            return False
        metrics.REPLICA_REFRESHES.labels("load", "ok").inc()
        metrics.REPLICA_ITEMS.set(loaded)
        log.info("item replica loaded: %d items", loaded)
        return True

    def follow(self, messages: list[Message]) -> None:
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

    def failed(self, kind: str, lag_from: float | None) -> None:
        metrics.REPLICA_REFRESHES.labels(kind, "failed").inc()
        if lag_from is not None:
            metrics.REPLICA_LAG.set(max(0.0, self._clock() - lag_from))
