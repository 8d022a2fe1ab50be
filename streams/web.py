"""The live feed page: a user's history and recommendations as pictures, served by the stream
processor's own web server (the Faust app), beside the JSON API.

Routes (all GET, read-only):
- `/`, `/ui/users/{user_id}`, `/ui/items/{item_id}`: HTML shells; `/ui/app.js` and
  `/ui/app.css` fill them from the JSON below and poll it, so a new push shows within ~1.5 s.
- `/ui/api/users` (recently pushed users of this worker), `/ui/api/users/{user_id}` (routed
  to the worker that owns the user's partition, whose `last_recs` holds the latest push),
  `/ui/api/items/{item_id}` (an item and its nearest items), `/ui/api/status` (events/s, lag,
  items indexed).
- `/ui/images/{item_id}?size=N`: the item's picture as a JPEG thumbnail.

Titles and ids come from producers and are untrusted. The shells escape every value they hold
(`html.escape`), the script builds the DOM with `textContent` and percent-encodes ids in URLs,
and a strict Content-Security-Policy (scripts only from this origin, no inline script) stops
anything that would slip through from running. Pictures come from the thumbnail the worker
stored with the item (`images.thumbnails`), so the page needs no access to where the worker read
them; items stored without one are fetched by the server with the same `ImageLoader` rules as
the embedding workers (no SSRF, byte and pixel limits, file:// only under the configured roots).
Nothing is hot-linked: the browser talks to this origin only.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import logging
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote


from streams import metrics
from streams.profile import Profile
from streams.shown import Shown
from images.loader import ImageError, ImageLoader
from images.thumbnails import jpeg_thumbnail

if TYPE_CHECKING:
    from streams.app import StreamsApp

log = logging.getLogger("vlm4rec.streams.web")

STATIC = Path(__file__).resolve().parent / "static"
THUMB_SIZES = (128, 256, 512)
DEFAULT_THUMB = 256
RECENT_SHOWN = 12
NEAREST_SHOWN = 12
USERS_LISTED = 60
THUMBS_CACHED = 512
COUNT_TTL_S = 5.0

#: Scripts, styles, pictures and fetches from this origin only; no inline script or style, no
#: plugins, no framing, forms only to this origin.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
NO_STORE = {**SECURITY_HEADERS, "Cache-Control": "no-store"}


# --- pure helpers (unit-tested) -------------------------------------------------------------
def shell(page: str, title: str, heading: str, body: str = "", ident: str = "") -> str:
    """An HTML page that the script fills in. `title`, `heading` and `ident` are escaped here;
    `body` is trusted markup of this module (no producer text in it)."""
    e = html.escape
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)} · VLM4Rec</title>"
        '<link rel="stylesheet" href="/ui/app.css">'
        '<script src="/ui/app.js" defer></script></head>'
        f'<body data-page="{e(page)}" data-id="{e(ident)}">'
        '<header><a class="brand" href="/">VLM4Rec</a>'
        '<span class="status" id="status">'
        '<span>events/s <b id="st-rate">–</b></span>'
        '<span>lag <b id="st-lag">–</b></span>'
        '<span>items indexed <b id="st-items">–</b></span></span></header>'
        f"<main><h1>{e(heading)}</h1>{body}</main></body></html>\n"
    )


INDEX_BODY = (
    '<form class="find" action="/ui/find" method="get">'
    '<input id="find" name="user" placeholder="user id" autocomplete="off" required>'
    '<button type="submit">open</button></form>'
    '<p class="hint">Users whose recommendations this worker pushed most recently. Type to filter, '
    "or enter any user id.</p>"
    '<ul class="users" id="users"></ul>'
)
USER_BODY = (
    '<section><h2>Recommended now <span class="why" id="trigger"></span></h2>'
    '<div class="cards" id="recs"></div></section>'
    '<section><h2>Recent interactions <span class="why" id="count"></span></h2>'
    '<div class="cards" id="history"></div></section>'
    '<p class="note" id="note"></p>'
)
ITEM_BODY = (
    '<section class="item"><div class="pic" id="picture"></div><div><p class="title" id="title"></p>'
    '<p class="meta" id="category"></p></div></section>'
    '<section><h2>Nearest items</h2><div class="cards" id="nearest"></div></section>'
    '<p class="note" id="note"></p>'
)


def user_link(user_id: str) -> str:
    """Path of a user's page; the id percent-encoded whole (a '/' or '?' in it stays in it)."""
    return "/ui/users/" + quote(user_id, safe="")


def card(item_id: str, meta: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """What the script needs to draw one picture card (the image URL it builds from the id)."""
    return {
        "item_id": item_id,
        "title": str(meta.get("title", "")),
        "category": str(meta.get("category", "")),
        "has_image": bool(picture_uri(meta)),
        **extra,
    }


def user_version(profile: Profile, recs: Shown | None) -> str:
    """Changes whenever what the user page shows changes: a poll that sends it back gets a
    short 'unchanged' answer without any vector-store call."""
    return f"{profile.count}:{recs.generated_at if recs is not None else 'request'}"


def user_snapshot(profile: Profile, recs: Shown, meta: dict[str, dict[str, Any]], version: str) -> dict[str, Any]:
    """The user page's data: newest interactions first, then the current recommendations."""
    recent = list(reversed(profile.history))[:RECENT_SHOWN]
    return {
        "user_id": profile.user_id,
        "version": version,
        "interactions": profile.count,
        "recent": [card(i, meta.get(i, {}), event=e, ts=t) for i, e, t in recent],
        "recs": {
            "trigger": recs.trigger,
            "generated_at": recs.generated_at,
            "items": [card(item_id, meta.get(item_id, {}), score=round(score, 4)) for item_id, score in recs.items],
        },
    }


def picture_uri(meta: dict[str, Any]) -> str:
    """Where the page reads an item's picture: the thumbnail the worker stored with it, else
    (items embedded before thumbnails were stored) the picture's own address."""
    return str(meta.get("thumb") or meta.get("image_url") or "")


def image_etag(image_url: str, size: int) -> str:
    """Same picture address and size, same thumbnail: revalidation needs no image fetch. A
    producer that replaces the bytes behind an unchanged address is seen after max-age."""
    return '"' + hashlib.sha256(f"{size}\0{image_url}".encode()).hexdigest()[:32] + '"'


def etag_matches(if_none_match: str, etag: str) -> bool:
    return any(tag.strip().removeprefix("W/") == etag for tag in if_none_match.split(","))


class EventRate:
    """Events per second over about the last `window_s`, from a growing counter total sampled
    whenever the status strip asks (no background task for a page nobody may open)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()

    def update(self, total: float, now: float) -> float | None:
        """The rate since the newest sample at least `window_s` old (or the oldest there is);
        None until two samples exist."""
        self._samples.append((now, total))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()
        then, before = self._samples[0]
        return (total - before) / (now - then) if now > then else None


def counter_total(metric: Any) -> float:
    """Sum of a labelled counter over all its labels."""
    return sum(s.value for m in metric.collect() for s in m.samples if s.name.endswith("_total"))


def gauge_sum(metric: Any) -> float | None:
    """Sum of a labelled gauge, None when no label was ever set (lag not measured yet)."""
    samples = [s.value for m in metric.collect() for s in m.samples]
    return sum(samples) if samples else None


# --- the views ------------------------------------------------------------------------------
class FeedPage:
    """State behind the page: thumbnails, the status rate, the cached item count."""

    def __init__(self, service: StreamsApp, images: ImageLoader) -> None:
        self.service = service
        self.images = images
        # image fetches may take seconds (ImageLimits.read_timeout_s): their own threads, never
        # the vector-store thread the recommender waits on
        self._image_pool = ThreadPoolExecutor(4, thread_name_prefix="ui-images")
        self._thumbs: OrderedDict[str, bytes] = OrderedDict()
        self._rate = EventRate()
        self._count: tuple[float, int | None] = (0.0, None)
        self._assets = {name: (STATIC / name).read_text(encoding="utf-8") for name in ("app.js", "app.css")}

    async def user_data(self, user_id: str, since: str) -> tuple[dict[str, Any], int]:
        service = self.service
        stored = service.stored_profile(user_id)
        if stored is None:
            return {"error": "unknown user", "user_id": user_id}, 404
        profile = Profile.from_dict(stored)
        recs = service.last_recs.get(user_id)
        version = user_version(profile, recs)
        if since == version:
            return {"unchanged": True, "version": version}, 200
        if recs is None:  # nothing pushed since this worker started: rank now
            lists = await service._store(service.ranking.recommend, [profile])
            recs = Shown(tuple(lists[0]), "request", time.time(), service.ranking.variant_of(user_id))
        ids = {i for i, _, _ in profile.history} | set(recs.item_ids)
        meta = await service._store(service.items.get_meta, ids)
        return user_snapshot(profile, recs, meta, version), 200

    async def item_data(self, item_id: str) -> tuple[dict[str, Any], int]:
        service = self.service
        vector = (await service._store(service.ranking.vectors.get, [item_id])).get(item_id)
        if vector is None:
            return {"error": "unknown item", "item_id": item_id}, 404
        hits = (await service._store(service.items.search, vector[None, :], NEAREST_SHOWN, [{item_id}]))[0]
        meta = await service._store(service.items.get_meta, [item_id, *(i for i, _ in hits)])
        return {
            **card(item_id, meta.get(item_id, {})),
            "nearest": [card(i, meta.get(i, {}), score=round(s, 4)) for i, s in hits],
        }, 200

    def users_data(self, query: str) -> dict[str, Any]:
        query = query.casefold()
        users = []
        for user_id in reversed(self.service.last_recs):  # most recently pushed first
            if query in user_id.casefold():
                recs = self.service.last_recs[user_id]
                users.append({"user_id": user_id, "trigger": recs.trigger, "generated_at": recs.generated_at})
                if len(users) == USERS_LISTED:
                    break
        return {"users": users}

    async def status_data(self) -> dict[str, Any]:
        now = time.monotonic()
        rate = self._rate.update(counter_total(metrics.INTERACTIONS), now)
        return {
            "events_per_s": None if rate is None else round(rate, 1),
            "lag": gauge_sum(metrics.CONSUMER_LAG),
            "items_indexed": await self._items_indexed(now),
        }

    async def _items_indexed(self, now: float) -> int | None:
        """Counted at most every few seconds: a count(*) per poll per open page would queue on
        the vector-store thread in front of the recommender."""
        checked, count = self._count
        if now - checked >= COUNT_TTL_S:
            try:
                count = await self.service._store(self.service.items.count)
            except Exception:  # noqa: BLE001 - no collection yet (no worker has embedded anything)
                count = None
            self._count = (now, count)
        return count

    async def thumbnail_for(self, item_id: str, size: int, if_none_match: str) -> tuple[int, bytes, str]:
        """(status, body, etag): 200 with a JPEG, 304 when the browser has it, 404 when the item
        or its picture is missing or refused (the reason is logged, not shown)."""
        meta = (await self.service._store(self.service.items.get_meta, [item_id])).get(item_id, {})
        uri = picture_uri(meta)
        if not uri:
            return 404, b"no picture", ""
        etag = image_etag(uri, size)
        if etag_matches(if_none_match, etag):
            return 304, b"", etag
        body = self._thumbs.get(etag)
        if body is None:
            try:
                body = await asyncio.get_running_loop().run_in_executor(self._image_pool, self._load, uri, size)
            except ImageError as exc:
                log.info("picture of item %r not served: %s", item_id, exc.reason)
                return 404, b"picture unavailable", ""
            self._thumbs[etag] = body
            while len(self._thumbs) > THUMBS_CACHED:
                self._thumbs.popitem(last=False)
        else:
            self._thumbs.move_to_end(etag)
        return 200, body, etag

    def _load(self, uri: str, size: int) -> bytes:
        return jpeg_thumbnail(self.images.load(uri), size)

    def asset(self, name: str) -> str:
        return self._assets[name]


def register_ui(service: StreamsApp, images: ImageLoader) -> FeedPage:
    """Add the page's routes to the service's web server. Call before the worker starts: the
    page's `/` then takes precedence over Faust's built-in index at the same path."""
    page = FeedPage(service, images)
    app = service.app

    @app.page("/")
    async def index_view(view: Any, request: Any) -> Any:
        return view.html(shell("index", "Live feed", "Live feed", INDEX_BODY), headers=NO_STORE)

    @app.page("/ui/find")
    async def find_view(view: Any, request: Any) -> Any:
        user_id = request.query.get("user", "").strip()
        target = user_link(user_id) if user_id else "/"
        return view.text("", status=303, headers={**NO_STORE, "Location": target})

    @app.page("/ui/users/{user_id}")
    async def user_page(view: Any, request: Any, user_id: str) -> Any:
        body = shell("user", f"User {user_id}", f"User {user_id}", USER_BODY, user_id)
        return view.html(body, headers=NO_STORE)

    @app.page("/ui/items/{item_id}")
    async def item_page(view: Any, request: Any, item_id: str) -> Any:
        body = shell("item", f"Item {item_id}", f"Item {item_id}", ITEM_BODY, item_id)
        return view.html(body, headers=NO_STORE)

    @app.page("/ui/app.js")
    async def script_view(view: Any, request: Any) -> Any:
        return view.text(page.asset("app.js"), content_type="text/javascript", headers=NO_STORE)

    @app.page("/ui/app.css")
    async def style_view(view: Any, request: Any) -> Any:
        return view.text(page.asset("app.css"), content_type="text/css", headers=NO_STORE)

    @app.page("/ui/api/users")
    async def users_api(view: Any, request: Any) -> Any:
        return view.json(page.users_data(request.query.get("q", "")), headers=NO_STORE)

    @app.page("/ui/api/users/{user_id}")
    @app.table_route(table=service.profiles, match_info="user_id")
    async def user_api(view: Any, request: Any, user_id: str) -> Any:
        data, status = await page.user_data(user_id, request.query.get("since", ""))
        return view.json(data, status=status, headers=NO_STORE)

    @app.page("/ui/api/items/{item_id}")
    async def item_api(view: Any, request: Any, item_id: str) -> Any:
        data, status = await page.item_data(item_id)
        return view.json(data, status=status, headers=NO_STORE)

    @app.page("/ui/api/status")
    async def status_api(view: Any, request: Any) -> Any:
        return view.json(await page.status_data(), headers=NO_STORE)

    @app.page("/ui/images/{item_id}")
    async def image_view(view: Any, request: Any, item_id: str) -> Any:
        raw = request.query.get("size", str(DEFAULT_THUMB))
        if not raw.isdigit() or int(raw) not in THUMB_SIZES:
            return view.text(f"size must be one of {THUMB_SIZES}", status=400, headers=NO_STORE)
        status, body, etag = await page.thumbnail_for(item_id, int(raw), request.headers.get("If-None-Match", ""))
        if status == 404:  # remembered briefly, so a card redrawn on every poll does not refetch
            return view.text(body.decode(), status=404, headers={**SECURITY_HEADERS, "Cache-Control": "max-age=60"})
        headers = {**SECURITY_HEADERS, "Cache-Control": "public, max-age=3600", "ETag": etag}
        if status == 304:
            return view.bytes(b"", status=304, headers=headers)
        return view.bytes(body, content_type="image/jpeg", headers=headers)

    return page
