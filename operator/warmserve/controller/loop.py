"""The per-WarmPool control loop (run by a kopf daemon, so only on the leader when peering is on).

Every `spec.policy.intervalSeconds` one round:

1. observe: the pool's worker pods (plan and state annotations) and its ModelDeployments;
2. sample load (scraper) into the current window; at a window boundary close the window into the load
   history, persist the history (ConfigMap `<pool>-load-history`), and forecast the new window per model;
3. plan (pure `planner.plan_round` with the same `WarmServePolicy` the simulator uses) and write
   `warmserve.io/plan` on the pods whose plan changed (monotonic generation);
4. reflect: WarmPool status (workers, per-GPU state, free bytes) and each ModelDeployment's status
   (replicas, warm replicas, endpoints, forecast, observed load, conditions), written only when changed.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import kopf
import numpy as np

from warmserve.controller import builders, reconcile
from warmserve.controller.conditions import now_rfc3339
from warmserve.controller.history import LoadHistory, WindowAccumulator
from warmserve.controller.k8s import CONFIGMAPS, DAEMONSETS, MODELDEPLOYMENTS, PODS, WARMPOOLS, Api, ApiError
from warmserve.controller.models import weight_bytes_of
from warmserve.controller.planner import ModelEntry, PlannerMemory, RoundInput, WorkerSnapshot, plan_round
from warmserve.controller.planwriter import write_plan
from warmserve.controller.runtime import Runtime
from warmserve.controller.scrape import LoadScraper, PrometheusScraper, WorkerMetricsScraper
from warmserve.controller.spec import PoolSpec, parse_model_spec, parse_pool_spec
from warmserve.core.autoscaler import AutoscalerParams
from warmserve.core.forecast import make_forecaster
from warmserve.core.placement import PlacementParams
from warmserve.core.policy import PolicyParams, WarmServePolicy
from warmserve.core.types import Demand, ModelProfile

SCALE_WINDOW_SECONDS = 5.0  # the autoscaler averages load over this long (the simulator's default)
LEND_WINDOW_ROUNDS = 10  # KV lending is sized on the peak of this many rounds (the simulator's)


def forecaster_for(pool: PoolSpec) -> Any:
    f = pool.forecast
    if f.kind in ("csp", "smooth-csp"):
        return make_forecaster(f.kind, days=f.season_days, corrections=f.correction_windows)
    return make_forecaster(f.kind)


def policy_params(pool: PoolSpec) -> PolicyParams:
    """The pool's spec.policy as the core's parameters (the simulator's defaults when unset)."""
    return PolicyParams(
        placement=PlacementParams(upper=pool.scale_up_utilization, load_bandwidth=pool.load_bandwidth_gbps * 1e9),
        autoscaler=AutoscalerParams(
            upper=pool.scale_up_utilization,
            lower=pool.scale_down_utilization,
            protection_s=pool.protection_seconds,
        ),
    )


def default_scraper(runtime: Runtime, pool: PoolSpec) -> LoadScraper:
    if pool.load_source.kind == "prometheus":
        return PrometheusScraper(
            pool.load_source.prometheus_url, pool.load_source.query, runtime.config.scrape_timeout_seconds
        )
    return WorkerMetricsScraper(pool.worker.port, runtime.config.scrape_timeout_seconds)


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class PoolLoop:
    """State of one pool's loop that must survive between rounds (not across restarts: see history)."""

    def __init__(self, runtime: Runtime, namespace: str, name: str) -> None:
        self.runtime = runtime
        self.namespace = namespace
        self.name = name
        self.history: LoadHistory | None = None
        self.window: int | None = None
        self.acc: dict[str, WindowAccumulator] = {}
        self.recent: dict[str, deque[float]] = {}  # uid → last samples (autoscaler and KV-lending windows)
        self.demand: dict[str, Demand] = {}
        self.last_observed: dict[str, tuple[float, float]] = {}
        self.policy: WarmServePolicy | None = None
        self.profiles: dict[str, ModelProfile] = {}
        self.memory = PlannerMemory()
        self.rounds = 0

    # ------------------------------------------------------------ history
    async def load_history(self, api: Api, pool: PoolSpec, owner: Mapping[str, Any]) -> LoadHistory:
        capacity = pool.forecast.history_days * pool.forecast.period
        cm = await api.get(CONFIGMAPS, self.namespace, builders.history_configmap_name(self.name))
        text = ((cm or {}).get("binaryData") or {}).get(builders.HISTORY_KEY, "")
        history = LoadHistory.decode(text, pool.forecast.window_seconds, capacity) if text else None
        return history or LoadHistory(pool.forecast.window_seconds, capacity)

    async def save_history(self, api: Api, owner: Mapping[str, Any]) -> None:
        assert self.history is not None
        payload = self.history.encode()
        body = builders.build_history_configmap(self.name, self.namespace, payload)
        kopf.adopt(body, owner=dict(owner))
        _, created = await api.create(CONFIGMAPS, self.namespace, body)
        if not created:
            await api.patch(CONFIGMAPS, self.namespace, body["metadata"]["name"], {"binaryData": body["binaryData"]})

    # -------------------------------------------------------------- round
    async def tick(self, body: Mapping[str, Any], logger: Any) -> None:
        runtime, api = self.runtime, self.runtime.require_api()
        started = time.perf_counter()
        now = runtime.clock()
        pool = parse_pool_spec(body.get("spec"))
        window_s = pool.forecast.window_seconds
        if self.history is None or self.history.window_seconds != window_s:
            self.history = await self.load_history(api, pool, body)
            logger.info(f"load history of pool {self.name}: {len(self.history.series)} model(s) restored")

        pods = [
            p
            for p in await api.list(PODS, self.namespace, builders.selector_labels(self.name))
            if not (p.get("metadata") or {}).get("deletionTimestamp")
        ]
        pods.sort(key=lambda p: p["metadata"]["name"])
        workers = [reconcile.view_worker(p, pool.gpu.count) for p in pods]

        mds = [
            m
            for m in await api.list(MODELDEPLOYMENTS, self.namespace)
            if ((m.get("spec") or {}).get("poolRef") or {}).get("name") == self.name
            and not (m.get("metadata") or {}).get("deletionTimestamp")
        ]
        entries, validations = await self._entries(mds, pool)

        # --- load samples and window bookkeeping
        by_name = {e.served_name: e.uid for e in entries}
        try:
            factory = runtime.scraper_factory or default_scraper
            samples = await factory(runtime, pool).sample(workers)
        except Exception as exc:  # a broken metrics source must not stop planning
            runtime.metrics.scrape_errors.labels(self.name).inc()
            logger.warning(f"load scrape failed: {exc}")
            samples = {}
        load = {by_name[k]: v for k, v in samples.items() if k in by_name}
        window = int(now // window_s)
        if self.window is None:
            self.window = window
        if window != self.window:
            await self._close_window(api, body, pool, entries, window, logger)
        keep = max(1, round(SCALE_WINDOW_SECONDS / pool.interval_seconds))
        for e in entries:
            sample = load.get(e.uid, 0.0)
            self.acc.setdefault(e.uid, WindowAccumulator()).add(sample)
            self.recent.setdefault(e.uid, deque(maxlen=max(keep, LEND_WINDOW_ROUNDS))).append(sample)
        mean_load = {uid: float(np.mean(list(q)[-keep:])) for uid, q in self.recent.items() if q}
        peak_load = {uid: max(q) for uid, q in self.recent.items() if q}
        if not self.demand and entries:
            self._forecast(pool, entries, window)

        # --- plan
        profiles = {e.uid: e.profile for e in entries}
        params = policy_params(pool)
        if self.policy is None or profiles != self.profiles or params != self.policy.params:
            old_scores = self.policy.scores if self.policy else {}
            self.policy = WarmServePolicy(profiles, params)
            self.policy.scores = dict(old_scores)
            self.profiles = profiles
        snapshots = [
            WorkerSnapshot(w.pod, pool.devices_per_worker, self._gpu_bytes(w, pool), w.plan, w.state)
            for w in workers
            if w.ready
        ]
        async with runtime.pool_lock(self.namespace, self.name):
            result = plan_round(
                self.policy,
                RoundInput(now, snapshots, entries, mean_load, self.demand, self.memory, peak_load),
            )
            self.memory = result.memory
            for uid, source in result.promotions:
                runtime.metrics.promotions.labels(self.name, uid, source).inc()
            plan_seconds = time.perf_counter() - started
            generation = max((w.plan.generation for w in workers if w.plan), default=0)
            for pod in pods:
                desired = result.plans.get(pod["metadata"]["name"])
                if desired is None:
                    continue
                written = await write_plan(api, PODS, pod, desired)
                if written is not None:
                    runtime.metrics.plan_changes.labels(self.name).inc()
                    generation = max(generation, written.generation)
                    logger.info(f"plan {written.generation} written to {pod['metadata']['name']}")
        runtime.metrics.plan_generation.labels(self.name).set(generation)
        runtime.metrics.reconcile_seconds.labels("WarmPool", "plan").observe(plan_seconds)

        # --- reflect (re-read the pods we just wrote so status shows the new plans)
        await self._reflect(api, body, pool, mds, validations, generation, logger)
        runtime.metrics.reconcile_seconds.labels("WarmPool", "round").observe(time.perf_counter() - started)
        self.rounds += 1

    async def _entries(self, mds: list[dict[str, Any]], pool: PoolSpec) -> tuple[list[ModelEntry], dict]:
        entries, validations = [], {}
        for md in mds:
            meta = md["metadata"]
            spec = parse_model_spec(meta["name"], md.get("spec"))
            weight, origin, _ = await weight_bytes_of(self.runtime, spec)
            if weight is None and (md.get("status") or {}).get("weightBytes"):
                weight, origin = int(md["status"]["weightBytes"]), "safetensors"
            validation = reconcile.validate_model(spec, pool, weight)
            validations[meta["uid"]] = (spec, validation, weight, origin)
            if not validation.ok or (not spec.prewarm_enabled and spec.max_replicas == 0):
                continue
            profile = ModelProfile(
                name=meta["uid"],
                weight_bytes=int(weight),
                tp=spec.tp,
                max_batch=spec.max_concurrency,
                priority=spec.priority,
                min_warm=spec.min_warm_replicas if spec.prewarm_enabled else 0,
            )
            entries.append(
                ModelEntry(
                    meta["uid"],
                    spec.served_name,
                    reconcile.worker_source(spec.source, pool) or spec.source,
                    profile,
                    spec.min_replicas,
                    spec.max_replicas,
                )
            )
        entries.sort(key=lambda e: e.uid)
        return entries, validations

    @staticmethod
    def _gpu_bytes(worker: reconcile.WorkerView, pool: PoolSpec) -> int:
        if worker.state is not None and worker.state.devices:
            return min(d.total_bytes for d in worker.state.devices) or pool.device_arena_bytes
        return pool.device_arena_bytes

    async def _close_window(
        self,
        api: Api,
        body: Mapping[str, Any],
        pool: PoolSpec,
        entries: list[ModelEntry],
        window: int,
        logger: Any,
    ) -> None:
        assert self.history is not None and self.window is not None
        for e in entries:
            acc = self.acc.get(e.uid)
            if acc is None or acc.count == 0:
                continue
            self.history.record(e.uid, self.window, acc.avg, acc.peak)
            self.last_observed[e.uid] = (acc.avg, acc.peak)
            predicted = self.demand.get(e.uid)
            for stat, value in (("avg", acc.avg), ("peak", acc.peak)):
                self.runtime.metrics.observed.labels(self.name, e.served_name, stat).set(value)
                if predicted is not None:
                    err = abs(getattr(predicted, stat) - value)
                    self.runtime.metrics.forecast_abs_error.labels(self.name, e.served_name, stat).set(err)
        self.history.forget({e.uid for e in entries})
        self.acc.clear()
        self.window = window
        try:
            await self.save_history(api, body)
        except ApiError as exc:
            logger.warning(f"load history not saved (will retry next window): {exc}")
        self._forecast(pool, entries, window)

    def _forecast(self, pool: PoolSpec, entries: list[ModelEntry], window: int) -> None:
        """Demand per model = max(forecast of this window, of the next): prewarming must precede a burst."""
        assert self.history is not None
        forecaster = forecaster_for(pool)
        demand = {}
        for e in entries:
            values = {}
            for stat in ("avg", "peak"):
                best = 0.0
                if self.history.windows(e.uid):
                    series, t = self.history.array(e.uid, stat, window)
                    ahead = np.concatenate([series, [np.nan]])
                    for v in (
                        forecaster.predict(series, t, pool.forecast.period),
                        forecaster.predict(ahead, t + 1, pool.forecast.period),
                    ):
                        best = max(best, v if math.isfinite(v) else 0.0)
                values[stat] = best
                self.runtime.metrics.forecast.labels(self.name, e.served_name, stat).set(best)
            demand[e.uid] = Demand(values["avg"], max(values["peak"], values["avg"]))
        self.demand = demand

    async def _reflect(
        self,
        api: Api,
        body: Mapping[str, Any],
        pool: PoolSpec,
        mds: list[dict[str, Any]],
        validations: dict,
        generation: int,
        logger: Any,
    ) -> None:
        runtime, now = self.runtime, now_rfc3339()
        pods = await api.list(PODS, self.namespace, builders.selector_labels(self.name))
        workers = [reconcile.view_worker(p, pool.gpu.count) for p in pods]
        workload = await api.get(DAEMONSETS, self.namespace, builders.worker_workload_name(self.name))
        expected = int(((workload or {}).get("status") or {}).get("desiredNumberScheduled") or len(workers))
        meta = body.get("metadata") or {}
        status = reconcile.pool_status(
            workers,
            expected_workers=expected,
            workload=f"DaemonSet/{builders.worker_workload_name(self.name)}",
            plan_generation=generation,
            existing_conditions=(body.get("status") or {}).get("conditions"),
            generation=meta.get("generation"),
            now=now,
            workload_problem=runtime.workload_problems.get(meta.get("uid", "")),
        )
        if self.window is not None:
            status["lastForecastWindow"] = _iso(self.window * pool.forecast.window_seconds)
        if reconcile.status_changed(body.get("status"), status):
            await api.patch(WARMPOOLS, self.namespace, self.name, {"status": status}, status=True)
        observed = reconcile.observe_models(workers)
        for md in mds:
            uid = md["metadata"]["uid"]
            spec, validation, weight, origin = validations[uid]
            obs = observed.get(uid)
            if obs is not None:
                runtime.observations[uid] = obs
            extras: dict[str, Any] = {}
            if uid in self.demand and self.window is not None:
                d = self.demand[uid]
                extras["forecast"] = {
                    "windowStart": _iso(self.window * pool.forecast.window_seconds),
                    "windowSeconds": pool.forecast.window_seconds,
                    "avg": round(d.avg, 4),
                    "peak": round(d.peak, 4),
                }
            if uid in self.last_observed and self.window is not None:
                avg, peak = self.last_observed[uid]
                extras["observedLoad"] = {
                    "windowStart": _iso((self.window - 1) * pool.forecast.window_seconds),
                    "avg": round(avg, 4),
                    "peak": round(peak, 4),
                }
            runtime.model_extras[uid] = extras
            md_status = reconcile.model_status(
                spec,
                validation,
                obs,
                weight_bytes=weight,
                weight_origin=origin,
                existing_conditions=(md.get("status") or {}).get("conditions"),
                generation=md["metadata"].get("generation"),
                now=now,
            )
            md_status.update(extras)
            if reconcile.status_changed(md.get("status"), md_status):
                try:
                    await api.patch(
                        MODELDEPLOYMENTS,
                        self.namespace,
                        md["metadata"]["name"],
                        {"status": md_status},
                        status=True,
                    )
                except ApiError as exc:
                    if exc.status != 404:  # deleted meanwhile: nothing to report
                        raise


async def run(runtime: Runtime, body: kopf.Body, stopped: Any, logger: Any) -> None:
    """The daemon body: one round per interval until kopf stops the daemon (deletion, pause, exit)."""
    meta = body.get("metadata") or {}
    loop = PoolLoop(runtime, meta.get("namespace"), meta["name"])
    runtime.loops[meta.get("uid", meta["name"])] = loop
    try:
        while not stopped:
            try:
                await loop.tick(body, logger)
            except (ApiError, kopf.TemporaryError) as exc:
                runtime.metrics.reconcile_errors.labels("WarmPool", "round").inc()
                logger.warning(f"control round failed, retrying next interval: {exc}")
            except Exception as exc:
                runtime.metrics.reconcile_errors.labels("WarmPool", "round").inc()
                logger.exception(f"control round crashed, retrying next interval: {exc}")
            interval = parse_pool_spec(body.get("spec")).interval_seconds
            await stopped.wait(interval)
    finally:
        runtime.loops.pop(meta.get("uid", meta["name"]), None)
