"""The paper's multi-model workload, built from real traces and deterministic under a seed.

Construction (original-code-digest §5, with the choices below written down):

* **Which series drives which model.**
  - ``azure2024_code``: model ``i`` replays trace day ``(history_days + i) mod 7`` (0 = Fri … 6 = Thu), so
    with the defaults (3 history days, 4 models) the models replay Mon, Tue, Wed, Thu and each has its
    own three previous days as history. The week is treated as circular (Thu is followed by Fri), which
    only matters for ``history_days + n_models > 7`` or a replay span crossing Thursday midnight; with
    more than 7 models the days repeat (the thinning still draws different requests).
  - ``servegen``: model ``i`` follows aggregate series ``SERVEGEN_ORDER[i mod 3]`` (m-small, m-mid,
    m-large) on replay day ``(history_days + i // 3) mod 14``. Per-client series are not used here.
* **Popularity.** Share of model ``i`` ∝ ``(i+1)^-alpha`` (model 0 most popular), normalised to 1.
* **Rate.** The expected total over the replay span is ``rps · replay_s`` requests; model ``i`` gets
  ``share_i`` of it. Model ``i``'s real series is multiplied by ``k_i = share_i·rps·replay_s / (its real
  request count in the replay span)`` — the *same* ``k_i`` scales its history, so the forecaster sees the
  same model's past at the same scale.
* **Arrivals keep the real burstiness.** Azure 2024 has real per-second counts ``c``: each second gets
  ``floor(k)·c + Binomial(c, k − floor(k))`` requests (binomial thinning when k < 1, duplication plus
  thinning when k ≥ 1). ServeGen only has 10-minute rates: each second gets ``Poisson(k · rate)``
  requests (piecewise-constant rate). Times are uniform inside their second.
* **ServeGen gaps.** ``history_rate`` keeps NaN for the gap windows (masked, never zero). For drawing
  replay arrivals (and for ``k_i``) a gap window is filled with the mean of the same time-of-day window
  over the series' valid days, since a gap is missing data, not idleness.
* **Optional burstiness ``cv``.** As in the original, after merging all models the inter-arrival gaps
  are re-drawn i.i.d. from ``Gamma(shape=1/cv², scale=mean_gap·cv²)`` and rescaled so the first and
  last arrival keep their times (same span, same count, same model order). This replaces the real
  within-span shape with a renewal process of the given CV.
* **Tokens.** Each request draws an [input, output] pair uniformly (with replacement) from Azure 2023
  ``token_kind``; input is capped at ``max_input_tokens`` and output raised to at least 3 (original).
* **Randomness.** ``numpy.random.SeedSequence(seed)`` is split into one stream per model plus one for
  tokens and one for the CV redraw, so the same spec always gives identical arrays.

**Time convention of ``Workload.history_rate``** (one row per model, arrivals per second, scaled):
index 0 is exactly ``history_days`` days before the replay start (same time of day,
``replay_start_s``), index ``history_offset_s = history_days·86400`` is the replay start, and the array
ends with the replay span, so its length is ``history_days·86400 + replay_s``. Windows of any size that
divides 86400 therefore line up with the replay start and with the same windows of previous days
(a window ``w`` and ``w − 86400/window_s`` are the same time of day). ``arrival_s`` is in seconds from the
replay start, i.e. ``history_rate`` index ``history_offset_s + floor(arrival_s)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from warmserve.workload.bundle import Bundle, load_bundle
from warmserve.workload.traces import SECONDS_PER_DAY, SERVEGEN_WINDOW_S

SOURCES: tuple[str, ...] = ("azure2024_code", "servegen")
SERVEGEN_ORDER: tuple[str, ...] = ("m-small", "m-mid", "m-large")
MIN_OUTPUT_TOKENS = 3


@dataclass(frozen=True)
class WorkloadSpec:
    """What to build; every field is documented in the module docstring."""

    n_models: int = 4
    rps: float = 15.0
    alpha: float = 0.5
    cv: float | None = None
    source: str = "azure2024_code"  # or "servegen"
    replay_start_s: int = 16 * 3600
    replay_s: int = 2 * 3600
    history_days: int = 3
    token_kind: str = "conv"
    max_input_tokens: int = 1024
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError on a spec that cannot be built."""
        if self.n_models < 1:
            raise ValueError("n_models must be >= 1")
        if not self.rps > 0:
            raise ValueError("rps must be > 0")
        if self.alpha < 0:
            raise ValueError("alpha must be >= 0")
        if self.cv is not None and not self.cv > 0:
            raise ValueError("cv must be > 0 (or None for the real burstiness)")
        if self.source not in SOURCES:
            raise ValueError(f"unknown source {self.source!r}; expected one of {SOURCES}")
        if not 0 <= self.replay_start_s < SECONDS_PER_DAY:
            raise ValueError("replay_start_s must lie within a day")
        if self.replay_s < 1 or self.replay_s > SECONDS_PER_DAY:
            raise ValueError("replay_s must be between 1 s and one day")
        if self.history_days < 0:
            raise ValueError("history_days must be >= 0")
        if self.token_kind not in ("conv", "code"):
            raise ValueError("token_kind must be 'conv' or 'code'")
        if self.max_input_tokens < 1:
            raise ValueError("max_input_tokens must be >= 1")


@dataclass(frozen=True)
class Workload:
    """A built workload: per-model scaled rate history and the replayed requests (sorted by time)."""

    spec: WorkloadSpec
    model_days: tuple[int, ...]  # trace day replayed by each model (Azure: 0=Fri..6=Thu; ServeGen: 0..13)
    history_rate: np.ndarray  # (n_models, history_days*86400 + replay_s) arrivals/s, NaN = masked gap
    arrival_s: np.ndarray  # (n,) float, seconds from replay start, sorted
    model_idx: np.ndarray  # (n,) int
    input_tokens: np.ndarray  # (n,) int
    output_tokens: np.ndarray  # (n,) int
    model_series: tuple[str, ...] = ()  # which series drives each model ("azure2024_code" or "m-mid" ...)

    @property
    def history_offset_s(self) -> int:
        """Index of ``history_rate`` at which the replay span starts."""
        return self.spec.history_days * SECONDS_PER_DAY

    @property
    def shares(self) -> np.ndarray:
        """Popularity share of each model (sums to 1)."""
        return popularity_shares(self.spec.n_models, self.spec.alpha)


def popularity_shares(n_models: int, alpha: float) -> np.ndarray:
    """Zipf-like popularity: share of model i ∝ (i+1)^-alpha, normalised to sum to 1."""
    weights = np.arange(1, n_models + 1, dtype=np.float64) ** -float(alpha)
    return weights / weights.sum()


def _circular_span(series: np.ndarray, start: int, length: int) -> np.ndarray:
    """``series[start : start+length]`` with indices taken modulo the series length."""
    return series[(start + np.arange(length)) % series.shape[0]]


def _seasonal_fill(rate_10min: np.ndarray) -> np.ndarray:
    """Replace NaN windows by the mean of the same time-of-day window over the valid days."""
    per_day = SECONDS_PER_DAY // SERVEGEN_WINDOW_S
    days = rate_10min.reshape(-1, per_day)
    with np.errstate(invalid="ignore"):
        profile = np.nanmean(days, axis=0)
    if np.isnan(profile).any():  # a time of day that is masked on every day: use the overall mean
        profile = np.where(np.isnan(profile), np.nanmean(rate_10min), profile)
    return np.where(np.isnan(days), profile[None, :], days).reshape(-1)


def _azure_models(
    spec: WorkloadSpec, data: Bundle
) -> tuple[list[np.ndarray], list[bool], tuple[int, ...], tuple[str, ...]]:
    """Per-model real per-second counts covering history + replay, for source azure2024_code."""
    week = data.azure2024_code.reshape(-1).astype(np.float64)
    n_days = data.azure2024_code.shape[0]
    history_s = spec.history_days * SECONDS_PER_DAY
    if history_s + spec.replay_s > week.shape[0]:
        raise ValueError("history_days plus the replay span exceed the 7-day Azure 2024 trace")
    days = tuple((spec.history_days + i) % n_days for i in range(spec.n_models))
    span = history_s + spec.replay_s
    series = [_circular_span(week, d * SECONDS_PER_DAY + spec.replay_start_s - history_s, span) for d in days]
    return series, [True] * len(series), days, ("azure2024_code",) * len(series)


def _servegen_models(
    spec: WorkloadSpec, data: Bundle
) -> tuple[list[np.ndarray], list[bool], tuple[int, ...], tuple[str, ...]]:
    """Per-model per-second expected rates (NaN at gaps) covering history + replay, for ServeGen."""
    n_days = data.servegen_aggregate[SERVEGEN_ORDER[0]].shape[0] * SERVEGEN_WINDOW_S // SECONDS_PER_DAY
    history_s = spec.history_days * SECONDS_PER_DAY
    if history_s + spec.replay_s > n_days * SECONDS_PER_DAY:
        raise ValueError("history_days plus the replay span exceed the 14-day ServeGen trace")
    names = tuple(SERVEGEN_ORDER[i % len(SERVEGEN_ORDER)] for i in range(spec.n_models))
    days = tuple((spec.history_days + i // len(SERVEGEN_ORDER)) % n_days for i in range(spec.n_models))
    series = []
    for name, day in zip(names, days, strict=True):
        per_second = np.repeat(data.servegen_aggregate[name], SERVEGEN_WINDOW_S)
        series.append(
            _circular_span(
                per_second, day * SECONDS_PER_DAY + spec.replay_start_s - history_s, history_s + spec.replay_s
            )
        )
    return series, [False] * len(series), days, names


def _fill_for_arrivals(spec: WorkloadSpec, data: Bundle, day: int, name: str) -> np.ndarray:
    """ServeGen replay-span per-second rates with gap windows seasonally filled (see module doc)."""
    filled = np.repeat(_seasonal_fill(data.servegen_aggregate[name]), SERVEGEN_WINDOW_S)
    return _circular_span(filled, day * SECONDS_PER_DAY + spec.replay_start_s, spec.replay_s)


def _draw_counts(rng: np.random.Generator, real: np.ndarray, scale: float, is_count: bool) -> np.ndarray:
    """Requests per second for the replay span (thinning of real counts, or Poisson of a rate)."""
    if is_count:
        counts = real.astype(np.int64)
        whole = int(np.floor(scale))
        return whole * counts + rng.binomial(counts, scale - whole)
    return rng.poisson(scale * real)


def build_workload(spec: WorkloadSpec, data: Bundle | None = None) -> Workload:
    """Build the workload for ``spec`` from ``data`` (default: the shipped bundle). Deterministic."""
    spec.validate()
    data = data if data is not None else load_bundle()
    if spec.source == "azure2024_code":
        series, is_count, days, names = _azure_models(spec, data)
    else:
        series, is_count, days, names = _servegen_models(spec, data)

    seeds = np.random.SeedSequence(spec.seed).spawn(spec.n_models + 2)
    shares = popularity_shares(spec.n_models, spec.alpha)
    history_s = spec.history_days * SECONDS_PER_DAY
    history_rate = np.empty((spec.n_models, history_s + spec.replay_s))
    times: list[np.ndarray] = []
    owners: list[np.ndarray] = []
    for i in range(spec.n_models):
        replay_real = series[i][history_s:] if is_count[i] else _fill_for_arrivals(spec, data, days[i], names[i])
        real_total = float(replay_real.sum())
        if real_total <= 0:
            raise ValueError(f"model {i}: the trace has no requests in its replay span")
        scale = shares[i] * spec.rps * spec.replay_s / real_total
        history_rate[i] = scale * series[i]
        rng = np.random.default_rng(seeds[i])
        per_second = _draw_counts(rng, replay_real, scale, is_count[i])
        seconds = np.repeat(np.arange(spec.replay_s, dtype=np.float64), per_second)
        times.append(seconds + rng.random(seconds.shape[0]))
        owners.append(np.full(seconds.shape[0], i, dtype=np.int64))

    arrival_s = np.concatenate(times)
    model_idx = np.concatenate(owners)
    order = np.lexsort((model_idx, arrival_s))  # stable, total order: time then model
    arrival_s, model_idx = arrival_s[order], model_idx[order]
    if spec.cv is not None:
        arrival_s = redraw_gaps_gamma(np.random.default_rng(seeds[-1]), arrival_s, spec.cv)

    tokens = data.tokens(spec.token_kind)
    pick = np.random.default_rng(seeds[-2]).integers(0, tokens.shape[0], size=arrival_s.shape[0])
    input_tokens = np.minimum(tokens[pick, 0], spec.max_input_tokens).astype(np.int64)
    output_tokens = np.maximum(tokens[pick, 1], MIN_OUTPUT_TOKENS).astype(np.int64)
    return Workload(
        spec=spec,
        model_days=days,
        history_rate=history_rate,
        arrival_s=arrival_s,
        model_idx=model_idx,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        model_series=names,
    )


def redraw_gaps_gamma(rng: np.random.Generator, arrival_s: np.ndarray, cv: float) -> np.ndarray:
    """Sorted times with i.i.d. Gamma(1/cv², mean·cv²) gaps, rescaled to keep first/last arrival."""
    n = arrival_s.shape[0]
    if n < 3:
        return arrival_s.copy()
    first, last = float(arrival_s[0]), float(arrival_s[-1])
    mean_gap = (last - first) / (n - 1)
    shape = 1.0 / cv**2
    gaps = rng.gamma(shape, mean_gap / shape, size=n - 1)
    positions = np.concatenate(([0.0], np.cumsum(gaps)))
    return first + positions * ((last - first) / positions[-1])
