"""Strategies, model ids and refusals of the embedder (fake backend: logic only)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fakes import FakeBackend
from workers.embedder import Embedder, ItemContent, content_hash, join_text

RED = Image.new("RGB", (8, 8), (255, 0, 0))
BLUE = Image.new("RGB", (8, 8), (0, 0, 255))
ITEMS = [
    ItemContent("a", "Red dress", "cotton", RED),
    ItemContent("b", "Blue shirt", "", BLUE),
    ItemContent("c", "Text only", "no picture"),
]


def test_join_text() -> None:
    assert join_text("Title.", "", " desc ", "text") == "Title. desc. text"


@pytest.mark.parametrize("strategy", ["describe", "text", "fused"])
def test_every_item_gets_a_unit_vector(strategy: str) -> None:
    embedder = Embedder(FakeBackend(), strategy)
    result = embedder.embed(ITEMS)
    assert result.item_ids == ["a", "b", "c"]
    assert result.vectors.shape == (3, embedder.dim) and result.vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    assert not result.refused


def test_describe_uses_one_call_per_stage_and_the_description() -> None:
    backend = FakeBackend()
    result = Embedder(backend, "describe").embed(ITEMS)
    assert backend.calls == [("describe", 2), ("embed_texts", 3)]
    assert result.descriptions["a"] == "colour (255, 0, 0)"
    text_only = Embedder(FakeBackend(), "text").embed(ITEMS)
    assert not np.allclose(result.vectors[0], text_only.vectors[0])  # the description mattered
    assert np.allclose(result.vectors[2], text_only.vectors[2])  # no image: text alone


def test_describe_encodes_title_and_description_like_the_paper() -> None:
    """The description takes the place of the item's own text (the paper's `title. description`)."""
    item = ITEMS[0]
    vector = Embedder(FakeBackend(), "describe").embed([item]).vectors[0]
    expected = FakeBackend().embed_texts([join_text(item.title, "colour (255, 0, 0)")])[0]
    assert np.allclose(vector, expected / np.linalg.norm(expected), atol=1e-6)


def test_image_strategy_refuses_imageless_items_without_a_joint_space() -> None:
    result = Embedder(FakeBackend(), "image").embed(ITEMS)
    assert result.item_ids == ["a", "b"]
    assert "needs an image" in result.refused["c"]
    joint = Embedder(FakeBackend(joint=True), "image").embed(ITEMS)
    assert joint.item_ids == ["a", "b", "c"] and not joint.refused


def test_fused_is_the_mean_of_the_two_cosines() -> None:
    embedder = Embedder(FakeBackend(), "fused")
    fused = embedder.embed(ITEMS[:2]).vectors
    describe = Embedder(FakeBackend(), "describe").embed(ITEMS[:2]).vectors
    image = Embedder(FakeBackend(), "image").embed(ITEMS[:2]).vectors
    assert fused[0] @ fused[1] == pytest.approx(0.5 * (describe[0] @ describe[1] + image[0] @ image[1]), abs=1e-5)


def test_model_id_names_every_model_and_the_strategy() -> None:
    assert Embedder(FakeBackend(), "describe").model_id == "fake/describe:fake-describer+fake-text(title.description)"
    assert Embedder(FakeBackend(), "image").model_id == "fake/image:fake-image"
    assert Embedder(FakeBackend(), "fused").dim == 14
    with pytest.raises(ValueError, match="unknown strategy"):
        Embedder(FakeBackend(), "magic")  # type: ignore[arg-type]


def test_content_hash_changes_with_any_input() -> None:
    base = content_hash("m", "t", "x", "https://a/b.jpg")
    assert base == content_hash("m", "t", "x", "https://a/b.jpg")
    assert len({base, content_hash("m2", "t", "x", "https://a/b.jpg"), content_hash("m", "t2", "x", "https://a/b.jpg"),
                content_hash("m", "t", "x2", "https://a/b.jpg"), content_hash("m", "t", "x", None)}) == 5
