"""The paper's workload construction: determinism, popularity, rate, burstiness, history convention."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from warmserve.workload.build import (
    SERVEGEN_ORDER,
    Workload,
    WorkloadSpec,
    build_workload,
    popularity_shares,
    redraw_gaps_gamma,
)
from warmserve.workload.bundle import Bundle, load_bundle

DAY = 86_400


def _synthetic_bundle(per_second: int = 1) -> Bundle:
    """Flat traffic: every second of every day has ``per_second`` requests; fixed tokens."""
    tokens = np.array([[2000, 1], [500, 40], [10, 300]], dtype=np.int64)
    servegen = {m: np.full(2016, 100.0) for m in ("m-large", "m-mid", "m-small")}
    return Bundle(
        azure2024_code=np.full((7, DAY), per_second, dtype=np.int64),
        azure2023_tokens={"conv": tokens, "code": tokens},
        servegen_aggregate=servegen,
    )


@pytest.fixture(scope="module")
def default_workload() -> Workload:
    return build_workload(WorkloadSpec())


def test_popularity_shares_follow_power_law() -> None:
    shares = popularity_shares(4, 0.5)
    assert shares.sum() == pytest.approx(1.0)
    assert shares[0] / shares[3] == pytest.approx(4**0.5)
    assert np.allclose(popularity_shares(3, 0.0), 1 / 3)
    assert np.all(np.diff(popularity_shares(6, 2.0)) < 0)


def test_same_seed_gives_identical_arrays(default_workload: Workload) -> None:
    again = build_workload(WorkloadSpec())
    for field in ("arrival_s", "model_idx", "input_tokens", "output_tokens", "history_rate"):
        assert np.array_equal(getattr(again, field), getattr(default_workload, field))
    assert again.model_days == default_workload.model_days


def test_different_seed_gives_different_requests(default_workload: Workload) -> None:
    other = build_workload(WorkloadSpec(seed=1))
    n = min(other.arrival_s.size, default_workload.arrival_s.size)
    assert not np.array_equal(other.arrival_s[:n], default_workload.arrival_s[:n])
    assert not np.array_equal(other.input_tokens[:n], default_workload.input_tokens[:n])
    # the expected-rate history does not depend on the seed
    assert np.array_equal(other.history_rate, default_workload.history_rate)


def test_default_models_replay_mon_to_thu(default_workload: Workload) -> None:
    assert default_workload.model_days == (3, 4, 5, 6)
    assert default_workload.model_series == ("azure2024_code",) * 4


def test_total_rps_and_shares_within_tolerance(default_workload: Workload) -> None:
    spec = default_workload.spec
    n = default_workload.arrival_s.size
    assert n / spec.replay_s == pytest.approx(spec.rps, rel=0.02)
    observed = np.bincount(default_workload.model_idx, minlength=spec.n_models) / n
    assert np.allclose(observed, popularity_shares(spec.n_models, spec.alpha), atol=0.01)


def test_requests_sorted_in_span_with_capped_tokens(default_workload: Workload) -> None:
    w = default_workload
    assert np.all(np.diff(w.arrival_s) >= 0)
    assert w.arrival_s.min() >= 0 and w.arrival_s.max() < w.spec.replay_s
    assert w.model_idx.min() >= 0 and w.model_idx.max() < w.spec.n_models
    assert w.input_tokens.max() <= w.spec.max_input_tokens
    assert w.output_tokens.min() >= 3
    assert w.arrival_s.shape == w.model_idx.shape == w.input_tokens.shape == w.output_tokens.shape


def test_history_convention_is_the_models_own_scaled_past(default_workload: Workload) -> None:
    w = default_workload
    spec = w.spec
    counts = load_bundle().azure2024_code.reshape(-1)
    assert w.history_rate.shape == (spec.n_models, spec.history_days * DAY + spec.replay_s)
    assert w.history_offset_s == spec.history_days * DAY
    for i, day in enumerate(w.model_days):
        start = day * DAY + spec.replay_start_s - w.history_offset_s  # same time of day, 3 days earlier
        real = counts[start : start + w.history_rate.shape[1]].astype(float)
        scale = w.history_rate[i].sum() / real.sum()
        assert np.allclose(w.history_rate[i], scale * real)
        # the replay part of the history carries exactly this model's expected share of the total
        expected = spec.rps * spec.replay_s * w.shares[i]
        assert w.history_rate[i, w.history_offset_s :].sum() == pytest.approx(expected)


def test_arrivals_keep_the_real_per_second_shape(default_workload: Workload) -> None:
    w = default_workload
    per_minute = np.bincount((w.arrival_s // 60).astype(int), minlength=w.spec.replay_s // 60)
    expected = w.history_rate[:, w.history_offset_s :].sum(axis=0).reshape(-1, 60).sum(axis=1)
    assert np.corrcoef(per_minute, expected)[0, 1] > 0.9


def test_integer_scale_duplicates_every_request_exactly() -> None:
    # 1 req/s everywhere, one model, rps 3 -> k = 3: every second holds exactly 3 arrivals
    w = build_workload(WorkloadSpec(n_models=1, rps=3.0, replay_s=600, history_days=1), _synthetic_bundle())
    per_second = np.bincount(w.arrival_s.astype(int), minlength=600)
    assert np.all(per_second == 3)
    assert np.allclose(w.history_rate, 3.0)


def test_thinning_below_one_keeps_the_expected_count() -> None:
    w = build_workload(WorkloadSpec(n_models=2, rps=2.0, replay_s=3600, history_days=1), _synthetic_bundle(4))
    assert w.arrival_s.size / 3600 == pytest.approx(2.0, rel=0.03)
    for i in range(2):
        per_second = np.bincount(w.arrival_s[w.model_idx == i].astype(int), minlength=3600)
        assert per_second.max() <= 4  # thinning never creates more than the model's real 4 per second


def test_tokens_are_drawn_from_the_trace_and_capped() -> None:
    w = build_workload(
        WorkloadSpec(n_models=1, rps=5.0, replay_s=600, history_days=1, max_input_tokens=1024), _synthetic_bundle()
    )
    pairs = set(zip(w.input_tokens.tolist(), w.output_tokens.tolist(), strict=True))
    assert pairs == {(1024, 3), (500, 40), (10, 300)}


def test_cv_option_changes_burstiness_and_keeps_span(default_workload: Workload) -> None:
    bursty = build_workload(dataclasses.replace(default_workload.spec, cv=4.0))
    assert bursty.arrival_s.size == default_workload.arrival_s.size
    assert bursty.arrival_s[0] == pytest.approx(default_workload.arrival_s[0])
    assert bursty.arrival_s[-1] == pytest.approx(default_workload.arrival_s[-1])
    assert np.array_equal(bursty.model_idx, default_workload.model_idx)

    def gap_cv(times: np.ndarray) -> float:
        gaps = np.diff(times)
        return float(gaps.std() / gaps.mean())

    assert gap_cv(bursty.arrival_s) == pytest.approx(4.0, rel=0.15)
    assert gap_cv(default_workload.arrival_s) < 1.5


def test_redraw_gaps_gamma_preserves_count_order_and_ends() -> None:
    times = np.linspace(10.0, 20.0, 1001)
    out = redraw_gaps_gamma(np.random.default_rng(0), times, cv=0.5)
    assert out.shape == times.shape
    assert np.all(np.diff(out) >= 0)
    assert out[0] == pytest.approx(10.0) and out[-1] == pytest.approx(20.0)
    gaps = np.diff(out)
    assert gaps.std() / gaps.mean() == pytest.approx(0.5, rel=0.15)


def test_servegen_source_masks_gaps_in_history_only() -> None:
    spec = WorkloadSpec(source="servegen")
    w = build_workload(spec)
    assert w.model_series == (*SERVEGEN_ORDER, SERVEGEN_ORDER[0])
    assert w.model_days == (3, 3, 3, 4)
    mid = w.model_series.index("m-mid")
    assert np.isnan(w.history_rate[mid]).any()  # m-mid has a gap on day 3 15:00-16:50
    assert not np.isnan(w.history_rate[w.model_series.index("m-large")]).any()
    assert np.isfinite(w.arrival_s).all()
    assert w.arrival_s.size / spec.replay_s == pytest.approx(spec.rps, rel=0.03)
    observed = np.bincount(w.model_idx, minlength=spec.n_models) / w.arrival_s.size
    assert np.allclose(observed, w.shares, atol=0.01)
    # the 10-minute rates are piecewise constant in the per-second history
    row = w.history_rate[w.model_series.index("m-large")]
    assert np.all(row[:600] == row[0])


def test_more_models_than_days_wrap_the_week() -> None:
    w = build_workload(WorkloadSpec(n_models=5, replay_s=600))
    assert w.model_days == (3, 4, 5, 6, 0)


@pytest.mark.parametrize(
    "bad",
    [
        dict(n_models=0),
        dict(rps=0.0),
        dict(alpha=-1.0),
        dict(cv=0.0),
        dict(source="burstgpt"),
        dict(replay_start_s=DAY),
        dict(replay_s=0),
        dict(history_days=-1),
        dict(token_kind="chat"),
        dict(history_days=7),
    ],
)
def test_invalid_specs_are_rejected(bad: dict) -> None:
    with pytest.raises(ValueError):
        build_workload(WorkloadSpec(**bad))
