"""Load windows, history and forecasts of one pool: what its rounds learn about load, kept between rounds.

Every round `Forecasts.advance` takes the load the observe stage sampled (in-flight requests per model uid):

1. when the clock crossed a window boundary (absolute index `floor(t / windowSeconds)`), the window that
   just ended is closed: each model's avg and peak join the `LoadHistory` (persisted by the act stage, so a
   restarted operator keeps its seasons), models no longer planned are forgotten, and the forecaster
   predicts the new window and the next one; a model's demand is their maximum (prewarming must precede a
   burst);
2. the samples join the current window and the short windows the planner reads: the autoscaler sees the
   mean of the last `SCALE_WINDOW_SECONDS`, KV lending the peak of the last `LEND_WINDOW_ROUNDS` rounds
   (the simulator's windows).

Pure: no I/O and no clock (the caller passes `now`). What the act stage must do about it — save the
history, set the forecast and observed-load gauges — comes back as a `ForecastUpdate`; what the decide stage
reads is a `ForecastView`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from warmserve.controller.history import LoadHistory, WindowAccumulator
from warmserve.controller.planner import ModelEntry
from warmserve.controller.spec import PoolSpec
from warmserve.core.forecast import make_forecaster
from warmserve.core.types import Demand

SCALE_WINDOW_SECONDS = 5.0  # the autoscaler averages load over this long (the simulator's default)
LEND_WINDOW_ROUNDS = 10  # KV lending is sized on the peak of this many rounds (the simulator's)
STATS = ("avg", "peak")


def forecaster_for(pool: PoolSpec) -> Any:
    """The pool's forecaster (`spec.forecast`): CSP variants take D and N, the baselines nothing."""
    f = pool.forecast
    if f.kind in ("csp", "smooth-csp"):
        return make_forecaster(f.kind, days=f.season_days, corrections=f.correction_windows)
    return make_forecaster(f.kind)


@dataclass(frozen=True)
class ClosedWindow:
    """One model's measured load in the window that just closed, and what had been forecast for it."""

    served_name: str
    avg: float
    peak: float
    predicted: Demand | None


@dataclass(frozen=True)
class ForecastUpdate:
    """What changed in this round that the act stage reports or persists."""

    closed: tuple[ClosedWindow, ...] = ()  # models measured in the window that just closed
    history: str | None = None  # the encoded history to save (a window closed), else None
    forecast: tuple[tuple[str, str, float], ...] = ()  # (served name, stat, value) of a new forecast


@dataclass(frozen=True)
class ForecastView:
    """What the decide stage reads (copies: later rounds do not change it)."""

    window: int | None  # index of the current window, None before the first round
    window_seconds: int
    demand: Mapping[str, Demand]  # uid → max(forecast of this window, of the next)
    last_observed: Mapping[str, tuple[float, float]]  # uid → (avg, peak) of the last closed window
    mean_load: Mapping[str, float]  # uid → mean in-flight requests over the autoscaler window
    peak_load: Mapping[str, float]  # uid → peak in-flight requests over the KV-lending window


class Forecasts:
    """Windows, history and forecast demand of one pool's models (keyed by ModelDeployment uid)."""

    def __init__(self, history: LoadHistory) -> None:
        self.history = history
        self.window: int | None = None
        self.demand: dict[str, Demand] = {}
        self.last_observed: dict[str, tuple[float, float]] = {}
        self._window_samples: dict[str, WindowAccumulator] = {}
        self._recent: dict[str, deque[float]] = {}  # last samples: the autoscaler and KV-lending windows
        self._keep = 1  # rounds in the autoscaler window

    def advance(
        self, now: float, pool: PoolSpec, entries: Sequence[ModelEntry], load: Mapping[str, float]
    ) -> ForecastUpdate:
        """One round's samples (`load`: uid → in-flight requests now) for the planned models `entries`."""
        closed: tuple[ClosedWindow, ...] = ()
        saved: str | None = None
        gauges: list[tuple[str, str, float]] = []
        window = int(now // pool.forecast.window_seconds)
        if self.window is None:
            self.window = window
        if window != self.window:
            closed = self._close(entries, window)
            saved = self.history.encode()
            gauges += self._forecast(pool, entries, window)
        self._keep = max(1, round(SCALE_WINDOW_SECONDS / pool.interval_seconds))
        for e in entries:
            sample = load.get(e.uid, 0.0)
            self._window_samples.setdefault(e.uid, WindowAccumulator()).add(sample)
            self._recent.setdefault(e.uid, deque(maxlen=max(self._keep, LEND_WINDOW_ROUNDS))).append(sample)
        if not self.demand and entries:
            gauges += self._forecast(pool, entries, window)
        return ForecastUpdate(closed, saved, tuple(gauges))

    def view(self, pool: PoolSpec) -> ForecastView:
        keep = self._keep
        return ForecastView(
            window=self.window,
            window_seconds=pool.forecast.window_seconds,
            demand=dict(self.demand),
            last_observed=dict(self.last_observed),
            mean_load={uid: float(np.mean(list(q)[-keep:])) for uid, q in self._recent.items() if q},
            peak_load={uid: max(q) for uid, q in self._recent.items() if q},
        )

    def _close(self, entries: Sequence[ModelEntry], window: int) -> tuple[ClosedWindow, ...]:
        assert self.window is not None
        closed = []
        for e in entries:
            acc = self._window_samples.get(e.uid)
            if acc is None or acc.count == 0:
                continue
            self.history.record(e.uid, self.window, acc.avg, acc.peak)
            self.last_observed[e.uid] = (acc.avg, acc.peak)
            closed.append(ClosedWindow(e.served_name, acc.avg, acc.peak, self.demand.get(e.uid)))
        self.history.forget({e.uid for e in entries})
        self._window_samples.clear()
        self.window = window
        return tuple(closed)

    def _forecast(self, pool: PoolSpec, entries: Sequence[ModelEntry], window: int) -> list[tuple[str, str, float]]:
        """Demand per model = max(forecast of this window, of the next): prewarming must precede a burst."""
        forecaster = forecaster_for(pool)
        demand, gauges = {}, []
        for e in entries:
            values = {}
            for stat in STATS:
                best = 0.0
                if self.history.windows(e.uid):
                    series, t = self.history.array(e.uid, stat, window)
                    ahead = np.concatenate([series, [np.nan]])
                    for v in (
                        forecaster.predict(series, t, pool.forecast.period),
                        forecaster.predict(ahead, t + 1, pool.forecast.period),
                    ):
                        best = max(best, v if math.isfinite(v) else 0.0)
                values[stat] = best
                gauges.append((e.served_name, stat, best))
            demand[e.uid] = Demand(values["avg"], max(values["peak"], values["avg"]))
        self.demand = demand
        return gauges
