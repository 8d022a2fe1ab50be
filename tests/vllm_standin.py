"""A stand-in for vLLM's OpenAI-compatible server, for tests that cannot run vLLM (no GPU).

It speaks the wire format the vLLM docs define ("OpenAI-Compatible Server",
https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html, and "Multimodal Inputs"):

* `GET /v1/models`, `GET /health`;
* `POST /v1/chat/completions` with OpenAI vision messages (`text` and `image_url` parts, images
  as base64 data URIs), answering a `chat.completion` object;
* `POST /v1/embeddings` with `input` (a string or a list of strings) or with chat-style
  `messages` (vLLM's multimodal embedding request), answering a `list` of `embedding` objects,
  `encoding_format` "float" or "base64";
* errors as vLLM sends them: `{"error": {"message", "type", "param", "code"}}`, 404 for a model
  the server does not serve, 400 for a malformed request, and `{"error": "Unauthorized"}` with
  401 when an API key is set and the request lacks `Authorization: Bearer <key>`.

Outputs are deterministic, so tests can compare runs: a description names the image's dominant
colour and size; an embedding is a hash-seeded bag of words (texts that share words are close,
an image counts as the word for its colour), deliberately not unit-length so clients must
normalise. Fault injection (`fail_next`, `delay_s`, `shuffle_embeddings`) and request records
(`requests`, `max_in_flight`) let tests exercise retries, timeouts, ordering and concurrency.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

DESCRIBER_MODEL = "standin/vlm-describer"
TEXT_MODEL = "standin/text-embedder"
CLIP_MODEL = "standin/clip"

_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "grey": (128, 128, 128),
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "orange": (240, 140, 20),
    "purple": (130, 40, 160),
    "brown": (120, 80, 40),
    "pink": (240, 150, 190),
}
_DATA_URI = re.compile(r"^data:image/[\w.+-]+;base64,(?P<data>.+)$", re.DOTALL)
_WORD = re.compile(r"[a-z0-9]+")


class RequestError(Exception):
    """A request vLLM would refuse; carries the HTTP status and the error `type`."""

    def __init__(self, status: HTTPStatus, message: str, err_type: str = "BadRequestError"):
        super().__init__(message)
        self.status = status
        self.err_type = err_type


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def colour_name(image: Image.Image) -> str:
    """Name of the palette colour nearest to the image's mean colour."""
    mean = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(axis=0)
    return min(_COLOURS, key=lambda name: float(np.sum((mean - _COLOURS[name]) ** 2)))


def _seeded_vector(key: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(dim)


class VllmStandIn:
    """Threaded HTTP server on 127.0.0.1 (a free port) that answers like `vllm serve`.

    Unlike one real vLLM process it serves several models at once, so one stand-in can play the
    describer, the text encoder and the image encoder; a model is only reachable through the
    endpoint its kind supports, as on a real server.
    """

    def __init__(
        self,
        chat_models: tuple[str, ...] = (DESCRIBER_MODEL,),
        embedding_models: dict[str, int] | None = None,
        api_key: str | None = None,
    ) -> None:
        self.chat_models = chat_models
        self.embedding_models = embedding_models or {TEXT_MODEL: 64, CLIP_MODEL: 48}
        self.api_key = api_key
        self.delay_s = 0.0
        self.shuffle_embeddings = False
        self.requests: list[RecordedRequest] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._failures: list[int] = []
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.standin = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> VllmStandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> VllmStandIn:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def fail_next(self, count: int, status: int = 503) -> None:
        """Answer the next `count` API requests with `status` before doing anything else."""
        with self._lock:
            self._failures.extend([status] * count)

    def reset(self) -> None:
        """Forget records and injected faults (between tests sharing one stand-in)."""
        with self._lock:
            self.requests.clear()
            self._failures.clear()
            self.max_in_flight = 0
            self.delay_s = 0.0
            self.shuffle_embeddings = False

    def api_requests(self, path: str) -> list[RecordedRequest]:
        return [request for request in self.requests if request.path == path]

    # --- called by the handler --------------------------------------------------------------

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _enter(self) -> int | None:
        """Count a request in flight; return a status to fail it with, if one is queued."""
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            return self._failures.pop(0) if self._failures else None

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _models(self) -> dict[str, Any]:
        created = int(time.time())
        cards = [
            {
                "id": model,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": model,
                "parent": None,
                "max_model_len": 4096,
            }
            for model in (*self.chat_models, *self.embedding_models)
        ]
        return {"object": "list", "data": cards}

    def _chat_completion(self, body: dict[str, Any]) -> dict[str, Any]:
        model = _served_model(body, self.chat_models)
        texts, images = _read_messages(body.get("messages"))
        temperature = body.get("temperature", 1.0)
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise RequestError(HTTPStatus.BAD_REQUEST, "temperature must be a number >= 0")
        max_tokens = body.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise RequestError(HTTPStatus.BAD_REQUEST, "max_tokens must be at least 1")

        prompt_digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:8]
        parts = [
            f"A {colour_name(image)} item shown at {image.width}x{image.height} pixels "
            f"(image {hashlib.sha256(image.tobytes()).hexdigest()[:8]})."
            for image in images
        ]
        tokens = (" ".join(parts) + f" Prompt {prompt_digest}.").split()
        finish_reason = "stop"
        if max_tokens is not None and len(tokens) > max_tokens:
            tokens, finish_reason = tokens[:max_tokens], "length"
        content = " ".join(tokens)
        prompt_tokens = sum(len(words(text)) for text in texts) + 16 * len(images)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "tool_calls": []},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                    "stop_reason": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens),
                "total_tokens": prompt_tokens + len(tokens),
            },
        }

    def _embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        model = _served_model(body, tuple(self.embedding_models))
        dim = self.embedding_models[model]
        encoding_format = body.get("encoding_format", "float")
        if encoding_format not in ("float", "base64"):
            raise RequestError(HTTPStatus.BAD_REQUEST, "encoding_format must be float or base64")
        if ("input" in body) == ("messages" in body):
            raise RequestError(HTTPStatus.BAD_REQUEST, "give exactly one of input or messages")

        if "messages" in body:
            texts, images = _read_messages(body["messages"])
            prompts = [(texts, images)]
        else:
            prompts = [([text], []) for text in _read_input(body["input"])]

        data = []
        for index, (texts, images) in enumerate(prompts):
            vector = _embed(model, dim, texts, images).astype(np.float32)
            embedding: Any = vector.tolist()
            if encoding_format == "base64":
                embedding = base64.b64encode(vector.tobytes()).decode("ascii")
            data.append({"index": index, "object": "embedding", "embedding": embedding})
        if self.shuffle_embeddings:
            data.reverse()
        prompt_tokens = sum(len(words(" ".join(texts))) for texts, _ in prompts)
        return {
            "id": f"embd-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": data,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }


def _served_model(body: dict[str, Any], served: tuple[str, ...]) -> str:
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError(HTTPStatus.BAD_REQUEST, "model is required")
    if model not in served:
        raise RequestError(
            HTTPStatus.NOT_FOUND, f"The model `{model}` does not exist.", "NotFoundError"
        )
    return model


def _read_input(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return value
    raise RequestError(
        HTTPStatus.BAD_REQUEST, "input must be a string or a non-empty list of strings"
    )


def _read_messages(messages: Any) -> tuple[list[str], list[Image.Image]]:
    """Validate OpenAI chat messages; return their text parts and decoded images."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(HTTPStatus.BAD_REQUEST, "messages must be a non-empty list")
    texts: list[str] = []
    images: list[Image.Image] = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in (
            "system", "developer", "user", "assistant",
        ):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"invalid message: {message!r:.200}")
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        if not isinstance(content, list):
            raise RequestError(
                HTTPStatus.BAD_REQUEST, "content must be a string or a list of parts"
            )
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url" and isinstance(part.get("image_url"), dict):
                images.append(_decode_image(part["image_url"].get("url")))
            else:
                raise RequestError(
                    HTTPStatus.BAD_REQUEST, f"unsupported content part: {part!r:.200}"
                )
    return texts, images


def _decode_image(url: Any) -> Image.Image:
    match = _DATA_URI.match(url) if isinstance(url, str) else None
    if match is None:
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            "image_url must be a base64 data URI (the stand-in fetches nothing)",
        )
    try:
        image = Image.open(io.BytesIO(base64.b64decode(match["data"], validate=True)))
        image.load()
    except (binascii.Error, UnidentifiedImageError, OSError) as exc:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"cannot decode image: {exc}") from exc
    return image.convert("RGB")


def _embed(model: str, dim: int, texts: list[str], images: list[Image.Image]) -> np.ndarray:
    """Hash-seeded bag of words; an image adds its colour word and a pixel-hash component."""
    tokens = [token for text in texts for token in words(text)]
    tokens += [colour_name(image) for image in images]
    vector = sum((_seeded_vector(f"{model}/{token}", dim) for token in tokens), np.zeros(dim))
    for image in images:
        pixels = hashlib.sha256(image.tobytes()).hexdigest()
        vector += 0.5 * _seeded_vector(f"{model}/pixels/{pixels}", dim)
    if not tokens and not images:
        vector = _seeded_vector(f"{model}/<empty>", dim)
    return vector


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    standin: VllmStandIn

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up (timeout tests) is expected; anything else is a stand-in bug."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "vllm-standin"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        """Keep test output quiet."""

    @property
    def standin(self) -> VllmStandIn:
        return self.server.standin  # type: ignore[attr-defined]

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._read_body()
        if self.path == "/health":
            self._send(HTTPStatus.OK, None)
        elif self.path == "/v1/models":
            if self._authorised():
                self._send(HTTPStatus.OK, self.standin._models())
        else:
            self._send(HTTPStatus.NOT_FOUND, {"detail": "Not Found"})

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        raw = self._read_body()
        routes = {
            "/v1/chat/completions": self.standin._chat_completion,
            "/v1/embeddings": self.standin._embeddings,
        }
        try:
            body: Any = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            body = raw.decode("utf-8", "replace")
        self.standin._record(RecordedRequest("POST", self.path, dict(self.headers.items()), body))
        if self.path not in routes:
            self._send(HTTPStatus.NOT_FOUND, {"detail": "Not Found"})
            return
        if not self._authorised():
            return
        injected = self.standin._enter()
        try:
            time.sleep(self.standin.delay_s)
            if injected is not None:
                status = HTTPStatus(injected)
                self._send_error(RequestError(status, f"injected {status.phrase}", status.phrase))
            elif not isinstance(body, dict):
                self._send_error(RequestError(HTTPStatus.BAD_REQUEST, "body must be a JSON object"))
            else:
                self._send(HTTPStatus.OK, routes[self.path](body))
        except RequestError as error:
            self._send_error(error)
        finally:
            self.standin._leave()

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _authorised(self) -> bool:
        key = self.standin.api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self._send(HTTPStatus.UNAUTHORIZED, {"error": "Unauthorized"})
        return False

    def _send_error(self, error: RequestError) -> None:
        info = {
            "message": str(error),
            "type": error.err_type,
            "param": None,
            "code": error.status.value,
        }
        self._send(error.status, {"error": info})

    def _send(self, status: HTTPStatus, payload: Any) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
