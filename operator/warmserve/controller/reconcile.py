"""Pure reconcile logic: (spec, observed children, worker states) → status and conditions.

Nothing here calls the API or reads a clock (the caller passes `now`). Semantic errors that the CRD schema
cannot catch — the pool does not exist, the TP size does not divide the pool's GPUs per worker, a shard does
not fit one GPU's arena, the weight size is unknown — become a `Valid=False` condition with a CamelCase reason
and a message, never an exception that would put the handler into a retry loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from warmserve.controller import conditions as c
from warmserve.controller.spec import ModelSpec, PoolSpec
from warmserve.protocol import Phase, Plan, ProtocolError, ReplicaState, Role, WorkerState, plan_of_pod, state_of_pod


@dataclass(frozen=True)
class Validation:
    ok: bool
    reason: str
    message: str


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def worker_source(source: str, pool: PoolSpec) -> str | None:
    """The `file://` path the pool's workers read `source` from, or None when they cannot reach it.

    Workers read local files only (the pool's model cache volume is mounted at `modelCache.mountPath`):
    `pvc://<claim>/<path>` works when `<claim>` is the pool's cache claim; `hf://<org>/<repo>` is expected
    pre-downloaded at `<mountPath>/<org>/<repo>`; `file://` paths are taken as they are.
    """
    mount = pool.model_cache.mount_path.rstrip("/")
    if source.startswith("file://"):
        return source
    if source.startswith("pvc://"):
        claim, _, path = source[len("pvc://") :].partition("/")
        if claim and claim == pool.model_cache.persistent_volume_claim_name:
            return f"file://{mount}/{path}".rstrip("/")
        return None
    if source.startswith("hf://"):
        return f"file://{mount}/{source[len('hf://') :]}"
    return None


def validate_model(model: ModelSpec, pool: PoolSpec | None, weight_bytes: int | None) -> Validation:
    """Does this ModelDeployment make sense against its pool? First failing check wins."""
    if not model.pool:
        return Validation(False, "PoolNotSet", "spec.poolRef.name is empty")
    if pool is None:
        return Validation(False, "PoolNotFound", f"WarmPool {model.pool!r} does not exist in this namespace")
    if not _is_pow2(model.tp):
        return Validation(False, "InvalidTensorParallelSize", f"tensorParallelSize {model.tp} is not a power of two")
    devices = pool.devices_per_worker
    if pool.gpu.count == 0 and model.tp > 1:
        return Validation(
            False, "TensorParallelNeedsGPUs", f"pool {model.pool!r} is CPU-only; tensorParallelSize must be 1"
        )
    if model.tp > devices or devices % model.tp:
        return Validation(
            False,
            "TensorParallelDoesNotDividePool",
            f"tensorParallelSize {model.tp} does not divide the {devices} GPUs per worker of pool {model.pool!r}",
        )
    if worker_source(model.source, pool) is None:
        return Validation(
            False,
            "SourceNotOnPool",
            f"{model.source} is not reachable from pool {model.pool!r}: a pvc:// source must name the pool's "
            f"modelCache.persistentVolumeClaimName ({pool.model_cache.persistent_volume_claim_name or 'none'})",
        )
    if model.min_replicas > model.max_replicas:
        return Validation(False, "InvalidScaling", "minReplicas exceeds maxReplicas")
    if weight_bytes is None:
        return Validation(
            False,
            "WeightBytesUnknown",
            "set spec.model.weightBytes or make the source readable to the operator",
        )
    shard = -(-weight_bytes // model.tp)
    arena = pool.device_arena_bytes
    if shard > arena:
        return Validation(
            False,
            "DoesNotFitPool",
            f"one shard needs {shard} bytes but a GPU arena of pool {model.pool!r} holds {arena} bytes "
            f"(memoryMiB × arenaFraction); raise tensorParallelSize",
        )
    return Validation(True, "Validated", f"fits pool {model.pool!r}: {model.tp} GPU(s), {shard} bytes per GPU")


# ------------------------------------------------------------------ workers
@dataclass(frozen=True)
class WorkerView:
    """One worker pod as the operator sees it: identity, the plan on it, and the state it reports."""

    pod: str
    node: str
    ip: str
    gpus: int
    ready: bool  # Running and not being deleted: the planner places replicas on it
    plan: Plan | None
    state: WorkerState | None
    state_error: str = ""
    deleting: bool = False  # being deleted: still reported in status, no longer planned or scraped


def view_worker(pod: Mapping[str, Any], gpus: int) -> WorkerView:
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    state, error = None, ""
    try:
        state = state_of_pod(pod)
    except ProtocolError as exc:
        error = str(exc)
    running = status.get("phase", "Running") == "Running" and not meta.get("deletionTimestamp")
    return WorkerView(
        pod=str(meta.get("name", "")),
        node=str((pod.get("spec") or {}).get("nodeName") or ""),
        ip=str(status.get("podIP") or ""),
        gpus=gpus,
        ready=running,
        plan=plan_of_pod(pod),
        state=state,
        state_error=error,
        deleting=bool(meta.get("deletionTimestamp")),
    )


def _device_role(replicas: Sequence[ReplicaState]) -> str:
    if any(r.dedicated for r in replicas):
        return "dedicated"
    return "universal" if replicas else "idle"


def pool_status(
    workers: Sequence[WorkerView],
    *,
    expected_workers: int,
    plan_generation: int,
    existing_conditions: Iterable[Mapping[str, Any]] | None,
    generation: int | None,
    now: str,
    workload_problem: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The status fields the pool round owns, from the worker pods (a workload the API refused wins over worker
    counts). `observedGeneration` and `workload` belong to the WarmPool handler (`pools.reconcile_pool`)."""
    entries, reporting, errors, free_total = [], 0, [], 0
    for w in sorted(workers, key=lambda w: w.pod):
        entry: dict[str, Any] = {"pod": w.pod, "node": w.node, "gpus": w.gpus}
        if w.state_error:
            errors.append(f"{w.pod}: unreadable state: {w.state_error}")
        if w.state is not None:
            reporting += 1
            entry["observedGeneration"] = w.state.observed_generation
            entry["errors"] = [str(e) for e in w.state.errors][:20]
            errors.extend(f"{w.pod}: {e}" for e in w.state.errors)
            devices = []
            for d in w.state.devices:
                on = [r for r in w.state.replicas if d.index in r.gpus]
                devices.append(
                    {
                        "index": d.index,
                        "state": _device_role(on),
                        "totalBytes": d.total_bytes,
                        "freeBytes": d.free_bytes,
                        "replicas": [f"{r.model}/{r.phase}" for r in on],
                    }
                )
                free_total += d.free_bytes
            entry["devices"] = devices
        entries.append(entry)
    if workload_problem is not None:
        ready = c.Condition(c.READY, c.FALSE, *workload_problem)
    elif expected_workers == 0:
        ready = c.Condition(c.READY, c.FALSE, "NoWorkers", "no node matches the pool's GPU selector yet")
    elif reporting < expected_workers:
        ready = c.Condition(
            c.READY, c.FALSE, "WorkersNotReporting", f"{reporting} of {expected_workers} workers report state"
        )
    else:
        ready = c.Condition(c.READY, c.TRUE, "WorkersReporting", f"{reporting} workers report state")
    degraded = (
        c.Condition(c.DEGRADED, c.TRUE, "WorkerErrors", "; ".join(errors)[:2000])
        if errors
        else c.Condition(c.DEGRADED, c.FALSE, "NoErrors", "")
    )
    return {
        "expectedWorkers": expected_workers,
        "readyWorkers": reporting,
        "planGeneration": plan_generation,
        "totalFreeBytes": free_total,
        "workers": entries,
        "conditions": c.merge_conditions(existing_conditions, [ready, degraded], now=now, generation=generation),
    }


# ------------------------------------------------------------------ models
@dataclass
class ModelObservation:
    """What the workers hold of one model (by ModelDeployment uid) and what the plans ask for."""

    desired_serve: int = 0
    desired_warm: int = 0
    dedicated: int = 0
    ready: int = 0
    prewarmed: int = 0
    prewarming: int = 0
    endpoints: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def observe_models(workers: Sequence[WorkerView]) -> dict[str, ModelObservation]:
    """Per ModelDeployment uid: counts from plans (desired) and states (actual)."""
    obs: dict[str, ModelObservation] = {}
    for w in workers:
        if w.plan is not None:
            for g in w.plan.groups:
                for planned in g.replicas:
                    o = obs.setdefault(planned.uid, ModelObservation())
                    if planned.role == Role.SERVE:
                        o.desired_serve += 1
                    else:
                        o.desired_warm += 1
        if w.state is None:
            continue
        for r in w.state.replicas:
            o = obs.setdefault(r.uid, ModelObservation())
            if r.dedicated:
                o.dedicated += 1
                if r.serving and r.ready:
                    o.ready += 1
                    if r.endpoint:
                        o.endpoints.append(r.endpoint)
            elif r.phase == Phase.WARM:
                o.prewarmed += 1
            elif r.phase == Phase.LOADING:
                o.prewarming += 1
        for e in w.state.errors:
            if e.uid in obs:
                obs[e.uid].errors.append(f"{w.pod}: {e}")
    for o in obs.values():
        o.endpoints.sort()
    return obs


def model_conditions(model: ModelSpec, validation: Validation, observed: ModelObservation | None) -> list[c.Condition]:
    """Valid, Ready, Prewarmed and Degraded for one ModelDeployment."""
    valid = c.Condition(c.VALID, c.TRUE if validation.ok else c.FALSE, validation.reason, validation.message)
    if not validation.ok:
        return [
            valid,
            c.Condition(c.READY, c.FALSE, validation.reason, validation.message),
            c.Condition(c.PREWARMED, c.FALSE, validation.reason, validation.message),
            c.Condition(c.DEGRADED, c.TRUE, validation.reason, validation.message),
        ]
    if observed is None:
        return [
            valid,
            c.Condition(
                c.READY,
                c.UNKNOWN if model.min_replicas else c.TRUE,
                "NotObservedYet" if model.min_replicas else "ScaledToZero",
                "no worker has reported this model yet",
            ),
            c.Condition(c.PREWARMED, c.UNKNOWN, "NotObservedYet", "no worker has reported this model yet"),
            c.Condition(c.DEGRADED, c.FALSE, "NoErrors", ""),
        ]
    need = max(model.min_replicas, observed.desired_serve)
    if observed.ready >= need:
        ready = c.Condition(
            c.READY,
            c.TRUE,
            "ReplicasReady" if need else "ScaledToZero",
            f"{observed.ready} of {need} replicas ready",
        )
    else:
        ready = c.Condition(c.READY, c.FALSE, "ReplicasStarting", f"{observed.ready} of {need} replicas ready")
    if observed.desired_warm == 0:
        prewarmed = c.Condition(c.PREWARMED, c.FALSE, "NoWarmReplicasPlanned", "the plan holds no warm replica")
    elif observed.prewarmed >= observed.desired_warm:
        prewarmed = c.Condition(c.PREWARMED, c.TRUE, "WarmReplicasLoaded", f"{observed.prewarmed} warm replicas loaded")
    else:
        prewarmed = c.Condition(
            c.PREWARMED,
            c.FALSE,
            "WarmReplicasLoading",
            f"{observed.prewarmed} of {observed.desired_warm} warm replicas loaded",
        )
    degraded = (
        c.Condition(c.DEGRADED, c.TRUE, "WorkerErrors", "; ".join(observed.errors)[:2000])
        if observed.errors
        else c.Condition(c.DEGRADED, c.FALSE, "NoErrors", "")
    )
    return [valid, ready, prewarmed, degraded]


def model_status(
    model: ModelSpec,
    validation: Validation,
    observed: ModelObservation | None,
    *,
    weight_bytes: int | None,
    weight_origin: str,
    existing_conditions: Iterable[Mapping[str, Any]] | None,
    generation: int | None,
    now: str,
) -> dict[str, Any]:
    """Every ModelDeployment status field but `forecast` and `observedLoad` (which `decide.load_status` adds)."""
    o = observed or ModelObservation()
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "weightBytesSource": weight_origin,
        "replicas": {"desired": o.desired_serve, "dedicated": o.dedicated, "ready": o.ready},
        "warmReplicas": {"desired": o.desired_warm, "prewarmed": o.prewarmed, "prewarming": o.prewarming},
        "endpoints": o.endpoints,
        "conditions": c.merge_conditions(
            existing_conditions, model_conditions(model, validation, observed), now=now, generation=generation
        ),
    }
    if weight_bytes is not None:
        status["weightBytes"] = weight_bytes
    return status


def status_changed(current: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether writing `new` would change anything (avoids a status write, and a watch event, per tick)."""
    current = current or {}
    return any(current.get(k) != v for k, v in new.items())
