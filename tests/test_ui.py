"""The live feed page: escaping and rendering helpers, the views in-process, and the whole page
in a real headless Chromium against the real broker, Milvus and `vlm4rec streams`.

Producer text is hostile here on purpose: one item's title and another item's id are XSS
payloads that set `window.__xss` if they ever run."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image, ImageDraw

from images.loader import ImageLimits, ImageLoader
from images.thumbnails import stored_thumbnail
from streams.profile import Profile
from streams.shown import Shown
from streams.web import (
    CSP,
    EventRate,
    FeedPage,
    etag_matches,
    image_etag,
    register_ui,
    shell,
    user_link,
    user_snapshot,
)
from topics import Interaction, TopicNames
from vectorstore import MemoryVectorStore, MilvusVectorStore, VectorRecord
from vlm4rec.harness.simulated import COLOURS

XSS_TITLE = '<img src=x onerror="window.__xss=1">'
XSS_ID = '"><script>window.__xss=2</script>'
XSS_USER = "<img src=x onerror=window.__xss=3>"


def unit(v: list[float]) -> np.ndarray:
    a = np.asarray(v, dtype=np.float32)
    return a / np.linalg.norm(a)


# hand-made 4-d directions (as in test_streams), a colour for each item's picture
ITEMS: dict[str, tuple[np.ndarray, str, tuple[int, int, int]]] = {
    "red-1": (unit([1, 0.10, 0, 0]), "Red dress", (200, 40, 40)),
    "red-2": (unit([1, 0.05, 0.05, 0]), "Red coat", (170, 30, 30)),
    "red-3": (unit([1, 0, 0.12, 0]), "Red scarf", (230, 80, 80)),
    XSS_ID: (unit([1, 0.02, 0.02, 0.02]), XSS_TITLE, (120, 20, 60)),
    "blue-1": (unit([0, 1, 0.10, 0]), "Blue jeans", (40, 60, 200)),
    "blue-2": (unit([0.05, 1, 0, 0]), "Blue shirt", (60, 90, 220)),
    "blue-3": (unit([0, 1, 0, 0.15]), "Blue cap", (30, 40, 150)),
    "green-1": (unit([0, 0, 1, 0.1]), "Green boots", (40, 160, 60)),
}


def make_images(root: Path) -> dict[str, str]:
    """A small PNG per item (a coloured card with a white disc), as file:// URIs under root."""
    root.mkdir(parents=True, exist_ok=True)
    uris = {}
    for n, (item_id, (_, _, colour)) in enumerate(ITEMS.items()):
        image = Image.new("RGB", (120, 160), colour)
        ImageDraw.Draw(image).ellipse((30, 50, 90, 110), fill=(255, 255, 255))
        path = root / f"item-{n}.png"
        image.save(path)
        uris[item_id] = path.as_uri()
    return uris


def records(uris: dict[str, str]) -> list[VectorRecord]:
    return [
        VectorRecord(i, v, meta={"title": title, "image_url": uris.get(i, ""), "category": "test"})
        for i, (v, title, _) in ITEMS.items()
    ]


# --- helpers ----------------------------------------------------------------------------------
def test_shell_escapes_every_value() -> None:
    page = shell("user", f"User {XSS_USER}", f"User {XSS_ID}", "<p>trusted</p>", XSS_ID)
    assert "<script>window" not in page and "<img src=x" not in page
    assert 'data-id="&quot;&gt;&lt;script&gt;window.__xss=2&lt;/script&gt;"' in page
    assert page.count("<script") == 1 and '<script src="/ui/app.js" defer></script>' in page
    assert "<p>trusted</p>" in page


def test_user_link_encodes_the_whole_id() -> None:
    assert user_link("a/b?c#d") == "/ui/users/a%2Fb%3Fc%23d"
    assert user_link(XSS_ID) == "/ui/users/%22%3E%3Cscript%3Ewindow.__xss%3D2%3C%2Fscript%3E"


def test_etag_follows_address_and_size() -> None:
    tag = image_etag("file:///a.png", 256)
    assert tag.startswith('"') and tag != image_etag("file:///a.png", 128) != image_etag("file:///b.png", 256)
    assert etag_matches(f'W/"x", {tag}', tag) and not etag_matches('"x"', tag)


def test_event_rate_over_a_window() -> None:
    rate = EventRate(window_s=10)
    assert rate.update(100, now=0.0) is None
    assert rate.update(120, now=2.0) == 10.0
    assert rate.update(200, now=10.0) == 10.0
    assert rate.update(200, now=30.0) == 0.0  # over the last 20 s: older samples were dropped


def test_user_snapshot_newest_first_with_titles_and_reasons() -> None:
    profile = Profile("u", count=2, history=[("a", "click", 1.0), ("b", "like", 2.0)])
    recs = Shown((("c", 0.91234),), "fresh_item", 5.0, "")
    meta = {"b": {"title": XSS_TITLE, "image_url": "file:///b.png"}, "c": {"title": "C"}}
    data = user_snapshot(profile, recs, meta, "2:5.0")
    assert [c["item_id"] for c in data["recent"]] == ["b", "a"]
    assert data["recent"][0]["title"] == XSS_TITLE, "raw in JSON: the page sets it as text"
    assert data["recent"][0]["has_image"] and not data["recent"][1]["has_image"]
    assert data["recs"] == {
        "trigger": "fresh_item",
        "generated_at": 5.0,
        "items": [{"item_id": "c", "title": "C", "category": "", "has_image": False, "score": 0.9123}],
    }


def test_demo_compresses_event_time_and_stops_on_request() -> None:
    import threading

    from vlm4rec.harness.demo import StoppableSender, Stopped, most_active_user, replay_speed
    from vlm4rec.evaluation.replay import Scheduled

    rows = [Interaction(user_id=u, item_id="i", event="click", ts=ts) for u, ts in (("a", 1e9), ("b", 1e9 + 50), ("b", 1e9 + 100))]
    assert replay_speed([Scheduled(r.ts, r) for r in rows], duration_s=10) == 10.0, "100 s of event time in 10 s"
    assert replay_speed([Scheduled(1e9, rows[0])], duration_s=10) is None
    assert most_active_user(rows) == "b" and most_active_user([]) is None

    class Recorder:
        def __init__(self) -> None:
            self.sent: list[str] = []

        def send(self, topic: str, event: Any) -> None:
            self.sent.append(topic)

        def flush(self, timeout_s: float = 30.0) -> None:
            pass

    stop, recorder = threading.Event(), Recorder()
    sender = StoppableSender(recorder, stop)
    sender.send("interactions", rows[0])
    stop.set()
    with pytest.raises(Stopped):
        sender.send("interactions", rows[1])
    assert recorder.sent == ["interactions"]


# --- the views, in-process (Faust's web app on aiohttp's test server, no broker) ----------------
@pytest.fixture
def ui(tmp_path: Path) -> Callable[[Callable[[Any, FeedPage], Awaitable[None]]], None]:
    """Runs a coroutine against the page's routes served from an unstarted StreamsApp."""
    from aiohttp.test_utils import TestClient, TestServer

    from streams.app import StreamsApp, StreamsConfig

    items = MemoryVectorStore()
    items.open(4, "test/handmade", "describe")
    uris = make_images(tmp_path / "images")
    uris["red-2"] = (tmp_path / "elsewhere.png").as_uri()  # outside the file roots: refused
    stored = records(uris)
    # as the worker keeps a picture it read from a data: URI: a thumbnail, no address
    thumb = stored_thumbnail(Image.new("RGB", (300, 200), (40, 160, 60)))
    stored[-1] = dataclasses.replace(stored[-1], meta={**stored[-1].meta, "image_url": "", "thumb": thumb})
    items.upsert(stored)
    service = StreamsApp(StreamsConfig(topics=TopicNames()), items)
    page = register_ui(service, ImageLoader(ImageLimits(file_roots=(tmp_path / "images",))))
    service.app.web.init_server()

    def run(check: Callable[[Any, FeedPage], Awaitable[None]]) -> None:
        async def main() -> None:
            async with TestClient(TestServer(service.app.web.web_app)) as client:
                await check(client, page)

        asyncio.run(main())

    return run


def test_pages_carry_a_strict_policy_and_escape_ids(ui: Any) -> None:
    async def check(client: Any, page: FeedPage) -> None:
        index = await client.get("/")
        assert index.status == 200 and 'id="users"' in await index.text()
        for response in (index, await client.get("/ui/app.js"), await client.get("/ui/api/status")):
            assert response.headers["Content-Security-Policy"] == CSP
            assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP
        script = await client.get("/ui/app.js")
        assert script.content_type == "text/javascript"
        assert not re.search(r"\.(inner|outer)HTML|insertAdjacentHTML|document\.write", await script.text()), "DOM from text only"
        user = await (await client.get("/ui/users/" + quote(XSS_ID, safe=""))).text()
        assert "<script>window" not in user and "&lt;script&gt;" in user
        found = await client.get("/ui/find", params={"user": "a/b"}, allow_redirects=False)
        assert found.status == 303 and found.headers["Location"] == "/ui/users/a%2Fb"

    ui(check)


def test_thumbnails_are_served_cached_and_refused_outside_the_roots(ui: Any) -> None:
    async def check(client: Any, page: FeedPage) -> None:
        path = "/ui/images/" + quote(XSS_ID, safe="")
        response = await client.get(path, params={"size": "128"})
        assert response.status == 200 and response.content_type == "image/jpeg"
        assert response.headers["Cache-Control"].startswith("public") and response.headers["ETag"]
        with Image.open(io.BytesIO(await response.read())) as image:
            assert max(image.size) == 128
        again = await client.get(path, params={"size": "128"}, headers={"If-None-Match": response.headers["ETag"]})
        assert again.status == 304
        assert (await client.get(path, params={"size": "999"})).status == 400
        refused = await client.get("/ui/images/red-2")
        assert refused.status == 404 and "elsewhere" not in await refused.text(), "no server paths shown"
        assert (await client.get("/ui/images/nothing")).status == 404
        kept = await client.get("/ui/images/green-1", params={"size": "512"})
        assert kept.status == 200, "the stored thumbnail, whatever the picture's address was"
        with Image.open(io.BytesIO(await kept.read())) as image:
            assert image.format == "JPEG" and image.size == (192, 128)

    ui(check)


def test_item_api_lists_nearest_items_and_status_counts_them(ui: Any) -> None:
    async def check(client: Any, page: FeedPage) -> None:
        item = await (await client.get("/ui/api/items/red-1")).json()
        assert item["title"] == "Red dress" and item["has_image"]
        assert [n["item_id"] for n in item["nearest"][:3]] == ["red-2", XSS_ID, "red-3"]
        assert (await client.get("/ui/api/items/nothing")).status == 404
        status = await (await client.get("/ui/api/status")).json()
        assert status["items_indexed"] == len(ITEMS) and status["lag"] is None

    ui(check)


def test_user_data_and_recent_users(ui: Any) -> None:
    async def check(client: Any, page: FeedPage) -> None:
        service = page.service
        profile = Profile("alice")
        for item_id in ("red-1", "red-2"):
            profile.apply(item_id, ITEMS[item_id][0], "click", None, 1.0, service.config.rule)
        service.profiles = {"alice": profile.to_dict()}  # a plain mapping stands in for the table
        data, status = await page.user_data("alice", "")
        assert status == 200 and data["recs"]["trigger"] == "request"
        assert [c["item_id"] for c in data["recent"]] == ["red-2", "red-1"]
        assert data["recs"]["items"][0]["item_id"] == XSS_ID, "nearest unseen item to a red profile"
        assert await page.user_data("alice", data["version"]) == ({"unchanged": True, "version": data["version"]}, 200)
        assert (await page.user_data("nobody", ""))[1] == 404
        service.last_recs["alice"] = Shown((), "interaction", 9.0, "")
        service.last_recs[XSS_USER] = Shown((), "fresh_item", 10.0, "")
        listed = await (await client.get("/ui/api/users")).json()
        assert [u["user_id"] for u in listed["users"]] == [XSS_USER, "alice"], "most recent first"
        assert [u["user_id"] for u in (await (await client.get("/ui/api/users?q=ALI")).json())["users"]] == ["alice"]

    ui(check)


# --- the page in a real browser ---------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver  # a dev dependency: no guard

    driver_path = shutil.which("chromedriver")
    if not os.path.exists(CHROMIUM) or driver_path is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1280,1400", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(what: str, probe: Callable[[], Any], timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


CARDS_JS = """
return [...document.querySelectorAll(arguments[0] + ' .card')].map(c => {
  const img = c.querySelector('img');
  return {id: c.dataset.itemId, title: c.querySelector('.title').textContent, href: c.getAttribute('href'),
          meta: [...c.querySelectorAll('.meta')].map(m => m.textContent),
          loaded: !!img && img.complete && img.naturalWidth > 0};
});
"""


def no_xss(driver: Any) -> None:
    assert driver.execute_script("return window.__xss") is None, "a payload ran"
    assert driver.execute_script("return document.querySelectorAll('main script, main img[src=x]').length") == 0


@pytest.mark.integration
def test_live_page_in_chromium(browser: Any, isolated: Any, tmp_path: Path) -> None:
    from conftest import RunningStack
    from test_streams import Streams, click, send

    images = tmp_path / "images"
    env = {**isolated.env, "VLM4REC_IMAGE_FILE_ROOTS": json.dumps([str(images)])}
    stack = RunningStack(env, isolated.process, isolated.log_path)
    settings = stack.settings()
    items = MilvusVectorStore(settings.milvus_uri, settings.milvus_collection)
    items.open(4, "test/handmade", "describe")
    items.upsert(records(make_images(images)))
    streams = Streams(stack)
    streams.start()
    try:
        t = settings.topics.interactions
        send(settings, [(t, click("alice", "red-1")), (t, click("alice", "red-2")), (t, click(XSS_USER, "blue-1"))])
        streams.wait_user("alice", 2)
        with urllib.request.urlopen(streams.url + "/", timeout=10) as response:
            assert response.headers["Content-Security-Policy"] == CSP

        browser.get(streams.url + "/")
        links = wait_for("both users listed", lambda: len(found := browser.execute_script(
            "return [...document.querySelectorAll('#users a')].map(a => [a.textContent, a.getAttribute('href')])")) == 2 and found)
        assert sorted(links) == sorted([["alice", "/ui/users/alice"], [XSS_USER, user_link(XSS_USER)]])
        wait_for("the status strip", lambda: browser.find_element("id", "st-items").text == str(len(ITEMS)))
        no_xss(browser)

        browser.get(streams.url + user_link("alice"))
        recs = wait_for("recommendation cards with their pictures", lambda: (
            (cards := browser.execute_script(CARDS_JS, "#recs")) and all(c["loaded"] for c in cards) and cards))
        assert recs[0]["id"] == XSS_ID and recs[0]["title"] == XSS_TITLE, "the payload shows as text"
        assert recs[0]["href"] == "/ui/items/" + quote(XSS_ID, safe="")
        assert recs[0]["meta"][1] == "why: after an interaction" and recs[0]["meta"][0].startswith("score 0.9")
        history = browser.execute_script(CARDS_JS, "#history")
        assert [c["id"] for c in history] == ["red-2", "red-1"] and all(c["loaded"] for c in history)
        no_xss(browser)

        send(settings, [(t, click("alice", "blue-2", ts=1_700_000_100.0)), (t, click("alice", "blue-3", ts=1_700_000_101.0))])
        after = wait_for("the recommendations to change", lambda: (
            (cards := browser.execute_script(CARDS_JS, "#recs")) and "blue-2" not in [c["id"] for c in cards] and cards))
        assert [c["id"] for c in after] != [c["id"] for c in recs]
        assert after[0]["id"] == "blue-1", "two red and two blue items seen: blue-1 is now nearest"
        assert browser.execute_script(CARDS_JS, "#history")[0]["id"] == "blue-3"
        wait_for("pictures of the new list", lambda: all(c["loaded"] for c in browser.execute_script(CARDS_JS, "#recs")))
        screenshot = tmp_path / "live-feed.png"
        browser.save_screenshot(str(screenshot))
        print(f"screenshot: {screenshot}")
        no_xss(browser)

        browser.get(streams.url + "/ui/items/" + quote(XSS_ID, safe=""))
        nearest = wait_for("nearest items", lambda: browser.execute_script(CARDS_JS, "#nearest"))
        assert {c["id"] for c in nearest[:2]} == {"red-1", "red-2"}
        assert browser.find_element("id", "title").text == XSS_TITLE
        assert browser.find_element("tag name", "h1").text == f"Item {XSS_ID}"
        browser.save_screenshot(str(tmp_path / "item.png"))
        no_xss(browser)
    finally:
        streams.stop()
        items.close()


@pytest.mark.integration
def test_demo_without_data_in_chromium(browser: Any, tmp_path: Path) -> None:
    """`vlm4rec demo` with no folder, as in a fresh clone: drawn pictures (published as data:
    URIs, shown from the worker's stored thumbnails) and a feed that changes as the simulated
    user acts, towards what they like."""
    import subprocess
    import sys

    from conftest import REPO, stack_env

    env = stack_env(tmp_path / "demo")
    log_path = tmp_path / "demo.out"
    with open(log_path, "w") as out:
        demo = subprocess.Popen([sys.executable, "-m", "vlm4rec", "demo", "--limit-users", "3"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        page = wait_for("the demo to print ana's page", lambda: (
            (m := re.search(r"ana, who likes red things: (\S+)", log_path.read_text())) and m.group(1)), timeout_s=180)
        assert demo.poll() is None, log_path.read_text()
        browser.get(page)
        first = wait_for("ana's recommendations with their pictures", lambda: (
            (cards := browser.execute_script(CARDS_JS, "#recs")) and all(c["loaded"] for c in cards) and cards), timeout_s=120)
        wait_for("the history with pictures", lambda: (
            (cards := browser.execute_script(CARDS_JS, "#history")) and all(c["loaded"] for c in cards)))
        later = wait_for("the recommendations to change as ana acts", lambda: (
            (cards := browser.execute_script(CARDS_JS, "#recs")) and [c["id"] for c in cards] != [c["id"] for c in first]
            and all(c["loaded"] for c in cards) and cards), timeout_s=60)
        browser.save_screenshot(str(tmp_path / "demo.png"))
        history = browser.execute_script(CARDS_JS, "#history")
        assert any(c["title"].startswith("Red ") for c in history), "ana acts on red things"
        assert all(c["loaded"] for c in later)
        # the feeds follow taste: the demo's own report, over its three users
        report = wait_for("a report on every feed", lambda: (
            (m := re.findall(r"likes: ana (\d+)%, ben (\d+)%, chloe (\d+)%", log_path.read_text())) and m[-1]), timeout_s=60)
        liked = sum(int(share) for share in report) / 300
        chance = (1 / len(COLOURS) + 1 / len(COLOURS) + 1 / 4) / 3  # red, blue, stars
        assert liked > 2 * chance, f"feeds follow taste: {report} (chance {chance:.0%})"
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(60)
        except subprocess.TimeoutExpired:
            demo.kill()
    assert "stopped." in log_path.read_text()
