"""What a chaos run checks once the stack is quiet, and what it keeps when a check fails: the
output topics it watched (`Observed`), the items in Milvus, the interactions counted per user,
recs resumed for every active user, and a dump of the topics that decide them."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from topics import DeadLetter, EventError, Interaction, ItemNew, Recs, decode
from vlm4rec.localstack import StackError
from vlm4rec.harness.probes import user_interactions
from vlm4rec.evaluation.replay import Scheduled
from vlm4rec.settings import Settings
from vlm4rec.wiring import build_milvus_client, build_store
from vlm4rec.harness.ownstack import OwnStack


#: the figures every report carries; None when the stack never reached a state that could be checked
REPORT_KEYS = (
    "items_published", "items_in_milvus", "item_duplicates", "interactions_published",
    "interactions_counted", "users_with_recs", "active_users",
)


# --- reading topics ---------------------------------------------------------------------
@dataclass
class Observed:
    """What the run saw on the output topics, filled by `TopicTail` threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    last_recs: dict[str, float] = field(default_factory=dict)  # user -> newest generated_at
    dead_items: dict[str, DeadLetter] = field(default_factory=dict)  # item_id (from the key) -> letter
    embedded_messages: int = 0

    def on_recs(self, message: Any) -> None:
        recs = decode(Recs, message.value())
        with self.lock:
            self.last_recs[recs.user_id] = max(recs.generated_at, self.last_recs.get(recs.user_id, 0.0))

    def on_dead_item(self, message: Any) -> None:
        letter = decode(DeadLetter, message.value())
        key = message.key().decode("utf-8", "replace") if message.key() else ""
        with self.lock:
            self.dead_items[key] = letter

    def on_embedded(self, _message: Any) -> None:
        with self.lock:
            self.embedded_messages += 1


def dump_topics(settings: Settings, folder: Path) -> Path:
    """Every record of the topics that decide the invariants, one JSON line each
    (`{"partition", "offset", "timestamp_ms", "key", "value"}`), plus the stream processor's
    committed offsets: how every cause in docs/hardening.md was found (which events a user
    is missing, whether they were deferred, released, or skipped by a commit)."""
    from confluent_kafka import Consumer, TopicPartition

    app = settings.streams_app_id
    topics = [
        settings.topics.items_new, settings.topics.items_embedded, settings.topics.interactions,
        f"{app}-pending", f"{app}-control", f"{app}-profiles-changelog", f"{app}-waiting-changelog",
    ]
    folder.mkdir(parents=True, exist_ok=True)
    config = {**settings.kafka_config(), "enable.auto.commit": False, "log_level": 0}
    for topic in topics:
        consumer = Consumer({**config, "group.id": f"chaos-dump-{uuid.uuid4().hex[:8]}"})
        try:
            found = consumer.list_topics(topic, timeout=10).topics.get(topic)
            partitions = sorted(found.partitions) if found is not None and not found.error else []
            with open(folder / f"{topic}.jsonl", "w", encoding="utf-8") as out:
                for partition in partitions:
                    consumer.assign([TopicPartition(topic, partition, 0)])
                    idle = 0
                    while idle < 3:  # the embedded broker's end offsets run low: read until quiet
                        message = consumer.poll(1.0)
                        if message is None or message.error():
                            idle += 1
                            continue
                        record = {
                            "partition": partition, "offset": message.offset(), "timestamp_ms": message.timestamp()[1],
                            "key": (message.key() or b"").decode(errors="replace"),
                            "value": (message.value() or b"").decode(errors="replace"),
                        }
                        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        finally:
            consumer.close()
    inputs = [settings.topics.interactions, settings.topics.items_embedded, f"{app}-pending", f"{app}-control"]
    group = Consumer({**config, "group.id": app})
    try:
        wanted = [TopicPartition(t, n) for t in inputs for n in range(settings.topic_partitions)]
        committed = group.committed(wanted, timeout=10)
        (folder / "committed.json").write_text(json.dumps([[tp.topic, tp.partition, tp.offset] for tp in committed]))
    finally:
        group.close()
    return folder


def milvus_rows(settings: Settings) -> int | None:
    """Rows in the items collection (None before the worker created it). Read from the
    collection's statistics, which need no loaded collection: the harness must not load it
    itself, or it would hide whether the product reloads a restarted Milvus on its own."""
    client = build_milvus_client(settings)
    try:
        if not client.has_collection(settings.milvus_collection):
            return None
        return int(client.get_collection_stats(settings.milvus_collection)["row_count"])
    finally:
        client.close()


def _milvus_items(settings: Settings, ids: Sequence[str]) -> tuple[dict[str, list[str]], int]:
    """Content hashes of every row per id (several rows for one id would be duplicates), and
    the collection's total row count."""
    from vectorstore.milvus import id_list_expr

    client = build_milvus_client(settings)
    rows: dict[str, list[str]] = defaultdict(list)
    try:
        for start in range(0, len(ids), 500):
            found = client.query(
                settings.milvus_collection,
                filter=id_list_expr(ids[start : start + 500]),
                output_fields=["item_id", "content_hash"],
                consistency_level="Strong",
            )
            for row in found:
                rows[row["item_id"]].append(row["content_hash"])
        total = client.query(settings.milvus_collection, filter="", output_fields=["count(*)"], consistency_level="Strong")
        return rows, int(total[0]["count(*)"])
    finally:
        client.close()


@dataclass
class _Check:
    """One look at the stack's state against the input."""

    items: dict[str, Any]
    expected_counts: dict[str, int]
    counts: dict[str, int]
    undeliverable: int  # interactions on items that never got a vector

    @property
    def settled(self) -> bool:
        return not self.items["missing"] and not self.items["stale"] and self.counts == self.expected_counts

    def state(self) -> tuple[int, int, int]:
        return self.items["in_milvus"], len(self.items["stale"]), sum(self.counts.values())


def _look(own: OwnStack, observed: Observed, interactions: Sequence[Interaction], latest: dict[str, ItemNew], model: str) -> _Check:
    """Compare Milvus and the profiles with the input; raises while either does not answer."""
    from workers.embedder import content_hash

    ids = sorted(latest)
    rows, total = _milvus_items(own.settings, ids)
    want = {i: content_hash(model, it.title, it.text, it.image_url) for i, it in latest.items()}
    with observed.lock:
        letters = {i: letter for i, letter in observed.dead_items.items() if i in latest}
    # a dead letter excuses an item only if its latest version was the one refused
    excused = {i: letter.reason for i, letter in letters.items() if _refused_version(letter, model) in (want[i], None)}
    items = {
        "published": len(ids),
        "in_milvus": len(rows),
        "duplicates": sum(len(h) - 1 for h in rows.values()),
        "rows_total": total,
        "missing": sorted(i for i in ids if i not in rows and i not in excused),
        "stale": sorted(i for i, h in rows.items() if i not in excused and h[-1] != want[i]),
        "dead_lettered": dict(sorted(excused.items())),
    }
    expected: Counter[str] = Counter()
    undeliverable = 0
    for row in interactions:
        if row.item_id in rows:
            expected[row.user_id] += 1
        else:
            undeliverable += 1
    users = sorted({row.user_id for row in interactions})
    counts = user_interactions(own.web_url, users)
    if counts is None:
        raise StackError("the stream processor's HTTP API does not answer")
    return _Check(items, {u: expected.get(u, 0) for u in users}, counts, undeliverable)


def _refused_version(letter: DeadLetter, model: str) -> str | None:
    """Content hash of the item a dead letter holds (None: not even an item)."""
    from workers.embedder import content_hash

    try:
        item = decode(ItemNew, letter.original_bytes())
    except EventError:
        return None
    return content_hash(model, item.title, item.text, item.image_url)


def verify(
    own: OwnStack,
    observed: Observed,
    interactions: Sequence[Interaction],
    events: Sequence[Scheduled],
    producer: Any,
    timeout_s: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Wait until the stack agrees with the input (or stops changing for 90 s), then probe
    every active user and wait for their pushes."""
    latest: dict[str, ItemNew] = {}
    for scheduled in events:
        if isinstance(scheduled.event, ItemNew):
            latest[scheduled.event.item_id] = scheduled.event
    deadline = time.monotonic() + timeout_s
    check: _Check | None = None
    error = "no answer yet"
    last_change, last_state = time.monotonic(), None
    while time.monotonic() < deadline:
        own.stack.supervise_once()
        try:
            check = _look(own, observed, interactions, latest, _model(own.settings))
        except Exception as exc:  # noqa: BLE001 - Milvus or streams not answering: look again
            error = f"{type(exc).__name__}: {exc}"[:500]
        else:
            if check.settled:
                break
            if check.state() != last_state:
                last_change, last_state = time.monotonic(), check.state()
            elif time.monotonic() - last_change > 90:
                break  # nothing moves any more: report what is wrong
        time.sleep(3)
    if check is None:
        return {"ok": False, "violations": [f"the stack never answered the checks: {error}"], **dict.fromkeys(REPORT_KEYS)}
    log(f"chaos: {'quiet' if check.settled else 'stopped waiting'}; {check.items['in_milvus']}/"
        f"{check.items['published']} items in Milvus, {sum(check.counts.values())}/"
        f"{sum(check.expected_counts.values())} interactions counted")

    active = sorted(u for u, n in check.counts.items() if n > 0)
    pushed = _probe(own, producer, observed, interactions, active)
    after = user_interactions(own.web_url, active) or {}
    counted_once = [u for u in active if after.get(u) == check.counts[u] + 1]

    violations = []
    items = check.items
    if items["missing"]:
        violations.append(f"{len(items['missing'])} items not in Milvus, e.g. {items['missing'][:5]}")
    if items["stale"]:
        violations.append(f"{len(items['stale'])} items with an older content in Milvus, e.g. {items['stale'][:5]}")
    if items["duplicates"] or items["rows_total"] != items["in_milvus"]:
        violations.append(f"{items['duplicates']} duplicate rows; {items['rows_total']} rows for {items['in_milvus']} items")
    wrong = {u: (check.counts[u], n) for u, n in check.expected_counts.items() if check.counts[u] != n}
    if wrong:
        violations.append(f"{len(wrong)} users with (counted, expected) differing, e.g. {dict(list(wrong.items())[:5])}")
    if len(pushed) != len(active):
        missing = sorted(set(active) - pushed)
        violations.append(f"{len(missing)} active users got no recs after the last fault, e.g. {missing[:5]}")
    if len(counted_once) != len(active):
        violations.append(f"{len(active) - len(counted_once)} probe interactions not counted exactly once")
    return {
        "ok": not violations,
        "violations": violations,
        "items_published": items["published"],
        "item_updates_published": sum(1 for s in events if isinstance(s.event, ItemNew)) - items["published"],
        "items_in_milvus": items["in_milvus"],
        "item_duplicates": items["duplicates"],
        "items_stale": len(items["stale"]),
        "items_missing": len(items["missing"]),
        "items_dead_lettered": items["dead_lettered"],
        "interactions_published": len(interactions),
        "interactions_expected": sum(check.expected_counts.values()),
        "interactions_counted": sum(check.counts.values()),
        "interactions_on_items_without_vector": check.undeliverable,
        "users": len(check.counts),
        "active_users": len(active),
        "users_with_recs": len(pushed),
        "probe_interactions_counted_once": len(counted_once),
    }


def _model(settings: Settings) -> str:
    """The embedding model the worker wrote the collection with (part of each content hash)."""
    store = build_store(settings)
    try:
        space = store.space()
    finally:
        store.close()
    if space is None:
        raise StackError("the worker has not created the items collection")
    return space[1]


def _probe(
    own: OwnStack,
    producer: Any,
    observed: Observed,
    interactions: Sequence[Interaction],
    active: Sequence[str],
    wait_s: float = 180.0,
) -> set[str]:
    """After every fault, one `view` per active user of an item the user already had (so it
    has a vector); returns the users who then got a push generated after the probe."""
    history: dict[str, list[str]] = defaultdict(list)
    for row in interactions:
        history[row.user_id].append(row.item_id)
    rows, _ = _milvus_items(own.settings, sorted({i for u in active for i in history[u]}))
    sent_at = time.time()
    for user in active:
        item = next(i for i in reversed(history[user]) if i in rows)
        producer.send(own.settings.topics.interactions, Interaction(user_id=user, item_id=item, event="view", ts=sent_at))
    producer.flush()
    until = time.monotonic() + wait_s
    while True:
        with observed.lock:
            pushed = {u for u in active if observed.last_recs.get(u, 0.0) >= sent_at}
        if len(pushed) == len(active) or time.monotonic() > until:
            break
        own.stack.supervise_once()
        time.sleep(1)
    time.sleep(2)  # the probes' counts are in the table before their pushes; margin for the reads
    return pushed
