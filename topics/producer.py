"""A small producer helper for Python platform teams.

    from topics.producer import EventProducer
    from topics import ItemNew
    with EventProducer({"bootstrap.servers": "127.0.0.1:9092"}) as producer:
        producer.send("items.new", ItemNew(item_id="sku-1", title="Red dress", image_url=url))

It validates before sending (an invalid event raises `EventError` in the producer, not in a
consumer far away), picks the key the contract names, and waits for delivery on `flush`.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from types import TracebackType
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from topics.events import (
    DeadLetter,
    EventError,
    Interaction,
    ItemEmbedded,
    ItemNew,
    Recs,
    Event,
    encode,
)


def event_key(event: Event) -> bytes | None:
    """The partitioning key the contract names for each event: per item or per user, so that
    all events of one entity stay in order on one partition."""
    if isinstance(event, (ItemNew, ItemEmbedded)):
        return event.item_id.encode("utf-8")
    if isinstance(event, (Interaction, Recs)):
        return event.user_id.encode("utf-8")
    if isinstance(event, DeadLetter) and event.key is not None:
        return base64.b64decode(event.key)
    return None


class DeliveryError(RuntimeError):
    """The broker did not accept a message."""


class EventProducer:
    """Validated, keyed, delivery-checked producing of contract events."""

    def __init__(self, kafka_config: dict[str, Any]) -> None:
        # murmur2 is the Java client's and Faust's partitioner: keyed events land where a
        # Kafka Streams or Faust consumer co-partitioning by the same key expects them.
        config = {"linger.ms": 5, "enable.idempotence": True, "acks": "all", "partitioner": "murmur2_random"}
        config.update(kafka_config)
        self._producer = Producer(config)
        self._errors: list[str] = []

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err.str()}")

    def send(self, topic: str, event: Event | dict[str, Any], model: type[Event] | None = None) -> None:
        """Queue one event. A dict is validated against `model` first."""
        if isinstance(event, dict):
            if model is None:
                raise TypeError("a dict event needs its model, e.g. model=ItemNew")
            try:
                event = model.model_validate(event)
            except ValueError as exc:
                raise EventError(str(exc)) from exc
        self.send_raw(topic, encode(event), event_key(event))

    def send_raw(
        self, topic: str, value: bytes, key: bytes | None = None, on_delivery: Callable[[Message], None] | None = None
    ) -> None:
        """Queue bytes as they are (replays, dead letters, tests of bad input). `on_delivery`:
        called with the message once the broker acknowledged it (where it landed)."""
        report = self._on_delivery
        if on_delivery is not None:

            def report(err: KafkaError | None, msg: Message) -> None:
                self._on_delivery(err, msg)
                if err is None:
                    on_delivery(msg)

        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=report)
                break
            except BufferError:
                self._producer.poll(0.1)
        self._producer.poll(0)

    def connect(self, timeout_s: float = 10.0) -> None:
        """Block until the broker answered a metadata request, so that the first event sent
        does not wait for the connection (measured: 0.5-0.6 s for a new producer on the local
        broker, which the first interaction of a latency benchmark paid)."""
        self._producer.list_topics(timeout=timeout_s)

    def refused(self) -> list[str]:
        """Serve delivery reports now and return the messages refused since the last call: how
        a long-running producer hears of failures without waiting for a flush."""
        self._producer.poll(0)
        errors, self._errors = self._errors, []
        return errors

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every queued event is acknowledged; raise if any was refused."""
        remaining = self._producer.flush(timeout_s)
        if remaining:
            raise DeliveryError(f"{remaining} messages not delivered within {timeout_s}s")
        if self._errors:
            errors, self._errors = self._errors, []
            raise DeliveryError(f"{len(errors)} messages refused, first: {errors[0]}")

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.flush()
