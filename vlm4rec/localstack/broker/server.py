"""The embedded Kafka-protocol broker: topics in memory, one asyncio event loop, the requests
librdkafka and aiokafka send (`protocol`), consumer groups (`groups`), and retention that
follows the readers.

Retention, on a timer (`Retention`): a compacted topic (cleanup.policy=compact, as Faust's
changelogs) keeps each key's latest record once half of what it holds is superseded; any
other partition drops what every group reading it has committed past (once older than
`min_age_s`), and, like Kafka's retention.ms and retention.bytes, what is older than
`retention_s` or beyond `retention_bytes` whoever reads it.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import re
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from vlm4rec.localstack.broker import protocol as p
from vlm4rec.localstack.broker.groups import GroupCoordinator
from vlm4rec.localstack.broker.partition_log import (
    FencedProducer,
    InvalidBatch,
    OutOfOrderSequence,
    PartitionLog,
    split_batches,
)

log = logging.getLogger("vlm4rec.broker")

NODE_ID = 0
CLUSTER_ID = "vlm4rec-embedded"
#: the largest request accepted (Kafka's socket.request.max.bytes)
MAX_FRAME_BYTES = 100 * 1024 * 1024
_TOPIC_NAME = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")


@dataclass(frozen=True)
class Retention:
    """How long records stay; see the module docstring."""

    min_age_s: float = 60.0
    retention_s: float = 3600.0
    retention_bytes: int = 256 * 1024 * 1024
    #: a group without members still holds records this long after its last commit
    group_idle_s: float = 3600.0
    #: a compacted partition is compacted once it holds this much that may be superseded
    compact_min_bytes: int = 1024 * 1024
    check_every_s: float = 2.0


@dataclass
class Topic:
    name: str
    partitions: list[PartitionLog]
    configs: dict[str, str] = field(default_factory=dict)

    @property
    def compacted(self) -> bool:
        return "compact" in self.configs.get("cleanup.policy", "delete")

    def retention_s(self, default: float) -> float:
        """The topic's retention.ms (-1: none) or the broker's."""
        value = int(self.configs.get("retention.ms", default * 1000))
        return float("inf") if value < 0 else value / 1000

    def retention_bytes(self, default: int) -> float:
        value = int(self.configs.get("retention.bytes", default))
        return float("inf") if value < 0 else value


#: topic configs this broker acts on, each an integer (Kafka's meaning)
INTEGER_CONFIGS = ("retention.ms", "retention.bytes")


class Broker:
    """All state of the broker and a handler per API; `serve` runs it on a port."""

    def __init__(self, host: str, port: int, default_partitions: int = 1, retention: Retention | None = None) -> None:
        self.host, self.port = host, port
        self.default_partitions = default_partitions
        self.retention = retention or Retention()
        self.topics: dict[str, Topic] = {}
        self.groups = GroupCoordinator()
        self.next_producer_id = 1000
        self.arrivals: dict[tuple[str, int], list[asyncio.Future[None]]] = {}
        self.freed_bytes = 0
        #: requests since the last minute's summary, by (API, client id): who asks what how often
        self.requests: Counter[tuple[str, str]] = Counter()
        self._handlers = {
            p.PRODUCE: self.produce, p.FETCH: self.fetch, p.LIST_OFFSETS: self.list_offsets,
            p.METADATA: self.metadata, p.OFFSET_COMMIT: self.offset_commit, p.OFFSET_FETCH: self.offset_fetch,
            p.FIND_COORDINATOR: self.find_coordinator, p.JOIN_GROUP: self.join_group,
            p.HEARTBEAT: self.heartbeat, p.LEAVE_GROUP: self.leave_group, p.SYNC_GROUP: self.sync_group,
            p.API_VERSIONS: self.api_versions, p.CREATE_TOPICS: self.create_topics,
            p.DELETE_TOPICS: self.delete_topics, p.DELETE_RECORDS: self.delete_records,
            p.INIT_PRODUCER_ID: self.init_producer_id,
        }

    # -- serving ---------------------------------------------------------------------------

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        server = await asyncio.start_server(self._connection, self.host, self.port, reuse_address=True)
        if self.port == 0:
            self.port = server.sockets[0].getsockname()[1]
        log.info("listening on %s:%d", self.host, self.port)
        upkeep = asyncio.create_task(self._upkeep())
        if ready is not None:
            ready.set()
        try:
            async with server:
                await server.serve_forever()
        finally:
            upkeep.cancel()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while True:
                (size,) = struct.unpack(">i", await reader.readexactly(4))
                if not 10 <= size <= MAX_FRAME_BYTES:
                    log.warning("closing %s: request of %d bytes", peer, size)
                    return
                reply = await self.handle(await reader.readexactly(size))
                if reply is not None:
                    writer.write(reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except p.UnsupportedRequest as exc:
            log.warning("closing %s: %s", peer, exc)
        except Exception:
            log.exception("closing %s after a failed request", peer)
        finally:
            writer.close()

    async def handle(self, frame: bytes) -> bytes | None:
        """One request frame -> its response frame (None: acks=0 produce, no response)."""
        try:
            api_key, version, correlation_id, client_id, body = p.decode_request(frame)
        except p.UnsupportedRequest as exc:
            if exc.api_key == p.API_VERSIONS:
                return p.unsupported_api_versions(exc.correlation_id)
            raise
        handler = self._handlers[api_key]
        self.requests[(handler.__name__, client_id or "")] += 1
        reply = await handler(body, client_id or "", version)
        if reply is None:
            return None
        return p.encode_response(api_key, version, correlation_id, reply)

    # -- topics ----------------------------------------------------------------------------

    def create_topic(self, name: str, partitions: int, configs: dict[str, str] | None = None) -> Topic:
        topic = Topic(name, [PartitionLog() for _ in range(partitions)], dict(configs or {}))
        self.topics[name] = topic
        log.info("created topic %s (%d partition(s)%s)", name, partitions, ", compacted" if topic.compacted else "")
        return topic

    def partition(self, topic: str, partition: int) -> PartitionLog | None:
        found = self.topics.get(topic)
        if found is None or not 0 <= partition < len(found.partitions):
            return None
        return found.partitions[partition]

    async def metadata(self, body: dict[str, Any], _client: str, version: int) -> dict[str, Any]:
        names = body["topics"]
        if names is None or (version == 0 and not names):
            names = sorted(self.topics)
        elif body.get("allow_auto_topic_creation", True):
            for name in names:
                if name not in self.topics and _TOPIC_NAME.match(name):
                    self.create_topic(name, self.default_partitions)
        rows = []
        for name in names:
            topic = self.topics.get(name)
            if topic is None:
                error = p.UNKNOWN_TOPIC_OR_PARTITION if _TOPIC_NAME.match(name) else p.INVALID_TOPIC_EXCEPTION
                rows.append({"error_code": error, "topic": name, "is_internal": False, "partitions": []})
                continue
            rows.append({
                "error_code": p.NONE, "topic": name, "is_internal": False,
                "partitions": [
                    {"error_code": p.NONE, "partition": i, "leader": NODE_ID, "replicas": [NODE_ID], "isr": [NODE_ID], "offline_replicas": []}
                    for i in range(len(topic.partitions))
                ],
            })
        return {
            "throttle_time_ms": 0, "brokers": [{"node_id": NODE_ID, "host": self.host, "port": self.port, "rack": None}],
            "cluster_id": CLUSTER_ID, "controller_id": NODE_ID, "topics": rows,
        }

    async def create_topics(self, body: dict[str, Any], _client: str, _version: int) -> dict[str, Any]:
        errors = []
        for request in body["create_topic_requests"]:
            name, count = request["topic"], request["num_partitions"]
            count = self.default_partitions if count == -1 else count
            configs = {c["config_key"]: c["config_value"] or "" for c in request["configs"]}
            if not _TOPIC_NAME.match(name or ""):
                errors.append((name, p.INVALID_TOPIC_EXCEPTION, f"illegal topic name {name!r}"))
            elif name in self.topics:
                errors.append((name, p.TOPIC_ALREADY_EXISTS, f"topic {name} already exists"))
            elif not 1 <= count <= 10_000:
                errors.append((name, p.INVALID_PARTITIONS, f"{count} partitions"))
            elif bad := _bad_config(configs):
                errors.append((name, p.INVALID_CONFIG, bad))
            else:
                if not body.get("validate_only"):
                    self.create_topic(name, count, configs)
                errors.append((name, p.NONE, None))
        return {
            "throttle_time_ms": 0,
            "topic_errors": [{"topic": n, "error_code": e, "error_message": m} for n, e, m in errors],
        }

    async def delete_topics(self, body: dict[str, Any], _client: str, _version: int) -> dict[str, Any]:
        rows = []
        for name in body["topics"]:
            found = self.topics.pop(name, None)
            rows.append({"topic": name, "error_code": p.NONE if found else p.UNKNOWN_TOPIC_OR_PARTITION})
        return {"throttle_time_ms": 0, "topic_error_codes": rows}

    # -- records ---------------------------------------------------------------------------

    async def init_producer_id(self, _body: dict[str, Any], _client: str, _version: int) -> dict[str, Any]:
        self.next_producer_id += 1
        return {"throttle_time_ms": 0, "error_code": p.NONE, "producer_id": self.next_producer_id, "producer_epoch": 0}

    async def produce(self, body: dict[str, Any], _client: str, _version: int) -> dict[str, Any] | None:
        rows = []
        for topic in body["topics"]:
            parts = []
            for part in topic["partitions"]:
                error, base, log_start = self._append(topic["topic"], part["partition"], part["messages"] or b"")
                parts.append({
                    "partition": part["partition"], "error_code": error, "offset": base, "timestamp": -1,
                    "log_start_offset": log_start,
                })
            rows.append({"topic": topic["topic"], "partitions": parts})
        if body["required_acks"] == 0:
            return None
        return {"topics": rows, "throttle_time_ms": 0}

    def _append(self, topic: str, partition: int, data: bytes) -> tuple[int, int, int]:
        """(error, first offset, log start) of a produce to one partition."""
        found = self.partition(topic, partition)
        if found is None:
            return p.UNKNOWN_TOPIC_OR_PARTITION, -1, -1
        try:
            batches = split_batches(data)
            first = None
            for header, raw in batches:
                base = found.append(header, raw)
                first = base if first is None else first
        except InvalidBatch as exc:
            log.warning("refused a produce to %s/%d: %s", topic, partition, exc)
            return p.CORRUPT_MESSAGE, -1, found.log_start
        except OutOfOrderSequence as exc:
            log.warning("refused a produce to %s/%d: %s", topic, partition, exc)
            return p.OUT_OF_ORDER_SEQUENCE_NUMBER, -1, found.log_start
        except FencedProducer as exc:
            log.warning("refused a produce to %s/%d: %s", topic, partition, exc)
            return p.INVALID_PRODUCER_EPOCH, -1, found.log_start
        for waiter in self.arrivals.pop((topic, partition), []):
            if not waiter.done():
                waiter.set_result(None)
        return p.NONE, first if first is not None else -1, found.log_start

    async def fetch(self, body: dict[str, Any], _client: str, _version: int) -> dict[str, Any]:
        deadline = time.monotonic() + body["max_wait_time"] / 1000
        wanted = [(t["topic"], x) for t in body["topics"] for x in t["partitions"]]
        while True:
            rows, size = self._read(body, wanted)
            left = deadline - time.monotonic()
            if size >= max(body["min_bytes"], 1) or left <= 0:
                return {"throttle_time_ms": 0, "topics": rows}
            waiter = asyncio.get_running_loop().create_future()
            for topic, part in wanted:
                self.arrivals.setdefault((topic, part["partition"]), []).append(waiter)
            try:
                await asyncio.wait_for(waiter, left)
            except TimeoutError:
                pass
            finally:
                for topic, part in wanted:
                    waiting = self.arrivals.get((topic, part["partition"]))
                    if waiting and waiter in waiting:
                        waiting.remove(waiter)

    def _read(self, body: dict[str, Any], wanted: list[tuple[str, dict[str, Any]]]) -> tuple[list[dict[str, Any]], int]:
        budget = body["max_bytes"]
        size = 0
        by_topic: dict[str, list[dict[str, Any]]] = {}
        for topic, part in wanted:
            found = self.partition(topic, part["partition"])
            offset = part.get("fetch_offset", part.get("offset"))
            data, error = b"", p.NONE
            if found is None:
                error = p.UNKNOWN_TOPIC_OR_PARTITION
            elif not found.log_start <= offset <= found.next_offset:
                error = p.OFFSET_OUT_OF_RANGE
            elif budget > 0:
                data = found.read(offset, min(part["max_bytes"], budget))
                budget -= len(data)
                size += len(data)
            end = found.next_offset if found else -1
            by_topic.setdefault(topic, []).append({
                "partition": part["partition"], "error_code": error, "highwater_offset": end,
                "last_stable_offset": end, "log_start_offset": found.log_start if found else -1,
                "aborted_transactions": None, "message_set": data,
            })
        return [{"topics": t, "partitions": parts} for t, parts in by_topic.items()], size

    async def list_offsets(self, body: dict[str, Any], _client: str, _version: int) -> dict[str, Any]:
        rows = []
        for topic in body["topics"]:
            parts = []
            for part in topic["partitions"]:
                found = self.partition(topic["topic"], part["partition"])
                if found is None:
                    parts.append({"partition": part["partition"], "error_code": p.UNKNOWN_TOPIC_OR_PARTITION, "timestamp": -1, "offset": -1})
                    continue
                when = part["timestamp"]
                offset = found.next_offset if when == -1 else found.log_start if when == -2 else found.offset_for_time(when)
                parts.append({"partition": part["partition"], "error_code": p.NONE, "timestamp": -1, "offset": offset})
            rows.append({"topic": topic["topic"], "partitions": parts})
        return {"throttle_time_ms": 0, "topics": rows}

    async def delete_records(self, body: dict[str, Any], _client: str, _version: int) -> dict[str, Any]:
        rows = []
        for topic in body["topics"]:
            parts = []
            for part in topic["partitions"]:
                found = self.partition(topic["name"], part["partition_index"])
                if found is None:
                    parts.append({"partition_index": part["partition_index"], "low_watermark": -1, "error_code": p.UNKNOWN_TOPIC_OR_PARTITION})
                    continue
                offset = found.next_offset if part["offset"] == -1 else part["offset"]
                if not 0 <= offset <= found.next_offset:
                    parts.append({"partition_index": part["partition_index"], "low_watermark": found.log_start, "error_code": p.OFFSET_OUT_OF_RANGE})
                    continue
                self.freed_bytes += found.trim(offset)
                parts.append({"partition_index": part["partition_index"], "low_watermark": found.log_start, "error_code": p.NONE})
            rows.append({"name": topic["name"], "partitions": parts})
        return {"throttle_time_ms": 0, "topics": rows}

    # -- groups ----------------------------------------------------------------------------

    async def find_coordinator(self, _body: dict[str, Any], _client: str, _version: int) -> dict[str, Any]:
        return {"throttle_time_ms": 0, "error_code": p.NONE, "error_message": None, "coordinator_id": NODE_ID, "host": self.host, "port": self.port}

    async def join_group(self, body: dict[str, Any], client: str, _version: int) -> dict[str, Any]:
        return await self.groups.join(body, client)

    async def sync_group(self, body: dict[str, Any], _client: str, _version: int) -> dict[str, Any]:
        return await self.groups.sync(body)

    async def heartbeat(self, body: dict[str, Any], _client: str, _version: int) -> dict[str, Any]:
        return {"throttle_time_ms": 0, "error_code": self.groups.heartbeat(body)}

    async def leave_group(self, body: dict[str, Any], _client: str, _version: int) -> dict[str, Any]:
        return {"throttle_time_ms": 0, "error_code": self.groups.leave(body)}

    async def offset_commit(self, body: dict[str, Any], _client: str, _version: int) -> dict[str, Any]:
        error = self.groups.commit(body)
        return {
            "throttle_time_ms": 0,
            "topics": [
                {"topic": t["topic"], "partitions": [{"partition": x["partition"], "error_code": error} for x in t["partitions"]]}
                for t in body["topics"]
            ],
        }

    async def offset_fetch(self, body: dict[str, Any], _client: str, _version: int) -> dict[str, Any]:
        group_id = body["consumer_group"]
        asked = body["topics"]
        if asked is None:
            held = self.groups.groups.get(group_id)
            by_topic: dict[str, list[int]] = {}
            for topic, partition in held.offsets if held else {}:
                by_topic.setdefault(topic, []).append(partition)
            asked = [{"topic": t, "partitions": sorted(parts)} for t, parts in by_topic.items()]
        return {
            "throttle_time_ms": 0, "error_code": p.NONE,
            "topics": [
                {
                    "topic": t["topic"],
                    "partitions": [
                        {"partition": x, "offset": self.groups.committed(group_id, t["topic"], x), "metadata": "", "error_code": p.NONE}
                        for x in t["partitions"]
                    ],
                }
                for t in asked
            ],
        }

    async def api_versions(self, _body: dict[str, Any], _client: str, _version: int) -> dict[str, Any]:
        return p.api_versions_body()

    # -- upkeep ----------------------------------------------------------------------------

    async def _upkeep(self) -> None:
        """Group timeouts every 0.25 s, retention every `check_every_s`, a summary each minute."""
        last_retention = last_summary = time.monotonic()
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            self.groups.tick(now)
            if now - last_retention >= self.retention.check_every_s:
                freed = self.freed_bytes
                self.apply_retention(now)
                if self.freed_bytes > freed:
                    _return_freed_memory()
                last_retention = now
            if now - last_summary >= 60:
                self._log_summary(now - last_summary)
                last_summary = now

    def _log_summary(self, seconds: float) -> None:
        held = {t.name: sum(x.bytes_held for x in t.partitions) for t in self.topics.values()}
        biggest = ", ".join(f"{name} {size / 1e6:.1f}" for name, size in sorted(held.items(), key=lambda x: -x[1])[:6])
        log.info("holding %.1f MB (%s); %.1f MB freed so far", sum(held.values()) / 1e6, biggest, self.freed_bytes / 1e6)
        if self.requests:
            log.info("requests per second over the last minute: %s", request_rates(self.requests, seconds))
        self.requests.clear()

    def bytes_held(self) -> int:
        return sum(x.bytes_held for t in self.topics.values() for x in t.partitions)

    def apply_retention(self, now: float) -> None:
        rules = self.retention
        readers = self.groups.readers(now, rules.group_idle_s)
        for topic in self.topics.values():
            for index, part in enumerate(topic.partitions):
                if topic.compacted:
                    if part.dirty_bytes >= max(rules.compact_min_bytes, part.bytes_held // 2):
                        self.freed_bytes += part.compact()
                    continue
                committed = [g.offsets[(topic.name, index)] for g in readers if (topic.name, index) in g.offsets]
                if committed:
                    self.freed_bytes += part.trim_older(min(committed), now - rules.min_age_s)
                self.freed_bytes += part.trim_older(part.next_offset, now - topic.retention_s(rules.retention_s))
                while part.bytes_held > topic.retention_bytes(rules.retention_bytes) and len(part.batches) > 1:
                    self.freed_bytes += part.trim(part.bases[1])


def _return_freed_memory() -> None:
    """Hands the heap's free pages back to the system (glibc `malloc_trim`): record batches are
    large allocations that glibc keeps for reuse after they are freed, so without it the
    process's memory followed what it had ever held at once, not what it holds."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only; musl and others lack it
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def _bad_config(configs: dict[str, str]) -> str | None:
    for key in INTEGER_CONFIGS:
        if key in configs:
            try:
                int(configs[key])
            except ValueError:
                return f"{key} must be an integer, got {configs[key]!r}"
    return None


def request_rates(requests: Counter[tuple[str, str]], seconds: float, clients: int = 3) -> str:
    """"fetch 310.2 (a 250.1, b 60.1), produce ...": each API's rate, busiest first, with its
    busiest clients: the pace at which the stack's parts poll and send, which costs every one
    of them CPU whether or not there is data."""
    by_api: dict[str, Counter[str]] = {}
    for (api, client), count in requests.items():
        by_api.setdefault(api, Counter())[client] += count
    parts = []
    for api, counts in sorted(by_api.items(), key=lambda x: -sum(x[1].values())):
        busiest = ", ".join(f"{client or '-'} {count / seconds:.1f}" for client, count in counts.most_common(clients))
        parts.append(f"{api} {sum(counts.values()) / seconds:.1f} ({busiest})")
    return ", ".join(parts)
