"""Item vectors for the offline evaluation, computed with the worker's own `Embedder` and kept
on disk, so that a second evaluation only scores.

Vectors are keyed by (model id, content hash): the model id names the backend, strategy and
every model that shaped the vector, and the content hash is the one the worker computes
(`workers.embedder.content_hash`), so a changed title, text or image URI is embedded again and
two strategies never share a vector.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from topics import ItemNew
from workers.backends.base import EmbeddingBackend
from workers.embedder import Embedder, ItemContent, Strategy, content_hash
from images.loader import ImageError, ImageLoader


class EmbeddingCache:
    """An SQLite table of float32 vectors keyed by (model id, content hash)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS vectors (model TEXT, hash TEXT, vector BLOB, PRIMARY KEY (model, hash))"
        )

    def get(self, model: str, hashes: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(hashes))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for digest, blob in self._db.execute(
                f"SELECT hash, vector FROM vectors WHERE model = ? AND hash IN ({marks})", [model, *chunk]
            ):
                found[digest] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put(self, model: str, vectors: dict[str, np.ndarray]) -> None:
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO vectors VALUES (?, ?, ?)",
                [(model, digest, np.asarray(v, dtype=np.float32).tobytes()) for digest, v in vectors.items()],
            )

    def close(self) -> None:
        self._db.close()


class SharedPasses(EmbeddingBackend):
    """Delegates to `inner`, remembering each image's model pass and each text's vector, so that
    embedding one batch with several strategies runs every model once per input: `describe`,
    `image` and `fused` share the image pass, and `fused` reuses `describe`'s text vectors.
    Call `begin(batch)` before each batch: images are remembered by object identity, and the
    item's title goes with its image to the describer whichever strategy asks first."""

    def __init__(self, inner: EmbeddingBackend, descriptions: bool, image_vectors: bool) -> None:
        """`descriptions`/`image_vectors`: whether the strategies in use need each; when both
        are needed, one `describe_and_embed_images` call serves both."""
        self.inner = inner
        self.name = inner.name
        self._both = descriptions and image_vectors
        self._titles: dict[int, str] = {}
        self._images: dict[int, tuple[Image.Image, str | None, np.ndarray | None]] = {}
        self._texts: dict[str, np.ndarray] = {}

    text_model = property(lambda self: self.inner.text_model)  # type: ignore[assignment]
    image_model = property(lambda self: self.inner.image_model)  # type: ignore[assignment]
    describer_model = property(lambda self: self.inner.describer_model)  # type: ignore[assignment]
    text_dim = property(lambda self: self.inner.text_dim)  # type: ignore[assignment]
    image_dim = property(lambda self: self.inner.image_dim)  # type: ignore[assignment]
    joint_space = property(lambda self: self.inner.joint_space)  # type: ignore[assignment]

    def begin(self, contents: Sequence[ItemContent]) -> None:
        self._titles = {id(c.image): c.title for c in contents if c.image is not None}
        self._images.clear()
        self._texts.clear()

    def _image_pass(self, images: Sequence[Image.Image], want: str) -> None:
        batch = [image for image in images if id(image) not in self._images]
        if not batch:
            return
        batch_titles = [self._titles.get(id(image), "") for image in batch]
        texts: Sequence[str | None]
        vectors: Sequence[np.ndarray | None]
        if self._both:
            texts, vectors = self.inner.describe_and_embed_images(batch, batch_titles)
        elif want == "describe":
            texts, vectors = self.inner.describe(batch, batch_titles), [None] * len(batch)
        else:
            texts, vectors = [None] * len(batch), list(self.inner.embed_images(batch))
        for image, text, vector in zip(batch, texts, vectors, strict=True):
            self._images[id(image)] = (image, text, vector)

    def describe(self, images: Sequence[Image.Image], titles: Sequence[str]) -> list[str]:
        self._image_pass(images, "describe")
        return [self._images[id(image)][1] or "" for image in images]

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        self._image_pass(images, "embed")
        return np.stack([self._images[id(image)][2] for image in images])  # type: ignore[misc]

    def describe_and_embed_images(
        self, images: Sequence[Image.Image], titles: Sequence[str]
    ) -> tuple[list[str], np.ndarray]:
        return self.describe(images, titles), self.embed_images(images)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        todo = [t for t in dict.fromkeys(texts) if t not in self._texts]
        if todo:
            self._texts.update(zip(todo, self.inner.embed_texts(todo), strict=True))
        if not texts:
            return np.zeros((0, self.text_dim), np.float32)
        return np.stack([self._texts[t] for t in texts])


def embed_items(
    items: Sequence[ItemNew],
    strategies: Sequence[Strategy],
    backend: EmbeddingBackend,
    loader: ImageLoader,
    cache: EmbeddingCache,
    batch_size: int = 512,
    progress: bool = True,
) -> tuple[dict[Strategy, dict[str, np.ndarray]], dict[str, str]]:
    """Vectors of `items` per strategy ({strategy: {item_id: vector}}), from the cache where
    present, and the items that could not be embedded ({item_id: reason}: an unreadable image,
    or the image strategy for an item without one). Missing vectors are computed in batches,
    each batch's images loaded once for all strategies, and stored as each batch finishes, so
    an interrupted run keeps its work."""
    shared = SharedPasses(
        backend,
        descriptions=any(s in ("describe", "fused") for s in strategies),
        image_vectors=any(s in ("image", "fused") for s in strategies),
    )
    embedders = {s: Embedder(shared, s) for s in strategies}
    hashes = {
        s: {i.item_id: content_hash(e.model_id, i.title, i.text, i.image_url) for i in items}
        for s, e in embedders.items()
    }
    vectors: dict[Strategy, dict[str, np.ndarray]] = {}
    for s, e in embedders.items():
        cached = cache.get(e.model_id, list(hashes[s].values()))
        vectors[s] = {item_id: cached[h] for item_id, h in hashes[s].items() if h in cached}
    todo = [i for i in items if any(i.item_id not in vectors[s] for s in strategies)]
    failed: dict[str, str] = {}
    with tqdm(total=len(todo), desc="embed", unit="item", disable=not progress or not todo) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            contents = []
            for item in batch:
                try:
                    image = loader.load(item.image_url) if item.image_url else None
                except ImageError as exc:
                    failed[item.item_id] = f"image: {exc.reason}"
                    continue
                contents.append(ItemContent(item.item_id, item.title, item.text, image))
            shared.begin(contents)
            for s, embedder in embedders.items():
                missing = [c for c in contents if c.item_id not in vectors[s]]
                if not missing:
                    continue
                result = embedder.embed(missing)
                fresh = dict(zip(result.item_ids, result.vectors, strict=True))
                cache.put(embedder.model_id, {hashes[s][item_id]: v for item_id, v in fresh.items()})
                vectors[s].update(fresh)
                for item_id, reason in result.refused.items():
                    failed.setdefault(item_id, f"{s}: {reason}")
            bar.update(len(batch))
    return vectors, failed
