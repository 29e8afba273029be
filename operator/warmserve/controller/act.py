"""The act stage of a pool round: carry out a `Decision` and report it.

`act` does, in this order: report the window that closed and save the load history (a failed save is logged,
counted in `warmserve_history_save_failures_total` and retried at the next round; the `ActResult` goes back to
the pool's `Forecasts`, whose view becomes the `HistorySaved` condition); under the pool's lock (shared with
ModelDeployment deletion) count the promotions and write the changed plans; set the plan metrics; patch the
WarmPool status and each ModelDeployment status whose fields changed; last, save the open window's checkpoint
when the update carries one (failures: `warmserve_history_checkpoint_failures_total`). `Actuator` is the
interface it writes through; `KubeActuator` is the operator's implementation over `k8s.Api`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol, cast

import kopf

from warmserve.controller import builders
from warmserve.controller.decide import Decision, Observation
from warmserve.controller.forecasts import ForecastUpdate
from warmserve.controller.k8s import CONFIGMAPS, MODELDEPLOYMENTS, PODS, WARMPOOLS, ApiError
from warmserve.controller.metrics import OperatorMetrics
from warmserve.controller.planwriter import patch_plan
from warmserve.controller.runtime import Runtime
from warmserve.protocol import Plan


class Actuator(Protocol):
    """Where one pool's round writes; a single-machine driver implements the same calls."""

    def exclusive(self) -> AbstractAsyncContextManager[Any]:
        """Held while plans are written: no other writer changes the pool's plans meanwhile."""
        ...

    async def save_history(self, encoded: str, owner: Mapping[str, Any], logger: Any) -> str | None:
        """Persist the encoded load history; returns None when saved, else why not (the next round retries).
        An implementation may also raise: the act stage reports that the same way."""
        ...

    async def save_open_window(self, encoded: str, owner: Mapping[str, Any], logger: Any) -> str | None:
        """Persist the checkpoint of the open window (`history.OpenWindow`), apart from the history; same
        contract as `save_history`."""
        ...

    async def write_plan(self, pod: str, plan: Plan) -> None: ...

    async def patch_pool_status(self, status: Mapping[str, Any]) -> None: ...

    async def patch_model_status(self, name: str, status: Mapping[str, Any]) -> None:
        """Patch a ModelDeployment's status; one deleted meanwhile is skipped."""
        ...


@dataclass(frozen=True)
class ActResult:
    """What the act stage reports back to the round: whether it tried to save the history, and why it failed."""

    history_attempted: bool = False
    history_error: str | None = None  # None: saved (or not attempted)
    open_window_error: str | None = None  # the checkpoint of the open window: None when saved or not attempted


async def save_history(
    update: ForecastUpdate,
    owner: Mapping[str, Any],
    actuator: Actuator,
    metrics: OperatorMetrics,
    pool: str,
    logger: Any,
) -> ActResult:
    """Save `update.history`, then `update.open_window`, through `actuator`; a failure is counted and logged,
    never raised."""
    result = ActResult()
    if update.history is not None:
        failures = metrics.history_save_failures.labels(pool)
        error = await _persist(actuator.save_history, update.history, owner, failures, logger, "load history")
        result = ActResult(True, error)
    if update.open_window is not None:
        failures = metrics.checkpoint_failures.labels(pool)
        error = await _persist(
            actuator.save_open_window, update.open_window, owner, failures, logger, "open-window checkpoint"
        )
        result = dataclasses.replace(result, open_window_error=error)
    return result


async def _persist(
    save: Callable[[str, Mapping[str, Any], Any], Awaitable[str | None]],
    encoded: str,
    owner: Mapping[str, Any],
    failures: Any,
    logger: Any,
    what: str,
) -> str | None:
    try:
        error = await save(encoded, owner, logger)
    except Exception as exc:  # a failed save must not keep the round from writing plans
        error = f"{type(exc).__name__}: {exc}"
    if error is not None:
        failures.inc()
        logger.warning(f"{what} not saved (retried next round): {error}")
    return error


async def act(
    obs: Observation,
    update: ForecastUpdate,
    decision: Decision,
    actuator: Actuator,
    metrics: OperatorMetrics,
    logger: Any,
    plan_seconds: float,
) -> ActResult:
    pool = decision.pool
    for closed in update.closed:
        for stat, value in (("avg", closed.avg), ("peak", closed.peak)):
            metrics.observed.labels(pool, closed.served_name, stat).set(value)
            if closed.predicted is not None:
                err = abs(getattr(closed.predicted, stat) - value)
                metrics.forecast_abs_error.labels(pool, closed.served_name, stat).set(err)
    # the history first (a closed window), the checkpoint last: it must not delay the plans
    result = await save_history(
        dataclasses.replace(update, open_window=None), obs.pool.body, actuator, metrics, pool, logger
    )
    for served_name, stat, value in update.forecast:
        metrics.forecast.labels(pool, served_name, stat).set(value)
    try:
        async with actuator.exclusive():
            for uid, source in decision.promotions:
                metrics.promotions.labels(pool, uid, str(source)).inc()
            for write in decision.plans:
                await actuator.write_plan(write.pod, write.plan)
                metrics.plan_changes.labels(pool).inc()
                logger.info(f"plan {write.plan.generation} written to {write.pod}")
        metrics.plan_generation.labels(pool).set(decision.generation)
        metrics.reconcile_seconds.labels("WarmPool", "plan").observe(plan_seconds)

        if decision.pool_status.changed:
            await actuator.patch_pool_status(decision.pool_status.status)
        for md in decision.model_statuses:
            if md.changed:
                await actuator.patch_model_status(md.name, md.status)
    finally:  # also when a write failed: the samples are worth keeping whatever happened to the plans
        checkpoint = ForecastUpdate(open_window=update.open_window)
        saved = await save_history(checkpoint, obs.pool.body, actuator, metrics, pool, logger)
    return dataclasses.replace(result, open_window_error=saved.open_window_error)


class KubeActuator:
    """Writes one WarmPool's round through the Kubernetes API (`k8s.Api`)."""

    def __init__(self, runtime: Runtime, namespace: str | None, name: str) -> None:
        self.runtime = runtime
        self.namespace = namespace
        self.name = name

    def exclusive(self) -> AbstractAsyncContextManager[Any]:
        return self.runtime.pool_lock(self.namespace, self.name)

    async def save_history(self, encoded: str, owner: Mapping[str, Any], logger: Any) -> str | None:
        return await self._save_configmap(builders.build_history_configmap(self.name, self.namespace, encoded), owner)

    async def save_open_window(self, encoded: str, owner: Mapping[str, Any], logger: Any) -> str | None:
        body = builders.build_open_window_configmap(self.name, self.namespace, encoded)
        return await self._save_configmap(body, owner)

    async def _save_configmap(self, body: dict[str, Any], owner: Mapping[str, Any]) -> str | None:
        """Create the pool-owned ConfigMap `body`, or patch its data when it exists; an API error is returned."""
        api = self.runtime.require_api()
        kopf.adopt(body, owner=cast(kopf.Body, dict(owner)))
        try:
            _, created = await api.create(CONFIGMAPS, self.namespace, body)
            if not created:
                patch: dict[str, Any] = {k: body[k] for k in ("data", "binaryData") if k in body}
                await api.patch(CONFIGMAPS, self.namespace, body["metadata"]["name"], patch)
        except ApiError as exc:
            return str(exc)
        return None

    async def write_plan(self, pod: str, plan: Plan) -> None:
        await patch_plan(self.runtime.require_api(), PODS, self.namespace, pod, plan)

    async def patch_pool_status(self, status: Mapping[str, Any]) -> None:
        api = self.runtime.require_api()
        await api.patch(WARMPOOLS, self.namespace, self.name, {"status": dict(status)}, status=True)

    async def patch_model_status(self, name: str, status: Mapping[str, Any]) -> None:
        api = self.runtime.require_api()
        try:
            await api.patch(MODELDEPLOYMENTS, self.namespace, name, {"status": dict(status)}, status=True)
        except ApiError as exc:
            if exc.status != 404:  # deleted meanwhile: nothing to report
                raise
