"""Idempotent topic creation.

Topics are created explicitly, with the configured partition count, before any process
starts: a topic created implicitly by a producer takes the broker's default partition count,
and Faust refuses tables whose source and changelog topics disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic


@dataclass(frozen=True)
class TopicStatus:
    name: str
    state: str  # "created" | "exists"
    partitions: int
    wanted_partitions: int

    @property
    def mismatch(self) -> bool:
        return self.partitions != self.wanted_partitions


def create_topics(
    kafka_config: dict[str, str],
    partitions: dict[str, int],
    replication_factor: int = 1,
    timeout_s: float = 30.0,
    configs: dict[str, dict[str, str]] | None = None,
) -> list[TopicStatus]:
    """Create every topic in `partitions` that does not exist yet, with its `configs` (Kafka's
    topic configs, such as retention.ms); report the rest as they are.

    An existing topic with a different partition count is reported (`mismatch`), never altered:
    repartitioning reshuffles keys and is an operator's decision; nor are its configs.
    """
    admin = AdminClient(dict(kafka_config))
    existing = admin.list_topics(timeout=timeout_s).topics
    missing = [name for name in partitions if name not in existing]
    created: set[str] = set()
    if missing:
        futures = admin.create_topics(
            [NewTopic(name, partitions[name], replication_factor, config=(configs or {}).get(name, {})) for name in missing],
            operation_timeout=timeout_s,
            request_timeout=timeout_s,
        )
        for name, future in futures.items():
            try:
                future.result()
                created.add(name)
            except KafkaException as exc:
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                    raise
        existing = admin.list_topics(timeout=timeout_s).topics
    return [
        TopicStatus(
            name=name,
            state="created" if name in created else "exists",
            partitions=len(existing[name].partitions) if name in existing else 0,
            wanted_partitions=wanted,
        )
        for name, wanted in partitions.items()
    ]
