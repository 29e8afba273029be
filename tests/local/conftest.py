"""Fixtures of the `warmserve up` tests: two generated tiny Llama models (bench/devmodels.py)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tiny-model generator is a benchmark helper (bench/devmodels.py), not part of the product package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))


@pytest.fixture(scope="session")
def tiny_models():
    """Two small Llama models (different seeds), generated once per session; the name marks tests `vllm`.

    They are written below /var/tmp, not /tmp: a pool's model cache (`modelCache.mountPath`, which every
    model source must lie in) may not be at or below /tmp, a directory the worker container needs.
    """
    from devmodels import make_llama

    root = tempfile.mkdtemp(prefix="warmserve-local-models-", dir="/var/tmp")
    try:
        yield {"alpha": make_llama(f"{root}/alpha", seed=1), "beta": make_llama(f"{root}/beta", seed=2)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
