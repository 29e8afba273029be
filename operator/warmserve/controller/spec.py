"""Typed, defaulted views of the WarmPool and ModelDeployment specs.

The API server applies the CRD defaults, but the operator must not depend on that (objects created before a
default was added, emulated API servers in tests, `kubectl replace` with a partial spec). So every default
lives here too, and a test checks that these values equal the CRD's `default:` entries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MIB = 1 << 20


@dataclass(frozen=True)
class GpuSpec:
    count: int = 8
    resource_name: str = "nvidia.com/gpu"
    memory_mib: int = 81920
    product: tuple[str, ...] = ()
    runtime_class_name: str = ""


@dataclass(frozen=True)
class WorkerSpec:
    image: str = "ghcr.io/warmserve/worker:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    cpu: str = "8"
    memory: str = "64Gi"
    shm_size: str = "16Gi"
    arena_fraction: float = 0.9
    page_size_bytes: int = 2097152
    host_memory_tier_bytes: int = 0
    port: int = 9400
    engine_port_base: int = 8000
    standby_engines: int = 1  # pre-initialised engines per worker (`warmserve.core.standby`)
    service_account_name: str = "warmserve-worker"
    log_level: str = "info"


@dataclass(frozen=True)
class ModelCacheSpec:
    persistent_volume_claim_name: str = ""
    host_path: str = ""
    mount_path: str = "/models"
    size_limit: str = "200Gi"


@dataclass(frozen=True)
class ForecastSpec:
    window_seconds: int = 300
    kind: str = "csp"
    season_days: int = 4
    correction_windows: int = 20
    history_days: int = 5

    @property
    def period(self) -> int:
        """Windows per day (the season length)."""
        return max(1, 86400 // self.window_seconds)


@dataclass(frozen=True)
class LoadSourceSpec:
    kind: str = "workers"
    prometheus_url: str = ""
    query: str = ""


@dataclass(frozen=True)
class PoolSpec:
    """A WarmPool's spec with every default applied."""

    gpu: GpuSpec = field(default_factory=GpuSpec)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] = field(default_factory=dict)
    priority_class_name: str = ""
    worker: WorkerSpec = field(default_factory=WorkerSpec)
    model_cache: ModelCacheSpec = field(default_factory=ModelCacheSpec)
    forecast: ForecastSpec = field(default_factory=ForecastSpec)
    interval_seconds: float = 5.0
    scale_up_utilization: float = 0.8
    scale_down_utilization: float = 0.5
    protection_seconds: float = 5.0
    load_bandwidth_gbps: float = 25.0
    load_source: LoadSourceSpec = field(default_factory=LoadSourceSpec)
    problems: tuple[tuple[str, str], ...] = ()  # (reason, message) of fields that had the wrong type

    @property
    def devices_per_worker(self) -> int:
        """Placement devices per worker: its GPUs, or one host-memory arena on a CPU-only pool."""
        return max(1, self.gpu.count)

    @property
    def device_arena_bytes(self) -> int:
        """Bytes of one device's arena the policy may fill (before any worker has reported)."""
        return int(self.gpu.memory_mib * MIB * self.worker.arena_fraction)


class _Reader:
    """Reads fields of an untrusted spec: a value of the wrong type (or a non-finite number) is replaced by the
    default and recorded as a problem naming the field, so parsing never raises and never returns garbage.

    The API server's schema refuses such specs, but the operator also sees objects the schema never checked:
    objects stored before the CRD was tightened (the API server does not re-validate stored objects), emulated
    API servers, and local files.
    """

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []  # (reason, message naming the field)

    def bad(self, field: str, value: Any, want: str, reason: str = "InvalidSpec") -> None:
        text = repr(value)
        self.problems.append((reason, f"{field} must be {want}, got {text[:80]}{'...' if len(text) > 80 else ''}"))

    def sub(self, spec: Mapping[str, Any] | None, key: str, field: str) -> Mapping[str, Any]:
        value = (spec or {}).get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.bad(field, value, "an object")
            return {}
        return value

    def integer(self, m: Mapping[str, Any], key: str, default: int, field: str) -> int:
        value = m.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.bad(field, value, "an integer")
            return default
        return value

    def number(self, m: Mapping[str, Any], key: str, default: float, field: str) -> float:
        value = m.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            self.bad(field, value, "a finite number")
            return default
        return float(value)

    def text(self, m: Mapping[str, Any], key: str, default: str, field: str) -> str:
        value = m.get(key, default)
        if value is None:
            return default
        if not isinstance(value, str):
            self.bad(field, value, "a string")
            return default
        return value

    def flag(self, m: Mapping[str, Any], key: str, default: bool, field: str) -> bool:
        value = m.get(key, default)
        if not isinstance(value, bool):
            self.bad(field, value, "true or false")
            return default
        return value

    def strings(self, m: Mapping[str, Any], key: str, field: str) -> tuple[str, ...]:
        value = m.get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.bad(field, value, "a list of strings")
            return ()
        return tuple(value)

    def string_map(self, m: Mapping[str, Any], key: str, field: str) -> dict[str, str]:
        value = m.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            self.bad(field, value, "a map of strings to strings")
            return {}
        return dict(value)


TOLERATION_FIELDS = {"key": str, "operator": str, "value": str, "effect": str, "tolerationSeconds": int}


def _tolerations(r: _Reader, spec: Mapping[str, Any]) -> tuple[Mapping[str, Any], ...]:
    value = spec.get("tolerations")
    if value is None:
        return ()
    if not isinstance(value, list):
        r.bad("spec.tolerations", value, "a list")
        return ()
    out = []
    for i, t in enumerate(value):
        field = f"spec.tolerations[{i}]"
        if not isinstance(t, Mapping):
            r.bad(field, t, "an object")
            continue
        for k, v in t.items():
            want = TOLERATION_FIELDS.get(k)
            if want is None:
                r.bad(f"{field}.{k}", v, "absent (not a toleration field)")
            elif isinstance(v, bool) or not isinstance(v, want):
                r.bad(f"{field}.{k}", v, "an integer" if want is int else "a string")
        out.append({k: v for k, v in t.items() if k in TOLERATION_FIELDS})
    return tuple(out)


# ------------------------------------------------------------------------------------------ affinity
AFFINITY_MAX_DEPTH = 12  # core/v1 Affinity is at most 7 objects deep; anything deeper is not an Affinity
_NODE_REQ = {"key": "str", "operator": "str", "values": "strs"}
_NODE_TERM = {"matchExpressions": ("list", _NODE_REQ), "matchFields": ("list", _NODE_REQ)}
_LABEL_SELECTOR = {"matchLabels": "strmap", "matchExpressions": ("list", _NODE_REQ)}
_POD_TERM = {
    "labelSelector": ("obj", _LABEL_SELECTOR),
    "namespaceSelector": ("obj", _LABEL_SELECTOR),
    "namespaces": "strs",
    "topologyKey": "str",
    "matchLabelKeys": "strs",
    "mismatchLabelKeys": "strs",
}
_POD_AFFINITY = {
    "requiredDuringSchedulingIgnoredDuringExecution": ("list", _POD_TERM),
    "preferredDuringSchedulingIgnoredDuringExecution": (
        "list",
        {"weight": "int", "podAffinityTerm": ("obj", _POD_TERM)},
    ),
}
AFFINITY_SHAPE: dict[str, Any] = {
    "nodeAffinity": (
        "obj",
        {
            "requiredDuringSchedulingIgnoredDuringExecution": (
                "obj",
                {"nodeSelectorTerms": ("list", _NODE_TERM)},
            ),
            "preferredDuringSchedulingIgnoredDuringExecution": (
                "list",
                {"weight": "int", "preference": ("obj", _NODE_TERM)},
            ),
        },
    ),
    "podAffinity": ("obj", _POD_AFFINITY),
    "podAntiAffinity": ("obj", _POD_AFFINITY),
}


def affinity_problem(value: Any, field: str = "spec.affinity") -> str | None:
    """Why `value` is not a core/v1 Affinity (the message names the field), or None when it is one.

    Checks the shape the operator relies on when it merges the GPU node selector into it (objects, lists and
    scalars where the Kubernetes type has them, no unknown fields), iteratively, so a hostile value nested
    thousands of levels deep costs nothing and raises nothing.
    """
    stack: list[tuple[Any, Any, str, int]] = [(value, ("obj", AFFINITY_SHAPE), field, 0)]
    while stack:
        node, shape, where, depth = stack.pop()
        if depth > AFFINITY_MAX_DEPTH:
            return f"{where} is nested deeper than a core/v1 Affinity can be"
        if shape == "str":
            if not isinstance(node, str):
                return f"{where} must be a string"
        elif shape == "int":
            if isinstance(node, bool) or not isinstance(node, int):
                return f"{where} must be an integer"
        elif shape == "strs":
            if not isinstance(node, list) or not all(isinstance(v, str) for v in node):
                return f"{where} must be a list of strings"
        elif shape == "strmap":
            if not isinstance(node, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in node.items()
            ):
                return f"{where} must be a map of strings to strings"
        elif shape[0] == "list":
            if not isinstance(node, list):
                return f"{where} must be a list"
            stack.extend((item, ("obj", shape[1]), f"{where}[{i}]", depth + 1) for i, item in enumerate(node))
        else:
            if not isinstance(node, Mapping):
                return f"{where} must be an object"
            fields = shape[1]
            for key, sub in node.items():
                if key not in fields:
                    return f"{where}.{key} is not a field of a core/v1 Affinity"
                stack.append((sub, fields[key], f"{where}.{key}", depth + 1))
    return None


def parse_pool_spec(spec: Mapping[str, Any] | None) -> PoolSpec:
    """A WarmPool spec with every default applied; never raises. A field of the wrong type keeps its default
    and is listed in `PoolSpec.problems` (which `reconcile.validate_pool` reports)."""
    r = _Reader()
    if spec is not None and not isinstance(spec, Mapping):
        r.bad("spec", spec, "an object")
        spec = {}
    spec = spec or {}
    gpu, worker = r.sub(spec, "gpu", "spec.gpu"), r.sub(spec, "worker", "spec.worker")
    cache, forecast = r.sub(spec, "modelCache", "spec.modelCache"), r.sub(spec, "forecast", "spec.forecast")
    policy, load = r.sub(spec, "policy", "spec.policy"), r.sub(spec, "loadSource", "spec.loadSource")
    d_gpu, d_worker, d_cache, d_fc = GpuSpec(), WorkerSpec(), ModelCacheSpec(), ForecastSpec()
    affinity: Any = spec.get("affinity") or {}
    problem = affinity_problem(affinity)
    if problem is not None:
        r.problems.append(("InvalidAffinity", problem))
        affinity = {}
    return PoolSpec(
        gpu=GpuSpec(
            count=r.integer(gpu, "count", d_gpu.count, "spec.gpu.count"),
            resource_name=r.text(gpu, "resourceName", d_gpu.resource_name, "spec.gpu.resourceName"),
            memory_mib=r.integer(gpu, "memoryMiB", d_gpu.memory_mib, "spec.gpu.memoryMiB"),
            product=r.strings(gpu, "product", "spec.gpu.product"),
            runtime_class_name=r.text(gpu, "runtimeClassName", "", "spec.gpu.runtimeClassName"),
        ),
        node_selector=r.string_map(spec, "nodeSelector", "spec.nodeSelector"),
        tolerations=_tolerations(r, spec),
        affinity=dict(affinity),
        priority_class_name=r.text(spec, "priorityClassName", "", "spec.priorityClassName"),
        worker=WorkerSpec(
            image=r.text(worker, "image", d_worker.image, "spec.worker.image"),
            image_pull_policy=r.text(
                worker, "imagePullPolicy", d_worker.image_pull_policy, "spec.worker.imagePullPolicy"
            ),
            cpu=r.text(worker, "cpu", d_worker.cpu, "spec.worker.cpu"),
            memory=r.text(worker, "memory", d_worker.memory, "spec.worker.memory"),
            shm_size=r.text(worker, "shmSize", d_worker.shm_size, "spec.worker.shmSize"),
            arena_fraction=r.number(worker, "arenaFraction", d_worker.arena_fraction, "spec.worker.arenaFraction"),
            page_size_bytes=r.integer(worker, "pageSizeBytes", d_worker.page_size_bytes, "spec.worker.pageSizeBytes"),
            host_memory_tier_bytes=r.integer(
                worker, "hostMemoryTierBytes", d_worker.host_memory_tier_bytes, "spec.worker.hostMemoryTierBytes"
            ),
            standby_engines=r.integer(worker, "standbyEngines", d_worker.standby_engines, "spec.worker.standbyEngines"),
            port=r.integer(worker, "port", d_worker.port, "spec.worker.port"),
            engine_port_base=r.integer(
                worker, "enginePortBase", d_worker.engine_port_base, "spec.worker.enginePortBase"
            ),
            service_account_name=r.text(
                worker, "serviceAccountName", d_worker.service_account_name, "spec.worker.serviceAccountName"
            ),
            log_level=r.text(worker, "logLevel", d_worker.log_level, "spec.worker.logLevel"),
        ),
        model_cache=ModelCacheSpec(
            persistent_volume_claim_name=r.text(
                cache, "persistentVolumeClaimName", "", "spec.modelCache.persistentVolumeClaimName"
            ),
            host_path=r.text(cache, "hostPath", "", "spec.modelCache.hostPath"),
            mount_path=r.text(cache, "mountPath", d_cache.mount_path, "spec.modelCache.mountPath"),
            size_limit=r.text(cache, "sizeLimit", d_cache.size_limit, "spec.modelCache.sizeLimit"),
        ),
        forecast=ForecastSpec(
            window_seconds=r.integer(forecast, "windowSeconds", d_fc.window_seconds, "spec.forecast.windowSeconds"),
            kind=r.text(forecast, "kind", d_fc.kind, "spec.forecast.kind"),
            season_days=r.integer(forecast, "seasonDays", d_fc.season_days, "spec.forecast.seasonDays"),
            correction_windows=r.integer(
                forecast, "correctionWindows", d_fc.correction_windows, "spec.forecast.correctionWindows"
            ),
            history_days=r.integer(forecast, "historyDays", d_fc.history_days, "spec.forecast.historyDays"),
        ),
        interval_seconds=r.number(policy, "intervalSeconds", PoolSpec.interval_seconds, "spec.policy.intervalSeconds"),
        scale_up_utilization=r.number(
            policy, "scaleUpUtilization", PoolSpec.scale_up_utilization, "spec.policy.scaleUpUtilization"
        ),
        scale_down_utilization=r.number(
            policy, "scaleDownUtilization", PoolSpec.scale_down_utilization, "spec.policy.scaleDownUtilization"
        ),
        protection_seconds=r.number(
            policy, "protectionSeconds", PoolSpec.protection_seconds, "spec.policy.protectionSeconds"
        ),
        load_bandwidth_gbps=r.number(
            policy, "loadBandwidthGBps", PoolSpec.load_bandwidth_gbps, "spec.policy.loadBandwidthGBps"
        ),
        load_source=LoadSourceSpec(
            kind=r.text(load, "kind", "workers", "spec.loadSource.kind"),
            prometheus_url=r.text(load, "prometheusUrl", "", "spec.loadSource.prometheusUrl"),
            query=r.text(load, "query", "", "spec.loadSource.query"),
        ),
        problems=tuple(r.problems),
    )


@dataclass(frozen=True)
class ModelSpec:
    """A ModelDeployment's spec with every default applied."""

    pool: str
    source: str
    served_name: str
    dtype: str = "auto"
    tp: int = 1
    weight_bytes: int | None = None
    engine_args: tuple[str, ...] = ()
    max_model_len: int = 0
    max_concurrency: int = 64
    min_replicas: int = 0
    max_replicas: int = 4
    prewarm_enabled: bool = True
    priority: float = 1.0
    min_warm_replicas: int = 0
    ttft_seconds: float = 0.1
    problems: tuple[tuple[str, str], ...] = ()  # (reason, message) of fields that had the wrong type


def parse_model_spec(name: str, spec: Mapping[str, Any] | None) -> ModelSpec:
    """Parse a ModelDeployment spec; `name` (the object's name) is the default served name. Never raises: a
    field of the wrong type keeps its default and is listed in `ModelSpec.problems`."""
    r = _Reader()
    if spec is not None and not isinstance(spec, Mapping):
        r.bad("spec", spec, "an object")
        spec = {}
    model, engine = r.sub(spec, "model", "spec.model"), r.sub(spec, "engine", "spec.engine")
    scaling, prewarm = r.sub(spec, "scaling", "spec.scaling"), r.sub(spec, "prewarm", "spec.prewarm")
    slo, pool_ref = r.sub(spec, "slo", "spec.slo"), r.sub(spec, "poolRef", "spec.poolRef")
    d = ModelSpec(pool="", source="", served_name="")
    weight: int | None = None
    if model.get("weightBytes") is not None:
        weight = r.integer(model, "weightBytes", 0, "spec.model.weightBytes") or None
    return ModelSpec(
        pool=r.text(pool_ref, "name", "", "spec.poolRef.name"),
        source=r.text(model, "source", "", "spec.model.source"),
        served_name=r.text(model, "servedName", "", "spec.model.servedName") or name,
        dtype=r.text(model, "dtype", d.dtype, "spec.model.dtype"),
        tp=r.integer(model, "tensorParallelSize", d.tp, "spec.model.tensorParallelSize"),
        weight_bytes=weight,
        engine_args=r.strings(engine, "args", "spec.engine.args"),
        max_model_len=r.integer(engine, "maxModelLen", d.max_model_len, "spec.engine.maxModelLen"),
        max_concurrency=r.integer(engine, "maxConcurrency", d.max_concurrency, "spec.engine.maxConcurrency"),
        min_replicas=r.integer(scaling, "minReplicas", d.min_replicas, "spec.scaling.minReplicas"),
        max_replicas=r.integer(scaling, "maxReplicas", d.max_replicas, "spec.scaling.maxReplicas"),
        prewarm_enabled=r.flag(prewarm, "enabled", d.prewarm_enabled, "spec.prewarm.enabled"),
        priority=r.number(prewarm, "priority", d.priority, "spec.prewarm.priority"),
        min_warm_replicas=r.integer(prewarm, "minWarmReplicas", d.min_warm_replicas, "spec.prewarm.minWarmReplicas"),
        ttft_seconds=r.number(slo, "ttftSeconds", d.ttft_seconds, "spec.slo.ttftSeconds"),
        problems=tuple(r.problems),
    )
