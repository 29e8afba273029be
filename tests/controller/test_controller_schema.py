"""Schema tests: CRDs, sample CRs (jsonschema + CEL), printer columns, and every builder output.

The API server does three things with a CR that these tests reproduce offline:
1. structural-schema validation (jsonschema on `openAPIV3Schema`, with unknown fields rejected as
   `kubectl --validate=strict` / field validation Strict does),
2. defaulting (`default:` entries, applied recursively, before CEL runs),
3. CEL `x-kubernetes-validations` (evaluated with cel-python on the defaulted object).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from controller_support import CRD_DIR, EXAMPLES, crd, load_yaml_docs

from warmserve.controller import builders
from warmserve.controller.spec import (
    ForecastSpec,
    GpuSpec,
    ModelCacheSpec,
    ModelSpec,
    PoolSpec,
    WorkerSpec,
    parse_pool_spec,
)

K8S_VERSIONS = ("1.30.0", "1.37.0")  # oldest we support, newest kubernetes-validate ships


# ----------------------------------------------------------------- helpers
def version_schema(kind: str) -> dict[str, Any]:
    return crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def strict(schema: Any) -> Any:
    """The schema with unknown fields forbidden wherever the CRD does not preserve them."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in out
        ):
            out["additionalProperties"] = False
        if out.get("properties", {}).get("metadata") == {"type": "object"}:
            out["properties"]["metadata"] = {"type": "object"}
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """Structural defaulting as the API server does it (parents defaulted before children)."""
    if isinstance(obj, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
            if key in obj:
                obj[key] = apply_defaults(sub, obj[key])
    elif isinstance(obj, list) and "items" in schema:
        return [apply_defaults(schema["items"], v) for v in obj]
    return obj


def cel_rules(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, rule, schema
    for key, sub in (schema.get("properties") or {}).items():
        yield from cel_rules(sub, f"{path}.{key}")


def cel_violations(kind: str, obj: dict[str, Any]) -> list[str]:
    """Messages of every CEL rule the (defaulted) object violates."""
    celpy = pytest.importorskip("celpy", reason="CEL rules are evaluated with cel-python (pip install cel-python)")
    schema = version_schema(kind)
    obj = apply_defaults(schema, copy.deepcopy(obj))
    env = celpy.Environment()
    failed = []
    for path, rule, _ in cel_rules(schema):
        node: Any = obj
        for part in [p for p in path.split(".") if p]:
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            continue
        program = env.program(env.compile(rule["rule"]))
        if not bool(program.evaluate({"self": celpy.json_to_cel(node)})):
            failed.append(rule["message"])
    return failed


def schema_errors(kind: str, obj: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(strict(version_schema(kind)))
    return [e.message for e in validator.iter_errors(obj)]


def samples() -> list[dict[str, Any]]:
    return [d for p in sorted(EXAMPLES.glob("*.yaml")) for d in load_yaml_docs(p)]


def walk_schema(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for key, sub in (schema.get("properties") or {}).items():
        yield from walk_schema(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        yield from walk_schema(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk_schema(schema["additionalProperties"], f"{path}{{}}")


# ------------------------------------------------------------------- CRDs
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", sorted(CRD_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_crd_passes_kubernetes_validate_strict(path, version):
    for doc in load_yaml_docs(path):
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("kind", ["ModelDeployment", "WarmPool"])
def test_crd_is_structural_and_documented(kind):
    doc = crd(kind)
    assert doc["spec"]["group"] == "warmserve.io"
    assert doc["spec"]["names"]["categories"] == ["warmserve"]
    assert doc["spec"]["names"]["shortNames"] == [{"ModelDeployment": "mdep", "WarmPool": "wpool"}[kind]]
    version = doc["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    missing_type, missing_doc = [], []
    for path, node in walk_schema(version["schema"]["openAPIV3Schema"]):
        if "type" not in node:
            missing_type.append(path)
        if path not in ("", ".metadata") and not node.get("description"):
            missing_doc.append(path)
        assert node.get("additionalProperties") is not False, f"{path}: not structural"
    assert not missing_type, missing_type
    assert not missing_doc, f"fields without description: {missing_doc}"
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Ready", "Age"} <= columns


def test_model_deployment_printer_columns():
    columns = {c["name"]: c for c in crd("ModelDeployment")["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert {"Ready", "Model", "Replicas", "Warm", "Age"} <= set(columns)
    assert columns["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'


def _jsonpath(obj: Any, path: str) -> Any:
    """The printer-column JSONPath subset we use: dotted fields and one [?(@.type=="X")] filter."""
    node = obj
    for part in re.findall(r'\.(\w+)(?:\[\?\(@\.type=="(\w+)"\)\])?', path):
        field, filt = part
        node = node.get(field) if isinstance(node, dict) else None
        if filt:
            node = next((c for c in node or [] if c.get("type") == filt), None)
    return node


@pytest.mark.parametrize("kind", ["ModelDeployment", "WarmPool"])
def test_printer_columns_resolve_on_samples(kind):
    version = crd(kind)["spec"]["versions"][0]
    status = {
        "conditions": [{"type": "Ready", "status": "True"}],
        "replicas": {"ready": 1},
        "warmReplicas": {"prewarmed": 2},
        "readyWorkers": 2,
        "planGeneration": 3,
    }
    for sample in samples():
        if sample["kind"] != kind:
            continue
        obj = apply_defaults(version["schema"]["openAPIV3Schema"], copy.deepcopy(sample))
        obj["status"] = status
        obj["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
        for column in version["additionalPrinterColumns"]:
            if column["name"] == "Ready":
                assert _jsonpath(obj, column["jsonPath"].rsplit(".", 1)[0]) is not None
            else:
                assert _jsonpath(obj, column["jsonPath"]) is not None, (sample["metadata"]["name"], column)


# ----------------------------------------------------------------- samples
def test_examples_cover_the_required_cases():
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for s in samples():
        by_kind.setdefault(s["kind"], []).append(s)
    pools = by_kind["WarmPool"]
    assert any(p["spec"]["gpu"]["count"] == 8 for p in pools)
    assert any(p["spec"]["gpu"]["count"] == 0 for p in pools), "a CPU-only pool for laptops and kind"
    tps = sorted(m["spec"]["model"].get("tensorParallelSize", 1) for m in by_kind["ModelDeployment"])
    assert {1, 2, 4} <= set(tps)


@pytest.mark.parametrize("sample", samples(), ids=lambda s: f"{s['kind']}-{s['metadata']['name']}")
def test_sample_validates_against_its_crd(sample):
    assert schema_errors(sample["kind"], sample) == []
    assert cel_violations(sample["kind"], sample) == []


def _md(**model: Any) -> dict[str, Any]:
    base = {"source": "pvc://weights/llama", "tensorParallelSize": 1}
    base.update(model)
    return {
        "apiVersion": "warmserve.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "m"},
        "spec": {"poolRef": {"name": "p"}, "model": {k: v for k, v in base.items() if v is not None}},
    }


def _with(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    node = doc
    parts = path.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return doc


POOL = {"apiVersion": "warmserve.io/v1alpha1", "kind": "WarmPool", "metadata": {"name": "p"}, "spec": {}}

INVALID = [
    ("negative replicas", _with(_md(), "spec.scaling", {"minReplicas": -1}), "schema"),
    ("negative maxReplicas", _with(_md(), "spec.scaling", {"maxReplicas": -2}), "schema"),
    ("TP 3", _md(tensorParallelSize=3), "cel"),
    ("TP 0", _md(tensorParallelSize=0), "schema"),
    ("unknown field", _with(_md(), "spec.model.quantisation", "awq"), "schema"),
    ("unknown top-level spec field", _with(_md(), "spec.replicas", 2), "schema"),
    # Fields the workers could not honour are refused, not accepted and ignored:
    ("engine image (engines run in the worker image)", _with(_md(), "spec.engine.image", "vllm:x"), "schema"),
    ("hf revision (read pre-downloaded)", _with(_md(), "spec.model.revision", "main"), "schema"),
    ("missing model source", _md(source=None), "schema"),
    ("missing model", {**_md(), "spec": {"poolRef": {"name": "p"}}}, "schema"),
    ("bad source scheme", _md(source="s3://bucket/model"), "schema"),
    ("bad dtype", _md(dtype="int4"), "schema"),
    ("min above max", _with(_md(), "spec.scaling", {"minReplicas": 3, "maxReplicas": 2}), "cel"),
    ("scale-down above scale-up", _with(POOL, "spec.policy", {"scaleDownUtilization": 0.9}), "cel"),
    ("pool gpu count 3", _with(POOL, "spec.gpu", {"count": 3}), "cel"),
    ("pool window not dividing a day", _with(POOL, "spec.forecast", {"windowSeconds": 7000}), "cel"),
    (
        "pool claim and hostPath",
        _with(POOL, "spec.modelCache", {"persistentVolumeClaimName": "a", "hostPath": "/m"}),
        "cel",
    ),
    ("prometheus without url", _with(POOL, "spec.loadSource", {"kind": "prometheus"}), "cel"),
    ("cpu pool with gpu product", _with(POOL, "spec.gpu", {"count": 0, "product": ["A100"]}), "cel"),
    ("pool unknown forecaster", _with(POOL, "spec.forecast", {"kind": "arima"}), "schema"),
    ("pool arena fraction above 1", _with(POOL, "spec.worker", {"arenaFraction": 1.5}), "schema"),
    ("pool unknown field", _with(POOL, "spec.gpus", 8), "schema"),
]


@pytest.mark.parametrize(("name", "doc", "layer"), INVALID, ids=[i[0] for i in INVALID])
def test_invalid_sample_is_rejected(name, doc, layer):
    schema_errs = schema_errors(doc["kind"], doc)
    if layer == "schema":
        assert schema_errs, f"{name}: the schema accepted it"
    else:
        assert not schema_errs, f"{name}: expected only a CEL rule to catch it, schema says {schema_errs}"
        assert cel_violations(doc["kind"], doc), f"{name}: no CEL rule rejected it"


def test_minimal_objects_are_valid_after_defaulting():
    assert schema_errors("ModelDeployment", _md()) == [] and cel_violations("ModelDeployment", _md()) == []
    assert schema_errors("WarmPool", POOL) == [] and cel_violations("WarmPool", POOL) == []


# ------------------------------------------------------- defaults in code
def _defaults(kind: str, path: str) -> dict[str, Any]:
    node = version_schema(kind)
    for part in path.split("."):
        node = node["properties"][part]
    return {k: v["default"] for k, v in node["properties"].items() if "default" in v and v["default"] != {}}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.capitalize() for w in rest)


@pytest.mark.parametrize(
    ("path", "obj", "renames"),
    [
        ("spec.gpu", GpuSpec(), {"memoryMiB": "memory_mib"}),
        ("spec.worker", WorkerSpec(), {}),
        ("spec.modelCache", ModelCacheSpec(), {}),
        ("spec.forecast", ForecastSpec(), {}),
    ],
)
def test_pool_defaults_in_code_equal_crd_defaults(path, obj, renames):
    for key, value in _defaults("WarmPool", path).items():
        attr = renames.get(key) or re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()
        assert getattr(obj, attr) == value, (path, key)
    policy = _defaults("WarmPool", "spec.policy")
    d = PoolSpec()
    assert (d.interval_seconds, d.scale_up_utilization, d.scale_down_utilization) == (
        policy["intervalSeconds"],
        policy["scaleUpUtilization"],
        policy["scaleDownUtilization"],
    )
    assert (d.protection_seconds, d.load_bandwidth_gbps) == (policy["protectionSeconds"], policy["loadBandwidthGBps"])


def test_model_defaults_in_code_equal_crd_defaults():
    d = ModelSpec(pool="", source="", served_name="")
    crd_defaults = {
        "tp": _defaults("ModelDeployment", "spec.model")["tensorParallelSize"],
        "dtype": _defaults("ModelDeployment", "spec.model")["dtype"],
        "max_concurrency": _defaults("ModelDeployment", "spec.engine")["maxConcurrency"],
        "max_model_len": _defaults("ModelDeployment", "spec.engine")["maxModelLen"],
        **{
            re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower(): v
            for k, v in _defaults("ModelDeployment", "spec.scaling").items()
        },
        "prewarm_enabled": _defaults("ModelDeployment", "spec.prewarm")["enabled"],
        "priority": _defaults("ModelDeployment", "spec.prewarm")["priority"],
        "min_warm_replicas": _defaults("ModelDeployment", "spec.prewarm")["minWarmReplicas"],
        "ttft_seconds": _defaults("ModelDeployment", "spec.slo")["ttftSeconds"],
    }
    for attr, value in crd_defaults.items():
        assert getattr(d, attr) == value, attr


# ------------------------------------------------------- builder outputs
def _pool_specs() -> list[tuple[str, PoolSpec]]:
    out = [(s["metadata"]["name"], parse_pool_spec(s["spec"])) for s in samples() if s["kind"] == "WarmPool"]
    out.append(("defaults", parse_pool_spec({})))
    out.append(
        (
            "affinity-mig",
            parse_pool_spec(
                {
                    "gpu": {"count": 4, "resourceName": "nvidia.com/mig-3g.20gb", "product": ["A100"]},
                    "affinity": {
                        "nodeAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": {
                                "nodeSelectorTerms": [
                                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                                ]
                            }
                        },
                        "podAntiAffinity": {},
                    },
                    "nodeSelector": {"pool": "gpu"},
                    "priorityClassName": "high",
                    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoExecute"}],
                }
            ),
        )
    )
    return out


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("name", "pool"), _pool_specs(), ids=[n for n, _ in _pool_specs()])
def test_worker_daemonset_passes_kubernetes_validate_strict(name, pool, version):
    ds = builders.build_worker_daemonset(name, "ns1", pool)
    kubernetes_validate.validate(ds, version, strict=True)
    container = ds["spec"]["template"]["spec"]["containers"][0]
    limits = container["resources"]["limits"]
    assert all(isinstance(v, str) for v in limits.values()), "quantities must be strings"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/dev/shm" in mounts
    shm = next(v for v in ds["spec"]["template"]["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    if pool.gpu.count:
        assert limits[pool.gpu.resource_name] == str(pool.gpu.count)
        assert (
            "requests" not in container["resources"] or pool.gpu.resource_name not in container["resources"]["requests"]
        )
        tolerations = ds["spec"]["template"]["spec"]["tolerations"]
        assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations)
        terms = ds["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"]
        assert all(any(e["key"] == "nvidia.com/gpu.present" for e in t["matchExpressions"]) for t in terms), (
            "every node selector term must require a GPU node"
        )
    else:
        assert not any("nvidia" in k for k in limits)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_history_configmap_passes_kubernetes_validate_strict(version):
    kubernetes_validate.validate(builders.build_history_configmap("p", "ns1", "eA=="), version, strict=True)


def test_builder_selector_is_stable_and_subset_of_pod_labels():
    pool = parse_pool_spec({})
    a = builders.build_worker_daemonset("pool-a", "ns", pool)
    b = builders.build_worker_daemonset("pool-a", "ns", pool)
    assert a == b, "builders must be deterministic (restart → identical children)"
    selector = a["spec"]["selector"]["matchLabels"]
    assert selector.items() <= a["spec"]["template"]["metadata"]["labels"].items()
    other = builders.build_worker_daemonset("pool-b", "ns", pool)["spec"]["selector"]["matchLabels"]
    assert selector != other


def test_long_pool_name_yields_valid_names():
    name = "p" * 250
    ds = builders.build_worker_daemonset(name, "ns", parse_pool_spec({}))
    assert len(ds["metadata"]["name"]) <= 57
    kubernetes_validate.validate(ds, K8S_VERSIONS[-1], strict=True)
