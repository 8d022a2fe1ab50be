"""Benchmarks that print figures: `vlm4rec bench embed`, `bench stream`, `bench search` and
`bench rank`.

They drive the product's own code paths (the worker's embedder, image loader and vector store;
the running local stack's streams) and report what they measured, with the machine's core
count, so that figures are compared only with others from the same run."""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from topics import Interaction, ItemNew, Recs, decode, encode
from topics.producer import EventProducer
from vectorstore import VectorRecord, VectorStore
from workers.embedder import Embedder, ItemContent
from workers.images import ImageError, ImageLoader


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


# --- embedding -------------------------------------------------------------------------
def bench_embed(
    items: Sequence[ItemNew],
    embedder: Embedder,
    loader: ImageLoader,
    store: VectorStore,
    batch: int,
    fetch_threads: int = 8,
) -> dict[str, Any]:
    """Embed `items` in micro-batches exactly as the worker does (fetch+decode in a thread
    pool, one model call per stage, one upsert) and time every stage."""
    store.open(embedder.dim, embedder.model_id, embedder.strategy)
    stages: dict[str, float] = defaultdict(float)
    batch_ms: list[float] = []
    pool = ThreadPoolExecutor(fetch_threads)
    embedded = 0

    def load(item: ItemNew) -> ItemContent | None:
        try:
            image = loader.load(item.image_url) if item.image_url else None
        except ImageError:
            return None
        return ItemContent(item.item_id, item.title, item.text, image)

    started = time.perf_counter()
    progress = tqdm(total=len(items), desc=f"{embedder.backend.name}/{embedder.strategy}", unit="item", leave=False)
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        t0 = time.perf_counter()
        contents = [c for c in pool.map(load, chunk) if c is not None]
        t1 = time.perf_counter()
        result = embedder.embed(contents)
        t2 = time.perf_counter()
        store.upsert([VectorRecord(i, v) for i, v in zip(result.item_ids, result.vectors, strict=True)])
        t3 = time.perf_counter()
        stages["decode"] += t1 - t0
        for stage, ms in result.stages_ms.items():
            stages[stage.removesuffix("_ms")] += ms / 1000
        stages["upsert"] += t3 - t2
        batch_ms.append((t3 - t0) * 1000)
        embedded += len(result.item_ids)
        progress.update(len(chunk))
    progress.close()
    wall = time.perf_counter() - started
    pool.shutdown()
    n = max(1, len(items))
    return {
        "backend": embedder.backend.name,
        "strategy": embedder.strategy,
        "model": embedder.model_id,
        "batch": batch,
        "items": len(items),
        "embedded": embedded,
        "items_per_s": round(len(items) / wall, 1),
        "p50_ms": round(percentile(batch_ms, 50) or 0, 1),  # latency of a micro-batch
        "p99_ms": round(percentile(batch_ms, 99) or 0, 1),
        "stages_ms": {k: round(v * 1000 / n, 2) for k, v in stages.items()},  # per item
    }


# --- streaming -------------------------------------------------------------------------
@dataclass
class _Tracker:
    """Matches pushed recs to the interactions and fresh items that caused them."""

    sent: dict[str, list[float]]
    fresh_sent: dict[str, float]
    interaction_ms: list[float]
    fresh_ms: list[float]
    fresh_seen: set[str]
    pushed: int = 0

    def on_recs(self, recs: Recs, pushed_at: float) -> None:
        self.pushed += 1
        if recs.trigger == "interaction":
            waiting = self.sent.get(recs.user_id, [])
            covered = [t for t in waiting if t <= recs.generated_at]
            self.sent[recs.user_id] = [t for t in waiting if t > recs.generated_at]
            self.interaction_ms.extend((pushed_at - t) * 1000 for t in covered)
        elif recs.trigger == "fresh_item":
            for rec in recs.items:
                sent = self.fresh_sent.get(rec.item_id)
                if sent is not None and rec.item_id not in self.fresh_seen:
                    self.fresh_seen.add(rec.item_id)
                    self.fresh_ms.append((pushed_at - sent) * 1000)


def _consume(kafka_config: dict[str, Any], topic: str, stop: threading.Event, on_message: Callable[[Any], None]) -> None:
    from confluent_kafka import Consumer

    consumer = Consumer(
        {**kafka_config, "group.id": f"bench-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "latest",
         "enable.auto.commit": False, "session.timeout.ms": 6000,
         # the embedded broker answers a fetch only when its wait ends (librdkafka's default
         # 500 ms would add 250 ms on average to every latency measured here)
         "fetch.wait.max.ms": 20}
    )
    consumer.subscribe([topic])
    try:
        while not stop.is_set():
            for message in consumer.consume(1000, 0.2):
                if message.error() is None:
                    on_message(message)
    finally:
        consumer.close()


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


def search_ceiling(store: VectorStore, dim: int, batch: int, seconds: float = 5.0) -> float:
    """Queries/s the vector store answers at `batch` queries per call."""
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(batch, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        store.search(queries, 20)
        done += batch
    return done / (time.perf_counter() - started)


def bench_search(store: VectorStore, items: int, dim: int, batch: int, k: int = 100, repeats: int = 5) -> dict[str, Any]:
    """Search latency of a vector store holding `items` random unit vectors, through the
    product's own client (`vectorstore`): one query per call and `batch` queries per call,
    the median of `repeats` calls each, and the insert rate (upserts of 32 rows, like the
    worker's batches)."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(items, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store.open(dim, "bench-random", "bench")
    started = time.perf_counter()
    for start in tqdm(range(0, items, 32), desc="inserting", unit="batch"):
        store.upsert([VectorRecord(f"bench-{n}", vectors[n]) for n in range(start, min(items, start + 32))])
    insert_s = time.perf_counter() - started
    queries = rng.normal(size=(batch, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    store.search(queries[:1], k)  # a first call may load the collection

    def median_s(rows: np.ndarray) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            store.search(rows, k)
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    one, many = median_s(queries[:1]), median_s(queries)
    return {
        "items": items,
        "dim": dim,
        "k": k,
        "insert_rows_per_s": round(items / insert_s, 1),
        "one_query_ms": round(one * 1000, 1),
        f"batch_{batch}_ms": round(many * 1000, 1),
        "queries_per_s": round(batch / many, 1),
        "cpu_cores": os.cpu_count(),
    }


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
    applied_count: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Drive interactions at rising rates (and fresh items meanwhile) through the running
    stack; measure push latencies from the `recs` topic. `applied_count`: the stream
    processor's count of applied interactions (its metrics), to tell whether the profiles kept
    up with a step even where the pushes did not."""
    tracker = _Tracker(defaultdict(list), {}, [], [], set())
    lock = threading.Lock()

    def on_recs(message: Any) -> None:
        recs = decode(Recs, message.value())
        with lock:
            tracker.on_recs(recs, time.time())

    stop = threading.Event()
    reader = threading.Thread(target=_consume, args=(kafka_config, recs_topic, stop, on_recs), daemon=True)
    reader.start()
    time.sleep(5)  # the reader's group join on the embedded broker
    producer = EventProducer(kafka_config)
    rng = random.Random(7)
    steps = []
    total_sent = 0
    fresh_queue = list(fresh_items)
    for rate in rates:
        with lock:
            tracker.interaction_ms.clear()
            pushed_before = tracker.pushed
        applied_before = applied_count() if applied_count else 0.0
        sent = 0
        started = time.time()
        next_fresh = started
        while (now := time.time()) < started + step_s:
            due = int((now - started) * rate) - sent
            for _ in range(max(0, due)):
                user = f"bench-user-{rng.randrange(users)}"
                event = Interaction(user_id=user, item_id=rng.choice(item_ids), event="click", ts=time.time())
                with lock:
                    tracker.sent[user].append(event.ts)
                producer.send_raw(interactions_topic, encode(event), user.encode())
                sent += 1
            if fresh_queue and now >= next_fresh:  # one fresh item every 2 s
                item = fresh_queue.pop()
                with lock:
                    tracker.fresh_sent[item.item_id] = time.time()
                producer.send(items_topic, item)
                next_fresh = now + 2.0
            producer._producer.poll(0)  # noqa: SLF001 - serve delivery callbacks without blocking
            time.sleep(0.002)
        producer.flush()
        time.sleep(2.0)  # let the tail of the step drain
        with lock:
            latencies = list(tracker.interaction_ms)
            pushed = tracker.pushed - pushed_before
        elapsed = time.time() - started
        steps.append(
            {
                "target_per_s": rate,
                "sent_per_s": round(sent / step_s, 1),
                "answered": len(latencies),
                "answered_share": round(len(latencies) / max(1, sent), 3),
                "p50_ms": round(percentile(latencies, 50) or 0, 1),
                "p99_ms": round(percentile(latencies, 99) or 0, 1),
                "recs_per_s": round(pushed / elapsed, 1),
            }
        )
        if applied_count:  # profiles updated by the end of the step (and its 2 s drain)
            steps[-1]["applied_share"] = round((applied_count() - applied_before) / max(1, sent), 3)
        total_sent += sent
        print(json.dumps(steps[-1]))  # noqa: T201 - progress of a long benchmark
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
        "fresh_item_p50_ms": round(percentile(tracker.fresh_ms, 50) or 0, 1),
        "fresh_item_p99_ms": round(percentile(tracker.fresh_ms, 99) or 0, 1),
        "fresh_items_pushed": len(tracker.fresh_ms),
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


# --- ranking ---------------------------------------------------------------------------
class _TimedContent:
    """A `streams.rank.ContentSource` that adds up the time spent in vector searches: the
    ranker's own cost is the rest."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0

    def _timed(self, call: Callable[..., Any], *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return call(*args)
        finally:
            self.seconds += time.perf_counter() - started

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Any]) -> Any:
        return self._timed(self.inner.search, queries, k, exclude)

    def neighbours(self, items: Any, depth: int) -> Any:
        return self._timed(self.inner.neighbours, items, depth)

    def vectors(self, ids: Any) -> Any:
        return self.inner.vectors(ids)


def bench_rank(dataset: Any, users: int = 256, rounds: int = 8, dim: int = 384, seed: int = 0) -> dict[str, Any]:
    """The product's ranker (`streams.rank.BlendRanker`, as `vlm4rec eval` and the stream
    processor run it) after the whole dataset has streamed through it: `rounds` refresh rounds
    of `users` random users with history, timed after one warm-up round. The item vectors are
    random unit vectors of `dim` (the cost of ranking does not depend on what they say) and the
    content search is exact and in-process and its time is left out, since the stream asks
    Milvus instead (vector lookups count: the stream serves them from its cache). Per core:
    numpy's BLAS may use more than one thread for the few matrix products."""
    from vlm4rec.evaluate import BlendWalk, ContentIndex, build_stream

    stream = build_stream(dataset)
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(len(stream.item_ids), dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    walk = BlendWalk(stream)
    blend = walk.add(ContentIndex(vectors))
    started = time.perf_counter()
    step = 1000
    for end in tqdm(range(step, len(stream.ts) + step, step), desc="streaming the dataset through the ranker", unit="k rows"):
        blend.advance(min(end, len(stream.ts)))
    walk_s = time.perf_counter() - started
    blend.content.ts = np.inf
    content = _TimedContent(blend.content)
    active = [u for u in range(len(stream.user_ids)) if walk.recent[u]]
    now = float(stream.ts[-1])
    picks = [rng.choice(active, size=min(users, len(active)), replace=False) for _ in range(rounds + 1)]
    candidates = []
    ranked = 0
    total = 0.0
    for n, pick in enumerate(tqdm(picks, desc="ranking rounds", unit="round")):
        requests = [blend.request(int(u), now) for u in pick]
        if n == 0:  # warm-up: memos, caches
            blend.ranker.rank(requests, content, 20)
            continue
        content.seconds = 0.0
        t = time.perf_counter()
        blend.ranker.rank(requests, content, 20)
        total += time.perf_counter() - t - content.seconds
        ranked += len(requests)
        candidates.extend(len(p.rows) for p in blend.ranker.candidates(requests[:16], content))
    return {
        "dataset": stream.name,
        "interactions": len(stream.ts),
        "items": len(stream.item_ids),
        "users_per_round": len(picks[0]),
        "rounds": rounds,
        "model_fits": blend.ranker.fits,
        "candidates_per_user": round(float(np.mean(candidates)), 1) if candidates else 0.0,
        "rank_ms_per_user": round(1000 * total / max(ranked, 1), 3),
        "users_per_s_one_core": round(ranked / total, 1) if total else None,
        "stream_walk_s": round(walk_s, 1),
        "cpu_cores": os.cpu_count(),
    }
