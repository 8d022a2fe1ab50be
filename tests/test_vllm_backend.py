"""VllmHttpBackend against the vLLM stand-in server, and VllmEngineBackend without a GPU.

The stand-in (tests/vllm_standin.py) speaks vLLM's wire format, so these tests check what the
backend sends and how it reacts to what a real server answers, including failures.
"""

from __future__ import annotations

import socket
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image
from vllm_standin import CLIP_MODEL, DESCRIBER_MODEL, TEXT_MODEL, VllmStandIn

from workers.backends.base import BackendError
from workers.backends.vllm_engine import VllmEngineBackend
from workers.backends.vllm_http import DEFAULT_PROMPT, VllmHttpBackend

RED = Image.new("RGB", (40, 30), (220, 30, 30))
BLUE = Image.new("RGB", (24, 24), (30, 60, 220))


@pytest.fixture(scope="module")
def standin() -> Iterator[VllmStandIn]:
    with VllmStandIn() as server:
        yield server


@pytest.fixture(autouse=True)
def clean_standin(standin: VllmStandIn) -> None:
    standin.reset()


def make_backend(url: str, **overrides: Any) -> VllmHttpBackend:
    options: dict[str, Any] = {
        "describer_url": url,
        "describer_model": DESCRIBER_MODEL,
        "text_url": url,
        "text_model": TEXT_MODEL,
        "image_model": CLIP_MODEL,
        "backoff_s": 0.01,
    }
    options.update(overrides)
    return VllmHttpBackend(**options)


@pytest.fixture
def backend(standin: VllmStandIn) -> Iterator[VllmHttpBackend]:
    instance = make_backend(standin.url)
    yield instance
    instance.close()


def assert_unit_rows(matrix: np.ndarray, rows: int, dim: int) -> None:
    assert matrix.dtype == np.float32
    assert matrix.shape == (rows, dim)
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)


# --- describe ---------------------------------------------------------------------------------


def test_describe_sends_one_vision_chat_request_per_image(backend, standin):
    descriptions = backend.describe([RED, BLUE], ["Red running shoe", "Blue kettle"])

    assert len(descriptions) == 2
    assert "red" in descriptions[0] and "40x30" in descriptions[0]
    assert "blue" in descriptions[1] and "24x24" in descriptions[1]
    sent = standin.api_requests("/v1/chat/completions")
    assert len(sent) == 2
    titles = set()
    for request in sent:
        body = request.body
        assert body["model"] == DESCRIBER_MODEL
        assert body["temperature"] == 0
        assert body["max_tokens"] == 160
        (message,) = body["messages"]
        assert message["role"] == "user"
        image_part, text_part = message["content"]
        assert image_part["type"] == "image_url"
        assert image_part["image_url"]["url"].startswith("data:image/jpeg;base64,")
        assert text_part["type"] == "text"
        titles.add(next(t for t in ("Red running shoe", "Blue kettle") if t in text_part["text"]))
    assert titles == {"Red running shoe", "Blue kettle"}


def test_describe_formats_a_custom_prompt_with_the_title(standin):
    backend = make_backend(standin.url, prompt="Describe {title} briefly.", max_tokens=5)
    (description,) = backend.describe([RED], ["Red shoe"])
    backend.close()

    (request,) = standin.api_requests("/v1/chat/completions")
    assert request.body["messages"][0]["content"][1]["text"] == "Describe Red shoe briefly."
    assert request.body["max_tokens"] == 5
    assert len(description.split()) == 5  # the stand-in stops at max_tokens, as vLLM does


def test_describe_rejects_mismatched_titles(backend):
    with pytest.raises(ValueError):
        backend.describe([RED, BLUE], ["only one title"])


# --- embed_texts ------------------------------------------------------------------------------


def test_embed_texts_one_request_unit_rows(backend, standin):
    texts = ["red running shoe", "red leather shoe", "blue kettle"]
    matrix = backend.embed_texts(texts)

    assert_unit_rows(matrix, 3, 64)
    assert matrix[0] @ matrix[1] > matrix[0] @ matrix[2]  # shared words are closer
    (request,) = standin.api_requests("/v1/embeddings")
    assert request.body == {"model": TEXT_MODEL, "input": texts, "encoding_format": "float"}


def test_embed_texts_orders_rows_by_index(backend, standin):
    texts = ["alpha", "beta", "gamma", "delta"]
    in_order = backend.embed_texts(texts)
    standin.shuffle_embeddings = True
    shuffled = backend.embed_texts(texts)

    np.testing.assert_array_equal(in_order, shuffled)
    assert not np.allclose(in_order[0], in_order[1])


def test_text_dim_is_probed_once(backend, standin):
    assert backend.text_dim == 64
    assert backend.text_dim == 64
    (probe,) = standin.api_requests("/v1/embeddings")
    assert probe.body["input"] == ["dim probe"]
    assert backend.embed_texts([]).shape == (0, 64)
    assert len(standin.api_requests("/v1/embeddings")) == 1


# --- embed_images -----------------------------------------------------------------------------


def test_embed_images_sends_chat_style_embedding_requests(backend, standin):
    matrix = backend.embed_images([RED, BLUE, RED])

    assert_unit_rows(matrix, 3, 48)
    np.testing.assert_array_equal(matrix[0], matrix[2])
    assert not np.allclose(matrix[0], matrix[1])
    sent = standin.api_requests("/v1/embeddings")
    assert len(sent) == 3
    body = sent[0].body
    assert body["model"] == CLIP_MODEL
    assert body["encoding_format"] == "float"
    assert "input" not in body
    (message,) = body["messages"]
    assert message["role"] == "user"
    assert message["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert message["content"][1] == {"type": "text", "text": ""}


def test_image_dim_is_probed_once(backend, standin):
    assert backend.image_dim == 48
    assert backend.image_dim == 48
    assert len(standin.api_requests("/v1/embeddings")) == 1
    assert backend.embed_images([]).shape == (0, 48)


def test_joint_space_when_one_model_encodes_both(standin):
    joint = make_backend(standin.url, text_model=CLIP_MODEL, image_model=CLIP_MODEL)
    texts = joint.embed_texts(["red", "blue"])
    images = joint.embed_images([RED])
    joint.close()

    assert joint.joint_space
    assert images[0] @ texts[0] > images[0] @ texts[1]
    for separate in (make_backend(standin.url), make_backend(standin.url, image_model=None)):
        assert not separate.joint_space
        separate.close()


def test_concurrency_is_bounded(standin):
    standin.delay_s = 0.05
    backend = make_backend(standin.url, max_concurrency=3)
    backend.embed_images([RED] * 12)
    backend.describe([BLUE] * 6, ["kettle"] * 6)
    backend.close()

    assert standin.max_in_flight == 3


def test_unconfigured_roles_raise_backend_error(standin):
    backend = make_backend(standin.url, describer_url=None, describer_model=None, image_model=None)
    with pytest.raises(BackendError, match="no describer model"):
        backend.describe([RED], ["Red shoe"])
    with pytest.raises(BackendError, match="no image model"):
        backend.embed_images([RED])
    with pytest.raises(BackendError, match="no describer model"):
        _ = backend.describer_model
    assert backend.embed_texts(["still works"]).shape == (1, 64)
    backend.close()


def test_constructor_rejects_half_configured_roles(standin):
    with pytest.raises(ValueError):
        make_backend(standin.url, describer_model=None)
    with pytest.raises(ValueError):
        make_backend(standin.url, image_url=standin.url, image_model=None)


# --- failures and retries ---------------------------------------------------------------------


@pytest.mark.parametrize("status", [503, 500, 429])
def test_retries_transient_statuses_then_succeeds(backend, standin, status):
    standin.fail_next(2, status=status)
    assert backend.embed_texts(["retry me"]).shape == (1, 64)
    assert len(standin.api_requests("/v1/embeddings")) == 3


def test_gives_up_after_the_last_retry(standin):
    backend = make_backend(standin.url, retries=2)
    standin.fail_next(10, status=503)
    with pytest.raises(BackendError) as caught:
        backend.embed_texts(["never"])
    backend.close()

    assert len(standin.api_requests("/v1/embeddings")) == 3
    message = str(caught.value)
    assert f"{standin.url}/v1/embeddings" in message
    assert "3 tries" in message and "503" in message


def test_bad_request_fails_fast(backend, standin):
    standin.fail_next(1, status=400)
    with pytest.raises(BackendError, match="HTTP 400") as caught:
        backend.describe([RED], ["Red shoe"])
    assert f"{standin.url}/v1/chat/completions" in str(caught.value)
    assert len(standin.api_requests("/v1/chat/completions")) == 1


def test_unknown_model_fails_fast_with_server_message(standin):
    backend = make_backend(standin.url, text_model="no/such-model")
    with pytest.raises(BackendError, match="HTTP 404.*does not exist"):
        backend.embed_texts(["x"])
    backend.close()
    assert len(standin.api_requests("/v1/embeddings")) == 1


def test_server_down_raises_backend_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    backend = make_backend(url, retries=1)
    with pytest.raises(BackendError, match="failed after 2 tries.*ConnectError") as caught:
        backend.embed_texts(["anyone there?"])
    backend.close()
    assert url in str(caught.value)


def test_timeouts_are_retried_then_reported():
    with VllmStandIn() as slow:  # own server: its sleeping handlers must not leak into others
        slow.delay_s = 0.5
        backend = make_backend(slow.url, timeout_s=0.1, retries=1)
        with pytest.raises(BackendError, match="failed after 2 tries.*Timeout"):
            backend.embed_texts(["slow"])
        backend.close()
        assert len(slow.api_requests("/v1/embeddings")) == 2


def test_api_key_is_sent_as_bearer_token():
    with VllmStandIn(api_key="s3cret") as guarded:
        backend = make_backend(guarded.url, api_key="s3cret")
        assert backend.embed_texts(["hello"]).shape == (1, 64)
        backend.close()
        assert guarded.requests[-1].headers["Authorization"] == "Bearer s3cret"

        anonymous = make_backend(guarded.url)
        with pytest.raises(BackendError, match="HTTP 401"):
            anonymous.embed_texts(["hello"])
        anonymous.close()
        assert "Authorization" not in guarded.requests[-1].headers


# --- VllmEngineBackend ------------------------------------------------------------------------


def test_engine_backend_without_vllm_raises_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail even if installed
    with pytest.raises(BackendError, match=r"pip install vlm4rec\[vllm\]"):
        VllmEngineBackend(describer_model="some/vlm", text_model="some/embedder")


class FakeLLM:
    """Records how the backend drives `vllm.LLM`; answers like vLLM's output objects."""

    created: list[FakeLLM] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.calls: list[Any] = []
        FakeLLM.created.append(self)

    def chat(self, conversations: list, sampling_params: Any, use_tqdm: bool) -> list:
        self.calls.append(conversations)
        return [
            SimpleNamespace(outputs=[SimpleNamespace(text=f" description {i} ")])
            for i in range(len(conversations))
        ]

    def embed(self, prompts: list, use_tqdm: bool) -> list:
        self.calls.append(prompts)
        return [
            SimpleNamespace(outputs=SimpleNamespace(embedding=[float(i + 1), 0.0, 3.0]))
            for i in range(len(prompts))
        ]


def install_fake_vllm(monkeypatch: pytest.MonkeyPatch, with_runner: bool) -> None:
    @dataclass
    class EngineArgs:
        model: str = ""
        task: str = "auto"

    @dataclass
    class EngineArgsWithRunner(EngineArgs):
        runner: str = "auto"

    fake = types.ModuleType("vllm")
    fake.LLM = FakeLLM  # type: ignore[attr-defined]
    fake.SamplingParams = lambda **kwargs: SimpleNamespace(**kwargs)  # type: ignore[attr-defined]
    engine_args = EngineArgsWithRunner if with_runner else EngineArgs
    fake.EngineArgs = engine_args  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", fake)
    FakeLLM.created = []


def test_engine_backend_drives_the_offline_api(monkeypatch):
    install_fake_vllm(monkeypatch, with_runner=True)
    backend = VllmEngineBackend(describer_model="vlm", text_model="clip", image_model="clip")

    describer, encoder = FakeLLM.created  # one pooling engine serves both modalities
    assert describer.kwargs["model"] == "vlm" and "runner" not in describer.kwargs
    assert encoder.kwargs["runner"] == "pooling"
    assert describer.kwargs["gpu_memory_utilization"] == pytest.approx(0.45)
    assert backend.joint_space

    assert backend.describe([RED, BLUE], ["a", "b"]) == ["description 0", "description 1"]
    (conversations,) = describer.calls
    assert conversations[1][0]["content"][1]["text"] == DEFAULT_PROMPT.format(title="b")

    texts = backend.embed_texts(["x", "y"])
    assert_unit_rows(texts, 2, 3)
    images = backend.embed_images([RED])
    assert encoder.calls[-1][0]["prompt"] == ""
    assert encoder.calls[-1][0]["multi_modal_data"]["image"].size == RED.size
    assert_unit_rows(images, 1, 3)
    assert backend.text_dim == 3 and backend.image_dim == 3


def test_engine_backend_uses_task_embed_on_older_vllm(monkeypatch):
    install_fake_vllm(monkeypatch, with_runner=False)
    backend = VllmEngineBackend(describer_model=None, text_model="embedder", image_model="clip")

    text_engine, image_engine = FakeLLM.created
    assert text_engine.kwargs["task"] == "embed" and image_engine.kwargs["task"] == "embed"
    assert not backend.joint_space
    with pytest.raises(BackendError, match="no describer model"):
        backend.describe([RED], ["a"])
