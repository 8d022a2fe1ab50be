"""Embedding backend that drives vLLM's in-process engine (`vllm.LLM`) on a local GPU.

Same roles as the HTTP backend (`workers.backends.vllm_http`) without the servers: a generative
VLM writes descriptions through `LLM.chat`, and pooling models encode texts and images through
`LLM.embed`. It follows vLLM's documented offline API: "Multimodal Inputs" -> Offline Inference
(https://docs.vllm.ai/en/latest/features/multimodal_inputs.html) for `LLM.chat` with `image_url`
parts and for `{"prompt", "multi_modal_data": {"image": ...}}` prompts, and
examples/offline_inference/vision_language_pooling.py for image embeddings (CLIP/SigLIP want an
empty text prompt with the image; other models want their own image placeholder, hence
`image_prompt`).

Not run here: vLLM needs a GPU and `pip install vlm4rec[vllm]`, and the project's tests only
check that a missing vLLM gives a clear `BackendError`. Loading two or three engines in one
process (describer, text encoder, image encoder) shares one GPU by splitting
`gpu_memory_utilization` between them; prefer the HTTP backend with separate servers when the
models are large.
"""

from __future__ import annotations

import gc
import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from workers.backends.base import BackendError
from workers.backends.vllm_http import DEFAULT_PROMPT, VllmModels, image_data_uri, l2_normalise


class VllmEngineBackend(VllmModels):
    """`EmbeddingBackend` over in-process `vllm.LLM` engines.

    `describer_model` and `image_model` are optional; a role that is not configured raises
    `BackendError` when used. When `image_model` equals `text_model` one pooling engine serves
    both (CLIP-like joint space). `gpu_memory_utilization` is the total fraction of GPU memory
    for all engines together, split evenly between them.
    """

    name = "vllm-engine"

    def __init__(
        self,
        describer_model: str | None,
        text_model: str,
        image_model: str | None = None,
        prompt: str = DEFAULT_PROMPT,
        max_tokens: int = 160,
        image_prompt: str = "",
        gpu_memory_utilization: float = 0.9,
    ) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise BackendError(
                "the vllm-engine backend needs `pip install vlm4rec[vllm]` on a machine with a GPU"
            ) from exc

        self._set_models(describer_model, text_model, image_model)
        self._prompt = prompt
        self._image_prompt = image_prompt
        self._sampling = vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens)

        separate_image_engine = image_model is not None and image_model != text_model
        engines = 1 + int(describer_model is not None) + int(separate_image_engine)
        share = gpu_memory_utilization / engines
        # vLLM 0.10 replaced `task="embed"` with `runner="pooling"`; pick whichever this
        # version's engine arguments know.
        engine_params = inspect.signature(vllm.EngineArgs).parameters
        pooling: dict[str, Any] = (
            {"runner": "pooling"} if "runner" in engine_params else {"task": "embed"}
        )
        image_limit = {"limit_mm_per_prompt": {"image": 1}}

        self._describer = (
            vllm.LLM(model=describer_model, gpu_memory_utilization=share, **image_limit)
            if describer_model is not None
            else None
        )
        self._text = vllm.LLM(
            model=text_model,
            gpu_memory_utilization=share,
            **pooling,
            **(image_limit if image_model == text_model else {}),
        )
        if image_model is None:
            self._image = None
        elif image_model == text_model:
            self._image = self._text
        else:
            self._image = vllm.LLM(
                model=image_model, gpu_memory_utilization=share, **pooling, **image_limit
            )

    def describe(self, images: Sequence[Image.Image], titles: Sequence[str]) -> list[str]:
        if len(images) != len(titles):
            raise ValueError(f"{len(images)} images but {len(titles)} titles")
        if self._describer is None:
            raise BackendError(f"{self.name}: no describer model is configured")
        if not images:
            return []
        conversations = [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_data_uri(image)}},
                        {"type": "text", "text": self._prompt.format(title=title)},
                    ],
                }
            ]
            for image, title in zip(images, titles, strict=True)
        ]
        outputs = self._describer.chat(
            conversations, sampling_params=self._sampling, use_tqdm=False
        )
        return [output.outputs[0].text.strip() for output in outputs]

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.text_dim), dtype=np.float32)
        matrix = self._embed(self._text, list(texts))
        if self._text_dim is None:
            self._text_dim = matrix.shape[1]
        return matrix

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if self._image is None:
            raise BackendError(f"{self.name}: no image model is configured")
        if not images:
            return np.zeros((0, self.image_dim), dtype=np.float32)
        prompts = [
            {"prompt": self._image_prompt, "multi_modal_data": {"image": image.convert("RGB")}}
            for image in images
        ]
        matrix = self._embed(self._image, prompts)
        if self._image_dim is None:
            self._image_dim = matrix.shape[1]
        return matrix

    def close(self) -> None:
        """Drop the engines; vLLM frees GPU memory when an `LLM` is garbage-collected."""
        self._describer = self._text = self._image = None
        gc.collect()

    @staticmethod
    def _embed(engine: Any, prompts: list[Any]) -> np.ndarray:
        outputs = engine.embed(prompts, use_tqdm=False)
        return l2_normalise(np.asarray([output.outputs.embedding for output in outputs]))
