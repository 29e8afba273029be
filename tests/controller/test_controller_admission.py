"""The worker's credentials (item 1 of the hardening issue): RBAC plus a ValidatingAdmissionPolicy.

RBAC cannot name the worker pods (the DaemonSet picks their names), so the worker Role allows get, watch and
patch on every pod of its namespace. The chart and the plain manifests ship a ValidatingAdmissionPolicy that
narrows every request of the worker ServiceAccount on pods to an update of the pod its token is bound to,
changing nothing but `warmserve.io/state`. These tests evaluate the policy's CEL (its match condition, its
variables and its validations, exactly as shipped) with cel-python against admission requests shaped like the
API server's. What only a real API server proves is listed in docs/design.md ("Trust model"): that the binding
is in force, that the token carries the pod-name/pod-uid claims, and how CEL types `request`.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import pytest
from controller_support import REPO, load_yaml_docs
from test_controller_chart import render

from warmserve.protocol import PLAN_ANNOTATION, STATE_ANNOTATION

celpy = pytest.importorskip("celpy", reason="the policy's CEL is evaluated with cel-python")

NS = "team-a"
WORKER = f"system:serviceaccount:{NS}:warmserve-worker"
OPERATOR = "system:serviceaccount:warmserve-system:warmserve"


def policies() -> dict[str, dict[str, Any]]:
    """The shipped policy: from the rendered chart and from the plain manifests."""
    chart = [d for d in render({}) if d["kind"] == "ValidatingAdmissionPolicy"]
    plain = [
        d for d in load_yaml_docs(REPO / "manifests" / "worker-rbac.yaml") if d["kind"] == "ValidatingAdmissionPolicy"
    ]
    assert len(chart) == 1 and len(plain) == 1, "one ValidatingAdmissionPolicy in the chart and in the manifests"
    return {"chart": chart[0], "plain": plain[0]}


def pod(name: str = "pool1-worker-abcde", uid: str = "uid-a", **annotations: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": uid,
            "labels": {"app.kubernetes.io/component": "worker", "warmserve.io/pool": "pool1"},
            "annotations": {PLAN_ANNOTATION: '{"generation":3,"groups":[]}', **annotations},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "pool1-worker", "uid": "ds"}],
        },
        "spec": {"containers": [{"name": "worker", "image": "ghcr.io/warmserve/worker:0.1.0"}], "nodeName": "n1"},
    }


def request(
    old: dict[str, Any] | None,
    new: dict[str, Any] | None,
    *,
    user: str = WORKER,
    bound_to: tuple[str, str] | None = ("pool1-worker-abcde", "uid-a"),
    operation: str = "UPDATE",
    sub_resource: str = "",
) -> dict[str, Any]:
    """An admission request as the API server hands it to a policy (`request`, `object`, `oldObject`)."""
    extra = {}
    if bound_to is not None:
        extra = {
            "authentication.kubernetes.io/pod-name": [bound_to[0]],
            "authentication.kubernetes.io/pod-uid": [bound_to[1]],
        }
    target = new or old or {}
    return {
        "request": {
            "operation": operation,
            "subResource": sub_resource,
            "namespace": NS,
            "name": target.get("metadata", {}).get("name", ""),
            "userInfo": {"username": user, "groups": ["system:serviceaccounts"], "extra": extra},
        },
        "object": new,
        "oldObject": old,
    }


def evaluate(policy: dict[str, Any], req: dict[str, Any]) -> tuple[bool, list[str]]:
    """(matched?, messages of the failed validations): the policy's decision for `req`.

    An expression that errors counts as failed (the policy's failurePolicy is Fail)."""
    assert policy["spec"]["failurePolicy"] == "Fail"
    env = celpy.Environment()
    activation = {k: celpy.json_to_cel(v) for k, v in req.items()}

    def run(expression: str, extra: dict[str, Any] | None = None) -> Any:
        program = env.program(env.compile(expression))
        return program.evaluate({**activation, **(extra or {})})

    rules = policy["spec"]["matchConstraints"]["resourceRules"]
    assert any(r["operations"] and "pods" in r["resources"] for r in rules)
    matched = all(bool(run(c["expression"])) for c in policy["spec"]["matchConditions"])
    if not matched:
        return False, []
    variables: dict[Any, Any] = {}
    for v in policy["spec"].get("variables", []):
        with contextlib.suppress(celpy.CELEvalError):  # object is null on DELETE: validations reading it fail
            variables[celpy.celtypes.StringType(v["name"])] = run(v["expression"])
    extra = {"variables": celpy.celtypes.MapType(variables)}
    failed = []
    for rule in policy["spec"]["validations"]:
        try:
            ok = run(rule["expression"], extra)
        except celpy.CELEvalError:
            ok = False
        if not (isinstance(ok, celpy.celtypes.BoolType) and bool(ok)):
            failed.append(rule["message"])
    return True, failed


def with_state(p: dict[str, Any], state: str = '{"observedGeneration":3}') -> dict[str, Any]:
    out = copy.deepcopy(p)
    out["metadata"]["annotations"][STATE_ANNOTATION] = state
    return out


@pytest.fixture(params=["chart", "plain"])
def policy(request: pytest.FixtureRequest) -> dict[str, Any]:
    return policies()[request.param]


def test_own_pod_state_only_patch_is_allowed(policy):
    old = pod()
    assert evaluate(policy, request(old, with_state(old))) == (True, [])
    # a state already there, rewritten
    before = with_state(old, '{"observedGeneration":2}')
    assert evaluate(policy, request(before, with_state(old, '{"observedGeneration":3}'))) == (True, [])


def test_another_pod_is_denied(policy):
    other = pod("pool1-worker-zzzzz", uid="uid-b")
    matched, failed = evaluate(policy, request(other, with_state(other)))
    assert matched and failed == ["a worker may only change the pod its service-account token is bound to"]
    # the right name but another pod (deleted and recreated under the same name): the uid claim differs
    same_name = pod(uid="uid-new")
    assert evaluate(policy, request(same_name, with_state(same_name)))[1]


def test_a_token_not_bound_to_a_pod_is_denied(policy):
    old = pod()
    matched, failed = evaluate(policy, request(old, with_state(old), bound_to=None))
    assert matched and failed == ["a worker may only change the pod its service-account token is bound to"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("plan", "a worker may change no annotation of its pod but warmserve.io/state"),
        ("new-annotation", "a worker may change no annotation of its pod but warmserve.io/state"),
        ("drop-annotation", "a worker may change no annotation of its pod but warmserve.io/state"),
        ("label", "a worker may not change its pod's labels"),
        ("drop-labels", "a worker may not change its pod's labels"),
        ("image", "a worker may not change its pod's spec"),
        ("finalizer", "a worker may not change its pod's finalizers or owner references"),
        ("owner", "a worker may not change its pod's finalizers or owner references"),
    ],
)
def test_own_pod_changes_beyond_the_state_are_denied(policy, change, message):
    old = pod()
    new = with_state(old)
    meta = new["metadata"]
    if change == "plan":
        meta["annotations"][PLAN_ANNOTATION] = '{"generation":99,"groups":[]}'
    elif change == "new-annotation":
        meta["annotations"]["prometheus.io/scrape"] = "true"
    elif change == "drop-annotation":
        del meta["annotations"][PLAN_ANNOTATION]
    elif change == "label":
        meta["labels"]["app.kubernetes.io/component"] = "router"  # be selected by the router's Service
    elif change == "drop-labels":
        del meta["labels"]
    elif change == "image":
        new["spec"]["containers"][0]["image"] = "evil/worker:latest"
    elif change == "finalizer":
        meta["finalizers"] = ["example.com/never-delete"]
    elif change == "owner":
        meta["ownerReferences"] = []
    matched, failed = evaluate(policy, request(old, new))
    assert matched and failed == [message]


@pytest.mark.parametrize(
    ("operation", "sub_resource"),
    [("DELETE", ""), ("CREATE", ""), ("UPDATE", "status"), ("CONNECT", "exec"), ("CREATE", "eviction")],
)
def test_other_operations_and_subresources_are_denied(policy, operation, sub_resource):
    old = pod()
    new = None if operation == "DELETE" else with_state(old)
    req = request(None if operation == "CREATE" else old, new, operation=operation, sub_resource=sub_resource)
    matched, failed = evaluate(policy, req)
    assert matched and "a worker may only update (patch) its own pod; no create, delete, exec or subresource" in failed


@pytest.mark.parametrize(
    "user",
    [OPERATOR, "system:serviceaccount:team-a:warmserve-worker-2", "warmserve-worker", "system:node:n1", "alice"],
)
def test_other_users_are_not_matched(policy, user):
    old = pod()
    new = copy.deepcopy(old)
    new["metadata"]["annotations"][PLAN_ANNOTATION] = '{"generation":4,"groups":[]}'  # the operator's plan write
    assert evaluate(policy, request(old, new, user=user)) == (False, [])


def test_the_policy_is_bound_and_the_worker_role_stays_minimal():
    for docs in (render({}), [d for p in ("worker-rbac.yaml",) for d in load_yaml_docs(REPO / "manifests" / p)]):
        (vap,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
        (binding,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"]
        assert binding["spec"] == {"policyName": vap["metadata"]["name"], "validationActions": ["Deny"]}
        roles = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "warmserve-worker"]
        assert roles and all(
            r["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "watch", "patch"]}]
            for r in roles
        )


def test_extra_worker_accounts_are_matched_and_allowed_by_the_operator():
    docs = render({"worker": {"allowedServiceAccounts": ["gpu-worker"]}})
    (vap,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
    old = pod()
    assert evaluate(vap, request(old, with_state(old), user=f"system:serviceaccount:{NS}:gpu-worker")) == (True, [])
    assert evaluate(vap, request(old, with_state(old, "x"), user=f"system:serviceaccount:{NS}:gpu-worker"))[0]
    deployment = next(d for d in docs if d["kind"] == "Deployment" and "router" not in d["metadata"]["name"])
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["WARMSERVE_WORKER_SERVICE_ACCOUNTS"] == "warmserve-worker,gpu-worker"
    assert not [d for d in render({"worker": {"admissionPolicy": {"enabled": False}}}) if "Admission" in d["kind"]]
