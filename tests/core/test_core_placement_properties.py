"""Property tests of the placement over random clusters, models, demand and pre-existing state.

The state is never built by hand: it is the result of earlier placement rounds, engine starts (through
``WarmServePolicy.choose_group``, as the simulator and the operator do), lending decisions, phase changes and
engine stops, all applied through ``ClusterState``, so it is a state the system can really reach.

After any decision is applied (evictions first, then additions) the properties promised by the
``placement`` module docstring must hold:

* no GPU is over-committed: every ``add_replica`` succeeds and ``check_invariants`` passes;
* every group is an aligned buddy group of the model's TP size, and all groups on a node are nested;
* existing replicas take their model's first slots (warm, then not in lent space, then by id); those
  beyond the slots (score 0) are dropped, the others are kept with their slot's score or evicted;
* a replica is never evicted for a lower-score one: each evicted replica that still had a slot (score
  ``s > 0``) overlaps an added replica of a strictly higher score (the one whose room it made);
* a slot is left unplaced only when no group could host it even after evicting everything scored below it;
* the same input gives the identical decision, and planning never mutates ``state``.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from warmserve.core.cluster import ClusterState, PlanError
from warmserve.core.placement import PlacementDecision, PlacementParams, plan_placement, replica_slots
from warmserve.core.policy import EngineLoad, PolicyParams, WarmServePolicy, plan_round_robin
from warmserve.core.types import Demand, GpuGroup, ModelProfile, NodeSpec

PARAMS = PlacementParams(upper=0.8, load_bandwidth=1.0)
SETTINGS = settings(  # bounded so that the file runs in well under 20 s on a shared 2-core machine
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SMALL = settings(SETTINGS, max_examples=80)


@dataclass
class World:
    state: ClusterState
    profiles: dict[str, ModelProfile]
    demand: dict[str, Demand]
    policy: WarmServePolicy


# ------------------------------------------------------------------ strategies
nodes_st = st.lists(
    st.builds(
        lambda gpus, gpu_bytes: (gpus, gpu_bytes),
        st.sampled_from([1, 2, 4, 8]),
        st.sampled_from([40, 64, 100, 160]),
    ),
    min_size=1,
    max_size=4,
)


@st.composite
def profiles_st(draw: st.DrawFn) -> dict[str, ModelProfile]:
    count = draw(st.integers(1, 7))
    profiles = {}
    for i in range(count):
        tp = draw(st.sampled_from([1, 1, 2, 4, 8]))
        shard = draw(st.sampled_from([5, 8, 12, 20, 30, 45, 70]))
        profiles[f"m{i}"] = ModelProfile(
            f"m{i}",
            weight_bytes=shard * tp - draw(st.integers(0, tp - 1)),  # uneven splits round the shard up
            tp=tp,
            max_batch=10,
            priority=draw(st.sampled_from([0.5, 1.0, 1.0, 3.0])),
            min_warm=draw(st.sampled_from([0, 0, 0, 1, 2])),
        )
    return profiles


@st.composite
def demand_st(draw: st.DrawFn, names: list[str]) -> dict[str, Demand]:
    demand = {}
    for name in names:
        if draw(st.booleans()) or draw(st.booleans()):
            avg = draw(st.sampled_from([0.0, 0.5, 4.0, 8.0, 9.0, 17.0, 30.0]))
            peak = draw(st.sampled_from([0.0, 3.0, 8.0, 12.0, 25.0, 40.0, 60.0]))
            demand[name] = Demand(avg, peak)
    return demand


def apply_placement(world: World, decision: PlacementDecision, warm: list[bool]) -> None:
    for rid in decision.evict:
        world.state.evict(rid)
    for new, is_warm in zip(decision.add, itertools.chain(warm, itertools.repeat(False)), strict=False):
        replica = world.state.add_replica(new.model, new.group, new.bytes_per_gpu, "warm" if is_warm else "loading")
        world.policy.record_added(replica.rid, new.score)


def lend_by_policy(world: World, draw: st.DrawFn) -> None:
    state = world.state
    loads = {iid: EngineLoad(draw(st.integers(0, 12)), draw(st.integers(0, 30))) for iid in sorted(state.instances)}
    lend = world.policy.lend(state, loads)
    for rid in lend.evict:
        state.evict(rid)
    for gpu, nbytes in lend.lent.items():
        state.set_lent(gpu, nbytes)


@st.composite
def world_st(draw: st.DrawFn) -> World:
    nodes = [NodeSpec(f"n{i}", gpus, gpu_bytes) for i, (gpus, gpu_bytes) in enumerate(draw(nodes_st))]
    state = ClusterState(nodes)
    profiles = draw(profiles_st())
    names = sorted(profiles)
    world = World(state, profiles, {}, WarmServePolicy(profiles, PolicyParams(placement=PARAMS)))
    now = 0.0
    ops = ["place"] * 3 + ["start"] * 3 + ["lend"] * 2 + ["adopt", "stop", "phase", "warm"]
    for op in draw(st.lists(st.sampled_from(ops), min_size=2, max_size=12)):
        now += 3.0
        if op == "place":
            decision = world.policy.place(state, draw(demand_st(names)))
            apply_placement(world, decision, draw(st.lists(st.booleans(), max_size=len(decision.add))))
        elif op == "start":
            name = draw(st.sampled_from(names))
            choice = world.policy.choose_group(state, name)  # None when no group can take the engine
            if choice is not None:
                instance = state.start_instance(name, choice[0], profiles[name].shard_bytes, now).instance
                instance.phase = draw(st.sampled_from(["starting", "serving", "serving", "serving"]))
        elif op == "lend" and state.instances and draw(st.booleans()):  # an operator-chosen amount
            instance = state.instances[draw(st.sampled_from(sorted(state.instances)))]
            for gpu in state.gpus_of(instance.group):
                top = state.capacity(gpu) - instance.weight_bytes_per_gpu
                state.set_lent(gpu, draw(st.integers(min(state.used(gpu), top), top)))
        elif op == "lend" and state.instances:  # the policy's reservation formula
            lend_by_policy(world, draw)
        elif op == "adopt":  # a replica found on a worker (operator restart), wherever it fits, lent space too
            profile = profiles[draw(st.sampled_from(names))]
            candidates = [
                g
                for g in state.groups(profile.tp)
                if all(state.free(gpu) >= profile.shard_bytes for gpu in state.gpus_of(g))
                and not any(r.model == profile.name for r in state.replicas_overlapping(g))
                and not any(
                    (e := state.engine_on(gpu)) is not None and e.model == profile.name for gpu in state.gpus_of(g)
                )
            ]
            if candidates:
                group = draw(st.sampled_from(candidates))
                state.add_replica(profile.name, group, profile.shard_bytes, draw(st.sampled_from(["loading", "warm"])))
        elif op == "stop" and state.instances:
            state.stop_instance(draw(st.sampled_from(sorted(state.instances))))
        elif op == "phase" and state.instances:
            instance = state.instances[draw(st.sampled_from(sorted(state.instances)))]
            instance.phase = draw(st.sampled_from(["serving", "draining"]))
        elif op == "warm" and state.replicas:
            state.mark_warm(draw(st.sampled_from(sorted(state.replicas))))
        state.check_invariants()
    if state.instances and draw(st.booleans()):  # the control step lends before it places
        lend_by_policy(world, draw)
    world.demand = draw(demand_st(names))
    if state.replicas and draw(st.booleans()):  # a surge of some models: newcomers must outrank (and evict) others
        for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)):
            world.demand[name] = Demand(draw(st.sampled_from([17.0, 30.0, 60.0])), 90.0)
    return world


# ------------------------------------------------------------------ oracles
def snapshot(state: ClusterState) -> tuple:
    return (
        {rid: (r.model, r.group, r.bytes_per_gpu, r.phase) for rid, r in state.replicas.items()},
        {iid: (i.model, i.group, i.weight_bytes_per_gpu, i.phase) for iid, i in state.instances.items()},
        [(state.used(g), state.budget(g), state.lent(g)) for g in state.all_gpus()],
    )


def expected_scores(world: World) -> dict[int, float]:
    """Score of every existing replica from the docstring's rule (0.0: beyond its model's slots)."""
    state = world.state
    running = Counter(i.model for i in state.instances.values() if i.phase != "draining")
    result = {}
    for name in {r.model for r in state.replicas.values()}:
        profile = world.profiles.get(name)
        slots = (
            replica_slots(profile, world.demand.get(name, Demand(0.0, 0.0)), running[name], PARAMS) if profile else []
        )
        ordered = sorted(state.replicas_of(name), key=lambda r: (not r.warm, state.group_has_engine(r.group), r.rid))
        for position, replica in enumerate(ordered):
            result[replica.rid] = slots[position].score if position < len(slots) else 0.0
    return result


def gpus(group: GpuGroup) -> set[tuple[int, int]]:
    return {(group.node, i) for i in group.gpus}


def check_decision(world: World, decision: PlacementDecision) -> None:
    state, profiles = world.state, world.profiles
    before = {rid: (r.model, r.group, r.bytes_per_gpu) for rid, r in state.replicas.items()}
    scores = expected_scores(world)

    # existing replicas: kept with their slot's score, or evicted; dropped ones are exactly the score-0 ones
    assert len(decision.evict) == len(set(decision.evict))
    assert set(decision.evict) | set(decision.kept) == set(before)
    assert not set(decision.evict) & set(decision.kept)
    for rid, score in decision.kept.items():
        assert score == pytest.approx(scores[rid]) and score > 0
    assert all(rid in decision.evict for rid, score in scores.items() if score == 0.0)

    # additions: right size, aligned, valid, at most the model's remaining slots and with their scores
    running = Counter(i.model for i in state.instances.values() if i.phase != "draining")
    for name in {n.model for n in decision.add} | {s.model for s in decision.unplaced}:
        profile = profiles[name]
        slots = replica_slots(profile, world.demand.get(name, Demand(0.0, 0.0)), running[name], PARAMS)
        remaining = Counter(round(s.score, 9) for s in slots[len(state.replicas_of(name)) :])
        # a replica evicted to make room keeps its slot, which re-enters the round as a new one
        remaining.update(round(scores[rid], 9) for rid in decision.evict if scores[rid] > 0 and before[rid][0] == name)
        asked = Counter(round(n.score, 9) for n in decision.add if n.model == name)
        asked.update(round(s.score, 9) for s in decision.unplaced if s.model == name)
        assert asked == remaining  # every missing slot is either added or reported unplaced
    for new in decision.add:
        profile = profiles[new.model]
        assert new.group.size == profile.tp and new.group.start % profile.tp == 0
        assert state.valid_group(new.group)
        assert new.bytes_per_gpu == profile.shard_bytes

    # never evicted for a lower score
    for rid in decision.evict:
        if scores[rid] > 0:
            group = before[rid][1]
            rivals = [n.score for n in decision.add if n.group.overlaps(group)]
            assert rivals and max(rivals) > scores[rid], (rid, scores[rid], rivals)

    # unplaced only when nothing scored below it could have made room
    final = [(before[rid][1], before[rid][2], score) for rid, score in decision.kept.items()]
    final += [(n.group, n.bytes_per_gpu, n.score) for n in decision.add]

    def taken_by(name: str) -> set[tuple[int, int]]:
        """GPUs ``name`` may not use: its engines, its slotted existing replicas, its new replicas."""
        taken = set().union(*(gpus(i.group) for i in state.instances.values() if i.model == name))
        taken |= set().union(*(gpus(before[r][1]) for r in before if before[r][0] == name and scores[r] > 0))
        return taken | set().union(*(gpus(n.group) for n in decision.add if n.model == name))

    for slot in decision.unplaced:
        profile = profiles[slot.model]
        taken = taken_by(slot.model)
        for group in state.groups(profile.tp):
            if gpus(group) & taken:
                continue
            room = min(
                state.budget(g) - sum(b for grp, b, s in final if s >= slot.score and g in gpus(grp))
                for g in gpus(group)
            )
            assert room < profile.shard_bytes, (slot, group, room)

    # preferences among groups that surely had room when a new replica was placed: a group on GPUs without an
    # engine, overlapping no evicted replica, whose free bytes stay >= the shard even if every kept replica and
    # every new one of a score >= this one were already there (so it fit without eviction at that moment)
    evicted_gpus = set().union(*(gpus(before[r][1]) for r in decision.evict))
    kept_bytes = Counter()
    for rid in decision.kept:
        for g in gpus(before[rid][1]):
            kept_bytes[g] += before[rid][2]
    for new in decision.add:
        profile = profiles[new.model]
        taken = taken_by(new.model) - gpus(new.group)
        others = [n for n in decision.add if n is not new]
        earlier = Counter()  # bytes of every kept replica and every other new one scored >= this one
        for n in others:
            if n.score >= new.score:
                for g in gpus(n.group):
                    earlier[g] += n.bytes_per_gpu
        surely_fit = [
            g
            for g in state.groups(profile.tp)
            if g != new.group
            and not state.group_has_engine(g)
            and not gpus(g) & (taken | evicted_gpus)
            and min(state.budget(x) - kept_bytes[x] - earlier[x] for x in gpus(g)) >= profile.shard_bytes
        ]
        if state.group_has_engine(new.group):  # lent KV space only when nothing else fit
            assert not surely_fit, (new, surely_fit)
            continue
        outranking = [before[r][1] for r, sc in decision.kept.items() if sc > new.score]
        outranking += [n.group for n in others if n.score > new.score]
        if any(grp.overlaps(new.group) for grp in outranking):  # overlap a higher score only when forced to
            at_least = [before[r][1] for r, sc in decision.kept.items() if sc >= new.score]
            at_least += [n.group for n in others if n.score >= new.score]
            for g in surely_fit:
                assert any(grp.overlaps(g) for grp in at_least), (new, g)

    # apply: evict first, then add; every add must succeed and no GPU is over-committed
    after = copy.deepcopy(state)
    for rid in decision.evict:
        after.evict(rid)
    for new in decision.add:
        after.add_replica(new.model, new.group, new.bytes_per_gpu)
    after.check_invariants()
    for gpu in after.all_gpus():
        assert 0 <= after.used(gpu) <= after.budget(gpu)
    groups = [r.group for r in after.replicas.values()] + [i.group for i in after.instances.values()]
    for a, b in itertools.combinations(groups, 2):
        assert not (gpus(a) & gpus(b)) or a.contains(b) or b.contains(a)
    for gpu in after.all_gpus():  # one model never twice on a GPU
        models = [r.model for r in after.replicas_on(gpu)]
        engine = after.engine_on(gpu)
        assert len(models) == len(set(models)) and (engine is None or engine.model not in models)


# ------------------------------------------------------------------ properties
@SETTINGS
@given(world_st())
def test_placement_decision_is_safe_and_respects_scores(world: World) -> None:
    before = snapshot(world.state)
    decision = plan_placement(world.state, world.profiles, world.demand, PARAMS)
    assert snapshot(world.state) == before  # pure
    check_decision(world, decision)


@SMALL
@given(world_st())
def test_placement_is_deterministic(world: World) -> None:
    decision = plan_placement(world.state, world.profiles, world.demand, PARAMS)
    assert plan_placement(world.state, world.profiles, world.demand, PARAMS) == decision
    clone = copy.deepcopy(world.state)
    shuffled = dict(reversed(list(world.profiles.items())))
    assert plan_placement(clone, shuffled, dict(reversed(list(world.demand.items()))), PARAMS) == decision


@SMALL
@given(world_st())
def test_round_robin_decision_never_over_commits(world: World) -> None:
    decision = plan_round_robin(world.state, world.profiles, world.demand, PARAMS)
    assert decision.evict == []
    after = copy.deepcopy(world.state)
    for new in decision.add:
        assert new.group.size == world.profiles[new.model].tp
        after.add_replica(new.model, new.group, new.bytes_per_gpu)
    after.check_invariants()


@SMALL
@given(world_st(), st.data())
def test_choose_group_and_promotion_keep_invariants(world: World, data: st.DataObject) -> None:
    state, policy = world.state, world.policy
    name = data.draw(st.sampled_from(sorted(world.profiles)))
    choice = policy.choose_group(state, name)
    if choice is None:
        shard = world.profiles[name].shard_bytes
        assert all(
            state.group_has_engine(g) or state.capacity((g.node, g.start)) < shard
            for g in state.groups(world.profiles[name].tp)
        )
        return
    group, source = choice
    assert group.size == world.profiles[name].tp and not state.group_has_engine(group)
    hits = [r for r in state.replicas_of(name) if not state.group_has_engine(r.group)]
    assert source == ("hit" if any(r.warm for r in hits) else "loading" if hits else "cold")
    try:
        promotion = state.start_instance(name, group, world.profiles[name].shard_bytes, 1e6)
    except PlanError as error:  # pragma: no cover - a failure here is a bug worth seeing
        raise AssertionError(f"choose_group picked an unusable group: {error}") from error
    assert promotion.source == source
    state.check_invariants()
