"""End-to-end test on a kind cluster: CRDs, the operator image, a CPU-only pool and a model.

Needs docker, kind and kubectl on PATH (not available on the CI machine of this repository, where the test
skips and says so). Run it where Docker exists:

    WARMSERVE_E2E_KIND=1 pytest tests/controller/test_controller_e2e_kind.py -s
    # or directly: python e2e/kind/e2e_kind.py

It creates the cluster `warmserve-e2e`, builds and loads the operator image, applies `manifests/`, then
checks what only a real API server can show: the CRD schemas and CEL rules reject bad objects, defaults are
applied, the operator creates the worker DaemonSet (owner references → garbage collection), worker pods
get a `warmserve.io/plan`, a ModelDeployment gets conditions and observedGeneration, and deleting it
removes it from every plan. The worker image is the operator image (same distribution), so whether the
worker runs for real depends on the worker package; the checks above do not depend on it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLUSTER = "warmserve-e2e"
IMAGE = "warmserve/operator:e2e"
NS = "warmserve"


def missing_tools() -> list[str]:
    return [tool for tool in ("docker", "kind", "kubectl") if shutil.which(tool) is None]


def docker_usable() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


def skip_reason() -> str | None:
    """Why the kind e2e cannot run here, or None when it can."""
    missing = missing_tools()
    if missing:
        return f"kind e2e needs docker, kind and kubectl; missing here: {', '.join(missing)}"
    if not docker_usable():
        return "kind e2e needs a running Docker daemon (`docker info` failed)"
    return None


def sh(*args: str, check: bool = True, input: str | None = None, timeout: float = 600) -> str:
    result = subprocess.run(list(args), capture_output=True, text=True, input=input, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def kubectl(*args: str, **kw) -> str:
    return sh("kubectl", "--context", f"kind-{CLUSTER}", *args, **kw)


def get(kind: str, name: str) -> dict:
    return json.loads(kubectl("get", kind, name, "-n", NS, "-o", "json"))


def wait(predicate, timeout: float = 180, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except RuntimeError:
            value = None
        if value:
            return value
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what}")


def create_cluster() -> None:
    clusters = sh("kind", "get", "clusters").split()
    if CLUSTER not in clusters:
        sh("kind", "create", "cluster", "--config", str(REPO / "e2e/kind/kind-config.yaml"), "--wait", "120s")
    sh("docker", "build", "-f", str(REPO / "e2e/kind/Dockerfile.operator"), "-t", IMAGE, str(REPO), timeout=1200)
    sh("kind", "load", "docker-image", IMAGE, "--name", CLUSTER)


def install() -> None:
    kubectl("apply", "-k", str(REPO / "manifests"))
    kubectl("wait", "--for=condition=Established", "crd/warmpools.warmserve.io", "crd/modeldeployments.warmserve.io")
    kubectl("-n", NS, "set", "image", "deployment/warmserve-operator", f"operator={IMAGE}")
    kubectl("-n", NS, "rollout", "status", "deployment/warmserve-operator", "--timeout=180s")


def run() -> None:
    create_cluster()
    install()
    # the API server enforces the schema and the CEL rules
    bad = {"apiVersion": "warmserve.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "bad", "namespace": NS},
           "spec": {"poolRef": {"name": "cpu"}, "model": {"source": "pvc://x/y", "tensorParallelSize": 3}}}
    result = subprocess.run(["kubectl", "--context", f"kind-{CLUSTER}", "apply", "-f", "-"], input=json.dumps(bad),
                            capture_output=True, text=True)
    assert result.returncode != 0 and "power of two" in result.stderr, result.stderr

    pool = {"apiVersion": "warmserve.io/v1alpha1", "kind": "WarmPool", "metadata": {"name": "cpu", "namespace": NS},
            "spec": {"gpu": {"count": 0, "memoryMiB": 2048}, "nodeSelector": {"warmserve.io/e2e": "true"},
                     "worker": {"image": IMAGE, "cpu": "500m", "memory": "1Gi", "shmSize": "256Mi"},
                     "policy": {"intervalSeconds": 2}}}
    kubectl("apply", "-f", "-", input=json.dumps(pool))
    applied = get("warmpool", "cpu")
    assert applied["spec"]["forecast"]["windowSeconds"] == 300, "CRD defaults applied by the API server"
    ds = wait(lambda: get("daemonset", "cpu-worker"), what="worker DaemonSet")
    assert ds["metadata"]["ownerReferences"][0]["kind"] == "WarmPool"

    model = {"apiVersion": "warmserve.io/v1alpha1", "kind": "ModelDeployment",
             "metadata": {"name": "tiny", "namespace": NS},
             "spec": {"poolRef": {"name": "cpu"}, "model": {"source": "file:///models/tiny", "weightBytes": 50000000},
                      "prewarm": {"minWarmReplicas": 1}}}
    kubectl("apply", "-f", "-", input=json.dumps(model))

    def model_valid():
        status = get("modeldeployment", "tiny").get("status") or {}
        return status.get("observedGeneration") == 1 and any(
            c["type"] == "Valid" and c["status"] == "True" for c in status.get("conditions", []))

    wait(model_valid, what="ModelDeployment Valid")

    def planned():
        pods = json.loads(kubectl("get", "pods", "-n", NS, "-l", "warmserve.io/pool=cpu", "-o", "json"))["items"]
        plans = [json.loads(p["metadata"].get("annotations", {}).get("warmserve.io/plan", "null") or "null") for p in pods]
        return [p for p in plans if p and any(g["replicas"] for g in p["groups"])]

    wait(planned, what="a plan holding the model on a worker pod")
    kubectl("delete", "modeldeployment", "tiny", "-n", NS, "--timeout=60s")
    wait(lambda: not planned(), what="the model removed from every plan")
    kubectl("delete", "warmpool", "cpu", "-n", NS, "--timeout=60s")

    def daemonset_gone():
        probe = subprocess.run(["kubectl", "--context", f"kind-{CLUSTER}", "get", "daemonset", "cpu-worker", "-n", NS],
                               capture_output=True, text=True)
        return probe.returncode != 0 and "NotFound" in probe.stderr

    wait(daemonset_gone, what="the worker DaemonSet garbage-collected with its WarmPool")


def delete_cluster() -> None:
    sh("kind", "delete", "cluster", "--name", CLUSTER, check=False)


if __name__ == "__main__":
    reason = skip_reason()
    if reason:
        print(f"SKIP: {reason}")
        sys.exit(0)
    try:
        run()
        print("kind e2e passed")
    finally:
        if "--keep" not in sys.argv:
            delete_cluster()
