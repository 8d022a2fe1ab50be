"""Turn items into vectors with one backend and one strategy.

Strategies (the model id and strategy are stored with every vector):
- `describe` (the paper): the describer writes words from the image; the text encoder embeds
  "title. description", as the paper does (the description takes the place of the item's own
  text; an item without an image keeps its text).
- `text`: the text encoder embeds "title. text"; the image is not used.
- `image`: the image encoder's vector. An item without an image is embedded from its text only
  when the backend's text and image spaces are one (CLIP-like); otherwise it cannot be placed in
  the image space and is refused with a reason.
- `fused`: [describe-vector, image-vector] / sqrt(2), so that its cosine is the mean of the two
  cosines; an item without an image keeps only the text half (renormalised).

The same `Embedder` serves the streaming worker and the offline evaluation, so both see the
very same vectors.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image

from workers.backends.base import EmbeddingBackend

Strategy = Literal["describe", "image", "text", "fused"]
STRATEGIES: tuple[Strategy, ...] = ("describe", "image", "text", "fused")


class ItemRefused(ValueError):
    """This item cannot be embedded with this strategy; `reason` goes to the dead-letter topic."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ItemContent:
    """What the embedder needs of an item; the image is decoded already (or absent)."""

    item_id: str
    title: str
    text: str = ""
    image: Image.Image | None = None


@dataclass
class EmbedResult:
    vectors: np.ndarray  # one row per accepted item, same order as `item_ids`
    item_ids: list[str]
    descriptions: dict[str, str]
    refused: dict[str, str]  # item_id -> reason
    stages_ms: dict[str, float] = field(default_factory=dict)


def join_text(*parts: str) -> str:
    """'title. description. text' without empty parts or doubled full stops."""
    cleaned = [p.strip().rstrip(".") for p in parts if p and p.strip()]
    return ". ".join(cleaned)


def content_hash(model_id: str, title: str, text: str, image_url: str | None) -> str:
    """Identity of an item's embedding input: an unchanged re-published item is not embedded
    again. The image is identified by its URI (a data: URI is its content)."""
    payload = json.dumps([model_id, title, text, image_url or ""], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.maximum(norms, 1e-12)).astype(np.float32)


class Embedder:
    def __init__(self, backend: EmbeddingBackend, strategy: Strategy) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        self.backend = backend
        self.strategy = strategy

    @property
    def model_id(self) -> str:
        """Names every model that shaped the vector, so one collection never mixes spaces."""
        b = self.backend
        parts = {
            "describe": [b.describer_model, f"{b.text_model}(title.description)"],
            "text": [b.text_model],
            "image": [b.image_model],
            "fused": [b.describer_model, f"{b.text_model}(title.description)", b.image_model],
        }[self.strategy]
        return f"{b.name}/{self.strategy}:" + "+".join(parts)

    @property
    def dim(self) -> int:
        b = self.backend
        return {
            "describe": b.text_dim,
            "text": b.text_dim,
            "image": b.image_dim,
            "fused": b.text_dim + b.image_dim,
        }[self.strategy]

    def embed(self, items: Sequence[ItemContent]) -> EmbedResult:
        """One backend call per stage for the whole batch."""
        stages: dict[str, float] = {}
        refused: dict[str, str] = {}
        accepted = list(items)
        if self.strategy == "image" and not self.backend.joint_space:
            refused = {
                i.item_id: f"strategy 'image' needs an image: backend {self.backend.name} has no joint text-image space"
                for i in items
                if i.image is None
            }
            accepted = [i for i in items if i.image is not None]
        with_image = [i for i in accepted if i.image is not None]
        images = [i.image for i in with_image if i.image is not None]
        titles = [i.title for i in with_image]

        descriptions: dict[str, str] = {}
        image_vectors: dict[str, np.ndarray] = {}
        if images and self.strategy in ("describe", "fused", "image"):
            started = time.perf_counter()
            if self.strategy == "fused":
                texts, matrix = self.backend.describe_and_embed_images(images, titles)
            elif self.strategy == "describe":
                texts, matrix = self.backend.describe(images, titles), None
            else:
                texts, matrix = None, self.backend.embed_images(images)
            stages["image_model_ms"] = (time.perf_counter() - started) * 1000
            if texts is not None:
                descriptions = {i.item_id: t for i, t in zip(with_image, texts, strict=True)}
            if matrix is not None:
                image_vectors = {i.item_id: row for i, row in zip(with_image, matrix, strict=True)}

        text_vectors: dict[str, np.ndarray] = {}
        needs_text = [
            i for i in accepted
            if self.strategy != "image" or i.image is None  # image strategy: text only stands in
        ]
        if needs_text:
            # The paper encodes `title. description`: the description stands in for the item's
            # own text. An item without an image has no description and keeps its text.
            inputs = [
                join_text(i.title, descriptions[i.item_id])
                if i.item_id in descriptions
                else join_text(i.title, i.text)
                for i in needs_text
            ]
            started = time.perf_counter()
            matrix = self.backend.embed_texts(inputs)
            stages["text_model_ms"] = (time.perf_counter() - started) * 1000
            text_vectors = {i.item_id: row for i, row in zip(needs_text, matrix, strict=True)}

        rows = [self._combine(i.item_id, text_vectors, image_vectors) for i in accepted]
        vectors = np.stack(rows).astype(np.float32) if rows else np.zeros((0, self.dim), np.float32)
        return EmbedResult(
            vectors=vectors,
            item_ids=[i.item_id for i in accepted],
            descriptions=descriptions,
            refused=refused,
            stages_ms=stages,
        )

    def _combine(
        self, item_id: str, text_vectors: dict[str, np.ndarray], image_vectors: dict[str, np.ndarray]
    ) -> np.ndarray:
        if self.strategy in ("describe", "text"):
            return text_vectors[item_id]
        if self.strategy == "image":
            return image_vectors.get(item_id, text_vectors.get(item_id))
        text = text_vectors[item_id]
        image = image_vectors.get(item_id)
        if image is None:
            return _unit_rows(np.concatenate([text, np.zeros(self.backend.image_dim, np.float32)])[None])[0]
        return (np.concatenate([text, image]) / np.sqrt(2.0)).astype(np.float32)
