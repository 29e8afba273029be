"""Offered concurrency (Little's law sliding sum) and per-window avg/peak, on hand examples."""

from __future__ import annotations

import numpy as np
import pytest

from warmserve.core.load import offered_concurrency, service_kernel, window_load


@pytest.mark.parametrize(
    ("service_s", "kernel"),
    [(3.0, [1, 1, 1]), (2.5, [1, 1, 0.5]), (0.4, [0.4]), (1.0, [1])],
)
def test_service_kernel(service_s: float, kernel: list[float]) -> None:
    assert np.allclose(service_kernel(service_s), kernel)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_service_kernel_rejects_nonpositive(bad: float) -> None:
    with pytest.raises(ValueError):
        service_kernel(bad)


def test_concurrency_whole_seconds_hand_example() -> None:
    # 2 requests at t=0 busy for 2 s, 4 requests at t=2 busy for 2 s
    assert offered_concurrency(np.array([2, 0, 4, 0, 0]), 2.0).tolist() == [2, 2, 4, 4, 0]


def test_concurrency_fractional_service_hand_example() -> None:
    # S = 1.5: a second's arrivals count fully in their own second and half in the next one
    assert offered_concurrency(np.array([2, 0, 4, 0, 0]), 1.5).tolist() == [2, 1, 4, 2, 0]


def test_concurrency_below_one_second_scales_the_rate() -> None:
    rate = np.array([10.0, 20.0, 0.0])
    assert np.allclose(offered_concurrency(rate, 0.45), 0.45 * rate)


def test_littles_law_mean_concurrency_is_rate_times_service() -> None:
    arrivals = np.random.default_rng(0).poisson(7.0, size=10_000).astype(float)
    arrivals[-10:] = 0  # nothing still in flight at the end
    conc = offered_concurrency(arrivals, 3.7)
    assert conc.sum() == pytest.approx(3.7 * arrivals.sum())


def test_nan_propagates_over_the_service_span() -> None:
    conc = offered_concurrency(np.array([1.0, np.nan, 1.0, 1.0, 1.0]), 2.0)
    assert np.isnan(conc).tolist() == [False, True, True, False, False]
    assert conc[3] == 2.0


def test_two_dimensional_input_is_per_row() -> None:
    rates = np.array([[1, 0, 0], [0, 3, 0]])
    assert offered_concurrency(rates, 2.0).tolist() == [[1, 1, 0], [0, 3, 3]]


def test_window_load_avg_and_peak_hand_example() -> None:
    avg, peak = window_load(np.arange(12, dtype=float), window_s=5)
    assert avg.tolist() == [2.0, 7.0]  # the trailing partial window (10, 11) is dropped
    assert peak.tolist() == [4.0, 9.0]


def test_window_load_masks_windows_with_missing_seconds() -> None:
    conc = np.array([1.0, 2.0, np.nan, 4.0, 5.0, 6.0])
    avg, peak = window_load(conc, window_s=3)
    assert np.isnan(avg[0]) and np.isnan(peak[0])
    assert avg[1] == 5.0 and peak[1] == 6.0


def test_window_load_rejects_bad_window() -> None:
    with pytest.raises(ValueError):
        window_load(np.ones(10), window_s=0)
