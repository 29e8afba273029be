"""The incremental placement round decides exactly what the round before it decided (issue 14, item 1).

Recorded rounds of an evolving cluster (bench/placement.py's workload and control step: autoscaler, engine
starts, KV lending, placement, loads finishing) run with `plan_placement` checked, call by call, against the
frozen copy of the previous implementation (`placement_reference.py`): same additions, evictions, kept
replicas and unplaced slots, in the same order. Under memory pressure (`engine_share` 0.85) rounds evict to
make room, so both of the placement's paths are compared.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from placement_reference import reference_plan_placement

import warmserve.core.policy as policy_module
from warmserve.core.policy import WarmServePolicy

BENCH = Path(__file__).resolve().parents[2] / "bench"
_spec = importlib.util.spec_from_file_location("bench_placement", BENCH / "placement.py")
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_placement"] = bench
_spec.loader.exec_module(bench)


@pytest.mark.parametrize(
    ("gpus", "models", "share", "seed"),
    [(64, 10, 0.5, 0), (64, 20, 0.85, 1), (256, 60, 0.5, 2), (256, 60, 0.85, 3), (512, 120, 0.7, 4)],
)
def test_placement_decides_what_the_previous_implementation_decided(monkeypatch, gpus, models, share, seed):
    new = policy_module.plan_placement
    compared = {"rounds": 0, "added": 0, "evicted_for_room": 0, "unplaced": 0}

    def both(state, profiles, demand, params):
        decision = new(state, profiles, demand, params)
        reference = reference_plan_placement(state, profiles, demand, params)
        assert decision == reference and list(decision.kept.items()) == list(reference.kept.items())
        compared["rounds"] += 1
        compared["added"] += len(decision.add)
        compared["unplaced"] += len(decision.unplaced)
        return decision

    monkeypatch.setattr(policy_module, "plan_placement", both)
    workload = bench.build_workload(models, gpus, seed, share)
    policy = WarmServePolicy(workload.profiles)
    policy.place(bench.build_cluster(gpus), workload.demand(0))  # a cold round
    state = bench.build_cluster(gpus)
    for window in range(30):
        step = bench.control_step(state, policy, workload.demand(window), window * bench.WINDOW_S)
        compared["evicted_for_room"] += len(step.decision.evict) - step.dropped
        state.check_invariants()
    assert compared["rounds"] == 31 and compared["added"] > 0
    if share >= 0.85:
        assert compared["evicted_for_room"] + compared["unplaced"] > 0, compared  # the pressure path ran
