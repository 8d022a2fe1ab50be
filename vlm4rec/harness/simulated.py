"""A shop that needs no data file: a generated catalogue with pictures drawn by code, and
simulated users with distinct tastes who act on what the feed shows them.

It is what `vlm4rec demo` runs without a dataset folder, so that a fresh clone shows the
product working within a minute. Every item is a coloured shape on a patterned background
(say "Red star on grey dots"), drawn with Pillow and published as a `data:` URI, so the
worker reads the picture like any other and the page shows the thumbnail it stored. Each
user likes one thing (red things, stars, dots, ...): they click what matches in their latest
recommendations, hide what does not, and now and then find a matching item on their own, so
their recommendations visibly turn towards their taste.

Everything here is pure (given a random generator) and tested without a broker; `run` in
`vlm4rec.harness.demo` does the sending.
"""

from __future__ import annotations

import base64
import io
import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from topics import Interaction, ItemNew

RGB = tuple[int, int, int]

COLOURS: dict[str, RGB] = {
    "red": (214, 39, 40), "orange": (245, 130, 20), "yellow": (240, 200, 30), "green": (44, 160, 44),
    "blue": (31, 100, 200), "purple": (140, 80, 190), "pink": (235, 120, 190), "black": (25, 25, 25),
}
BACKGROUNDS: dict[str, RGB] = {"white": (250, 250, 250), "cream": (245, 235, 205), "grey": (150, 150, 150), "navy": (30, 40, 90)}
SHAPES = ("circle", "square", "triangle", "star")
PATTERNS = ("plain", "stripes", "dots", "checks")
PATTERN_WORDS = {"plain": "plain", "stripes": "striped", "dots": "dotted", "checks": "checked"}
PICTURE_SIDE = 256


@dataclass(frozen=True)
class Design:
    """What an item's picture shows; its title and description say the same in words."""

    colour: str
    shape: str
    background: str
    pattern: str
    edition: int = 1  # the same picture again, as a new item, once every design is out

    @property
    def item_id(self) -> str:
        again = f"-{self.edition}" if self.edition > 1 else ""
        return f"{self.colour}-{self.shape}-{self.background}-{self.pattern}{again}"

    @property
    def title(self) -> str:
        ground = self.background if self.pattern == "plain" else f"{self.background} {self.pattern}"
        again = f" (edition {self.edition})" if self.edition > 1 else ""
        return f"{self.colour.capitalize()} {self.shape} on {ground}{again}"

    @property
    def text(self) -> str:
        return f"A {self.colour} {self.shape} drawn on a {PATTERN_WORDS[self.pattern]} {self.background} background."


def every_design(edition: int = 1) -> list[Design]:
    """The whole space of pictures, in a fixed order (8 colours x 4 shapes x 4 x 4 = 512)."""
    return [Design(*combo, edition=edition) for combo in itertools.product(COLOURS, SHAPES, BACKGROUNDS, PATTERNS)]


def draw(design: Design, side: int = PICTURE_SIDE) -> Image.Image:
    """The picture: background, pattern in a shade of the background, then the shape with an
    outline (so a black star on navy still shows)."""
    ground = BACKGROUNDS[design.background]
    shade = tuple(max(0, min(255, c + (-45 if sum(ground) > 380 else 55))) for c in ground)
    image = Image.new("RGB", (side, side), ground)
    pen = ImageDraw.Draw(image)
    step = side // 8
    if design.pattern == "stripes":
        for x in range(-side, side, step):
            pen.line([(x, side), (x + side, 0)], fill=shade, width=step // 3)
    elif design.pattern == "dots":
        for x, y in itertools.product(range(step // 2, side, step), repeat=2):
            pen.ellipse((x - step // 5, y - step // 5, x + step // 5, y + step // 5), fill=shade)
    elif design.pattern == "checks":
        for x, y in itertools.product(range(0, side, step), repeat=2):
            if (x // step + y // step) % 2:
                pen.rectangle((x, y, x + step - 1, y + step - 1), fill=shade)
    outline = (255, 255, 255) if design.colour == "black" or design.background == "navy" else (20, 20, 20)
    colour = COLOURS[design.colour]
    c, r = side / 2, side * 0.32
    if design.shape == "circle":
        pen.ellipse((c - r, c - r, c + r, c + r), fill=colour, outline=outline, width=4)
    elif design.shape == "square":
        pen.rectangle((c - r * 0.85, c - r * 0.85, c + r * 0.85, c + r * 0.85), fill=colour, outline=outline, width=4)
    elif design.shape == "triangle":
        pen.polygon([(c, c - r), (c + r * 0.95, c + r * 0.7), (c - r * 0.95, c + r * 0.7)], fill=colour, outline=outline, width=4)
    else:
        pen.polygon(_star_points(c, r), fill=colour, outline=outline, width=4)
    return image


def _star_points(c: float, r: float) -> list[tuple[float, float]]:
    points = []
    for n in range(10):
        radius = r if n % 2 == 0 else r * 0.42
        angle = -math.pi / 2 + n * math.pi / 5
        points.append((c + radius * math.cos(angle), c + radius * math.sin(angle)))
    return points


def data_uri(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def item_event(design: Design, now: float) -> ItemNew:
    return ItemNew(
        item_id=design.item_id, title=design.title, text=design.text, image_url=data_uri(draw(design)),
        category=design.shape, created_at=now, attributes={"colour": design.colour, "background": design.background, "pattern": design.pattern},
    )


@dataclass(frozen=True)
class Taste:
    """What one simulated user likes, as a name for people and a test for items."""

    name: str
    likes: Callable[[Design], bool]


TASTES: dict[str, Taste] = {
    "ana": Taste("red things", lambda d: d.colour == "red"),
    "ben": Taste("blue things", lambda d: d.colour == "blue"),
    "chloe": Taste("stars", lambda d: d.shape == "star"),
    "dev": Taste("circles", lambda d: d.shape == "circle"),
    "eli": Taste("green things", lambda d: d.colour == "green"),
    "fay": Taste("dotted backgrounds", lambda d: d.pattern == "dots"),
    "gus": Taste("yellow things", lambda d: d.colour == "yellow"),
    "hana": Taste("triangles", lambda d: d.shape == "triangle"),
}


def user_id(name: str) -> str:
    """Ids say the taste, so the page is self-explanatory: `ana-likes-red-things`."""
    return f"{name}-likes-{TASTES[name].name.replace(' ', '-')}"


@dataclass
class Shop:
    """The catalogue so far and the simulated users' histories; decides every next event."""

    rng: random.Random
    users: Sequence[str]
    published: dict[str, Design] = field(default_factory=dict)
    seen: dict[str, set[str]] = field(default_factory=dict)
    _unpublished: list[Design] = field(default_factory=list)
    _edition: int = 0

    def publish(self, count: int) -> list[Design]:
        """The next `count` designs, in a random order; once all 512 are out they come again
        as new items (a next edition), so the shop never runs dry."""
        fresh = []
        for _ in range(count):
            if not self._unpublished:
                self._edition += 1
                self._unpublished = every_design(self._edition)
                self.rng.shuffle(self._unpublished)
            fresh.append(self._unpublished.pop())
        self.published.update((d.item_id, d) for d in fresh)
        return fresh

    def act(self, name: str, recs: Sequence[str], now: float) -> Interaction | None:
        """What user `name` does next, having seen `recs` (their latest recommendations, item
        ids, best first): mostly click the first they like, now and then hide one they do not,
        otherwise find a liked item they have not seen, as a search would."""
        likes = TASTES[name].likes
        seen = self.seen.setdefault(name, set())
        shown = [self.published[i] for i in recs if i in self.published and i not in seen]
        liked = [d for d in shown if likes(d)]
        disliked = [d for d in shown if not likes(d)]
        roll = self.rng.random()
        if liked and roll < 0.8:
            pick, event = liked[0], self.rng.choice(("click", "click", "like", "purchase"))
        elif disliked and roll >= 0.9:
            pick, event = disliked[0], "hide"
        else:
            options = [d for d in self.published.values() if likes(d) and d.item_id not in seen]
            if not options:
                return None
            pick, event = self.rng.choice(options), "click"
        seen.add(pick.item_id)
        return Interaction(user_id=user_id(name), item_id=pick.item_id, event=event, ts=now)

    def share_liked(self, name: str, recs: Sequence[str]) -> float:
        """How much of a list `name` likes: the measure of 'recommendations follow taste'."""
        known = [self.published[i] for i in recs if i in self.published]
        return sum(TASTES[name].likes(d) for d in known) / len(known) if known else 0.0
