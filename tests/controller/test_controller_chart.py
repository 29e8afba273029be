"""Helm chart tests with the in-process Helm engine (helm-python-sdk): lint, render matrix, schema, RBAC."""

from __future__ import annotations

import filecmp
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from controller_support import CRD_DIR, REPO

CHART = REPO / "helm" / "warmserve"
VERSIONS = ("1.30.0", "1.37.0")

MATRIX = {
    "defaults": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "ha": {"ha": {"enabled": True, "replicas": 3, "peeringName": "warmserve"}},
    "no-metrics-no-rbac": {
        "metrics": {"enabled": False},
        "rbac": {"create": False},
        "serviceAccount": {"create": False, "name": "existing"},
    },
    "model-cache-and-scheduling": {
        "modelCache": {"claimName": "weights", "mountPath": "/models"},
        "nodeSelector": {"node-role": "control"},
        "tolerations": [{"key": "infra", "operator": "Exists", "effect": "NoSchedule"}],
        "image": {"repository": "registry.local/warmserve", "tag": "dev", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "priorityClassName": "system-cluster-critical",
        "log": {"format": "text", "level": "debug"},
    },
    "hardened": {
        "networkPolicy": {"enabled": True, "enginePorts": {"start": 18000, "end": 18063}, "workerMetricsPort": 9500},
        "watchNamespaces": ["team-a"],
        "worker": {"allowedServiceAccounts": ["gpu-worker"]},
        "specPolicy": {
            "hostPathRoots": ["/data/models"],
            "allowSystemPriorityClasses": True,
            "prometheusHosts": ["prometheus.monitoring.svc"],
            "engineArgsAllowed": ["--my-flag", "--my-switch=bool"],
            "historyBudgetBytes": 500000,
        },
    },
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    chart = helm_python.Chart.load(str(CHART))
    out = chart.render(values, name="warmserve", namespace="warmserve-system")
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_chart_lints_strict():
    result = helm_python.lint(str(CHART), strict=True)
    assert result["errors"] == []
    assert [m for m in result["messages"] if m["severity"] > 1] == [], result["messages"]


def test_chart_crds_are_byte_identical_to_repository_crds():
    repo = sorted(p.name for p in CRD_DIR.glob("*.yaml"))
    chart = sorted(p.name for p in (CHART / "crds").iterdir())
    assert repo == chart and repo
    _, mismatch, errors = filecmp.cmpfiles(CRD_DIR, CHART / "crds", repo, shallow=False)
    assert mismatch == [] and errors == []
    plain = REPO / "manifests" / "crds"
    _, mismatch, errors = filecmp.cmpfiles(CRD_DIR, plain, repo, shallow=False)
    assert mismatch == [] and errors == [], "manifests/crds must equal crds/ too"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", sorted(MATRIX))
def test_every_rendered_document_validates(case, version):
    docs = render(MATRIX[case])
    assert docs
    for doc in docs:
        if doc["apiVersion"] == "kopf.dev/v1":
            continue  # a custom resource of the CRD rendered beside it
        kubernetes_validate.validate(doc, version, strict=True)


def test_recommended_labels_and_selectors():
    docs = render({})
    for doc in docs:
        labels = doc["metadata"]["labels"]
        for key in (
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/managed-by",
            "helm.sh/chart",
        ):
            assert key in labels, (doc["kind"], key)
    component = "app.kubernetes.io/component"

    def operator(kind):  # by its component label, not by template file order (the router has its own)
        (doc,) = (d for d in by_kind(docs, kind) if d["metadata"]["labels"][component] == "operator")
        return doc

    deployment = operator("Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert set(selector) == {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    service = operator("Service")
    assert service["spec"]["selector"] == selector


def _rules(docs, name_suffix):
    role = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith(name_suffix))
    return {(tuple(r["apiGroups"]), tuple(r["resources"])): tuple(r["verbs"]) for r in role["rules"]}


def test_rbac_is_least_privilege_with_exact_verbs():
    docs = render({})
    app = _rules(docs, "-application")
    assert app == {
        (("warmserve.io",), ("warmpools", "modeldeployments")): ("get", "list", "watch", "patch"),
        (("warmserve.io",), ("warmpools/status", "modeldeployments/status")): ("patch",),
        (("apps",), ("daemonsets",)): ("get", "create", "patch"),
        (("",), ("pods",)): ("list", "patch"),
        (("",), ("configmaps",)): ("get", "create", "patch"),
        (("", "events.k8s.io"), ("events",)): ("create",),
    }
    assert all("*" not in verbs for verbs in app.values())
    framework = _rules(docs, "-framework")
    assert (("kopf.dev",), ("clusterkopfpeerings",)) not in framework
    assert (("kopf.dev",), ("clusterkopfpeerings",)) in _rules(render(MATRIX["ha"]), "-framework")
    # Besides the router's own read-only binding (tests/controller/test_router_install.py):
    bindings = by_kind(docs, "ClusterRoleBinding")
    assert len([b for b in bindings if b["metadata"]["labels"].get("app.kubernetes.io/component") != "router"]) == 2


def test_namespaced_mode_binds_only_watched_namespaces():
    docs = render(MATRIX["namespaced"])
    bindings = by_kind(docs, "RoleBinding")
    app = [b for b in bindings if b["metadata"]["name"].endswith("-application")]
    assert sorted(b["metadata"]["namespace"] for b in app) == ["team-a", "team-b"]
    assert [b["metadata"]["name"] for b in by_kind(docs, "ClusterRoleBinding")] == ["warmserve-framework"]
    worker_sas = sorted(
        s["metadata"]["namespace"]
        for s in by_kind(docs, "ServiceAccount")
        if s["metadata"]["name"] == "warmserve-worker"
    )
    assert worker_sas == ["team-a", "team-b", "warmserve-system"]
    env = {
        e["name"]: e["value"]
        for e in by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["WARMSERVE_NAMESPACES"] == "team-a,team-b"


def test_worker_role_is_own_pod_only():
    """RBAC cannot name the DaemonSet's pods, so the Role is the minimum the agent needs (get and watch its pod,
    patch its state) and an admission policy narrows patch to the pod the worker's token is bound to and to the
    state annotation (its CEL is evaluated in test_controller_admission.py)."""
    docs = render({})
    role = next(d for d in docs if d["kind"] == "Role")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "watch", "patch"]}]
    (vap,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
    (binding,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    assert binding["spec"]["policyName"] == vap["metadata"]["name"] and binding["spec"]["validationActions"] == ["Deny"]
    assert "warmserve-worker" in vap["spec"]["matchConditions"][0]["expression"]
    assert vap["spec"]["failurePolicy"] == "Fail"
    expressions = " ".join(v["expression"] for v in vap["spec"]["validations"])
    assert "authentication.kubernetes.io/pod-name" in expressions and "warmserve.io/state" in expressions


def test_network_policies_are_opt_in_and_admit_only_router_operator_and_prometheus():
    assert not by_kind(render({}), "NetworkPolicy"), "off by default"
    docs = render(MATRIX["hardened"])
    policies = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in by_kind(docs, "NetworkPolicy")}
    assert set(policies) == {
        ("warmserve-system", "warmserve-workers"),
        ("team-a", "warmserve-workers"),
        ("warmserve-system", "warmserve-operator"),
    }
    workers = policies["team-a", "warmserve-workers"]["spec"]
    assert workers["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "warmserve",
        "app.kubernetes.io/component": "worker",
    }
    assert workers["policyTypes"] == ["Ingress"]
    router, operator, prometheus = workers["ingress"]
    assert router["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "router"
    assert router["ports"] == [{"protocol": "TCP", "port": 18000, "endPort": 18063}]
    assert operator["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    assert {"protocol": "TCP", "port": 9500} in operator["ports"]
    for rule in (router, operator):
        assert rule["from"][0]["namespaceSelector"] == {
            "matchLabels": {"kubernetes.io/metadata.name": "warmserve-system"}
        }
    assert prometheus["from"][0]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    assert prometheus["ports"] == [{"protocol": "TCP", "port": 9500}]
    # the worker pods the operator builds carry the labels the policy selects
    from warmserve.controller.builders import common_labels

    assert workers["podSelector"]["matchLabels"].items() <= common_labels("pool1").items()
    op = policies["warmserve-system", "warmserve-operator"]["spec"]
    assert op["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 9090}]
    no_router = by_kind(render({**MATRIX["hardened"], "router": {"enabled": False}}), "NetworkPolicy")
    assert all(len(p["spec"]["ingress"]) == 2 for p in no_router if p["metadata"]["name"].endswith("-workers"))


def test_spec_policy_settings_reach_the_operator():
    from warmserve.controller.settings import ControllerConfig

    docs = render(MATRIX["hardened"])
    deployment = next(
        d for d in by_kind(docs, "Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    )
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    config = ControllerConfig.from_env({k: v for k, v in env.items() if v is not None})
    assert config.worker_service_accounts == ("warmserve-worker", "gpu-worker")
    assert config.host_path_roots == ("/data/models",) and config.allow_system_priority_classes
    assert config.prometheus_hosts == ("prometheus.monitoring.svc",)
    assert config.engine_args_allowed == ("--my-flag", "--my-switch=bool") and config.history_budget_bytes == 500000
    defaults = ControllerConfig.from_env(
        {
            e["name"]: e.get("value")
            for e in by_kind(render({}), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["env"]
        }
    )
    assert defaults.rules == ControllerConfig().rules, "the chart's defaults are the operator's"


def test_ha_runs_replicas_with_peering_and_distinct_priorities():
    docs = render(MATRIX["ha"])
    deployment = by_kind(docs, "Deployment")[0]
    assert deployment["spec"]["replicas"] == 3 and "strategy" not in deployment["spec"]
    env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["WARMSERVE_PEERING"] == "warmserve" and env["WARMSERVE_PRIORITY"] == "random"
    assert by_kind(docs, "ClusterKopfPeering")[0]["metadata"]["name"] == "warmserve"
    single = by_kind(render({}), "Deployment")[0]
    assert single["spec"]["replicas"] == 1 and single["spec"]["strategy"]["type"] == "Recreate"


def test_operator_settings_reach_the_container():
    from warmserve.controller.settings import ControllerConfig

    docs = render(MATRIX["model-cache-and-scheduling"])
    pod = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    config = ControllerConfig.from_env(env)
    assert config.pvc_root == "/models" and config.log_format == "text" and config.clusterwide
    assert pod["containers"][0]["image"] == "registry.local/warmserve:dev"
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert "/models/weights" in mounts
    assert pod["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize(
    "values",
    [
        {"image": {"repository": "x", "pullPolicy": "Sometimes"}},
        {"watchNamespaces": ["Not_A_Namespace"]},
        {"ha": {"enabled": True, "replicas": 1}},
        {"metrics": {"port": 70000}},
        {"log": {"format": "xml"}},
        {"unknownKey": 1},
        {"modelCache": {"mountPath": "relative"}},
    ],
)
def test_values_schema_rejects(values):
    chart = helm_python.Chart.load(str(CHART))
    with pytest.raises(helm_python.HelmError):
        chart.render(values, name="warmserve", namespace="warmserve-system")
