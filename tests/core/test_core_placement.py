"""Evict-aware placement on hand-built clusters, with every expectation worked out by hand.

Most tests use ``PlacementParams(upper=1.0, load_bandwidth=1.0)`` and ``max_batch=10`` so that a model asks
for ``ceil(load / 10)`` engines and a replica's ``cold`` term is simply its shard bytes × priority.
"""

from __future__ import annotations

import math

import pytest

from warmserve.core.cluster import ClusterState
from warmserve.core.placement import (
    BURST_FACTOR_CAP,
    NewReplica,
    PlacementParams,
    Slot,
    engines_needed,
    plan_placement,
    replica_slots,
)
from warmserve.core.policy import PolicyParams, WarmServePolicy, plan_round_robin
from warmserve.core.types import Demand, GpuGroup, ModelProfile, NodeSpec

SIMPLE = PlacementParams(upper=1.0, load_bandwidth=1.0)
CAP = 100


def model(name: str, weight: int, tp: int = 1, priority: float = 1.0, min_warm: int = 0) -> ModelProfile:
    return ModelProfile(name, weight, tp=tp, max_batch=10, priority=priority, min_warm=min_warm)


def engines(n: int) -> Demand:
    """Demand that asks for exactly ``n`` engines (n foundation slots, no burst) under SIMPLE."""
    return Demand(10.0 * n, 10.0 * n)


def make_state(*gpus: int, cap: int = CAP) -> ClusterState:
    return ClusterState([NodeSpec(f"n{i}", g, cap) for i, g in enumerate(gpus)])


def plan(state: ClusterState, profiles: list[ModelProfile], demand: dict[str, Demand]):
    return plan_placement(state, {p.name: p for p in profiles}, demand, SIMPLE)


def scores(slots: list[Slot]) -> list[float]:
    return [s.score for s in slots]


# ----------------------------------------------------------- engines_needed
@pytest.mark.parametrize(
    ("load", "expected"), [(0.0, 0), (0.001, 1), (8.0, 1), (8.0001, 2), (16.0, 2), (24.0, 3), (80.0, 10)]
)
def test_engines_needed_uses_the_scale_up_threshold(load: float, expected: int) -> None:
    assert engines_needed(load, ModelProfile("m", 1, max_batch=10), 0.8) == expected


# ------------------------------------------------------------ replica_slots
def test_zero_demand_asks_for_nothing() -> None:
    assert replica_slots(model("m", 10), Demand(0, 0), 0, SIMPLE) == []
    assert replica_slots(model("m", 10), Demand(0, 0), 3, SIMPLE) == []


def test_foundation_slots_decay_exponentially() -> None:
    slots = replica_slots(model("m", 10), engines(2), 0, SIMPLE)
    assert [(s.model, s.index) for s in slots] == [("m", 0), ("m", 1)]
    assert scores(slots) == pytest.approx([10.0, 10.0 * math.exp(-1 / 2)])


def test_running_engines_reduce_foundation_slots() -> None:
    assert scores(replica_slots(model("m", 10), engines(3), 1, SIMPLE)) == pytest.approx(
        [10.0, 10.0 * math.exp(-1 / 2)]
    )
    assert replica_slots(model("m", 10), engines(3), 3, SIMPLE) == []
    assert replica_slots(model("m", 10), engines(3), 5, SIMPLE) == []


def test_burst_slots_carry_the_peak_to_average_factor() -> None:
    # avg 10 → 1 engine, peak 30 → 3 engines: 1 foundation + 2 burst, bf = 3
    # scores: foundation 10, burst 30·e^(-1/3) = 21.5 and 30·e^(-2/3) = 15.4, handed out highest first
    slots = replica_slots(model("m", 10), Demand(10, 30), 0, SIMPLE)
    assert scores(slots) == pytest.approx([30.0 * math.exp(-1 / 3), 30.0 * math.exp(-2 / 3), 10.0])
    assert [s.index for s in slots] == [0, 1, 2]
    # one engine already runs: the foundation slot goes, the burst slots stay
    slots = replica_slots(model("m", 10), Demand(10, 30), 1, SIMPLE)
    assert scores(slots) == pytest.approx([30.0, 30.0 * math.exp(-1 / 2)])


def test_burst_factor_is_capped() -> None:
    slots = replica_slots(model("m", 10), Demand(0, 15), 0, SIMPLE)  # idle on average: capped factor
    assert scores(slots) == pytest.approx([10.0 * BURST_FACTOR_CAP, 10.0 * BURST_FACTOR_CAP * math.exp(-1 / 2)])
    slots = replica_slots(model("m", 10), Demand(1, 50), 0, SIMPLE)  # peak/avg = 50 → 10
    assert scores(slots) == pytest.approx([100.0 * math.exp(-j / 5) for j in (1, 2, 3, 4)] + [10.0])


def test_peak_below_average_adds_no_burst() -> None:
    assert scores(replica_slots(model("m", 10), Demand(20, 5), 0, SIMPLE)) == pytest.approx(
        [10.0, 10.0 * math.exp(-1 / 2)]
    )


def test_priority_and_shard_size_scale_the_score() -> None:
    assert replica_slots(model("m", 10, priority=2.5), engines(1), 0, SIMPLE)[0].score == pytest.approx(25.0)
    assert replica_slots(model("m", 40, tp=4), engines(1), 0, SIMPLE)[0].score == pytest.approx(10.0)
    default = replica_slots(model("m", 50 * 10**9), engines(1), 0, PlacementParams(upper=1.0))
    assert default[0].score == pytest.approx(2.0)  # 50 GB at 25 GB/s


def test_min_warm_asks_for_replicas_without_demand() -> None:
    slots = replica_slots(model("m", 10, min_warm=2), Demand(0, 0), 0, SIMPLE)
    assert scores(slots) == pytest.approx([10.0, 10.0 * math.exp(-1 / 2)])
    assert len(replica_slots(model("m", 10, min_warm=2), Demand(0, 0), 4, SIMPLE)) == 2
    assert len(replica_slots(model("m", 10, min_warm=1), engines(3), 0, SIMPLE)) == 3  # demand dominates


def _warm_slots(running: int, min_warm: int) -> int:
    """Slots when the peak needs 3 engines (avg needs 1) and ``running`` engines run."""
    return len(replica_slots(model("m", 10, min_warm=min_warm), Demand(10, 30), running, SIMPLE))


@pytest.mark.parametrize(("running", "expected"), [(0, 3), (3, 1), (4, 1)])
def test_min_warm_floor_where_it_already_holds(running: int, expected: int) -> None:
    assert _warm_slots(running, 0) == max(3 - running, 0)
    assert _warm_slots(running, 1) == expected  # max(3 - running, min_warm)


@pytest.mark.parametrize(("running", "expected"), [(1, 2), (2, 1)])
def test_min_warm_is_a_floor_not_an_addition(running: int, expected: int) -> None:
    # Without min_warm the model asks for 3 - running replicas; min_warm = 1 is already met, so it must not
    # add one (the first version asked for 3 with one engine running and 2 with two).
    assert _warm_slots(running, 0) == 3 - running
    assert _warm_slots(running, 1) == expected


@pytest.mark.parametrize(("running", "min_warm", "expected"), [(0, 5, 5), (1, 3, 3), (2, 3, 3), (0, 2, 3)])
def test_min_warm_above_the_peak_need(running: int, min_warm: int, expected: int) -> None:
    assert _warm_slots(running, min_warm) == expected  # max(3 - running, min_warm)


@pytest.mark.parametrize(
    "demand", [Demand(10, 30), Demand(10, 80), Demand(25, 26), Demand(0, 40), Demand(45, 60), Demand(5, 200)]
)
@pytest.mark.parametrize("running", [0, 1, 2])
def test_slots_are_highest_score_first(demand: Demand, running: int) -> None:
    got = scores(replica_slots(model("m", 10, min_warm=1), demand, running, SIMPLE))
    assert got == sorted(got, reverse=True)


# ------------------------------------------------------------ plan_placement
def test_replicas_of_one_model_spread_and_others_avoid_them() -> None:
    state = make_state(4)
    decision = plan(state, [model("a", 10), model("b", 5)], {"a": engines(3), "b": engines(1)})
    assert [(n.model, n.group) for n in decision.add] == [
        ("a", GpuGroup(0, 0, 1)),
        ("a", GpuGroup(0, 1, 1)),
        ("a", GpuGroup(0, 2, 1)),
        ("b", GpuGroup(0, 3, 1)),  # the only GPU whose promotion destroys nothing
    ]
    assert [n.score for n in decision.add] == pytest.approx(
        [10.0, 10.0 * math.exp(-1 / 3), 10.0 * math.exp(-2 / 3), 5.0]
    )
    assert all(n.bytes_per_gpu == 10 or n.model == "b" for n in decision.add)
    assert decision.evict == [] and decision.kept == {} and decision.unplaced == []


def test_tensor_parallel_groups_are_aligned_and_nested() -> None:
    # equal scores (shard 10 each): a4 first by name; every later choice is forced by hand below
    decision = plan(make_state(8), [model("a4", 40, tp=4), model("b2", 20, tp=2)], {"a4": engines(2), "b2": engines(2)})
    assert [(n.model, n.group, n.bytes_per_gpu) for n in decision.add] == [
        ("a4", GpuGroup(0, 0, 4), 10),
        ("b2", GpuGroup(0, 4, 2), 10),  # outside a4's group: overlaps nothing of higher score
        ("a4", GpuGroup(0, 4, 4), 10),  # the only other size-4 group
        ("b2", GpuGroup(0, 6, 2), 10),  # every pair overlaps an a4; this one the lower-score a4
    ]


def test_model_larger_than_any_node_is_unplaced() -> None:
    decision = plan(make_state(4, 4), [model("big", 80, tp=8)], {"big": engines(1)})
    assert decision.add == [] and decision.unplaced == [Slot("big", 0, pytest.approx(10.0))]


def test_one_model_never_gets_two_replicas_on_one_gpu() -> None:
    decision = plan(make_state(1), [model("a", 10)], {"a": engines(2)})
    assert [n.group for n in decision.add] == [GpuGroup(0, 0, 1)]
    assert [(s.model, s.index) for s in decision.unplaced] == [("a", 1)]


def test_no_replica_beside_an_engine_of_the_same_model() -> None:
    state = make_state(2)
    state.start_instance("a", GpuGroup(0, 0, 1), 20, 0.0)
    state.set_lent((0, 0), 80)
    state.add_replica("top", GpuGroup(0, 1, 1), 95, phase="warm")  # GPU 1 is taken by a higher score
    decision = plan(state, [model("a", 10), model("top", 95, priority=10.0)], {"a": engines(2), "top": engines(1)})
    assert decision.add == []  # GPU 0 has 80 lent bytes, but its engine is ``a`` itself
    assert [(s.model, s.index) for s in decision.unplaced] == [("a", 0)]


def test_draining_engines_do_not_count_as_running() -> None:
    state = make_state(2)
    instance = state.start_instance("a", GpuGroup(0, 0, 1), 20, 0.0).instance
    assert plan(state, [model("a", 10)], {"a": engines(1)}).add == []
    instance.phase = "draining"
    decision = plan(state, [model("a", 10)], {"a": engines(1)})
    assert [(n.model, n.group) for n in decision.add] == [("a", GpuGroup(0, 1, 1))]


def test_prefers_gpus_without_an_engine() -> None:
    state = make_state(2)
    state.start_instance("e", GpuGroup(0, 0, 1), 20, 0.0)
    state.set_lent((0, 0), 80)
    decision = plan(state, [model("n", 10)], {"n": engines(1)})
    assert [n.group for n in decision.add] == [GpuGroup(0, 1, 1)]


def test_uses_lent_space_when_nothing_else_fits_and_before_evicting() -> None:
    state = make_state(2)
    state.start_instance("e", GpuGroup(0, 0, 1), 20, 0.0)
    state.set_lent((0, 0), 80)
    low = state.add_replica("low", GpuGroup(0, 1, 1), 95, phase="warm")
    decision = plan(state, [model("n", 10), model("low", 95, priority=0.01)], {"n": engines(1), "low": engines(1)})
    assert [n.group for n in decision.add] == [GpuGroup(0, 0, 1)]  # lent space, no eviction
    assert decision.evict == [] and decision.kept == {low.rid: pytest.approx(0.95)}


def test_evicts_a_lower_score_replica_when_a_higher_one_does_not_fit() -> None:
    state = make_state(1)
    low = state.add_replica("low", GpuGroup(0, 0, 1), 60, phase="warm")
    decision = plan(state, [model("low", 60), model("high", 60, priority=2.0)], {"low": engines(1), "high": engines(1)})
    assert decision.evict == [low.rid]
    assert decision.add == [NewReplica("high", GpuGroup(0, 0, 1), 60, pytest.approx(120.0))]
    # the evicted replica still has a slot: it tries again elsewhere and, finding no room, is reported
    assert decision.kept == {} and decision.unplaced == [Slot("low", 0, pytest.approx(60.0))]


def test_never_evicts_a_higher_score_replica() -> None:
    state = make_state(1)
    high = state.add_replica("high", GpuGroup(0, 0, 1), 60)  # still loading: protected all the same
    decision = plan(state, [model("low", 60), model("high", 60, priority=2.0)], {"low": engines(1), "high": engines(1)})
    assert decision.evict == [] and decision.add == []
    assert decision.kept == {high.rid: pytest.approx(120.0)}
    assert decision.unplaced == [Slot("low", 0, pytest.approx(60.0))]


def test_equal_score_existing_replica_is_not_evicted() -> None:
    state = make_state(1)
    old = state.add_replica("a", GpuGroup(0, 0, 1), 60)
    decision = plan(state, [model("a", 60), model("b", 60)], {"a": engines(1), "b": engines(1)})
    assert decision.evict == [] and decision.kept == {old.rid: pytest.approx(60.0)}


def test_eviction_picks_the_cheapest_group_and_stops_once_it_fits() -> None:
    state = make_state(2)
    p1 = state.add_replica("p1", GpuGroup(0, 0, 1), 30, phase="warm")
    p2 = state.add_replica("p2", GpuGroup(0, 0, 1), 30, phase="warm")
    p3 = state.add_replica("p3", GpuGroup(0, 0, 1), 30, phase="warm")
    q = state.add_replica("q", GpuGroup(0, 1, 1), 90, phase="warm")
    profiles = [
        model("p1", 30, priority=4 / 30),  # scores 4, 3, 2 and 9 (q): all below the new replica's 35
        model("p2", 30, priority=3 / 30),
        model("p3", 30, priority=2 / 30),
        model("q", 90, priority=9 / 90),
        model("n", 35),
    ]
    decision = plan(state, profiles, {p.name: engines(1) for p in profiles})
    # GPU 0 scores 9 in total, GPU 1 scores 9 too but the tie goes to the lower index: GPU 0.
    # There, evict lowest first (p3 → 40 free bytes) and stop: 40 >= 35.
    assert decision.add == [NewReplica("n", GpuGroup(0, 0, 1), 35, pytest.approx(35.0))]
    assert decision.evict == [p3.rid]
    assert set(decision.kept) == {p1.rid, p2.rid, q.rid}


def test_eviction_spares_a_higher_score_replica_on_the_same_gpu() -> None:
    state = make_state(1)
    keep = state.add_replica("k", GpuGroup(0, 0, 1), 40, phase="warm")
    low = state.add_replica("p", GpuGroup(0, 0, 1), 40, phase="warm")
    profiles = [model("k", 40, priority=50 / 40), model("p", 40, priority=5 / 40), model("n", 50, priority=0.2)]
    decision = plan(state, profiles, {m.name: engines(1) for m in profiles})
    assert decision.evict == [low.rid] and decision.kept == {keep.rid: pytest.approx(50.0)}
    assert decision.add == [NewReplica("n", GpuGroup(0, 0, 1), 50, pytest.approx(10.0))]


def test_eviction_prefers_the_group_destroying_less_score() -> None:
    state = make_state(2)
    p = state.add_replica("p", GpuGroup(0, 0, 1), 60, phase="warm")
    q = state.add_replica("q", GpuGroup(0, 1, 1), 60, phase="warm")
    profiles = [model("p", 60, priority=5 / 60), model("q", 60, priority=3 / 60), model("n", 60)]
    decision = plan(state, profiles, {m.name: engines(1) for m in profiles})
    assert decision.evict == [q.rid] and decision.kept == {p.rid: pytest.approx(5.0)}
    assert [n.group for n in decision.add] == [GpuGroup(0, 1, 1)]


def test_eviction_only_takes_replicas_that_are_in_the_way() -> None:
    """b scores lowest, but it sits on the GPU that already has room: only a must go (the first version
    evicted both)."""
    state = make_state(2, cap=20)
    a = state.add_replica("a", GpuGroup(0, 0, 1), 15, phase="warm")  # GPU 0: 5 free, n needs 10
    b = state.add_replica("b", GpuGroup(0, 1, 1), 5, phase="warm")  # GPU 1: 15 free, room enough
    profiles = [model("a", 15), model("b", 5), model("n", 20, tp=2, priority=100.0)]
    decision = plan(state, profiles, {m.name: engines(1) for m in profiles})
    assert [n.group for n in decision.add] == [GpuGroup(0, 0, 2)]
    assert decision.evict == [a.rid]
    assert decision.kept == {b.rid: pytest.approx(5.0)}


def test_eviction_destroys_the_least_score() -> None:
    state = make_state(2)
    p = state.add_replica("p", GpuGroup(0, 0, 1), 60, phase="warm")  # GPU 0: evict p (5) to fit
    state.add_replica("k", GpuGroup(0, 1, 1), 40, phase="warm")  # GPU 1: k (90) stays, evict q (1) to fit
    q = state.add_replica("q", GpuGroup(0, 1, 1), 60, phase="warm")
    profiles = [model("p", 60, priority=5 / 60), model("k", 40, priority=90 / 40), model("q", 60, priority=1 / 60)]
    profiles.append(model("n", 60))
    decision = plan(state, profiles, {m.name: engines(1) for m in profiles})
    assert decision.evict == [q.rid] and p.rid in decision.kept


def test_an_evicted_replica_with_a_slot_is_replaced_or_reported() -> None:
    state = make_state(2)
    state.add_replica("low", GpuGroup(0, 0, 1), 40, phase="warm")
    state.add_replica("mid", GpuGroup(0, 0, 1), 30, phase="warm")
    state.add_replica("top", GpuGroup(0, 1, 1), 60, phase="warm")
    profiles = [model("low", 40, priority=0.1), model("mid", 30, priority=10), model("top", 60, priority=10)]
    profiles.append(model("n", 60))
    decision = plan(state, profiles, {m.name: engines(1) for m in profiles})
    assert [n.model for n in decision.add] == ["n", "low"] or [s.model for s in decision.unplaced] == ["low"]


def test_prefers_a_group_overlapping_no_higher_score_replica() -> None:
    state = make_state(2)
    z = state.add_replica("z", GpuGroup(0, 0, 1), 10, phase="warm")
    lows = [state.add_replica(f"p{i}", GpuGroup(0, 1, 1), i, phase="warm") for i in (9, 8, 7)]
    profiles = [model("z", 10, priority=2.0), model("n", 10)] + [model(f"p{i}", i) for i in (9, 8, 7)]
    decision = plan(state, profiles, {m.name: engines(1) for m in profiles})
    # GPU 0 overlaps z (score 20 > 10); GPU 1 overlaps 9 + 8 + 7 = 24 of lower scores only: GPU 1 wins
    assert [n.group for n in decision.add] == [GpuGroup(0, 1, 1)]
    assert decision.evict == [] and set(decision.kept) == {z.rid} | {r.rid for r in lows}


def test_prefers_the_smallest_overlapping_score() -> None:
    state = make_state(2)
    state.add_replica("x", GpuGroup(0, 0, 1), 10, phase="warm")
    state.add_replica("y", GpuGroup(0, 1, 1), 10, phase="warm")
    profiles = [model("x", 10, priority=5.0), model("y", 10, priority=3.0), model("n", 10)]
    decision = plan(state, profiles, {m.name: engines(1) for m in profiles})
    assert [n.group for n in decision.add] == [GpuGroup(0, 1, 1)]  # both higher; y's 30 < x's 50


def test_replicas_beyond_their_models_slots_are_dropped() -> None:
    state = make_state(4)
    loading = state.add_replica("a", GpuGroup(0, 0, 1), 10)
    warm = state.add_replica("a", GpuGroup(0, 1, 1), 10, phase="warm")
    orphan = state.add_replica("gone", GpuGroup(0, 2, 1), 10, phase="warm")  # model no longer served
    idle = state.add_replica("b", GpuGroup(0, 3, 1), 10, phase="warm")
    decision = plan(state, [model("a", 10), model("b", 10)], {"a": engines(1), "b": Demand(0, 0)})
    assert sorted(decision.evict) == sorted([loading.rid, orphan.rid, idle.rid])  # warm ones first
    assert decision.kept == {warm.rid: pytest.approx(10.0)}
    assert decision.add == []


def test_replica_in_lent_space_is_dropped_before_a_promotable_one() -> None:
    state = make_state(2)
    state.start_instance("e", GpuGroup(0, 0, 1), 20, 0.0)
    state.set_lent((0, 0), 80)
    in_lent = state.add_replica("a", GpuGroup(0, 0, 1), 10, phase="warm")
    free = state.add_replica("a", GpuGroup(0, 1, 1), 10, phase="warm")
    decision = plan(state, [model("a", 10)], {"a": engines(1)})
    assert decision.evict == [in_lent.rid] and decision.kept == {free.rid: pytest.approx(10.0)}


def test_existing_replicas_take_their_models_first_slots() -> None:
    state = make_state(4)
    old = state.add_replica("a", GpuGroup(0, 2, 1), 10, phase="warm")
    decision = plan(state, [model("a", 10)], {"a": engines(3)})
    assert decision.kept == {old.rid: pytest.approx(10.0)}
    assert [(n.group, n.score) for n in decision.add] == [
        (GpuGroup(0, 0, 1), pytest.approx(10.0 * math.exp(-1 / 3))),
        (GpuGroup(0, 1, 1), pytest.approx(10.0 * math.exp(-2 / 3))),
    ]


def test_an_existing_replica_takes_its_models_highest_slot() -> None:
    state = make_state(4)
    old = state.add_replica("a", GpuGroup(0, 3, 1), 10, phase="warm")
    decision = plan(state, [model("a", 10)], {"a": Demand(10, 30)})
    assert decision.kept == {old.rid: pytest.approx(30.0 * math.exp(-1 / 3))}
    assert [n.score for n in decision.add] == pytest.approx([30.0 * math.exp(-2 / 3), 10.0])


def test_plan_placement_is_pure_and_deterministic() -> None:
    state = make_state(4, 2)
    state.add_replica("a", GpuGroup(0, 0, 2), 40, phase="warm")
    state.add_replica("b", GpuGroup(0, 2, 1), 70)
    state.start_instance("c", GpuGroup(1, 0, 1), 30, 0.0)
    state.set_lent((1, 0), 50)
    state.add_replica("d", GpuGroup(1, 0, 2), 20)
    profiles = [model("a", 80, tp=2), model("b", 70), model("c", 30), model("d", 40, tp=2), model("e", 90, tp=4)]
    demand = {"a": engines(1), "b": Demand(0, 0), "c": engines(3), "d": Demand(5, 40), "e": engines(2)}

    def snap() -> tuple:
        return (
            {rid: (r.model, r.group, r.bytes_per_gpu, r.phase) for rid, r in state.replicas.items()},
            {iid: (i.model, i.group, i.phase) for iid, i in state.instances.items()},
            [(state.used(g), state.budget(g), state.lent(g)) for g in state.all_gpus()],
        )

    before = snap()
    first = plan(state, profiles, demand)
    assert snap() == before
    assert plan(state, profiles, demand) == first
    assert plan(state, list(reversed(profiles)), dict(reversed(list(demand.items())))) == first
    assert first.add or first.evict  # the scenario does exercise the planner


# ----------------------------------------------------------- plan_round_robin
def test_round_robin_takes_turns_first_fit_and_stacks() -> None:
    state = make_state(4)
    decision = plan_round_robin(
        state, {"a": model("a", 10), "b": model("b", 10)}, {"a": engines(2), "b": engines(1)}, SIMPLE
    )
    assert [(n.model, n.group, n.score) for n in decision.add] == [
        ("a", GpuGroup(0, 0, 1), 1.0),
        ("b", GpuGroup(0, 0, 1), 1.0),  # stacked on a's GPU: the ablation ignores scores
        ("a", GpuGroup(0, 1, 1), 1.0),
    ]
    assert decision.evict == [] and decision.kept == {}


def test_round_robin_counts_existing_replicas_and_never_evicts() -> None:
    state = make_state(2)
    a = state.add_replica("a", GpuGroup(0, 0, 1), 90, phase="warm")
    gone = state.add_replica("b", GpuGroup(0, 1, 1), 90, phase="warm")
    decision = plan_round_robin(
        state,
        {"a": model("a", 90), "b": model("b", 90), "c": model("c", 20)},
        {"a": engines(2), "b": Demand(0, 0), "c": engines(1)},
        SIMPLE,
    )
    assert decision.kept == {a.rid: 1.0, gone.rid: 1.0}  # keeps even replicas nobody asks for
    assert decision.add == [] and decision.evict == []  # a's 2nd and c's replica fit nowhere


def test_round_robin_respects_tp_alignment_and_engines() -> None:
    state = make_state(4)
    state.start_instance("t", GpuGroup(0, 0, 1), 20, 0.0)
    decision = plan_round_robin(state, {"t": model("t", 20, tp=2)}, {"t": engines(2)}, SIMPLE)
    assert [n.group for n in decision.add] == [GpuGroup(0, 2, 2)]  # (0, 0, 2) holds t's engine


# ----------------------------------------------------------- policy.place
def test_policy_place_dispatches_and_remembers_scores() -> None:
    state = make_state(2)
    old = state.add_replica("a", GpuGroup(0, 0, 1), 10, phase="warm")
    profiles = {"a": model("a", 10), "b": model("b", 10)}
    demand = {"a": engines(2), "b": engines(1)}
    full = WarmServePolicy(profiles, PolicyParams(placement=SIMPLE))
    assert full.place(state, demand) == plan_placement(state, profiles, demand, SIMPLE)
    assert full.scores == {old.rid: pytest.approx(10.0)}
    full.record_added(99, 1.5)
    assert full.scores[99] == 1.5
    ablation = WarmServePolicy(profiles, PolicyParams(placement=SIMPLE, evict_aware=False))
    assert ablation.place(state, demand) == plan_round_robin(state, profiles, demand, SIMPLE)
    assert ablation.scores == {old.rid: 1.0}
    reactive = WarmServePolicy(profiles, PolicyParams(placement=SIMPLE, prewarm=False))
    decision = reactive.place(state, demand)
    assert decision.add == [] and decision.evict == [] and decision.kept == {}
