"""Read a dataset folder (`items.csv`, `interactions.csv`, `images/`; format in
../shared/data/README.md) into contract events, for the replay and the evaluation alike.

Every row is validated with the event contract (`topics`), so the evaluation sees exactly the
events a replay would publish; rows the contract refuses are kept aside with their reason and
reported, never dropped silently.
"""

from __future__ import annotations

import csv
import json
import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from topics import EventError, Interaction, ItemNew, decode


@dataclass(frozen=True)
class Rejected:
    """A row the contract refused: where it is and why."""

    file: str
    line: int  # 1-based line of the CSV file, header included
    reason: str

    def __str__(self) -> str:
        return f"{self.file} line {self.line}: {self.reason}"


@dataclass(frozen=True)
class Dataset:
    root: Path  # absolute
    items: list[ItemNew]  # file order
    interactions: list[Interaction]  # sorted by ts, stable (ties keep file order)
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.root.name

    def limit_users(self, n: int | None) -> Dataset:
        """The dataset as if only its first `n` users (by first interaction) existed. Items are
        all kept; those nobody left touches have no publish time unless `created_at` gives one."""
        if n is None:
            return self
        keep: set[str] = set()
        for row in self.interactions:
            if len(keep) == n:
                break
            keep.add(row.user_id)
        return replace(self, interactions=[r for r in self.interactions if r.user_id in keep])

    def user_shard(self, shard: int, shards: int) -> Dataset:
        """The dataset as if only the users of one of `shards` disjoint shards existed (CRC32 of
        the id, `partition_of`). Why: a shard of a dataset is a smaller stream of real users in
        which more targets are items nobody had touched yet (ml100k: 1.4 % of the targets; a
        tenth of its users: 9-16 %), the case of a fresh feed; ten shards are ten such streams."""
        if not 0 <= shard < shards:
            raise ValueError(f"shard must be in 0..{shards - 1}, not {shard}")
        return replace(self, interactions=[r for r in self.interactions if partition_of(r.user_id, shards) == shard])


def partition_of(user_id: str, partitions: int) -> int:
    """A user's partition of `partitions`: CRC32 of the id modulo the count, a fixed hash as a
    producer's partitioner is (the product's producers use murmur2; any such hash spreads
    users alike)."""
    return zlib.crc32(user_id.encode()) % partitions


def image_uri(root: Path, relative: str) -> str | None:
    """`images/1.jpg` -> `file:///abs/root/images/1.jpg`: the worker reads absolute file URIs
    (under VLM4REC_IMAGE_FILE_ROOTS), and the URI is part of the item's content hash."""
    if not relative.strip():
        return None
    return (root / relative.strip()).resolve().as_uri()


def _validate(model: type[ItemNew] | type[Interaction], row: dict[str, object]) -> ItemNew | Interaction:
    """Through the wire format, so that the reason is the one a consumer would give."""
    return decode(model, json.dumps(row))


def _number(text: str | None) -> float | str | None:
    """CSV cell -> number, None when empty; kept as text when it is not a number, so that the
    contract's validation names the problem."""
    if text is None or not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        return text


def read_items(root: Path) -> tuple[list[ItemNew], list[Rejected]]:
    items: list[ItemNew] = []
    rejected: list[Rejected] = []
    seen: dict[str, int] = {}
    with open(root / "items.csv", newline="", encoding="utf-8") as file:
        for line, row in enumerate(csv.DictReader(file), start=2):
            try:
                item = _validate(
                    ItemNew,
                    {
                        "item_id": row.get("item_id") or "",
                        "title": row.get("title") or "",
                        "text": row.get("text") or "",
                        "image_url": image_uri(root, row.get("image") or ""),
                        "category": row.get("category") or "",
                        "created_at": _number(row.get("created_at")),
                    },
                )
            except EventError as exc:
                rejected.append(Rejected("items.csv", line, exc.reason))
                continue
            assert isinstance(item, ItemNew)
            if item.item_id in seen:
                rejected.append(Rejected("items.csv", line, f"duplicate item_id {item.item_id!r} (first on line {seen[item.item_id]})"))
                continue
            seen[item.item_id] = line
            items.append(item)
    return items, rejected


def read_interactions(root: Path) -> tuple[list[Interaction], list[Rejected]]:
    """Valid rows sorted by ts; Python's sort is stable, so equal ts keep file order."""
    rows: list[Interaction] = []
    rejected: list[Rejected] = []
    with open(root / "interactions.csv", newline="", encoding="utf-8") as file:
        for line, row in enumerate(csv.DictReader(file), start=2):
            try:
                event = _validate(
                    Interaction,
                    {
                        "user_id": row.get("user_id") or "",
                        "item_id": row.get("item_id") or "",
                        "event": row.get("event") or "",
                        "value": _number(row.get("value")),
                        "ts": _number(row.get("ts")),
                    },
                )
            except EventError as exc:
                rejected.append(Rejected("interactions.csv", line, exc.reason))
                continue
            assert isinstance(event, Interaction)
            rows.append(event)
    rows.sort(key=lambda r: r.ts)
    return rows, rejected


def load_dataset(root: Path | str) -> Dataset:
    root = Path(root).resolve()
    for name in ("items.csv", "interactions.csv"):
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root / name} not found: a dataset folder holds items.csv and interactions.csv")
    items, rejected_items = read_items(root)
    interactions, rejected_rows = read_interactions(root)
    return Dataset(root, items, interactions, rejected_items + rejected_rows)


def publish_times(items: Iterable[ItemNew], interactions: Iterable[Interaction]) -> dict[str, float]:
    """When each item becomes known (EVAL.md): its `created_at` when given, else the ts of its
    first interaction. Items of interactions.csv missing from items.csv are included (at their
    first interaction); items with neither are absent: they are never published."""
    times: dict[str, float] = {}
    for row in interactions:  # sorted: the first seen is the first interaction
        times.setdefault(row.item_id, row.ts)
    for item in items:
        if item.created_at is not None:
            times[item.item_id] = item.created_at
    return times


def parse_time(text: str) -> float:
    """Unix seconds ("1537444800") or an ISO date/time ("2018-09-20", "2018-09-20T12:00");
    a time without a zone is UTC."""
    try:
        value = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{text!r} is neither unix seconds nor an ISO date") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite time")
    return value
