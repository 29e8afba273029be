# syntax=docker/dockerfile:1
# The operator image: runs the operator (`warmserve operator`, the default command; the manifests and the chart
# run it as `python -m warmserve.controller`) and the router (`warmserve router`). Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t warmserve/operator:dev .        (or: make images)
# The build context is cut down to what the COPY lines use by docker/operator.Dockerfile.dockerignore.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- builder: one pure-Python wheel of the whole distribution. The `warmserve` namespace spans two source roots
#    (operator/ and worker/) and setup.py maps them package by package, so setup.py must be in the context.
FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE ./
COPY operator ./operator
COPY worker ./worker
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# -- runtime: the wheel with the operator extra (kopf, kubernetes, aiohttp, prometheus-client, jsonschema); the
#    wheel is bind-mounted from the builder, so it leaves no layer behind. No pip cache, non-root user 65532.
FROM ${PYTHON_IMAGE}
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir "$(echo /wheels/warmserve-*.whl)[operator]" \
    && warmserve --help >/dev/null \
    && warmserve operator --help >/dev/null \
    && warmserve router --help >/dev/null \
    && useradd --uid 65532 --user-group --create-home --home-dir /home/warmserve --shell /usr/sbin/nologin warmserve \
    && rm -rf /root/.cache
ENV PYTHONUNBUFFERED=1
USER 65532:65532
WORKDIR /home/warmserve
# router: 8080 (HTTP); operator: 9090 (metrics), 8080 (health)
EXPOSE 8080 9090
ENTRYPOINT ["warmserve"]
CMD ["operator"]
