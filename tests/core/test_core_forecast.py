"""Forecasters: CSP on hand-computed examples, masking, weighting direction, non-negativity, registry."""

from __future__ import annotations

import numpy as np
import pytest

from warmserve.core import forecast as fc

NAN = float("nan")
# period 3; day 0 = 1 2 3, day 1 = 2 4 6, day 2 = 3 6 (window 8 is the one predicted)
TINY = np.array([1.0, 2.0, 3.0, 2.0, 4.0, 6.0, 3.0, 6.0])


def test_csp_hand_example_exact() -> None:
    # P[8] = (L5 + L2)/2 = 4.5; errors: lag1 L7 - (L4+L1)/2 = 6 - 3 = 3, lag2 L6 - (L3+L0)/2 = 1.5
    # Δ = (1·3 + ½·1.5) / (1 + ½) = 2.5  ->  7.0
    csp = fc.CorrectiveSeasonal(days=2, corrections=2)
    assert csp.predict(TINY, 8, 3) == pytest.approx(7.0)


def test_csp_without_corrections_is_the_seasonal_mean() -> None:
    assert fc.CorrectiveSeasonal(days=2, corrections=0).predict(TINY, 8, 3) == pytest.approx(4.5)
    assert fc.CorrectiveSeasonal(days=1, corrections=0).predict(TINY, 8, 3) == pytest.approx(6.0)


def test_csp_newest_error_weighs_most() -> None:
    # constant seasonal history 10; the newest error is +6, the one before 0
    history = np.array([10.0] * 6 + [10.0, 16.0])
    csp = fc.CorrectiveSeasonal(days=2, corrections=2)
    # newest-first weights (1, ½): Δ = 6/1.5 = 4; the reversed weighting would give 2
    assert csp.predict(history, 8, 3) == pytest.approx(14.0)
    swapped = np.array([10.0] * 6 + [16.0, 10.0])
    assert csp.predict(swapped, 8, 3) == pytest.approx(12.0)


def test_csp_skips_masked_load_in_corrections() -> None:
    history = TINY.copy()
    history[7] = NAN  # lag 1 masked: only lag 2's error 1.5 remains
    assert fc.CorrectiveSeasonal(days=2, corrections=2).predict(history, 8, 3) == pytest.approx(6.0)


def test_csp_skips_masked_days_in_the_seasonal_term() -> None:
    history = TINY.copy()
    history[5] = NAN  # yesterday's window masked: P[8] = L2 = 3
    assert fc.CorrectiveSeasonal(days=2, corrections=0).predict(history, 8, 3) == pytest.approx(3.0)


def test_csp_uses_only_the_past() -> None:
    future_changed = np.concatenate((TINY, [1000.0, -5.0]))
    csp = fc.CorrectiveSeasonal(days=2, corrections=2)
    assert csp.predict(future_changed, 8, 3) == csp.predict(TINY, 8, 3)


def test_csp_is_never_negative() -> None:
    history = np.array([10.0, 10.0, 10.0, 10.0, 0.0, 0.0])  # P[6] = 0, both errors -10 -> raw -10
    csp = fc.CorrectiveSeasonal(days=1, corrections=2)
    assert csp.predict(history, 6, 2) == 0.0


def test_csp_first_day_falls_back_to_last_value() -> None:
    assert fc.CorrectiveSeasonal().predict(np.array([3.0, 5.0, NAN]), 3, 288) == 5.0
    assert fc.CorrectiveSeasonal().predict(np.array([]), 0, 288) == 0.0


def test_csp_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        fc.CorrectiveSeasonal(days=0)
    with pytest.raises(ValueError):
        fc.CorrectiveSeasonal(corrections=-1)


def test_last_value_skips_masked() -> None:
    assert fc.LastValue().predict(np.array([1.0, 4.0, NAN, NAN]), 4, 3) == 4.0


def test_seasonal_naive_is_yesterday() -> None:
    assert fc.SeasonalNaive().predict(TINY, 8, 3) == 6.0
    history = TINY.copy()
    history[5] = NAN
    assert fc.SeasonalNaive().predict(history, 8, 3) == 6.0  # falls back to the last value L7


def test_smooth_csp_hand_example_exact() -> None:
    # period 4, halfwidth 1, days 1: P[7] = mean(L2, L3, L4) = 3, P[6] = mean(L1, L2, L3) = 3,
    # ratio = L6 / P[6] = 2 -> 6.0
    history = np.array([1.0, 2.0, 3.0, 4.0, 2.0, 4.0, 6.0])
    f = fc.SmoothedCorrectiveSeasonal(days=1, corrections=1, decay=0.5, halfwidth=1)
    assert f.predict(history, 7, 4) == pytest.approx(6.0)


def test_smooth_csp_ratio_is_clipped() -> None:
    history = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 100.0])
    f = fc.SmoothedCorrectiveSeasonal(days=1, corrections=1, decay=0.5, halfwidth=0)
    assert f.predict(history, 6, 3) == pytest.approx(4.0)  # ratio 100 clipped to 4


def test_smooth_csp_clamps_halfwidth_to_the_period() -> None:
    f = fc.SmoothedCorrectiveSeasonal(halfwidth=8)
    assert f._halfwidth(3) == 1
    assert f._halfwidth(288) == 8
    assert f.predict(TINY, 8, 3) >= 0.0


@pytest.mark.parametrize("kind", fc.FORECASTER_KINDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_predict_series_equals_per_window_predict(kind: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    series = rng.gamma(2.0, 5.0, size=240)
    series[rng.random(240) < 0.15] = NAN
    f = fc.make_forecaster(kind)
    batch = f.predict_series(series, 24, start=5)
    single = np.array([f.predict(series, t, 24) for t in range(5, 240)])
    assert np.allclose(batch, single, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", fc.FORECASTER_KINDS)
def test_forecasts_are_finite_and_non_negative(kind: str) -> None:
    rng = np.random.default_rng(3)
    series = np.maximum(0.0, np.sin(np.arange(300) / 5) * 10 + rng.normal(0, 4, 300))
    series[rng.random(300) < 0.2] = NAN
    predictions = fc.walk_forward(fc.make_forecaster(kind), series, 30)
    assert predictions.shape == (300,)
    assert np.isfinite(predictions).all()
    assert (predictions >= 0).all()


@pytest.mark.parametrize("kind", fc.FORECASTER_KINDS)
def test_forecasters_do_not_mutate_history_and_can_predict_past_the_end(kind: str) -> None:
    history = TINY.copy()
    history.flags.writeable = False
    f = fc.make_forecaster(kind)
    assert isinstance(f, fc.Forecaster)
    assert f.name == kind
    assert np.isfinite(f.predict(history, 8, 3))
    assert np.isfinite(f.predict(history, 11, 3))  # a window later than the next one


def test_registry() -> None:
    assert set(fc.FORECASTER_KINDS) == {"csp", "last", "seasonal-naive", "smooth-csp"}
    assert fc.make_forecaster("csp", days=2, corrections=5) == fc.CorrectiveSeasonal(2, 5)
    with pytest.raises(ValueError, match="unknown forecaster"):
        fc.make_forecaster("prophet")


def test_accuracy_hand_example_skips_masked_and_zero() -> None:
    predicted = np.array([1.0, 2.0, 5.0, 7.0])
    actual = np.array([2.0, 2.0, NAN, 0.0])
    assert fc.accuracy(predicted, actual) == pytest.approx(0.75)
    assert np.isnan(fc.accuracy(np.array([1.0]), np.array([NAN])))
