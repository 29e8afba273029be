"""The simulator: determinism, accounting and the behaviour each policy must show."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from warmserve.cli import main
from warmserve.core.policy import WarmServePolicy
from warmserve.sim.costs import COST_SOURCES, GB, CostModel
from warmserve.sim.engine import POLICIES, Simulation
from warmserve.sim.report import Sweep, compare, format_sensitivity, format_table, sensitivity
from warmserve.sim.scenarios import paper
from warmserve.workload.build import build_workload

SHORT = dict(replay_s=1800, replay_start_s=17 * 3600)


@pytest.fixture(scope="module")
def scenario():
    return paper().with_workload(**SHORT)


@pytest.fixture(scope="module")
def workload(scenario):
    return build_workload(scenario.workload)


@pytest.fixture(scope="module")
def results(scenario, workload):
    return {p: Simulation(scenario, workload, p, check_invariants=True).run() for p in POLICIES}


def test_every_request_is_served_and_ttft_covers_prefill(scenario, workload, results):
    prefill = np.array(
        [
            scenario.models[m].prefill_time(int(t))
            for m, t in zip(workload.model_idx, workload.input_tokens, strict=True)
        ]
    )
    for policy, result in results.items():
        assert result.unserved == 0, policy
        assert result.ttft.size == workload.arrival_s.size
        assert np.all(result.ttft >= prefill - 1e-9), policy


def test_same_seed_gives_identical_runs(scenario, workload, results):
    again = Simulation(scenario, build_workload(scenario.workload), "warmserve").run()
    assert np.array_equal(again.ttft, results["warmserve"].ttft)
    assert again.starts == results["warmserve"].starts
    assert again.wasted_prewarm_bytes == results["warmserve"].wasted_prewarm_bytes


def test_other_seed_gives_other_workload(scenario, results):
    other = scenario.with_workload(seed=1)
    result = Simulation(other, build_workload(other.workload), "warmserve").run()
    assert result.ttft.size != results["warmserve"].ttft.size or not np.array_equal(
        result.ttft, results["warmserve"].ttft
    )


def test_warmserve_promotes_prewarmed_replicas_and_reactive_baselines_load_cold(results):
    warm, cold = results["warmserve"], results["reactive-fast"]
    assert warm.starts["hit"] > 0
    assert warm.starts["hit"] / sum(warm.starts.values()) > 0.5
    assert cold.starts["hit"] == cold.starts["loading"] == 0
    assert cold.starts["cold"] > 0
    assert cold.prewarm_loaded_bytes == 0


def test_prewarming_cuts_the_tail_against_cold_starts_from_slow_storage(scenario, workload):
    """Storage at 0.5 GB/s: a cold start reads every engine's weights at start, WarmServe ahead of the burst
    (its starts without a replica read them too, so the gain is bounded: measured 51.7 s against 99.4 s)."""
    costs = CostModel(storage_bandwidth=0.5 * GB)
    warm = Simulation(scenario, workload, "warmserve", costs=costs).run()
    cold = Simulation(scenario, workload, "reactive-cold", costs=costs).run()
    assert np.percentile(cold.ttft, 99.9) > 1.5 * np.percentile(warm.ttft, 99.9)


def test_static_policies_never_start_engines_and_hold_fixed_gpus(scenario, results):
    hours = scenario.workload.replay_s / 3600
    for policy in ("gpu-share", "dedicated"):
        assert sum(results[policy].starts.values()) == 0
        gpus = results[policy].gpu_seconds / 3600 / hours
        assert gpus == pytest.approx(round(gpus))
    assert results["gpu-share"].gpu_seconds / 3600 == pytest.approx(16 * hours)


def test_no_proactive_ablation_never_lends_kv(results):
    assert "kv-reclaim" not in results["warmserve-noproactive"].evictions


def test_no_forecast_ablation_is_warmserve_with_the_last_window_forecaster(scenario, workload, results):
    last = Simulation(scenario, workload, "warmserve", forecaster="last").run()
    ablation = results["warmserve-noforecast"]
    assert np.array_equal(last.ttft, ablation.ttft) and last.starts == ablation.starts
    assert last.gpu_seconds == ablation.gpu_seconds


def test_simulation_drives_the_operator_policy_object(scenario, workload):
    simulation = Simulation(scenario, workload, "warmserve")
    simulation.run()
    assert type(simulation.core) is WarmServePolicy
    simulation.state.check_invariants()


def test_unknown_policy_is_refused(scenario, workload):
    with pytest.raises(ValueError, match="unknown policy"):
        Simulation(scenario, workload, "magic")


def test_summary_has_the_acceptance_keys(scenario, results):
    summary = results["warmserve"].summary(scenario.ttft_slo_s)
    for key in (
        "ttft_p50_s",
        "ttft_p95_s",
        "ttft_p99_s",
        "ttft_under_100ms",
        "gpu_hours",
        "prewarm_hit_rate",
        "requests",
    ):
        assert key in summary
    assert 0 <= summary["ttft_under_100ms"] <= 1


def test_table_lists_every_policy(scenario):
    comparison = compare(scenario.with_workload(replay_s=600), ["warmserve", "dedicated"])
    table = format_table(comparison)
    assert "warmserve" in table and "dedicated" in table and "p99" in table


def test_every_cost_parameter_has_a_source():
    assert set(COST_SOURCES) == set(CostModel.__dataclass_fields__)
    assert all(len(text) > 30 for text in COST_SOURCES.values())


def test_cli_writes_json_in_the_documented_shape(tmp_path, capsys):
    out = tmp_path / "out.json"
    plot = tmp_path / "out.png"
    code = main(
        [
            "simulate",
            "--hours",
            "0.2",
            "--policies",
            "warmserve,reactive-fast",
            "--json",
            str(out),
            "--plot",
            str(plot),
            "--quiet",
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert set(data) == {"scenario", "policies"}
    assert set(data["policies"]) == {"warmserve", "reactive-fast"}
    assert data["scenario"]["workload"]["replay_s"] == 720
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "warmserve" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "--policies", "nope"],
        ["simulate", "--rps", "-3"],
        ["simulate", "--window-s", "0"],
        ["simulate", "--share-contention", "1.5"],
    ],
)
def test_cli_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2


def test_cli_reports_invalid_workload_without_traceback(capsys):
    assert main(["simulate", "--alpha", "-1", "--quiet"]) == 2
    assert "alpha" in capsys.readouterr().err


def _gpu_share_run(scenario, workload, requests, contention=0.0):
    """gpu-share on hand-made requests: (arrival s, model, prompt tokens, output tokens)."""
    arrival, model, tokens_in, tokens_out = (np.array(column) for column in zip(*requests, strict=True))
    custom = dataclasses.replace(
        workload, arrival_s=arrival.astype(float), model_idx=model, input_tokens=tokens_in, output_tokens=tokens_out
    )
    simulation = Simulation(scenario, custom, "gpu-share", costs=CostModel(share_contention=contention))
    return simulation, simulation.run()


def test_co_located_prefills_queue_on_the_gpus_they_share(scenario, workload):
    # The tiled mesh packs the 70B (model 3) over GPUs 0-3 with the 7Bs (models 0, 1) on GPUs 2 and 3.
    prefill = [scenario.models[m].prefill_time(1024) for m in range(4)]
    _, shared = _gpu_share_run(scenario, workload, [(10.0, 3, 1024, 4), (10.0, 0, 1024, 4)])
    assert shared.ttft[1] == pytest.approx(prefill[3] + prefill[0])  # the 7B waits for the 70B's prefill
    _, apart = _gpu_share_run(scenario, workload, [(10.0, 0, 1024, 4), (10.0, 1, 1024, 4)])
    assert apart.ttft.tolist() == pytest.approx([prefill[0], prefill[1]])  # different GPUs: no wait


def test_co_located_decoding_slows_prefill_by_the_contention(scenario, workload):
    requests = [(10.0, 3, 16, 1000), (11.0, 0, 1024, 4)]  # the 70B is decoding when the 7B prompt arrives
    prefill = scenario.models[0].prefill_time(1024)
    assert _gpu_share_run(scenario, workload, requests, 0.0)[1].ttft[1] == pytest.approx(prefill)
    assert _gpu_share_run(scenario, workload, requests, 1.0)[1].ttft[1] == pytest.approx(2 * prefill)


def test_co_located_decoding_shares_memory_bandwidth_by_weight_bytes(scenario, workload):
    simulation, _ = _gpu_share_run(scenario, workload, [(10.0, 0, 16, 4)])
    engines = {e.model: e for e in simulation._engines.values() if e.gpus[0][0] == 0 and e.gpus[0][1] < 4}
    small, large = engines[0], engines[3]
    small_bytes, large_bytes = scenario.models[0].shard_bytes, scenario.models[3].shard_bytes
    assert simulation._decode_slowdown(small) == 1.0  # nobody else busy
    large.in_flight = 1
    assert simulation._decode_slowdown(small) == pytest.approx((small_bytes + large_bytes) / small_bytes)
    assert simulation._decode_slowdown(large) == 1.0  # the 7B is idle
    small.in_flight = 1  # the 70B's slowest GPU is the one it shares with the 7B
    assert simulation._decode_slowdown(large) == pytest.approx((small_bytes + large_bytes) / large_bytes)


def test_sensitivity_sweeps_one_cost_and_shows_the_ratio(scenario):
    sweep = Sweep(
        "contention",
        (("share contention", "share_contention", 1.0),),
        tuple({"share_contention": c} for c in (0.0, 1.0)),
        ("dedicated", "gpu-share"),
    )
    short = scenario.with_workload(replay_s=300)
    rows = sensitivity(short, sweep)
    assert [row["costs"] for row in rows] == list(sweep.points)
    assert rows[0]["dedicated"] == rows[1]["dedicated"]  # the contention only touches co-located engines
    assert rows[1]["gpu-share"]["ttft_p99_s"] > rows[0]["gpu-share"]["ttft_p99_s"]
    table = format_sensitivity(rows, sweep).splitlines()
    assert table[0].startswith("share contention") and len(table) == 4
    ratio = rows[1]["gpu-share"]["ttft_p99_s"] / rows[1]["dedicated"]["ttft_p99_s"]
    assert table[3].split()[3] == f"{ratio:.1f}×"
