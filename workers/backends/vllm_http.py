"""Embedding backend that talks to vLLM servers over their OpenAI-compatible HTTP API.

Up to three servers play three roles, because `vllm serve` loads one model per process:

* describer: a generative VLM (`vllm serve Qwen/Qwen2.5-VL-3B-Instruct`) answering
  `POST /v1/chat/completions`;
* text encoder: an embedding model (`vllm serve <model> --runner pooling`, `--task embed` before
  vLLM 0.10) answering `POST /v1/embeddings` with `input`;
* image encoder (optional): a multimodal embedding model (CLIP, SigLIP, VLM2Vec,
  Qwen3-VL-Embedding) answering `POST /v1/embeddings` with chat-style `messages`. When it is the
  same model as the text encoder, text and image vectors share one space (`joint_space`).

Wire formats follow the vLLM docs, "OpenAI-Compatible Server"
(https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html): the Chat API takes
OpenAI vision messages (`image_url` parts, base64 data URIs accepted, see "Multimodal Inputs",
https://docs.vllm.ai/en/latest/features/multimodal_inputs.html#online-serving); the Embeddings
API section, "Multi-modal inputs", replaces `input` with a `messages` list and posts it with
`"encoding_format": "float"` (example: examples/online_serving/
openai_chat_embedding_client_for_multimodal.py). Errors come back as
`{"error": {"message", "type", "param", "code"}}`.

vLLM batches concurrent requests itself (continuous batching), so the client's job is to keep
a bounded number of requests in flight rather than to build batches: one request per image,
at most `max_concurrency` at a time.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
from PIL import Image

from workers.backends.base import BackendError, EmbeddingBackend

#: Describer prompt; `{title}` is replaced by the item's title, which grounds the description
#: in what the seller says the item is.
DEFAULT_PROMPT = (
    'This is a product image of an item titled "{title}". '
    "Describe the item's visual appearance: its style, colour, material, design and what it is "
    "used for. Be concise: two or three sentences, no preamble."
)

_PROBE_TEXT = "dim probe"
_ERROR_SNIPPET_CHARS = 300


def l2_normalise(matrix: np.ndarray) -> np.ndarray:
    """Return float32 rows scaled to unit length (the interface's cosine = inner product rule).

    A zero row stays zero instead of becoming NaN, so one degenerate vector cannot poison a
    whole index.
    """
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, np.finfo(np.float32).tiny)


def image_data_uri(image: Image.Image) -> str:
    """Encode an image as a JPEG base64 data URI, the inline form vLLM accepts for `image_url`.

    Inline data keeps the servers from needing access to wherever the image came from.
    """
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _api_base(url: str) -> str:
    """Accept both `http://host:8000` and `http://host:8000/v1` (the OpenAI client's base_url)."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def _snippet(response: httpx.Response) -> str:
    return response.text[:_ERROR_SNIPPET_CHARS]


class VllmModels(EmbeddingBackend):
    """Model identity shared by the vLLM backends: which models serve which role, and widths
    discovered by embedding a probe once."""

    def _set_models(self, describer_model: str | None, text_model: str, image_model: str | None) -> None:
        self._describer_model = describer_model
        self._text_model = text_model
        self._image_model = image_model
        self._text_dim: int | None = None
        self._image_dim: int | None = None

    @property
    def text_model(self) -> str:
        return self._text_model

    @property
    def image_model(self) -> str:
        return self._require(self._image_model, "image")

    @property
    def describer_model(self) -> str:
        return self._require(self._describer_model, "describer")

    @property
    def joint_space(self) -> bool:
        return self._image_model is not None and self._image_model == self._text_model

    @property
    def text_dim(self) -> int:
        if self._text_dim is None:
            self._text_dim = self.embed_texts([_PROBE_TEXT]).shape[1]
        return self._text_dim

    @property
    def image_dim(self) -> int:
        if self._image_dim is None:
            probe = Image.new("RGB", (32, 32), (127, 127, 127))
            self._image_dim = self.embed_images([probe]).shape[1]
        return self._image_dim

    def _require(self, value: str | None, role: str) -> str:
        if value is None:
            raise BackendError(f"{self.name}: no {role} model is configured")
        return value


class VllmHttpBackend(VllmModels):
    """`EmbeddingBackend` over vLLM's OpenAI-compatible servers (see the module docstring).

    `describer_url`/`describer_model` come as a pair; leave both out for a worker that never
    runs the `describe` strategy. `image_model` enables `embed_images`; `image_url` defaults to
    `text_url`, which is right when one CLIP-like server encodes both modalities. A role that
    is not configured raises `BackendError` when used.

    `retries` counts the tries after the first one; `backoff_s` is the first wait, doubled
    each retry.
    """

    name = "vllm-http"

    def __init__(
        self,
        describer_url: str | None,
        describer_model: str | None,
        text_url: str,
        text_model: str,
        image_url: str | None = None,
        image_model: str | None = None,
        prompt: str = DEFAULT_PROMPT,
        api_key: str | None = None,
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        retries: int = 3,
        max_tokens: int = 160,
        backoff_s: float = 0.5,
    ) -> None:
        if (describer_url is None) != (describer_model is None):
            raise ValueError("describer_url and describer_model must be given together")
        if image_url is not None and image_model is None:
            raise ValueError("image_url needs image_model")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if retries < 0:
            raise ValueError("retries must not be negative")

        self._set_models(describer_model, text_model, image_model)
        self._describer_base = _api_base(describer_url) if describer_url else None
        self._text_base = _api_base(text_url)
        self._image_base = _api_base(image_url or text_url) if image_model else None
        self._prompt = prompt
        self._max_tokens = max_tokens
        self._retries = retries
        self._backoff_s = backoff_s

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            headers=headers,
            timeout=timeout_s,
            limits=httpx.Limits(max_keepalive_connections=max_concurrency),
        )
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix=self.name)

    # --- model identity -------------------------------------------------------------------

    # --- the three calls --------------------------------------------------------------------

    def describe(self, images: Sequence[Image.Image], titles: Sequence[str]) -> list[str]:
        if len(images) != len(titles):
            raise ValueError(f"{len(images)} images but {len(titles)} titles")
        base = self._require(self._describer_base, "describer")
        url = f"{base}/chat/completions"
        payloads = [
            {
                "model": self._describer_model,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": image_data_uri(image)}},
                            {"type": "text", "text": self._prompt.format(title=title)},
                        ],
                    }
                ],
                "temperature": 0.0,
                "max_tokens": self._max_tokens,
            }
            for image, title in zip(images, titles, strict=True)
        ]
        return list(self._pool.map(lambda payload: self._chat_content(url, payload), payloads))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.text_dim), dtype=np.float32)
        url = f"{self._text_base}/embeddings"
        payload = {"model": self._text_model, "input": list(texts), "encoding_format": "float"}
        matrix = self._embedding_rows(url, self._post(url, payload), len(texts))
        if self._text_dim is None:
            self._text_dim = matrix.shape[1]
        return matrix

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        base = self._require(self._image_base, "image")
        if not images:
            return np.zeros((0, self.image_dim), dtype=np.float32)
        url = f"{base}/embeddings"
        # The chat-style embedding request from the vLLM docs ("OpenAI-Compatible Server" ->
        # Embeddings API -> Multi-modal inputs): `messages` instead of `input`. The empty text
        # part keeps image-only prompts empty, as CLIP/SigLIP require for image inputs.
        payloads = [
            {
                "model": self._image_model,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": image_data_uri(image)}},
                            {"type": "text", "text": ""},
                        ],
                    }
                ],
                "encoding_format": "float",
            }
            for image in images
        ]
        rows = self._pool.map(
            lambda payload: self._embedding_rows(url, self._post(url, payload), 1), payloads
        )
        matrix = np.vstack(list(rows))
        if self._image_dim is None:
            self._image_dim = matrix.shape[1]
        return matrix

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()

    # --- HTTP plumbing ----------------------------------------------------------------------

    def _post(self, url: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST with retries on what a busy or restarting server does: connection failures,
        timeouts, 429 and 5xx. Other 4xx mean the request itself is wrong, so retrying it
        would only delay the error."""
        tries = self._retries + 1
        last_failure = ""
        for attempt in range(tries):
            if attempt:
                time.sleep(self._backoff_s * 2 ** (attempt - 1))
            try:
                response = self._client.post(url, json=payload)
            except httpx.TransportError as exc:
                last_failure = f"{type(exc).__name__}: {exc}"
                continue
            status = response.status_code
            if status == 429 or status >= 500:
                last_failure = f"HTTP {status}: {_snippet(response)}"
                continue
            if status >= 400:
                raise BackendError(
                    f"{url} rejected the request: HTTP {status}: {_snippet(response)}"
                )
            try:
                return response.json()
            except ValueError as exc:
                raise BackendError(
                    f"{url} answered with invalid JSON: {_snippet(response)}"
                ) from exc
        raise BackendError(f"{url} failed after {tries} tries; last failure: {last_failure}")

    def _chat_content(self, url: str, payload: dict[str, Any]) -> str:
        body = self._post(url, payload)
        try:
            content = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise BackendError(f"{url} answered without choices[0].message: {body!r:.300}") from exc
        if not isinstance(content, str):
            raise BackendError(f"{url} answered without message content: {body!r:.300}")
        return content.strip()

    @staticmethod
    def _embedding_rows(url: str, body: dict[str, Any], expected: int) -> np.ndarray:
        """Turn an embeddings response into unit rows in request order (by `index`, which the
        OpenAI schema defines as the input's position)."""
        try:
            data = sorted(body["data"], key=lambda datum: datum["index"])
            indices = [datum["index"] for datum in data]
            matrix = np.asarray([datum["embedding"] for datum in data], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(
                f"{url} answered with a malformed embeddings body: {body!r:.300}"
            ) from exc
        if indices != list(range(expected)) or matrix.ndim != 2 or matrix.shape[1] == 0:
            raise BackendError(
                f"{url} answered {len(indices)} embeddings of shape {matrix.shape} "
                f"for {expected} inputs"
            )
        return l2_normalise(matrix)
