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
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import kopf

from warmserve.controller import builders, conditions, loop, reconcile
from warmserve.controller.k8s import DAEMONSETS, ApiError
from warmserve.controller.runtime import Runtime
from warmserve.controller.spec import PoolSpec, parse_pool_spec


async def ensure_worker_workload(runtime: Runtime, body: kopf.Body, logger: Any, pool: PoolSpec | None = None) -> str:
    """Create the worker DaemonSet, or patch it back when it drifted; returns what was done. The caller has
    validated the pool (`reconcile.validate_pool`)."""
    api = runtime.require_api()
    meta = body["metadata"]
    pool = pool if pool is not None else parse_pool_spec(body.get("spec"))
    desired = builders.build_worker_daemonset(meta["name"], meta["namespace"], pool)
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
        name = builders.worker_workload_name(body["metadata"]["name"])
        status = body.get("status") or {}
        wanted = {"observedGeneration": body["metadata"].get("generation"), "workload": f"DaemonSet/{name}"}
        if not runtime.config.loop_enabled:  # no round runs: this handler owns the conditions
            conds = [
                conditions.Condition(conditions.VALID, conditions.TRUE, validation.reason, validation.message),
                conditions.Condition(conditions.READY, conditions.UNKNOWN, "WaitingForWorkers", "workload created"),
            ]
            wanted["conditions"] = conditions.merge_conditions(
                status.get("conditions"),
                conds,
                now=conditions.now_rfc3339(),
                generation=body["metadata"].get("generation"),
            )
        if any(status.get(k) != v for k, v in wanted.items()):
            patch.status.update(wanted)


async def run_loop(
    runtime: Runtime, body: kopf.Body, memo: MutableMapping[str, Any], stopped: Any, logger: Any
) -> None:
    await loop.run(runtime, body, stopped, logger, workload_problem=lambda: workload_problem(memo))
