"""Writing plans onto worker pods: only on change, with a monotonic generation.

The previous plan is read back from the pod itself, so a restarted operator continues the generation
sequence and writes nothing when the contents did not change. The pool round numbers its plans in its
decide stage (`decide.number_plans`) and writes them with `patch_plan`; ModelDeployment deletion strips a
model from every plan with `strip_model_from_pool`. Both hold the pool's lock (`Runtime.pool_lock`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from warmserve.controller.builders import selector_labels
from warmserve.controller.k8s import Api, Resource
from warmserve.controller.metrics import OperatorMetrics
from warmserve.protocol import (
    MAX_GENERATION,
    Plan,
    PlanGroup,
    ProtocolError,
    next_generation,
    plan_of_pod,
    plan_patch,
    state_of_pod,
)


def without_model(plan: Plan, uid: str) -> Plan:
    """The same plan with every replica of ModelDeployment `uid` removed (pure)."""
    groups = [PlanGroup(g.gpus, tuple(r for r in g.replicas if r.uid != uid)) for g in plan.groups]
    return Plan.build(plan.generation, groups)


async def patch_plan(api: Api, pods: Resource, namespace: str | None, pod: str, plan: Plan) -> None:
    """Write `plan` into the pod's `warmserve.io/plan` annotation (a merge patch of that one key)."""
    await api.patch(pods, namespace, pod, plan_patch(plan))


async def write_plan(api: Api, pods: Resource, pod: Mapping[str, Any], desired: Plan) -> Plan | None:
    """Write `desired` on `pod` if its contents differ from the pod's plan; returns what was written."""
    meta = pod.get("metadata") or {}
    current = plan_of_pod(pod)
    new = next_generation(current, desired)
    if current is not None and new is current:
        return None
    await patch_plan(api, pods, meta.get("namespace"), meta["name"], new)
    return new


async def strip_model_from_pool(
    api: Api,
    pods: Resource,
    namespace: str | None,
    pool: str,
    uid: str,
    metrics: OperatorMetrics | None = None,
) -> int:
    """Remove ModelDeployment `uid` from every plan of `pool`; returns how many pods were rewritten."""
    changed = 0
    for pod in await api.list(pods, namespace, selector_labels(pool)):
        plan = plan_of_pod(pod)
        if plan is None or uid not in plan.uids():
            continue
        stripped = without_model(plan, uid)
        floor = plan.generation
        try:  # never number a plan at or below what the worker reports to have applied
            state = state_of_pod(pod)
        except ProtocolError:
            state = None
        if state is not None and state.observed_generation <= MAX_GENERATION:
            floor = max(floor, state.observed_generation)
        if await write_plan(api, pods, pod, Plan(floor + 1, stripped.groups)) is not None:
            changed += 1
            if metrics is not None:
                metrics.plan_changes.labels(pool).inc()
    return changed
