"""Plain manifests (kubectl apply -k manifests/): valid, complete, and consistent with the chart."""

from __future__ import annotations

import re
import shutil
import subprocess

import helm_python
import kubernetes_validate
import pytest
import yaml
from controller_support import EXAMPLES, REPO, load_yaml_docs
from test_controller_chart import CHART, _rules, render

MANIFESTS = REPO / "manifests"
# One namespace story (README "The operator on a cluster", the chart's NOTES.txt, manifests/, manifests/examples/):
# the operator and the router in warmserve-system, WarmPools and ModelDeployments in warmserve.
SYSTEM_NAMESPACE = "warmserve-system"
MODELS_NAMESPACE = "warmserve"


def kustomized_files() -> list:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    return [MANIFESTS / r for r in kustomization["resources"]]


def all_docs() -> list[dict]:
    return [d for path in kustomized_files() for d in load_yaml_docs(path)]


def test_kustomization_lists_every_install_file():
    listed = {p.resolve() for p in kustomized_files()}
    assert all(p.exists() for p in listed)
    on_disk = {p.resolve() for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml"}
    on_disk |= {p.resolve() for p in (MANIFESTS / "crds").glob("*.yaml")}
    assert on_disk == listed


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_plain_manifests_validate_strict(version):
    docs = all_docs()
    assert {d["kind"] for d in docs} >= {"Namespace", "CustomResourceDefinition", "ClusterRole", "Deployment", "Role"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_plain_rbac_equals_the_chart_rbac():
    docs = all_docs()
    chart = render({})
    assert _rules(docs, "-application") == _rules(chart, "-application")
    assert _rules(docs, "-framework") == _rules(chart, "-framework")
    worker = next(d for d in docs if d["kind"] == "Role")
    assert worker["rules"] == next(d for d in chart if d["kind"] == "Role")["rules"]


def test_operator_service_account_is_bound():
    docs = all_docs()
    sa = next(d for d in docs if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == "warmserve-operator")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    for binding in (d for d in docs if d["kind"] == "ClusterRoleBinding"):
        if (binding["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "router":
            continue  # the router's own read-only binding: test_router_install.py
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "warmserve-operator", "namespace": SYSTEM_NAMESPACE}
        ]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_kustomize_builds_offline():
    result = subprocess.run(["kubectl", "kustomize", str(MANIFESTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(built) == len(all_docs())


def example_docs() -> list[dict]:
    return [d for path in sorted(EXAMPLES.glob("*.yaml")) for d in load_yaml_docs(path)]


def worker_account(pool: dict) -> str:
    """The ServiceAccount a WarmPool's worker pods run as (the CRD's default when the pool names none)."""
    return ((pool.get("spec") or {}).get("worker") or {}).get("serviceAccountName", "warmserve-worker")


def test_operator_and_router_run_in_the_system_namespace():
    docs = all_docs()
    for doc in docs:
        worker = (doc["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "worker"
        if doc["kind"] in ("Deployment", "Service", "ServiceAccount") and not worker:
            assert doc["metadata"]["namespace"] == SYSTEM_NAMESPACE, (doc["kind"], doc["metadata"]["name"])
    (operator,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "warmserve-operator"]
    env = {e["name"]: e.get("value") for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["WARMSERVE_ROUTER_URL"] == f"http://warmserve-router.{SYSTEM_NAMESPACE}.svc:8080"
    namespaces = sorted(d["metadata"]["name"] for d in docs if d["kind"] == "Namespace")
    assert namespaces == sorted({SYSTEM_NAMESPACE, MODELS_NAMESPACE})


@pytest.mark.parametrize("source", ["plain manifests", "chart defaults"])
def test_every_example_lands_where_its_pool_can_run(source):
    """Each example names a namespace that the install creates (or that the release lives in) and in which the
    worker ServiceAccount of its pool exists, with the default values: applying it right after the install works."""
    if source == "plain manifests":
        docs, created = all_docs(), set()
    else:
        docs, created = render({}), {SYSTEM_NAMESPACE}  # helm install -n warmserve-system --create-namespace
    created |= {d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"}
    accounts = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs if d["kind"] == "ServiceAccount"}
    bound = {
        (d["metadata"]["namespace"], s["name"])
        for d in docs
        if d["kind"] == "RoleBinding"
        for s in d["subjects"]
        if s["kind"] == "ServiceAccount" and s.get("namespace") == d["metadata"]["namespace"]
    }
    examples = example_docs()
    assert {d["kind"] for d in examples} == {"WarmPool", "ModelDeployment"}
    pools = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in examples if d["kind"] == "WarmPool"}
    for doc in examples:
        namespace = doc["metadata"].get("namespace")
        assert namespace == MODELS_NAMESPACE, (doc["metadata"]["name"], namespace)
        assert namespace in created, f"{source}: namespace {namespace} of {doc['metadata']['name']} is not created"
        if doc["kind"] == "ModelDeployment":
            assert (namespace, doc["spec"]["poolRef"]["name"]) in pools, doc["metadata"]["name"]
    for (namespace, name), pool in pools.items():
        account = (namespace, worker_account(pool))
        assert account in accounts, f"{source}: no ServiceAccount {account} for WarmPool {namespace}/{name}"
        assert account in bound, f"{source}: ServiceAccount {account} has no RoleBinding"


def test_readme_and_notes_tell_the_same_story():
    readme = (REPO / "README.md").read_text()
    assert f"helm install warmserve helm/warmserve -n {SYSTEM_NAMESPACE} --create-namespace" in readme
    applied = re.findall(r"kubectl apply -f (manifests/examples/\S+\.yaml)", readme)
    assert applied and all((REPO / path).exists() for path in applied)
    notes = helm_python.Chart.load(str(CHART)).render({}, name="warmserve", namespace=SYSTEM_NAMESPACE)
    text = next(v for k, v in notes.items() if k.endswith("NOTES.txt"))
    assert f"go in: {MODELS_NAMESPACE} " in text
    urls = re.findall(r"kubectl apply -f https://raw\.githubusercontent\.com/warmserve/warmserve/main/(\S+)", text)
    assert len(urls) == 2 and all((REPO / path).exists() for path in urls), urls
    assert f"kubectl -n {MODELS_NAMESPACE} get mdep" in text
    assert f"kubectl -n {SYSTEM_NAMESPACE} port-forward svc/warmserve-router" in text
