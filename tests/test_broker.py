"""The embedded broker (`vlm4rec.localstack.broker`): its partition log, consumer groups and
wire format in unit tests, and librdkafka and aiokafka clients against the real process."""

from __future__ import annotations

import asyncio
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from io import BytesIO

import pytest
from aiokafka.protocol.api import RequestHeader_v1
from aiokafka.protocol.fetch import FetchRequest_v6
from aiokafka.protocol.metadata import MetadataRequest_v5
from aiokafka.record.default_records import (
    DefaultRecordBatch,
    DefaultRecordBatchBuilder,
)

from tests.conftest import free_port
from vlm4rec.localstack.broker import protocol as p
from vlm4rec.localstack.broker.groups import STABLE, GroupCoordinator
from vlm4rec.localstack.broker.partition_log import (
    FencedProducer,
    InvalidBatch,
    OutOfOrderSequence,
    PartitionLog,
    split_batches,
)
from vlm4rec.localstack.broker.server import Broker, Retention


def batch(records: list[tuple[bytes | None, bytes | None]], producer: int = -1, epoch: int = -1, sequence: int = -1) -> bytes:
    builder = DefaultRecordBatchBuilder(2, 0, 0, producer, epoch, sequence, 1 << 30)
    for i, (key, value) in enumerate(records):
        builder.append(i, timestamp=1_000 + i, key=key, value=value, headers=[])
    return bytes(builder.build())


def append(log: PartitionLog, data: bytes, now: float = 0.0) -> int:
    (header, raw), = split_batches(data)
    return log.append(header, raw, now)


def read_all(log: PartitionLog, offset: int = 0) -> list[tuple[int, bytes | None, bytes | None]]:
    data = log.read(offset, 1 << 30)
    out = []
    at = 0
    while at < len(data):
        (length,) = struct.unpack_from(">i", data, at + 8)
        out += [(r.offset, r.key, r.value) for r in DefaultRecordBatch(data[at : at + length + 12]) if r.offset >= offset]
        at += length + 12
    return out


# -- partition log ---------------------------------------------------------------------------


def test_offsets_follow_every_record_and_a_read_starts_inside_the_batch_that_holds_it() -> None:
    log = PartitionLog()
    assert append(log, batch([(b"a", b"1"), (b"b", b"2"), (b"c", b"3")])) == 0
    assert append(log, batch([(b"d", b"4")])) == 3
    assert log.next_offset == 4
    assert [o for o, _k, _v in read_all(log, 1)] == [1, 2, 3]
    assert log.read(4, 1 << 20) == b""


def test_a_read_stops_at_its_byte_limit_but_always_returns_one_batch() -> None:
    log = PartitionLog()
    for n in range(5):
        append(log, batch([(b"k", bytes(100) + bytes([n]))]))
    one = log.read(0, 1)
    assert len(split_batches(one)) == 1
    assert len(split_batches(log.read(0, len(one) * 2))) == 2


def test_trimming_moves_the_start_and_frees_whole_batches_only() -> None:
    log = PartitionLog()
    append(log, batch([(b"a", b"1"), (b"b", b"2")]))
    append(log, batch([(b"c", b"3")]))
    held = log.bytes_held
    assert log.trim(1) == 0  # offset 1 sits in the first batch: it stays
    assert log.log_start == 1
    freed = log.trim(2)
    assert freed > 0 and log.bytes_held == held - freed
    assert [o for o, _k, _v in read_all(log, 2)] == [2]


def test_trimming_by_age_spares_recent_batches() -> None:
    log = PartitionLog()
    append(log, batch([(b"a", b"1")]), now=10.0)
    append(log, batch([(b"b", b"2")]), now=20.0)
    log.trim_older(log.next_offset, appended_before=15.0)
    assert log.log_start == 1 and len(log.batches) == 1


def test_compaction_keeps_each_keys_latest_record_and_the_end() -> None:
    log = PartitionLog()
    append(log, batch([(b"a", b"1"), (b"b", b"1")]))
    append(log, batch([(b"a", b"2"), (None, b"keyless")]))
    append(log, batch([(b"b", None)]))  # a tombstone is b's latest
    assert log.compact() > 0
    assert read_all(log) == [(2, b"a", b"2"), (3, None, b"keyless"), (4, b"b", None)]
    assert log.next_offset == 5
    assert all(DefaultRecordBatch(b).validate_crc() for b in log.batches)


def test_an_idempotent_producer_retry_is_answered_with_the_first_offset_not_stored_twice() -> None:
    log = PartitionLog()
    first = batch([(b"a", b"1")], producer=7, epoch=0, sequence=0)
    assert append(log, first) == 0
    assert append(log, batch([(b"b", b"2")], producer=7, epoch=0, sequence=1)) == 1
    assert append(log, first) == 0
    assert log.next_offset == 2
    with pytest.raises(OutOfOrderSequence):
        append(log, batch([(b"c", b"3")], producer=7, epoch=0, sequence=5))
    with pytest.raises(FencedProducer):
        log.producers[7].epoch = 1
        append(log, batch([(b"c", b"3")], producer=7, epoch=0, sequence=2))


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00" * 30, b"\x00" * 16 + b"\x01" + b"\x00" * 60],
    ids=["empty", "short", "magic-1"],
)
def test_malformed_record_sets_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidBatch):
        split_batches(data)


def test_a_batch_whose_crc_does_not_match_is_refused() -> None:
    good = bytearray(batch([(b"a", b"1")]))
    good[-1] ^= 0xFF
    with pytest.raises(InvalidBatch, match="CRC"):
        split_batches(bytes(good))


# -- groups ----------------------------------------------------------------------------------


def join_request(member: str = "", session_ms: int = 6000) -> dict:
    return {
        "group": "g", "session_timeout": session_ms, "rebalance_timeout": 5000, "member_id": member,
        "protocol_type": "consumer", "group_protocols": [{"protocol_name": "range", "protocol_metadata": b"m"}],
    }


def test_two_members_join_one_generation_and_get_the_leaders_assignment() -> None:
    async def run() -> None:
        groups = GroupCoordinator()
        first = await groups.join(join_request(), "a")
        assert first["leader_id"] == first["member_id"] and len(first["members"]) == 1
        await groups.sync({"group": "g", "generation_id": 1, "member_id": first["member_id"], "group_assignment": [{"member_id": first["member_id"], "member_metadata": b"all"}]})
        # a second member: the first learns of the rebalance from its heartbeat and joins again
        second_join = asyncio.create_task(groups.join(join_request(), "b"))
        await asyncio.sleep(0)
        assert groups.heartbeat({"group": "g", "generation_id": 1, "member_id": first["member_id"]}) == p.REBALANCE_IN_PROGRESS
        again = await groups.join(join_request(first["member_id"]), "a")
        second = await second_join
        assert again["generation_id"] == second["generation_id"] == 2
        assert {m["member_id"] for m in again["members"]} == {first["member_id"], second["member_id"]}
        follower = asyncio.create_task(groups.sync({"group": "g", "generation_id": 2, "member_id": second["member_id"], "group_assignment": []}))
        await asyncio.sleep(0)
        assert not follower.done()
        leader = await groups.sync({
            "group": "g", "generation_id": 2, "member_id": first["member_id"],
            "group_assignment": [{"member_id": first["member_id"], "member_metadata": b"p0"}, {"member_id": second["member_id"], "member_metadata": b"p1"}],
        })
        assert leader["member_assignment"] == b"p0" and (await follower)["member_assignment"] == b"p1"
        assert groups.groups["g"].state == STABLE

    asyncio.run(run())


def test_a_silent_member_is_removed_and_the_others_rebalance() -> None:
    async def run() -> None:
        groups = GroupCoordinator()
        one = await groups.join(join_request(session_ms=100), "a")
        await groups.sync({"group": "g", "generation_id": 1, "member_id": one["member_id"], "group_assignment": []})
        groups.tick(time.monotonic() + 1.0)
        assert groups.groups["g"].members == {}
        assert groups.heartbeat({"group": "g", "generation_id": 1, "member_id": one["member_id"]}) == p.UNKNOWN_MEMBER_ID

    asyncio.run(run())


def test_commits_from_a_stale_generation_or_unknown_member_are_refused() -> None:
    async def run() -> None:
        groups = GroupCoordinator()
        one = await groups.join(join_request(), "a")
        await groups.sync({"group": "g", "generation_id": 1, "member_id": one["member_id"], "group_assignment": []})
        commit = {"consumer_group": "g", "consumer_id": one["member_id"], "topics": [{"topic": "t", "partitions": [{"partition": 0, "offset": 5, "metadata": ""}]}]}
        assert groups.commit({**commit, "consumer_group_generation_id": 0}) == p.ILLEGAL_GENERATION
        assert groups.commit({**commit, "consumer_group_generation_id": 1, "consumer_id": "nobody"}) == p.UNKNOWN_MEMBER_ID
        assert groups.committed("g", "t", 0) == -1
        assert groups.commit({**commit, "consumer_group_generation_id": 1}) == p.NONE
        assert groups.committed("g", "t", 0) == 5

    asyncio.run(run())


# -- wire format and retention -----------------------------------------------------------------


def frame(request: object, correlation_id: int = 9) -> bytes:
    header = RequestHeader_v1(request, correlation_id=correlation_id, client_id="test")  # type: ignore[arg-type]
    return header.encode() + request.encode()  # type: ignore[attr-defined]


def test_requests_encoded_by_a_client_decode_and_responses_decode_on_the_client_side() -> None:
    broker = Broker("127.0.0.1", 9092, default_partitions=2)
    request = MetadataRequest_v5(["fresh"], True)
    api_key, version, correlation_id, client_id, _body = p.decode_request(frame(request))
    assert (api_key, version, correlation_id, client_id) == (p.METADATA, 5, 9, "test")
    reply = asyncio.run(broker.handle(frame(request)))
    assert reply is not None
    decoded = request.RESPONSE_TYPE.decode(BytesIO(reply[8:]))
    assert decoded.topics[0][1] == "fresh" and len(decoded.topics[0][3]) == 2  # auto-created, 2 partitions


def test_a_newer_api_versions_request_gets_the_served_versions_and_others_close() -> None:
    broker = Broker("127.0.0.1", 9092)
    newer = struct.pack(">hhih", p.API_VERSIONS, 3, 4, 0) + b"\x00\x00"
    reply = asyncio.run(broker.handle(newer))
    assert reply is not None and struct.unpack_from(">ih", reply, 4) == (4, p.UNSUPPORTED_VERSION)
    with pytest.raises(p.UnsupportedRequest):
        asyncio.run(broker.handle(struct.pack(">hhih", p.FETCH, 12, 5, 0)))


def test_a_fetch_waits_for_a_record_and_answers_when_it_arrives() -> None:
    async def run() -> float:
        broker = Broker("127.0.0.1", 9092)
        broker.create_topic("t", 1)
        request = FetchRequest_v6(-1, 5000, 1, 1 << 20, 0, [("t", [(0, 0, 0, 1 << 20)])])
        waiting = asyncio.create_task(broker.handle(frame(request)))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        started = time.monotonic()
        assert broker._append("t", 0, batch([(b"k", b"v")])) == (p.NONE, 0, 0)
        reply = await waiting
        decoded = request.RESPONSE_TYPE.decode(BytesIO(reply[8:]))
        assert decoded.topics[0][1][0][2] == 1  # high watermark
        return time.monotonic() - started

    assert asyncio.run(run()) < 1.0


def test_retention_trims_what_every_reading_group_committed_past_once_old_enough() -> None:
    broker = Broker("127.0.0.1", 9092, retention=Retention(min_age_s=10, retention_s=1000))
    part = broker.create_topic("t", 1).partitions[0]
    for n in range(4):
        part.append(*split_batches(batch([(b"k", bytes([n]))]))[0], now=float(n))
    group = broker.groups.group("reader")
    group.offsets[("t", 0)] = 3
    group.last_commit = 100.0
    broker.apply_retention(now=11.5)  # offsets 0 and 1 are older than 10 s
    assert part.log_start == 2
    broker.apply_retention(now=100.0)
    assert part.log_start == 3  # the committed offset: offset 3 is not read yet
    lagging = broker.groups.group("lagging")
    lagging.offsets[("t", 0)] = 3
    lagging.last_commit = 100.0
    broker.apply_retention(now=1004.0)  # past retention_s the rest goes, read or not
    assert part.log_start == 4


def test_a_compacted_topic_is_compacted_once_half_of_it_may_be_superseded() -> None:
    broker = Broker("127.0.0.1", 9092, retention=Retention(compact_min_bytes=1))
    part = broker.create_topic("c", 1, {"cleanup.policy": "compact"}).partitions[0]
    for n in range(50):
        part.append(*split_batches(batch([(b"same", bytes([n]))]))[0])
    broker.apply_retention(now=time.monotonic())
    assert read_all(part) == [(49, b"same", bytes([49]))]


# -- the real process with real clients ------------------------------------------------------


@pytest.fixture
def trimming_broker(tmp_path) -> Iterator[str]:
    port = free_port()
    log = open(tmp_path / "broker.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "vlm4rec.localstack.broker", "--port", str(port), "--min-age-s", "0"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    from vlm4rec.localstack import _broker_ready

    deadline = time.monotonic() + 30
    while not _broker_ready(f"127.0.0.1:{port}"):
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "broker.log").read_text()
        time.sleep(0.2)
    yield f"127.0.0.1:{port}"
    process.terminate()
    process.wait(10)
    log.close()


@pytest.mark.integration
def test_librdkafka_produces_idempotently_consumes_in_a_group_and_trimming_follows_its_commits(trimming_broker: str) -> None:
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": trimming_broker})
    admin.create_topics([NewTopic("events", 2, 1)])["events"].result(10)
    producer = Producer({"bootstrap.servers": trimming_broker, "enable.idempotence": True, "acks": "all", "linger.ms": 5})
    for n in range(500):
        producer.produce("events", key=f"u{n % 7}".encode(), value=str(n).encode())
    assert producer.flush(30) == 0
    consumer = Consumer({"bootstrap.servers": trimming_broker, "group.id": "readers", "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe(["events"])
    seen: list[int] = []
    deadline = time.monotonic() + 30
    while len(seen) < 500 and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None and not message.error():
            seen.append(int(message.value()))
    consumer.commit(asynchronous=False)
    assert sorted(seen) == list(range(500))
    deadline = time.monotonic() + 20
    lows: list[int] = []
    while time.monotonic() < deadline:  # retention runs every 2 s and trims to the commits
        lows = [consumer.get_watermark_offsets(TopicPartition("events", n), timeout=5)[0] for n in range(2)]
        highs = [consumer.get_watermark_offsets(TopicPartition("events", n), timeout=5)[1] for n in range(2)]
        if lows == highs:
            break
        time.sleep(0.5)
    consumer.close()
    assert lows == highs and sum(highs) == 500


@pytest.mark.integration
def test_aiokafka_reads_a_compacted_topic_to_its_exact_end(trimming_broker: str) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    async def run() -> dict[bytes, bytes]:
        admin = AIOKafkaAdminClient(bootstrap_servers=trimming_broker)
        await admin.start()
        await admin.create_topics([NewTopic("table-changelog", 1, 1, topic_configs={"cleanup.policy": "compact"})])
        await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=trimming_broker, linger_ms=20)
        await producer.start()
        for n in range(300):
            await producer.send("table-changelog", key=f"k{n % 10}".encode(), value=str(n).encode())
        await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=trimming_broker, auto_offset_reset="earliest")
        await consumer.start()
        tp = TopicPartition("table-changelog", 0)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        assert end == 300
        table: dict[bytes, bytes] = {}
        while await consumer.position(tp) < end:
            for record in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                table[record.key] = record.value
        await consumer.stop()
        return table

    table = asyncio.run(run())
    assert table == {f"k{k}".encode(): str(290 + k).encode() for k in range(10)}


@pytest.mark.integration
def test_garbage_on_one_connection_does_not_stop_the_broker(trimming_broker: str) -> None:
    import socket

    from vlm4rec.localstack import _broker_ready

    host, port = trimming_broker.split(":")
    for junk in (b"\x7f\xff\xff\xff", struct.pack(">i", 12) + b"\xff" * 12, struct.pack(">i", 20) + struct.pack(">hhih", 0, 7, 1, 0) + b"\x00" * 10):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(junk)
            sock.settimeout(2)
            try:
                sock.recv(100)
            except (TimeoutError, ConnectionError):
                pass
    assert _broker_ready(trimming_broker)


def test_a_topics_retention_ms_applies_whoever_reads_it_and_bad_configs_are_refused() -> None:
    broker = Broker("127.0.0.1", 9092, retention=Retention(retention_s=3600))
    reply = asyncio.run(broker.create_topics({
        "create_topic_requests": [
            {"topic": "push", "num_partitions": 1, "replication_factor": 1, "replica_assignment": [],
             "configs": [{"config_key": "retention.ms", "config_value": "1000"}]},
            {"topic": "odd", "num_partitions": 1, "replication_factor": 1, "replica_assignment": [],
             "configs": [{"config_key": "retention.ms", "config_value": "soon"}]},
        ],
        "timeout": 1000, "validate_only": False,
    }, "test", 3))
    assert [row["error_code"] for row in reply["topic_errors"]] == [p.NONE, p.INVALID_CONFIG]
    assert "odd" not in broker.topics
    part = broker.topics["push"].partitions[0]
    part.append(*split_batches(batch([(b"u1", b"recs")]))[0], now=10.0)
    broker.apply_retention(now=10.5)
    assert part.log_start == 0
    broker.apply_retention(now=11.5)
    assert part.log_start == 1 and part.bytes_held == 0


def test_the_minute_summary_gives_request_rates_per_api_and_client() -> None:
    from collections import Counter

    from vlm4rec.localstack.broker.server import request_rates

    counts = Counter({("fetch", "streams"): 600, ("fetch", "worker"): 60, ("fetch", ""): 6, ("produce", "streams"): 1200})
    assert request_rates(counts, 60.0, clients=2) == "produce 20.0 (streams 20.0), fetch 11.1 (streams 10.0, worker 1.0)"
