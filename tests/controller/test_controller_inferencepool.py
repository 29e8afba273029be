"""Gateway API Inference Extension interop: one InferencePool per WarmPool (docs/gateway.md).

The builder's output is validated against the published InferencePool v1 CRD (vendored, unmodified, in
tests/data/gateway-api-inference-extension/), its CEL rules evaluated with cel-python; the settings and the round's
condition are unit-tested; the real `kopf.operator()` against kmock's emulator creates, patches back and deletes the
InferencePool and reports a refusing API (404: the CRD is not installed) as a condition.
"""

from __future__ import annotations

import asyncio
import copy
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml
from controller_support import (
    NS,
    get_obj,
    load_yaml_docs,
    make_runtime,
    model_body,
    pool_body,
    running_operator,
    wait_for,
    writes_to,
)
from test_controller_chart import CHART, _rules, by_kind, render
from test_controller_schema import apply_defaults, cel_rules, strict

from warmserve.controller import builders
from warmserve.controller import conditions as c
from warmserve.controller.decide import Observation, ObservedModel, ObservedPool, inference_pool_condition
from warmserve.controller.k8s import INFERENCEPOOLS, MODELDEPLOYMENTS, WARMPOOLS
from warmserve.controller.reconcile import pool_status
from warmserve.controller.settings import ControllerConfig, InferencePoolSettings
from warmserve.controller.spec import parse_model_spec, parse_pool_spec
from warmserve.controller.weights import WeightInfo

CRD_FILE = (
    Path(__file__).resolve().parents[1]
    / "data"
    / "gateway-api-inference-extension"
    / "inference.networking.k8s.io_inferencepools.yaml"
)
POOLS = "warmserve.io/v1alpha1/warmpools"
IPOOLS = "inference.networking.k8s.io/v1/inferencepools"
EPP = InferencePoolSettings(enabled=True, epp="{pool}-epp", epp_port=9002, failure_mode="FailOpen")


def _crd() -> dict[str, Any]:
    return load_yaml_docs(CRD_FILE)[0]


def ip_schema() -> dict[str, Any]:
    (version,) = [v for v in _crd()["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def ip_errors(obj: dict[str, Any]) -> list[str]:
    """Why the API server would refuse `obj`: the structural schema (unknown fields forbidden, as pruning would drop
    them; jsonschema ignores the x-kubernetes-* keys), then every CEL rule on the defaulted object (cel-python)."""
    schema = ip_schema()
    errors = [f"{list(e.path)}: {e.message}" for e in jsonschema.Draft7Validator(strict(schema)).iter_errors(obj)]
    celpy = pytest.importorskip("celpy", reason="the CRD's CEL rules are evaluated with cel-python")
    env = celpy.Environment()
    defaulted = apply_defaults(schema, copy.deepcopy(obj))
    for path, rule, _ in cel_rules(schema):
        node: Any = defaulted
        for part in [p for p in path.split(".") if p]:
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            continue
        if not bool(env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(node)})):
            errors.append(f"{path}: {rule['message']}")
    return errors


def cond(obj: Any, type_: str) -> dict[str, Any] | None:
    return next((x for x in ((obj or {}).get("status") or {}).get("conditions") or [] if x["type"] == type_), None)


# ------------------------------------------------------------------------------------------ the vendored CRD
def test_vendored_crd_is_the_published_v1_inferencepool():
    doc = _crd()
    assert doc["metadata"]["name"] == "inferencepools.inference.networking.k8s.io"
    assert doc["metadata"]["annotations"]["inference.networking.k8s.io/bundle-version"] == "v1.6.0"
    assert doc["spec"]["group"] == "inference.networking.k8s.io" and doc["spec"]["names"]["kind"] == "InferencePool"
    spec = ip_schema()["properties"]["spec"]
    assert spec["properties"]["targetPorts"]["maxItems"] == builders.INFERENCE_POOL_MAX_PORTS
    assert set(spec["required"]) == {"selector", "targetPorts"}
    assert any(r["rule"].startswith("self.all(") for r in spec["properties"]["targetPorts"]["x-kubernetes-validations"])
    readme = (CRD_FILE.parent / "README.md").read_text()
    assert "v1.6.0" in readme and "https://github.com/kubernetes-sigs/gateway-api-inference-extension" in readme


@pytest.mark.parametrize(
    "broken",
    [
        {"targetPorts": [{"number": 8000 + i} for i in range(9)]},  # more than 8
        {"targetPorts": [{"number": 8000}, {"number": 8000}]},  # CEL: unique numbers
        {"targetPorts": []},
        {"selector": {"matchLabels": {"app": "-not-a-label-value-"}}},
        {"endpointPickerRef": {"name": "epp", "kind": "Service"}},  # CEL: a Service needs a port
        {"endpointPickerRef": {"name": "epp", "port": {"number": 9002}, "failureMode": "Sometimes"}},
        {"appProtocol": "grpc"},
        {"unknownField": 1},
    ],
)
def test_the_schema_check_refuses_what_the_api_server_refuses(broken):
    obj = builders.build_inference_pool("pool1", "ns1", parse_pool_spec({"gpu": {"count": 2}}), EPP)
    assert ip_errors(obj) == []
    obj["spec"].update(broken)
    assert ip_errors(obj), f"{broken} must be refused"


# ------------------------------------------------------------------------------------------------ the builder
POOL_CASES = {
    "cpu": ({"gpu": {"count": 0}}, 1),
    "one-gpu": ({"gpu": {"count": 1}}, 1),
    "four-gpus": ({"gpu": {"count": 4}, "worker": {"enginePortBase": 18000}}, 4),
    "eight-gpus": ({"gpu": {"count": 8}}, 8),
    "sixteen-gpus": ({"gpu": {"count": 16}}, 8),  # truncated to the CRD's 8 ports
}


@pytest.mark.parametrize("settings", [EPP, InferencePoolSettings(enabled=True)], ids=["epp", "no-epp"])
@pytest.mark.parametrize("case", sorted(POOL_CASES))
def test_built_inference_pool_validates_against_the_published_crd(case, settings):
    raw, ports = POOL_CASES[case]
    pool = parse_pool_spec(raw)
    obj = builders.build_inference_pool("team-pool.a", "ns1", pool, settings)
    assert ip_errors(obj) == []
    assert obj["apiVersion"] == "inference.networking.k8s.io/v1" and obj["kind"] == "InferencePool"
    base = pool.worker.engine_port_base
    assert [p["number"] for p in obj["spec"]["targetPorts"]] == list(range(base, base + ports))
    if settings.epp:
        assert obj["spec"]["endpointPickerRef"] == {
            "group": "",
            "kind": "Service",
            "name": "team-pool.a-epp",
            "port": {"number": 9002},
            "failureMode": "FailOpen",
        }
    else:
        assert "endpointPickerRef" not in obj["spec"]


def test_inference_pool_selects_exactly_the_pools_worker_pods():
    pool = parse_pool_spec({"gpu": {"count": 2}})
    ds = builders.build_worker_daemonset("pool-a", "ns", pool)
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    selector = builders.build_inference_pool("pool-a", "ns", pool, EPP)["spec"]["selector"]["matchLabels"]
    assert selector == ds["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    other = builders.build_inference_pool("pool-b", "ns", pool, EPP)["spec"]["selector"]["matchLabels"]
    assert other != selector, "one pool's InferencePool never selects another pool's workers"
    ds_b = builders.build_worker_daemonset("pool-b", "ns", pool)["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= ds_b.items()


def test_long_pool_names_give_valid_inference_pools():
    name = "p" * 253
    obj = builders.build_inference_pool(name, "ns", parse_pool_spec({}), EPP)
    assert ip_errors(obj) == []
    assert obj["metadata"]["name"] == name and len(obj["spec"]["selector"]["matchLabels"]["warmserve.io/pool"]) <= 63
    assert len(obj["spec"]["endpointPickerRef"]["name"]) == 63, "a Service name has at most 63 characters"
    assert builders.epp_service_name("short", EPP) == "short-epp"


def test_drift_patch_restores_spec_and_drops_an_endpoint_picker_no_longer_set():
    pool = parse_pool_spec({"gpu": {"count": 2}})
    with_epp = builders.build_inference_pool("p", "ns", pool, EPP)
    served = copy.deepcopy(with_epp)
    served["spec"]["endpointPickerRef"]["group"] = ""  # what the API server defaults is no drift
    assert builders.inference_pool_drift(served, with_epp) is None
    edited = copy.deepcopy(with_epp)
    edited["spec"]["targetPorts"] = [{"number": 9999}]
    assert builders.inference_pool_drift(edited, with_epp) == {"spec": with_epp["spec"]}
    without = builders.build_inference_pool("p", "ns", pool, InferencePoolSettings(enabled=True))
    assert builders.inference_pool_drift(with_epp, without) == {"spec": {"endpointPickerRef": None}}


def test_workers_run_without_standby_engines_only_when_a_gateway_may_reach_them():
    pool = parse_pool_spec({"gpu": {"count": 2}, "worker": {"standbyEngines": 3}})
    default = builders.build_worker_daemonset("p", "ns", pool)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert default[default.index("--standby-engines") + 1] == "3"  # the pool's setting
    exposed = builders.build_worker_daemonset("p", "ns", pool, standby_engines=False)
    args = exposed["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--standby-engines") + 1] == "0"
    assert args[:-1] == default[:-1]


# ----------------------------------------------------------------------------------------------- the settings
def test_settings_from_env_and_flags():
    assert (
        ControllerConfig().inference_pool == InferencePoolSettings() and not ControllerConfig().inference_pool.enabled
    )
    env = {
        "WARMSERVE_INFERENCE_POOL": "true",
        "WARMSERVE_INFERENCE_POOL_EPP": "{pool}-epp",
        "WARMSERVE_INFERENCE_POOL_EPP_PORT": "9100",
        "WARMSERVE_INFERENCE_POOL_FAILURE_MODE": "FailOpen",
    }
    assert ControllerConfig.from_env(env).inference_pool == InferencePoolSettings(True, "{pool}-epp", 9100, "FailOpen")
    flags = ControllerConfig.from_args(
        ["--inference-pool", "--inference-pool-epp", "shared-epp", "--inference-pool-epp-port", "9003"], env={}
    )
    assert flags.inference_pool == InferencePoolSettings(True, "shared-epp", 9003, "FailClose")
    assert ControllerConfig.from_args([], env=env).inference_pool == ControllerConfig.from_env(env).inference_pool
    with pytest.raises(ValueError, match="failure mode"):
        ControllerConfig.from_env({"WARMSERVE_INFERENCE_POOL_FAILURE_MODE": "FailSometimes"})
    with pytest.raises(ValueError, match="port"):
        InferencePoolSettings(enabled=True, epp_port=0)
    with pytest.raises(SystemExit):
        ControllerConfig.from_args(["--inference-pool-failure-mode", "Maybe"], env={})


# -------------------------------------------------------------------------------------- the round's condition
def _observation(enabled: bool, outcome: c.Condition | None, models: tuple[str, ...] = ()) -> Observation:
    pool = parse_pool_spec({"gpu": {"count": 2}})
    observed = tuple(
        ObservedModel(
            name, f"uid-{name}", 1, parse_model_spec(name, {"poolRef": {"name": "p"}}), WeightInfo(1, "spec", ""), {}
        )
        for name in models
    )
    return Observation(
        now=0.0,
        stamp="2026-01-01T00:00:00Z",
        pool=ObservedPool("p", "ns", "uid", 1, pool, {}, inference_pool_enabled=enabled, inference_pool=outcome),
        workers=(),
        models=observed,
        load={},
    )


def test_round_condition_follows_the_handler_and_names_shared_models():
    created = c.Condition(c.INFERENCE_POOL, c.TRUE, "Created", "InferencePool p selects ...")
    missing = c.Condition(c.INFERENCE_POOL, c.FALSE, "CRDNotInstalled", "no CRD")
    assert inference_pool_condition(_observation(False, created)) is None
    assert inference_pool_condition(_observation(True, None)) is None
    assert inference_pool_condition(_observation(True, missing)) == missing
    assert inference_pool_condition(_observation(True, created, ("a",))) == created
    shared = inference_pool_condition(_observation(True, created, ("a", "b")))
    assert shared is not None and (shared.status, shared.reason) == (c.TRUE, "MultipleModels")
    assert "a, b" in shared.message and "other models" in shared.message


def test_pool_status_drops_the_condition_only_when_told():
    old = [{"type": "InferencePool", "status": "True", "reason": "Created", "message": "", "lastTransitionTime": "t"}]
    common = {"expected_workers": 0, "plan_generation": 0, "generation": 1, "now": "2026-01-01T00:00:00Z"}
    kept = pool_status([], existing_conditions=old, **common)
    assert cond({"status": kept}, "InferencePool") == old[0], "not known yet (the handler has not run): left as is"
    dropped = pool_status([], existing_conditions=old, drop=(c.INFERENCE_POOL,), **common)
    assert cond({"status": dropped}, "InferencePool") is None
    assert {x["type"] for x in dropped["conditions"]} == {"Ready", "Degraded"}


# ------------------------------------------------------------------------------------ the operator, emulated
def _runtime(enabled: bool = True, loop: bool = True, **settings: Any) -> Any:
    config = make_runtime().config
    ip = InferencePoolSettings(enabled=enabled, **settings)
    return make_runtime(config=replace(config, inference_pool=ip, loop_enabled=loop))


async def test_operator_creates_patches_back_and_deletes_the_inference_pool(emulator, client):
    runtime = _runtime(epp="{pool}-epp")
    async with running_operator(emulator, runtime):
        await client.create(WARMPOOLS, NS, pool_body(gpus=4, memory_mib=81920))
        created = await wait_for(lambda: get_obj(emulator, IPOOLS, "pool1"), what="InferencePool")
        pool = await wait_for(
            lambda: (p := get_obj(emulator, POOLS, "pool1")) and cond(p, "InferencePool") and p,
            what="InferencePool condition",
        )
        assert ip_errors({k: v for k, v in created.items() if k != "status"}) == []
        owner = created["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("WarmPool", "pool1", pool["metadata"]["uid"])
        assert owner["controller"] is True and owner["blockOwnerDeletion"] is True  # garbage-collected with the pool
        assert [p["number"] for p in created["spec"]["targetPorts"]] == [8000, 8001, 8002, 8003]
        assert created["spec"]["endpointPickerRef"]["name"] == "pool1-epp"
        ready = cond(pool, "InferencePool")
        assert (ready["status"], ready["reason"]) == ("True", "Created") and "8000-8003" in ready["message"]
        ds = await wait_for(lambda: get_obj(emulator, "apps/v1/daemonsets", "pool1-worker"), what="DaemonSet")
        args = ds["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--standby-engines") + 1] == "0"

        # two models share the pool's engines: still created, and the condition says what that means
        await client.create(MODELDEPLOYMENTS, NS, model_body("m1"))
        await client.create(MODELDEPLOYMENTS, NS, model_body("m2"))
        await wait_for(
            lambda: (x := cond(get_obj(emulator, POOLS, "pool1"), "InferencePool")) and x["reason"] == "MultipleModels",
            what="MultipleModels",
        )

        # a spec change patches a hand-edited InferencePool back to the settings
        await client.patch(INFERENCEPOOLS, NS, "pool1", {"spec": {"targetPorts": [{"number": 9999}]}})
        await client.patch(WARMPOOLS, NS, "pool1", {"spec": {"policy": {"intervalSeconds": 1}}})
        await wait_for(
            lambda: get_obj(emulator, IPOOLS, "pool1")["spec"]["targetPorts"][0]["number"] == 8000,
            what="drift patched back",
        )

        # the pool is deleted: so is its InferencePool (kmock has no garbage collector: the operator does it)
        await client.request("DELETE", WARMPOOLS.path(NS, "pool1"))
        await wait_for(lambda: get_obj(emulator, IPOOLS, "pool1") is None, what="InferencePool deleted")
        await wait_for(lambda: get_obj(emulator, POOLS, "pool1") is None, what="WarmPool gone (finalizer released)")


@pytest.mark.parametrize("loop", [True, False], ids=["round-writes", "no-loop-handler-writes"])
async def test_turning_the_setting_off_deletes_it_and_its_condition(emulator, client, loop):
    theirs = {  # someone else's InferencePool in the namespace: never touched
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": "theirs"},
        "spec": {"selector": {"matchLabels": {"app": "x"}}, "targetPorts": [{"number": 8000}]},
    }
    await client.create(INFERENCEPOOLS, NS, theirs)
    async with running_operator(emulator, _runtime(loop=loop)):
        await client.create(WARMPOOLS, NS, pool_body())
        await wait_for(lambda: get_obj(emulator, IPOOLS, "pool1"), what="InferencePool")
        await wait_for(lambda: cond(get_obj(emulator, POOLS, "pool1"), "InferencePool"), what="condition")
    async with running_operator(emulator, _runtime(enabled=False, loop=loop)):  # restarted with the setting off
        await wait_for(lambda: get_obj(emulator, IPOOLS, "pool1") is None, what="InferencePool deleted")
        await wait_for(
            lambda: (p := get_obj(emulator, POOLS, "pool1")) and cond(p, "InferencePool") is None and cond(p, "Valid"),
            what="condition removed",
        )
        ds = await wait_for(
            lambda: (
                (d := get_obj(emulator, "apps/v1/daemonsets", "pool1-worker"))
                and (args := d["spec"]["template"]["spec"]["containers"][0]["args"])
                and args[args.index("--standby-engines") + 1] == "1"
                and d
            ),
            what="workers with standby engines again",
        )
    kept = get_obj(emulator, IPOOLS, "theirs")
    assert ds and kept is not None and kept["spec"] == theirs["spec"]


@pytest.mark.parametrize("loop", [True, False], ids=["round-writes", "no-loop-handler-writes"])
async def test_crd_not_installed_is_a_condition_and_a_slow_retry(emulator, client, loop):
    refused = emulator.refuse(lambda r: r.resource is not None and r.resource.plural == "inferencepools", math.inf, 404)
    runtime = _runtime(loop=loop)
    async with running_operator(emulator, runtime) as task:
        await client.create(WARMPOOLS, NS, pool_body())
        missing = await wait_for(
            lambda: (x := cond(get_obj(emulator, POOLS, "pool1"), "InferencePool")) and x["status"] == "False" and x,
            what="InferencePool=False",
        )
        assert missing["reason"] == "CRDNotInstalled" and "Gateway API Inference Extension CRDs" in missing["message"]
        assert get_obj(emulator, "apps/v1/daemonsets", "pool1-worker") is not None, "the workers are not held back"
        attempts = refused.refused
        await asyncio.sleep(2.0)
        assert refused.refused == attempts, "retried slowly (60 s), not in a loop"
        assert not task.done()
        pool = get_obj(emulator, POOLS, "pool1")
        assert pool["status"]["observedGeneration"] == 1 and pool["status"]["workload"] == "DaemonSet/pool1-worker"
        # an expected, reported retry is no reconcile error (WarmServeControlLoopFailing watches those)
        errors = runtime.metrics.reconcile_errors.labels("WarmPool", "reconcile")._value.get()
        assert errors == 0, errors


async def test_a_same_named_inference_pool_of_someone_else_is_not_taken_over(emulator, client):
    theirs = {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": "pool1"},
        "spec": {"selector": {"matchLabels": {"app": "theirs"}}, "targetPorts": [{"number": 7000}]},
    }
    await client.create(INFERENCEPOOLS, NS, theirs)
    async with running_operator(emulator, _runtime()):
        await client.create(WARMPOOLS, NS, pool_body())
        taken = await wait_for(
            lambda: (x := cond(get_obj(emulator, POOLS, "pool1"), "InferencePool")) and x["status"] == "False" and x,
            what="NameTaken",
        )
        assert taken["reason"] == "NameTaken"
    kept = get_obj(emulator, IPOOLS, "pool1")
    assert kept["spec"] == theirs["spec"] and not kept["metadata"].get("ownerReferences")


async def test_the_api_refusing_the_object_is_rejected_not_a_crash(emulator, client):
    """An older v1 CRD (v1.0-v1.5) requires endpointPickerRef: without an EPP set, its API server answers 422."""
    emulator.refuse(writes_to("inferencepools"), math.inf, 422)
    async with running_operator(emulator, _runtime()) as task:
        await client.create(WARMPOOLS, NS, pool_body())
        rejected = await wait_for(
            lambda: (x := cond(get_obj(emulator, POOLS, "pool1"), "InferencePool")) and x["status"] == "False" and x,
            what="Rejected",
        )
        assert rejected["reason"] == "Rejected" and not task.done()


# ---------------------------------------------------------------------------------------------------- the chart
ON = {"inferencePool": {"enabled": True, "endpointPicker": {"serviceName": "{pool}-epp", "port": 9100}}}
IP_RULE = (("inference.networking.k8s.io",), ("inferencepools",))


def _operator_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    deployment = next(
        d for d in by_kind(docs, "Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    )
    return {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_chart_off_renders_exactly_what_it_renders_without_the_value():
    default = render({})
    assert render({"inferencePool": {"enabled": False, "endpointPicker": {"serviceName": "x", "port": 1}}}) == default
    assert "inference" not in yaml.safe_dump_all(default).lower(), "nothing of the feature is rendered when off"
    assert not ControllerConfig.from_env(_operator_env(default)).inference_pool.enabled


@pytest.mark.parametrize("extra", [{}, {"watchNamespaces": ["team-a", "team-b"]}], ids=["clusterwide", "namespaced"])
def test_chart_on_passes_the_settings_and_grants_exactly_the_inferencepool_verbs(extra):
    default, on = render(extra), render({**extra, **ON})
    settings = ControllerConfig.from_env(_operator_env(on)).inference_pool
    assert settings == InferencePoolSettings(enabled=True, epp="{pool}-epp", epp_port=9100, failure_mode="FailClose")
    app_on, app_off = _rules(on, "-application"), _rules(default, "-application")
    assert app_on.pop(IP_RULE) == ("get", "create", "patch", "delete")  # what pools.py calls, nothing more
    assert app_on == app_off and IP_RULE not in app_off
    # nothing else differs: only the operator Deployment's env and the application ClusterRole
    changed = [
        (a["kind"], a["metadata"]["name"]) for a, b in zip(default, on, strict=True) if a != b
    ]  # same documents, same order
    assert sorted(changed) == [("ClusterRole", "warmserve-application"), ("Deployment", "warmserve")]
    if extra:  # namespaced: the same ClusterRole is bound in each watched namespace
        bound = {
            b["metadata"]["namespace"]
            for b in on
            if b["kind"] == "RoleBinding" and "application" in b["roleRef"]["name"]
        }
        assert bound == {"team-a", "team-b"}


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_chart_on_lints_and_renders_valid_documents(version):
    result = helm_python.lint(str(CHART), ON, strict=True)
    assert result["errors"] == [] and [m for m in result["messages"] if m["severity"] > 1] == [], result
    for doc in render(ON):
        if doc["apiVersion"] != "kopf.dev/v1":
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(
    "values",
    [
        {"inferencePool": {"enabled": "yes"}},
        {"inferencePool": {"endpointPicker": {"failureMode": "FailSometimes"}}},
        {"inferencePool": {"endpointPicker": {"port": 0}}},
        {"inferencePool": {"endpointPicker": {"serviceName": "Not_A_Service"}}},
        {"inferencePool": {"endpointPicker": {"name": "epp"}}},
        {"inferencePool": {"gateway": "x"}},
    ],
)
def test_chart_values_schema_rejects(values):
    chart = helm_python.Chart.load(str(CHART))
    with pytest.raises(helm_python.HelmError):
        chart.render(values, name="warmserve", namespace="warmserve-system")
    chart.render({"inferencePool": {"enabled": True}}, name="warmserve", namespace="warmserve-system")  # accepted


def _uncommented(path: Path, marker: str) -> str:
    """The file with the commented YAML (`# - …`, `#   …`) of the block after the line containing `marker`
    uncommented; the block's prose comments stay comments."""
    out, inside = [], False
    for line in path.read_text().splitlines():
        stripped = line.lstrip()
        inside = marker in line or (inside and stripped.startswith("#"))
        if inside and (stripped.startswith("# - ") or stripped.startswith("#   ")):
            line = line[: len(line) - len(stripped)] + stripped[2:]
        out.append(line)
    return "\n".join(out)


def test_the_plain_manifests_commented_option_matches_the_chart():
    manifests = Path(__file__).resolve().parents[2] / "manifests"
    rbac = [d for d in yaml.safe_load_all(_uncommented(manifests / "rbac.yaml", "Optional, with WARMSERVE")) if d]
    role = next(d for d in rbac if d["kind"] == "ClusterRole" and IP_RULE[0][0] in str(d["rules"]))
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): tuple(r["verbs"]) for r in role["rules"]}
    assert rules[IP_RULE] == _rules(render(ON), "-application")[IP_RULE]
    operator = [d for d in yaml.safe_load_all(_uncommented(manifests / "operator.yaml", "Optional, off")) if d]
    deployment = next(d for d in operator if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert ControllerConfig.from_env(env).inference_pool == InferencePoolSettings(enabled=True, epp="{pool}-epp")
    plain = [d for d in yaml.safe_load_all((manifests / "rbac.yaml").read_text()) if d]
    assert IP_RULE[0][0] not in str(plain), "off unless uncommented"
