"""The benchmarks run end to end on tiny sizes and write the JSON keys the README quotes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run(script: str, *args: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{script}.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--json", str(out)], timeout=300, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


def test_placement_bench(tmp_path):
    data = run(
        "placement.py",
        "--gpus",
        "64",
        "--models",
        "20",
        "--engine-share",
        "0.9",
        "--rounds",
        "5",
        "--warmup",
        "4",
        "--cold-repeats",
        "1",
        tmp_path=tmp_path,
    )
    assert data["p50_ms"] > 0 and data["p99_ms"] >= data["p50_ms"]


def test_scale_bench_sweeps_fits_and_skips_what_does_not_fit(tmp_path):
    data = run(
        "scale.py",
        *("--gpus", "64,128", "--models", "8,60", "--rounds", "3", "--warmup", "2"),
        *("--skip-operator", "--skip-sim"),
        tmp_path=tmp_path,
    )
    assert set(data["placement"]) == {"64x8", "64x60", "128x8", "128x60"}
    assert "skipped" in data["placement"]["64x60"]  # 60 models cannot each get an engine on half of 64 GPUs
    row = data["placement"]["128x8"]
    assert row["p99_ms"] >= row["p50_ms"] > 0 and row["warm_replicas"] + row["engines"] > 0
    assert set(data["placement_cold_ms"]) == {"64", "128"}
    assert 0 < data["placement_exponent_gpus"] < 5 and 0 < data["placement_exponent_state"] < 5


def test_operator_loop_bench(tmp_path):
    data = run(
        "operator_loop.py", "--workers", "4", "--models", "8", "--rounds", "4", "--warmup", "2", tmp_path=tmp_path
    )
    assert any("p99" in key for key in data)


@pytest.mark.parametrize("policy", ["warmserve", "autoscale"])
def test_max_rps_bench(tmp_path, policy):
    data = run("max_rps.py", "--policies", policy, "--grid", "5", tmp_path=tmp_path)
    row = data["policies"][policy]
    assert row["probes"][0][0] == 5.0 and row["max_rps"] in (0.0, 5.0)
    assert (row["max_rps"] == 5.0) == (row["probes"][0][1] <= data["slo_p99_s"])


def test_proactive_bench_counts_lent_replicas(tmp_path):
    data = run("proactive.py", "--settings", "paper,pressure", tmp_path=tmp_path)
    assert set(data) == {"paper", "pressure"}
    for setting in data.values():
        assert set(setting) == {"warmserve", "warmserve-noproactive"}
        assert setting["warmserve-noproactive"]["lent_kv_replicas"] == 0
        assert setting["warmserve-noproactive"]["lent_kv_promotions"] == 0
    pressure = data["pressure"]["warmserve"]
    assert 0 < pressure["lent_kv_promotions"] <= pressure["lent_kv_replicas"]
    assert pressure["engine_starts"]["hit"] > data["pressure"]["warmserve-noproactive"]["engine_starts"]["hit"]


@pytest.mark.vllm  # two real vLLM servers
def test_colocation_bench_measures_a_prefill_beside_a_decoding_engine(tmp_path):
    args = ("--repeats", "2", "--prompt-tokens", "64", "--neighbour-tokens", "32")
    data = run("colocation.py", *args, tmp_path=tmp_path)
    assert data["prefill_alone_s"] > 0 and data["prefill_with_neighbour_s"] > 0
    assert len(data["samples_alone_s"]) == len(data["samples_with_neighbour_s"]) == 2
    assert data["neighbour_generations_completed"] > 0  # B really decoded while A's prefills were timed
    assert data["share_contention"] == pytest.approx(data["prefill_with_neighbour_s"] / data["prefill_alone_s"] - 1)
