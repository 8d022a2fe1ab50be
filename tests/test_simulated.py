"""vlm4rec.harness.simulated: the drawn catalogue and the simulated users of `vlm4rec demo`, without a
broker. The live run is in tests/test_ui.py (Chromium)."""

from __future__ import annotations

import base64
import io
import random

from PIL import Image

from images.loader import ImageLimits, ImageLoader
from topics import ItemNew, decode, encode
from vlm4rec.harness.simulated import COLOURS, TASTES, Design, Shop, draw, every_design, item_event, user_id


def test_every_design_is_a_distinct_item_whose_words_say_what_it_shows() -> None:
    designs = every_design()
    assert len(designs) == len({d.item_id for d in designs}) == 512
    star = Design("red", "star", "grey", "dots")
    assert star.title == "Red star on grey dots"
    assert star.text == "A red star drawn on a dotted grey background."
    assert Design("blue", "circle", "cream", "plain").title == "Blue circle on cream"


def test_pictures_show_the_colour_and_pass_the_workers_loader() -> None:
    event = item_event(Design("green", "square", "white", "stripes"), now=1_700_000_000.0)
    assert decode(ItemNew, encode(event)) == event, "valid under the contract"
    image = ImageLoader(ImageLimits()).load(event.image_url or "")
    assert image.size == (256, 256)
    assert image.getpixel((128, 128)) == COLOURS["green"], "the shape sits in the middle"
    assert event.category == "square" and event.attributes["colour"] == "green"
    payload = base64.b64decode((event.image_url or "").partition(",")[2])
    assert len(payload) < 20_000, "a few KB per item"


def test_each_shape_covers_the_centre_and_patterns_differ() -> None:
    for shape in ("circle", "square", "triangle", "star"):
        assert draw(Design("blue", shape, "white", "plain"), 64).getpixel((32, 34)) == COLOURS["blue"], shape
    grounds = {p: draw(Design("red", "circle", "cream", p), 64).tobytes() for p in ("plain", "stripes", "dots", "checks")}
    assert len(set(grounds.values())) == 4


def test_the_shop_never_runs_dry_and_ids_stay_unique() -> None:
    shop = Shop(random.Random(1), ["ana"])
    first = shop.publish(500)
    more = shop.publish(30)
    assert len({d.item_id for d in first + more}) == 530
    assert {d.edition for d in more} == {1, 2} and all(d.title.endswith("(edition 2)") for d in more if d.edition == 2)


def test_users_click_what_they_like_in_their_feed_and_never_twice() -> None:
    shop = Shop(random.Random(2), list(TASTES))
    shop.publish(256)
    red = [i for i, d in shop.published.items() if d.colour == "red"]
    other = [i for i, d in shop.published.items() if d.colour != "red"]
    feed = [other[0], red[0], other[1], red[1]]
    actions = [shop.act("ana", feed, now=float(n)) for n in range(20)]
    assert all(a is not None and a.user_id == user_id("ana") == "ana-likes-red-things" for a in actions)
    picked = [a.item_id for a in actions if a is not None]
    assert len(picked) == len(set(picked)), "an item is acted on once"
    assert picked.index(red[0]) < picked.index(red[1]), "the feed's best liked item first"
    hides = [a for a in actions if a is not None and a.event == "hide"]
    assert {a.item_id for a in hides} <= {other[0], other[1]}
    positive = [a for a in actions if a is not None and a.event != "hide"]
    assert all(shop.published[a.item_id].colour == "red" for a in positive)
    assert shop.share_liked("ana", feed) == 0.5 and shop.share_liked("ana", ["unknown"]) == 0.0


def test_a_user_with_nothing_left_to_like_does_nothing() -> None:
    shop = Shop(random.Random(3), ["gus"])
    shop.publish(10)
    shop.seen["gus"] = {i for i, d in shop.published.items() if d.colour == "yellow"}
    assert all(shop.act("gus", [], now=0.0) is None for _ in range(20))


def test_drawn_pictures_are_real_pngs() -> None:
    uri = item_event(every_design()[0], now=0.0).image_url or ""
    with Image.open(io.BytesIO(base64.b64decode(uri.partition(",")[2]))) as image:
        assert image.format == "PNG"
