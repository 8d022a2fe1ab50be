"""Benchmarks that print figures: `vlm4rec bench embed`, `bench stream`, `bench search` and
`bench rank`.

They drive the product's own code paths (the worker's embedder, image loader and vector store;
the running local stack's streams) and report what they measured, with the machine's core
count, so that figures are compared only with others from the same run."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from tqdm import tqdm

from topics import ItemNew
from vlm4rec.evaluation.blas import single_threaded_blas
from vectorstore import VectorRecord, VectorStore
from workers.embedder import Embedder, ItemContent
from images.loader import ImageError, ImageLoader


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

    def matrix(self, ids: Any) -> Any:
        return self.inner.matrix(ids)


def _serving_ms_per_user(stream: Any, vectors: np.ndarray, picks: Sequence[np.ndarray]) -> float:
    """The stream processor's own path for the same rounds of users: `Recommender.recommend`
    over the items in an in-memory replica (`vectorstore.replica`, as `vlm4rec up` runs it),
    its searches included, after every interaction has been applied to the users' profiles
    (`Profile.apply`, the default rule) and observed by the ranker in batches of 1,000 (the
    learner's 32 training groups a batch at most). Each round is ranked once before it is
    timed, so that the neighbour lists are cached as in a warm stream. One BLAS thread."""
    from streams.popularity import RecentPopularity
    from streams.profile import Profile, ProfileRule
    from streams.recommend import Observation, Recommender
    from vectorstore.memory import MemoryVectorStore
    from vectorstore.replica import ReplicaVectorStore

    store = MemoryVectorStore()
    store.open(vectors.shape[1], "bench", "text")
    store.upsert([VectorRecord(i, v) for i, v in zip(stream.item_ids, vectors, strict=True)])
    replica = ReplicaVectorStore(store)
    replica.load()
    recommender = Recommender(replica, RecentPopularity())
    rule = ProfileRule()
    profiles: dict[int, Profile] = {}
    batch: list[Observation] = []
    rows = zip(stream.users.tolist(), stream.items.tolist(), stream.ts.tolist(), strict=True)
    for user, item, ts in tqdm(rows, total=len(stream.ts), desc="applying the dataset to profiles", unit="row", mininterval=2):
        profile = profiles.setdefault(user, Profile(stream.user_ids[user]))
        item_id = stream.item_ids[item]
        batch.append(recommender.observation(profile, item_id, ts))
        profile.apply(item_id, vectors[item], "click", None, ts, rule)
        recommender.popularity.add(item_id, ts, 1.0)
        if len(batch) == 1000:
            recommender.observe(batch, 32)
            batch = []
    recommender.observe(batch, 32)
    rounds = [[profiles[int(u)] for u in pick] for pick in picks[1:]]
    with single_threaded_blas():
        for users in rounds:  # neighbour lists cached
            recommender.recommend(users)
        started = time.perf_counter()
        for users in rounds:
            recommender.recommend(users)
        took = time.perf_counter() - started
    return round(1000 * took / max(1, sum(map(len, rounds))), 3)


def bench_rank(dataset: Any, users: int = 256, rounds: int = 8, dim: int = 384, seed: int = 0) -> dict[str, Any]:
    """The product's ranker (`streams.rank.BlendRanker`, as `vlm4rec eval` and the stream
    processor run it) after the whole dataset has streamed through it: `rounds` refresh rounds
    of `users` random users with history, timed after one warm-up round, and learning from
    the same users as one batch (the stream processor's learner takes batches of sampled
    interactions; in the bench each user takes one of its ranked items). The item vectors are
    random unit vectors of `dim` (the cost of ranking does not depend on what they say) and the
    content search is exact and in-process and its time is left out, since the stream asks
    Milvus instead (vector lookups count: the stream serves them from its cache). One BLAS
    thread, as in the stream processor (`vlm4rec.evaluation.blas`). `serving_ms_per_user`: the
    same rounds through the stream processor's whole path, searches included
    (`_serving_ms_per_user`)."""
    from vlm4rec.evaluation.methods import BlendWalk
    from vlm4rec.evaluation.stream import ContentIndex, build_stream

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
    ranked = learnt = 0
    total = learn_total = 0.0
    with single_threaded_blas():  # as the stream processor runs it
        for n, pick in enumerate(tqdm(picks, desc="ranking rounds", unit="round")):
            requests = [blend.request(int(u), now) for u in pick]
            if n == 0:  # warm-up: memos, caches
                blend.ranker.rank(requests, content, 20)
                continue
            content.seconds = 0.0
            t = time.perf_counter()
            lists = blend.ranker.rank(requests, content, 20)
            total += time.perf_counter() - t - content.seconds
            ranked += len(requests)
            candidates.extend(len(p.rows) for p in blend.ranker.candidates(requests[:16], content))
            # learning the same users, each taking one of its candidates (so that each makes a
            # training group, as a sampled interaction the sources offered does)
            taking = [(r, hits[int(rng.integers(len(hits)))][0]) for r, hits in zip(requests, lists, strict=True) if hits]
            content.seconds = 0.0
            t = time.perf_counter()
            blend.ranker.learn([r for r, _ in taking], [item for _, item in taking], content, refit=False)
            learn_total += time.perf_counter() - t - content.seconds
            learnt += len(taking)
    serving = _serving_ms_per_user(stream, vectors, picks)
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
        "learn_ms_per_group": round(1000 * learn_total / max(learnt, 1), 3),
        "serving_ms_per_user": serving,
        "stream_walk_s": round(walk_s, 1),
        "cpu_cores": os.cpu_count(),
    }
