"""Golden results: the simulator's output for fixed seeds must stay bit-identical.

Speed work on the simulator (issue 14) must not change a single result. For a few fixed cases of the
`paper` scenario this test rebuilds the workload, runs every policy and compares a SHA-256 digest of each
`SimResult` (TTFT array bytes, model indices, counters, the start log, every float by its exact ``repr``)
and of the workload arrays with the digests stored in ``tests/data/sim_golden.json``.

A change that is *meant* to alter results (a bug fix) regenerates the file and says so in its commit:

    python tests/sim/test_sim_golden.py --update
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from warmserve.sim.costs import table_costs
from warmserve.sim.engine import POLICIES, SimResult, Simulation
from warmserve.sim.report import compare
from warmserve.sim.scenarios import paper
from warmserve.workload.build import Workload, build_workload

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "sim_golden.json"

# (name, workload changes, initial state, cost table). One hour from 16:00 (load rising towards the day's
# peak: starts, evictions, KV lending) for two seeds; a short steady-start case on the other cost table.
CASES: tuple[tuple[str, dict, str, str], ...] = (
    ("1h-16h-seed0", {"replay_s": 3600, "replay_start_s": 16 * 3600, "seed": 0}, "empty", "gpu-a100"),
    ("1h-16h-seed1", {"replay_s": 3600, "replay_start_s": 16 * 3600, "seed": 1}, "empty", "gpu-a100"),
    ("20m-9h-seed2-steady-cpu", {"replay_s": 1200, "replay_start_s": 9 * 3600, "seed": 2}, "steady", "cpu-measured"),
)


def _hash_array(h: hashlib._Hash, name: str, array: np.ndarray) -> None:
    h.update(f"{name}:{array.dtype.str}:{array.shape}:".encode())
    h.update(np.ascontiguousarray(array).tobytes())


def workload_digest(workload: Workload) -> str:
    h = hashlib.sha256()
    for name in ("history_rate", "arrival_s", "model_idx", "input_tokens", "output_tokens"):
        _hash_array(h, name, getattr(workload, name))
    return h.hexdigest()


def result_digest(result: SimResult) -> str:
    """Every output of a run: arrays by their bytes, numbers by their exact repr."""
    h = hashlib.sha256()
    _hash_array(h, "ttft", result.ttft)
    _hash_array(h, "model_idx", result.model_idx)
    fields = {
        "policy": result.policy,
        "unserved": result.unserved,
        "gpu_seconds": repr(result.gpu_seconds),
        "gpu_seconds_engines": repr(result.gpu_seconds_engines),
        "starts": sorted((str(k), v) for k, v in result.starts.items()),
        "prewarm_loaded_bytes": repr(result.prewarm_loaded_bytes),
        "wasted_prewarm_bytes": repr(result.wasted_prewarm_bytes),
        "evictions": sorted(result.evictions.items()),
        "lent_replicas": result.lent_replicas,
        "lent_hits": result.lent_hits,
        "start_log": [(r.model, r.mechanism, repr(r.begin), repr(r.ready), r.evicted) for r in result.start_log],
        "host_bytes_asleep_peak": repr(result.host_bytes_asleep_peak),
    }
    h.update(json.dumps(fields, sort_keys=True).encode())
    return h.hexdigest()


def compute(case: tuple[str, dict, str, str]) -> dict:
    _, changes, initial, table = case
    scenario = paper().with_workload(**changes)
    workload = build_workload(scenario.workload)
    costs = table_costs(table)
    results = {p: Simulation(scenario, workload, p, costs=costs, initial=initial).run() for p in POLICIES}
    return {
        "requests": int(workload.arrival_s.size),
        "workload": workload_digest(workload),
        "policies": {p: result_digest(r) for p, r in results.items()},
        # readable context for a failure (not compared): each policy's p99 TTFT and GPU-hours
        "p99_s": {p: round(float(np.percentile(r.ttft, 99)), 6) for p, r in results.items()},
    }


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_results_are_bit_identical_to_the_golden_ones(case, golden):
    name = case[0]
    want = golden["cases"][name]
    got = compute(case)
    assert got["requests"] == want["requests"]
    assert got["workload"] == want["workload"], "the workload arrays changed"
    assert set(got["policies"]) == set(want["policies"]), "the policy set changed: regenerate the golden file"
    changed = {
        p: (want["p99_s"][p], got["p99_s"][p]) for p in want["policies"] if got["policies"][p] != want["policies"][p]
    }
    assert not changed, f"results changed (policy: golden p99, new p99): {changed}"


def update() -> None:
    data = {
        "about": "SHA-256 digests of SimResult per policy (tests/sim/test_sim_golden.py --update regenerates them)",
        "cases": {case[0]: compute(case) for case in CASES},
    }
    GOLDEN.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit(__doc__)
    update()


def test_parallel_compare_gives_the_sequential_results_and_progress_in_the_same_order():
    scenario = paper().with_workload(replay_s=600, replay_start_s=16 * 3600)
    policies = ["warmserve", "dedicated", "sleep-wake"]  # not in POLICIES order: the order must be kept
    shown: list[tuple[str, float]] = []

    def progress(label: str):
        return lambda fraction: shown.append((label, fraction))

    sequential = compare(scenario, policies, workers=1)
    parallel = compare(scenario, policies, progress=progress, workers=2)
    assert list(parallel.results) == policies
    assert {p: result_digest(r) for p, r in parallel.results.items()} == {
        p: result_digest(r) for p, r in sequential.results.items()
    }
    # one bar per policy, never two at once: each policy's updates together, in order, each ending at 1.0
    labels = [label for label, _ in shown]
    assert [label for i, label in enumerate(labels) if i == 0 or labels[i - 1] != label] == policies
    assert [fraction for label, fraction in shown if fraction >= 1] == [1.0] * 3
