"""Forecasters on the real (bundled) traces, and a smoke run of bench/forecast.py."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from warmserve.core import forecast as fc
from warmserve.workload.bundle import load_bundle

BENCH = Path(__file__).resolve().parents[2] / "bench" / "forecast.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("warmserve_bench_forecast", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def azure(bench: ModuleType):
    data = load_bundle()
    return bench.azure_series(data, bench.mean_service_s(data.tokens("code")))


def test_mean_service_time_of_the_7b_latency_model(bench: ModuleType) -> None:
    tokens = np.array([[100, 1], [100, 10]])
    assert bench.mean_service_s(tokens) == pytest.approx(0.035 + 0.015 * (3 + 10) / 2)


def test_smooth_csp_defaults_beat_csp_defaults_on_held_out_days(bench: ModuleType, azure) -> None:
    for target in ("avg", "peak"):
        values = getattr(azure, target)
        ours = bench.score(fc.SmoothedCorrectiveSeasonal(), values, azure.period, azure.test)
        csp = bench.score(fc.CorrectiveSeasonal(), values, azure.period, azure.test)
        assert ours > csp
        assert csp > bench.score(fc.SeasonalNaive(), values, azure.period, azure.test)


def test_servegen_validity_mask_follows_the_readme(bench: ModuleType) -> None:
    rate = load_bundle().servegen_aggregate["m-mid"]
    masked = bench.mask_invalid_servegen(rate)
    assert np.isnan(rate).sum() == 84
    gaps = np.isnan(rate)
    near_zero = ~gaps & (rate < 0.05 * np.nanmedian(rate))
    assert near_zero.sum() == 18  # README: 18 near-zero windows in m-mid
    adjacent = np.zeros_like(gaps)
    adjacent[1:] |= gaps[:-1]
    adjacent[:-1] |= gaps[1:]
    assert np.array_equal(np.isnan(masked), gaps | near_zero | adjacent)


def test_bench_writes_the_documented_json(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "forecast.json"
    assert bench.main(["--json", str(out)]) == 0
    result = json.loads(out.read_text())
    expected_series = {"azure2024_code", "servegen_m_large", "servegen_m_mid", "servegen_m_small"}
    assert set(result["series"]) == expected_series
    for per_kind in result["series"].values():
        assert set(per_kind) == set(fc.FORECASTER_KINDS)
        for acc in per_kind.values():
            assert 0.0 < acc["avg_acc"] <= 1.0 and 0.0 < acc["peak_acc"] <= 1.0
    azure = result["series"]["azure2024_code"]
    assert result["best_peak_acc_azure2024_code"] == max(v["peak_acc"] for v in azure.values())
    # the documented library defaults are the ones the fit days select
    chosen = result["defaults_from_fit_days"]
    assert chosen["csp"]["params"] == {"days": fc.CSP_DEFAULT_DAYS, "corrections": fc.CSP_DEFAULT_CORRECTIONS}
    assert chosen["smooth-csp"]["params"] == {
        "days": fc.SMOOTH_DEFAULT_DAYS,
        "corrections": fc.SMOOTH_DEFAULT_CORRECTIONS,
        "decay": fc.SMOOTH_DEFAULT_DECAY,
        "halfwidth": fc.SMOOTH_DEFAULT_HALFWIDTH,
    }
