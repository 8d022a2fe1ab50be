"""The stream processor (`vlm4rec streams`, real Faust) against the real broker and Milvus.

Item vectors are written by the test itself (hand-made 4-d directions), so every expected
recommendation can be worked out by hand."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest

from conftest import REPO, RunningStack, free_port, read_topic
from streams.profile import mean_profile
from topics import DeadLetter, Interaction, ItemEmbedded, Recs, decode
from topics.producer import EventProducer
from vectorstore import MilvusVectorStore, VectorRecord

pytestmark = pytest.mark.integration

DIM = 4
MODEL, STRATEGY = "test/handmade", "describe"


def unit(v: list[float]) -> np.ndarray:
    a = np.asarray(v, dtype=np.float32)
    return a / np.linalg.norm(a)


# four "styles" (axes); items are near one axis each
ITEMS = {
    "red-1": unit([1, 0.10, 0, 0]), "red-2": unit([1, 0.05, 0.05, 0]), "red-3": unit([1, 0, 0.12, 0]),
    "blue-1": unit([0, 1, 0.10, 0]), "blue-2": unit([0.05, 1, 0, 0]), "blue-3": unit([0, 1, 0, 0.15]),
    "green-1": unit([0, 0, 1, 0.1]), "green-2": unit([0.1, 0, 1, 0]),
}


class Streams:
    def __init__(self, stack: RunningStack) -> None:
        self.stack = stack
        self.settings = stack.settings()
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.settings.web_port}"

    def start(self) -> None:
        log = open(self.settings.data_dir / f"streams-{self.settings.streams_app_id}.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vlm4rec", "streams"], env=self.stack.env, cwd=REPO, stdout=log, stderr=log
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                self.get("/users/__probe__")
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return
            except OSError:
                pass
            assert self.process.poll() is None, "vlm4rec streams exited"
            time.sleep(0.3)
        raise AssertionError("streams web server did not come up")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def wait_user(self, user_id: str, count: int, timeout_s: float = 60) -> dict:
        deadline = time.monotonic() + timeout_s
        last: dict = {}
        while time.monotonic() < deadline:
            try:
                last = self.get(f"/users/{user_id}")
                if last["interactions"] >= count:
                    return last
            except (urllib.error.HTTPError, OSError):
                pass
            time.sleep(0.3)
        raise AssertionError(f"user {user_id} did not reach {count} interactions: {last}")


@pytest.fixture
def streams(isolated: RunningStack) -> Iterator[Streams]:
    settings = isolated.settings()
    items = MilvusVectorStore(settings.milvus_uri, settings.milvus_collection)
    items.open(DIM, MODEL, STRATEGY)
    items.upsert([VectorRecord(i, v) for i, v in ITEMS.items()])
    running = Streams(isolated)
    running.start()
    yield running
    running.stop()
    items.close()


def send(settings, events: list) -> None:  # noqa: ANN001
    with EventProducer(settings.kafka_config()) as producer:
        for topic, event in events:
            if isinstance(event, bytes):
                producer.send_raw(topic, event, b"k")
            else:
                producer.send(topic, event)


def recs_for(settings, user_id: str, want: int, trigger: str | None = None, timeout_s: float = 60) -> list[Recs]:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        messages = read_topic(settings.kafka_config(), settings.topics.recs, 10_000, timeout_s=1.5)
        found = [decode(Recs, m.value()) for m in messages]
        found = [r for r in found if r.user_id == user_id and (trigger is None or r.trigger == trigger)]
        if len(found) >= want:
            return found
    raise AssertionError(f"no {trigger or ''} recs for {user_id}")


def click(user: str, item: str, ts: float = 1_700_000_000.0, event: str = "click") -> Interaction:
    return Interaction(user_id=user, item_id=item, event=event, ts=ts)


def test_profiles_recs_seen_filtering_http_and_dead_letters(streams: Streams) -> None:
    s = streams.settings
    assert (s.data_dir / "streams" / s.streams_app_id).is_dir(), "Faust's folder lives in the data dir"
    assert not (REPO / f"{s.streams_app_id}-data").exists(), "nothing written where the command was started"
    t = s.topics.interactions
    send(s, [(t, click("alice", "red-1")), (t, click("alice", "red-2")), (t, click("bob", "blue-1")),
             (t, b"{broken json"), (t, b'{"user_id": "x", "item_id": "y", "event": "click", "ts": 1700000000000}')])
    alice = streams.wait_user("alice", 2)
    assert [h["item_id"] for h in alice["recent"]] == ["red-2", "red-1"]
    pushed = recs_for(s, "alice", 1, "interaction")[-1]
    ids = [r.item_id for r in pushed.items]
    assert ids[0] == "red-3", "nearest unseen item to a red profile"
    assert "red-1" not in ids and "red-2" not in ids, "seen items are excluded"
    assert [r.item_id for r in recs_for(s, "bob", 1)[-1].items][:2] == ["blue-2", "blue-3"]

    api = streams.get("/users/alice/recommendations?k=2")
    assert [i["item_id"] for i in api["items"]] == ids[:2] and api["trigger"] == "request"
    for path, code in [("/users/nobody", 404), ("/users/nobody/recommendations", 404),
                       ("/users/alice/recommendations?k=0", 400), ("/users/alice/recommendations?k=abc", 400)]:
        with pytest.raises(urllib.error.HTTPError) as info:
            streams.get(path)
        assert info.value.code == code, path

    letters = [decode(DeadLetter, m.value()) for m in read_topic(s.kafka_config(), s.topics.interactions_dlq, 2, 30)]
    assert sorted(l.original_bytes()[:5] for l in letters) == [b'{"use', b"{brok"]
    assert any("milliseconds" in l.reason for l in letters)
    metrics = urllib.request.urlopen(streams.url + "/metrics", timeout=10).read().decode()
    assert 'vlm4rec_streams_recs_pushed_total{trigger="interaction"}' in metrics
    assert "vlm4rec_streams_interaction_to_recs_seconds_count" in metrics
    for point in ("taken", "applied", "ranking", "ranked"):  # each hop of the path is timed
        count = re.search(rf'vlm4rec_streams_interaction_path_seconds_count{{point="{point}"}} (\S+)', metrics)
        assert count and float(count.group(1)) > 0, point


def test_interaction_before_its_item_is_held_then_applied(streams: Streams) -> None:
    s = streams.settings
    t = s.topics.interactions
    send(s, [(t, click("carol", "green-1")), (t, click("carol", "late-item")), (t, click("carol", "green-2"))])
    carol = streams.wait_user("carol", 2)  # green-2, a marker behind late-item on carol's partition
    assert carol["interactions"] == 2, "late-item is not applied before it is embedded"
    assert "late-item" not in {h["item_id"] for h in carol["recent"]}
    items = MilvusVectorStore(s.milvus_uri, s.milvus_collection)
    items.upsert([VectorRecord("late-item", unit([0, 0, 1, 0]))])
    send(s, [(s.topics.items_embedded, ItemEmbedded(item_id="late-item", model=MODEL, dim=DIM, embedded_at=time.time()))])
    carol = streams.wait_user("carol", 3)
    assert {h["item_id"] for h in carol["recent"]} == {"green-1", "green-2", "late-item"}
    items.close()


def test_fresh_item_fans_out_to_nearest_users(streams: Streams) -> None:
    s = streams.settings
    t = s.topics.interactions
    send(s, [(t, click("dana", "red-1")), (t, click("dana", "red-3")), (t, click("erin", "blue-1")), (t, click("erin", "blue-2"))])
    streams.wait_user("dana", 2)
    streams.wait_user("erin", 2)
    recs_for(s, "erin", 1, "interaction")
    items = MilvusVectorStore(s.milvus_uri, s.milvus_collection)
    items.upsert([VectorRecord("new-red", mean_profile([ITEMS["red-1"], ITEMS["red-3"]]))])  # dana's taste
    send(s, [(s.topics.items_embedded, ItemEmbedded(item_id="new-red", model=MODEL, dim=DIM, embedded_at=time.time(), published_at=time.time()))])
    fresh = recs_for(s, "dana", 1, "fresh_item")[-1]
    assert fresh.items[0].item_id == "new-red"
    for r in read_topic(s.kafka_config(), s.topics.recs, 10_000, timeout_s=2):
        recs = decode(Recs, r.value())
        if recs.trigger == "fresh_item" and recs.user_id == "erin":
            assert recs.items[0].item_id != "new-red"  # pushed as one of many, not as the best
    items.close()


def test_restarted_worker_recovers_profiles_and_counts_each_event_once(streams: Streams) -> None:
    s = streams.settings
    t = s.topics.interactions
    send(s, [(t, click("frank", f"{c}-{n}", ts=1_700_000_000.0 + n)) for c in ("red", "blue") for n in (1, 2, 3)])
    streams.wait_user("frank", 6)
    streams.stop(signal.SIGKILL)  # no clean shutdown: offsets may be behind the table
    streams.start()
    assert streams.wait_user("frank", 6)["interactions"] == 6
    send(s, [(t, click("frank", "green-1")), (t, click("frank", "green-2"))])
    # green-2 comes after every re-delivered event on frank's partition: when it is in, they are
    assert streams.wait_user("frank", 8)["interactions"] == 8, "re-delivered events must not count twice"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_worker_stopped_mid_burst_loses_nothing(streams: Streams, sig: int) -> None:
    s = streams.settings
    t = s.topics.interactions
    send(s, [(t, click(f"burst-{u}", item, ts=1_700_000_000.0 + n)) for u in range(40) for n, item in enumerate(ITEMS)])
    streams.stop(sig)
    streams.start()
    for u in range(40):
        assert streams.wait_user(f"burst-{u}", len(ITEMS), timeout_s=30)["interactions"] == len(ITEMS)


def ranker_interactions(running: Streams) -> float:
    with urllib.request.urlopen(running.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    found = [line.split()[-1] for line in text.splitlines() if line.startswith("vlm4rec_streams_ranker_interactions_total ")]
    return float(found[0]) if found else 0.0


def test_two_processors_each_learn_from_every_interaction(isolated: RunningStack) -> None:
    """Shared learning (on by default; `streams.observations`): each of two stream processors
    owns some users, and each one's ranker folds in every interaction, not only its own
    users' (without it, the two counts add up to the total instead). And the HTTP API answers
    for every user on either processor (`faust_fixes.SourceKeyRouter`)."""
    settings = isolated.settings()
    items = MilvusVectorStore(settings.milvus_uri, settings.milvus_collection)
    items.open(DIM, MODEL, STRATEGY)
    items.upsert([VectorRecord(i, v) for i, v in ITEMS.items()])
    other = RunningStack({**isolated.env, "VLM4REC_WEB_PORT": str(free_port())}, isolated.process, isolated.log_path)
    processors = [Streams(isolated), Streams(other)]
    try:
        for running in processors:
            running.start()
        users = [f"shared-{n}" for n in range(16)]
        send(settings, [(settings.topics.interactions, click(u, item)) for u in users for item in ("red-1", "blue-2")])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and min(map(ranker_interactions, processors)) < 2 * len(users):
            time.sleep(0.5)
        assert [ranker_interactions(p) for p in processors] == [2 * len(users)] * 2
        # and either processor answers for any user (a request reaches the one that holds it)
        assert {p.get(f"/users/{u}")["interactions"] for p in processors for u in users} == {2}
    finally:
        for running in processors:
            running.stop()
        items.close()


def test_a_stream_processor_stops_when_its_broker_is_gone(isolated: RunningStack, tmp_path) -> None:  # noqa: ANN001
    """A stream processor told to stop after its broker died kept "stopping" for minutes (seen
    when a killed `vlm4rec soak` took its whole stack down at once): Faust's producer and
    consumer wait for the broker. With `VLM4REC_STREAMS_STOP_TIMEOUT_S` it leaves at the
    deadline (`streams.faust_fixes.DeadlineWorker`), and what it applied is read again later."""
    from streams.faust_fixes import STOP_DEADLINE_EXIT
    from vlm4rec.localstack import LocalStack, own_broker_service

    port = free_port()
    broker = LocalStack([own_broker_service("127.0.0.1", port, 2)], tmp_path / "logs")
    broker.start()
    env = {**isolated.env, "VLM4REC_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}", "VLM4REC_STREAMS_STOP_TIMEOUT_S": "5"}
    alone = RunningStack(env, isolated.process, isolated.log_path)
    settings = alone.settings()
    items = MilvusVectorStore(settings.milvus_uri, settings.milvus_collection)
    items.open(DIM, MODEL, STRATEGY)
    items.upsert([VectorRecord(i, v) for i, v in ITEMS.items()])
    running = Streams(alone)
    try:
        running.start()
        send(settings, [(settings.topics.interactions, click("orphan", item)) for item in ("red-1", "blue-2")])
        running.wait_user("orphan", 2)
        broker.stop()
        assert running.process is not None
        running.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = running.process.wait(60)
        assert time.monotonic() - started < 5 + 15, "left at its deadline (or before), not minutes later"
        assert code in (0, STOP_DEADLINE_EXIT)
    finally:
        running.stop(signal.SIGKILL)
        broker.stop()
        items.close()
