"""Per-window load forecasters (pure: no I/O, no clock, no hidden state).

A forecaster predicts the load of window ``t`` of a per-window series (average or peak in-flight
requests, see :mod:`warmserve.core.load`) from ``history[:t]`` only. ``period`` is the number of windows
per day (288 at 5 min). NaN entries are masked data (collection gaps) and are skipped, never read as
zero. Predictions are finite and ≥ 0. Forecasters are stateless, so the operator and the simulator can
call ``predict`` once per model per window with the full history, and replaying a history always gives
the same answers.

Kinds (:func:`make_forecaster`):

* ``csp``: the paper's Corrective Seasonal Predictor (docs/design.md, Decisions).
* ``last``: last observed value (persistence).
* ``seasonal-naive``: same window one day earlier.
* ``smooth-csp``: ours. CSP with a seasonal term averaged over neighbouring windows too (denoised)
  and a multiplicative instead of additive correction. Kept because it beats CSP on the held-out
  days of every series, for avg and peak (bench/forecast.py; e.g. Azure 2024 code Wed+Thu, library
  defaults: avg 94.24 % vs 94.02 %, peak 91.85 % vs 91.54 %).

Every class also offers ``predict_series(series, period, start)``: the same predictions for all
``t >= start`` at once, vectorised for benchmarks; tests check it equals calling ``predict`` per window.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

# Defaults chosen by walk-forward evaluation on the Azure 2024 code *training* days only (Mon, Tue;
# Wed and Thu are held out): see bench/forecast.py and the module docstring of that script.
CSP_DEFAULT_DAYS = 4  # = every earlier day the fit days have; D >= 4 cannot be told apart on them
CSP_DEFAULT_CORRECTIONS = 20  # 10 (the original) scores within 0.01 pp: weights 2^-lag vanish fast
SMOOTH_DEFAULT_DAYS = 5
SMOOTH_DEFAULT_CORRECTIONS = 20
SMOOTH_DEFAULT_DECAY = 0.5
SMOOTH_DEFAULT_HALFWIDTH = 8  # ±8 windows = ±40 min at 5-min windows
_RATIO_MIN, _RATIO_MAX = 0.25, 4.0


@runtime_checkable
class Forecaster(Protocol):
    """Predicts ``history[t]`` from ``history[:t]``; NaN = masked; result ≥ 0; fast."""

    @property
    def name(self) -> str: ...  # read-only: the forecasters are frozen dataclasses

    def predict(self, history: np.ndarray, t: int, period: int) -> float: ...


def _check(history: np.ndarray, t: int, period: int) -> np.ndarray:
    if period <= 0:
        raise ValueError("period must be positive")
    if t < 0:
        raise ValueError("t must be >= 0")
    return np.asarray(history, dtype=np.float64)


def _last_valid(history: np.ndarray, t: int) -> float:
    """Most recent non-NaN value before ``t``, or 0.0 when there is none (nothing known yet)."""
    past = history[: min(t, history.shape[0])]
    valid = np.flatnonzero(~np.isnan(past))
    return float(past[valid[-1]]) if valid.size else 0.0


def _seasonal_mean(history: np.ndarray, j: int, period: int, days: int) -> float:
    """Mean of the same window on the ``days`` previous days (masked/unavailable days skipped)."""
    total, count = 0.0, 0
    for d in range(1, days + 1):
        k = j - d * period
        if k < 0:
            break
        if k >= history.shape[0]:
            continue
        value = history[k]
        if value == value:  # not NaN
            total += value
            count += 1
    return total / count if count else float("nan")


def _seasonal_mean_series(series: np.ndarray, period: int, days: int) -> np.ndarray:
    """Vectorised :func:`_seasonal_mean` for every index of ``series``."""
    n = series.shape[0]
    total = np.zeros(n)
    count = np.zeros(n)
    for d in range(1, days + 1):
        shift = d * period
        if shift >= n:
            break
        past = series[: n - shift]
        valid = ~np.isnan(past)
        total[shift:] += np.where(valid, past, 0.0)
        count[shift:] += valid
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _last_valid_series(series: np.ndarray) -> np.ndarray:
    """For each t, the last non-NaN value strictly before t (0.0 when none)."""
    n = series.shape[0]
    out = np.zeros(n)
    idx = np.where(~np.isnan(series), np.arange(n), -1)
    last = np.maximum.accumulate(idx)  # last valid index at or before i
    prev = np.concatenate(([-1], last[:-1]))  # strictly before t
    has = prev >= 0
    out[has] = series[prev[has]]
    return out


@dataclass(frozen=True)
class LastValue:
    """Persistence: the last observed (non-masked) window."""

    name: str = "last"

    def predict(self, history: np.ndarray, t: int, period: int) -> float:
        history = _check(history, t, period)
        return max(0.0, _last_valid(history, t))

    def predict_series(self, series: np.ndarray, period: int, start: int = 0) -> np.ndarray:
        series = np.asarray(series, dtype=np.float64)
        return np.maximum(_last_valid_series(series)[start:], 0.0)


@dataclass(frozen=True)
class SeasonalNaive:
    """Same window one day earlier; falls back to the last value when that window is masked/absent."""

    name: str = "seasonal-naive"

    def predict(self, history: np.ndarray, t: int, period: int) -> float:
        history = _check(history, t, period)[:t]
        seasonal = _seasonal_mean(history, t, period, 1)
        return max(0.0, seasonal if seasonal == seasonal else _last_valid(history, t))

    def predict_series(self, series: np.ndarray, period: int, start: int = 0) -> np.ndarray:
        series = np.asarray(series, dtype=np.float64)
        seasonal = _seasonal_mean_series(series, period, 1)
        out = np.where(np.isnan(seasonal), _last_valid_series(series), seasonal)
        return np.maximum(out[start:], 0.0)


@dataclass(frozen=True)
class CorrectiveSeasonal:
    """The paper's Corrective Seasonal Predictor (CSP), as the original code computes it (docs/design.md).

    For window ``t``:

    * seasonal term ``P[t]`` = mean of ``L[t - d·period]`` for d = 1..``days`` (masked or not-yet-existing
      days skipped, so the first days use the days they have, like the original's "all earlier days");
    * correction ``Δ[t]`` = Σ_lag w_lag·(L[t-lag] − P[t-lag]) / Σ_lag w_lag over lag = 1..``corrections``
      with ``w_lag = 2^-(lag-1)``: the newest error weighs 1, the one before ½, … (the original code's
      ``2^-δ``; the paper notes' ``2^(w-1)`` would favour old errors, the opposite of the stated intent).
      Lags whose load or seasonal term is masked are skipped (weights renormalised over the rest).
      The correction runs across midnight: "the last N errors" are the last N windows, whatever day;
    * prediction ``max(0, P[t] + Δ[t])``. With no seasonal term at all (first day), the last value.
    """

    days: int = CSP_DEFAULT_DAYS
    corrections: int = CSP_DEFAULT_CORRECTIONS
    name: str = "csp"

    def __post_init__(self) -> None:
        if self.days < 1 or self.corrections < 0:
            raise ValueError("CorrectiveSeasonal needs days >= 1 and corrections >= 0")

    def predict(self, history: np.ndarray, t: int, period: int) -> float:
        history = _check(history, t, period)[:t]  # causality; t may lie beyond the end
        seasonal = _seasonal_mean(history, t, period, self.days)
        if seasonal != seasonal:
            return max(0.0, _last_valid(history, t))
        num = den = 0.0
        for lag in range(1, self.corrections + 1):
            j = t - lag
            if j < 0:
                break
            if j >= history.shape[0]:
                continue
            load = history[j]
            past_seasonal = _seasonal_mean(history, j, period, self.days)
            if load != load or past_seasonal != past_seasonal:
                continue
            weight = 2.0 ** -(lag - 1)
            num += weight * (load - past_seasonal)
            den += weight
        correction = num / den if den > 0 else 0.0
        return max(0.0, seasonal + correction)

    def predict_series(self, series: np.ndarray, period: int, start: int = 0) -> np.ndarray:
        series = np.asarray(series, dtype=np.float64)
        n = series.shape[0]
        seasonal = _seasonal_mean_series(series, period, self.days)
        error = series - seasonal  # NaN where either is masked
        num = np.zeros(n)
        den = np.zeros(n)
        for lag in range(1, self.corrections + 1):
            if lag >= n + 1:
                break
            lagged = np.full(n, np.nan)
            lagged[lag:] = error[: n - lag]
            valid = ~np.isnan(lagged)
            weight = 2.0 ** -(lag - 1)
            num += np.where(valid, weight * lagged, 0.0)
            den += weight * valid
        correction = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
        out = np.where(np.isnan(seasonal), _last_valid_series(series), seasonal + correction)
        return np.maximum(out[start:], 0.0)


def _smoothed_seasonal_series(series: np.ndarray, period: int, days: int, halfwidth: int) -> np.ndarray:
    """Mean of ``series[j - d·period + o]`` (d = 1..days, |o| ≤ halfwidth, NaN skipped) for every j."""
    n = series.shape[0]
    total = np.zeros(n)
    count = np.zeros(n)
    filled = np.where(np.isnan(series), 0.0, series)
    valid = (~np.isnan(series)).astype(np.float64)
    for d in range(1, days + 1):
        for offset in range(-halfwidth, halfwidth + 1):
            shift = d * period - offset  # value at j comes from index j - shift
            if shift >= n:
                continue
            total[shift:] += filled[: n - shift]
            count[shift:] += valid[: n - shift]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


@dataclass(frozen=True)
class SmoothedCorrectiveSeasonal:
    """Our improvement on CSP: a denoised seasonal term and a multiplicative, slower correction.

    Why: a window's peak (and, less so, its average) is the smooth daily shape plus sampling noise.
    CSP copies the noise of single past windows into ``P`` (one window per past day); averaging the
    neighbouring windows of those days removes most of it. And CSP's additive correction is
    wrong-sized when the level shifts (weekend → weekday is 3× on Azure code): the same absolute
    offset is too big at night and too small at the peak, whereas a ratio scales the whole shape.

    * Seasonal term ``P[t]`` = mean of ``L[t - d·period + o]`` over d = 1..``days`` and
      o = −``halfwidth``..``halfwidth`` (neighbouring windows of the same days; masked ones skipped).
      ``halfwidth`` is clamped to ``(period−1)//2``, so every index is before ``t``.
    * Correction ratio = Σ w·L[t-lag] / Σ w·P[t-lag] over lag = 1..``corrections``, with
      ``w = decay^(lag-1)`` (newest weighted most; ``decay=0.5`` gives CSP's weights);
      masked lags skipped; clipped to [¼, 4] so one odd window cannot explode the forecast.
    * Prediction ``max(0, P[t]·ratio)``; with no seasonal term yet (first day), the last value.

    With ``halfwidth=0``, ``decay=0.5`` it is CSP with a multiplicative instead of additive correction.
    """

    days: int = SMOOTH_DEFAULT_DAYS
    corrections: int = SMOOTH_DEFAULT_CORRECTIONS
    decay: float = SMOOTH_DEFAULT_DECAY
    halfwidth: int = SMOOTH_DEFAULT_HALFWIDTH
    name: str = "smooth-csp"

    def __post_init__(self) -> None:
        if self.days < 1 or self.corrections < 0 or self.halfwidth < 0 or not 0.0 < self.decay <= 1.0:
            raise ValueError("SmoothedCorrectiveSeasonal needs days>=1, corrections>=0, halfwidth>=0, 0<decay<=1")

    def _halfwidth(self, period: int) -> int:
        """``halfwidth`` clamped to (period-1)//2 so day neighbourhoods never overlap or reach ``t``."""
        return min(self.halfwidth, (period - 1) // 2)

    def predict(self, history: np.ndarray, t: int, period: int) -> float:
        history = _check(history, t, period)[:t]  # causality; t may lie beyond the end
        halfwidth = self._halfwidth(period)
        # Seasonal terms of t, t-1, ..., t-corrections in one gather (row r = window t - r).
        targets = t - np.arange(self.corrections + 1)
        offsets = (
            np.arange(1, self.days + 1)[:, None] * period - np.arange(-halfwidth, halfwidth + 1)[None, :]
        ).reshape(-1)
        idx = targets[:, None] - offsets[None, :]
        inside = (idx >= 0) & (idx < history.shape[0])
        values = history[np.where(inside, idx, 0)] if history.size else np.zeros(idx.shape)
        ok = inside & ~np.isnan(values)
        count = ok.sum(axis=1)
        totals = np.where(ok, values, 0.0).sum(axis=1)
        seasonal = np.where(count > 0, totals / np.maximum(count, 1), np.nan)
        if np.isnan(seasonal[0]):
            return max(0.0, _last_valid(history, t))
        lags = np.arange(1, self.corrections + 1)
        js = t - lags
        in_range = (js >= 0) & (js < history.shape[0])
        load = np.full(lags.shape, np.nan)
        load[in_range] = history[js[in_range]]
        past = seasonal[1:]
        use = ~np.isnan(load) & ~np.isnan(past)
        weights = self.decay ** (lags - 1.0)
        num = float(np.sum(np.where(use, weights * load, 0.0)))
        den = float(np.sum(np.where(use, weights * past, 0.0)))
        ratio = min(_RATIO_MAX, max(_RATIO_MIN, num / den)) if den > 0 and num > 0 else 1.0
        return max(0.0, float(seasonal[0]) * ratio)

    def predict_series(self, series: np.ndarray, period: int, start: int = 0) -> np.ndarray:
        series = np.asarray(series, dtype=np.float64)
        n = series.shape[0]
        seasonal = _smoothed_seasonal_series(series, period, self.days, self._halfwidth(period))
        num = np.zeros(n)
        den = np.zeros(n)
        for lag in range(1, min(self.corrections, n) + 1):
            load = np.full(n, np.nan)
            past = np.full(n, np.nan)
            load[lag:] = series[: n - lag]
            past[lag:] = seasonal[: n - lag]
            ok = ~np.isnan(load) & ~np.isnan(past)
            weight = self.decay ** (lag - 1)
            num += np.where(ok, weight * load, 0.0)
            den += np.where(ok, weight * past, 0.0)
        use = (den > 0) & (num > 0)
        ratio = np.where(use, np.clip(num / np.where(use, den, 1.0), _RATIO_MIN, _RATIO_MAX), 1.0)
        out = np.where(np.isnan(seasonal), _last_valid_series(series), seasonal * ratio)
        return np.maximum(out[start:], 0.0)


# The constructors take different numeric fields (days, corrections, decay, halfwidth) and check them
# themselves, so a kind maps to a constructor of any arguments that returns a Forecaster.
_CONSTRUCTORS: dict[str, Callable[..., Forecaster]] = {
    "csp": CorrectiveSeasonal,
    "last": LastValue,
    "seasonal-naive": SeasonalNaive,
    "smooth-csp": SmoothedCorrectiveSeasonal,
}
FORECASTER_KINDS: tuple[str, ...] = tuple(_CONSTRUCTORS)


def make_forecaster(kind: str, **params: float) -> Forecaster:
    """Build a forecaster by kind; ``params`` are the class's fields (e.g. ``days``, ``corrections``)."""
    constructor = _CONSTRUCTORS.get(kind)
    if constructor is None:
        raise ValueError(f"unknown forecaster kind {kind!r}; expected one of {FORECASTER_KINDS}")
    return constructor(**params)


def walk_forward(forecaster: Forecaster, series: np.ndarray, period: int, start: int = 0) -> np.ndarray:
    """Predictions for ``series[start:]``, each made from the windows before it only."""
    series = np.asarray(series, dtype=np.float64)
    fast = getattr(forecaster, "predict_series", None)
    if fast is not None:
        return fast(series, period, start)
    return np.array([forecaster.predict(series, t, period) for t in range(start, series.shape[0])])


def accuracy(predicted: np.ndarray, actual: np.ndarray) -> float:
    """1 − mean relative error |p − a| / a over windows where ``actual`` is valid (not NaN, > 0)."""
    predicted = np.asarray(predicted, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    ok = ~np.isnan(actual) & (actual > 0) & ~np.isnan(predicted)
    if not ok.any():
        return float("nan")
    return float(1.0 - np.mean(np.abs(predicted[ok] - actual[ok]) / actual[ok]))


def wape_accuracy(predicted: np.ndarray, actual: np.ndarray) -> float:
    """1 − WAPE = 1 − Σ|p − a| / Σa over windows where both are valid (not NaN; ``actual`` ≥ 0).

    Bounded above by 1 like `accuracy`, but a window with a tiny actual cannot dominate it: on sparse series
    `accuracy` can fall far below 0 (−7,000 % seen), while 1 − WAPE weighs each window's error by volume.
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    ok = ~np.isnan(actual) & (actual >= 0) & ~np.isnan(predicted)
    total = float(actual[ok].sum()) if ok.any() else 0.0
    if total <= 0:
        return float("nan")
    return float(1.0 - np.abs(predicted[ok] - actual[ok]).sum() / total)
