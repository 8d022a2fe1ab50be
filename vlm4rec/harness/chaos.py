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

import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from topics import ItemNew
from vlm4rec.evaluation.dataset import load_dataset
from vlm4rec.localstack import StackError
from vlm4rec.harness.probes import TopicTail
from vlm4rec.evaluation.replay import Scheduled, replay, schedule
from vlm4rec.settings import Settings
from vlm4rec.harness.chaos_checks import Observed, dump_topics, milvus_rows, verify
from vlm4rec.harness.ownstack import OwnStack, StackServices, own_stack


TARGETS = ("worker", "streams", "milvus")
FAULT_KINDS = ("kill", "pause", "slow")
HOLD_S = (10.0, 30.0)  # how long a pause or a slow period lasts, at most and at least
SLOW_DELAY_S = (0.2, 1.0)  # what the proxy holds each chunk for during a slow period


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
            report = verify(own, observed, dataset.interactions, events, producer, timeout_s, log)
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
        fault.milvus_rows_before = milvus_rows(own.settings)
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
        fault.milvus_rows_after = milvus_rows(own.settings)
    log(f"chaos: {what} {target} (pid {fault.pid}) at {fault.at_s:.1f}s; answering after {fault.recovered_s:.1f}s more")
    return fault


def _hold(own: OwnStack, seconds: float) -> None:
    """Let a pause or slow period last, restarting meanwhile whatever else died."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        own.stack.supervise_once()
        time.sleep(0.2)
