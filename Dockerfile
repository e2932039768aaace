# syntax=docker/dockerfile:1
# Laneway's images, two targets of one file:
#
#   docker build --target api    -t laneway-api .     # API, verifier, controller: no torch
#   docker build --target worker -t laneway-worker .  # workers: CUDA runtime and torch
#
# The install steps are .ci/setup's: torch pinned first (worker only), then Laneway, here
# without the test extra and without the bundled server (a fleet runs its own Redis).
# Both images run `laneway SUB-COMMAND ...` under tini, so SIGTERM reaches the process
# (a worker drains on it) even before its own handler is installed.

ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

# ---- api: the router API, the verifier and the controller ---------------------------
FROM ${PYTHON_IMAGE} AS api
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home laneway
WORKDIR /app
# dependencies first (a layer that survives code changes), less the GPU-only packages:
# these processes never import them (tests/test_deploy_image.py)
COPY pyproject.toml ./
COPY deploy/image_requirements.py deploy/
RUN python -m pip install --upgrade pip \
    && python deploy/image_requirements.py --no-gpu > /tmp/requirements.txt \
    && python -m pip install -r /tmp/requirements.txt
COPY README.md ./
COPY controlplane controlplane
COPY router router
COPY engines engines
COPY verifier verifier
COPY laneway laneway
COPY policies policies
# --no-deps: the requirements are in; the project's own list would pull torch back in
RUN python -m pip install --no-deps . \
    && python -c "import router.app, verifier.verifier_main, controlplane.reconcile" \
    && python -c "from verifier.typography import ocr_engine; ocr_engine()" \
    && laneway --help > /dev/null
USER 10001
ENTRYPOINT ["tini", "--", "laneway"]
CMD ["--help"]

# ---- worker: one GPU (or a CPU pool for resize and remote engines) ------------------
FROM ${CUDA_IMAGE} AS worker
# torch pinned as in .ci/setup (the version the tests run); the default index's Linux
# wheel is a CUDA build. TORCH_INDEX_URL picks another wheel index (a CUDA version).
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home laneway \
    && python3.11 -m venv /opt/venv
WORKDIR /app
RUN python -m pip install --upgrade pip \
    && python -m pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
COPY pyproject.toml ./
COPY deploy/image_requirements.py deploy/
RUN python deploy/image_requirements.py > /tmp/requirements.txt \
    && python -m pip install -r /tmp/requirements.txt
COPY README.md ./
COPY controlplane controlplane
COPY router router
COPY engines engines
COPY verifier verifier
COPY laneway laneway
COPY policies policies
RUN python -m pip install --no-deps . \
    && python -c "import torch, diffusers, engines.worker_main" \
    && laneway --help > /dev/null
USER 10001
ENTRYPOINT ["tini", "--", "laneway"]
CMD ["worker", "--help"]
