"""How the harness (chaos, soak, online evaluation, benchmarks) looks at a running stack from
outside: topics read from their beginning, the stream processor's HTTP API and /metrics.
One copy of each, so that every tool counts the same way."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """(status, body); an HTTP error status is an answer, a refused connection raises OSError."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - the local stack
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def metric_totals(url: str, names: Sequence[str]) -> dict[str, float]:
    """Sum of every sample of each named metric family on a /metrics page (absent: 0; the
    page does not answer: {})."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        status, body = http_get(url)
    except OSError:
        return {}
    if status != 200:
        return {}
    totals = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(body.decode("utf-8", "replace")):
        if family.name in totals:
            totals[family.name] += sum(s.value for s in family.samples if s.name.endswith("_total") or s.name == family.name)
    return totals


def user_interactions(web_url: str, users: Sequence[str]) -> dict[str, int] | None:
    """Interactions applied per user, from the stream processor's HTTP API (`/users/{id}`; an
    unknown user: 0); None while it does not answer (restarting, paused)."""
    counts = {}
    for user in users:
        try:
            status, body = http_get(f"{web_url}/users/{quote(user, safe='')}", timeout_s=10)
        except OSError:
            return None
        if status == 200:
            counts[user] = int(json.loads(body).get("interactions", 0))
        elif status == 404:
            counts[user] = 0
        else:
            return None
    return counts


def read_topic(kafka_config: Mapping[str, Any], topic: str, idle_s: float = 3.0, max_s: float = 600.0) -> list[Any]:
    """Every message of `topic` from the beginning, until none arrived for `idle_s` (end
    offsets are not used: the embedded broker reports them one low)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {**kafka_config, "group.id": f"probe-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False, "log_level": 0}
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10.0)
        partitions = metadata.topics[topic].partitions if topic in metadata.topics else {}
        if not partitions:
            return []
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        messages: list[Any] = []
        started = last = time.monotonic()
        while time.monotonic() - last < idle_s and time.monotonic() - started < max_s:
            batch = consumer.consume(1000, 0.5)
            for msg in batch:
                if msg.error() is None:
                    messages.append(msg)
            if batch:
                last = time.monotonic()
        return messages
    finally:
        consumer.close()


class TopicTail:
    """Reads every partition of a topic from its beginning in a thread, for as long as a run
    lasts, handing each message to `on_message` (called from that thread)."""

    def __init__(self, kafka_config: dict[str, Any], topic: str, partitions: int, on_message: Callable[[Any], None]) -> None:
        self.kafka_config = kafka_config
        self.topic = topic
        self.partitions = partitions
        self.on_message = on_message
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tail-{topic}", daemon=True)

    def start(self) -> TopicTail:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        consumer = Consumer(
            {**self.kafka_config, "group.id": f"tail-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False}
        )
        consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in range(self.partitions)])
        try:
            while not self._stop.is_set():
                for message in consumer.consume(500, 0.5):
                    if message.error() is None:
                        self.on_message(message)
        finally:
            consumer.close()
