"""Milvus (Lite, standalone or cluster) behind the `VectorStore` interface.

Consistency: every read uses `Strong`, so an item whose upsert was acknowledged is found by the
next search and the next lookup by id (the fresh-item case; a Bounded read could miss it for
`common.gracefulTime`, 5 s by default, and an interaction released for it would find no vector).
Milvus Lite answers Strong reads at no measurable cost. A Milvus server answers one when its
proxy's next time tick has passed: up to `proxy.timeTickInterval`, 200 ms by default (measured
on Milvus 2.3 standalone: one query 401 ms), so set it lower where latency matters (the local
server runs at 20 ms: 21 ms a query). Metric: cosine on L2-normalised vectors.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException
from pymilvus.client.utils import check_status

from vectorstore.base import CollectionMismatch, Hits, VectorRecord, VectorStore, rank_hits

MAX_ID_BYTES = 1024  # the contract caps ids at 256 characters (at most 1024 UTF-8 bytes)
MILVUS_MAX_TOPK = 16384
MAX_META_BYTES = 8192
_FETCH_CHUNK = 1000  # ids per `item_id in [...]` expression
_PROPS = ("vlm4rec.model", "vlm4rec.strategy")
COLLECTION_NOT_LOADED = 101  # Milvus's error code for a read on a released collection


def _limit_bucket(wanted: int) -> int:
    """`wanted` rounded up to a multiple of 16 (to a power of two beyond 256), capped at
    Milvus' largest top-k: few distinct limits, few calls, little excess."""
    wanted = max(wanted, 1)
    bucket = -(-wanted // 16) * 16 if wanted <= 256 else 1 << (wanted - 1).bit_length()
    return min(MILVUS_MAX_TOPK, bucket)


T = TypeVar("T")


def id_list_expr(ids: Sequence[str]) -> str:
    """`item_id in [...]` with every id quoted as a JSON string, which Milvus's expression
    parser reads back exactly (quotes, backslashes and unicode included; pymilvus's own `get`
    breaks on an id with a backslash or a quote)."""
    return "item_id in [" + ",".join(json.dumps(i, ensure_ascii=False) for i in ids) + "]"


def _meta_json(meta: Any) -> str:
    """Meta as JSON within the field's byte limit: when it does not fit, the longest values
    (a long image address, say) are left out first, rather than failing the upsert."""
    kept = dict(meta)
    text = json.dumps(kept, ensure_ascii=False)
    while len(text.encode("utf-8")) > MAX_META_BYTES:
        del kept[max(kept, key=lambda k: len(json.dumps(kept[k], ensure_ascii=False).encode("utf-8")))]
        text = json.dumps(kept, ensure_ascii=False)
    return text


def milvus_client(uri: str, token: str = "", timeout_s: float = 30.0) -> MilvusClient:
    """Every Milvus client of the project, made here to work around two behaviours of
    pymilvus 3.0 (tests/test_vectorstore.py shows the second against Milvus Lite):

    - clients of one address share a gRPC channel that `close()` never closes, so a process
      that opens and closes clients (a readiness probe, a test) keeps idle channels alive;
      `dedicated=True` gives each client its own channel, closed with it;
    - its channels ping every 10 s even without calls in flight, which Milvus Lite's gRPC server
      answers after about two minutes with GOAWAY "too_many_pings"; a call racing that GOAWAY
      failed a test ("Too many pings" while pymilvus re-registered the channel). Pinging only
      during calls keeps the dead-server detection where it matters. Since the stream processor
      searches its own replica, its client sits idle for minutes: exactly this case."""
    return MilvusClient(
        uri=uri, token=token, timeout=timeout_s, dedicated=True,
        grpc_options={"grpc.keepalive_permit_without_calls": False},
    )


class MilvusVectorStore(VectorStore):
    def __init__(self, uri: str, collection: str = "items", token: str = "", timeout_s: float = 30.0) -> None:
        self._client = milvus_client(uri, token, timeout_s)
        self.collection = collection

    def space(self) -> tuple[int, str, str] | None:
        if not self._client.has_collection(self.collection):
            return None
        info = self._client.describe_collection(self.collection)
        props = info.get("properties", {})
        dim = next((f["params"].get("dim") for f in info["fields"] if f["name"] == "vector"), 0)
        return int(dim or 0), str(props.get(_PROPS[0], "")), str(props.get(_PROPS[1], ""))

    def open(self, dim: int, model: str, strategy: str) -> None:
        client, name = self._client, self.collection
        have = self.space()
        if have == (dim, "", ""):  # made by a version that wrote the space after the create,
            # killed in between: nothing else makes a collection without one, so claim it
            client.alter_collection_properties(name, properties={_PROPS[0]: model, _PROPS[1]: strategy})
            have = (dim, model, strategy)
        if have is not None:
            if have != (dim, model, strategy):
                raise CollectionMismatch(
                    f"Milvus collection {name!r} holds dim={have[0]} model={have[1]!r} "
                    f"strategy={have[2]!r}, but this process embeds dim={dim} model={model!r} "
                    f"strategy={strategy!r}. Use another collection (VLM4REC_MILVUS_COLLECTION) "
                    f"or drop this one."
                )
            client.load_collection(name)
            return
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("item_id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("created_at", DataType.DOUBLE)
        schema.add_field("embedded_at", DataType.DOUBLE)
        schema.add_field("meta", DataType.VARCHAR, max_length=MAX_META_BYTES)
        index = client.prepare_index_params()
        index.add_index("vector", index_type="AUTOINDEX", metric_type="COSINE")
        # the space is written with the collection, in one call: a process killed between a
        # create and a later property update left a collection no process would open again
        properties = {_PROPS[0]: model, _PROPS[1]: strategy}
        client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong", properties=properties)

    def _read(self, call: Callable[[], T]) -> T:
        """Run a read; on a released collection load it and try once more. A Milvus Lite
        server restarted after a crash comes back with every collection released (its data is
        intact), and every read would fail until a process reloads it."""
        try:
            return call()
        except MilvusException as exc:
            if exc.code != COLLECTION_NOT_LOADED:
                raise
        self._client.load_collection(self.collection)
        return call()

    def upsert(self, records: Sequence[VectorRecord]) -> None:
        if not records:
            return
        latest = {r.item_id: r for r in records}  # one row per key within a call
        self._client.upsert(
            self.collection,
            [
                {
                    "item_id": r.item_id,
                    "vector": np.asarray(r.vector, dtype=np.float32).tolist(),
                    "content_hash": r.content_hash,
                    "created_at": float(r.created_at),
                    "embedded_at": float(r.embedded_at),
                    "meta": _meta_json(r.meta),
                }
                for r in latest.values()
            ],
        )

    def _fetch(self, ids: Collection[str], field: str) -> dict[str, object]:
        ids = list(dict.fromkeys(ids))
        found: dict[str, object] = {}
        for start in range(0, len(ids), _FETCH_CHUNK):
            rows = self._read(
                lambda chunk=ids[start : start + _FETCH_CHUNK]: self._client.query(
                    self.collection,
                    filter=id_list_expr(chunk),
                    output_fields=["item_id", field],
                    consistency_level="Strong",
                )
            )
            found.update((row["item_id"], row[field]) for row in rows)
        return found

    def get_vectors(self, ids: Collection[str]) -> dict[str, np.ndarray]:
        return {i: np.asarray(v, dtype=np.float32) for i, v in self._fetch(ids, "vector").items()}

    def get_hashes(self, ids: Collection[str]) -> dict[str, str]:
        return {i: str(h) for i, h in self._fetch(ids, "content_hash").items()}

    def get_meta(self, ids: Collection[str]) -> dict[str, dict[str, Any]]:
        return {i: json.loads(str(m) or "{}") for i, m in self._fetch(ids, "meta").items()}

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: Sequence[Collection[str]] | None = None,
    ) -> list[Hits]:
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if len(queries) == 0:
            return []
        skips = list(exclude) if exclude is not None else [()] * len(queries)
        # Each row asks for k plus what it may have to skip. Rows are grouped by that limit,
        # rounded (one call per group), so one long seen set does not make every row of the
        # batch return hundreds of hits: Milvus Lite's cost grows with the hits it returns.
        groups: dict[int, list[int]] = {}
        for row, skip in enumerate(skips):
            groups.setdefault(_limit_bucket(k + len(skip)), []).append(row)
        out: list[Hits] = [[] for _ in skips]
        for limit, rows in groups.items():
            data = queries[rows].tolist()
            results = self._read(lambda data=data, limit=limit: self._search_ids(data, limit))
            for row, hits in zip(rows, results, strict=True):
                out[row] = rank_hits(hits, k, skips[row])
        return out

    def _search_ids(self, data: list[list[float]], limit: int) -> list[list[tuple[str, float]]]:
        """(item_id, cosine) per query, read straight from the response message.

        pymilvus turns every hit into a Python object (`Hit`), which took about 90 % of a
        search's time in the stream processor's profile; the ids and scores are in the message
        as two flat arrays. Asked through pymilvus' asynchronous search (same request, same
        consistency), whose future holds the raw response; if a pymilvus release changes that,
        the public result is used instead."""
        future = self._client.search(
            self.collection,
            data=data,
            limit=limit,
            output_fields=["item_id"],
            search_params={"metric_type": "COSINE"},
            consistency_level="Strong",
            _async=True,
        )
        grpc_future = getattr(future, "_future", None)
        if grpc_future is None or not hasattr(grpc_future, "result"):
            return [list(zip(hits.ids, hits.distances, strict=True)) for hits in future.result()]
        response = grpc_future.result()
        check_status(response.status)
        results = response.results
        ids, scores = list(results.ids.str_id.data), list(results.scores)
        out, start = [], 0
        for count in results.topks:
            out.append(list(zip(ids[start : start + count], scores[start : start + count], strict=True)))
            start += count
        return out + [[] for _ in range(len(data) - len(out))]  # an empty collection may say nothing

    def scan(self, batch: int = 1000) -> Iterator[dict[str, np.ndarray]]:
        if not self._client.has_collection(self.collection):
            return
        rows = self._read(
            lambda: self._client.query_iterator(self.collection, batch_size=batch, filter="", output_fields=["item_id", "vector"])
        )
        try:
            while page := rows.next():
                yield {row["item_id"]: np.asarray(row["vector"], dtype=np.float32) for row in page}
        finally:
            rows.close()

    def count(self) -> int:
        rows = self._read(
            lambda: self._client.query(self.collection, filter="", output_fields=["count(*)"], consistency_level="Strong")
        )
        return int(rows[0]["count(*)"])

    def drop(self) -> None:
        self._client.drop_collection(self.collection)

    def close(self) -> None:
        self._client.close()
