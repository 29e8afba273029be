"""Plain manifests (kubectl apply -k manifests/): valid, complete, and consistent with the chart."""

from __future__ import annotations

import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml
from controller_support import REPO, load_yaml_docs
from test_controller_chart import _rules, render

MANIFESTS = REPO / "manifests"


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
            {"kind": "ServiceAccount", "name": "warmserve-operator", "namespace": "warmserve"}
        ]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_kustomize_builds_offline():
    result = subprocess.run(["kubectl", "kustomize", str(MANIFESTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(built) == len(all_docs())
