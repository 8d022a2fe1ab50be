"""Why the stream processor's producer uses large record batches (`StreamsConfig.producer_batch_bytes`).

aiokafka, under Faust, puts at most one record batch per partition in a produce request and
keeps one request in flight per broker. A burst of profile writes (one changelog record of a
few KB per user per batch) therefore moves one batch per partition per round trip: with
Faust's 16 KB default, a 1,000/s stream's profile agent spent 72 % of its time waiting for its
changelog flush and applied 75 % of the interactions (docs/streaming.md). Shown here on the real
embedded broker by counting produce requests."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.protocol.produce import ProduceRequest

from streams.app import StreamsConfig
from topics.admin import create_topics

pytestmark = pytest.mark.integration

RECORDS = 300
RECORD_BYTES = 5_000  # a profile of a dozen items with its packed vector


async def _produce_requests(bootstrap: str, topic: str, batch_bytes: int) -> int:
    """Produce requests that a burst of RECORDS profile-sized records to one partition takes."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_batch_size=batch_bytes, linger_ms=2)
    await producer.start()
    requests = 0
    send = producer.client.send

    async def counted(node_id, request, **kwargs):  # noqa: ANN001, ANN202 - aiokafka's signature
        nonlocal requests
        requests += isinstance(request, ProduceRequest)
        return await send(node_id, request, **kwargs)

    producer.client.send = counted
    try:
        value = b"x" * RECORD_BYTES
        deliveries = [await producer.send(topic, value, partition=0) for _ in range(RECORDS)]
        await asyncio.gather(*deliveries)
    finally:
        await producer.stop()
    return requests


def test_a_burst_of_profile_writes_takes_few_produce_requests(infra) -> None:  # noqa: ANN001 - fixture
    bootstrap = infra.bootstrap
    create_topics(infra.settings().kafka_config(), {"batching-default": 1, "batching-ours": 1})
    small = asyncio.run(_produce_requests(bootstrap, "batching-default", 16_384))
    ours = asyncio.run(_produce_requests(bootstrap, "batching-ours", StreamsConfig.producer_batch_bytes))
    assert small >= RECORDS * RECORD_BYTES // 16_384 - 1, "one 16 KB batch per request: a round trip per three records"
    assert ours <= 6, f"{ours} requests for {RECORDS * RECORD_BYTES // 1000} KB"
