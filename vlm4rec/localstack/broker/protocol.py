"""The Kafka wire format as this broker speaks it: which API versions it serves, and requests
and responses as plain dicts.

The message schemas are aiokafka's (`aiokafka.protocol`), which the stream processor depends
on anyway; this module only reads them the other way round (a broker decodes requests and
encodes responses). Only non-flexible versions are served, so every request header is v1 and
every response header v0; clients negotiate down to them through ApiVersions (librdkafka and
aiokafka both do).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from io import BytesIO
from typing import Any

from aiokafka.protocol import (
    admin,
    commit,
    coordination,
    fetch,
    group,
    metadata,
    offset,
    produce,
    transaction,
)
from aiokafka.protocol.api import RequestStruct
from aiokafka.protocol.types import Array, Schema

PRODUCE, FETCH, LIST_OFFSETS, METADATA = 0, 1, 2, 3
OFFSET_COMMIT, OFFSET_FETCH, FIND_COORDINATOR, JOIN_GROUP = 8, 9, 10, 11
HEARTBEAT, LEAVE_GROUP, SYNC_GROUP, API_VERSIONS = 12, 13, 14, 18
CREATE_TOPICS, DELETE_TOPICS, DELETE_RECORDS, INIT_PRODUCER_ID = 19, 20, 21, 22

#: (api key, version) -> request struct. The ranges are the versions whose fields this broker
#: fills in; older ones use other record formats (Produce < 3, Fetch < 4) or group semantics
#: (OffsetCommit < 2), newer ones add features it does not have (fetch sessions, leader epochs,
#: static membership) and are what librdkafka and aiokafka fall back from gracefully.
_SERVED: dict[int, tuple[Any, range]] = {
    PRODUCE: (produce, range(3, 8)),
    FETCH: (fetch, range(4, 7)),
    LIST_OFFSETS: (offset, range(1, 4)),
    METADATA: (metadata, range(6)),
    OFFSET_COMMIT: (commit, range(2, 4)),
    OFFSET_FETCH: (commit, range(1, 4)),
    FIND_COORDINATOR: (coordination, range(2)),
    JOIN_GROUP: (group, range(3)),
    HEARTBEAT: (group, range(2)),
    LEAVE_GROUP: (group, range(2)),
    SYNC_GROUP: (group, range(2)),
    API_VERSIONS: (admin, range(3)),
    CREATE_TOPICS: (admin, range(4)),
    DELETE_TOPICS: (admin, range(4)),
    DELETE_RECORDS: (admin, range(2)),
    INIT_PRODUCER_ID: (transaction, range(1)),
}


def _request_structs() -> dict[tuple[int, int], type[RequestStruct]]:
    found: dict[tuple[int, int], type[RequestStruct]] = {}
    for api_key, (module, versions) in _SERVED.items():
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, RequestStruct)
                and value is not RequestStruct
                and getattr(value, "API_KEY", None) == api_key
                and value.API_VERSION in versions
            ):
                found[(api_key, value.API_VERSION)] = value
    for api_key, (_module, versions) in _SERVED.items():
        for version in versions:
            struct_class = found.get((api_key, version))
            if struct_class is None or struct_class.FLEXIBLE_VERSION:
                raise RuntimeError(f"aiokafka has no usable schema for API {api_key} v{version}")
    return found


REQUESTS = _request_structs()

#: what ApiVersions answers: (api key, min version, max version)
API_VERSION_RANGES = [(key, versions.start, versions.stop - 1) for key, (_m, versions) in sorted(_SERVED.items())]

#: Kafka error codes used here
NONE = 0
OFFSET_OUT_OF_RANGE = 1
CORRUPT_MESSAGE = 2
UNKNOWN_TOPIC_OR_PARTITION = 3
ILLEGAL_GENERATION = 22
INCONSISTENT_GROUP_PROTOCOL = 23
UNKNOWN_MEMBER_ID = 25
INVALID_SESSION_TIMEOUT = 26
REBALANCE_IN_PROGRESS = 27
UNSUPPORTED_VERSION = 35
TOPIC_ALREADY_EXISTS = 36
INVALID_PARTITIONS = 37
INVALID_REQUEST = 42
UNSUPPORTED_FOR_MESSAGE_FORMAT = 43
OUT_OF_ORDER_SEQUENCE_NUMBER = 45
INVALID_PRODUCER_EPOCH = 47
INVALID_TOPIC_EXCEPTION = 17
INVALID_CONFIG = 40
UNKNOWN_PRODUCER_ID = 59


class UnsupportedRequest(Exception):
    """An API or version this broker does not serve; the connection answers ApiVersions only."""

    def __init__(self, api_key: int, api_version: int, correlation_id: int) -> None:
        super().__init__(f"API {api_key} v{api_version} is not served")
        self.api_key, self.api_version, self.correlation_id = api_key, api_version, correlation_id


def decode_request(frame: bytes) -> tuple[int, int, int, str | None, dict[str, Any]]:
    """One request frame (without its length) -> (api key, version, correlation id, client id, body)."""
    api_key, api_version, correlation_id = struct.unpack_from(">hhi", frame, 0)
    (client_len,) = struct.unpack_from(">h", frame, 8)
    client_id = None if client_len < 0 else frame[10 : 10 + client_len].decode("utf-8", "replace")
    struct_class = REQUESTS.get((api_key, api_version))
    if struct_class is None:
        raise UnsupportedRequest(api_key, api_version, correlation_id)
    data = BytesIO(frame)
    data.seek(10 + max(client_len, 0))
    values = struct_class.SCHEMA.decode(data)
    return api_key, api_version, correlation_id, client_id, _named(struct_class.SCHEMA, values)


def encode_response(api_key: int, api_version: int, correlation_id: int, body: dict[str, Any]) -> bytes:
    """A response frame, length included. `body` may hold fields of other versions; the ones
    this version's schema names must all be there (a missing one is a bug: KeyError)."""
    schema = REQUESTS[(api_key, api_version)].RESPONSE_TYPE.SCHEMA
    payload = struct.pack(">i", correlation_id) + schema.encode(_positional(schema, body))
    return struct.pack(">i", len(payload)) + payload


def unsupported_api_versions(correlation_id: int) -> bytes:
    """ApiVersions v0 with UNSUPPORTED_VERSION: what Kafka answers a newer ApiVersions request
    (KIP-511), so the client retries with a version listed here."""
    return encode_response(
        API_VERSIONS, 0, correlation_id,
        {"error_code": UNSUPPORTED_VERSION, "api_versions": _version_rows()},
    )


def _version_rows() -> list[dict[str, int]]:
    return [{"api_key": k, "min_version": lo, "max_version": hi} for k, lo, hi in API_VERSION_RANGES]


def api_versions_body() -> dict[str, Any]:
    return {"error_code": NONE, "api_versions": _version_rows(), "throttle_time_ms": 0}


def _named(schema: Schema, values: tuple[Any, ...]) -> dict[str, Any]:
    return {name: _nested(field, value, _named) for name, field, value in zip(schema.names, schema.fields, values, strict=True)}


def _positional(schema: Schema, body: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(_nested(field, body[name], _positional) for name, field in zip(schema.names, schema.fields, strict=True))


def _nested(field: Any, value: Any, convert: Callable[[Schema, Any], Any]) -> Any:
    """`convert` applied to every struct inside `value`, through arrays."""
    if isinstance(field, Schema):
        return convert(field, value)
    if isinstance(field, Array) and value is not None:
        return [_nested(field.array_of, item, convert) for item in value]
    return value
