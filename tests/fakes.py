"""A tiny deterministic backend for unit tests of the embedder and worker logic (the real
backends have their own contract suite)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

from workers.backends.base import EmbeddingBackend


def _hash_vector(key: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


class FakeBackend(EmbeddingBackend):
    name = "fake"

    def __init__(self, joint: bool = False, fail_on: str | None = None) -> None:
        self.joint = joint
        self.fail_on = fail_on
        self.calls: list[tuple[str, int]] = []

    text_model = "fake-text"  # type: ignore[assignment]
    image_model = "fake-image"  # type: ignore[assignment]
    describer_model = "fake-describer"  # type: ignore[assignment]
    text_dim = 8  # type: ignore[assignment]
    image_dim = 6  # type: ignore[assignment]

    @property
    def joint_space(self) -> bool:
        return self.joint

    def describe(self, images: Sequence[Image.Image], titles: Sequence[str]) -> list[str]:
        self.calls.append(("describe", len(images)))
        return [f"colour {img.getpixel((0, 0))}" for img in images]

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(("embed_texts", len(texts)))
        if self.fail_on is not None and any(self.fail_on in t for t in texts):
            raise RuntimeError(f"model choked on {self.fail_on}")
        dim = self.image_dim if self.joint else self.text_dim
        return np.stack([_hash_vector(t, dim) for t in texts]) if texts else np.zeros((0, dim), np.float32)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        self.calls.append(("embed_images", len(images)))
        return np.stack([_hash_vector(str(img.getpixel((0, 0))), self.image_dim) for img in images])
