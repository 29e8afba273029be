"""The router (`warmserve router`) in the Helm chart and the plain manifests: rendered on and off, valid
(kubernetes-validate strict), one router (Deployment and Service) whatever the watch scope, read-only RBAC scoped
like the operator's, a hardened pod that drains what it holds, a PodDisruptionBudget with several replicas, a
Service that selects it, and plain manifests carrying the same objects."""

from __future__ import annotations

import math
import os
from typing import Any
from unittest import mock

import helm_python
import kubernetes_validate
import pytest
import yaml
from controller_support import REPO, load_yaml_docs

CHART = REPO / "helm" / "warmserve"
MANIFESTS = REPO / "manifests"
VERSIONS = ("1.30.0", "1.37.0")
RELEASE, NAMESPACE = "warmserve", "warmserve-system"
ROUTER = "app.kubernetes.io/component"  # label key whose value is "router" on every router object
READ_ONLY = {"get", "list", "watch"}
ROUTER_RULES = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["warmserve.io"], "resources": ["modeldeployments"], "verbs": ["get", "list", "watch"]},
]

CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "router-off": {"router": {"enabled": False}},
    "one-namespace": {"watchNamespaces": ["team-a"]},
    "two-namespaces": {"watchNamespaces": ["team-a", "team-b"]},
    "three-namespaces-two-replicas": {"watchNamespaces": ["team-a", "team-b", "team-c"], "router": {"replicas": 2}},
    "ha": {"ha": {"enabled": True, "replicas": 3, "peeringName": "warmserve"}},
    "no-rbac": {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "existing"}},
    "custom": {
        "image": {"repository": "registry.local/warmserve", "tag": "dev", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "metrics": {"enabled": False, "annotations": False},
        "router": {
            "replicas": 3,
            "image": {"tag": "router-dev", "pullPolicy": "Never"},
            "service": {"type": "LoadBalancer", "port": 80},
            "maxQueue": 32,
            "maxWaitSeconds": 12.5,
            "logLevel": "debug",
            "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        },
    },
}


def render_files(values: dict[str, Any], namespace: str = NAMESPACE) -> dict[str, str]:
    return helm_python.Chart.load(str(CHART)).render(values, name=RELEASE, namespace=namespace)


def render(values: dict[str, Any], namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    docs = []
    for path, text in sorted(render_files(values, namespace).items()):
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def router_docs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if (d["metadata"].get("labels") or {}).get(ROUTER) == "router"]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, (kind, [d["metadata"]["name"] for d in found])
    return found[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


PARSER_ENV = ("WATCH_NAMESPACE", "WARMSERVE_LOG_LEVEL")  # environment variables the router's parser defaults from


def parse_router_command(c: dict[str, Any]):
    """The container's command line, parsed by the router's own argument parser (warmserve.router.__main__)."""
    from warmserve.router.__main__ import build_parser

    assert c["command"] == ["warmserve", "router"]
    assert all(isinstance(a, str) for a in c["args"])
    # The container sets none of the parser's environment defaults, so parse without the test process's either.
    assert not {e["name"] for e in c.get("env", [])} & set(PARSER_ENV)
    with mock.patch.dict(os.environ):
        for name in PARSER_ENV:
            os.environ.pop(name, None)
        args = build_parser().parse_args(c["args"])
    args.namespace = args.namespace or []  # no --namespace: every namespace (or WATCH_NAMESPACE, unset here)
    return args


def router_deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(router_docs(docs), "Deployment")


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


# -- the chart --------------------------------------------------------------------------------------------------


def test_chart_lints_strict_with_router_on_and_off():
    for values in ({}, {"router": {"enabled": False}}, CASES["two-namespaces"]):
        result = helm_python.lint(str(CHART), values, strict=True)
        assert result["errors"] == [], values
        assert [m for m in result["messages"] if m["severity"] > 1] == [], (values, result["messages"])


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_rendered_document_validates(case, version):
    docs = render(CASES[case])
    assert docs
    for doc in docs:
        if doc["apiVersion"] == "kopf.dev/v1":
            continue  # the ClusterKopfPeering of the HA case: a custom resource of a CRD rendered beside it
        kubernetes_validate.validate(doc, version, strict=True)


def test_router_renders_by_default_and_not_when_disabled():
    on = render({})
    router = router_docs(on)
    assert sorted(d["kind"] for d in router) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "ServiceAccount",
    ]
    assert {d["metadata"]["name"] for d in router} == {"warmserve-router"}
    assert all(
        d["metadata"]["namespace"] == NAMESPACE
        for d in router
        if d["kind"] not in ("ClusterRole", "ClusterRoleBinding")
    )

    namespaced = router_docs(render(CASES["two-namespaces"]))
    assert sorted(d["kind"] for d in namespaced) == [
        "Deployment",
        "Role",
        "Role",
        "RoleBinding",
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]
    assert {d["metadata"]["name"] for d in namespaced} == {"warmserve-router"}

    for values in ({"router": {"enabled": False}}, {"router": {"enabled": False}, **CASES["two-namespaces"]}):
        off = render(values)
        assert router_docs(off) == []
        assert not [d for d in off if "router" in d["metadata"]["name"]]
    # Turning the router off removes its objects and changes nothing else but the operator's router URL.
    rest = [d for d in on if d not in router]
    for d in rest:
        if d["kind"] == "Deployment":
            c = container(d)
            c["env"] = [e for e in c.get("env", []) if e["name"] != "WARMSERVE_ROUTER_URL"]
    assert render({"router": {"enabled": False}}) == rest


def _router_rbac(docs):
    router = router_docs(docs)
    roles = [d for d in router if d["kind"] in ("Role", "ClusterRole")]
    bindings = [d for d in router if d["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    return roles, bindings


ROUTED = sorted(c for c in CASES if c not in ("router-off", "no-rbac"))  # the router with its RBAC


@pytest.mark.parametrize("case", sorted(c for c in CASES if c != "router-off"))
def test_one_router_deployment_and_service_whatever_the_scope(case):
    router = router_docs(render(CASES[case]))
    deployment, service, sa = one(router, "Deployment"), one(router, "Service"), one(router, "ServiceAccount")
    assert deployment["metadata"]["name"] == service["metadata"]["name"] == sa["metadata"]["name"] == "warmserve-router"
    assert {d["metadata"]["namespace"] for d in (deployment, service, sa)} == {NAMESPACE}


@pytest.mark.parametrize("case", ROUTED)
def test_router_rbac_is_read_only_on_pods_and_modeldeployments(case):
    docs = render(CASES[case])
    roles, bindings = _router_rbac(docs)
    assert roles and bindings
    for role in roles:
        assert role["rules"] == ROUTER_RULES, role["metadata"]
        for rule in role["rules"]:
            assert set(rule["verbs"]) <= READ_ONLY
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
            assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
        assert granted == {("", "pods"), ("warmserve.io", "modeldeployments")}
    sa = one([d for d in router_docs(docs) if d["kind"] == "ServiceAccount"], "ServiceAccount")
    router_subject = {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}
    for binding in bindings:
        assert binding["subjects"] == [router_subject]
        assert binding["roleRef"]["kind"] == ("Role" if binding["kind"] == "RoleBinding" else "ClusterRole")
        assert binding["roleRef"]["name"] == sa["metadata"]["name"]
        if binding["kind"] == "RoleBinding":  # binds the Role of its own namespace
            assert any(
                r["kind"] == "Role" and r["metadata"]["namespace"] == binding["metadata"]["namespace"] for r in roles
            )
    # The router's identity gains nothing else: no other binding names it, and its pods run as it.
    others = [d for d in docs if d["kind"].endswith("Binding") and d not in bindings]
    assert all(router_subject not in (b.get("subjects") or []) for b in others)
    assert router_deployment(docs)["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_router_rbac_scope_follows_the_operator_watch_scope():
    roles, bindings = _router_rbac(render({}))
    assert [r["kind"] for r in roles] == ["ClusterRole"] and [b["kind"] for b in bindings] == ["ClusterRoleBinding"]

    for case, namespaces in (("one-namespace", ["team-a"]), ("two-namespaces", ["team-a", "team-b"])):
        roles, bindings = _router_rbac(render(CASES[case]))
        assert {r["kind"] for r in roles} == {"Role"} and {b["kind"] for b in bindings} == {"RoleBinding"}
        assert sorted(r["metadata"]["namespace"] for r in roles) == namespaces
        assert sorted(b["metadata"]["namespace"] for b in bindings) == namespaces

    docs = render(CASES["no-rbac"])  # rbac.create=false: bring your own bindings, as for the operator
    assert _router_rbac(docs) == ([], [])
    assert one(router_docs(docs), "ServiceAccount")["metadata"]["name"] == "warmserve-router"


@pytest.mark.parametrize("case", ["defaults", "one-namespace", "two-namespaces", "custom"])
def test_router_pod_is_hardened(case):
    deployment = router_deployment(render(CASES[case]))
    pod = deployment["spec"]["template"]["spec"]
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert isinstance(psc["runAsUser"], int) and psc["runAsUser"] > 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    c = container(deployment)
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert not sc.get("privileged") and "add" not in sc["capabilities"]
    assert sc.get("runAsUser", psc["runAsUser"]) > 0
    # Probes: liveness on /healthz, readiness on /readyz, on the named http port.
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]
    # A read-only root file system still gets a writable /tmp (Python's tempfile).
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]


@pytest.mark.parametrize("case", ROUTED)
def test_router_service_selects_exactly_its_deployment(case):
    docs = render(CASES[case])
    deployment, service = router_deployment(docs), one(router_docs(docs), "Service")
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] == "Deployment"
    }
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selects(selector, deployment["spec"]["template"]["metadata"]["labels"])
    for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance"):
        assert key in selector
    assert selector[ROUTER] == "router"
    assert service["spec"]["selector"] == selector
    # ... and no other Deployment's pods (the operator's).
    assert [n for n, labels in pods.items() if selects(selector, labels)] == [deployment["metadata"]["name"]]
    (port,) = service["spec"]["ports"]
    assert port["name"] == "http" and port["targetPort"] == "http" and port["protocol"] == "TCP"
    assert port["port"] == (80 if case == "custom" else 8080)
    # The operator's metrics Service does not pick up router pods either.
    for other in (d for d in docs if d["kind"] == "Service" and d is not service):
        assert not selects(other["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])


def test_router_command_line_and_image_defaults():
    deployment = router_deployment(render({}))
    c = container(deployment)
    args = parse_router_command(c)
    assert (args.port, args.namespace, args.max_queue, args.max_wait_seconds, args.log_level) == (
        8080,
        [],  # no --namespace: every namespace
        256,
        300.0,
        "info",
    )
    operator = next(d for d in render({}) if d["kind"] == "Deployment" and d["metadata"]["name"] == "warmserve")
    assert c["image"] == container(operator)["image"] == "ghcr.io/warmserve/operator:0.1.0"
    assert c["imagePullPolicy"] == container(operator)["imagePullPolicy"]
    assert deployment["spec"]["replicas"] == 1
    service = one(router_docs(render({})), "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["metadata"]["annotations"]["prometheus.io/port"] == "8080"


def test_the_warmserve_command_dispatches_router():
    """The image runs `warmserve router ...`: the router's own parser (warmserve.router.__main__.build_parser) takes
    the rendered args, and the `warmserve` entry point must know the subcommand and pass them through (as it does
    for `operator` and `worker`). The second part fails until `router` is wired into warmserve.cli."""
    from warmserve.cli import build_parser as cli_parser

    containers = {case: container(router_deployment(render(CASES[case]))) for case in ROUTED}
    for c in containers.values():
        parse_router_command(c)
    for case, c in containers.items():
        args, rest = cli_parser().parse_known_args(c["command"][1:] + c["args"])
        assert args.command == "router", case
        assert rest == c["args"], case


def test_router_values_reach_the_objects():
    docs = router_docs(render(CASES["custom"]))
    deployment = one(docs, "Deployment")
    c = container(deployment)
    args = parse_router_command(c)
    assert (args.port, args.namespace, args.max_queue, args.max_wait_seconds, args.log_level) == (
        8080,
        [],
        32,
        12.5,
        "debug",
    )
    assert c["image"] == "registry.local/warmserve:router-dev"  # repository from image, tag from router.image
    assert c["imagePullPolicy"] == "Never"
    assert c["resources"] == {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    service = one(docs, "Service")
    assert service["spec"]["type"] == "LoadBalancer" and "annotations" not in service["metadata"]
    image = {"repository": "r.io/ws", "tag": "7", "pullPolicy": "Always"}
    image_only = container(router_deployment(render({"image": image})))
    assert image_only["image"] == "r.io/ws:7" and image_only["imagePullPolicy"] == "Always"


@pytest.mark.parametrize("case", ["defaults", "one-namespace", "two-namespaces", "three-namespaces-two-replicas"])
def test_router_discovers_in_the_watched_namespaces(case):
    """One router: `--namespace` once per watched namespace (none: every namespace), and it may read exactly
    there: a Role in each of them, or a ClusterRole when it discovers everywhere."""
    watched = CASES[case].get("watchNamespaces", [])
    docs = render(CASES[case])
    c = container(router_deployment(docs))
    assert parse_router_command(c).namespace == watched
    assert c["args"].count("--namespace") == len(watched)
    roles, bindings = _router_rbac(docs)
    if watched:
        assert [r["metadata"]["namespace"] for r in roles] == watched
        assert [b["metadata"]["namespace"] for b in bindings] == watched
    else:
        assert [r["kind"] for r in roles] == ["ClusterRole"] and [b["kind"] for b in bindings] == ["ClusterRoleBinding"]


@pytest.mark.parametrize("max_wait", [0.5, 12.5, 300, 3600])
def test_router_grace_period_lets_held_requests_drain(max_wait):
    """A stopping router pod answers what it holds: a held request waits up to --max-wait-seconds, then needs an
    engine's answer, so the pod's grace period is that plus a margin (and follows the value)."""
    pod = router_deployment(render({"router": {"maxWaitSeconds": max_wait}}))["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    assert isinstance(grace, int)
    assert parse_router_command(pod["containers"][0]).max_wait_seconds == max_wait
    assert grace >= math.ceil(max_wait) + 15
    for case in ROUTED:  # every rendering carries it, derived from its own maxWaitSeconds
        pod = router_deployment(render(CASES[case]))["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= parse_router_command(pod["containers"][0]).max_wait_seconds + 15


def test_router_disruption_budget_only_with_several_replicas():
    for values in ({}, CASES["two-namespaces"], {"router": {"replicas": 1}}):
        assert not [d for d in render(values) if d["kind"] == "PodDisruptionBudget"], values
    for values in (CASES["custom"], CASES["three-namespaces-two-replicas"], {"router": {"replicas": 2}}):
        docs = render(values)
        pdb = one(docs, "PodDisruptionBudget")  # the chart's only one, and the router's
        assert pdb in router_docs(docs)
        deployment = router_deployment(docs)
        assert deployment["spec"]["replicas"] > 1
        assert pdb["apiVersion"] == "policy/v1"
        assert pdb["metadata"]["namespace"] == deployment["metadata"]["namespace"] == NAMESPACE
        assert pdb["spec"] == {"minAvailable": 1, "selector": deployment["spec"]["selector"]}
        # It covers the router's pods only, not the operator's.
        pods = [d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] == "Deployment"]
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert [labels for labels in pods if selects(selector, labels)] == [
            deployment["spec"]["template"]["metadata"]["labels"]
        ]
    assert router_docs(render({"router": {"enabled": False, "replicas": 3}})) == []


def test_notes_tell_how_to_reach_the_router():
    notes = render_files({})["warmserve/templates/NOTES.txt"]
    assert f"kubectl -n {NAMESPACE} port-forward svc/warmserve-router 8080:8080" in notes
    assert "curl http://localhost:8080/v1/models" in notes
    assert f"http://warmserve-router.{NAMESPACE}.svc:8080/v1" in notes
    assert "router" not in render_files({"router": {"enabled": False}})["warmserve/templates/NOTES.txt"]
    two = render_files(CASES["two-namespaces"])["warmserve/templates/NOTES.txt"]
    assert "port-forward svc/warmserve-router 8080:8080" in two  # the same one router
    assert "team-a, team-b" in two and "warmserve-router-team" not in two


@pytest.mark.parametrize(
    "values",
    [
        {"router": {"unknown": 1}},
        {"router": {"enabled": "yes"}},
        {"router": {"replicas": 0}},
        {"router": {"service": {"type": "ExternalName"}}},
        {"router": {"service": {"port": 70000}}},
        {"router": {"maxQueue": 0}},
        {"router": {"maxWaitSeconds": 0}},
        {"router": {"logLevel": "loud"}},
        {"router": {"image": {"pullPolicy": "Sometimes"}}},
    ],
)
def test_values_schema_rejects_bad_router_values(values):
    with pytest.raises(helm_python.HelmError):
        render_files(values)


# -- the plain manifests ---------------------------------------------------------------------------------------


def plain_docs() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    return [d for r in kustomization["resources"] for d in load_yaml_docs(MANIFESTS / r)]


def test_plain_router_is_in_the_kustomization():
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    assert "router.yaml" in kustomization["resources"]


@pytest.mark.parametrize("version", VERSIONS)
def test_plain_router_manifests_validate_strict(version):
    router = router_docs(load_yaml_docs(MANIFESTS / "router.yaml"))
    assert len(router) == len(load_yaml_docs(MANIFESTS / "router.yaml"))  # every object labelled router
    for doc in router:
        kubernetes_validate.validate(doc, version, strict=True)


def test_plain_router_matches_the_chart():
    plain = router_docs(plain_docs())
    # The chart rendered as the plain install is: release "warmserve" in the plain operator's namespace.
    operators = [d for d in plain_docs() if d["kind"] == "Deployment" and d["metadata"]["name"] == "warmserve-operator"]
    namespace = one(operators, "Deployment")["metadata"]["namespace"]
    chart = router_docs(render({}, namespace=namespace))
    assert sorted((d["kind"], d["metadata"]["name"]) for d in plain) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in chart
    )
    for doc in plain:
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == namespace  # where the operator runs too
    assert one(plain, "ClusterRole")["rules"] == one(chart, "ClusterRole")["rules"] == ROUTER_RULES
    assert one(plain, "ClusterRoleBinding")["subjects"] == one(chart, "ClusterRoleBinding")["subjects"]
    assert one(plain, "ClusterRoleBinding")["roleRef"] == one(chart, "ClusterRoleBinding")["roleRef"]
    plain_pod = one(plain, "Deployment")["spec"]["template"]["spec"]
    chart_pod = one(chart, "Deployment")["spec"]["template"]["spec"]
    for key in ("serviceAccountName", "terminationGracePeriodSeconds", "securityContext", "containers", "volumes"):
        assert plain_pod[key] == chart_pod[key], key
    assert one(plain, "Deployment")["spec"]["replicas"] == 1  # so no PodDisruptionBudget, like the chart's default
    assert one(plain, "Service")["spec"]["ports"] == one(chart, "Service")["spec"]["ports"]
    assert one(plain, "Service")["metadata"]["annotations"] == one(chart, "Service")["metadata"]["annotations"]


def test_plain_router_is_read_only_hardened_and_selected():
    docs = plain_docs()
    plain = router_docs(docs)
    deployment, service, sa = one(plain, "Deployment"), one(plain, "Service"), one(plain, "ServiceAccount")
    assert one(plain, "ClusterRole")["rules"] == ROUTER_RULES
    subject = {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]}
    assert one(plain, "ClusterRoleBinding")["subjects"] == [subject]
    others = [d for d in docs if d["kind"].endswith("Binding") and d not in plain]
    assert all(subject not in (d.get("subjects") or []) for d in others)  # (admission policy bindings have none)
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"] == selector
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] == "Deployment"
    }
    assert [n for n, labels in pods.items() if selects(selector, labels)] == [deployment["metadata"]["name"]]
    for other in (d for d in docs if d["kind"] == "Service" and d is not service):
        assert not selects(other["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    c = container(deployment)
    assert parse_router_command(c).namespace == []  # cluster-wide, like the plain operator
    operator = next(d for d in docs if d["kind"] == "Deployment" and d is not deployment)
    assert c["image"] == container(operator)["image"]
    assert {e["name"]: e["value"] for e in container(operator)["env"]}["WARMSERVE_NAMESPACES"] == ""


def test_the_operator_reads_the_router_when_it_is_installed():
    def router_url(values: dict[str, Any]) -> str | None:
        operator = next(
            d for d in render(values) if d["kind"] == "Deployment" and "router" not in d["metadata"]["name"]
        )
        env = {e["name"]: e.get("value") for e in container(operator).get("env", [])}
        return env.get("WARMSERVE_ROUTER_URL")

    assert router_url({}) == f"http://{RELEASE}-router.{NAMESPACE}.svc:8080"
    assert router_url({"router": {"enabled": False}}) is None
