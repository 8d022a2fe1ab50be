"""Replay: reading a dataset folder, the send order (a pure function), pacing, and one run
against the real broker."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import RunningStack, read_topic
from topics import Event, Interaction, ItemNew, decode
from vlm4rec.cli import main
from vlm4rec.evaluation.dataset import load_dataset, parse_time
from vlm4rec.evaluation.replay import Scheduled, parse_speed, replay, schedule

ITEMS = [
    # item_id, title, image, created_at
    ("late", "Created late", "", "50"),  # published at its created_at, after its interactions start
    ("early", "Created early", "images/early.jpg", "5"),
    ("plain", "No created_at", "", ""),  # published just before its first interaction
    ("never", "Never touched", "", ""),  # no created_at, no interaction: never published
]
ROWS = [
    # user_id, item_id, ts
    ("u1", "plain", "10"),
    ("u2", "early", "20"),
    ("u1", "early", "20"),  # same ts: file order
    ("u3", "ghost", "30"),  # an item missing from items.csv: sent, the stream defers it
    ("u2", "late", "60"),
]


def write_folder(folder: Path, items: list[tuple[str, ...]] = ITEMS, rows: list[tuple[str, ...]] = ROWS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "items.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["item_id", "title", "text", "image", "category", "created_at"])
        for item_id, title, image, created in items:
            writer.writerow([item_id, title, "", image, "", created])
    with open(folder / "interactions.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["user_id", "item_id", "ts", "event", "value"])
        for user, item, ts in rows:
            writer.writerow([user, item, ts, "purchase", ""])
    return folder


def order(events: list[Scheduled]) -> list[tuple[float, str]]:
    return [
        (s.ts, f"item {s.event.item_id}" if isinstance(s.event, ItemNew) else f"{s.event.user_id} {s.event.item_id}")
        for s in events
    ]


def test_items_are_published_at_created_at_else_just_before_their_first_interaction(tmp_path: Path) -> None:
    dataset = load_dataset(write_folder(tmp_path / "data"))
    assert order(schedule(dataset.items, dataset.interactions)) == [
        (5.0, "item early"),
        (10.0, "item plain"),  # same ts as its first interaction, sent before it
        (10.0, "u1 plain"),
        (20.0, "u2 early"),
        (20.0, "u1 early"),
        (30.0, "u3 ghost"),
        (50.0, "item late"),
        (60.0, "u2 late"),
    ]


def test_since_sends_the_earlier_catalogue_first_and_until_is_exclusive(tmp_path: Path) -> None:
    dataset = load_dataset(write_folder(tmp_path / "data"))
    assert order(schedule(dataset.items, dataset.interactions, since=15.0, until=60.0)) == [
        (15.0, "item early"),
        (15.0, "item plain"),
        (20.0, "u2 early"),
        (20.0, "u1 early"),
        (30.0, "u3 ghost"),
        (50.0, "item late"),
    ]


def test_limit_users_keeps_the_first_users_by_first_interaction(tmp_path: Path) -> None:
    dataset = load_dataset(write_folder(tmp_path / "data")).limit_users(2)
    assert {r.user_id for r in dataset.interactions} == {"u1", "u2"}
    assert [s for _, s in order(schedule(dataset.items, dataset.interactions))] == [
        "item early", "item plain", "u1 plain", "u2 early", "u1 early", "item late", "u2 late",
    ]


def test_rows_the_contract_refuses_are_reported_with_their_reason(tmp_path: Path) -> None:
    folder = write_folder(
        tmp_path / "data",
        items=[*ITEMS, ("early", "Duplicate", "", ""), ("", "No id", "", "")],
        rows=[*ROWS, ("u4", "plain", "1700000000000"), ("", "plain", "70"), ("u5", "plain", "soon")],
    )
    dataset = load_dataset(folder)
    reasons = [str(r) for r in dataset.rejected]
    assert len(reasons) == 5
    assert reasons[0] == "items.csv line 6: duplicate item_id 'early' (first on line 3)"
    assert reasons[1].startswith("items.csv line 7: item_id")
    assert reasons[2] == "interactions.csv line 7: ts: looks like milliseconds; send unix seconds"
    assert reasons[3].startswith("interactions.csv line 8: user_id")
    assert reasons[4].startswith("interactions.csv line 9: ts")
    assert len(dataset.interactions) == len(ROWS)


def test_images_become_absolute_file_uris(tmp_path: Path) -> None:
    dataset = load_dataset(write_folder(tmp_path / "data"))
    early = next(i for i in dataset.items if i.item_id == "early")
    assert early.image_url == (tmp_path / "data" / "images" / "early.jpg").resolve().as_uri()
    assert next(i for i in dataset.items if i.item_id == "plain").image_url is None


def test_times_and_speeds_parse() -> None:
    assert parse_time("1537444800") == 1537444800.0
    assert parse_time("2018-09-20") == 1537401600.0  # midnight UTC
    assert parse_time("2018-09-20T12:00:00+02:00") == 1537437600.0
    assert parse_speed("max") is None and parse_speed("1000") == 1000.0
    for bad in ("0", "-3", "fast", "inf"):
        with pytest.raises(ValueError):
            parse_speed(bad)
    with pytest.raises(ValueError):
        parse_time("yesterday")


class FakeSender:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Event]] = []
        self.flushed = False

    def send(self, topic: str, event: Event) -> None:
        self.sent.append((topic, event))

    def flush(self, timeout_s: float = 30.0) -> None:
        self.flushed = True


def test_replay_paces_by_event_time_against_the_start(tmp_path: Path) -> None:
    dataset = load_dataset(write_folder(tmp_path / "data"))
    events = schedule(dataset.items, dataset.interactions)
    now = [100.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(round(seconds, 6))
        now[0] += seconds

    sender = FakeSender()
    stats = replay(events, sender, "items.new", "interactions", speed=10.0, progress=False, sleep=sleep, clock=lambda: now[0])
    # event times 5 10 10 20 20 30 50 60: at 10x, due 0.5 s, 1.5 s, 2.5 s, 4.5 s, 5.5 s after the start
    assert waits == [0.5, 1.0, 1.0, 2.0, 1.0]
    assert [topic for topic, _ in sender.sent] == ["items.new"] * 2 + ["interactions"] * 4 + ["items.new", "interactions"]
    assert sender.flushed
    assert (stats.items, stats.interactions, stats.users, stats.first_ts, stats.last_ts) == (3, 5, 3, 5.0, 60.0)
    fast = FakeSender()
    replay(events, fast, "i", "x", speed=None, progress=False, sleep=lambda s: pytest.fail("slept"))
    assert len(fast.sent) == 8


@pytest.mark.integration
def test_replay_command_publishes_in_order_with_keys(isolated: RunningStack, tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "data")
    result = CliRunner().invoke(main, ["replay", str(folder), "--speed", "10"], env=isolated.env)
    assert result.exit_code == 0, result.output
    assert "VLM4REC_IMAGE_FILE_ROOTS" in result.output  # the hint: no roots configured
    assert "replayed 3 items" in result.output and "5 interactions (3 users)" in result.output
    settings = isolated.settings()
    items = read_topic(settings.kafka_config(), settings.topics.items_new, want=3)
    rows = read_topic(settings.kafka_config(), settings.topics.interactions, want=5)
    assert len(items) == 3 and len(rows) == 5
    for message in items:
        assert message.key().decode() == decode(ItemNew, message.value()).item_id
    for message in rows:
        assert message.key().decode() == decode(Interaction, message.value()).user_id
    # at 10x the events are 0.5 s or more apart in wall time: the broker's timestamps show the order
    sent_at = {("item", decode(ItemNew, m.value()).item_id): m.timestamp()[1] for m in items}
    by_time = sorted(rows, key=lambda m: m.timestamp()[1])
    interactions = [decode(Interaction, m.value()) for m in by_time]
    assert [r.ts for r in interactions] == [10, 20, 20, 30, 60]  # rows at one ts may share a ms
    assert sorted((r.user_id, r.item_id) for r in interactions) == sorted((u, i) for u, i, _ in ROWS)
    first_touch = {}
    for message, row in zip(by_time, interactions, strict=True):
        first_touch.setdefault(row.item_id, message.timestamp()[1])
    assert sent_at[("item", "early")] < first_touch["early"]
    assert sent_at[("item", "plain")] <= first_touch["plain"]
    assert sent_at[("item", "late")] > first_touch["ghost"]  # created_at 50, after ts 30
    assert ("item", "never") not in sent_at
