"""bench/calibrate.py on a small synthetic bench/e2e.py report (tests/data/calibrate/e2e-quick.json: the settings
of `e2e.py --quick`, made-up measurements): the scenario mirrors the run and the table has its shape."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from warmserve.controller.spec import parse_pool_spec

BENCH = Path(__file__).resolve().parents[2] / "bench"
FIXTURE = Path(__file__).resolve().parents[1] / "data" / "calibrate" / "e2e-quick.json"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # calibrate imports its sibling e2e as the scripts do
_spec = importlib.util.spec_from_file_location("bench_calibrate", BENCH / "calibrate.py")
assert _spec is not None and _spec.loader is not None
calibrate = importlib.util.module_from_spec(_spec)
sys.modules["bench_calibrate"] = calibrate  # dataclasses look their module up there
_spec.loader.exec_module(calibrate)

METRICS = ["TTFT p50 (s)", "TTFT p99 (s)", "engine starts: hit", "engine starts: loading", "engine starts: cold"]


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads(FIXTURE.read_text())


def run(e2e_json: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH / "calibrate.py"), "--e2e", str(e2e_json), "--json", str(tmp_path / "out.json")],
        timeout=300,
        capture_output=True,
        text=True,
    )


def test_table_mirrors_the_run_and_compares_every_metric(report, tmp_path):
    done = run(FIXTURE, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads((tmp_path / "out.json").read_text())

    sc = out["scenario"]
    assert sc["requests"] == report["replay"]["requests"]
    assert {n: m["requests"] for n, m in sc["models"].items()} == report["replay"]["requests_per_model"]
    assert {n: m["weight_bytes"] for n, m in sc["models"].items()} == {
        n: m["weight_bytes"] for n, m in report["models"].items()
    }
    s = report["settings"]
    assert sc["devices"] == s["devices"]
    assert sc["standby_engines"] == parse_pool_spec({}).worker.standby_engines  # e2e.py leaves the default
    assert all(m["max_batch"] == s["max_concurrency"] for m in sc["models"].values())
    assert sc["window_s"] == 300 // s["compress"] and sc["replay_s"] == s["span_s"] // s["compress"]
    assert sc["arena_bytes"] >= len(report["models"]) * max(m["weight_bytes"] for m in report["models"].values())
    assert all(n > 0 for n in sc["seeded_windows"].values())

    assert [(r["policy"], r["metric"]) for r in out["rows"]] == [
        (p, m) for p in ("warmserve", "reactive") for m in METRICS
    ]
    for r in out["rows"]:
        assert r["measured"] is not None and r["simulated"] is not None
        if r["measured"]:
            assert r["ratio"] == pytest.approx(r["simulated"] / r["measured"], abs=1e-3)
            assert r["over_25pct"] == (abs(r["simulated"] / r["measured"] - 1) > 0.25)
    sim = out["simulated"]
    rows = {(r["policy"], r["metric"]): r["simulated"] for r in out["rows"]}
    for policy in ("warmserve", "reactive"):
        assert sim[policy]["requests"] == report["replay"]["requests"]
        assert rows[(policy, "engine starts: cold")] == sim[policy]["engine_starts"]["cold"]
    assert rows[("reactive", "engine starts: hit")] == rows[("reactive", "engine starts: loading")] == 0
    assert len(out["per_model"]) == 2 * 2 * len(report["models"])
    assert "| warmserve (warmserve-noproactive) | TTFT p50 (s) |" in done.stdout

    starts = [e for p in report["policies"].values() for e in p["engine_starts_log"] if e["ready_s"] is not None]
    assert out["costs"]["promote_s"]["value"] == pytest.approx(
        statistics.median(e["ready_s"] for e in starts if e["standby"]), abs=1e-6
    )
    launch = statistics.median(e["ready_s"] for e in starts if not e["standby"])
    assert out["costs"]["prestarted_init_s"]["value"] == out["costs"]["engine_init_s"]["value"] == pytest.approx(launch)
    assert out["costs"]["promote_s"]["source"].startswith("bench/e2e.py, this run")
    assert out["costs"]["wake_s"]["source"] == calibrate.measured_costs("cpu-measured", {})[1]["wake_s"].source
    overhead = report["router_overhead"]
    assert out["service"]["prefill_s"] == pytest.approx(overhead["direct_ttft_ms"]["p50"] / 1e3)


def test_the_simulation_gets_the_requests_and_the_seeded_history(report):
    m, _ = calibrate.mirror(report)
    replay = m.replay
    np.testing.assert_array_equal(m.workload.arrival_s, replay.offsets)
    np.testing.assert_array_equal(m.workload.input_tokens, replay.prompt_words)
    np.testing.assert_array_equal(m.workload.output_tokens, replay.max_tokens)
    sim = calibrate.MirroredSimulation(m.scenario, m.workload, "warmserve-noproactive", seeded=m.history)
    period = 86400 // m.scenario.window_s
    for i, name in enumerate(replay.names):
        # the window one day before the replay's first: trace window replay_window - one trace day
        j = replay.replay_window - 86400 // 300
        assert sim.avg_hist[i][sim.first_window - period] == pytest.approx(replay.window_avg[i, j])
        assert sim.peak_hist[i][sim.first_window - period] == pytest.approx(replay.window_peak[i, j])
        assert np.isnan(sim.avg_hist[i][sim.first_window - period // 2])  # not seeded: masked, not zero
        assert m.history.windows(name) == np.isfinite(sim.avg_hist[i][: sim.first_window]).sum()


def test_refuses_a_report_whose_replay_it_cannot_rebuild(report, tmp_path):
    changed = json.loads(json.dumps(report))
    first = next(iter(changed["replay"]["requests_per_model"]))
    changed["replay"]["requests_per_model"][first] += 1
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps(changed))
    done = run(path, tmp_path)
    assert done.returncode != 0 and "not the run's" in done.stderr
