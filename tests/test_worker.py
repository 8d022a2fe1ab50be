"""The embedding worker against the real broker, the real Milvus Lite server and the real CPU
models: good items land once, bad ones reach the dead-letter topic with their reason, and a
worker killed with SIGKILL mid-stream loses nothing and duplicates nothing."""

from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from PIL import Image
from prometheus_client import REGISTRY

from conftest import REPO, RunningStack, read_topic
from topics import DeadLetter, ItemEmbedded, decode
from topics.producer import EventProducer
from vectorstore import MilvusVectorStore

pytestmark = pytest.mark.integration


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def data_uri(colour: tuple[int, int, int]) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(colour)).decode()


class _ImageHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/img.png":
            body, kind = png_bytes((0, 200, 0)), "image/png"
        else:
            body, kind = b"<html>not an image</html>", "text/html"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def image_server():  # noqa: ANN201
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def counter(outcome: str) -> float:
    return REGISTRY.get_sample_value("vlm4rec_worker_items_total", {"outcome": outcome}) or 0.0


def test_worker_embeds_good_items_and_dead_letters_bad_ones(isolated: RunningStack, image_server: str, tmp_path: Path) -> None:
    from vlm4rec.wiring import build_worker

    roots = tmp_path / "images"
    roots.mkdir()
    (roots / "cat.png").write_bytes(png_bytes((120, 80, 40)))
    (tmp_path / "secret.png").write_bytes(png_bytes((1, 2, 3)))
    settings = isolated.settings(
        image_allowed_hosts=json.dumps(["127.0.0.1"]),
        image_file_roots=json.dumps([str(roots)]),
        worker_batch_size="8",
    )
    good = [
        {"item_id": "red", "title": "Red summer dress", "image_url": data_uri((220, 20, 20))},
        {"item_id": "blue", "title": "Blue denim shirt", "text": "cotton", "image_url": data_uri((20, 20, 220))},
        {"item_id": "file", "title": "Brown bag", "image_url": (roots / "cat.png").as_uri()},
        {"item_id": "http", "title": "Green scarf", "image_url": f"{image_server}/img.png"},
        {"item_id": "noimg", "title": "Gift card", "text": "no picture at all"},
        {"item_id": "ünï 😀 \"q\"", "title": "Unicode id", "image_url": data_uri((9, 9, 9))},
    ]
    bad = {
        b"{not json": "not valid JSON",
        json.dumps({"item_id": "x1"}).encode(): "title: Field required",
        json.dumps({"item_id": "x2", "title": "t", "image_url": "http://169.254.169.254/latest/meta-data"}).encode(): "image:",
        json.dumps({"item_id": "x3", "title": "t", "image_url": "data:image/png;base64," + base64.b64encode(b"corrupt").decode()}).encode(): "image:",
        json.dumps({"item_id": "x4", "title": "t", "image_url": (tmp_path / "secret.png").as_uri()}).encode(): "image:",
        json.dumps({"item_id": "x5", "title": "t", "image_url": f"{image_server}/page.html"}).encode(): "image:",
    }
    with EventProducer(settings.kafka_config()) as producer:
        for item in good:
            producer.send_raw(settings.topics.items_new, json.dumps(item).encode(), item["item_id"].encode())
        for raw in bad:
            producer.send_raw(settings.topics.items_new, raw, b"bad")

    worker = build_worker(settings)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        embedded = read_topic(settings.kafka_config(), settings.topics.items_embedded, len(good), timeout_s=120)
        letters = read_topic(settings.kafka_config(), settings.topics.items_new_dlq, len(bad), timeout_s=30)
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()

    events = [decode(ItemEmbedded, m.value()) for m in embedded]
    assert sorted(e.item_id for e in events) == sorted(i["item_id"] for i in good)
    assert all(e.dim == worker.embedder.dim and e.model == worker.embedder.model_id for e in events)
    dead = [decode(DeadLetter, m.value()) for m in letters]
    assert len(dead) == len(bad), "accepted + dead-lettered must equal the input"
    for letter in dead:
        original = letter.original_bytes()
        assert original in bad, "the original bytes are kept"
        assert bad[original] in letter.reason, (letter.reason, bad[original])
        assert letter.topic == settings.topics.items_new
    reasons = " | ".join(d.reason for d in dead)
    assert "private" in reasons or "link-local" in reasons or "metadata" in reasons

    store = MilvusVectorStore(settings.milvus_uri, settings.milvus_collection)
    assert store.count() == len(good)
    assert set(store.get_vectors([i["item_id"] for i in good])) == {i["item_id"] for i in good}

    # re-publishing an unchanged item is not embedded again, but is announced again
    before = counter("unchanged")
    with EventProducer(settings.kafka_config()) as producer:
        producer.send_raw(settings.topics.items_new, json.dumps(good[0]).encode(), b"red")
    worker = build_worker(settings)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        read_topic(settings.kafka_config(), settings.topics.items_embedded, len(good) + 1, timeout_s=60)
    finally:
        stop.set()
        thread.join(30)
    assert counter("unchanged") == before + 1
    assert store.count() == len(good)
    store.close()


def test_worker_killed_mid_stream_leaves_every_item_exactly_once(isolated: RunningStack) -> None:
    settings = isolated.settings(worker_batch_size="16")
    n = 240
    colours = [((i * 37) % 256, (i * 91) % 256, (i * 53) % 256) for i in range(n)]
    with EventProducer(settings.kafka_config()) as producer:
        for i, colour in enumerate(colours):
            producer.send_raw(
                settings.topics.items_new,
                json.dumps({"item_id": f"item-{i:04d}", "title": f"Item {i}", "image_url": data_uri(colour)}).encode(),
                f"item-{i:04d}".encode(),
            )

    def start_worker() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "vlm4rec", "worker"], env=isolated.env, cwd=REPO,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    store = MilvusVectorStore(settings.milvus_uri, settings.milvus_collection)
    # one watcher polling every 50 ms, killing at the first batch out: the worker embeds the
    # 240 items in a few seconds, and a fresh reader per look (seconds each) once saw them all
    # before it could kill
    watcher = Consumer(
        {**settings.kafka_config(), "group.id": f"watch-{time.time_ns()}", "enable.auto.commit": False, "fetch.wait.max.ms": 50}
    )
    watcher.assign([TopicPartition(settings.topics.items_embedded, p, OFFSET_BEGINNING) for p in range(settings.topic_partitions)])
    first = start_worker()
    try:
        deadline, done = time.monotonic() + 180, 0
        while time.monotonic() < deadline and done == 0:  # the first batch is out: kill
            done += sum(1 for m in watcher.consume(100, timeout=0.05) if m.error() is None)
        assert 0 < done < n, f"kill should land mid-stream (saw {done} of {n})"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
        watcher.close()
    second = start_worker()
    try:
        embedded = read_topic(settings.kafka_config(), settings.topics.items_embedded, n, timeout_s=240)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(60)
    ids = {decode(ItemEmbedded, m.value()).item_id for m in embedded}
    assert ids == {f"item-{i:04d}" for i in range(n)}
    assert store.count() == n, "every item in Milvus exactly once"
    assert len(store.get_vectors(sorted(ids))) == n
    store.close()
