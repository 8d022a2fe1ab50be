"""One partition's records in memory: record batches as producers sent them, found by offset
through a sorted index, trimmed from the front and compacted by key.

Why this shape: a fetch must cost what it returns, not what the partition holds (the broker
this replaces listed every batch it held on every fetch: docs/hardening.md), and memory must
follow what readers still need, not everything ever sent.
"""

from __future__ import annotations

import struct
import time
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

from aiokafka.record.default_records import (
    DefaultRecordBatch,
    DefaultRecordBatchBuilder,
)

#: bytes of a v2 record batch header (KIP-98)
HEADER_BYTES = 61
#: how many recent batches per producer are remembered to recognise a retried one (Kafka: 5,
#: the most a producer keeps in flight with idempotence)
PRODUCER_BATCHES_KEPT = 5
#: records per batch when compaction rewrites a partition
COMPACTED_BATCH_RECORDS = 500


class InvalidBatch(ValueError):
    """A produced record set that is not a valid v2 record batch; the produce is refused."""


@dataclass(frozen=True)
class BatchHeader:
    """The fields of a v2 record batch header the broker acts on."""

    length: int  # of the whole batch, bytes
    magic: int
    last_offset_delta: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    records: int
    attributes: int

    @classmethod
    def read(cls, data: bytes, at: int) -> BatchHeader:
        if len(data) - at < HEADER_BYTES:
            raise InvalidBatch(f"a record batch header needs {HEADER_BYTES} bytes, {len(data) - at} left")
        (batch_length,) = struct.unpack_from(">i", data, at + 8)
        magic = data[at + 16]
        if magic != 2:
            raise InvalidBatch(f"record batch magic {magic}: only v2 batches (Kafka 0.11+ clients) are accepted")
        (attributes, last_delta) = struct.unpack_from(">hi", data, at + 21)
        (producer_id, producer_epoch, base_sequence, records) = struct.unpack_from(">qhii", data, at + 43)
        length = batch_length + 12
        if length < HEADER_BYTES or at + length > len(data):
            raise InvalidBatch(f"record batch length {batch_length} does not fit the {len(data) - at} bytes sent")
        if last_delta < 0 or records < 0:
            raise InvalidBatch("record batch with a negative record count or offset delta")
        return cls(length, magic, last_delta, producer_id, producer_epoch, base_sequence, records, attributes)


def split_batches(data: bytes) -> list[tuple[BatchHeader, bytes]]:
    """A produced record set -> its batches, each checked (header, length, CRC)."""
    found: list[tuple[BatchHeader, bytes]] = []
    at = 0
    while at < len(data):
        header = BatchHeader.read(data, at)
        raw = data[at : at + header.length]
        if not DefaultRecordBatch(raw).validate_crc():
            raise InvalidBatch("record batch CRC does not match its contents")
        found.append((header, raw))
        at += header.length
    if not found:
        raise InvalidBatch("empty record set")
    return found


class OutOfOrderSequence(Exception):
    """An idempotent producer's batch that does not follow its last one on this partition."""


class FencedProducer(Exception):
    """A batch from an older epoch of a producer id than this partition has seen."""


@dataclass
class _ProducerState:
    epoch: int
    next_sequence: int
    recent: list[tuple[int, int]] = field(default_factory=list)  # (base sequence, base offset)


@dataclass
class PartitionLog:
    """Batches in offset order. `bases[i]` is batch i's first offset, `batches[i]` its bytes
    (with that offset written in), `appended[i]` when it arrived (monotonic seconds)."""

    log_start: int = 0
    next_offset: int = 0
    bases: list[int] = field(default_factory=list)
    batches: list[bytes] = field(default_factory=list)
    appended: list[float] = field(default_factory=list)
    bytes_held: int = 0
    #: bytes appended since the last compaction (what compaction may win back)
    dirty_bytes: int = 0
    producers: dict[int, _ProducerState] = field(default_factory=dict)

    def append(self, header: BatchHeader, raw: bytes, now: float | None = None) -> int:
        """Appends one checked batch; returns its base offset. A producer's retry of a batch
        already here returns the first copy's offset and appends nothing."""
        if header.producer_id >= 0:
            duplicate = self._check_sequence(header)
            if duplicate is not None:
                return duplicate
        base = self.next_offset
        stored = bytearray(raw)
        struct.pack_into(">q", stored, 0, base)
        self.bases.append(base)
        self.batches.append(bytes(stored))
        self.appended.append(time.monotonic() if now is None else now)
        self.next_offset = base + header.last_offset_delta + 1
        self.bytes_held += len(stored)
        self.dirty_bytes += len(stored)
        if header.producer_id >= 0:
            state = self.producers[header.producer_id]
            state.next_sequence = header.base_sequence + header.last_offset_delta + 1
            state.recent.append((header.base_sequence, base))
            del state.recent[:-PRODUCER_BATCHES_KEPT]
        return base

    def _check_sequence(self, header: BatchHeader) -> int | None:
        state = self.producers.get(header.producer_id)
        if state is None or header.producer_epoch > state.epoch:
            # a producer id (or epoch) new to this partition starts its sequence anywhere: Kafka
            # checks 0 here, but a trimmed or restarted log forgets producers it should know
            self.producers[header.producer_id] = _ProducerState(header.producer_epoch, header.base_sequence)
            return None
        if header.producer_epoch < state.epoch:
            raise FencedProducer(f"producer {header.producer_id} epoch {header.producer_epoch} < {state.epoch}")
        for sequence, offset in state.recent:
            if sequence == header.base_sequence:
                return offset
        if header.base_sequence != state.next_sequence:
            raise OutOfOrderSequence(
                f"producer {header.producer_id}: sequence {header.base_sequence}, expected {state.next_sequence}"
            )
        return None

    def read(self, offset: int, max_bytes: int) -> bytes:
        """Whole batches from the one holding `offset` on, up to `max_bytes` (at least one
        batch, as Kafka does, so a batch larger than the limit still gets through)."""
        if not self.bases or offset >= self.next_offset:
            return b""
        i = max(bisect_right(self.bases, offset) - 1, 0)
        out: list[bytes] = []
        size = 0
        while i < len(self.batches):
            batch = self.batches[i]
            if out and size + len(batch) > max_bytes:
                break
            out.append(batch)
            size += len(batch)
            i += 1
        return b"".join(out)

    def offset_for_time(self, timestamp_ms: int) -> int:
        """The first offset of the first batch whose newest record is at or after `timestamp_ms`
        (ListOffsets by time); the end when there is none."""
        for base, batch in zip(self.bases, self.batches, strict=True):
            (max_timestamp,) = struct.unpack_from(">q", batch, 35)
            if max_timestamp >= timestamp_ms:
                return max(base, self.log_start)
        return self.next_offset

    def trim(self, before: int) -> int:
        """Forgets the records before offset `before` (DeleteRecords): the log start moves there
        and every batch wholly before it goes. Returns the bytes freed."""
        before = min(before, self.next_offset)
        if before <= self.log_start:
            return 0
        self.log_start = before
        drop = 0
        while drop < len(self.batches) and self._last_offset(drop) < before:
            drop += 1
        return self._drop_front(drop)

    def trim_older(self, before: int, appended_before: float) -> int:
        """Like `trim`, sparing batches that arrived at or after `appended_before`."""
        keep_from = bisect_left(self.appended, appended_before)
        limit = self.bases[keep_from] if keep_from < len(self.bases) else self.next_offset
        return self.trim(min(before, limit))

    def _last_offset(self, i: int) -> int:
        (delta,) = struct.unpack_from(">i", self.batches[i], 23)
        return self.bases[i] + delta

    def _drop_front(self, count: int) -> int:
        if count == 0:
            return 0
        freed = sum(len(batch) for batch in self.batches[:count])
        del self.bases[:count], self.batches[:count], self.appended[:count]
        self.bytes_held -= freed
        return freed

    def compact(self) -> int:
        """Keeps each key's latest record (and every record without a key), rewritten into
        fresh batches with their offsets; the end offset stays. Returns the bytes freed."""
        if not self.batches:
            self.dirty_bytes = 0
            return 0
        records = [
            (record.offset, record.timestamp, record.key, record.value, record.headers)
            for batch in self.batches
            for record in DefaultRecordBatch(batch)
            if record.offset >= self.log_start
        ]
        latest = {key: offset for offset, _t, key, _v, _h in records if key is not None}
        kept = [r for r in records if r[2] is None or latest[r[2]] == r[0]]
        newest = self.appended[-1]
        before = self.bytes_held
        self.bases, self.batches, self.appended, self.bytes_held = [], [], [], 0
        for start in range(0, len(kept), COMPACTED_BATCH_RECORDS):
            chunk = kept[start : start + COMPACTED_BATCH_RECORDS]
            base = chunk[0][0]
            builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 30)
            for offset, timestamp, key, value, headers in chunk:
                builder.append(offset - base, timestamp=timestamp, key=key, value=value, headers=headers)
            stored = builder.build()
            struct.pack_into(">q", stored, 0, base)
            self.bases.append(base)
            self.batches.append(bytes(stored))
            self.appended.append(newest)
            self.bytes_held += len(stored)
        self.dirty_bytes = 0
        return before - self.bytes_held
