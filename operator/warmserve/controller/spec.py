"""Typed, defaulted views of the WarmPool and ModelDeployment specs.

The API server applies the CRD defaults, but the operator must not depend on that (objects created before a
default was added, emulated API servers in tests, `kubectl replace` with a partial spec). So every default
lives here too, and a test checks that these values equal the CRD's `default:` entries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MIB = 1 << 20


def _sub(spec: Mapping[str, Any] | None, key: str) -> Mapping[str, Any]:
    value = (spec or {}).get(key)
    return value if isinstance(value, Mapping) else {}


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

    @property
    def devices_per_worker(self) -> int:
        """Placement devices per worker: its GPUs, or one host-memory arena on a CPU-only pool."""
        return max(1, self.gpu.count)

    @property
    def device_arena_bytes(self) -> int:
        """Bytes of one device's arena the policy may fill (before any worker has reported)."""
        return int(self.gpu.memory_mib * MIB * self.worker.arena_fraction)


def parse_pool_spec(spec: Mapping[str, Any] | None) -> PoolSpec:
    gpu, worker, cache = _sub(spec, "gpu"), _sub(spec, "worker"), _sub(spec, "modelCache")
    forecast, policy, load = _sub(spec, "forecast"), _sub(spec, "policy"), _sub(spec, "loadSource")
    d_gpu, d_worker, d_cache, d_fc = GpuSpec(), WorkerSpec(), ModelCacheSpec(), ForecastSpec()
    return PoolSpec(
        gpu=GpuSpec(
            count=int(gpu.get("count", d_gpu.count)),
            resource_name=str(gpu.get("resourceName", d_gpu.resource_name)),
            memory_mib=int(gpu.get("memoryMiB", d_gpu.memory_mib)),
            product=tuple(gpu.get("product") or ()),
            runtime_class_name=str(gpu.get("runtimeClassName", "")),
        ),
        node_selector=dict((spec or {}).get("nodeSelector") or {}),
        tolerations=tuple((spec or {}).get("tolerations") or ()),
        affinity=dict((spec or {}).get("affinity") or {}),
        priority_class_name=str((spec or {}).get("priorityClassName", "")),
        worker=WorkerSpec(
            image=str(worker.get("image", d_worker.image)),
            image_pull_policy=str(worker.get("imagePullPolicy", d_worker.image_pull_policy)),
            cpu=str(worker.get("cpu", d_worker.cpu)),
            memory=str(worker.get("memory", d_worker.memory)),
            shm_size=str(worker.get("shmSize", d_worker.shm_size)),
            arena_fraction=float(worker.get("arenaFraction", d_worker.arena_fraction)),
            page_size_bytes=int(worker.get("pageSizeBytes", d_worker.page_size_bytes)),
            host_memory_tier_bytes=int(worker.get("hostMemoryTierBytes", d_worker.host_memory_tier_bytes)),
            port=int(worker.get("port", d_worker.port)),
            engine_port_base=int(worker.get("enginePortBase", d_worker.engine_port_base)),
            service_account_name=str(worker.get("serviceAccountName", d_worker.service_account_name)),
            log_level=str(worker.get("logLevel", d_worker.log_level)),
        ),
        model_cache=ModelCacheSpec(
            persistent_volume_claim_name=str(cache.get("persistentVolumeClaimName", "")),
            host_path=str(cache.get("hostPath", "")),
            mount_path=str(cache.get("mountPath", d_cache.mount_path)),
            size_limit=str(cache.get("sizeLimit", d_cache.size_limit)),
        ),
        forecast=ForecastSpec(
            window_seconds=int(forecast.get("windowSeconds", d_fc.window_seconds)),
            kind=str(forecast.get("kind", d_fc.kind)),
            season_days=int(forecast.get("seasonDays", d_fc.season_days)),
            correction_windows=int(forecast.get("correctionWindows", d_fc.correction_windows)),
            history_days=int(forecast.get("historyDays", d_fc.history_days)),
        ),
        interval_seconds=float(policy.get("intervalSeconds", PoolSpec.interval_seconds)),
        scale_up_utilization=float(policy.get("scaleUpUtilization", PoolSpec.scale_up_utilization)),
        scale_down_utilization=float(policy.get("scaleDownUtilization", PoolSpec.scale_down_utilization)),
        protection_seconds=float(policy.get("protectionSeconds", PoolSpec.protection_seconds)),
        load_bandwidth_gbps=float(policy.get("loadBandwidthGBps", PoolSpec.load_bandwidth_gbps)),
        load_source=LoadSourceSpec(
            kind=str(load.get("kind", "workers")),
            prometheus_url=str(load.get("prometheusUrl", "")),
            query=str(load.get("query", "")),
        ),
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


def parse_model_spec(name: str, spec: Mapping[str, Any] | None) -> ModelSpec:
    """Parse a ModelDeployment spec; `name` (the object's name) is the default served name."""
    model, engine = _sub(spec, "model"), _sub(spec, "engine")
    scaling, prewarm, slo = _sub(spec, "scaling"), _sub(spec, "prewarm"), _sub(spec, "slo")
    d = ModelSpec(pool="", source="", served_name="")
    weight = model.get("weightBytes")
    return ModelSpec(
        pool=str(_sub(spec, "poolRef").get("name", "")),
        source=str(model.get("source", "")),
        served_name=str(model.get("servedName") or name),
        dtype=str(model.get("dtype", d.dtype)),
        tp=int(model.get("tensorParallelSize", d.tp)),
        weight_bytes=None if weight is None else int(weight),
        engine_args=tuple(str(a) for a in engine.get("args") or ()),
        max_model_len=int(engine.get("maxModelLen", d.max_model_len)),
        max_concurrency=int(engine.get("maxConcurrency", d.max_concurrency)),
        min_replicas=int(scaling.get("minReplicas", d.min_replicas)),
        max_replicas=int(scaling.get("maxReplicas", d.max_replicas)),
        prewarm_enabled=bool(prewarm.get("enabled", d.prewarm_enabled)),
        priority=float(prewarm.get("priority", d.priority)),
        min_warm_replicas=int(prewarm.get("minWarmReplicas", d.min_warm_replicas)),
        ttft_seconds=float(slo.get("ttftSeconds", d.ttft_seconds)),
    )
