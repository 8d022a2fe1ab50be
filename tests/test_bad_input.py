"""Bad input, end to end: malformed, mistyped, incomplete, huge and oddly encoded events, and
hostile or broken image URLs, sent to the real `vlm4rec worker` and `vlm4rec streams`
processes on the real broker and Milvus Lite.

Each bad event must land on its topic's dead-letter topic with its original bytes and a reason
that says what is wrong; accepted + dead-lettered must equal the input; both processes must
still be alive and still process good events afterwards.

The SSRF cases need an image server the worker may reach: it listens on 127.0.0.2, the only
address in the worker's allowlist, so 127.0.0.1, `localhost` and this machine's own name (in
/etc/hosts, it resolves to a loopback address here) stay refused. A DNS name of our own that
resolves to a private address cannot be added without editing /etc/hosts; the loader's unit
tests (tests/test_images.py) cover that with a fake resolver.

The property-based tests at the end (no stack) extend tests/test_events.py.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import REPO, RunningStack, free_port, isolate, read_topic
from images.thumbnails import STORED_THUMB_CHARS
from topics import DeadLetter, EventError, Interaction, ItemEmbedded, ItemNew, decode, encode
from topics.events import MAX_ID_CHARS
from topics.producer import EventProducer, event_key
from vectorstore import MilvusVectorStore

ALLOWED_HOST = "127.0.0.2"  # the worker's only allowed private address
MAX_IMAGE_BYTES = 300_000
READ_TIMEOUT_S = 2.0


def png(size: tuple[int, int] = (48, 48), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def bilevel_png(width: int, height: int) -> bytes:
    """A 1-bit PNG: 64 M pixels in a few kilobytes (a decompression bomb)."""
    out = io.BytesIO()
    Image.new("1", (width, height)).save(out, "PNG")
    return out.getvalue()


def data_uri(body: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(body).decode()


# --- a hostile image server -------------------------------------------------------------
class _Images(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        parts = urlsplit(self.path)
        if parts.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", parse_qs(parts.query)["to"][0])
            self.end_headers()
            return
        if parts.path == "/slow.png":  # headers at once, then a byte every 0.3 s
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(60):
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
                    time.sleep(0.3)
            except OSError:
                pass  # the worker hung up, as it should
            return
        bodies = self.server.bodies  # type: ignore[attr-defined]
        kind, body = bodies.get(parts.path, ("text/plain", b"not found"))
        self.send_response(200 if parts.path in bodies else 404)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


# --- the processes under test -----------------------------------------------------------
@dataclass
class Processes:
    """A worker and a stream processor on their own topics, and the hostile image server."""

    stack: RunningStack
    worker: subprocess.Popen[bytes]
    streams: subprocess.Popen[bytes]
    images: str  # http://127.0.0.2:PORT

    @property
    def settings(self):  # noqa: ANN201 - Settings
        return self.stack.settings()

    def alive(self) -> bool:
        return self.worker.poll() is None and self.streams.poll() is None

    def streams_get(self, path: str) -> bytes:
        url = f"http://127.0.0.1:{self.stack.env['VLM4REC_WEB_PORT']}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read()

    def user_count(self, user_id: str) -> int:
        from urllib.parse import quote

        try:
            return json.loads(self.streams_get(f"/users/{quote(user_id, safe='')}"))["interactions"]
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return 0
            raise

    def streams_metric(self, outcome: str) -> float:
        line = f'vlm4rec_streams_interactions_total{{outcome="{outcome}"}} '
        text = self.streams_get("/metrics").decode()
        return next((float(l.removeprefix(line)) for l in text.splitlines() if l.startswith(line)), 0.0)


SEED_ITEMS = ("sku-a", "sku-b")


@pytest.fixture(scope="module")
def processes(infra: RunningStack) -> Iterator[Processes]:
    server = ThreadingHTTPServer((ALLOWED_HOST, 0), _Images)
    server.bodies = {  # type: ignore[attr-defined]
        "/ok.png": ("image/png", png(colour=(10, 200, 10))),
        "/huge.png": ("image/png", png() + b"\0" * (MAX_IMAGE_BYTES * 3)),
        "/corrupt.png": ("image/png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 100),
        "/page.html": ("text/html", b"<html>not an image</html>"),
        "/bomb.png": ("image/png", bilevel_png(20_000, 20_000)),  # 400 M pixels in ~50 KB
    }
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uid = uuid.uuid4().hex[:8]
    stack = isolate(
        infra,
        uid,
        VLM4REC_WORKER_METRICS_PORT=str(free_port()),
        VLM4REC_IMAGE_ALLOWED_HOSTS=json.dumps([ALLOWED_HOST]),
        VLM4REC_IMAGE_MAX_BYTES=str(MAX_IMAGE_BYTES),
        VLM4REC_IMAGE_READ_TIMEOUT_S=str(READ_TIMEOUT_S),
    )
    env, settings = stack.env, stack.settings()
    logs = Path(env["VLM4REC_DATA_DIR"])

    def start(command: str) -> subprocess.Popen[bytes]:
        out = open(logs / f"bad-input-{command}-{uid}.log", "ab")  # noqa: SIM115 - lives as long as the process
        return subprocess.Popen([sys.executable, "-m", "vlm4rec", command], env=env, cwd=REPO, stdout=out, stderr=out)

    worker = start("worker")
    with EventProducer(settings.kafka_config()) as producer:  # the items the interactions use
        for item_id in SEED_ITEMS:
            producer.send(settings.topics.items_new, ItemNew(item_id=item_id, title=f"Seed {item_id}"))
    assert len(read_topic(settings.kafka_config(), settings.topics.items_embedded, 2, timeout_s=120)) >= 2
    streams = start("streams")
    running = Processes(stack, worker, streams, f"http://{ALLOWED_HOST}:{server.server_address[1]}")
    deadline = time.monotonic() + 120
    while True:
        try:
            running.streams_get("/users/__probe__")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                break
        except OSError:
            pass
        assert streams.poll() is None and time.monotonic() < deadline, "vlm4rec streams did not come up"
        time.sleep(0.3)
    yield running
    for process in (worker, streams):
        process.terminate()
    for process in (worker, streams):
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    server.shutdown()


def send_all(settings, topic: str, cases: list[tuple[bytes | None, bytes]]) -> None:  # noqa: ANN001
    with EventProducer(settings.kafka_config()) as producer:
        for value, key in cases:
            producer._producer.produce(topic, value=value, key=key)  # noqa: SLF001 - a null value too
            producer._producer.poll(0)  # noqa: SLF001


def as_json(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def check_letters(letters: list[DeadLetter], bad: dict[bytes, str], topic: str) -> None:
    """Every bad event dead-lettered once, with its original bytes and the expected reason."""
    by_original = {letter.original_bytes(): letter for letter in letters}
    assert len(by_original) == len(letters), "each bad event dead-lettered once"
    assert set(by_original) == set(bad)
    wrong = {
        original[:60]: (letter.reason, bad[original])
        for original, letter in by_original.items()
        if bad[original] not in letter.reason
    }
    assert not wrong, wrong
    assert all(letter.topic == topic for letter in letters)


# --- items.new -> the embedding worker ----------------------------------------------------
@pytest.mark.integration
def test_bad_items_are_dead_lettered_with_their_reason_and_the_worker_carries_on(processes: Processes) -> None:
    s = processes.settings
    img = processes.images
    port = img.rsplit(":", 1)[1]
    loopback_url = f"http://127.0.0.1:{port}/ok.png"
    own_name = socket.gethostname()

    def item(item_id: str, **fields: object) -> bytes:
        return as_json({"item_id": item_id, "title": f"Item {item_id}", **fields})

    good = {
        item("ok-http", image_url=f"{img}/ok.png"): "ok-http",
        item("ok-data", image_url=data_uri(png())): "ok-data",
        item("ok-no-image"): "ok-no-image",
        item("ok-rtl-\u202e\u200f\u061c-id"): "ok-rtl-\u202e\u200f\u061c-id",
        item("ok-zero-width-\u200b\u200c\u200d\ufeff"): "ok-zero-width-\u200b\u200c\u200d\ufeff",
        item("ok-emoji-😀-e\u0301", title="Robe \U0001f457 cafe\u0301 \u05e9\u05dc\u05d5\u05dd"): "ok-emoji-😀-e\u0301",
        item("ok-nul-in-title", title="red\u0000dress"): "ok-nul-in-title",
        item("ok-extra-fields", brand_new={"nested": [1, 2]}, another="x" * 100_000): "ok-extra-fields",
        item("ok-long-text", text="w" * 49_999): "ok-long-text",
        as_json({"item_id": 123456, "title": "numeric id"}): "123456",
    }
    bad = {
        b"{not json": "not valid JSON",
        b"\xff\xfe\x00garbage": "not valid UTF-8",
        b"[1, 2, 3]": "expected a JSON object",
        b"null": "expected a JSON object",
        b"": "not valid JSON",
        b"[" * 100_000: "not valid JSON",
        as_json({"item_id": "no-title"}): "title: Field required",
        as_json({"title": "no id"}): "item_id: Field required",
        as_json({"item_id": None, "title": "t"}): "item_id",
        as_json({"item_id": "", "title": "t"}): "item_id",
        as_json({"item_id": "   ", "title": "t"}): "must not be empty",
        as_json({"item_id": "nul\u0000id", "title": "t"}): "control characters",
        b'{"item_id": "lone-\\ud800", "title": "t"}': "item_id: Input should be a valid string, unable to parse raw data as a unicode string",
        b'{"item_id": "ok", "title": "lone \\udfff"}': "lone surrogate",
        as_json({"item_id": ["a"], "title": "t"}): "item_id",
        as_json({"item_id": True, "title": "t"}): "item_id",
        as_json({"item_id": "x" * (MAX_ID_CHARS + 1), "title": "t"}): "at most 256",
        as_json({"item_id": "huge-title", "title": "t" * 500_000}): "title",
        as_json({"item_id": "bad-date", "title": "t", "created_at": "yesterday"}): "created_at",
        as_json({"item_id": "ms-date", "title": "t", "created_at": 1_700_000_000_000}): "milliseconds",
        as_json({"item_id": "attrs", "title": "t", "attributes": {"k": {"deep": 1}}}): "attributes",
        # an interaction sent to items.new: another event type is just an invalid item
        as_json({"user_id": "u", "item_id": "i", "event": "click", "ts": 1}): "title: Field required",
        item("ftp", image_url="ftp://example.com/a.png"): "scheme",
        item("js", image_url="javascript:alert(1)"): "scheme",
        item("data-text", image_url="data:text/html;base64,PGh0bWw+"): "scheme",
        # images that are not what they claim, or too much
        item("corrupt-data", image_url=data_uri(b"\x89PNG\r\n\x1a\n" + b"junk" * 50)): "image: cannot decode image",
        item("corrupt-http", image_url=f"{img}/corrupt.png"): "image: cannot decode image",
        item("html-http", image_url=f"{img}/page.html"): "image: content type text/html is not an image",
        item("missing-http", image_url=f"{img}/nothing.png"): "image: image server answered HTTP 404",
        item("pixels-data", image_url=data_uri(bilevel_png(8000, 8000))): "above the 40000000 pixel limit",
        item("bomb-http", image_url=f"{img}/bomb.png"): "decompression-bomb",
        item("bytes-data", image_url=data_uri(png() + b"\0" * MAX_IMAGE_BYTES)): f"image larger than {MAX_IMAGE_BYTES} bytes",
        item("bytes-http", image_url=f"{img}/huge.png"): f"image larger than {MAX_IMAGE_BYTES} bytes",
        item("slow-http", image_url=f"{img}/slow.png"): f"took longer than {READ_TIMEOUT_S} s",
        # SSRF: every address that is not public, however it is spelled or reached
        item("ssrf-private", image_url="http://10.1.2.3/a.png"): "10.1.2.3 is a private address",
        item("ssrf-private-2", image_url="http://192.168.0.1/a.png"): "192.168.0.1 is a private address",
        item("ssrf-loopback", image_url=loopback_url): "127.0.0.1 is a loopback address",
        item("ssrf-loopback-v6", image_url=f"http://[::1]:{port}/ok.png"): "::1 is a loopback address",
        item("ssrf-mapped", image_url=f"http://[::ffff:127.0.0.1]:{port}/ok.png"): "a loopback address",
        item("ssrf-decimal", image_url=f"http://2130706433:{port}/ok.png"): "resolves to 127.0.0.1, a loopback address",
        item("ssrf-unspecified", image_url=f"http://0.0.0.0:{port}/ok.png"): "an unspecified address",
        item("ssrf-link-local", image_url="http://169.254.1.1/a.png"): "a link-local address",
        item("ssrf-link-local-v6", image_url="http://[fe80::1]/a.png"): "a link-local address",
        item("ssrf-metadata", image_url="http://169.254.169.254/latest/meta-data/"): "a cloud metadata address",
        item("ssrf-localhost", image_url=f"http://localhost:{port}/ok.png"): "localhost resolves to 127.0.0.1, a loopback address",
        item("ssrf-own-name", image_url=f"http://{own_name}:{port}/ok.png"): f"{own_name} resolves to",
        item("ssrf-redirect-loopback", image_url=f"{img}/redirect?to={loopback_url}"): "127.0.0.1 is a loopback address",
        item("ssrf-redirect-metadata", image_url=f"{img}/redirect?to=http://169.254.169.254/"): "a cloud metadata address",
        item("ssrf-redirect-localhost", image_url=f"{img}/redirect?to=http://localhost:{port}/ok.png"): "localhost resolves to 127.0.0.1",
        item("ssrf-redirect-file", image_url=f"{img}/redirect?to=file:///etc/passwd"): "redirect to unsupported scheme 'file'",
        item("file-etc", image_url="file:///etc/passwd"): "file URIs are refused",
    }
    cases: list[tuple[bytes | None, bytes]] = [(raw, b"good") for raw in good]
    cases += [(raw, b"bad") for raw in bad]
    cases.append((None, b"tombstone"))  # a null value: the letter keeps it as empty bytes
    send_all(s, s.topics.items_new, cases)

    want = len(good) + len(SEED_ITEMS)
    embedded = read_topic(s.kafka_config(), s.topics.items_embedded, want, timeout_s=180)
    letters = [decode(DeadLetter, m.value()) for m in read_topic(s.kafka_config(), s.topics.items_new_dlq, len(bad) + 1, timeout_s=120)]

    ids = sorted(decode(ItemEmbedded, m.value()).item_id for m in embedded)
    assert ids == sorted([*good.values(), *SEED_ITEMS])
    tombstones = [letter for letter in letters if letter.original_bytes() == b"" and "empty message" in letter.reason]
    assert len(tombstones) == 1
    check_letters([letter for letter in letters if letter not in tombstones], bad, s.topics.items_new)
    assert len(embedded) - len(SEED_ITEMS) + len(letters) == len(cases), "accepted + dead-lettered == input"

    # still alive, still working
    assert processes.alive()
    with EventProducer(s.kafka_config()) as producer:
        producer.send(s.topics.items_new, ItemNew(item_id="after-the-storm", title="Fine item", image_url=data_uri(png())))
    later = read_topic(s.kafka_config(), s.topics.items_embedded, want + 1, timeout_s=60)
    assert "after-the-storm" in {decode(ItemEmbedded, m.value()).item_id for m in later}
    assert processes.alive()

    # what the page shows: a stored thumbnail of the picture, the data: URI itself not copied
    store = MilvusVectorStore(s.milvus_uri, s.milvus_collection)
    try:
        meta = store.get_meta(["after-the-storm", "ok-http"])
    finally:
        store.close()
    for item_id in ("after-the-storm", "ok-http"):
        thumb = meta[item_id]["thumb"]
        assert thumb.startswith("data:image/jpeg;base64,") and len(thumb) <= STORED_THUMB_CHARS
        with Image.open(io.BytesIO(base64.b64decode(thumb.partition(",")[2]))) as picture:
            assert picture.format == "JPEG" and max(picture.size) <= 192
    assert meta["after-the-storm"]["image_url"] == "" and meta["ok-http"]["image_url"] == f"{img}/ok.png"


# --- interactions -> the stream processor -------------------------------------------------
@pytest.mark.integration
def test_bad_interactions_are_dead_lettered_with_their_reason_and_streams_carries_on(processes: Processes) -> None:
    s = processes.settings
    ts = 1_700_000_000.25

    def click(user: object, **fields: object) -> bytes:
        return as_json({"user_id": user, "item_id": "sku-a", "event": "click", "ts": ts, **fields})

    # (raw, the user it counts for)
    good = {
        click("alice"): "alice",
        click("alice", item_id="sku-b", event="  LIKE "): "alice",
        click("rtl-\u202e\u200fuser"): "rtl-\u202e\u200fuser",
        click("zero-width-\u200b\u200d\ufeffuser"): "zero-width-\u200b\u200d\ufeffuser",
        click("emoji-😀-\u05e9"): "emoji-😀-\u05e9",
        click(42): "42",
        click("teleporter", event="teleport"): "teleporter",  # event types are an open set
        click("rater", event="rating", value=4.5): "rater",
        click("extra", unknown={"deep": [1, 2, 3]}, junk="x" * 200_000): "extra",
    }
    deferred = {click("carol", item_id="never-published"): "carol"}  # waits for its item, by design
    bad = {
        b"{broken": "not valid JSON",
        b"\xff\xfe": "not valid UTF-8",
        b"[]": "expected a JSON object",
        b'"a string"': "expected a JSON object",
        b"null": "expected a JSON object",
        b"{" * 50_000: "not valid JSON",
        as_json({"user_id": "u", "item_id": "sku-a", "event": "click"}): "ts: Field required",
        as_json({"item_id": "sku-a", "event": "click", "ts": ts}): "user_id: Field required",
        as_json({"user_id": "u", "item_id": "sku-a", "ts": ts}): "event: Field required",
        click(None): "user_id",
        click(""): "user_id",
        click("   "): "must not be empty",
        click("nul\u0000user"): "control characters",
        click("new\nline"): "control characters",
        b'{"user_id": "\\udc00", "item_id": "sku-a", "event": "click", "ts": 1}': "user_id: Input should be a valid string",
        click(["list"]): "user_id",
        click({"an": "object"}): "user_id",
        click(True): "user_id",
        click("u" * (MAX_ID_CHARS + 1)): "at most 256",
        click("u-empty-item", item_id=""): "item_id",
        click("u-empty-event", event=""): "event",
        click("u-long-event", event="e" * 65): "event",
        click("u-ts-text", ts="yesterday"): "ts",
        click("u-ts-bool", ts=True): "not a boolean",
        click("u-ts-ms", ts=1_700_000_000_000): "milliseconds",
        click("u-ts-negative", ts=-5): "negative",
        b'{"user_id": "u-ts-nan", "item_id": "sku-a", "event": "click", "ts": NaN}': "finite",
        b'{"user_id": "u-ts-inf", "item_id": "sku-a", "event": "click", "ts": Infinity}': "finite",
        click("u-value-text", value="high"): "value",
        # an item sent to interactions
        as_json({"item_id": "sku-z", "title": "Red dress"}): "user_id: Field required",
    }
    cases: list[tuple[bytes | None, bytes]] = [(raw, b"good") for raw in [*good, *deferred]]
    cases += [(raw, b"bad") for raw in bad]
    cases.append((None, b"tombstone"))
    send_all(s, s.topics.interactions, cases)

    letters = [decode(DeadLetter, m.value()) for m in read_topic(s.kafka_config(), s.topics.interactions_dlq, len(bad) + 1, timeout_s=120)]
    tombstones = [letter for letter in letters if letter.original_bytes() == b"" and "empty message" in letter.reason]
    assert len(tombstones) == 1
    check_letters([letter for letter in letters if letter not in tombstones], bad, s.topics.interactions)

    expected = {user: list(good.values()).count(user) for user in good.values()}
    deadline = time.monotonic() + 60
    while (counts := {u: processes.user_count(u) for u in expected}) != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    assert counts == expected
    assert processes.user_count("carol") == 0, "an interaction on an unknown item waits, uncounted"

    outcomes = {o: processes.streams_metric(o) for o in ("applied", "deferred", "dead_letter", "duplicate")}
    assert outcomes == {"applied": len(good), "deferred": len(deferred), "dead_letter": len(bad) + 1, "duplicate": 0}
    assert sum(outcomes.values()) == len(cases), "accepted + dead-lettered == input"

    # still alive, still working
    assert processes.alive()
    with EventProducer(s.kafka_config()) as producer:
        producer.send(s.topics.interactions, Interaction(user_id="zoe", item_id="sku-b", event="click", ts=ts))
    deadline = time.monotonic() + 60
    while processes.user_count("zoe") != 1:
        assert time.monotonic() < deadline, "a good event after the bad ones was not processed"
        time.sleep(0.5)
    assert processes.alive()


# --- the event contract, property-based (no stack) ----------------------------------------
ids = st.text(min_size=1, max_size=MAX_ID_CHARS)  # no surrogates: those come escaped, below
json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)
CLICK = {"user_id": "u1", "item_id": "sku-1", "event": "click", "ts": 1_700_000_000.5}
ITEM = {"item_id": "sku-1", "title": "Red dress", "image_url": "https://example.com/a.jpg"}


def _is_control(ch: str) -> bool:
    return ord(ch) < 0x20 or ord(ch) == 0x7F


@settings(max_examples=300, deadline=None)
@given(ids)
def test_an_id_is_kept_as_sent_but_for_outer_whitespace_or_refused(user_id: str) -> None:
    """Never silently altered into another id: a NUL, say, is refused rather than dropped
    (dropping it would merge "a\\x00b" into "ab")."""
    payload = as_json({**CLICK, "user_id": user_id})
    try:
        event = decode(Interaction, payload)
    except EventError as exc:
        assert exc.reason.startswith("user_id")
        stripped = user_id.strip()
        assert not stripped or "\x00" in user_id or any(_is_control(ch) for ch in stripped)
    else:
        assert event.user_id == user_id.strip()
        assert "\x00" not in user_id and not any(_is_control(ch) for ch in event.user_id)
        assert event_key(event) == event.user_id.encode("utf-8")


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(CLICK)), json_values)
def test_a_bad_field_is_named_in_the_reason(field: str, value: object) -> None:
    """Replace one field of a valid interaction by any JSON value: either it is still valid,
    or the reason starts with that field's name (what a producer needs to fix)."""
    try:
        event = decode(Interaction, as_json({**CLICK, field: value}))
    except EventError as exc:
        assert exc.reason.startswith(field), exc.reason
    else:
        assert decode(Interaction, encode(event)) == event


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["item_id", "title", "text", "image_url", "category", "created_at", "attributes"]), json_values)
def test_a_bad_item_field_is_named_in_the_reason(field: str, value: object) -> None:
    try:
        item = decode(ItemNew, as_json({**ITEM, field: value}))
    except EventError as exc:
        assert exc.reason.startswith(field), exc.reason
    else:
        assert decode(ItemNew, encode(item)) == item


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=8), st.integers(0xD800, 0xDFFF), st.sampled_from(["user_id", "item_id", "event"]))
def test_an_escaped_lone_surrogate_is_refused_wherever_it_is(prefix: str, surrogate: int, field: str) -> None:
    """JSON may spell a lone surrogate (\\ud800) that no UTF-8 encoder can write back."""
    body = json.dumps({**CLICK, field: prefix + "@@"}).replace("@@", f"\\u{surrogate:04x}")
    with pytest.raises(EventError) as info:
        decode(Interaction, body.encode())
    assert info.value.reason.startswith(field)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=2000))
def test_titles_keep_every_character_but_nul(title: str) -> None:
    item = decode(ItemNew, as_json({**ITEM, "title": title}))
    assert item.title == title.replace("\x00", "")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.none(), st.binary(max_size=64) | st.none())
def test_a_dead_letter_keeps_any_original_bytes_and_key(value: bytes | None, key: bytes | None) -> None:
    letter = decode(DeadLetter, encode(DeadLetter.of(value, key, "items.new", 1, 7, "reason")))
    assert letter.original_bytes() == (value or b"")
    assert event_key(letter) == key


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=200))
def test_compressed_or_binary_payloads_are_refused_not_crashing(noise: bytes) -> None:
    """What a producer with the wrong serializer sends (zlib, protobuf-like bytes)."""
    for payload in (zlib.compress(noise), b"\x00\x01" + noise):
        for model in (ItemNew, Interaction):
            with pytest.raises(EventError):
                decode(model, payload)
