"""One planning round of the control loop, pure: observed workers + models + load → worker plans.

This is the seam between Kubernetes and the policy core. The operator's desired state is the set of plans
on the worker pods, so each round rebuilds a `warmserve.core.ClusterState` from those plans (read back from
the pods, so a restarted operator resumes exactly where it was) and from the phases the workers report,
then drives the very same `WarmServePolicy` object the simulator drives, in the order of one simulator
control step (`warmserve.sim.engine`, `_control`):

1. proactive prewarming: the KV space each engine lends, evicting lent replicas when it needs space back
   (nothing on the pods of `RoundInput.no_lend`, whose workers cannot lend: see `controller.capabilities`);
2. evict-aware placement of warm replicas for the forecast demand (max of this window and the next);
3. autoscale every model on its measured load (stops keep their weights as warm replicas; starts go to
   the group `choose_group` picks: a warm hit, then a loading replica, then the cheapest eviction).

It then renders the cluster state as one `Plan` per worker pod.

Rebuilding must not change any decision compared with keeping the state in memory, as the simulator does:
the policy breaks ties by replica/engine id and ranks replicas by the scores of the last placement. So a
`PlannerMemory` carries, between rounds, each entity's creation order (ids are re-issued in that order),
its score and its engine start time, keyed by what identifies it in a plan: (pod, GPUs, uid, role).
`tests/controller/test_controller_equivalence.py` checks round-by-round equality with a persistent state.
After an operator restart the memory is empty: ids follow plan order and the first placement recomputes
scores, which can only change tie-breaks.

Nothing here does I/O or reads a clock; `bench/operator_loop.py` times it as part of the whole pool round.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from warmserve.core.autoscaler import EngineView
from warmserve.core.cluster import ClusterState, EnginePhase, PlanError, ReplicaPhase, StartSource
from warmserve.core.policy import EngineLoad, NoEffects, StepInput, StepRecord, WarmServePolicy
from warmserve.core.standby import standby_replicas
from warmserve.core.types import Demand, GpuGroup, ModelProfile, NodeSpec
from warmserve.protocol import EngineSettings, Phase, Plan, PlanGroup, PlanReplica, Role, WorkerState

EntityKey = tuple[str, tuple[int, ...], str, Role]  # (pod, gpus, uid, role)


@dataclass(frozen=True)
class ModelEntry:
    """A valid ModelDeployment of the pool, as the policy sees it (keyed by uid, unique and stable)."""

    uid: str
    served_name: str
    source: str
    profile: ModelProfile  # profile.name == uid
    min_replicas: int = 0
    max_replicas: int | None = None
    engine: EngineSettings = field(default_factory=EngineSettings)  # written into every replica of the model


@dataclass(frozen=True)
class WorkerSnapshot:
    """One worker pod: its devices, the plan on it and what it reports."""

    pod: str
    gpus: int
    gpu_bytes: int
    plan: Plan | None = None
    state: WorkerState | None = None


@dataclass
class PlannerMemory:
    """What a persistent ClusterState would remember and a plan does not say."""

    seq: dict[EntityKey, int] = field(default_factory=dict)  # creation order
    scores: dict[EntityKey, float] = field(default_factory=dict)  # last placement score of warm replicas
    started_at: dict[EntityKey, float] = field(default_factory=dict)  # engine start time
    ready_at: dict[EntityKey, float] = field(default_factory=dict)  # first round the engine was serving
    next_seq: int = 0


@dataclass(frozen=True)
class RoundInput:
    now: float
    workers: Sequence[WorkerSnapshot]
    models: Sequence[ModelEntry]
    load: Mapping[str, float]  # uid → in-flight requests (autoscaler window mean)
    demand: Mapping[str, Demand]  # uid → forecast (max of the current and the next window)
    memory: PlannerMemory = field(default_factory=PlannerMemory)
    lend_load: Mapping[str, float] | None = None  # uid → recent peak in-flight (KV lending); None = load
    no_lend: frozenset[str] = frozenset()  # pods whose engines lend no KV space (their worker cannot lend)
    standby_per_worker: int = 0  # warm replicas per worker flagged for a standby engine (`core.standby`)
    no_prewarm: frozenset[str] = frozenset()  # uids with prewarming off: their left-behind weights get none


#: The KV bytes "in use" the planner tells the policy for an engine of a pod in `RoundInput.no_lend`: more than
#: any device holds, so the core's reservation keeps all of its KV space and it lends nothing.
NO_LEND_IN_USE = 1 << 62


@dataclass
class RoundOutput:
    plans: dict[str, Plan]  # pod → desired plan (generation 0: the writer numbers it)
    memory: PlannerMemory = field(default_factory=PlannerMemory)
    promotions: list[tuple[str, StartSource]] = field(default_factory=list)  # (uid, source) per engine started
    stops: list[str] = field(default_factory=list)  # uids whose engine stopped
    state: ClusterState | None = None
    record: StepRecord | None = None  # what the core step decided, in order


def _reported(worker: WorkerSnapshot) -> dict[tuple[str, tuple[int, ...]], Phase]:
    if worker.state is None:
        return {}
    return {(r.uid, tuple(sorted(r.gpus))): r.phase for r in worker.state.replicas}


# The worker's wire phases (`warmserve.protocol.Phase`) are a different vocabulary from the core's books: an
# engine serves once its worker reports `serving`, a replica is warm once reported `warm`; anything else
# (not reported yet, starting, loading, evicting) is still starting or loading.
def _engine_phase(reported: Phase | None) -> EnginePhase:
    return EnginePhase.SERVING if reported == Phase.SERVING else EnginePhase.STARTING


def _replica_phase(reported: Phase | None) -> ReplicaPhase:
    return ReplicaPhase.WARM if reported == Phase.WARM else ReplicaPhase.LOADING


def rebuild_state(
    workers: Sequence[WorkerSnapshot], models: Sequence[ModelEntry], memory: PlannerMemory
) -> tuple[ClusterState, dict[int, EntityKey]]:
    """ClusterState from the plans on the pods, entities re-created in their original order.

    Replicas of unknown (deleted or invalid) models are dropped. A warm replica counts as loaded only when
    its worker reports it `warm`; an engine counts as serving only when reported `serving` (a starting
    engine lends no KV space). Returns the state and the entity key of every replica and engine id.
    """
    known = {m.uid: m for m in models}
    state = ClusterState(NodeSpec(w.pod, w.gpus, w.gpu_bytes) for w in workers)
    entities = []
    for n, w in enumerate(workers):
        if w.plan is None:
            continue
        reported = _reported(w)
        for g in w.plan.groups:
            if not g.gpus:
                continue
            for r in g.replicas:
                if r.uid not in known:
                    continue
                key: EntityKey = (w.pod, tuple(g.gpus), r.uid, r.role)
                # unknown order (after a restart): engines first, then by location (stable)
                order = memory.seq.get(key, math.inf)
                # the worker reports a replica on the GPUs it occupies: the first `tp` of its group
                phase = reported.get((r.uid, tuple(g.gpus[: r.tp])))
                entities.append((order, 0 if r.role == Role.SERVE else 1, n, key, r, phase))
    entities.sort(key=lambda e: (e[0], e[1], e[2], e[3]))
    ids: dict[int, EntityKey] = {}
    for _, _, n, key, r, phase in entities:
        _pod, gpus, uid, role = key
        group = GpuGroup(n, min(gpus), len(gpus))
        shard = known[uid].profile.shard_bytes
        try:
            # the core's ClusterState has its own phases (see `_engine_phase`, `_replica_phase`)
            if role == Role.SERVE:
                promo = state.start_instance(uid, group, shard, memory.started_at.get(key, -math.inf))
                promo.instance.phase = _engine_phase(phase)
                for gpu in state.gpus_of(group):
                    state.set_lent(gpu, max(0, min(r.kv_lend, state.capacity(gpu) - shard)))
                ids[promo.instance.iid] = key
            else:
                replica = state.add_replica(uid, group, shard, _replica_phase(phase))
                ids[replica.rid] = key
        except PlanError:
            continue  # the pool shrank or the plan is stale: the policy re-plans it
    return state, ids


def render_plans(
    state: ClusterState, pods: Sequence[str], models: Mapping[str, ModelEntry], standby: Collection[int] = ()
) -> dict[str, Plan]:
    """One Plan per pod from the cluster state (engines → `serve`, warm replicas → `warm`; those whose id is in
    `standby` ask for a standby engine)."""
    groups: dict[tuple[int, tuple[int, ...]], list[PlanReplica]] = {}
    for inst in state.instances.values():
        m = models[inst.model]
        lend = min((state.lent(g) for g in state.gpus_of(inst.group)), default=0)
        key = (inst.group.node, tuple(inst.group.gpus))
        groups.setdefault(key, []).append(
            PlanReplica(m.served_name, m.uid, m.source, m.profile.tp, Role.SERVE, lend, m.engine)
        )
    for rep in state.replicas.values():
        m = models[rep.model]
        key = (rep.group.node, tuple(rep.group.gpus))
        groups.setdefault(key, []).append(
            PlanReplica(m.served_name, m.uid, m.source, m.profile.tp, Role.WARM, 0, m.engine, rep.rid in standby)
        )
    per_pod: dict[int, list[PlanGroup]] = {}
    for (node, gpus), replicas in groups.items():
        per_pod.setdefault(node, []).append(PlanGroup(gpus, tuple(replicas)))
    return {pod: Plan.build(0, per_pod.get(n, [])) for n, pod in enumerate(pods)}


def _remember(
    state: ClusterState,
    pods: Sequence[str],
    ids: Mapping[int, EntityKey],
    policy: WarmServePolicy,
    previous: PlannerMemory,
) -> PlannerMemory:
    """Memory for the next round: creation order (old entities keep theirs), scores, start times."""
    memory = PlannerMemory(next_seq=previous.next_seq)
    entities: list[tuple[int, EntityKey, float | None, float | None]] = []
    for inst in state.instances.values():
        key: EntityKey = (pods[inst.group.node], tuple(inst.group.gpus), inst.model, Role.SERVE)
        entities.append((inst.iid, key, None, inst.started_at))
    for rep in state.replicas.values():
        key = (pods[rep.group.node], tuple(rep.group.gpus), rep.model, Role.WARM)
        entities.append((rep.rid, key, policy.scores.get(rep.rid), None))
    for ident, key, score, started in sorted(entities):
        old = ids.get(ident)
        if old is not None and old == key and key in previous.seq:
            memory.seq[key] = previous.seq[key]
        else:
            memory.seq[key] = memory.next_seq
            memory.next_seq += 1
        if score is not None:
            memory.scores[key] = score
        if started is not None:
            memory.started_at[key] = started
            if key in previous.ready_at:
                memory.ready_at[key] = previous.ready_at[key]
    return memory


def _ready_since(ready_at: Mapping[EntityKey, float], key: EntityKey | None, now: float) -> float:
    """When an engine became ready (protection runs from then); `now` for one not known to be ready."""
    return ready_at.get(key, now) if key is not None else now


def _instances_by_model(state: ClusterState) -> dict[str, list]:
    """`state.instances_of` for every model at once (in id order, as `instances_of` returns them)."""
    by_model: dict[str, list] = {}
    for inst in state.instances.values():
        by_model.setdefault(inst.model, []).append(inst)
    return by_model


def plan_round(policy: WarmServePolicy, inp: RoundInput, *, place: bool = True) -> RoundOutput:
    """Lend, place, autoscale (the simulator's control-step order); then render plans.

    `place=False` skips the placement (the simulator places every `placement_s`, autoscales every tick).
    """
    models = {m.uid: m for m in inp.models}
    if not inp.workers:
        return RoundOutput(plans={})
    pods = [w.pod for w in inp.workers]
    state, ids = rebuild_state(inp.workers, inp.models, inp.memory)
    policy.scores = {i: inp.memory.scores[k] for i, k in ids.items() if k in inp.memory.scores}
    # standby engines: the replicas flagged on the pods keep their flag while they can (`core.standby`), and a
    # promotion prefers one whose worker reports its model's standby engine ready
    flagged = {
        (w.pod, tuple(g.gpus), r.uid, Role.WARM)
        for w in inp.workers
        if w.plan is not None
        for g in w.plan.groups
        for r in g.replicas
        if r.standby
    }
    ready = {(w.pod, s.model) for w in inp.workers if w.state is not None for s in w.state.standby if s.ready}
    keep = [rid for rid, key in ids.items() if key in flagged and key[2] not in inp.no_prewarm]
    policy.standby_ready = frozenset(rid for rid in keep if (ids[rid][0], models[ids[rid][2]].served_name) in ready)
    ready_at = dict(inp.memory.ready_at)
    for iid, inst in state.instances.items():
        if inst.phase == EnginePhase.SERVING:
            ready_at.setdefault(ids[iid], inp.now)
    out = RoundOutput(plans={}, state=state)

    # One core step, exactly what the simulator runs each tick: lend KV (proactive prewarming), place warm
    # replicas for the forecast (when `place`), then autoscale on the measured load. Workers do not report
    # per-engine in-flight requests, so a model's load is split evenly over its engines, and a retired
    # engine stops at once (its worker drains it).
    lend_load = inp.lend_load if inp.lend_load is not None else inp.load
    loads: dict[int, EngineLoad] = {}
    views: dict[str, list[EngineView]] = {}
    by_model = _instances_by_model(state)
    for m in inp.models:
        engines = by_model.get(m.uid, [])
        for inst in engines:
            in_use = NO_LEND_IN_USE if pods[inst.group.node] in inp.no_lend else 0
            loads[inst.iid] = EngineLoad(math.ceil(float(lend_load.get(m.uid, 0.0)) / len(engines)), in_use)
        serving = [i for i in engines if i.phase != EnginePhase.DRAINING]
        share = float(inp.load.get(m.uid, 0.0)) / len(serving) if serving else 0.0
        # protection runs from readiness, as in the simulator; an engine not serving yet is protected
        views[m.uid] = [
            EngineView(i.iid, _ready_since(ready_at, ids.get(i.iid), inp.now), round(share)) for i in serving
        ]
    demand = {uid: inp.demand.get(uid, Demand(0.0, 0.0)) for uid in models} if place else None
    step = StepInput(
        now=inp.now,
        load={m.uid: float(inp.load.get(m.uid, 0.0)) for m in inp.models},
        engines=views,
        engine_loads=loads,
        demand=demand,
        bounds={m.uid: (m.min_replicas, m.max_replicas) for m in inp.models},
    )
    out.record = policy.step(state, step, NoEffects(state))
    out.stops.extend(model for model, _group in out.record.draining)
    out.promotions.extend((model, source) for model, _group, source in out.record.started)

    out.memory = _remember(
        state, pods, ids, policy, PlannerMemory(inp.memory.seq, {}, {}, ready_at, inp.memory.next_seq)
    )
    standby = standby_replicas(state, policy.scores, inp.standby_per_worker, keep, inp.no_prewarm)
    out.plans = render_plans(state, pods, models, standby)
    return out
