"""WarmPool reconcile (worker workload) and the control-loop daemon (called by handlers.py).

Status owners (docs/operator.md, "Status owners"): this handler writes `observedGeneration` and `workload`;
the pool's round writes everything else, conditions included. Only with `--no-loop`, when no round runs, does
this handler write the `Ready` condition (`WaitingForWorkers`, `WorkloadRejected`). A workload the API refuses
is told to the round through kopf's per-object memo, which the pool's handlers and its daemon share.

A pool that fails `reconcile.validate_pool` (the operator's settings: worker service accounts, host-path roots,
system priority classes; an affinity that is not one; sizes that do not fit together) gets no worker workload:
nothing is created or patched (a DaemonSet written for an earlier, valid spec keeps running it), the handler
returns without retrying (a spec change runs it again), and the round reports `Valid=False` and `Ready=False`
with the reason. With `--no-loop` the handler writes those conditions itself.

With `--inference-pool` (docs/gateway.md) the handler also ensures the pool's Gateway API Inference Extension
`InferencePool` (owned by the WarmPool, so it goes with it) and tells the round the outcome through the memo; the
round writes it as the `InferencePool` condition (the handler does with `--no-loop`). A refusal (the CRD not
installed: 404; RBAC: 403; the schema: 400/422; a same-named InferencePool not ours: 409) is that condition and a
slow retry, never a crash. With the setting off, the InferencePool a pool still records (its condition) is
deleted, and the condition goes.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import kopf

from warmserve.controller import builders, conditions, loop, reconcile
from warmserve.controller.k8s import DAEMONSETS, INFERENCEPOOLS, ApiError
from warmserve.controller.metrics import ConditionRetry
from warmserve.controller.runtime import Runtime
from warmserve.controller.spec import PoolSpec, parse_pool_spec

INFERENCE_POOL = conditions.INFERENCE_POOL


async def ensure_worker_workload(runtime: Runtime, body: kopf.Body, logger: Any, pool: PoolSpec | None = None) -> str:
    """Create the worker DaemonSet, or patch it back when it drifted; returns what was done. The caller has
    validated the pool (`reconcile.validate_pool`)."""
    api = runtime.require_api()
    meta = body["metadata"]
    pool = pool if pool is not None else parse_pool_spec(body.get("spec"))
    # a gateway routing by port must never reach an unbound standby engine (builders.worker_args)
    standby = not runtime.config.inference_pool.enabled
    desired = builders.build_worker_daemonset(meta["name"], meta["namespace"], pool, standby_engines=standby)
    kopf.adopt(desired, owner=body)
    current, created = await api.create(DAEMONSETS, meta["namespace"], desired)
    if created:
        logger.info(f"created DaemonSet {desired['metadata']['name']}")
        return "created"
    drift = builders.drift_patch(current, desired)
    if drift is None:
        return "unchanged"
    await api.patch(DAEMONSETS, meta["namespace"], desired["metadata"]["name"], drift)
    logger.info(f"patched DaemonSet {desired['metadata']['name']} back to the pool's spec")
    return "patched"


_WORKLOAD_PROBLEM = "warmserve.workload_problem"
WorkloadProblem = tuple[str, str]  # (reason, message) for the pool's Ready condition


def record_workload_problem(memo: MutableMapping[str, Any], problem: WorkloadProblem | None) -> None:
    """Tell the pool's round (which owns the conditions) whether the API refuses the worker workload."""
    memo[_WORKLOAD_PROBLEM] = problem


def workload_problem(memo: MutableMapping[str, Any]) -> WorkloadProblem | None:
    """What the WarmPool handler last recorded (None: the workload was accepted, or not tried yet)."""
    problem = memo.get(_WORKLOAD_PROBLEM)
    return problem if isinstance(problem, tuple) else None


_INFERENCE_POOL = "warmserve.inference_pool"
#: Retry delays (s) of a refused InferencePool: a CRD or an RBAC rule is installed by someone else, later.
_INFERENCE_POOL_RETRY = {404: 60.0, 403: 60.0, 409: 60.0}
_INFERENCE_POOL_REASONS = {404: "CRDNotInstalled", 403: "Forbidden", 409: "NameTaken"}


def record_inference_pool(memo: MutableMapping[str, Any], outcome: conditions.Condition | None) -> None:
    """Tell the pool's round (which owns the conditions) what became of the pool's InferencePool."""
    memo[_INFERENCE_POOL] = outcome


def inference_pool_outcome(memo: MutableMapping[str, Any]) -> conditions.Condition | None:
    """What the WarmPool handler last recorded (None: not tried yet since the operator started)."""
    outcome = memo.get(_INFERENCE_POOL)
    return outcome if isinstance(outcome, conditions.Condition) else None


def _owned_by(obj: Mapping[str, Any], owner_uid: str) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == owner_uid and r.get("controller") for r in refs)


def _ports_text(ports: range) -> str:
    return str(ports.start) if len(ports) == 1 else f"{ports.start}-{ports.stop - 1}"


async def ensure_inference_pool(runtime: Runtime, body: kopf.Body, logger: Any, pool: PoolSpec) -> conditions.Condition:
    """Create the pool's InferencePool or patch it back to the settings; the `InferencePool` condition to report.
    Raises `ApiError` when the API refuses (the caller turns it into a condition) or fails."""
    api = runtime.require_api()
    meta = body["metadata"]
    desired = builders.build_inference_pool(meta["name"], meta["namespace"], pool, runtime.config.inference_pool)
    kopf.adopt(desired, owner=body)
    name = desired["metadata"]["name"]
    current, created = await api.create(INFERENCEPOOLS, meta["namespace"], desired)
    if created:
        logger.info(f"created InferencePool {name}")
    elif not _owned_by(current, meta["uid"]):
        raise ApiError(409, "Conflict", f"InferencePool {name} exists and is not owned by this WarmPool; not touched")
    else:
        drift = builders.inference_pool_drift(current, desired)
        if drift is not None:
            await api.patch(INFERENCEPOOLS, meta["namespace"], name, drift)
            logger.info(f"patched InferencePool {name} back to the operator's settings")
    ports = builders.inference_pool_ports(pool)
    ref = desired["spec"].get("endpointPickerRef")
    picker = f"endpoint picker Service {ref['name']}:{ref['port']['number']}" if ref else "no endpointPickerRef"
    message = f"InferencePool {name} selects the pool's worker pods on engine ports {_ports_text(ports)}; {picker}"
    slots = max(1, pool.gpu.count)
    if slots > len(ports):
        untargeted = range(ports.stop, ports.start + slots)
        message += (
            f"; engines on ports {_ports_text(untargeted)} are not targeted (an InferencePool lists at most "
            f"{builders.INFERENCE_POOL_MAX_PORTS} ports)"
        )
        return conditions.Condition(INFERENCE_POOL, conditions.TRUE, "PortsTruncated", message)
    return conditions.Condition(INFERENCE_POOL, conditions.TRUE, "Created", message)


async def remove_inference_pool(runtime: Runtime, body: kopf.Body, logger: Any) -> None:
    """Delete the InferencePool this pool owns, if any (only ours: owner and uid checked): the setting is off, or the
    pool is being deleted."""
    api = runtime.require_api()
    meta = body["metadata"]
    name = builders.inference_pool_name(meta["name"])
    try:
        current = await api.get(INFERENCEPOOLS, meta["namespace"], name)
        if current is not None and _owned_by(current, meta["uid"]):
            uid = (current.get("metadata") or {}).get("uid")
            if await api.delete(INFERENCEPOOLS, meta["namespace"], name, uid=uid):
                logger.info(f"deleted InferencePool {name}")
    except ApiError as exc:
        if exc.status not in (403, 404, 409):
            raise kopf.TemporaryError(f"InferencePool cleanup: {exc}", delay=2) from exc
        # 404: no CRD any more (nothing left); 403: the RBAC rule went with the setting (chart), so the pool's
        # owner reference removes it with the pool; 409: re-created under the same name meanwhile, not ours
        logger.warning(f"InferencePool {name} not deleted ({exc.status} {exc.reason}); it goes with its WarmPool")


async def delete_pool(runtime: Runtime, body: kopf.Body, logger: Any) -> None:
    """The WarmPool is being deleted: delete its InferencePool now (the garbage collector would, through the owner
    reference, also when no operator runs). Its DaemonSet and history ConfigMap are left to the collector. Registered
    only with `--inference-pool`."""
    await remove_inference_pool(runtime, body, logger)


async def reconcile_inference_pool(
    runtime: Runtime, body: kopf.Body, memo: MutableMapping[str, Any], logger: Any, pool: PoolSpec
) -> float | None:
    """Ensure (setting on) or remove (setting off) the pool's InferencePool and record the outcome for the round;
    returns the delay of a slow retry when the API refused it, else None."""
    if not runtime.config.inference_pool.enabled:
        record_inference_pool(memo, None)
        if any(c.get("type") == INFERENCE_POOL for c in (body.get("status") or {}).get("conditions") or ()):
            await remove_inference_pool(runtime, body, logger)  # the condition records that one was made
        return None
    try:
        record_inference_pool(memo, await ensure_inference_pool(runtime, body, logger, pool))
        return None
    except ApiError as exc:
        if exc.status in _INFERENCE_POOL_REASONS or exc.status in (400, 422):
            reason = _INFERENCE_POOL_REASONS.get(exc.status, "Rejected")
            message = f"{exc.status} {exc.reason}: {exc.message}"[:1000]
            if exc.status == 404:
                message = (
                    "the API serves no inference.networking.k8s.io/v1 inferencepools: install the Gateway API "
                    f"Inference Extension CRDs (v1.0 or later); {message}"
                )[:1000]
            elif exc.status == 403:
                message = f"the operator may not write InferencePools (chart: inferencePool.enabled); {message}"[:1000]
            record_inference_pool(memo, conditions.Condition(INFERENCE_POOL, conditions.FALSE, reason, message))
            logger.warning(f"InferencePool not written: {message}")
            return _INFERENCE_POOL_RETRY.get(exc.status, 30.0)
        raise kopf.TemporaryError(f"InferencePool: {exc}", delay=2) from exc


async def reconcile_pool(
    runtime: Runtime, body: kopf.Body, patch: kopf.Patch, memo: MutableMapping[str, Any], logger: Any
) -> None:
    with runtime.metrics.timed("WarmPool", "reconcile"):
        pool = parse_pool_spec(body.get("spec"))
        validation = reconcile.validate_pool(pool, runtime.config.rules)
        if not validation.ok:
            name = body["metadata"]["name"]
            logger.warning(f"WarmPool {name} is not valid, no workload written: {validation}")
            record_workload_problem(memo, None)  # the round reports the validation itself
            if not runtime.config.loop_enabled:
                problem = [
                    conditions.Condition(conditions.VALID, conditions.FALSE, validation.reason, validation.message),
                    conditions.Condition(conditions.READY, conditions.FALSE, validation.reason, validation.message),
                ]
                patch.status["conditions"] = conditions.merge_conditions(
                    (body.get("status") or {}).get("conditions"),
                    problem,
                    now=conditions.now_rfc3339(),
                    generation=body["metadata"].get("generation"),
                )
            if (body.get("status") or {}).get("observedGeneration") != body["metadata"].get("generation"):
                patch.status["observedGeneration"] = body["metadata"].get("generation")
            return
        try:
            await ensure_worker_workload(runtime, body, logger, pool)
            record_workload_problem(memo, None)
        except ApiError as exc:
            if exc.status in (400, 403, 422):  # the API refuses what we built: say so, retry slowly
                message = f"{exc.status} {exc.reason}: {exc.message}"[:1000]
                record_workload_problem(memo, ("WorkloadRejected", message))
                if not runtime.config.loop_enabled:  # otherwise the round shows it
                    cond = conditions.Condition(conditions.READY, conditions.FALSE, "WorkloadRejected", message)
                    patch.status["conditions"] = conditions.merge_conditions(
                        (body.get("status") or {}).get("conditions"),
                        [cond],
                        now=conditions.now_rfc3339(),
                        generation=body["metadata"].get("generation"),
                    )
                raise kopf.TemporaryError(f"worker workload rejected: {exc}", delay=30) from exc
            raise kopf.TemporaryError(f"worker workload: {exc}", delay=2) from exc
        retry = await reconcile_inference_pool(runtime, body, memo, logger, pool)
        name = builders.worker_workload_name(body["metadata"]["name"])
        status = body.get("status") or {}
        wanted = {"observedGeneration": body["metadata"].get("generation"), "workload": f"DaemonSet/{name}"}
        if not runtime.config.loop_enabled:  # no round runs: this handler owns the conditions
            conds = [
                conditions.Condition(conditions.VALID, conditions.TRUE, validation.reason, validation.message),
                conditions.Condition(conditions.READY, conditions.UNKNOWN, "WaitingForWorkers", "workload created"),
            ]
            existing = status.get("conditions") or []
            gateway = inference_pool_outcome(memo)
            if gateway is not None:
                conds.append(gateway)
            elif not runtime.config.inference_pool.enabled:  # the setting is off: its condition goes
                existing = [c for c in existing if c.get("type") != INFERENCE_POOL]
            wanted["conditions"] = conditions.merge_conditions(
                existing,
                conds,
                now=conditions.now_rfc3339(),
                generation=body["metadata"].get("generation"),
            )
        if any(status.get(k) != v for k, v in wanted.items()):
            patch.status.update(wanted)
        if retry is not None:  # the condition says why; the CRD or the RBAC rule may come later
            raise ConditionRetry("InferencePool refused by the API, retrying", delay=retry)


async def run_loop(
    runtime: Runtime, body: kopf.Body, memo: MutableMapping[str, Any], stopped: Any, logger: Any
) -> None:
    await loop.run(
        runtime,
        body,
        stopped,
        logger,
        workload_problem=lambda: workload_problem(memo),
        inference_pool=lambda: inference_pool_outcome(memo),
    )
