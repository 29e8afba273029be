"""The placement round decides what the frozen reference decides beyond the benchmark's clusters (issue 14).

`test_core_placement_differential.py` compares the two on recorded rounds of 8-GPU nodes. Here the same
comparison runs on the property tests' random reachable worlds (nodes of 1 to 8 GPUs side by side, lent
space, loading replicas, surges that evict; with the `ClusterState` views the placement reads), on clusters
whose nodes have 16 GPUs next to smaller ones and a TP-16 model (a group of 16 is tested for room in two
steps), and the vectorised helpers are checked against plain numpy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from placement_reference import reference_plan_placement
from test_core_placement_differential import bench
from test_core_placement_properties import PARAMS, SMALL, World, world_st

import warmserve.core.policy as policy_module
from warmserve.core.cluster import ClusterState
from warmserve.core.placement import _all_of, _per_gpu, plan_placement
from warmserve.core.policy import WarmServePolicy
from warmserve.core.types import GB, Demand, ModelProfile, NodeSpec


def assert_same(state, profiles, demand, params) -> None:
    decision = plan_placement(state, profiles, demand, params)
    reference = reference_plan_placement(state, profiles, demand, params)
    assert decision == reference and list(decision.kept.items()) == list(reference.kept.items())


@SMALL
@given(world_st())
def test_placement_decides_what_the_reference_decides_on_random_worlds(world: World) -> None:
    state = world.state
    assert set(state.lent_by_gpu()) == set(state.engine_gpus())  # the placement reads engine GPUs from it
    assert list(state.used_by_gpu()) == list(state.all_gpus())  # and used bytes in this order
    assert_same(state, world.profiles, world.demand, PARAMS)


@pytest.mark.parametrize(("share", "seed"), [(0.5, 0), (0.85, 1)])
def test_placement_decides_what_the_reference_decides_with_16_gpu_nodes(monkeypatch, share, seed) -> None:
    def both(state, profiles, demand, params):
        assert_same(state, profiles, demand, params)
        return plan_placement(state, profiles, demand, params)

    monkeypatch.setattr(policy_module, "plan_placement", both)
    sizes = [16, 8, 16, 4, 16, 2, 16, 8] * 4  # 384 GPUs
    workload = bench.build_workload(30, sum(sizes), seed, share)
    big = ModelProfile("big-tp16", weight_bytes=16 * 40 * GB, tp=16, max_batch=bench.MAX_BATCH)
    policy = WarmServePolicy(workload.profiles | {big.name: big})
    state = ClusterState(NodeSpec(f"n{i}", gpus, bench.GPU_BYTES) for i, gpus in enumerate(sizes))
    added = Counter[int]()
    for window in range(20):
        demand = workload.demand(window) | {big.name: Demand(20.0 + window % 3, 70.0)}
        step = bench.control_step(state, policy, demand, window * bench.WINDOW_S)
        added.update(new.group.size for new in step.decision.add)
        state.check_invariants()
    assert added[16] > 0 and added.total() > added[16]


@pytest.mark.parametrize("size", [1, 2, 4, 8, 16, 32])
def test_all_of_is_a_per_group_all(size: int) -> None:
    rng = np.random.default_rng(size)
    for density in (0.5, 0.9, 0.99):
        mask = rng.random(64 * 32) < density
        assert np.array_equal(_all_of(mask, size), mask.reshape(-1, size).all(axis=1))


def test_per_gpu_lists_every_gpu_of_every_span() -> None:
    gpus, nbytes = _per_gpu([(8, 4, 10), (3, 1, 7), (8, 2, 5)])
    assert gpus.tolist() == [8, 9, 10, 11, 3, 8, 9]
    assert nbytes.tolist() == [10, 10, 10, 10, 7, 5, 5]
    gpus, nbytes = _per_gpu([])
    assert gpus.size == 0 and nbytes.size == 0


@pytest.mark.parametrize(("share", "seed"), [(0.5, 5), (0.85, 6)])
def test_placement_decides_what_the_reference_decides_with_priority_zero_models(monkeypatch, share, seed) -> None:
    """A model of priority 0 (the schema's minimum) scores its replicas 0, so a group holding one looks empty by
    its score: the placement must not take its empty-group shortcut then (`_Grid.no_shortcut`)."""
    compared = Counter[str]()

    def both(state, profiles, demand, params):
        assert_same(state, profiles, demand, params)
        compared["rounds"] += 1
        return plan_placement(state, profiles, demand, params)

    monkeypatch.setattr(policy_module, "plan_placement", both)
    workload = bench.build_workload(24, 128, seed, share)
    zero = {name: replace(p, priority=0.0) for i, (name, p) in enumerate(workload.profiles.items()) if i % 4 == 0}
    policy = WarmServePolicy(workload.profiles | zero)
    state = bench.build_cluster(128)
    for window in range(20):
        step = bench.control_step(state, policy, workload.demand(window), window * bench.WINDOW_S)
        compared["zero_added"] += sum(1 for new in step.decision.add if new.model in zero)
        state.check_invariants()
    assert compared["rounds"] == 20 and compared["zero_added"] > 0, compared


def test_the_empty_group_shortcut_is_what_the_full_search_chooses() -> None:
    """Round by round on the benchmark's workload: every choice the shortcut makes is `_Grid.best`'s."""
    import warmserve.core.placement as placement_module

    checked = Counter[str]()
    original = placement_module._Grid.first_empty

    def checked_first_empty(grid, level, need):
        choice = original(grid, level, need)
        if choice is not None:
            size = 1 << level
            assert choice == grid.best(level, _all_of(grid.free >= need, size))
            checked["shortcut"] += 1
        return choice

    workload = bench.build_workload(40, 256, 7, 0.5)
    policy = WarmServePolicy(workload.profiles)
    state = bench.build_cluster(256)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(placement_module._Grid, "first_empty", checked_first_empty)
        for window in range(12):
            bench.control_step(state, policy, workload.demand(window), window * bench.WINDOW_S)
    assert checked["shortcut"] > 50, checked
