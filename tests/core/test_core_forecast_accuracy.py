"""The two accuracy measures: 1 − mean relative error (the paper's) and the bounded 1 − WAPE."""

from __future__ import annotations

import math

import numpy as np
import pytest

from warmserve.core.forecast import accuracy, wape_accuracy


def test_perfect_forecast_scores_one_on_both():
    actual = np.array([1.0, 2.0, 3.0])
    assert accuracy(actual, actual) == 1.0
    assert wape_accuracy(actual, actual) == 1.0


def test_wape_weighs_errors_by_volume():
    predicted, actual = np.array([2.0, 10.0]), np.array([1.0, 10.0])
    assert wape_accuracy(predicted, actual) == pytest.approx(1 - 1 / 11)
    assert accuracy(predicted, actual) == pytest.approx(1 - (1.0 + 0.0) / 2)


def test_sparse_series_sinks_mean_relative_error_but_not_wape():
    # One nearly empty window predicted at the level of the others: mean relative error explodes.
    actual = np.array([0.01, 10.0, 10.0, 10.0])
    predicted = np.array([10.0, 10.0, 10.0, 10.0])
    assert accuracy(predicted, actual) < -200
    assert wape_accuracy(predicted, actual) == pytest.approx(1 - 9.99 / 30.01)
    assert wape_accuracy(predicted, actual) > 0.6


def test_wape_skips_invalid_windows_and_has_no_value_without_volume():
    actual = np.array([np.nan, 4.0, 0.0])
    predicted = np.array([1.0, 3.0, np.nan])
    assert wape_accuracy(predicted, actual) == pytest.approx(1 - 1 / 4)
    assert math.isnan(wape_accuracy(np.array([1.0]), np.array([0.0])))
    assert math.isnan(wape_accuracy(np.array([np.nan]), np.array([np.nan])))
