"""WarmServePolicy: where a new engine goes (hit > loading > cold) and how KV space is lent and taken back."""

from __future__ import annotations

import pytest

from warmserve.core.autoscaler import AutoscalerParams, EngineView, ScaleDecision, decide_scale
from warmserve.core.cluster import ClusterState
from warmserve.core.policy import EngineLoad, PolicyParams, WarmServePolicy
from warmserve.core.types import Demand, GpuGroup, ModelProfile, NodeSpec

CAP = 100


def make_state(*gpus: int) -> ClusterState:
    return ClusterState([NodeSpec(f"n{i}", g, CAP) for i, g in enumerate(gpus)])


def make_policy(**params: bool) -> WarmServePolicy:
    profiles = {
        "a": ModelProfile("a", 10, max_batch=10),
        "t": ModelProfile("t", 40, tp=2, max_batch=10),
        "e": ModelProfile("e", 20, max_batch=10),
        "e2": ModelProfile("e2", 40, tp=2, max_batch=10),
    }
    return WarmServePolicy(profiles, PolicyParams(**params))


# ----------------------------------------------------------------- scaling
def test_scale_delegates_to_the_autoscaler_with_the_models_batch() -> None:
    policy = make_policy()
    engines = [EngineView(1, 0.0, 3)]
    assert policy.scale(10.0, "a", 25.0, engines, max_replicas=3) == decide_scale(
        10.0, 25.0, engines, 10, AutoscalerParams(), 0, 3
    )
    assert policy.scale(10.0, "a", 25.0, engines) == ScaleDecision(start=3)  # ceil(25 / 8) = 4


# ------------------------------------------------------------- choose_group
def test_warm_hit_beats_loading_beats_cold() -> None:
    state, policy = make_state(4), make_policy()
    loading = state.add_replica("a", GpuGroup(0, 0, 1), 10)
    assert policy.choose_group(state, "a") == (GpuGroup(0, 0, 1), "loading")
    warm = state.add_replica("a", GpuGroup(0, 1, 1), 10, phase="warm")
    pricey = state.add_replica("x", GpuGroup(0, 1, 1), 10, phase="warm")
    policy.scores = {pricey.rid: 100.0, loading.rid: 1.0, warm.rid: 1.0}
    assert policy.choose_group(state, "a") == (GpuGroup(0, 1, 1), "hit")  # warm wins despite its cost
    state.evict(warm.rid)
    state.evict(loading.rid)
    assert policy.choose_group(state, "a") == (GpuGroup(0, 0, 1), "cold")


def test_among_hits_the_cheapest_eviction_wins() -> None:
    state, policy = make_state(4), make_policy()
    state.add_replica("a", GpuGroup(0, 0, 1), 10, phase="warm")
    state.add_replica("a", GpuGroup(0, 1, 1), 10, phase="warm")
    b = state.add_replica("b", GpuGroup(0, 0, 1), 10, phase="warm")
    c = state.add_replica("c", GpuGroup(0, 1, 1), 10, phase="warm")
    policy.scores = {b.rid: 5.0, c.rid: 1.0}
    assert policy.choose_group(state, "a") == (GpuGroup(0, 1, 1), "hit")
    policy.scores = {b.rid: 0.5, c.rid: 1.0}
    assert policy.choose_group(state, "a") == (GpuGroup(0, 0, 1), "hit")


def test_replica_in_an_engines_lent_space_is_no_hit() -> None:
    state, policy = make_state(2), make_policy()
    state.start_instance("e", GpuGroup(0, 0, 1), 20, 0.0)
    state.set_lent((0, 0), 80)
    state.add_replica("a", GpuGroup(0, 0, 1), 10, phase="warm")
    assert policy.choose_group(state, "a") == (GpuGroup(0, 1, 1), "cold")


def test_cold_start_takes_the_group_destroying_least_score_then_least_bytes() -> None:
    state, policy = make_state(4), make_policy()
    state.start_instance("e", GpuGroup(0, 3, 1), 20, 0.0)  # never a candidate
    x = state.add_replica("x", GpuGroup(0, 0, 1), 10)
    y = state.add_replica("y", GpuGroup(0, 1, 1), 50)
    z = state.add_replica("z", GpuGroup(0, 2, 1), 10)
    policy.scores = {x.rid: 3.0, y.rid: 1.0, z.rid: 1.0}
    assert policy.choose_group(state, "a") == (GpuGroup(0, 2, 1), "cold")  # z: same score, fewer bytes
    policy.scores = {x.rid: 3.0}  # unknown replicas cost nothing but their bytes
    assert policy.choose_group(state, "a") == (GpuGroup(0, 2, 1), "cold")
    state.evict(z.rid)
    assert policy.choose_group(state, "a") == (GpuGroup(0, 2, 1), "cold")  # an empty GPU is cheapest


def test_cold_tensor_parallel_group_skips_groups_touching_an_engine() -> None:
    state, policy = make_state(4), make_policy()
    state.start_instance("e", GpuGroup(0, 1, 1), 20, 0.0)
    big = state.add_replica("x", GpuGroup(0, 2, 2), 10)
    policy.scores = {big.rid: 50.0}
    assert policy.choose_group(state, "t") == (GpuGroup(0, 2, 2), "cold")  # (0, 0, 2) holds an engine
    state.start_instance("e", GpuGroup(0, 2, 1), 20, 0.0)
    assert policy.choose_group(state, "t") is None  # every size-2 group touches an engine


def test_cold_start_only_on_gpus_large_enough_for_the_shard() -> None:
    state = ClusterState([NodeSpec("small", 2, 50), NodeSpec("big", 2, 100)])
    policy = WarmServePolicy({"m": ModelProfile("m", 60), "huge": ModelProfile("huge", 101)})
    assert policy.choose_group(state, "m") == (GpuGroup(1, 0, 1), "cold")
    assert policy.choose_group(state, "huge") is None


def test_tensor_parallel_hit_on_its_exact_group() -> None:
    state, policy = make_state(8), make_policy()
    state.add_replica("t", GpuGroup(0, 4, 2), 20, phase="warm")
    assert policy.choose_group(state, "t") == (GpuGroup(0, 4, 2), "hit")


# -------------------------------------------------------------------- lend
def serving(state: ClusterState, model: str, group: GpuGroup, weight: int) -> int:
    instance = state.start_instance(model, group, weight, 0.0).instance
    instance.phase = "serving"
    return instance.iid


def test_lend_follows_the_reservation_formula() -> None:
    state, policy = make_state(2), make_policy()
    iid = serving(state, "e", GpuGroup(0, 0, 1), 20)  # C = 100 - 20 = 80, B = 10
    assert policy.lend(state, {iid: EngineLoad(2, 10)}).lent == {(0, 0): 62}  # R = max(16, 10 + 8) = 18
    assert policy.lend(state, {iid: EngineLoad(5, 10)}).lent == {(0, 0): 40}  # R = max(40, 18) = 40
    assert policy.lend(state, {}).lent == {(0, 0): 72}  # no report: idle, R = C / B = 8
    assert policy.lend(state, {iid: EngineLoad(10, 0)}).lent == {(0, 0): 0}


def test_lend_reserves_for_the_forecast_peak_share_of_each_engine() -> None:
    """Space below an engine's share of the window's forecast peak is not lent: it would be taken back (and
    the prewarm into it wasted) as soon as the load rose to the peak the forecast announced."""
    state, policy = make_state(2), make_policy()
    iid = serving(state, "e", GpuGroup(0, 0, 1), 20)  # C = 80, B = 10
    serving(state, "e", GpuGroup(0, 1, 1), 20)
    policy.place(state, {"e": Demand(4.0, 9.0)})  # peak 9 over 2 engines: each reserves for 5 in flight
    assert policy.lend(state, {iid: EngineLoad(2, 10)}).lent[(0, 0)] == 40  # R = max(80·5/10, 18) = 40
    assert policy.lend(state, {iid: EngineLoad(7, 10)}).lent[(0, 0)] == 24  # more in flight than the peak share
    policy.place(state, {"e": Demand(1.0, 1.0)})  # a quiet window: the instantaneous load decides again
    assert policy.lend(state, {iid: EngineLoad(2, 10)}).lent[(0, 0)] == 62


def test_starting_engines_and_the_no_proactive_ablation_lend_nothing() -> None:
    state = make_state(2)
    starting = state.start_instance("e", GpuGroup(0, 0, 1), 20, 0.0).instance.iid
    assert make_policy().lend(state, {starting: EngineLoad(0, 0)}).lent == {(0, 0): 0}
    iid = serving(state, "e", GpuGroup(0, 1, 1), 20)
    decision = make_policy(proactive=False).lend(state, {iid: EngineLoad(0, 0)})
    assert decision.lent == {(0, 0): 0, (0, 1): 0}


def test_lend_takes_space_back_from_the_lowest_score_first() -> None:
    state, policy = make_state(1), make_policy()
    iid = serving(state, "e", GpuGroup(0, 0, 1), 20)
    state.set_lent((0, 0), 72)
    r1 = state.add_replica("r1", GpuGroup(0, 0, 1), 30)
    r2 = state.add_replica("r2", GpuGroup(0, 0, 1), 30)
    r3 = state.add_replica("r3", GpuGroup(0, 0, 1), 10)
    policy.scores = {r1.rid: 5.0, r2.rid: 1.0, r3.rid: 3.0}
    assert policy.lend(state, {iid: EngineLoad(0, 0)}).evict == []  # 70 used ≤ 72 lendable
    assert policy.lend(state, {iid: EngineLoad(5, 0)}).evict == [r2.rid]  # lendable 40: 40 left after r2
    decision = policy.lend(state, {iid: EngineLoad(6, 0)})  # lendable 32
    assert decision.evict == [r2.rid, r3.rid] and decision.lent == {(0, 0): 32}
    for rid in decision.evict:
        state.evict(rid)
    for gpu, nbytes in decision.lent.items():
        state.set_lent(gpu, nbytes)  # the decision is applicable as is
    state.check_invariants()
    assert set(state.replicas) == {r1.rid}


def test_lend_unscored_replicas_go_first_and_ties_break_by_id() -> None:
    state, policy = make_state(1), make_policy()
    iid = serving(state, "e", GpuGroup(0, 0, 1), 20)
    state.set_lent((0, 0), 72)
    first = state.add_replica("r1", GpuGroup(0, 0, 1), 30)
    second = state.add_replica("r2", GpuGroup(0, 0, 1), 30)
    policy.scores = {}
    assert policy.lend(state, {iid: EngineLoad(5, 0)}).evict == [first.rid]
    policy.record_added(first.rid, 2.0)
    assert policy.lend(state, {iid: EngineLoad(5, 0)}).evict == [second.rid]


def test_lend_counts_a_replica_spanning_two_gpus_once() -> None:
    state, policy = make_state(2), make_policy()
    iid = serving(state, "e2", GpuGroup(0, 0, 2), 20)
    state.set_lent((0, 0), 72)
    state.set_lent((0, 1), 72)
    wide = state.add_replica("x", GpuGroup(0, 0, 2), 30)
    left = state.add_replica("y", GpuGroup(0, 0, 1), 30)
    right = state.add_replica("z", GpuGroup(0, 1, 1), 30)
    policy.scores = {wide.rid: 1.0, left.rid: 2.0, right.rid: 3.0}
    decision = policy.lend(state, {iid: EngineLoad(5, 0)})  # lendable 40 per GPU
    assert decision.evict == [wide.rid]  # frees GPU 0 and GPU 1 at once
    assert decision.lent == {(0, 0): 40, (0, 1): 40}


@pytest.mark.parametrize("in_flight", [0, 3, 7, 10])
def test_applying_a_lend_decision_keeps_the_invariants(in_flight: int) -> None:
    state, policy = make_state(4), make_policy()
    iid = serving(state, "e2", GpuGroup(0, 0, 2), 20)
    other = serving(state, "e", GpuGroup(0, 2, 1), 20)
    for gpu in [(0, 0), (0, 1), (0, 2)]:
        state.set_lent(gpu, 80)
    state.add_replica("a", GpuGroup(0, 0, 4), 25)
    state.add_replica("t", GpuGroup(0, 0, 2), 25)
    state.add_replica("x", GpuGroup(0, 2, 1), 25)
    decision = policy.lend(state, {iid: EngineLoad(in_flight, 5), other: EngineLoad(in_flight // 2, 0)})
    for rid in decision.evict:
        state.evict(rid)
    for gpu, nbytes in decision.lent.items():
        state.set_lent(gpu, nbytes)
    state.check_invariants()
