"""`vlm4rec soak --minutes M --out soak.json`: a bounded soak at a steady rate near the measured
capacity, sampling what would grow if something leaked or fell behind.

The soak starts a local stack of its own (`vlm4rec.harness.chaos.own_stack`: free ports, a fresh data
folder), rather than driving a running `vlm4rec up`: it must know the process id of every
part to sample their resident memory, and counts that start at zero make the figures its own.

Phases: seed a catalogue of synthetic items (small generated pictures, so the image model
runs) and wait until they are embedded; unless `--rate` is given, ramp the interaction rate
in short steps to find the capacity (the highest step whose interactions were applied within
the step, at >= 95 %, with p99 interaction-to-recs under 1 s) and soak at 80 % of it; then
send interactions at that rate from a fixed population of users, with fresh items arriving
meanwhile, for M minutes, and stop by itself. Every `sample_s` seconds it records consumer lag
(`vlm4rec_streams_consumer_lag`, from the stream processor's /metrics), the resident memory of
every process (psutil, children included), p99 latencies over the last interval (from the
histograms' bucket deltas, as Prometheus' histogram_quantile computes them), every process's
CPU, and the machine's own pace (`MachineCanary`: this host's speed changes by itself, and the
stack's latency follows it).
"""

from __future__ import annotations

import base64
import io
import math
import os
import random
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from topics import Interaction, ItemNew, encode
from vlm4rec.harness.ownstack import OwnStack, StackServices, own_stack
from vlm4rec.settings import Settings
from vlm4rec.harness.soak_report import summarise


RAMP_RATES = (50, 100, 200, 400, 800, 1600, 3200)
SOAK_SHARE = 0.8  # of the measured capacity

COLOURS = ("red", "blue", "green", "black", "white", "yellow", "pink", "grey", "beige", "navy")
GARMENTS = ("dress", "shirt", "trousers", "jacket", "scarf", "skirt", "sweater", "coat", "shorts", "top")


# --- reading /metrics -------------------------------------------------------------------
@dataclass
class Scrape:
    """One /metrics page: (sample name, labels, value) rows."""

    samples: list[tuple[str, dict[str, str], float]]
    at: float = field(default_factory=time.monotonic)

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` whose labels include `labels`."""
        return sum(v for n, ls, v in self.samples if n == name and labels.items() <= ls.items())

    def buckets(self, histogram: str) -> list[tuple[float, float]]:
        """(upper bound, cumulative count) of a histogram, summed over its other labels."""
        counts: dict[float, float] = {}
        for name, labels, value in self.samples:
            if name == f"{histogram}_bucket":
                le = float(labels["le"])
                counts[le] = counts.get(le, 0.0) + value
        return sorted(counts.items())


def scrape(url: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    rows = [(s.name, dict(s.labels), s.value) for family in text_string_to_metric_families(text) for s in family.samples]
    return Scrape(rows)


def window_quantile(before: Scrape, after: Scrape, histogram: str, q: float) -> float | None:
    """The q-quantile of the observations made between two scrapes, interpolated within its
    bucket like Prometheus' histogram_quantile; None when nothing was observed, infinity when
    it lies beyond the last finite bucket (all that is known is that it is larger)."""
    then = dict(before.buckets(histogram))
    deltas = [(le, count - then.get(le, 0.0)) for le, count in after.buckets(histogram)]
    if not deltas or deltas[-1][1] <= 0:
        return None
    rank = q * deltas[-1][1]
    lower, below = 0.0, 0.0
    for le, cumulative in deltas:
        if cumulative >= rank:
            if le == math.inf:
                return math.inf
            return lower + (le - lower) * (rank - below) / max(cumulative - below, 1e-12)
        lower, below = le, cumulative
    return lower


def lag(scraped: Scrape, topic: str) -> float:
    """Consumer lag of the stream processor on `topic`, all partitions."""
    return scraped.total("vlm4rec_streams_consumer_lag", topic=topic)


STAGES = ("apply", "learn", "rank", "push")


def stage_means_ms(before: Scrape, after: Scrape) -> dict[str, float | None]:
    """Mean time per batch or round of each stage of the stream processor's hot path over the
    interval (None: the stage did not run), to tell which stage a growing latency comes from."""
    out: dict[str, float | None] = {}
    for stage in STAGES:
        count = after.total("vlm4rec_streams_stage_seconds_count", stage=stage) - before.total(
            "vlm4rec_streams_stage_seconds_count", stage=stage
        )
        seconds = after.total("vlm4rec_streams_stage_seconds_sum", stage=stage) - before.total(
            "vlm4rec_streams_stage_seconds_sum", stage=stage
        )
        out[stage] = round(1000 * seconds / count, 1) if count > 0 else None
    return out


#: the hot path's points in order (`vlm4rec_streams_interaction_path_seconds`, then the push)
PATH_POINTS = ("received", "taken", "applied", "ranking", "ranked", "pushed")
_PUSHED = "vlm4rec_streams_interaction_to_recs_seconds"
_PATH = "vlm4rec_streams_interaction_path_seconds"


def path_means_ms(before: Sequence[Scrape], after: Sequence[Scrape]) -> dict[str, float]:
    """Mean time from an interaction's arrival on the broker to each point of the hot path
    (`PATH_POINTS`) over the interval, summed over stream processors (one scrape each): where
    the means jump is the hop where latency accrues. Points no interaction reached are left
    out."""

    def total(scrapes: Sequence[Scrape], point: str, part: str) -> float:
        if point == "pushed":
            return sum(s.total(f"{_PUSHED}_{part}") for s in scrapes)
        return sum(s.total(f"{_PATH}_{part}", point=point) for s in scrapes)

    out: dict[str, float] = {}
    for point in PATH_POINTS:
        count = total(after, point, "count") - total(before, point, "count")
        if count > 0:
            out[point] = round(1000 * (total(after, point, "sum") - total(before, point, "sum")) / count, 1)
    return out


def applied(scraped: Scrape) -> float:
    return scraped.total("vlm4rec_streams_interactions_total", outcome="applied")


# --- memory and CPU ------------------------------------------------------------------------
class CpuMeter:
    """CPU use of a process and its children since the previous call, in % of one core (psutil
    measures from the previous call on the same `Process` object, so they are kept)."""

    def __init__(self) -> None:
        self._processes: dict[int, psutil.Process] = {}

    def percent(self, pid: int | None) -> float | None:
        if pid is None:
            return None
        try:
            root = psutil.Process(pid)
            family = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return None
        total = 0.0
        for process in family:
            kept = self._processes.setdefault(process.pid, process)
            try:
                total += kept.cpu_percent(None)  # 0.0 the first time a process is seen
            except psutil.NoSuchProcess:
                pass
        return round(total, 1)


class MachineCanary:
    """The CPU time one fixed unit of Python work takes, measured every `period_s` in a thread
    of the soak's own process. This machine is a guest on a shared host: the same work took
    from 42 to 75 units per CPU-second from one minute to the next with nothing else running
    (docs/hardening.md), and the host's share of a core is invisible to the guest (no steal
    time is reported; the lost cycles are charged to whatever process was running). A soak's
    p99 follows the machine's pace, so the soak records it beside every sample, to tell a
    stack that slowed itself from a machine that did."""

    def __init__(self, period_s: float = 0.5, unit: int = 20_000) -> None:
        self.period_s = period_s
        self.unit = unit
        self._readings: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-canary", daemon=True)

    def __enter__(self) -> MachineCanary:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def take(self) -> float | None:
        """Median CPU milliseconds per unit since the previous call (None: none measured)."""
        with self._lock:
            readings, self._readings = self._readings, []
        return round(statistics.median(readings), 3) if readings else None

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            started = time.thread_time()
            total = 0
            for n in range(self.unit):
                total += n * n % 7
            spent = (time.thread_time() - started) * 1000
            with self._lock:
                self._readings.append(spent)


def rss_mb(pid: int | None, children: bool = True) -> float | None:
    """Resident memory of a process and (unless `children` is False) all its children, MiB
    (None if it is gone)."""
    if pid is None:
        return None
    try:
        process = psutil.Process(pid)
        total = process.memory_info().rss
        for child in process.children(recursive=True) if children else ():
            try:
                total += child.memory_info().rss
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        return None
    return round(total / 2**20, 1)


# --- load ----------------------------------------------------------------------------------
def synthetic_items(count: int, prefix: str, seed: int) -> list[ItemNew]:
    """Items with a small picture of their own colour (inline, so no file roots are needed)."""
    from PIL import Image

    rng = random.Random(seed)
    items = []
    for n in range(count):
        colour, garment = rng.choice(COLOURS), rng.choice(GARMENTS)
        out = io.BytesIO()
        Image.new("RGB", (32, 32), (rng.randrange(256), rng.randrange(256), rng.randrange(256))).save(out, "PNG")
        items.append(
            ItemNew(
                item_id=f"{prefix}-{n}",
                title=f"{colour.title()} {garment}",
                text=f"A {colour} {garment}, style {rng.randrange(50)}",
                image_url="data:image/png;base64," + base64.b64encode(out.getvalue()).decode(),
            )
        )
    return items


class Load:
    """Sends interactions at a steady rate (and fresh items) from a thread until stopped."""

    def __init__(self, settings: Settings, item_ids: Sequence[str], users: int, fresh: Sequence[ItemNew], fresh_per_s: float, seed: int) -> None:
        from topics.producer import EventProducer

        self.settings = settings
        self.item_ids = list(item_ids)
        self.users = users
        self.fresh = list(fresh)
        self.fresh_per_s = fresh_per_s
        self.rng = random.Random(seed)
        self.producer = EventProducer(settings.kafka_config())
        self.sent = 0
        self.fresh_sent = 0

    def run(self, rate: float, seconds: float, stop: threading.Event) -> None:
        """Keep the pace against the start, so that slow sends do not add up to drift."""
        topics = self.settings.topics
        started = time.monotonic()
        sent_before, fresh_before = self.sent, self.fresh_sent
        while not stop.is_set() and (elapsed := time.monotonic() - started) < seconds:
            for _ in range(int(elapsed * rate) - (self.sent - sent_before)):
                user = f"soak-user-{self.rng.randrange(self.users)}"
                event = Interaction(user_id=user, item_id=self.rng.choice(self.item_ids), event="click", ts=time.time())
                self.producer.send_raw(topics.interactions, encode(event), user.encode())
                self.sent += 1
            if self.fresh and int(elapsed * self.fresh_per_s) > self.fresh_sent - fresh_before:
                self.producer.send(topics.items_new, self.fresh.pop())
                self.fresh_sent += 1
            stop.wait(0.01)
        self.producer.flush()


# --- the run -------------------------------------------------------------------------------
def run_soak(
    settings: Settings,
    stack_services: StackServices,
    minutes: float,
    rate: float | None = None,
    users: int = 2000,
    items: int = 300,
    fresh_per_s: float = 0.5,
    sample_s: float = 10.0,
    seed: int = 0,
    run_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Seed, measure capacity (unless `rate`), soak for `minutes`, and return the figures."""
    from topics.producer import EventProducer
    from vlm4rec.wiring import build_store

    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = run_dir or settings.data_dir / "soak" / f"{stamp}-{os.getpid()}"
    seeded = synthetic_items(items, "soak-item", seed)
    fresh = synthetic_items(int(minutes * 60 * fresh_per_s) + 1, "soak-fresh", seed + 1)
    with own_stack(settings, run_dir, stack_services) as own:
        s = own.settings
        metrics_url = f"{own.web_url}/metrics"
        worker_url = f"http://{s.web_host}:{s.worker_metrics_port}/metrics"
        log(f"soak: seeding {items} items (run folder {run_dir})")
        with EventProducer(s.kafka_config()) as producer:
            for item in seeded:
                producer.send(s.topics.items_new, item)
        store = build_store(s)
        deadline = time.monotonic() + 600
        while len(store.get_vectors([i.item_id for i in seeded]) if store.space() else {}) < items:
            if time.monotonic() > deadline:
                raise TimeoutError("the seed items were not embedded within 10 minutes")
            own.stack.supervise_once()
            time.sleep(1)
        store.close()

        load = Load(s, [i.item_id for i in seeded], users, fresh, fresh_per_s, seed)
        stop = threading.Event()
        steps: list[dict[str, Any]] = []
        if rate is None:
            steps = _ramp(load, metrics_url, stop, log)
            passed = [step["rate_per_s"] for step in steps if step["ok"]]
            rate = round(SOAK_SHARE * max(passed or [RAMP_RATES[0]]))
        log(f"soak: {rate}/s for {minutes:g} min, {users} users, {fresh_per_s}/s fresh items")
        samples = _soak(own, load, rate, minutes * 60, sample_s, metrics_url, worker_url, stop)
        drained = _drain(metrics_url, s.topics.interactions)
    figures = {
        "minutes": minutes,
        "rate_per_s": rate,
        "rate_source": "measured" if steps else "given",
        "capacity_steps": steps,
        "users": users,
        "items_seeded": items,
        "fresh_items_per_s": fresh_per_s,
        "interactions_sent": load.sent,
        "fresh_items_sent": load.fresh_sent,
        "lag_after_drain": drained,
        "sample_s": sample_s,
        "samples": samples,
        "cpu_cores": os.cpu_count(),
        "run_dir": str(run_dir),
    }
    figures["summary"] = summarise(samples)
    return figures


def _ramp(load: Load, metrics_url: str, stop: threading.Event, log: Callable[[str], None], step_s: float = 10.0) -> list[dict[str, Any]]:
    """Rising rates until one is not kept up with; each step's figures."""
    steps = []
    for rate in RAMP_RATES:
        before, sent_before = scrape(metrics_url), load.sent
        load.run(rate, step_s, stop)
        time.sleep(2.0)  # the tail of the step
        after = scrape(metrics_url)
        sent = load.sent - sent_before
        share = (applied(after) - applied(before)) / max(1, sent)
        p99 = window_quantile(before, after, "vlm4rec_streams_interaction_to_recs_seconds", 0.99)
        ok = share >= 0.95
        steps.append({"rate_per_s": rate, "applied_share": round(share, 3), "p99_ms": _ms(p99), "ok": ok})
        log(f"soak: ramp {rate}/s: {share:.0%} applied in the step, p99 {_ms(p99)} ms")
        if not ok:
            break
    time.sleep(5.0)  # let a backlog of the failed step drain before the soak
    return steps


def _soak(
    own: OwnStack, load: Load, rate: float, seconds: float, sample_s: float, metrics_url: str, worker_url: str, stop: threading.Event
) -> list[dict[str, Any]]:
    thread = threading.Thread(target=load.run, args=(rate, seconds, stop), name="soak-load", daemon=True)
    started = time.monotonic()
    sent_before = load.sent
    previous, previous_worker = scrape(metrics_url), scrape(worker_url)
    applied_before = applied(previous)
    cpu = CpuMeter()
    pids = {s.name: s.process.pid if s.process else None for s in own.stack.services}
    for pid in pids.values():
        cpu.percent(pid)
    harness = psutil.Process()
    harness.cpu_percent(None)
    thread.start()
    samples = []
    try:
        with MachineCanary() as canary:
            while thread.is_alive():
                stop.wait(sample_s)
                own.stack.supervise_once()
                pids = {s.name: s.process.pid if s.process else None for s in own.stack.services}
                now, now_worker = scrape(metrics_url), scrape(worker_url)
                topics = own.settings.topics
                p99 = {
                    "interaction_to_recs": window_quantile(previous, now, "vlm4rec_streams_interaction_to_recs_seconds", 0.99),
                    "fresh_item_to_push": window_quantile(previous, now, "vlm4rec_streams_fresh_item_seconds", 0.99),
                    "item_embedding": window_quantile(previous_worker, now_worker, "vlm4rec_worker_item_latency_seconds", 0.99),
                }
                samples.append(
                    {
                        "t_s": round(now.at - started, 1),
                        "sent": load.sent - sent_before,
                        "applied_per_s": round((applied(now) - applied(previous)) / (now.at - previous.at), 1),
                        "lag_interactions": lag(now, topics.interactions),
                        "lag_items_embedded": lag(now, topics.items_embedded),
                        # the same from the soak's own counts: the gauge relies on the broker's
                        # end offsets, which the embedded broker reports low (docs/hardening.md)
                        "backlog": load.sent - sent_before - (applied(now) - applied_before),
                        "rss_mb": {name: rss_mb(pid) for name, pid in pids.items()},
                        # the process alone: the stream processor's ranking process is its child
                        "rss_own_mb": {name: rss_mb(pid, children=False) for name, pid in pids.items()},
                        "cpu_percent": {name: cpu.percent(pid) for name, pid in pids.items()},
                        # the soak's own process: the load, these scrapes and the canary
                        "harness_cpu_percent": round(harness.cpu_percent(None), 1),
                        "canary_ms": canary.take(),
                        "p99_ms": {name: _ms(q) for name, q in p99.items()},
                        "p99_beyond_buckets": sorted(name for name, q in p99.items() if q == math.inf),
                        "stage_mean_ms": stage_means_ms(previous, now),
                        "path_mean_ms": path_means_ms([previous], [now]),
                        "recs_due": now.total("vlm4rec_streams_recs_due"),
                        "restarts": {s.name: s.restarts for s in own.stack.services if s.restart},
                    }
                )
                previous, previous_worker = now, now_worker
    finally:
        stop.set()
        thread.join(30)
    return samples


def _drain(metrics_url: str, topic: str, timeout_s: float = 60.0) -> float:
    """Lag left once the load stopped, after at most `timeout_s` (0: everything was consumed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        time.sleep(5.5)  # the lag gauge is refreshed every 5 s
        left = lag(scrape(metrics_url), topic)
        if left == 0 or time.monotonic() > deadline:
            return left


def _ms(seconds: float | None) -> float | None:
    """Milliseconds; None when unknown or beyond the histogram (see `p99_beyond_buckets`)."""
    return None if seconds is None or seconds == math.inf else round(seconds * 1000, 1)
