"""`WarmServePolicy`: the one object both the simulator and the operator drive.

It bundles the pure decisions of one control step so that a simulated run is a prediction of what the
operator does:

* :meth:`WarmServePolicy.scale` — the reactive autoscaler per model;
* :meth:`WarmServePolicy.choose_group` — where a new engine goes: a group holding a warm replica of the
  model (hit), else one still loading it, else the group whose eviction destroys the least score;
* :meth:`WarmServePolicy.place` — which warm replicas to keep, drop and add (evict-aware placement, or
  the round-robin ablation);
* :meth:`WarmServePolicy.lend` — how much KV space each running engine lends to prewarming (proactive
  prewarming), and which lent replicas must go when an engine needs its space back;
* :meth:`WarmServePolicy.step` — one whole control step in a fixed order (lend → place → autoscale),
  applied to a `ClusterState`. The simulator's control tick and the operator's round both are this call;
  what only one of them does (timing loads, writing plans) happens in its `StepEffects`.

Callers own time: every method takes ``now`` or nothing and never reads a clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from warmserve.core.autoscaler import AutoscalerParams, EngineView, ScaleDecision, decide_scale
from warmserve.core.cluster import (
    ClusterState,
    EnginePhase,
    Gpu,
    Instance,
    Promotion,
    Role,
    StartSource,
    WarmReplica,
)
from warmserve.core.placement import (
    NewReplica,
    PlacementDecision,
    PlacementParams,
    plan_placement,
    replica_slots,
)
from warmserve.core.reservation import kv_lendable
from warmserve.core.types import Demand, GpuGroup, ModelProfile


@dataclass(frozen=True)
class PolicyParams:
    placement: PlacementParams = field(default_factory=PlacementParams)
    autoscaler: AutoscalerParams = field(default_factory=AutoscalerParams)
    prewarm: bool = True  # False: no warm replicas at all (reactive autoscaling with cold loads)
    evict_aware: bool = True  # False: round-robin first-fit placement (the paper's ablation)
    proactive: bool = True  # lend idle KV space of running engines to prewarming


@dataclass(frozen=True)
class EngineLoad:
    """KV usage of one running engine, per GPU of its group."""

    in_flight: int
    kv_in_use: int  # bytes per GPU


_NO_LOAD = EngineLoad(0, 0)  # an engine the caller reports no load for


@dataclass
class LendDecision:
    lent: dict[Gpu, int] = field(default_factory=dict)
    evict: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class StepInput:
    """What one control step observes."""

    now: float
    load: Mapping[str, float]  # per model: concurrency over the autoscaler window (in flight + queued)
    engines: Mapping[str, Sequence[EngineView]]  # per model: its engines that are not draining
    engine_loads: Mapping[int, EngineLoad] = field(default_factory=dict)  # per engine: for KV lending
    demand: Mapping[str, Demand] | None = None  # forecast per model; None = no placement this step
    bounds: Mapping[str, tuple[int, int | None]] = field(default_factory=dict)  # (min, max) replicas
    scale: bool = True  # False: lend and place only (e.g. prewarming before any traffic)


@dataclass
class StepRecord:
    """Everything a step decided, in order, for logs, metrics and equivalence tests."""

    evicted: list[tuple[str, GpuGroup, str]] = field(default_factory=list)  # model, group, reason
    added: list[tuple[str, GpuGroup]] = field(default_factory=list)
    draining: list[tuple[str, GpuGroup]] = field(default_factory=list)
    started: list[tuple[str, GpuGroup, StartSource]] = field(default_factory=list)  # model, group, source


class StepEffects(Protocol):
    """What a driver does beside the bookkeeping in `ClusterState` (which the step itself does)."""

    def evicting(self, replica: WarmReplica, reason: str) -> None:
        """Called just before ``replica`` is evicted (reason: kv-reclaim, placement or promotion)."""

    def added(self, replica: WarmReplica, score: float) -> None:
        """Called after a new replica was booked: its load starts now."""

    def draining(self, instance: Instance) -> None:
        """Called when the autoscaler retires ``instance`` (now in phase `EnginePhase.DRAINING`); the driver stops it
        with `ClusterState.stop_instance` once it has no request left."""

    def started(self, promotion: Promotion) -> None:
        """Called after an engine was booked on a group."""


class NoEffects:
    """`StepEffects` that only keep the books (a draining engine stops at once)."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state

    def evicting(self, replica: WarmReplica, reason: str) -> None:
        pass

    def added(self, replica: WarmReplica, score: float) -> None:
        pass

    def draining(self, instance: Instance) -> None:
        self.state.stop_instance(instance.iid)

    def started(self, promotion: Promotion) -> None:
        pass


class WarmServePolicy:
    def __init__(self, profiles: Mapping[str, ModelProfile], params: PolicyParams | None = None) -> None:
        self.profiles = dict(profiles)
        self.params = params or PolicyParams()
        self.scores: dict[int, float] = {}  # replica id → score from the last placement round
        # replicas whose standby engine is ready (`core.standby`; set by the driver): a promotion binds one
        self.standby_ready: frozenset[int] = frozenset()
        self._peak: dict[str, float] = {}  # model → forecast peak concurrency of the window being placed for

    # ------------------------------------------------------------- autoscaling
    def scale(
        self,
        now: float,
        model: str,
        load: float,
        engines: list[EngineView],
        min_replicas: int = 0,
        max_replicas: int | None = None,
    ) -> ScaleDecision:
        profile = self.profiles[model]
        return decide_scale(now, load, engines, profile.max_batch, self.params.autoscaler, min_replicas, max_replicas)

    # --------------------------------------------------------------- promotion
    def choose_group(self, state: ClusterState, model: str) -> tuple[GpuGroup, StartSource] | None:
        """Group for a new engine of ``model`` and where its weights come from (a `StartSource`)."""
        profile = self.profiles[model]
        # key: (0 hit / 1 loading / 2 cold, 0 with a ready standby engine, score destroyed, tie-break: replica id,
        # or the group when cold)
        best: tuple[tuple[int, int, float, int | GpuGroup], GpuGroup, StartSource] | None = None
        for replica in state.replicas_of(model):
            if state.group_has_engine(replica.group):
                continue
            source = StartSource.HIT if replica.warm else StartSource.LOADING
            key: tuple[int, int, float, int | GpuGroup] = (
                0 if replica.warm else 1,
                0 if replica.rid in self.standby_ready else 1,
                self._eviction_cost(state, replica.group, replica.rid),
                replica.rid,
            )
            if best is None or key < best[0]:
                best = (key, replica.group, source)
        if best is not None:
            return best[1], best[2]
        for group in state.groups(profile.tp):
            gpus = state.gpus_of(group)
            if any(state.engine_on(gpu) is not None or state.capacity(gpu) < profile.shard_bytes for gpu in gpus):
                continue
            if all(state.role(gpu) is Role.IDLE for gpu in gpus):
                return group, StartSource.COLD  # destroys nothing: no later group can beat the first idle one
            key = (2, 1, self._eviction_cost(state, group), group)
            if best is None or key < best[0]:
                best = (key, group, StartSource.COLD)
        return None if best is None else (best[1], best[2])

    def _eviction_cost(self, state: ClusterState, group: GpuGroup, keep: int | None = None) -> float:
        """Score destroyed by claiming ``group`` (plus a tiny term that prefers emptier GPUs)."""
        cost = 0.0
        for replica in state.replicas_overlapping(group):
            if replica.rid != keep:
                cost += self.scores.get(replica.rid, 0.0) + 1e-9 * replica.bytes_per_gpu
        return cost

    # --------------------------------------------------------------- placement
    def place(self, state: ClusterState, demand: Mapping[str, Demand]) -> PlacementDecision:
        if not self.params.prewarm:
            return PlacementDecision()
        self.expect(demand)
        if self.params.evict_aware:
            decision = plan_placement(state, self.profiles, demand, self.params.placement)
        else:
            decision = plan_round_robin(state, self.profiles, demand, self.params.placement)
        self.scores = dict(decision.kept)
        return decision

    def expect(self, demand: Mapping[str, Demand]) -> None:
        """Remember the forecast of the window being planned for: lending reserves each engine's share of its
        model's peak (`lend`)."""
        self._peak = {model: d.peak for model, d in demand.items()}

    def record_added(self, rid: int, score: float) -> None:
        """Remember the score of a replica the caller created from a placement decision."""
        self.scores[rid] = score

    # ------------------------------------------------------- proactive prewarm
    def lend(self, state: ClusterState, loads: Mapping[int, EngineLoad]) -> LendDecision:
        """KV bytes each engine GPU lends, and lent replicas to evict when an engine takes space back."""
        decision = LendDecision()
        evicted: set[int] = set()
        engines: dict[str, int] = {}  # engines that will carry the model's load (not draining)
        for instance in state.instances.values():
            if instance.phase != EnginePhase.DRAINING:
                engines[instance.model] = engines.get(instance.model, 0) + 1
        for iid, instance in sorted(state.instances.items()):
            profile = self.profiles[instance.model]
            load = loads.get(iid) or _NO_LOAD
            # Reserve for the window's forecast peak share, not only for the requests in flight now: space
            # lent below that peak is taken back (its prewarm wasted) as soon as the load rises to it.
            expected = math.ceil(self._peak.get(instance.model, 0.0) / max(engines.get(instance.model, 0), 1) - 1e-9)
            load = EngineLoad(max(load.in_flight, min(expected, profile.max_batch)), load.kv_in_use)
            lends = self.params.proactive and instance.phase != EnginePhase.STARTING
            known: tuple[int, int] | None = None  # (capacity, lendable) of the group's previous GPU
            for gpu in state.gpus_of(instance.group):
                capacity = state.capacity(gpu) - instance.weight_bytes_per_gpu
                lendable = 0
                if lends:
                    if known is not None and known[0] == capacity:  # the same GPU size lends the same
                        lendable = known[1]
                    else:
                        lendable = kv_lendable(capacity, load.in_flight, profile.max_batch, load.kv_in_use)
                        known = (capacity, lendable)
                decision.lent[gpu] = lendable
                if not state.used(gpu):  # holds no replica (each holds > 0 bytes): nothing to take back
                    continue
                held = [r for r in state.replicas_on(gpu) if r.rid not in evicted]
                used = sum(r.bytes_per_gpu for r in held)
                # Take space back from the lowest-score lent replicas first.
                for replica in sorted(held, key=lambda r: (self.scores.get(r.rid, 0.0), r.rid)):
                    if used <= lendable:
                        break
                    evicted.add(replica.rid)
                    decision.evict.append(replica.rid)
                    used -= replica.bytes_per_gpu
        return decision

    # ----------------------------------------------------------- one full step
    def step(self, state: ClusterState, inp: StepInput, effects: StepEffects | None = None) -> StepRecord:
        """Lend KV, place warm replicas (when ``inp.demand`` is given), then autoscale every model."""
        effects = effects or NoEffects(state)
        record = StepRecord()
        if inp.demand is not None:  # the window's forecast, for the lending below as for the placement
            self.expect(inp.demand)
        lend = self.lend(state, inp.engine_loads)
        for rid in lend.evict:
            self._evict(state, rid, "kv-reclaim", effects, record)
        for gpu, lent in lend.lent.items():
            if lent != state.lent(gpu):  # most engines lend what they lent last round
                state.set_lent(gpu, lent)
        if inp.demand is not None:
            decision = self.place(state, inp.demand)
            for rid in decision.evict:
                self._evict(state, rid, "placement", effects, record)
            for new in decision.add:
                replica = state.add_replica(new.model, new.group, new.bytes_per_gpu)
                self.record_added(replica.rid, new.score)
                record.added.append((new.model, new.group))
                effects.added(replica, new.score)
        for model in self.profiles if inp.scale else ():
            low, high = inp.bounds.get(model, (0, None))
            engines = list(inp.engines.get(model, ()))
            scaling = self.scale(inp.now, model, float(inp.load.get(model, 0.0)), engines, low, high)
            for iid in scaling.stop:
                instance = state.instances[iid]
                instance.phase = EnginePhase.DRAINING
                record.draining.append((model, instance.group))
                effects.draining(instance)
            for _ in range(scaling.start):
                if self.start_engine(state, model, inp.now, effects, record) is None:
                    break
        return record

    def start_engine(
        self,
        state: ClusterState,
        model: str,
        now: float,
        effects: StepEffects | None = None,
        record: StepRecord | None = None,
    ) -> Promotion | None:
        """Book a new engine of ``model`` on the best group (see `choose_group`); None when none is free."""
        effects = effects or NoEffects(state)
        choice = self.choose_group(state, model)
        if choice is None:
            return None
        group, _source = choice
        for replica in state.replicas_overlapping(group):
            if not (replica.model == model and replica.group == group):
                self._evict(state, replica.rid, "promotion", effects, record)
        promotion = state.start_instance(model, group, self.profiles[model].shard_bytes, now)
        if record is not None:
            record.started.append((model, group, promotion.source))
        effects.started(promotion)
        return promotion

    def _evict(
        self, state: ClusterState, rid: int, reason: str, effects: StepEffects, record: StepRecord | None
    ) -> None:
        replica = state.replicas.get(rid)
        if replica is None:
            return
        effects.evicting(replica, reason)
        state.evict(rid)
        self.scores.pop(rid, None)
        if record is not None:
            record.evicted.append((replica.model, replica.group, reason))


def plan_round_robin(
    state: ClusterState,
    profiles: Mapping[str, ModelProfile],
    demand: Mapping[str, Demand],
    params: PlacementParams,
) -> PlacementDecision:
    """The "w/o placement" ablation: models take turns, each replica goes to the first group with room.

    It asks for the same number of replicas as the evict-aware placement but ignores scores: it never
    evicts, never drops, and happily stacks replicas whose promotions destroy each other.
    """
    running = {name: 0 for name in profiles}
    for instance in state.instances.values():
        if instance.phase != EnginePhase.DRAINING and instance.model in running:
            running[instance.model] += 1
    wanted = {}
    for name, profile in sorted(profiles.items()):
        slots = replica_slots(profile, demand.get(name, Demand(0.0, 0.0)), running[name], params)
        wanted[name] = max(len(slots) - len(state.replicas_of(name)), 0)
    decision = PlacementDecision(kept={r.rid: 1.0 for r in state.replicas.values()})
    free = {gpu: state.free(gpu) for gpu in state.all_gpus()}
    taken = {name: {g for r in state.replicas_of(name) for g in state.gpus_of(r.group)} for name in profiles}
    for instance in state.instances.values():
        taken.setdefault(instance.model, set()).update(state.gpus_of(instance.group))
    progress = True
    while progress:
        progress = False
        for name in sorted(wanted):
            if wanted[name] <= 0:
                continue
            profile = profiles[name]
            for group in state.groups(profile.tp):
                gpus = state.gpus_of(group)
                if any(g in taken[name] for g in gpus) or min(free[g] for g in gpus) < profile.shard_bytes:
                    continue
                for g in gpus:
                    free[g] -= profile.shard_bytes
                taken[name].update(gpus)
                decision.add.append(NewReplica(name, group, profile.shard_bytes, 1.0))
                wanted[name] -= 1
                progress = True
                break
    return decision
