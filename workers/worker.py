"""The embedding worker: items.new -> vector in the store -> items.embedded.

At-least-once with idempotent sinks: a batch's offsets are committed only after its vectors
are upserted (by item_id) and its `items.embedded` and dead-letter messages are acknowledged.
A worker killed mid-batch leaves the batch uncommitted; whoever takes the partition next
re-embeds it and overwrites the same keys. Several workers in one consumer group share the
partitions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from topics import DeadLetter, EventError, ItemEmbedded, ItemNew, decode, encode
from vectorstore import VectorRecord, VectorStore
from workers import metrics
from workers.backends.base import BackendError
from workers.embedder import Embedder, EmbedResult, ItemContent, content_hash
from images.loader import ImageError, ImageLoader
from images.thumbnails import stored_thumbnail

log = logging.getLogger("vlm4rec.worker")

T = TypeVar("T")


@dataclass(frozen=True)
class WorkerConfig:
    consumer: dict[str, Any]
    producer: dict[str, Any]
    items_topic: str
    embedded_topic: str
    dlq_topic: str
    batch_size: int = 32
    batch_ms: int = 100
    fetch_threads: int = 8
    retry_max_s: float = 30.0


@dataclass
class _Pending:
    """One accepted item of the batch on its way to the store."""

    message: Message
    item: ItemNew
    hash: str
    thumb: str | None = None  # the stored thumbnail's data: URI, once the picture is read


class EmbeddingWorker:
    def __init__(
        self,
        config: WorkerConfig,
        embedder: Embedder,
        store: VectorStore,
        loader: ImageLoader,
    ) -> None:
        self.config = config
        self.embedder = embedder
        self.store = store
        self.loader = loader
        self._consumer = Consumer(config.consumer)
        # murmur2 like Faust: items.embedded is co-partitioned with the stream processor's
        # `pending` topic by item_id.
        self._producer = Producer(
            {"linger.ms": 5, "enable.idempotence": True, "partitioner": "murmur2_random", **config.producer}
        )
        self._fetch_pool = ThreadPoolExecutor(config.fetch_threads, thread_name_prefix="image-fetch")
        self._delivery_errors: list[str] = []
        self._stop = threading.Event()

    # --- main loop ---------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        """Consume until `stop` is set (or `self.stop()` is called)."""
        if stop is not None:
            self._stop = stop
        self.store.open(self.embedder.dim, self.embedder.model_id, self.embedder.strategy)
        self._consumer.subscribe([self.config.items_topic])
        log.info(
            "embedding worker consuming %s with %s (dim %d), batches of %d / %d ms",
            self.config.items_topic, self.embedder.model_id, self.embedder.dim,
            self.config.batch_size, self.config.batch_ms,
        )
        try:
            while not self._stop.is_set():
                messages = self._consumer.consume(self.config.batch_size, self.config.batch_ms / 1000)
                messages = [m for m in messages if self._usable(m)]
                if messages:
                    self.process(messages)
        finally:
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)
        self._producer.flush(10)
        self._consumer.close()

    @staticmethod
    def _usable(message: Message) -> bool:
        error = message.error()
        if error is None:
            return True
        if error.code() != KafkaError._PARTITION_EOF:
            log.warning("consumer error: %s", error)
        return False

    # --- one batch ---------------------------------------------------------------------
    def process(self, messages: Sequence[Message]) -> None:
        """Embed, upsert, publish and commit one batch; dependencies are retried until they
        answer (or the worker is stopped, leaving the batch uncommitted)."""
        metrics.BATCH_SIZE.observe(len(messages))
        latest: dict[str, _Pending] = {}
        for message in messages:
            try:
                item = decode(ItemNew, message.value())
            except EventError as exc:
                self._dead_letter(message, exc.reason, "bad_event")
                continue
            digest = content_hash(self.embedder.model_id, item.title, item.text, item.image_url)
            latest[item.item_id] = _Pending(message, item, digest)  # later offset wins

        pending = list(latest.values())
        stored = self._retry("milvus", lambda: self.store.get_hashes([p.item.item_id for p in pending]))
        unchanged = [p for p in pending if stored.get(p.item.item_id) == p.hash]
        changed = [p for p in pending if stored.get(p.item.item_id) != p.hash]

        started = time.perf_counter()
        contents, fetched = self._fetch_images(changed)
        metrics.STAGE_SECONDS.labels("fetch").observe(time.perf_counter() - started)

        result = self._embed(contents)
        for stage, ms in result.stages_ms.items():
            metrics.STAGE_SECONDS.labels(stage.removesuffix("_ms")).observe(ms / 1000)
        for item_id, reason in result.refused.items():
            self._dead_letter(fetched[item_id].message, reason, "refused")

        now = time.time()
        records = [
            VectorRecord(
                item_id=item_id,
                vector=vector,
                content_hash=fetched[item_id].hash,
                created_at=fetched[item_id].item.created_at or 0.0,
                embedded_at=now,
                meta={
                    "title": fetched[item_id].item.title[:300],
                    "image_url": _address(fetched[item_id].item.image_url),
                    "category": fetched[item_id].item.category[:100],
                    **({"thumb": fetched[item_id].thumb} if fetched[item_id].thumb else {}),
                },
            )
            for item_id, vector in zip(result.item_ids, result.vectors, strict=True)
        ]
        started = time.perf_counter()
        self._retry("milvus", lambda: self.store.upsert(records))
        metrics.STAGE_SECONDS.labels("upsert").observe(time.perf_counter() - started)

        done = [fetched[i] for i in result.item_ids] + unchanged
        started = time.perf_counter()
        for p in done:
            event = ItemEmbedded(
                item_id=p.item.item_id,
                model=self.embedder.model_id,
                dim=self.embedder.dim,
                embedded_at=now,
                created_at=p.item.created_at,
                strategy=self.embedder.strategy,
                content_hash=p.hash,
                published_at=_kafka_time(p.message),
            )
            self._produce(self.config.embedded_topic, encode(event), p.message.key())
        self._retry("broker", self._flush)
        metrics.STAGE_SECONDS.labels("publish").observe(time.perf_counter() - started)

        for item_id in result.item_ids:
            published = _kafka_time(fetched[item_id].message)
            if published is not None:
                metrics.ITEM_LATENCY.observe(max(0.0, time.time() - published))
        metrics.ITEMS.labels("embedded").inc(len(result.item_ids))
        metrics.ITEMS.labels("unchanged").inc(len(unchanged))
        self._commit(messages)

    def _fetch_images(self, pending: list[_Pending]) -> tuple[list[ItemContent], dict[str, _Pending]]:
        """Download and decode the batch's images concurrently; a bad one dead-letters its item."""

        def load(p: _Pending) -> ItemContent | str:
            image = None
            if p.item.image_url:
                try:
                    image = self.loader.load(p.item.image_url)
                except ImageError as exc:
                    return exc.reason
                p.thumb = stored_thumbnail(image)
            return ItemContent(p.item.item_id, p.item.title, p.item.text, image)

        contents: list[ItemContent] = []
        fetched: dict[str, _Pending] = {}
        for p, outcome in zip(pending, self._fetch_pool.map(load, pending), strict=True):
            if isinstance(outcome, str):
                self._dead_letter(p.message, f"image: {outcome}", "bad_image")
            else:
                contents.append(outcome)
                fetched[p.item.item_id] = p
        return contents, fetched

    def _embed(self, contents: list[ItemContent]) -> EmbedResult:
        """Embed the batch in one call. If the model fails on it, embed one item at a time so
        that only the item that breaks the model is dead-lettered. A backend that is down
        (`BackendError`) is waited for, never blamed on the items."""
        try:
            return self._retry("model", lambda: self.embedder.embed(contents), retry_on=(BackendError,))
        except BackendError:
            raise
        except Exception:  # noqa: BLE001 - a model crash on some input
            log.exception("batch of %d failed in the model; retrying item by item", len(contents))
        merged = EmbedResult(np.zeros((0, self.embedder.dim), np.float32), [], {}, {})
        rows = [merged.vectors]
        for content in contents:
            try:
                one = self._retry("model", lambda c=content: self.embedder.embed([c]), retry_on=(BackendError,))
            except BackendError:
                raise
            except Exception as exc:  # noqa: BLE001
                merged.refused[content.item_id] = f"model failed on this item: {exc}"[:500]
                continue
            rows.append(one.vectors)
            merged.item_ids.extend(one.item_ids)
            merged.descriptions.update(one.descriptions)
            merged.refused.update(one.refused)
        merged.vectors = np.concatenate(rows)
        return merged

    # --- sinks -------------------------------------------------------------------------
    def _dead_letter(self, message: Message, reason: str, reason_class: str) -> None:
        letter = DeadLetter.of(
            message.value(), message.key(), message.topic(), message.partition(), message.offset(), reason
        )
        self._produce(self.config.dlq_topic, encode(letter), message.key())
        metrics.ITEMS.labels("dead_letter").inc()
        metrics.FAILURES.labels(reason_class).inc()
        log.warning("dead-lettered %s[%d]@%d: %s", message.topic(), message.partition(), message.offset(), reason)

    def _produce(self, topic: str, value: bytes, key: bytes | None) -> None:
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=self._on_delivery)
                return
            except BufferError:
                self._producer.poll(0.1)

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._delivery_errors.append(f"{message.topic()}: {error.str()}")

    def _flush(self) -> None:
        remaining = self._producer.flush(30)
        if remaining or self._delivery_errors:
            errors, self._delivery_errors = self._delivery_errors, []
            raise RuntimeError(f"{remaining} undelivered, errors: {errors[:3]}")

    def _commit(self, messages: Sequence[Message]) -> None:
        offsets: dict[tuple[str, int], int] = {}
        for m in messages:
            key = (m.topic(), m.partition())
            offsets[key] = max(offsets.get(key, -1), m.offset() + 1)
        partitions = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            self._consumer.commit(offsets=partitions, asynchronous=False)
        except Exception as exc:  # noqa: BLE001 - a rebalance moved the partition: re-delivery is harmless
            log.warning("offset commit failed (%s); the batch may be re-delivered, which is harmless", exc)

    def _retry(
        self,
        dependency: str,
        action: Callable[[], T],
        retry_on: tuple[type[BaseException], ...] = (Exception,),
    ) -> T:
        """Call `action` until it succeeds, backing off up to `retry_max_s`; give up only when
        the worker is stopping (the batch then stays uncommitted)."""
        delay = 0.5
        while True:
            try:
                return action()
            except retry_on as exc:
                if self._stop.is_set():
                    raise
                metrics.RETRIES.labels(dependency).inc()
                log.warning("%s failed (%s); retrying in %.1fs", dependency, exc, delay)
                self._stop.wait(delay)
                delay = min(self.config.retry_max_s, delay * 2)


def _kafka_time(message: Message) -> float | None:
    kind, millis = message.timestamp()
    return millis / 1000 if kind != 0 and millis > 0 else None


def _address(image_url: str | None) -> str:
    """The picture's address as kept in the item's meta: a `data:` URI is the picture itself,
    already kept as the (smaller) thumbnail, so it is not copied again."""
    return "" if not image_url or image_url.startswith("data:") else image_url
