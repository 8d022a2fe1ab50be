"""What the replica adds to the store contract (which tests/test_vectorstore.py runs over it):
it serves what another process wrote only after `load` or `refresh`, reads misses through, and
asks the source before it is loaded."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from topics import ItemEmbedded
from vectorstore import MemoryVectorStore, MilvusVectorStore, ReplicaVectorStore, VectorRecord


class CountingStore(MemoryVectorStore):
    """The source, counting the searches it answers."""

    def __init__(self) -> None:
        super().__init__()
        self.searches = 0

    def search(self, queries, k, exclude=None):  # type: ignore[no-untyped-def]
        self.searches += 1
        return super().search(queries, k, exclude)


def unit(v: list[float]) -> np.ndarray:
    a = np.asarray(v, dtype=np.float32)
    return a / np.linalg.norm(a)


def source_with(items: dict[str, list[float]]) -> CountingStore:
    source = CountingStore()
    source.open(2, "m", "text")
    source.upsert([VectorRecord(i, unit(v)) for i, v in items.items()])
    return source


def test_searches_go_to_the_source_until_loaded_then_stay_in_memory() -> None:
    source = source_with({"a": [1, 0], "b": [0, 1]})
    replica = ReplicaVectorStore(source)
    assert replica.search(unit([1, 0])[None, :], 1) == [[("a", 1.0)]]
    assert source.searches == 1
    assert replica.load() == 2
    hits = replica.search(unit([0, 1])[None, :], 1)
    assert hits[0][0][0] == "b"
    assert source.searches == 1


def test_another_writer_is_seen_after_refresh_and_misses_read_through() -> None:
    source = source_with({"a": [1, 0]})
    replica = ReplicaVectorStore(source)
    replica.load()
    source.upsert([VectorRecord("b", unit([0, 1])), VectorRecord("a", unit([0.6, 0.8]))])  # another process
    assert [i for i, _ in replica.search(unit([0, 1])[None, :], 2)[0]] == ["a"]
    assert replica.refresh(["b", "a", "gone"]) == 2
    assert [i for i, _ in replica.search(unit([0, 1])[None, :], 2)[0]] == ["b", "a"]
    source.upsert([VectorRecord("c", unit([1, 1]))])
    assert set(replica.get_vectors(["c", "nope"])) == {"c"}  # read through, and kept
    assert len(replica) == 3


def test_scores_are_cosines_whatever_the_query_norm() -> None:
    replica = ReplicaVectorStore(source_with({"a": [1, 0], "b": [1, 1]}))
    replica.load()
    hits = replica.search(np.array([[3.0, 3.0], [0.0, 0.0]], dtype=np.float32), 2)
    assert hits[0][0][0] == "b" and abs(hits[0][0][1] - 1.0) < 1e-6
    assert [s for _, s in hits[1]] == [0.0, 0.0]


def test_grows_past_its_first_capacity() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3000, 4)).astype(np.float32)
    source = MemoryVectorStore()
    source.open(4, "m", "text")
    replica = ReplicaVectorStore(source)
    replica.load()
    for start in range(0, 3000, 700):
        replica.upsert([VectorRecord(f"i{n}", vectors[n]) for n in range(start, min(3000, start + 700))])
    assert len(replica) == 3000
    assert replica.search(vectors[2999][None, :], 1)[0][0][0] == "i2999"


def wait_for(condition, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.mark.integration
def test_feed_follows_every_partition_against_the_real_broker_and_milvus(infra) -> None:  # type: ignore[no-untyped-def]
    """The replica loads what Milvus holds, then follows items.embedded on every partition:
    another process's new and re-embedded items reach its searches and are handed on (for the
    fan-out), a malformed event on the topic stops nothing."""
    from streams.item_feed import ItemFeed
    from topics.admin import create_topics
    from topics.producer import EventProducer

    kafka = {"bootstrap.servers": infra.bootstrap}
    topic = f"embedded-{uuid.uuid4().hex[:8]}"
    create_topics(kafka, {topic: 3})
    store = MilvusVectorStore(infra.milvus_uri, collection=f"t_{uuid.uuid4().hex[:12]}")
    store.open(2, "m", "text")
    store.upsert([VectorRecord("a", unit([1, 0])), VectorRecord("b", unit([0, 1]))])
    replica = ReplicaVectorStore(MilvusVectorStore(infra.milvus_uri, collection=store.collection))
    handed: list[str] = []
    feed = ItemFeed(
        replica, topic, kafka, f"feed-{uuid.uuid4().hex[:8]}", lambda items: handed.extend(i.item_id for i in items), retry_s=0.2
    )
    producer = EventProducer(kafka)

    def embedded(item_id: str) -> None:
        producer.send(topic, ItemEmbedded(item_id=item_id, model="m", dim=2, embedded_at=time.time()))
        producer.flush()

    def nearest(vector: list[float]) -> str:
        return replica.search(unit(vector)[None, :], 1)[0][0][0]

    try:
        feed.start()
        wait_for(lambda: replica.loaded)
        assert len(replica) == 2
        for n in range(6):  # spread over the partitions by key
            store.upsert([VectorRecord(f"new-{n}", unit([1, 1 + n]))])
            embedded(f"new-{n}")
        wait_for(lambda: len(replica) == 8)
        producer.send_raw(topic, b"{not json", b"x")
        store.upsert([VectorRecord("a", unit([-1, 0.01]))])  # re-embedded elsewhere
        embedded("a")
        wait_for(lambda: nearest([-1, 0]) == "a")
        assert nearest([1, 1]) == "new-0"
        wait_for(lambda: handed[-1:] == ["a"])
        assert sorted(set(handed)) == sorted(["a", *(f"new-{n}" for n in range(6))]), "every event handed on, after its refresh"
    finally:
        feed.stop()
        store.drop()
        store.close()


def test_batched_search_matches_the_exact_per_row_order_ties_included() -> None:
    """The batched top k (rows with nothing to skip) gives what the per-row path gives, ties
    by id included: duplicate vectors make ties inside and at the edge of the top k."""
    rng = np.random.default_rng(5)
    base = rng.normal(size=(400, 8)).astype(np.float32)
    vectors = np.concatenate([base, base[:40], base[:40]])  # every one of the first 40 three times
    ids = [f"i{n:04d}" for n in range(len(vectors))]
    source = MemoryVectorStore()
    source.open(8, "m", "text")
    replica = ReplicaVectorStore(source)
    replica.load()
    replica.upsert([VectorRecord(ids[n], vectors[n]) for n in range(len(vectors))])
    queries = np.concatenate([vectors[:60], rng.normal(size=(60, 8)).astype(np.float32)])
    batched = replica.search(queries, 7)
    one_by_one = replica.search(queries, 7, exclude=[{"not-stored"}] * len(queries))  # the per-row path
    assert batched == one_by_one
    assert [i for i, _ in batched[0][:3]] == ["i0000", "i0400", "i0440"]


def test_search_agrees_with_the_in_memory_store_on_duplicates_and_exclusions() -> None:
    """Many exact duplicates (as in hm, where items share a picture and title): the replica's
    order, ties by id, is the reference store's, with and without exclusions."""
    rng = np.random.default_rng(9)
    pool = rng.normal(size=(30, 6)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    picks = rng.integers(0, 30, size=500)
    ids = [f"item-{rng.integers(0, 10**6):06d}-{n}" for n in range(500)]
    records = [VectorRecord(ids[n], pool[picks[n]]) for n in range(500)]
    reference = MemoryVectorStore()
    reference.open(6, "m", "text")
    reference.upsert(records)
    replica = ReplicaVectorStore(MemoryVectorStore())
    replica.open(6, "m", "text")
    replica.load()
    replica.upsert(records)
    queries = pool[:12]
    exclude = [set(rng.choice(ids, size=int(rng.integers(0, 40)), replace=False)) for _ in range(12)]
    for skips in (None, exclude):
        got, want = replica.search(queries, 25, skips), reference.search(queries, 25, skips)
        assert [[i for i, _ in row] for row in got] == [[i for i, _ in row] for row in want]


@pytest.mark.parametrize("width", [1, 5, 63, 64, 65, 257, 1000, 4099])
def test_batched_top_k_is_the_exact_order_on_any_width_with_ties_and_nans(width: int) -> None:
    """The batched top k against a plain sort by (-score, id): few distinct scores make ties
    everywhere, a NaN is never returned, and widths around the block sizes and below k."""
    from vectorstore.order import IdOrder
    from vectorstore.replica import _top_many

    rng = np.random.default_rng(width)
    ids = [f"item-{rng.integers(0, 10**6):06d}-{n}" for n in range(width)]
    scores = rng.integers(0, 12, size=(40, width)).astype(np.float32) / 11
    scores[3] = 0.0  # one row all ties
    scores[5, rng.integers(0, width, size=max(1, width // 3))] = np.nan
    scores[7] = np.nan  # nothing to return
    ranks = IdOrder(ids).ranks()
    for k in (1, 10, 64):
        got = _top_many(scores, ids, ranks, k)
        for row, hits in zip(scores, got, strict=True):
            want = sorted((-float(v), ids[j]) for j, v in enumerate(row.tolist()) if not np.isnan(v))[:k]
            assert [(i, s) for i, s in hits] == [(i, -v) for v, i in want]


def test_a_matrix_handed_out_is_not_changed_by_a_later_write() -> None:
    """A round reads the replica's own matrix without a copy (`get_matrix`): re-embedding an
    item afterwards must not change what the round holds (the write copies first)."""
    replica = ReplicaVectorStore(source_with({"a": [1, 0], "b": [0, 1]}))
    replica.load()
    matrix, at = replica.get_matrix(["a", "b"])
    before = matrix.copy()
    replica.upsert([VectorRecord("a", unit([1, 1])), VectorRecord("c", unit([-1, 0]))])
    assert np.array_equal(matrix, before)
    now, at_now = replica.get_matrix(["a", "c"])
    assert np.allclose(now[at_now[0]], unit([1, 1])) and np.allclose(now[at_now[1]], unit([-1, 0]))


def test_the_spare_rows_of_a_search_over_whole_blocks_are_never_returned() -> None:
    """The search multiplies by the replica's spare (zero) rows to fill `_contenders`'
    blocks: those columns score 0, above every item here, and must never be hits."""
    rng = np.random.default_rng(1)
    query = unit([1.0, 0.5])
    vectors = -query + 0.2 * rng.normal(size=(1030, 2))
    source = CountingStore()
    source.open(2, "m", "text")
    source.upsert([VectorRecord(f"i{n:04d}", unit(v)) for n, v in enumerate(vectors)])
    replica = ReplicaVectorStore(source)
    replica.load()
    for k in (1, 50):  # k = 1: four blocks, the last one padded
        got = replica.search(query[None, :], k)[0]
        want = source.search(query[None, :], k)[0]
        assert [i for i, _ in got] == [i for i, _ in want] and len(got) == k and max(s for _, s in got) < 0
