"""Small JPEGs of item pictures.

The worker reads an item's picture once, to embed it; the page that shows the item runs in
another process, often on another machine (compose, Kubernetes), where the picture's address
may mean nothing (a `file://` path on the worker's disk) or may be too long to keep (a `data:`
URI). So the worker stores a thumbnail with the item, as a `data:` URI small enough to sit in
the vector store's meta, and the page serves that.
"""

from __future__ import annotations

import base64
import io

from PIL import Image

#: Largest stored thumbnail, in characters of its `data:` URI: with the title, category and
#: address it keeps an item's meta within the Milvus field (`vectorstore.milvus.MAX_META_BYTES`).
STORED_THUMB_CHARS = 4096
#: Tried in order until one fits: a sharp card first, smaller and coarser for busy pictures.
_STORED_STEPS = ((192, 75), (192, 60), (160, 60), (128, 60), (128, 40), (96, 40), (64, 40))
_DATA_PREFIX = "data:image/jpeg;base64,"


def jpeg_thumbnail(image: Image.Image, size: int, quality: int = 82) -> bytes:
    """A JPEG no larger than size x size, aspect kept (product shots are rarely square)."""
    copy = image.convert("RGB") if image.mode != "RGB" else image.copy()
    copy.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    copy.save(out, "JPEG", quality=quality, optimize=True)
    return out.getvalue()


def stored_thumbnail(image: Image.Image, max_chars: int = STORED_THUMB_CHARS) -> str | None:
    """The largest thumbnail of `_STORED_STEPS` whose `data:` URI fits `max_chars`; None when
    even the smallest does not (the page then shows the item without a picture)."""
    for size, quality in _STORED_STEPS:
        uri = _DATA_PREFIX + base64.b64encode(jpeg_thumbnail(image, size, quality)).decode("ascii")
        if len(uri) <= max_chars:
            return uri
    return None
