"""images.thumbnails: the page's JPEGs and the thumbnail the worker stores with each item."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from images.thumbnails import STORED_THUMB_CHARS, jpeg_thumbnail, stored_thumbnail


def decoded(uri: str) -> Image.Image:
    assert uri.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.partition(",")[2], validate=True)))


def test_thumbnail_is_a_jpeg_within_the_size_with_its_aspect() -> None:
    data = jpeg_thumbnail(Image.new("RGB", (400, 800), (10, 20, 30)), 128)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG" and image.size == (64, 128)


def test_thumbnail_of_a_transparent_or_palette_picture_is_rgb() -> None:
    for mode in ("RGBA", "P", "L", "LA"):
        with Image.open(io.BytesIO(jpeg_thumbnail(Image.new(mode, (50, 40)), 128))) as image:
            assert image.mode == "RGB" and image.size == (50, 40), mode


def test_a_plain_picture_is_stored_sharp() -> None:
    with decoded(stored_thumbnail(Image.new("RGB", (900, 600), (200, 40, 40))) or "") as image:
        assert image.size == (192, 128)


def test_a_busy_picture_shrinks_until_it_fits() -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8))
    uri = stored_thumbnail(noise)
    assert uri is not None and len(uri) <= STORED_THUMB_CHARS
    with decoded(uri) as image:
        assert 64 <= image.size[0] < 192
    assert stored_thumbnail(noise, max_chars=100) is None, "nothing fits: no thumbnail, not a broken one"
