"""Fixtures for worker tests: generated tiny models and a private shared-memory arena path."""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
    from warmserve.worker.devmodels import make_llama

    root = tmp_path_factory.mktemp("models")
    return {
        "alpha": make_llama(str(root / "alpha"), seed=1),
        "beta": make_llama(str(root / "beta"), seed=2, layers=3),
        "gamma": make_llama(str(root / "gamma"), seed=3, intermediate=384),
    }
