"""One contract, every backend: what the worker and the evaluator rely on from `EmbeddingBackend`.

Each test runs once per implementation through the parametrized `backend` fixture, so a new
backend is covered by adding one entry to `make_backend`. The vLLM HTTP backend runs against
the stand-in server (tests/vllm_standin.py), since vLLM itself needs a GPU.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import numpy as np
import pytest
import skimage.data
from PIL import Image
from vllm_standin import CLIP_MODEL, DESCRIBER_MODEL, TEXT_MODEL, VllmStandIn

from workers.backends.base import EmbeddingBackend
from workers.backends.vllm_http import VllmHttpBackend

TEXTS = ["red leather running shoe", "stainless steel kettle", "wool winter scarf"]
TITLES = ["Running shoe", "Kettle", "Scarf", "Cat poster"]


def _images() -> list[Image.Image]:
    colours = ((220, 30, 30), (30, 160, 60), (30, 60, 220))
    solid = [Image.new("RGB", (64, 64), colour) for colour in colours]
    cat = Image.fromarray(skimage.data.chelsea()).resize((96, 64))
    return [*solid, cat]


IMAGES = _images()


@pytest.fixture(scope="module", params=["cpu", "vllm-http"])
def backend(request: pytest.FixtureRequest) -> Iterator[EmbeddingBackend]:
    if request.param == "cpu":
        if importlib.util.find_spec("workers.backends.cpu") is None:
            pytest.skip("workers/backends/cpu.py (CpuBackend) does not exist yet")
        from workers.backends.cpu import CpuBackend

        instance: EmbeddingBackend = CpuBackend()
        yield instance
        instance.close()
    else:
        with VllmStandIn() as standin:
            instance = VllmHttpBackend(
                describer_url=standin.url,
                describer_model=DESCRIBER_MODEL,
                text_url=standin.url,
                text_model=TEXT_MODEL,
                image_model=CLIP_MODEL,
            )
            yield instance
            instance.close()


def assert_unit_rows(matrix: np.ndarray, rows: int, dim: int) -> None:
    assert isinstance(matrix, np.ndarray)
    assert matrix.dtype == np.float32
    assert matrix.shape == (rows, dim)
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-4)


def test_identity(backend: EmbeddingBackend) -> None:
    model_ids = (backend.name, backend.text_model, backend.image_model, backend.describer_model)
    for model_id in model_ids:
        assert isinstance(model_id, str) and model_id.strip()
    assert isinstance(backend.joint_space, bool)


def test_dims_are_positive_ints(backend: EmbeddingBackend) -> None:
    for dim in (backend.text_dim, backend.image_dim):
        assert isinstance(dim, int) and not isinstance(dim, bool) and dim > 0


def test_embed_texts(backend: EmbeddingBackend) -> None:
    matrix = backend.embed_texts(TEXTS)
    assert_unit_rows(matrix, len(TEXTS), backend.text_dim)
    assert not np.allclose(matrix[0], matrix[1])


def test_embed_texts_empty(backend: EmbeddingBackend) -> None:
    matrix = backend.embed_texts([])
    assert matrix.dtype == np.float32
    assert matrix.shape == (0, backend.text_dim)


def test_embed_images(backend: EmbeddingBackend) -> None:
    matrix = backend.embed_images(IMAGES)
    assert_unit_rows(matrix, len(IMAGES), backend.image_dim)
    assert not np.allclose(matrix[0], matrix[3])


def test_embed_images_empty(backend: EmbeddingBackend) -> None:
    matrix = backend.embed_images([])
    assert matrix.dtype == np.float32
    assert matrix.shape == (0, backend.image_dim)


def test_describe_one_non_empty_string_per_image(backend: EmbeddingBackend) -> None:
    descriptions = backend.describe(IMAGES, TITLES)
    assert len(descriptions) == len(IMAGES)
    for description in descriptions:
        assert isinstance(description, str) and description.strip()


def test_same_input_gives_identical_vectors(backend: EmbeddingBackend) -> None:
    np.testing.assert_array_equal(backend.embed_texts(TEXTS), backend.embed_texts(TEXTS))
    np.testing.assert_array_equal(backend.embed_images(IMAGES), backend.embed_images(IMAGES))
