"""Table writes as whole record batches (streams/changelog.py): on a stand-in producer, the
batches each partition gets; on the real embedded broker, that a lone last record makes the
partition's reported end exact where one batch of everything does not."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError

from streams import changelog
from streams.changelog import ChangelogWriter


class Store(dict):
    """A Faust memory store: a dict that is told the offsets it holds."""

    def __init__(self) -> None:
        super().__init__()
        self.persisted: dict[Any, int] = {}

    def set_persisted_offset(self, tp: Any, offset: int) -> None:
        self.persisted[tp] = offset


class Topic:
    def __init__(self, name: str) -> None:
        self.name = name

    def get_topic_name(self) -> str:
        return self.name

    @staticmethod
    def prepare_key(key: Any, serializer: Any) -> tuple[bytes, None]:
        return json.dumps(key).encode(), None

    @staticmethod
    def prepare_value(value: Any, serializer: Any) -> tuple[bytes, None]:
        return json.dumps(value).encode(), None


class Table:
    def __init__(self, name: str) -> None:
        self.data = Store()
        self.changelog_topic = Topic(name)
        self.key_serializer = self.value_serializer = "json"


class Service:
    """Faust's producer service: `_ensure_producer` gives the aiokafka producer."""

    def __init__(self, kafka: Any) -> None:
        self.kafka = kafka

    def _ensure_producer(self) -> Any:
        return self.kafka


class Batch:
    def __init__(self, size: int) -> None:
        self.records: list[tuple[bytes, bytes]] = []
        self.size, self.closed = size, False

    def append(self, *, key: bytes, value: bytes, timestamp: None) -> object | None:
        if self.closed or (self.records and len(self.records) >= self.size):
            return None
        self.records.append((key, value))
        return object()

    def close(self) -> None:
        self.closed = True


class Kafka:
    """aiokafka's producer as far as the writer uses it; `size` records fill a batch; the first
    `refusals` hand-overs fail as aiokafka's do while the broker is away."""

    def __init__(self, size: int = 100, refusals: int = 0) -> None:
        self.size, self.refusals = size, refusals
        self.sent: list[tuple[int, list[tuple[bytes, bytes]], bool]] = []

    def create_batch(self) -> Batch:
        return Batch(self.size)

    async def send_batch(self, batch: Batch, topic: str, *, partition: int) -> asyncio.Future[Any]:
        if self.refusals:
            self.refusals -= 1
            raise KafkaTimeoutError("no metadata")
        self.sent.append((partition, batch.records, batch.closed))
        delivered: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        delivered.set_result(type("Meta", (), {"offset": 10 * len(self.sent)})())
        return delivered


def written(last_alone: bool, writes: list[tuple[int, str, Any]], size: int = 100, refusals: int = 0) -> tuple[Table, Kafka]:
    table, kafka = Table("profiles-changelog"), Kafka(size, refusals)

    async def run() -> None:
        await ChangelogWriter(last_alone).write(Service(kafka), table, writes)
        await asyncio.sleep(0)  # the deliveries' callbacks

    asyncio.run(run())
    return table, kafka


def keys(records: list[tuple[bytes, bytes]]) -> list[str]:
    return [json.loads(key) for key, _ in records]


def test_each_partitions_last_record_goes_alone_with_the_shims_and_in_one_batch_without() -> None:
    writes = [(0, "a", {"v": 1}), (2, "x", {"v": 2}), (0, "b", {"v": 3}), (0, "a", {"v": 4}), (0, "c", {"v": 5})]
    table, kafka = written(True, writes)
    assert [(p, keys(r)) for p, r, _ in kafka.sent] == [(0, ["a", "b"]), (0, ["c"]), (2, ["x"])]
    assert all(closed for _, _, closed in kafka.sent), "no other send may join a batch"
    assert dict(table.data) == {"a": {"v": 4}, "b": {"v": 3}, "c": {"v": 5}, "x": {"v": 2}}, "a later write wins"
    assert kafka.sent[0][1][0][1] == b'{"v": 4}'
    assert table.data.persisted == {("profiles-changelog", 0): 20, ("profiles-changelog", 2): 30}
    _, kafka = written(False, writes)
    assert [(p, keys(r)) for p, r, _ in kafka.sent] == [(0, ["a", "b", "c"]), (2, ["x"])], "against Kafka: one batch"


def test_a_write_larger_than_a_batch_is_split_and_still_ends_alone() -> None:
    _, kafka = written(True, [(1, f"u{n}", n) for n in range(7)], size=2)
    assert [len(r) for _, r, _ in kafka.sent] == [2, 2, 2, 1]
    assert keys([r for _, batch, _ in kafka.sent for r in batch]) == [f"u{n}" for n in range(7)]


def test_a_batch_the_producer_refuses_is_handed_over_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store holds the values already and a re-run of the batch would write nothing
    (its events are applied): the writer itself tries until the producer takes them."""
    monkeypatch.setattr(changelog.asyncio, "sleep", _no_wait)
    _, kafka = written(True, [(0, "a", 1), (0, "b", 2), (3, "c", 3)], refusals=2)
    assert [(p, keys(r)) for p, r, _ in kafka.sent] == [(0, ["a"]), (0, ["b"]), (3, ["c"])]


async def _no_wait(_: float) -> None:
    return None


@pytest.mark.integration
@pytest.mark.parametrize("broker", ["tansu_broker", "own_broker"])
def test_on_tansu_a_lone_last_record_makes_the_end_exact_and_the_own_broker_needs_none(broker: str, request: pytest.FixtureRequest) -> None:
    """Through aiokafka to the real broker: on Tansu five records written in one batch leave
    the partition's end at 1 (the quirk, `tests/test_delivery.py`); written with `last_alone`
    the end is 5 and every record reads back. The project's own broker ends at 5 either way."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.structs import TopicPartition

    from topics.admin import create_topics

    topics = {f"changelog-{kind}-{uuid.uuid4().hex[:8]}": kind == "alone" for kind in ("alone", "together")}
    bootstrap = request.getfixturevalue(broker)
    create_topics({"bootstrap.servers": bootstrap}, dict.fromkeys(topics, 1))

    async def run() -> dict[str, tuple[int, list[str]]]:
        kafka = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await kafka.start()
        try:
            for name, alone in topics.items():
                await ChangelogWriter(alone).write(Service(kafka), Table(name), [(0, f"u{n}", {"n": n}) for n in range(5)])
            await kafka.flush()
        finally:
            await kafka.stop()
        out = {}
        for name in topics:
            consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
            await consumer.start()
            try:
                tp = TopicPartition(name, 0)
                consumer.assign([tp])
                end = (await consumer.end_offsets([tp]))[tp]
                read: list[str] = []
                while len(read) < end:
                    batch = await consumer.getmany(tp, timeout_ms=2000)
                    if not batch:
                        break
                    read += [json.loads(r.key) for r in batch[tp]]
                out[name] = (end, read[:end])
            finally:
                await consumer.stop()
        return out

    ends = asyncio.run(run())
    for name, alone in topics.items():
        end, read = ends[name]
        if alone or broker == "own_broker":
            assert (end, read) == (5, [f"u{n}" for n in range(5)])
        else:
            assert end == 1, "Tansu's quirk: the end of one batch of five is its base + 1"


def test_the_store_is_set_before_the_producer_is_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """A round may read the profiles as soon as the agent waits: they are in the store before
    the writer first waits, here for a producer Faust has not started yet."""
    from faust.exceptions import NotReady

    monkeypatch.setattr(changelog.asyncio, "sleep", _no_wait)
    table, kafka = Table("profiles-changelog"), Kafka()
    tries: list[dict[str, Any]] = []

    class Starting(Service):
        def _ensure_producer(self) -> Any:
            tries.append(dict(table.data))
            if len(tries) == 1:
                raise NotReady("Producer service not yet started")
            return self.kafka

    asyncio.run(ChangelogWriter(True).write(Starting(kafka), table, [(0, "a", 1)]))
    assert tries == [{"a": 1}, {"a": 1}] and [keys(r) for _, r, _ in kafka.sent] == [["a"]]
