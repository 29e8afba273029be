"""Fixtures for worker tests: generated tiny models and a private shared-memory arena path."""

from __future__ import annotations

import os
import sys
import uuid

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tiny-model generator is a benchmark helper (bench/devmodels.py), not part of the product package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))


@pytest.fixture
def shm_path():
    """A unique /dev/shm path, removed (with its ledger files) after the test."""
    path = f"/dev/shm/warmserve-test-{uuid.uuid4().hex[:10]}"
    yield path
    for name in os.listdir("/dev/shm"):
        if name.startswith(os.path.basename(path)):
            os.unlink(os.path.join("/dev/shm", name))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Three small Llama models (different seeds/sizes), generated once per session."""
    from devmodels import make_llama

    root = tmp_path_factory.mktemp("models")
    return {
        "alpha": make_llama(str(root / "alpha"), seed=1),
        "beta": make_llama(str(root / "beta"), seed=2, layers=3),
        "gamma": make_llama(str(root / "gamma"), seed=3, intermediate=384),
    }


# Tests of this directory that need vLLM or torch but use no fixture that tells tests/conftest.py so (tiny_models
# does): marked `vllm` here, so they are skipped with a reason where vLLM is missing, until their modules
# carry @pytest.mark.vllm themselves.
NEEDS_VLLM = frozenset(
    {
        "test_plugin_register_is_idempotent_and_safe",  # imports vLLM in a subprocess
        "test_cuda_backend_degrades_cleanly_without_cuda",  # imports warmserve.worker.binding (torch)
    }
)


def pytest_itemcollected(item: pytest.Item) -> None:  # called for the items of this directory only
    if getattr(item, "originalname", item.name) in NEEDS_VLLM:
        item.add_marker(pytest.mark.vllm)
