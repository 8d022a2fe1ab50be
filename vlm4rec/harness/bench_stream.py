"""`vlm4rec bench stream`: interactions at stepped rates into the running local stack, every
one of them tracked to the push that answers it (see docs/streaming.md for how it counts)."""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


from topics import Interaction, ItemNew, Recs, decode, encode
from topics.producer import EventProducer
from vectorstore import VectorStore
from vlm4rec.harness.bench import percentile, search_ceiling

# --- streaming -------------------------------------------------------------------------
#: latency counted for an interaction no push answered by the end of its step plus the grace
UNANSWERED_MS = 10_000.0
#: seconds a step waits after its last send for the pushes that answer it
GRACE_S = 3.0


@dataclass
class _Sent:
    """One interaction of the current step: when it was scheduled to be sent, and where the
    broker put it (known once its delivery report came)."""

    user: str
    scheduled: float
    partition: int | None = None
    offset: int | None = None
    answered_ms: float | None = None


class _Tracker:
    """Matches pushed recs to the interactions and fresh items they answer.

    A fresh item is timed from its publication to the first pushed list that holds it. (Until
    2026-12-04 only lists pushed for a fresh item counted: under load most of the users it is
    fanned out to are due for an interaction as well, their list is pushed for that, and 30-60 %
    of the fresh items went untimed.)

    A `recs` event says, per input partition, the offset of the user's last event its profile
    had applied when the list was ranked (`Recs.answers`); an interaction counts as answered by
    the first push of its user whose offset there is at least its own. Pushes may come before
    the producer's delivery report says where an interaction landed, so the highest offset
    pushed per (user, partition) is kept and checked when the report comes. Latency runs from
    the moment the interaction was scheduled, so a generator that falls behind shows as lag."""

    def __init__(self, interactions_topic: str) -> None:
        self.topic = interactions_topic
        self.lock = threading.Lock()
        self.step: list[_Sent] = []
        self.waiting: dict[tuple[str, int], list[_Sent]] = defaultdict(list)
        self.pushed_offsets: dict[tuple[str, int], tuple[int, float]] = {}  # (user, partition) -> (offset, pushed at)
        self.fresh_sent: dict[str, float] = {}
        self.fresh_ms: list[float] = []
        self.pushed = 0

    def new_step(self) -> None:
        """Steps are independent: what the last one left unanswered is no longer waited for."""
        with self.lock:
            self.step, self.waiting, self.pushed_offsets = [], defaultdict(list), {}

    def sent(self, user: str, scheduled: float) -> _Sent:
        with self.lock:
            record = _Sent(user, scheduled)
            self.step.append(record)
            return record

    def delivered(self, record: _Sent, partition: int, offset: int) -> None:
        with self.lock:
            record.partition, record.offset = partition, offset
            pushed = self.pushed_offsets.get((record.user, partition))
            if pushed is not None and pushed[0] >= offset:
                record.answered_ms = (pushed[1] - record.scheduled) * 1000
            else:
                self.waiting[(record.user, partition)].append(record)

    def on_recs(self, recs: Recs, pushed_at: float) -> None:
        with self.lock:
            self.pushed += 1
            for source, offset in recs.answers.items():
                topic, _, partition = source.rpartition(":")
                if topic != self.topic or not partition.isdigit():
                    continue
                key = (recs.user_id, int(partition))
                if offset > self.pushed_offsets.get(key, (-1, 0.0))[0]:
                    self.pushed_offsets[key] = (offset, pushed_at)
                waiting = self.waiting.get(key, [])
                for record in [r for r in waiting if r.offset is not None and r.offset <= offset]:
                    record.answered_ms = (pushed_at - record.scheduled) * 1000
                self.waiting[key] = [r for r in waiting if r.answered_ms is None]
            # a fresh item reaches a feed with the first list that holds it, whatever made the
            # list due: its fan-out, or an interaction of a user it was fanned out to as well
            for rec in recs.items:
                sent = self.fresh_sent.pop(rec.item_id, None)
                if sent is not None:
                    self.fresh_ms.append((pushed_at - sent) * 1000)

    def step_latencies(self) -> tuple[list[float], int]:
        """Every interaction of the step, the unanswered at `UNANSWERED_MS`, and how many
        were answered."""
        with self.lock:
            answered = [r.answered_ms for r in self.step if r.answered_ms is not None]
            return [max(0.0, ms) for ms in answered] + [UNANSWERED_MS] * (len(self.step) - len(answered)), len(answered)


def _consume(
    kafka_config: dict[str, Any], topic: str, stop: threading.Event, assigned: threading.Event, on_message: Callable[[Any], None]
) -> None:
    """Read `topic` from its end, one message at a time as it arrives (no batching wait);
    `assigned` is set once the reader holds every partition at its end offset."""
    from confluent_kafka import OFFSET_END, Consumer

    consumer = Consumer(
        {**kafka_config, "group.id": f"bench-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "latest",
         "enable.auto.commit": False, "session.timeout.ms": 6000,
         # Tansu answers a fetch only when its wait ends (librdkafka's default
         # 500 ms would add 250 ms on average to every latency measured here)
         "fetch.wait.max.ms": 20}
    )

    def on_assign(consumer: Any, partitions: list[Any]) -> None:
        for tp in partitions:
            tp.offset = OFFSET_END
        consumer.assign(partitions)
        assigned.set()

    consumer.subscribe([topic], on_assign=on_assign)
    try:
        while not stop.is_set():
            message = consumer.poll(0.05)
            if message is not None and message.error() is None:
                on_message(message)
    finally:
        consumer.close()


def due_now(elapsed_s: float, rate: float, step_s: float) -> int:
    """How many of a step's interactions are due `elapsed_s` into it: the n-th (from 0) at
    n / rate, so the first goes at once (counting whole periods instead sent each one a period
    late, which added 500 ms to every latency at 2/s)."""
    return min(int(step_s * rate), int(elapsed_s * rate) + 1)


class _ProcessCpu:
    """CPU of the local stack's processes between two calls, in % of one core, by role (found
    by command line: each stream processor on its own and its ranking process, the worker, the
    broker, Milvus, and this benchmark)."""

    @staticmethod
    def role(argv: Sequence[str]) -> str | None:
        """The stack role of a process by its arguments (`vlm4rec up` itself is none)."""
        for n in range(len(argv) - 1):
            if argv[n] == "vlm4rec" and argv[n + 1] in ("streams", "worker"):
                return argv[n + 1]
        if "--listener-url" in argv or "vlm4rec.localstack.broker" in argv:  # Tansu, or the own broker
            return "broker"
        if any("milvus" in arg for arg in argv[:2]):
            return "milvus"
        return None

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._last: dict[int, tuple[str, float]] = {}
        self._at = time.monotonic()

    def _roles(self) -> dict[int, tuple[str, float]]:
        found: dict[int, tuple[str, float]] = {}
        counts: dict[str, int] = defaultdict(int)
        processes = list(self._psutil.process_iter(["pid", "ppid", "cmdline", "cpu_times"]))
        streams = {p.info["pid"] for p in processes if self.role(p.info["cmdline"] or []) == "streams"}
        for process in processes:
            times = process.info["cpu_times"]
            if times is None:
                continue
            role = "bench" if process.info["pid"] == os.getpid() else self.role(process.info["cmdline"] or [])
            if role is None and process.info["ppid"] in streams and "spawn_main" in " ".join(process.info["cmdline"] or []):
                role = "ranking"  # a stream processor's ranking process (streams/ranking_process.py)
            if role is not None:
                counts[role] += 1
                label = role if role not in ("streams", "ranking") or counts[role] == 1 else f"{role}-{counts[role]}"
                found[process.info["pid"]] = (label, times.user + times.system)
        return found

    def sample(self) -> dict[str, float]:
        now, current = time.monotonic(), self._roles()
        elapsed = max(1e-9, now - self._at)
        usage: dict[str, float] = defaultdict(float)
        for pid, (label, seconds) in current.items():
            before = self._last.get(pid, (label, seconds))[1]
            usage[label] += 100.0 * max(0.0, seconds - before) / elapsed
        self._last, self._at = current, now
        return {label: round(value, 1) for label, value in sorted(usage.items())}


def consumer_ceiling(kafka_config: dict[str, Any], topic: str, partitions: int, expect: int, timeout_s: float = 60) -> float:
    """Messages/s a bare confluent-kafka consumer reads from `topic` (from the beginning)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({**kafka_config, "group.id": f"ceiling-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    count, first = 0, None
    deadline = time.monotonic() + timeout_s
    while count < expect and time.monotonic() < deadline:
        messages = consumer.consume(5000, 0.5)
        if messages and first is None:
            first = time.perf_counter()
        count += sum(1 for m in messages if m.error() is None)
    elapsed = time.perf_counter() - (first or time.perf_counter())
    consumer.close()
    return count / elapsed if elapsed > 0 else 0.0


def bench_stream(
    kafka_config: dict[str, Any],
    interactions_topic: str,
    items_topic: str,
    recs_topic: str,
    partitions: int,
    item_ids: Sequence[str],
    fresh_items: Sequence[ItemNew],
    rates: Sequence[int],
    step_s: float,
    users: int,
    store: VectorStore,
    search_batch: int,
    scrape_streams: Callable[[], Sequence[Any]] | None = None,
) -> dict[str, Any]:
    """Drive interactions at rising rates (and fresh items, evenly over the run) through the
    running stack; measure from the `recs` topic which interactions each push answers and
    when. Every interaction counts: one unanswered `GRACE_S` after its step ends counts at
    `UNANSWERED_MS` in p50/p99. `scrape_streams`: each stream processor's metrics (soak.Scrape),
    for the share of interactions its profiles applied and its time per stage in each step."""
    tracker = _Tracker(interactions_topic)

    def on_recs(message: Any) -> None:
        tracker.on_recs(decode(Recs, message.value()), time.time())

    producer = EventProducer(kafka_config)
    producer.connect()  # and warmer still by the time the reader holds its partitions
    stop, assigned = threading.Event(), threading.Event()
    reader = threading.Thread(target=_consume, args=(kafka_config, recs_topic, stop, assigned, on_recs), daemon=True)
    reader.start()
    if not assigned.wait(60):
        raise RuntimeError(f"the bench's reader of {recs_topic} got no partitions within 60 s")
    rng = random.Random(7)
    steps = []
    total_sent = 0
    fresh_queue = list(fresh_items)
    fresh_every = len(rates) * step_s / max(1, len(fresh_queue))
    cpu = _ProcessCpu()
    for rate in rates:
        tracker.new_step()
        pushed_before = tracker.pushed
        scraped_before = scrape_streams() if scrape_streams else []
        cpu.sample()
        sent = 0
        started = time.time()
        next_fresh = started
        while (now := time.time()) < started + step_s:
            for _ in range(due_now(now - started, rate, step_s) - sent):
                scheduled = started + sent / rate
                user = f"bench-user-{rng.randrange(users)}"
                event = Interaction(user_id=user, item_id=rng.choice(item_ids), event="click", ts=time.time())
                record = tracker.sent(user, scheduled)
                producer.send_raw(
                    interactions_topic, encode(event), user.encode(),
                    on_delivery=lambda msg, record=record: tracker.delivered(record, msg.partition(), msg.offset()),
                )
                sent += 1
            while fresh_queue and now >= next_fresh:
                item = fresh_queue.pop()
                with tracker.lock:
                    tracker.fresh_sent[item.item_id] = time.time()
                producer.send(items_topic, item)
                next_fresh += fresh_every
            producer._producer.poll(0)  # noqa: SLF001 - serve delivery callbacks without blocking
            time.sleep(0.002)
        producer.flush()
        time.sleep(GRACE_S)
        latencies, answered = tracker.step_latencies()
        elapsed = time.time() - started
        step: dict[str, Any] = {
            "target_per_s": rate,
            "sent_per_s": round(sent / step_s, 1),
            "answered": answered,
            "answered_share": round(answered / max(1, sent), 3),
            "p50_ms": round(percentile(latencies, 50) or 0, 1),
            "p99_ms": round(percentile(latencies, 99) or 0, 1),
            "recs_per_s": round((tracker.pushed - pushed_before) / elapsed, 1),
            "cpu_percent_of_a_core": cpu.sample(),
        }
        if scrape_streams:
            step.update(_stream_figures(scraped_before, scrape_streams(), sent))
        steps.append(step)
        total_sent += sent
        print(json.dumps(step))  # noqa: T201 - progress of a long benchmark
    stop.set()
    reader.join(10)
    ceiling = consumer_ceiling(kafka_config, interactions_topic, partitions, total_sent)
    dim = len(next(iter(store.get_vectors(item_ids[:1]).values())))
    milvus_qps = search_ceiling(store, dim, search_batch)
    ok = [s for s in steps if s["answered_share"] >= 0.95 and s["p99_ms"] <= 500]
    best = max(ok, key=lambda s: s["sent_per_s"]) if ok else None
    return {
        "interactions_per_s": best["sent_per_s"] if best else 0.0,
        "p50_ms": best["p50_ms"] if best else None,
        "p99_ms": best["p99_ms"] if best else None,
        "unanswered_counted_as_ms": UNANSWERED_MS,
        "fresh_item_p50_ms": round(percentile(tracker.fresh_ms, 50) or 0, 1),
        "fresh_item_p99_ms": round(percentile(tracker.fresh_ms, 99) or 0, 1),
        "fresh_items_timed": len(tracker.fresh_ms),
        "fresh_items_published": len(fresh_items) - len(fresh_queue),
        "ceiling_per_s": round(ceiling, 1),
        "milvus_search_qps": round(milvus_qps, 1),
        "milvus_search_batch": search_batch,
        # the busiest refresh rate reached, as a share of what the search alone could answer
        "recs_refresh_share_of_milvus": round(max(s["recs_per_s"] for s in steps) / milvus_qps, 3) if steps and milvus_qps else None,
        "steps": steps,
        "users": users,
        "items": len(item_ids),
        "cpu_cores": os.cpu_count(),
    }


def _stream_figures(before: Sequence[Any], after: Sequence[Any], sent: int) -> dict[str, Any]:
    """From the stream processors' metrics at a step's start and end: the share of the
    step's interactions their profiles applied, their time per stage (summed over the
    processes: ms per batch or round, and the seconds spent), and the mean time from an
    interaction's arrival on the broker to each point of the hot path (`soak.PATH_POINTS`), which
    names the hop where latency accrues, and the lists they pushed by what asked for them (an
    interaction, or a fresh item's fan-out: both take places in the same rounds), and the time
    from a fresh item's publish to the fan-out pushes it asked for (`fresh_fanout_ms`: the
    embedding, the item feed and a round, whatever the lists hold; the run's `fresh_item_*`
    figures wait for a list that holds the item)."""
    from vlm4rec.harness.soak import Scrape, applied, path_means_ms, window_quantile

    applied_delta = sum(applied(b) for b in after) - sum(applied(b) for b in before)
    stages: dict[str, dict[str, float]] = {}
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    pushed: dict[str, float] = defaultdict(float)
    for scrapes, sign in ((after, 1.0), (before, -1.0)):
        for scraped in scrapes:
            for name, labels, value in scraped.samples:
                if name in ("vlm4rec_streams_stage_seconds_sum", "vlm4rec_streams_stage_seconds_count"):
                    totals[labels["stage"]][name.endswith("_count")] += sign * value
                elif name == "vlm4rec_streams_recs_pushed_total":
                    pushed[labels["trigger"]] += sign * value
    for stage, (seconds, count) in sorted(totals.items()):
        if count > 0:
            stages[stage] = {"calls": int(count), "seconds": round(seconds, 2), "ms_per_call": round(1000 * seconds / count, 1)}
    then, now = Scrape([row for s in before for row in s.samples]), Scrape([row for s in after for row in s.samples])
    fresh = "vlm4rec_streams_fresh_item_seconds"
    fanned_out = now.total(f"{fresh}_count") - then.total(f"{fresh}_count")
    p99 = window_quantile(then, now, fresh, 0.99)
    return {
        "applied_share": round(applied_delta / max(1, sent), 3),
        "stages": stages,
        "path_mean_ms": path_means_ms(before, after),
        "lists_pushed": {trigger: int(n) for trigger, n in sorted(pushed.items())},
        "fresh_fanout_ms": {
            "pushes": int(fanned_out),
            "mean": round(1000 * (now.total(f"{fresh}_sum") - then.total(f"{fresh}_sum")) / fanned_out, 1) if fanned_out else None,
            "p99": None if p99 is None else (round(1000 * p99, 1) if math.isfinite(p99) else "beyond the last bucket"),
        },
    }
