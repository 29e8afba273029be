"""The `many` scenario: many models of mixed sizes under memory pressure (issue 12, item 3)."""

from __future__ import annotations

import numpy as np
import pytest

from warmserve.sim.engine import DYNAMIC, POLICIES, Simulation
from warmserve.sim.scenarios import SCENARIOS, many
from warmserve.workload.build import build_workload

SHORT = dict(replay_s=180)  # the first 3 minutes of the day


@pytest.fixture(scope="module")
def scenario():
    return many().with_workload(**SHORT)


@pytest.fixture(scope="module")
def workload(scenario):
    return build_workload(scenario.workload)


@pytest.fixture(scope="module")
def results(scenario, workload):
    return {p: Simulation(scenario, workload, p).run() for p in POLICIES}


def test_registered_and_builds():
    assert SCENARIOS["many"] is many
    scenario = many()
    assert scenario.name == "many"
    assert len(scenario.models) == scenario.workload.n_models == 56
    assert sorted({m.tp for m in scenario.models}) == [1, 2, 4]
    assert sum(n.gpus for n in scenario.nodes) == 24
    assert {"cluster", "models", "memory pressure", "workload"} <= set(scenario.notes)


def test_one_replica_of_every_model_does_not_fit():
    scenario = many()
    model_bytes = sum(m.weight_bytes for m in scenario.models)
    arena_bytes = sum(n.gpus * n.gpu_bytes for n in scenario.nodes)
    assert model_bytes > arena_bytes
    assert f"ratio {model_bytes / arena_bytes:.2f}" in scenario.notes["memory pressure"]


def test_dynamic_policies_serve_every_request(workload, results):
    assert workload.arrival_s.size > 0
    for policy in DYNAMIC:
        result = results[policy]
        assert result.unserved == 0, policy
        assert result.ttft.size == workload.arrival_s.size, policy


def test_static_policies_run(workload, results):
    # Static provisioning cannot hold every model here (that is the point of the scenario): they run, and
    # the requests they never serve are counted, not dropped.
    for policy in set(POLICIES) - DYNAMIC:
        result = results[policy]
        assert result.ttft.size == workload.arrival_s.size, policy
        assert 0 <= result.unserved <= workload.arrival_s.size, policy


def test_same_seed_gives_identical_runs(scenario, results):
    again = Simulation(scenario, build_workload(scenario.workload), "warmserve").run()
    assert np.array_equal(again.ttft, results["warmserve"].ttft)
    assert again.starts == results["warmserve"].starts
    assert again.wasted_prewarm_bytes == results["warmserve"].wasted_prewarm_bytes
