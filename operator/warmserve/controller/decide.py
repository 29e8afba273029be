"""The decide stage of a pool round, pure: what the workers must hold and what the status says.

A round is three stages (`loop.PoolLoop.tick` runs them; docs/operator.md, "The control loop"):

    observe (I/O: pods, ModelDeployments, weight bytes, load)  → Observation     (observe.py)
    decide  (pure: this module; the planner + status)          → Decision
    act     (I/O: history, plans, status, metrics)                               (act.py)

Between observe and decide, `forecasts.Forecasts` turns the sampled load into windows, history and forecast
demand. Nothing here does I/O, reads a clock or imports kopf or a Kubernetes client: the same Observation,
forecasts and planner memory always give the same Decision, so a driver other than the operator (a
single-machine one) can reuse it with its own observe and act stages.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from warmserve.controller import conditions as c
from warmserve.controller import reconcile
from warmserve.controller.capabilities import capabilities_of, no_lend_pods, restrict_plans
from warmserve.controller.forecasts import ForecastView
from warmserve.controller.planner import ModelEntry, PlannerMemory, RoundInput, RoundOutput, WorkerSnapshot, plan_round
from warmserve.controller.reconcile import Validation, WorkerView
from warmserve.controller.settings import SpecRules
from warmserve.controller.spec import ModelSpec, PoolSpec
from warmserve.controller.weights import WeightInfo
from warmserve.core.autoscaler import AutoscalerParams
from warmserve.core.cluster import StartSource
from warmserve.core.placement import PlacementParams
from warmserve.core.policy import PolicyParams, WarmServePolicy
from warmserve.core.types import ModelProfile
from warmserve.protocol import MAX_GENERATION, Plan, engine_ports


# -------------------------------------------------------------------------------------------- observation
@dataclass(frozen=True)
class ObservedPool:
    """The WarmPool as the round read it."""

    name: str
    namespace: str | None
    uid: str
    generation: int | None
    spec: PoolSpec
    status: Mapping[str, Any]  # the status as read (conditions to merge, fields to compare)
    body: Mapping[str, Any] = field(default_factory=dict, compare=False)  # owner of what act creates
    desired_workers: int | None = None  # worker pods the workload wants (DaemonSet desiredNumberScheduled)
    workload_problem: tuple[str, str] | None = None  # (reason, message) when the API refused the workload
    inference_pool_enabled: bool = False  # the operator manages InferencePools (--inference-pool)
    inference_pool: c.Condition | None = None  # what the WarmPool handler made of it (None: not tried yet)
    rules: SpecRules = field(default_factory=SpecRules)  # what the operator's settings allow (validate_pool)

    @cached_property
    def validation(self) -> Validation:
        """The pool checked against the operator's rules: an invalid pool is observed but not planned."""
        return reconcile.validate_pool(self.spec, self.rules)


@dataclass(frozen=True)
class ObservedModel:
    """One ModelDeployment of the pool (not being deleted) and its weight bytes."""

    name: str
    uid: str
    generation: int | None
    spec: ModelSpec
    weight: WeightInfo
    status: Mapping[str, Any]


@dataclass(frozen=True)
class Catalog:
    """What the round plans: every observed model's validation, and the valid ones the policy may place."""

    entries: tuple[ModelEntry, ...]  # sorted by uid
    validations: Mapping[str, Validation]  # every observed model, by uid
    no_prewarm: frozenset[str] = frozenset()  # entries with `spec.prewarm.enabled: false`: no forecast placement

    def load_by_uid(self, samples: Mapping[str, float]) -> dict[str, float]:
        """Samples keyed by served model name → keyed by the uid of the planned model serving that name."""
        by_name = {e.served_name: e.uid for e in self.entries}
        return {by_name[k]: v for k, v in samples.items() if k in by_name}


@dataclass(frozen=True)
class Observation:
    """Everything one round read, at one time; decide derives everything else from it."""

    now: float  # the operator's clock (seconds), for the planner and the windows
    stamp: str  # RFC 3339 wall-clock time, for condition transitions
    pool: ObservedPool
    workers: tuple[WorkerView, ...]  # every worker pod of the pool, as listed (pods being deleted included)
    models: tuple[ObservedModel, ...]  # the pool's ModelDeployments not being deleted, as listed
    load: Mapping[str, float]  # served model name → in-flight requests now

    @property
    def live_workers(self) -> tuple[WorkerView, ...]:
        """The pods the round plans for (not being deleted), by name."""
        return tuple(sorted((w for w in self.workers if not w.deleting), key=lambda w: w.pod))

    @cached_property
    def catalog(self) -> Catalog:
        return catalog(self.pool.spec, self.models, self.pool.rules, self.pool.validation)


def catalog(
    pool: PoolSpec,
    models: Sequence[ObservedModel],
    rules: SpecRules | None = None,
    pool_validation: Validation | None = None,
) -> Catalog:
    """Validate every model against the pool; the valid ones that may hold a replica become plan entries
    (none when the pool itself is not valid)."""
    entries, validations, no_prewarm = [], {}, set()
    for m in models:
        spec, weight = m.spec, m.weight.bytes
        validation = reconcile.validate_model(spec, pool, weight, rules, pool_validation)
        validations[m.uid] = validation
        if weight is None or not validation.ok or (not spec.prewarm_enabled and spec.max_replicas == 0):
            continue
        profile = ModelProfile(
            name=m.uid,
            weight_bytes=int(weight),
            tp=spec.tp,
            max_batch=spec.max_concurrency,
            priority=spec.priority,
            min_warm=spec.min_warm_replicas if spec.prewarm_enabled else 0,
        )
        source = reconcile.worker_source(spec.source, pool) or spec.source
        if not spec.prewarm_enabled:
            no_prewarm.add(m.uid)
        entries.append(
            ModelEntry(
                m.uid,
                spec.served_name,
                source,
                profile,
                spec.min_replicas,
                spec.max_replicas,
                reconcile.engine_settings(spec),
            )
        )
    entries.sort(key=lambda e: e.uid)
    return Catalog(tuple(entries), validations, frozenset(no_prewarm))


# ----------------------------------------------------------------------------------------------- decision
@dataclass(frozen=True)
class PlanWrite:
    """A plan to write on a pod: its contents changed, and it carries the next generation."""

    pod: str
    plan: Plan


@dataclass(frozen=True)
class StatusUpdate:
    """The status fields the round owns for one object, and whether they differ from what was read."""

    name: str
    status: Mapping[str, Any]
    changed: bool


@dataclass(frozen=True)
class Decision:
    """What one round decided; the act stage carries it out."""

    pool: str
    plans: tuple[PlanWrite, ...]  # only pods whose plan contents changed, in pod order
    generation: int  # the pool's plan generation once `plans` are written
    promotions: tuple[tuple[str, StartSource], ...]  # (uid, source) per engine started
    memory: PlannerMemory  # the planner memory for the next round
    pool_status: StatusUpdate
    model_statuses: tuple[StatusUpdate, ...]  # every observed model, as listed
    outcome: RoundOutput = field(compare=False, repr=False, default_factory=lambda: RoundOutput(plans={}))


@dataclass
class PlannerState:
    """What the decide stage carries between rounds: the policy (rebuilt when the models or the pool's
    parameters change; the planner restores its scores from the memory every round), the memory, and the
    workers' parts of the pool status (remade only for workers whose state changed: `reconcile.WorkerEntries`)."""

    policy: WarmServePolicy | None = None
    memory: PlannerMemory = field(default_factory=PlannerMemory)
    entries: reconcile.WorkerEntries = field(default_factory=reconcile.WorkerEntries)

    def policy_for(self, profiles: Mapping[str, ModelProfile], params: PolicyParams) -> WarmServePolicy:
        if self.policy is None or profiles != self.policy.profiles or params != self.policy.params:
            self.policy = WarmServePolicy(profiles, params)
        return self.policy


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


def arena_bytes(worker: WorkerView, pool: PoolSpec) -> int:
    """Bytes of one device's arena: what the worker reports (its smallest device), else the pool's spec."""
    if worker.state is not None and worker.state.devices:
        return min(d.total_bytes for d in worker.state.devices) or pool.device_arena_bytes
    return pool.device_arena_bytes


def generation_floor(worker: WorkerView) -> int:
    """The generation the next plan for `worker` must exceed: the plan on the pod (when readable) and the
    generation the worker reports to have applied (when believable), whichever is higher.

    The worker's `observedGeneration` counts because the plan annotation can be unreadable (it then counts as no
    plan) or older than what the worker applied (an annotation restored from a backup): a plan numbered at or
    below what the worker has seen would be ignored by it.
    """
    floor = worker.plan.generation if worker.plan is not None else 0
    if worker.state is not None and worker.state.observed_generation <= MAX_GENERATION:
        floor = max(floor, worker.state.observed_generation)
    return floor


def number_plans(workers: Sequence[WorkerView], desired: Mapping[str, Plan]) -> tuple[tuple[PlanWrite, ...], int]:
    """The plans to write and the pool's plan generation after writing them.

    A plan is written when its contents changed, when the pod has no readable plan, or when the worker reports
    a generation beyond the pod's plan; it is numbered `generation_floor + 1`, so generations only grow, across
    operator restarts and unreadable annotations alike, and nothing is written when nothing changed.
    """
    writes = []
    generation = max((w.plan.generation for w in workers if w.plan), default=0)
    for w in workers:
        plan = desired.get(w.pod)
        if plan is None:
            continue
        floor = generation_floor(w)
        if w.plan is not None and w.plan.same_contents(plan) and w.plan.generation >= floor:
            continue
        new = Plan(floor + 1, plan.groups)
        writes.append(PlanWrite(w.pod, new))
        generation = max(generation, new.generation)
    return tuple(writes), generation


HISTORY_SAVED = "HistorySaved"


def history_condition(forecasts: ForecastView) -> c.Condition | None:
    """`HistorySaved` on the pool, from the last attempt to persist the load history (None before any)."""
    if forecasts.history_save is None:
        return None
    ok, reason, message = forecasts.history_save
    return c.Condition(HISTORY_SAVED, c.TRUE if ok else c.FALSE, reason, message)


def iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def load_status(uid: str, forecasts: ForecastView) -> dict[str, Any]:
    """A ModelDeployment's `forecast` (current window) and `observedLoad` (last closed window)."""
    out: dict[str, Any] = {}
    if forecasts.window is None:
        return out
    if uid in forecasts.demand:
        d = forecasts.demand[uid]
        out["forecast"] = {
            "windowStart": iso(forecasts.window * forecasts.window_seconds),
            "windowSeconds": forecasts.window_seconds,
            "avg": round(d.avg, 4),
            "peak": round(d.peak, 4),
        }
    if uid in forecasts.last_observed:
        avg, peak = forecasts.last_observed[uid]
        out["observedLoad"] = {
            "windowStart": iso((forecasts.window - 1) * forecasts.window_seconds),
            "avg": round(avg, 4),
            "peak": round(peak, 4),
        }
    return out


def model_status(
    model: ObservedModel,
    validation: Validation,
    observed: reconcile.ModelObservation | None,
    forecasts: ForecastView | None,
    now: str,
) -> dict[str, Any]:
    """Every status field of a ModelDeployment (the ModelDeployment handler uses it too, without a round)."""
    status = reconcile.model_status(
        model.spec,
        validation,
        observed,
        weight_bytes=model.weight.bytes,
        weight_origin=model.weight.origin,
        existing_conditions=model.status.get("conditions"),
        generation=model.generation,
        now=now,
    )
    if forecasts is not None:
        status.update(load_status(model.uid, forecasts))
    return status


def inference_pool_condition(obs: Observation) -> c.Condition | None:
    """The pool's `InferencePool` condition: the WarmPool handler's outcome, and when it is written but the pool's
    engines serve several models, that caveat (an endpoint picker that does not route by model sends a request
    to any engine of the pool: docs/gateway.md). None: the setting is off, or the handler has not run yet."""
    if not obs.pool.inference_pool_enabled:
        return None
    outcome = obs.pool.inference_pool
    if outcome is None or outcome.status != c.TRUE:
        return outcome
    served = sorted({m.spec.served_name for m in obs.models})
    if len(served) <= 1:
        return outcome
    listed = ", ".join(served[:8]) + (f" and {len(served) - 8} more" if len(served) > 8 else "")
    message = (
        f"{outcome.message}; {len(served)} models share these engine ports ({listed}): an endpoint picker that "
        "does not route by model sends a request to engines of other models"
    )[:2000]
    return c.Condition(c.INFERENCE_POOL, c.TRUE, "MultipleModels", message)


def decide(obs: Observation, forecasts: ForecastView, planner: PlannerState) -> Decision:
    """Plan the pool (the simulator's control step on the state rebuilt from the pods' plans) and derive
    the status of the pool and of its models from the workers as they will be once the plans are written.

    Uses `planner.policy` and `planner.entries` as caches and returns the next memory in the Decision (the
    caller keeps it).
    """
    pool, cat, live, validation = obs.pool.spec, obs.catalog, obs.live_workers, obs.pool.validation
    if validation.ok:
        policy = planner.policy_for({e.uid: e.profile for e in cat.entries}, policy_params(pool))
        snapshots = [
            WorkerSnapshot(w.pod, pool.devices_per_worker, arena_bytes(w, pool), w.plan, w.state)
            for w in live
            if w.ready
        ]
        outcome = plan_round(
            policy,
            RoundInput(
                obs.now,
                snapshots,
                cat.entries,
                forecasts.mean_load,
                # a model with prewarming off gets no warm replica for its forecast (engines only, on demand)
                {uid: d for uid, d in forecasts.demand.items() if uid not in cat.no_prewarm},
                planner.memory,
                forecasts.peak_load,
                no_lend_pods(w for w in live if w.ready),
                # workers run none while the operator manages InferencePools (builders.worker_args)
                0 if obs.pool.inference_pool_enabled else pool.worker.standby_engines,
                cat.no_prewarm,
            ),
        )
        # the controller boundary: no worker is asked for what it does not advertise (capabilities.py)
        outcome.plans, held_back = restrict_plans(outcome.plans, {w.pod: capabilities_of(w) for w in live})
        writes, generation = number_plans(live, outcome.plans)
    else:  # an invalid pool is frozen: the workers keep what their plans say, the status says why
        outcome, held_back = RoundOutput(plans={}, memory=planner.memory), []
        writes, generation = number_plans(live, {})
    ports = engine_ports(pool.worker.engine_port_base)

    # status describes the pods as they are once this round's plans are on them
    written = {w.pod: w.plan for w in writes}
    after = [replace(w, plan=written[w.pod]) if w.pod in written else w for w in obs.workers]
    status = reconcile.pool_status(
        after,
        expected_workers=obs.pool.desired_workers or len(obs.workers),
        plan_generation=generation,
        existing_conditions=obs.pool.status.get("conditions"),
        generation=obs.pool.generation,
        now=obs.stamp,
        workload_problem=obs.pool.workload_problem,
        validation=validation,
        ports=ports,
        history=history_condition(forecasts),
        inference_pool=inference_pool_condition(obs),
        drop=() if obs.pool.inference_pool_enabled else (c.INFERENCE_POOL,),
        entry_of=planner.entries,
    )
    planner.entries.next_round()
    if forecasts.window is not None:
        status["lastForecastWindow"] = iso(forecasts.window * forecasts.window_seconds)
    observed = reconcile.observe_models(after, ports)
    for held in held_back:
        observed.setdefault(held.uid, reconcile.ModelObservation()).held_back.append(held.message)
    models = []
    for m in obs.models:
        md_status = model_status(m, cat.validations[m.uid], observed.get(m.uid), forecasts, obs.stamp)
        models.append(StatusUpdate(m.name, md_status, reconcile.status_changed(m.status, md_status)))
    return Decision(
        pool=obs.pool.name,
        plans=writes,
        generation=generation,
        promotions=tuple(outcome.promotions),
        memory=outcome.memory,
        pool_status=StatusUpdate(obs.pool.name, status, reconcile.status_changed(obs.pool.status, status)),
        model_statuses=tuple(models),
        outcome=outcome,
    )
