"""`vlm4rec chaos DATASET_DIR`: replay a slice of a dataset through a local stack while hurting
its processes at seeded random moments, then check that nothing was lost and nothing was
counted twice. Three kinds of fault (`FAULT_KINDS`): `kill` (SIGKILL of the process group, no
clean shutdown, then a restart), `pause` (SIGSTOP, SIGCONT 10-30 s later: the process misses its
heartbeats, its consumer group rebalances, its callers time out) and `slow` (Milvus answers
through a proxy that holds every chunk 0.2-1 s, for 10-30 s: `vlm4rec.harness.slowproxy`).

The stack is the command's own (`OwnStack`): the same services as `vlm4rec up`, on free ports
with a fresh data folder, so that a running `vlm4rec up` and its Milvus data are never touched
and every count starts from zero. The embedding worker, the stream processor and the Milvus
Lite server are killed (the whole process group, no clean shutdown) and restarted, one fault at
a time: a fault waits until its target answers again, so each one hits a working system. The
broker is never killed: the embedded Tansu broker keeps everything in memory, so nothing can
survive its restart by construction (see docs/security.md).

Afterwards, once the stack is quiet:
- every published item is in Milvus exactly once with the content hash of its latest version
  (a share of the items is re-published with new content during the replay), unless its latest
  version was dead-lettered;
- every interaction is counted exactly once in its user's profile (`/users/{id}`), except those
  on items that never got a vector, which stay deferred by design and are listed;
- recommendations resume: every user with an applied interaction gets one probe interaction
  after the last fault and must receive a recs push generated after it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from topics import DeadLetter, EventError, Interaction, ItemNew, Recs, decode
from vlm4rec.evaluation.dataset import load_dataset
from vlm4rec.localstack import LocalStack, Service, StackError, parse_host_port, port_answers
from vlm4rec.harness.probes import TopicTail, user_interactions
from vlm4rec.evaluation.replay import Scheduled, replay, schedule
from vlm4rec.settings import Settings
from vlm4rec.harness.slowproxy import SlowProxy

StackServices = Callable[[Settings, bool], tuple[list[Service], int]]

TARGETS = ("worker", "streams", "milvus")
FAULT_KINDS = ("kill", "pause", "slow")
HOLD_S = (10.0, 30.0)  # how long a pause or a slow period lasts, at most and at least
SLOW_DELAY_S = (0.2, 1.0)  # what the proxy holds each chunk for during a slow period
#: the figures every report carries; None when the stack never reached a state that could be checked
REPORT_KEYS = (
    "items_published", "items_in_milvus", "item_duplicates", "interactions_published",
    "interactions_counted", "users_with_recs", "active_users",
)
READY_TIMEOUT_S = 180.0  # a restarted stream processor rebuilds its tables from the changelog


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- a stack of the command's own -----------------------------------------------------
@dataclass
class OwnStack:
    """A running local stack started by `own_stack`, and how to reach it."""

    settings: Settings  # points at this stack
    stack: LocalStack
    run_dir: Path
    proxy: SlowProxy | None = None  # between the worker and stream processor and Milvus

    def service(self, name: str) -> Service:
        return next(s for s in self.stack.services if s.name == name)

    @property
    def web_url(self) -> str:
        return f"http://{self.settings.web_host}:{self.settings.web_port}"

    def ready(self, name: str) -> bool:
        """Whether `name` is alive and answering: Milvus its API, the worker its metrics port,
        the stream processor its HTTP API."""
        service = self.service(name)
        if not service.alive():
            return False
        if name == "worker":
            return port_answers(self.settings.web_host, self.settings.worker_metrics_port)
        if name == "streams":
            return streams_answers(self.web_url)
        return service.ready()

    def wait_ready(self, name: str, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Supervise (restart what died) until `name` answers; returns the seconds waited."""
        started = time.monotonic()
        while not self.ready(name):
            if time.monotonic() - started > timeout_s:
                raise StackError(f"{name} did not answer within {timeout_s:.0f}s; logs in {self.run_dir / 'logs'}")
            self.stack.supervise_once()
            time.sleep(0.2)
        return time.monotonic() - started


def streams_answers(web_url: str) -> bool:
    """The stream processor's HTTP API is up when an unknown user gets its 404."""
    try:
        urllib.request.urlopen(f"{web_url}/users/__probe__", timeout=2).close()
    except urllib.error.HTTPError as exc:
        return exc.code == 404
    except OSError:
        return False
    return True


def settings_env(settings: Settings) -> dict[str, str]:
    """Every setting as the VLM4REC_* variable that sets it: the child processes read their
    settings from the environment, and must see exactly the values this process uses."""
    env = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, (list, dict)):
            value = json.dumps(value, default=str)
        env[Settings.env_name(name)] = str(value)
    return env


def own_settings(settings: Settings, run_dir: Path, file_roots: Sequence[Path]) -> Settings:
    """`settings` moved onto free ports and into `run_dir`."""
    return settings.model_copy(
        update={
            "bootstrap_servers": f"127.0.0.1:{free_port()}",
            "milvus_uri": f"http://127.0.0.1:{free_port()}",
            "data_dir": run_dir,
            "web_host": "127.0.0.1",
            "web_port": free_port(),
            "worker_metrics_port": free_port(),
            "image_file_roots": [*settings.image_file_roots, *file_roots],
        }
    )


@contextmanager
def own_stack(
    settings: Settings,
    run_dir: Path,
    stack_services: StackServices,
    file_roots: Sequence[Path] = (),
    restart_milvus: bool = False,
    milvus_proxy: bool = False,
) -> Iterator[OwnStack]:
    """Start broker, Milvus Lite, worker and stream processor under `run_dir` on free ports;
    stop them all on exit. `restart_milvus`: restart Milvus when it dies, as an operator's
    supervisor would (`vlm4rec up` ends the stack instead). `milvus_proxy`: the worker and the
    stream processor reach Milvus through a `SlowProxy` (the `slow` fault)."""
    from topics.admin import create_topics

    run_dir.mkdir(parents=True, exist_ok=False)
    # models are exported once per machine, not once per run
    settings.model_cache_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "models").symlink_to(settings.model_cache_dir.resolve(), target_is_directory=True)
    own = own_settings(settings, run_dir, file_roots)
    services, infra = stack_services(own, False)
    env = settings_env(own)
    proxy = None
    if milvus_proxy:
        host, port = parse_host_port(own.milvus_uri, 19530)
        proxy = SlowProxy(host, port)
    for service in services:
        service.env.update(env)
        if service.name == "milvus":
            service.restart = restart_milvus
        elif proxy is not None and service.name in ("worker", "streams"):
            service.env["VLM4REC_MILVUS_URI"] = f"http://127.0.0.1:{proxy.port}"
    stack = LocalStack(services, log_dir=run_dir / "logs")
    stack.start(
        after_infra=lambda: create_topics(own.kafka_config(), own.topic_partitions_map(), own.topic_replication),
        infra=infra,
    )
    running = OwnStack(own, stack, run_dir, proxy)
    try:
        for name in ("worker", "streams"):
            running.wait_ready(name)
        yield running
    finally:
        stack.stop()
        if proxy is not None:
            proxy.close()


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


# --- the plan -----------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedFault:
    at_s: float  # seconds after the replay starts
    target: str
    kind: str = "kill"
    hold_s: float = 0.0  # a pause's or a slow period's length
    delay_s: float = 0.0  # a slow period's hold per chunk


def plan_faults(
    count: int, seed: int, window_s: float, targets: Sequence[str] = TARGETS, kinds: Sequence[str] = ("kill",)
) -> list[PlannedFault]:
    """The faults of a run, sorted by time. The (target, kind) pairs take turns before the
    shuffle, so that every pair is hit once `count` is at least their number; only Milvus is
    slowed. A kill-only plan is the same as before the other kinds existed, seed for seed."""
    rng = random.Random(seed)
    pairs = [(target, kind) for kind in kinds for target in targets if kind != "slow" or target == "milvus"]
    picked = [pairs[n % len(pairs)] for n in range(count)] if pairs else []
    rng.shuffle(picked)
    times = sorted(rng.uniform(0.05, 0.95) * window_s for _ in range(len(picked)))
    return [
        PlannedFault(at, target, kind,
                     rng.uniform(*HOLD_S) if kind != "kill" else 0.0, rng.uniform(*SLOW_DELAY_S) if kind == "slow" else 0.0)
        for at, (target, kind) in zip(times, picked, strict=True)
    ]


def with_updates(events: list[Scheduled], share: float, seed: int) -> list[Scheduled]:
    """The replay with a `share` of its items published again later with new content (title
    and text), so that "latest content" is something the check can tell from the first."""
    rng = random.Random(seed)
    items = [(n, s) for n, s in enumerate(events) if isinstance(s.event, ItemNew)]
    if not items or share <= 0:
        return events
    chosen = rng.sample(items, max(1, round(share * len(items))))
    extra = []
    for n, scheduled in chosen:
        item = scheduled.event
        assert isinstance(item, ItemNew)
        later = events[rng.randrange(n, len(events))].ts
        update = item.model_copy(update={"title": f"{item.title} (v2)", "text": f"{item.text} Updated."})
        extra.append(Scheduled(later, update))
    return sorted(events + extra, key=lambda s: s.ts)  # stable: an update follows its original


# --- the run ------------------------------------------------------------------------------
@dataclass
class Fault:
    target: str
    planned_at_s: float
    kind: str = "kill"
    hold_s: float = 0.0  # pause or slow: how long
    delay_s: float = 0.0  # slow: the hold per chunk
    at_s: float = 0.0  # seconds after the replay started, when the fault began
    during: str = ""  # "replay" or "catch-up" (after the last event was published)
    pid: int = 0
    new_pid: int = 0
    recovered_s: float | None = None  # from the kill (or the end of a pause) until the target answered again (None: it did not)
    embedded_before: int = 0  # items.embedded messages seen before the kill
    milvus_rows_before: int | None = None  # Milvus only: rows just before the kill ...
    milvus_rows_after: int | None = None  # ... and once restarted (durable if not fewer)


def run_chaos(
    settings: Settings,
    dataset_dir: Path,
    stack_services: StackServices,
    limit_users: int | None = 20,
    faults: int = 6,
    seed: int = 0,
    duration_s: float = 60.0,
    timeout_s: float = 600.0,
    update_share: float = 0.05,
    run_dir: Path | None = None,
    log: Callable[[str], None] = print,
    kinds: Sequence[str] = ("kill",),
) -> dict[str, Any]:
    """Run the whole experiment and return the report (see the module docstring); `kinds`:
    which of `FAULT_KINDS` to plan."""
    from topics.producer import EventProducer

    dataset = load_dataset(dataset_dir).limit_users(limit_users)
    events = with_updates(schedule(dataset.items, dataset.interactions), update_share, seed)
    span = events[-1].ts - events[0].ts if events else 0.0
    speed = span / duration_s if span > 0 else None
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown or not kinds:
        raise ValueError(f"fault kinds must be among {', '.join(FAULT_KINDS)}, not {list(kinds)}")
    plan = plan_faults(faults, seed, duration_s, kinds=kinds)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = run_dir or settings.data_dir / "chaos" / f"seed{seed}-{stamp}-{os.getpid()}"
    log(f"chaos: {len(events)} events of {dataset.name}, {faults} faults ({', '.join(kinds)}), seed {seed}; run folder {run_dir}")

    with own_stack(settings, run_dir, stack_services, [dataset.root], restart_milvus=True, milvus_proxy="slow" in kinds) as own:
        s = own.settings
        observed = Observed()
        partitions = s.topic_partitions
        tails = [
            TopicTail(s.kafka_config(), s.topics.recs, partitions, observed.on_recs).start(),
            TopicTail(s.kafka_config(), s.topics.items_new_dlq, partitions, observed.on_dead_item).start(),
            TopicTail(s.kafka_config(), s.topics.items_embedded, partitions, observed.on_embedded).start(),
        ]
        try:
            producer = EventProducer(s.kafka_config())
            done = threading.Event()
            failure: list[BaseException] = []

            def publish() -> None:
                try:
                    replay(events, producer, s.topics.items_new, s.topics.interactions, speed, progress=False)
                except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                    failure.append(exc)
                finally:
                    done.set()

            started = time.monotonic()
            threading.Thread(target=publish, name="replay", daemon=True).start()
            record = [_inject(own, observed, planned, started, done, log) for planned in plan]
            while not done.is_set():
                own.stack.supervise_once()
                time.sleep(0.2)
            if failure:
                raise failure[0]
            log(f"chaos: replay done in {time.monotonic() - started:.0f}s; waiting for the stack to catch up")
            report = _verify(own, observed, dataset.interactions, events, producer, timeout_s, log)
            producer.flush()
            if not report["ok"]:
                report["dump"] = str(dump_topics(s, run_dir / "dump"))
                log(f"chaos: invariants violated; the topics are in {report['dump']}")
        finally:
            for tail in tails:
                tail.stop()
    lost = [f.target for f in record if f.recovered_s is None]
    if lost:
        report["ok"] = False
        report["violations"].append(f"{len(lost)} killed processes did not answer again: {lost}")
    report.update(
        {
            "faults": len(record),
            "faults_by_kind": dict(Counter(f.kind for f in record)),
            "faults_recovered": len(record) - len(lost),
            "fault_details": [vars(f) for f in record],
            "seed": seed,
            "dataset": dataset.name,
            "limit_users": limit_users,
            "replay_s": duration_s,
            "run_dir": str(run_dir),
        }
    )
    return report


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


def _inject(
    own: OwnStack,
    observed: Observed,
    planned: PlannedFault,
    started: float,
    replay_done: threading.Event,
    log: Callable[[str], None],
) -> Fault:
    """Wait for the planned moment (restarting whatever died meanwhile), do the fault, and
    wait until the target answers again (a target that does not is recorded, and the run goes
    on to report what that cost). `kill`: SIGKILL of the process group; `pause`: SIGSTOP, then
    SIGCONT after `hold_s`; `slow`: the Milvus proxy holds every chunk `delay_s` for `hold_s`."""
    target, kind = planned.target, planned.kind
    fault = Fault(target, round(planned.at_s, 2), kind, round(planned.hold_s, 1), round(planned.delay_s, 2))
    while time.monotonic() < started + planned.at_s:
        own.stack.supervise_once()
        time.sleep(0.1)
    own.wait_ready(target)
    service = own.service(target)
    assert service.process is not None
    if target == "milvus" and kind == "kill":
        fault.milvus_rows_before = _milvus_rows(own.settings)
    with observed.lock:
        fault.embedded_before = observed.embedded_messages
    fault.at_s = round(time.monotonic() - started, 2)
    fault.during = "catch-up" if replay_done.is_set() else "replay"
    fault.pid = service.process.pid
    if kind == "kill":
        os.killpg(service.process.pid, signal.SIGKILL)
        service.process.wait()
    elif kind == "pause":
        os.killpg(service.process.pid, signal.SIGSTOP)
        _hold(own, planned.hold_s)
        os.killpg(service.process.pid, signal.SIGCONT)
    else:
        assert own.proxy is not None, "a slow fault needs the Milvus proxy (own_stack(milvus_proxy=True))"
        own.proxy.slow(planned.delay_s)
        _hold(own, planned.hold_s)
        own.proxy.fast()
    what = {"kill": "killed", "pause": f"paused for {planned.hold_s:.0f}s", "slow": f"slowed for {planned.hold_s:.0f}s"}[kind]
    try:
        fault.recovered_s = round(own.wait_ready(target), 2)
    except StackError as exc:
        log(f"chaos: {what} {target} (pid {fault.pid}) at {fault.at_s:.1f}s; not back: {exc}")
        return fault
    fault.new_pid = service.process.pid if service.process else 0
    if target == "milvus" and kind == "kill":
        fault.milvus_rows_after = _milvus_rows(own.settings)
    log(f"chaos: {what} {target} (pid {fault.pid}) at {fault.at_s:.1f}s; answering after {fault.recovered_s:.1f}s more")
    return fault


def _hold(own: OwnStack, seconds: float) -> None:
    """Let a pause or slow period last, restarting meanwhile whatever else died."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        own.stack.supervise_once()
        time.sleep(0.2)


def _milvus_client(settings: Settings) -> Any:
    from vectorstore.milvus import milvus_client

    return milvus_client(settings.milvus_uri, settings.milvus_token.get_secret_value(), 30)


def _milvus_rows(settings: Settings) -> int | None:
    """Rows in the items collection (None before the worker created it). Read from the
    collection's statistics, which need no loaded collection: the harness must not load it
    itself, or it would hide whether the product reloads a restarted Milvus on its own."""
    client = _milvus_client(settings)
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

    client = _milvus_client(settings)
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


def _verify(
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
    from vectorstore import MilvusVectorStore

    store = MilvusVectorStore(settings.milvus_uri, settings.milvus_collection, settings.milvus_token.get_secret_value())
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
