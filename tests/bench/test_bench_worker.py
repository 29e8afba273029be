"""bench/worker.py: the acceptance verdict (pure), and ``--quick`` end to end with real vLLM engines."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
# bench/worker.py under its own name (imports nothing of vLLM at module level)
_spec = importlib.util.spec_from_file_location("bench_worker", BENCH / "worker.py")
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_worker"] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)

GOOD = {
    "promote_warm_s": 0.4,
    "speedup_vs_cold": 60.0,
    "greedy_identical": True,
    "greedy_identical_shell_warm": True,
    "prewarm_vs_read": 1.02,
    "evict_small_ms": 0.2,
    "evict_large_ms": 0.25,
    "evict_large_vs_small": 1.25,
}


def verdict(results: dict) -> dict[str, bool]:
    return {name: ok for name, ok, _ in bench.acceptance(results)}


def test_acceptance_passes_the_issue_targets():
    assert verdict(GOOD) == dict.fromkeys(
        ("warm_first_token", "warm_vs_cold", "greedy_identical", "prewarm_vs_read", "evict_flat"), True
    )


@pytest.mark.parametrize(
    ("change", "failed"),
    [
        ({"promote_warm_s": 1.5}, "warm_first_token"),
        ({"speedup_vs_cold": 12.0}, "warm_vs_cold"),
        ({"greedy_identical_shell_warm": False}, "greedy_identical"),
        ({"prewarm_vs_read": 0.8}, "prewarm_vs_read"),
        ({"evict_large_ms": 40.0, "evict_large_vs_small": 200.0}, "evict_flat"),
    ],
)
def test_acceptance_fails_each_missed_target(change, failed):
    result = verdict({**GOOD, **change})
    assert [name for name, ok in result.items() if not ok] == [failed]


def test_sub_millisecond_eviction_jitter_is_still_flat():
    assert verdict({**GOOD, "evict_small_ms": 0.05, "evict_large_ms": 0.3, "evict_large_vs_small": 6.0})["evict_flat"]


def test_acceptance_covers_only_what_was_measured():
    assert set(verdict({"prewarm_vs_read": 1.0, "evict_large_vs_small": 1.0, "evict_large_ms": 1, "evict_small_ms": 1}))
    assert verdict({}) == {}


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_quick_run_reports_every_variant(tmp_path):
    out = tmp_path / "worker.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "worker.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    data = json.loads(out.read_text())
    for key in bench.KEYS.values():
        assert data[key] > 0 and data[key + "_max"] >= data[key]
        assert len(data["promote_rounds_s"][next(v for v, k in bench.KEYS.items() if k == key)]) == 1
    assert data["speedup_vs_cold"] == pytest.approx(data["promote_cold_s"] / data["promote_warm_s"])
    assert data["greedy_identical"] is True and data["greedy_identical_shell_warm"] is True
    assert data["bind_report"]["mapped_params"] > 0 and data["bind_report"]["copied_params"] == 0
    assert data["standby_memory"]["rss_anon_bytes"] > 0
    assert set(data["acceptance"]) >= {"warm_first_token", "warm_vs_cold", "prewarm_vs_read", "evict_flat"}
    assert "PASS warm_first_token" in done.stdout or "FAIL warm_first_token" in done.stdout
