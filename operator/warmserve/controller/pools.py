"""WarmPool reconcile (worker workload) and the control-loop daemon (called by handlers.py).

Status owners (docs/operator.md, "Status owners"): this handler writes `observedGeneration` and `workload`;
the pool's round writes everything else, conditions included. Only with `--no-loop`, when no round runs, does
this handler write the `Ready` condition (`WaitingForWorkers`, `WorkloadRejected`). A workload the API refuses
is told to the round through kopf's per-object memo, which the pool's handlers and its daemon share.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import kopf

from warmserve.controller import builders, conditions, loop
from warmserve.controller.k8s import DAEMONSETS, ApiError
from warmserve.controller.runtime import Runtime
from warmserve.controller.spec import parse_pool_spec


async def ensure_worker_workload(runtime: Runtime, body: kopf.Body, logger: Any) -> str:
    """Create the worker DaemonSet, or patch it back when it drifted; returns what was done."""
    api = runtime.require_api()
    meta = body["metadata"]
    desired = builders.build_worker_daemonset(meta["name"], meta["namespace"], parse_pool_spec(body.get("spec")))
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


async def reconcile_pool(
    runtime: Runtime, body: kopf.Body, patch: kopf.Patch, memo: MutableMapping[str, Any], logger: Any
) -> None:
    with runtime.metrics.timed("WarmPool", "reconcile"):
        try:
            await ensure_worker_workload(runtime, body, logger)
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
        name = builders.worker_workload_name(body["metadata"]["name"])
        status = body.get("status") or {}
        wanted = {"observedGeneration": body["metadata"].get("generation"), "workload": f"DaemonSet/{name}"}
        if not runtime.config.loop_enabled and not status.get("conditions"):
            cond = conditions.Condition(conditions.READY, conditions.UNKNOWN, "WaitingForWorkers", "workload created")
            wanted["conditions"] = conditions.merge_conditions(
                None, [cond], now=conditions.now_rfc3339(), generation=body["metadata"].get("generation")
            )
        if any(status.get(k) != v for k, v in wanted.items()):
            patch.status.update(wanted)


async def run_loop(
    runtime: Runtime, body: kopf.Body, memo: MutableMapping[str, Any], stopped: Any, logger: Any
) -> None:
    await loop.run(runtime, body, stopped, logger, workload_problem=lambda: workload_problem(memo))
