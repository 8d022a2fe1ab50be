"""The one small interface every embedding backend implements.

A backend owns models, nothing else: no Kafka, no Milvus, no settings object. The worker
(and the evaluator) combine these three calls into the strategies `describe`, `image`, `text`
and `fused`, so that a new backend only has to say what its models can do.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
from PIL import Image


class BackendError(RuntimeError):
    """A backend could not serve a request (model missing, server unreachable, bad reply)."""


class EmbeddingBackend(ABC):
    """Vision-language item encoder.

    Every returned matrix is float32, one row per input, rows L2-normalised, so that cosine
    similarity is an inner product everywhere downstream.
    """

    #: short name used in model ids and metrics, e.g. "cpu", "vllm-http"
    name: str

    @property
    @abstractmethod
    def text_model(self) -> str:
        """Identifier of the text encoder (stored with every vector)."""

    @property
    @abstractmethod
    def image_model(self) -> str:
        """Identifier of the image encoder."""

    @property
    @abstractmethod
    def describer_model(self) -> str:
        """Identifier of the model that writes image descriptions."""

    @property
    @abstractmethod
    def text_dim(self) -> int:
        """Width of `embed_texts` rows."""

    @property
    @abstractmethod
    def image_dim(self) -> int:
        """Width of `embed_images` rows."""

    @property
    def joint_space(self) -> bool:
        """True when text and image vectors live in one space (CLIP-like), so a text-only item
        can stand in the image space."""
        return False

    @abstractmethod
    def describe(self, images: Sequence[Image.Image], titles: Sequence[str]) -> list[str]:
        """Write a short natural-language description of each image (the paper's grounding step).

        `titles[i]` is the item's own title, which a real VLM may use as context.
        """

    @abstractmethod
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Encode texts into a (len(texts), text_dim) matrix."""

    @abstractmethod
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Encode RGB images into a (len(images), image_dim) matrix."""

    def describe_and_embed_images(
        self, images: Sequence[Image.Image], titles: Sequence[str]
    ) -> tuple[list[str], np.ndarray]:
        """Both image calls at once; backends whose describer and image encoder share a forward
        pass override this to run it once (the `fused` strategy needs both)."""
        return self.describe(images, titles), self.embed_images(images)

    def close(self) -> None:
        """Release models, sessions and connections."""
