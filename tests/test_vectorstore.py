"""One suite over every vector store: the in-memory one, a Milvus Lite server, a real Milvus
2.3 standalone server, and the in-process replica over the in-memory store and over Milvus
Lite."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from images.thumbnails import STORED_THUMB_CHARS
from vectorstore.milvus import milvus_client
from vectorstore import (
    CollectionMismatch,
    MemoryVectorStore,
    MilvusVectorStore,
    ReplicaVectorStore,
    VectorRecord,
    VectorStore,
)


@pytest.fixture(
    params=[
        "memory",
        pytest.param("milvus-lite", marks=pytest.mark.integration),
        pytest.param("milvus-server", marks=pytest.mark.integration),
        "replica-memory",
        pytest.param("replica-milvus-lite", marks=pytest.mark.integration),
    ]
)
def store(request: pytest.FixtureRequest) -> Iterator[VectorStore]:
    if request.param == "memory":
        yield MemoryVectorStore()
        return
    if request.param == "replica-memory":
        replica = ReplicaVectorStore(MemoryVectorStore())
        replica.load()
        yield replica
        return
    if request.param in ("milvus-lite", "replica-milvus-lite"):
        uri = request.getfixturevalue("infra").milvus_uri
    else:
        uri = request.getfixturevalue("milvus_server")
    milvus = MilvusVectorStore(uri, collection=f"t_{uuid.uuid4().hex[:12]}")
    if request.param.startswith("replica"):
        replica = ReplicaVectorStore(milvus)
        replica.load()
        yield replica
    else:
        yield milvus
    milvus.drop()
    milvus.close()


def unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_upsert_search_get(store: VectorStore) -> None:
    store.open(4, "m", "describe")
    vectors = unit(np.eye(4) + 0.1)
    store.upsert([VectorRecord(f"i{n}", vectors[n], content_hash=f"h{n}") for n in range(4)])
    assert store.count() == 4
    hits = store.search(vectors[:2], k=2)
    assert [h[0][0] for h in hits] == ["i0", "i1"]
    assert hits[0][0][1] == pytest.approx(1.0, abs=1e-5)
    got = store.get_vectors(["i2", "missing"])
    assert set(got) == {"i2"} and np.allclose(got["i2"], vectors[2], atol=1e-6)
    assert store.get_hashes(["i3", "nope"]) == {"i3": "h3"}


def test_upsert_is_idempotent_and_replaces(store: VectorStore) -> None:
    store.open(3, "m", "text")
    a, b = unit([[1, 0, 0], [0, 1, 0]])
    store.upsert([VectorRecord("x", a, "h1")])
    store.upsert([VectorRecord("x", a, "h1")])
    store.upsert([VectorRecord("x", b, "h2"), VectorRecord("x", b, "h2")])
    assert store.count() == 1
    assert store.get_hashes(["x"]) == {"x": "h2"}
    assert np.allclose(store.get_vectors(["x"])["x"], b, atol=1e-6)


def test_a_matrix_of_many_ids_holds_what_get_vectors_gives(store: VectorStore) -> None:
    """`get_matrix` (a ranking round's read) and `get_vectors` agree, missing ids included."""
    store.open(4, "m", "describe")
    vectors = unit(np.eye(4) + 0.1)
    store.upsert([VectorRecord(f"i{n}", vectors[n]) for n in range(4)])
    ids = ["i3", "missing", "i0", "i3", "i1"]
    matrix, at = store.get_matrix(ids)
    assert at.tolist()[1] == -1 and (at[[0, 2, 3, 4]] >= 0).all()
    got = store.get_vectors(ids)
    for item, row in zip(ids, at.tolist(), strict=True):
        if row >= 0:
            assert np.array_equal(matrix[row], got[item])
    assert store.get_matrix([])[1].tolist() == []


def test_exclusions_and_ties_by_id(store: VectorStore) -> None:
    store.open(2, "m", "text")
    v = unit([[1, 0]])[0]
    store.upsert([VectorRecord(i, v) for i in ["c", "a", "b", "d"]])
    hits = store.search(np.stack([v, v]), k=2, exclude=[{"a"}, set()])
    assert [i for i, _ in hits[0]] == ["b", "c"]
    assert [i for i, _ in hits[1]] == ["a", "b"]


def test_hostile_ids_round_trip(store: VectorStore) -> None:
    store.open(2, "m", "text")
    ids = ['quote"d', "single'q", "back\\slash", "brack]et", "ünï😀", "in [x]", "a OR 1==1"]
    vectors = unit(np.random.default_rng(0).random((len(ids), 2)) + 0.1)
    store.upsert([VectorRecord(i, vectors[n]) for n, i in enumerate(ids)])
    assert set(store.get_vectors(ids)) == set(ids)
    assert store.count() == len(ids)


def test_empty_store_and_empty_queries(store: VectorStore) -> None:
    store.open(2, "m", "text")
    assert store.count() == 0
    assert store.get_vectors(["a"]) == {}
    q = unit([[1, 1]])
    assert store.search(q, k=5) == [[]]


def test_one_collection_never_mixes_spaces(store: VectorStore) -> None:
    store.open(4, "model-a", "describe")
    store.open(4, "model-a", "describe")  # same space: fine
    for dim, model, strategy in [(5, "model-a", "describe"), (4, "model-b", "describe"), (4, "model-a", "image")]:
        with pytest.raises(CollectionMismatch):
            store.open(dim, model, strategy)


def test_search_many_queries_in_one_call(store: VectorStore) -> None:
    rng = np.random.default_rng(1)
    vectors = unit(rng.normal(size=(300, 16)))
    store.open(16, "m", "text")
    store.upsert([VectorRecord(f"i{n:03d}", vectors[n]) for n in range(300)])
    hits = store.search(vectors[:50], k=10)
    assert len(hits) == 50
    assert all(h[0][0] == f"i{n:03d}" for n, h in enumerate(hits))
    exact = vectors[:50] @ vectors.T
    for n, h in enumerate(hits):
        want = np.sort(exact[n])[::-1][:10]
        assert np.allclose([s for _, s in h], want, atol=1e-4)


def test_rows_with_exclusions_of_very_different_sizes(store: VectorStore) -> None:
    """Each row gets its own top k after its own exclusions, however long the others' are
    (Milvus groups rows by how many hits they need)."""
    rng = np.random.default_rng(2)
    vectors = unit(rng.normal(size=(300, 16)))
    store.open(16, "m", "text")
    ids = [f"i{n:03d}" for n in range(300)]
    store.upsert([VectorRecord(ids[n], vectors[n]) for n in range(300)])
    exact = vectors[:4] @ vectors.T
    nearest = [[ids[j] for j in np.argsort(-row)] for row in exact]
    exclude = [set(), set(nearest[1][:40]), set(nearest[2][:200]), {"not-stored"}]
    hits = store.search(vectors[:4], k=5, exclude=exclude)
    for n, row in enumerate(hits):
        assert [i for i, _ in row] == [i for i in nearest[n] if i not in exclude[n]][:5]


def test_meta_and_space(store: VectorStore) -> None:
    assert store.space() is None
    store.open(2, "m", "text")
    assert store.space() == (2, "m", "text")
    v = unit([[1, 0]])[0]
    store.upsert([
        VectorRecord("a", v, meta={"title": 'Robe "rouge" ünï', "partition": 3}),
        VectorRecord("b", v, meta={"image_url": "data:image/png;base64," + "A" * 50_000}),
    ])
    meta = store.get_meta(["a", "b", "zz"])
    assert meta["a"] == {"title": 'Robe "rouge" ünï', "partition": 3}
    assert set(meta) == {"a", "b"}


def test_meta_keeps_a_stored_thumbnail_beside_the_longest_display_fields(store: VectorStore) -> None:
    """The worker's meta at its largest: a title and category of 4-byte characters, a long
    address and a thumbnail as big as the worker stores. The address gives way, nothing else."""
    store.open(2, "m", "text")
    meta = {
        "title": "\U0001f457" * 300,
        "category": "\U0001f45f" * 100,
        "thumb": "data:image/jpeg;base64," + "B" * (STORED_THUMB_CHARS - 23),
        "image_url": "https://img.example/" + "p" * 6000,
    }
    store.upsert([VectorRecord("a", unit([[1, 0]])[0], meta=meta)])
    kept = store.get_meta(["a"])["a"]
    assert {k: kept.get(k) for k in ("title", "category", "thumb")} == {k: meta[k] for k in ("title", "category", "thumb")}


def test_scan_reads_every_vector_once(store: VectorStore) -> None:
    assert list(store.scan()) == []  # no collection yet
    rng = np.random.default_rng(3)
    vectors = unit(rng.normal(size=(250, 8)))
    store.open(8, "m", "text")
    store.upsert([VectorRecord(f"i{n:03d}", vectors[n]) for n in range(250)])
    batches = list(store.scan(batch=100))
    assert all(len(b) <= 100 for b in batches)
    seen = [i for b in batches for i in b]
    assert sorted(seen) == [f"i{n:03d}" for n in range(250)]
    merged = {i: v for b in batches for i, v in b.items()}
    assert all(np.allclose(merged[f"i{n:03d}"], vectors[n], atol=1e-6) for n in range(250))


#: how long an idle client with pymilvus's default options lasts at most (measured: about 100 s)
IDLE_LIMIT_S = 240


@pytest.mark.integration
def test_idle_clients_are_not_sent_away_by_milvus_lite(infra: Any, capfd: pytest.CaptureFixture[str]) -> None:
    """The misbehaviour `vectorstore.milvus.milvus_client` works around: with pymilvus's
    default channel options an idle client pings every 10 s and Milvus Lite's gRPC server sends
    it away (GOAWAY "too_many_pings", logged by gRPC on stderr) within about two minutes; the
    project's client sits idle as long without a ping, and still answers."""
    from pymilvus import MilvusClient

    default = MilvusClient(uri=infra.milvus_uri, timeout=10, dedicated=True)
    ours = milvus_client(infra.milvus_uri, timeout_s=10)
    default.list_collections()
    ours.list_collections()
    capfd.readouterr()
    try:
        deadline = time.monotonic() + IDLE_LIMIT_S
        while "too_many_pings" not in capfd.readouterr().err:
            assert time.monotonic() < deadline, f"pymilvus's defaults were not sent away in {IDLE_LIMIT_S} s: the work-around may go"
            time.sleep(1)
        time.sleep(25)  # a further ping interval and more: ours would have been sent away too
        assert capfd.readouterr().err.count("too_many_pings") == 0, "the project's client was sent away"
        ours.list_collections()
    finally:
        default.close()
        ours.close()
