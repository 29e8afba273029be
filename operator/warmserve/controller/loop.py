"""The per-WarmPool control loop (run by a kopf daemon, so only on the leader when peering is on).

Every `spec.policy.intervalSeconds` one round, in stages (docs/operator.md, "The control loop"):

1. observe (`observe.KubeObserver`): the pool's worker pods, its ModelDeployments and their weight bytes, and
   a load sample, into one immutable `decide.Observation`;
2. forecasts (`forecasts.Forecasts`): the samples join the current window; at a window boundary the window
   joins the load history and the forecaster predicts the new window per model;
3. decide (`decide.decide`, pure): the planner (the simulator's control step on the state rebuilt from the
   pods' plans) → the plans whose contents changed, and the pool's and its models' status;
4. act (`act.act` through `act.KubeActuator`): save the history, write the plans, patch the status that
   changed, metrics.

`PoolLoop` keeps what must survive between rounds (not across restarts: see the history ConfigMap): the
forecasts, the planner state and a round counter. A history that could not be saved is retried every round
and once more when the daemon stops (`PoolLoop.flush_history`), so an orderly restart loses no window.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from warmserve.controller.act import ActResult, Actuator, KubeActuator, act, save_history
from warmserve.controller.decide import PlannerState, decide
from warmserve.controller.forecasts import LEND_WINDOW_ROUNDS, SCALE_WINDOW_SECONDS, Forecasts, ForecastUpdate
from warmserve.controller.history import LoadHistory
from warmserve.controller.k8s import ApiError
from warmserve.controller.observe import InferencePoolOutcome, KubeObserver, Observer
from warmserve.controller.runtime import Runtime
from warmserve.controller.spec import PoolSpec, parse_pool_spec
from warmserve.core.types import Demand

__all__ = ["LEND_WINDOW_ROUNDS", "SCALE_WINDOW_SECONDS", "PoolLoop", "run"]


class PoolLoop:
    """One pool's rounds: observe → forecasts → decide → act, and the state kept between them."""

    def __init__(
        self,
        runtime: Runtime,
        namespace: str | None,
        name: str,
        *,
        observer: Observer | None = None,
        actuator: Actuator | None = None,
        workload_problem: Callable[[], tuple[str, str] | None] | None = None,
        inference_pool: InferencePoolOutcome | None = None,
    ) -> None:
        self.runtime = runtime
        self.namespace = namespace
        self.name = name
        self.observer = observer or KubeObserver(runtime, namespace, name, workload_problem, inference_pool)
        self.actuator = actuator or KubeActuator(runtime, namespace, name)
        self.forecasts: Forecasts | None = None
        self.planner = PlannerState()
        self.rounds = 0
        self.last_body: Mapping[str, Any] | None = None  # the pool object of the last round (owner of the history)

    @property
    def history(self) -> LoadHistory | None:
        return self.forecasts.history if self.forecasts is not None else None

    @property
    def demand(self) -> Mapping[str, Demand]:
        """The forecast demand per model uid the planner places for."""
        return self.forecasts.demand if self.forecasts is not None else {}

    async def _restore_history(self, pool: PoolSpec, logger: Any) -> Forecasts:
        """The forecasts, with the history and the open-window checkpoint read back from their ConfigMaps on the
        first round, and again when the window length changes (windows of another length are not comparable:
        the forecasts start over from what is persisted at the new length). Both reads succeed before anything
        is kept, so a failed read is retried by the next round instead of losing the checkpoint."""
        if self.forecasts is None or self.forecasts.history.window_seconds != pool.forecast.window_seconds:
            history = await self.observer.load_history(pool)
            checkpoint = await self.observer.load_open_window(pool)
            forecasts = Forecasts(history, self.runtime.config.history_budget_bytes)
            # what is persisted is all there is: nothing is waiting to be saved (HistorySaved=True)
            forecasts.last_save = (True, "Restored", f"{len(history.series)} model(s) restored")
            forecasts.restore(checkpoint)
            self.forecasts = forecasts
            logger.info(
                f"load history of pool {self.name}: {len(history.series)} model(s) restored"
                + (f", open-window checkpoint of window {checkpoint.window}" if checkpoint else "")
            )
        return self.forecasts

    async def tick(self, body: Mapping[str, Any], logger: Any) -> None:
        """One round for the WarmPool object `body`."""
        metrics, started = self.runtime.metrics, time.perf_counter()
        now = self.runtime.clock()
        forecasts = await self._restore_history(parse_pool_spec(body.get("spec")), logger)
        obs = await self.observer.observe(body, now, logger)
        # off the event loop: encoding a long history (days of 10 s windows) takes a second of CPU
        update = await asyncio.to_thread(
            forecasts.advance, now, obs.pool.spec, obs.catalog.entries, obs.catalog.load_by_uid(obs.load)
        )
        decision = decide(obs, forecasts.view(obs.pool.spec), self.planner)
        self.planner.memory = decision.memory
        self.last_body = obs.pool.body
        result = await act(obs, update, decision, self.actuator, metrics, logger, time.perf_counter() - started)
        self._saved(update, result)
        metrics.reconcile_seconds.labels("WarmPool", "round").observe(time.perf_counter() - started)
        self.rounds += 1

    def _saved(self, update: ForecastUpdate, result: ActResult) -> None:
        if self.forecasts is None:
            return
        if result.history_attempted:
            self.forecasts.saved(result.history_error, update.history_note)
        if result.open_window_error is not None:
            self.forecasts.checkpoint_failed()

    async def flush_history(self, logger: Any) -> None:
        """Save a history whose last save failed (or has not happened yet since a window closed), and the open
        window's samples: called when the daemon stops, so that an orderly stop or restart of the operator loses
        no window and no sample."""
        forecasts = self.forecasts
        if forecasts is None or self.last_body is None:
            return
        text, note = await asyncio.to_thread(forecasts.encode) if forecasts.unsaved else (None, "")
        update = ForecastUpdate(history=text, history_note=note, open_window=forecasts.open_window())
        result = await save_history(update, self.last_body, self.actuator, self.runtime.metrics, self.name, logger)
        self._saved(update, result)
        if result.history_attempted and result.history_error is None:
            logger.info(f"load history of pool {self.name} saved on stop")


async def run(
    runtime: Runtime,
    body: kopf.Body,
    stopped: Any,
    logger: Any,
    workload_problem: Callable[[], tuple[str, str] | None] | None = None,
    inference_pool: InferencePoolOutcome | None = None,
) -> None:
    """The daemon body: one round per interval until kopf stops the daemon (deletion, pause, exit)."""
    meta = body.get("metadata") or {}
    loop = PoolLoop(
        runtime, meta.get("namespace"), meta["name"], workload_problem=workload_problem, inference_pool=inference_pool
    )
    if runtime.on_loop is not None:
        runtime.on_loop(loop)
    wake = runtime.wakeups.register()
    try:
        while not stopped:
            wake.clear()
            try:
                await loop.tick(body, logger)
            except (ApiError, kopf.TemporaryError) as exc:
                runtime.metrics.reconcile_errors.labels("WarmPool", "round").inc()
                logger.warning(f"control round failed, retrying next interval: {exc}")
            except Exception as exc:
                runtime.metrics.reconcile_errors.labels("WarmPool", "round").inc()
                logger.exception(f"control round crashed, retrying next interval: {exc}")
            interval = parse_pool_spec(body.get("spec")).interval_seconds
            await _sleep(stopped, wake, min(max(interval, 0.5), 3600.0))  # unvalidated specs: never spin
    finally:
        runtime.wakeups.unregister(wake)
        deleting = bool((body.get("metadata") or {}).get("deletionTimestamp"))  # its history goes with it
        try:  # also when cancelled: one more chance for a history that is not saved yet
            if not deleting:
                await asyncio.wait_for(loop.flush_history(logger), timeout=5)
        except Exception as exc:
            logger.warning(f"load history not saved on stop: {exc}")


async def _sleep(stopped: Any, wake: asyncio.Event, interval: float) -> None:
    """Until the next round: the pool's interval, or sooner when the router holds a request (a wake-up)."""

    async def until_stopped() -> None:
        await stopped.wait(interval)

    waits = [asyncio.ensure_future(until_stopped()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
