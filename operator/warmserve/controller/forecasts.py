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

Saving: a closed window makes the history "unsaved"; every round then asks the act stage to save it (encoded
within the pool's byte budget, the oldest days dropped first) until a save succeeds (`saved`), so a failed save
is retried at the next round, not the next window. `ForecastView.history_save` is the outcome of the last
attempt (the pool's `HistorySaved` condition).

Checkpoint: the first round of each window and then every `windowSeconds / CHECKPOINTS_PER_WINDOW` the update
carries an `OpenWindow` for the act stage to save apart from the history: the open window's samples and the
windows closed since the last successful history save (at most `CHECKPOINT_CLOSED_WINDOWS`), a few numbers per
model. An operator killed before a closed window reached a saved history restores it from the checkpoint
(`restore`): the window is kept with the samples up to its last checkpoint, never lost, whatever the order of
the two saves and even while history saves fail. A checkpoint of the current window lets its samples go on.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from warmserve.controller.history import LoadHistory, OpenWindow, WindowAccumulator
from warmserve.controller.planner import ModelEntry
from warmserve.controller.settings import HISTORY_BUDGET_BYTES
from warmserve.controller.spec import PoolSpec
from warmserve.core.forecast import make_forecaster
from warmserve.core.types import Demand

SCALE_WINDOW_SECONDS = 5.0  # the autoscaler averages load over this long (the simulator's default)
LEND_WINDOW_ROUNDS = 10  # KV lending is sized on the peak of this many rounds (the simulator's)
STATS = ("avg", "peak")
CHECKPOINTS_PER_WINDOW = 4  # the open window is checkpointed at its first round and then this often
CHECKPOINT_CLOSED_WINDOWS = 24  # closed windows a checkpoint keeps while history saves fail (newest first)


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
    history: str | None = None  # the encoded history to save (a window closed and is not saved yet), else None
    forecast: tuple[tuple[str, str, float], ...] = ()  # (served name, stat, value) of a new forecast
    history_note: str = ""  # what the encoding kept (days dropped to fit the budget)
    open_window: str | None = None  # the encoded checkpoint of the open window to save, else None


@dataclass(frozen=True)
class ForecastView:
    """What the decide stage reads (copies: later rounds do not change it)."""

    window: int | None  # index of the current window, None before the first round
    window_seconds: int
    demand: Mapping[str, Demand]  # uid → max(forecast of this window, of the next)
    last_observed: Mapping[str, tuple[float, float]]  # uid → (avg, peak) of the last closed window
    mean_load: Mapping[str, float]  # uid → mean in-flight requests over the autoscaler window
    peak_load: Mapping[str, float]  # uid → peak in-flight requests over the KV-lending window
    history_save: tuple[bool, str, str] | None = None  # (saved?, reason, message) of the last save, None before


class Forecasts:
    """Windows, history and forecast demand of one pool's models (keyed by ModelDeployment uid)."""

    def __init__(self, history: LoadHistory, budget_bytes: int = HISTORY_BUDGET_BYTES) -> None:
        self.history = history
        self.budget_bytes = budget_bytes
        self.unsaved = False  # a window closed since the last successful save
        self.last_save: tuple[bool, str, str] | None = None
        self._note = ""
        self.window: int | None = None
        self.demand: dict[str, Demand] = {}
        self.last_observed: dict[str, tuple[float, float]] = {}
        self._window_samples: dict[str, WindowAccumulator] = {}
        self._recent: dict[str, deque[float]] = {}  # last samples: the autoscaler and KV-lending windows
        self._keep = 1  # rounds in the autoscaler window
        self.pending: OpenWindow | None = None  # a restored checkpoint, taken up by the first round (`restore`)
        self._checkpoint: tuple[int, float] | None = None  # (window, time) of the last checkpoint handed out
        self._unsaved: dict[int, dict[str, tuple[float, float]]] = {}  # closed, not in a saved history yet

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
            self._resume(window)
        if window != self.window:
            closed = self._close(entries, window)
            self.unsaved = True
            gauges += self._forecast(pool, entries, window)
        if self.unsaved:
            saved, self._note = self.encode()
        self._keep = max(1, round(SCALE_WINDOW_SECONDS / pool.interval_seconds))
        for e in entries:
            sample = load.get(e.uid, 0.0)
            self._window_samples.setdefault(e.uid, WindowAccumulator()).add(sample)
            self._recent.setdefault(e.uid, deque(maxlen=max(self._keep, LEND_WINDOW_ROUNDS))).append(sample)
        if not self.demand and entries:
            gauges += self._forecast(pool, entries, window)
        checkpoint = None
        every = pool.forecast.window_seconds / CHECKPOINTS_PER_WINDOW
        if self._checkpoint is None or self._checkpoint[0] != window or now - self._checkpoint[1] >= every:
            self._checkpoint = (window, now)
            checkpoint = self.open_window()
        note = self._note if saved is not None else ""
        return ForecastUpdate(closed, saved, tuple(gauges), note, checkpoint)

    def open_window(self) -> str | None:
        """The encoded checkpoint of the open window (None before the first round)."""
        if self.window is None:
            return None
        return OpenWindow(self.window, self.history.window_seconds, self._window_samples, self._unsaved).encode()

    def restore(self, checkpoint: OpenWindow | None) -> None:
        """Take up a checkpoint read back after a restart (before the first round; see `_resume`)."""
        self.pending = checkpoint

    def checkpoint_failed(self) -> None:
        """The act stage could not save `ForecastUpdate.open_window`: hand out a new one next round."""
        self._checkpoint = None

    def _resume(self, window: int) -> None:
        """The first round: a checkpoint of this window lets its samples go on; one of an earlier window is a
        window that closed while the operator was down or before it could save the history: it joins the history
        (unless the history has it) and the history becomes unsaved."""
        checkpoint, self.pending = self.pending, None
        if checkpoint is None or checkpoint.window > window:
            return
        closed = dict(checkpoint.closed)
        if checkpoint.window == window:
            self._window_samples = {uid: replace(a) for uid, a in checkpoint.samples.items()}
        else:
            closed[checkpoint.window] = {uid: (a.avg, a.peak) for uid, a in checkpoint.samples.items()}
        for w, per in sorted(closed.items()):
            for uid, (avg, peak) in per.items():
                if w not in self.history.series.get(uid, {}).get("avg", {}):
                    self.history.record(uid, w, avg, peak)
                    self._keep_unsaved(w, uid, avg, peak)
                    self.unsaved = True

    def encode(self) -> tuple[str, str]:
        """The history encoded within the byte budget, and a note on what was dropped to fit ("" if nothing)."""
        text, dropped = self.history.encode_within(self.budget_bytes)
        if not dropped:
            return text, ""
        days = dropped * self.history.window_seconds / 86400
        return (
            text,
            f"the oldest {dropped} windows ({days:.1f} days) were not saved to stay within {self.budget_bytes} bytes",
        )

    def saved(self, error: str | None, note: str = "") -> None:
        """The act stage's outcome of saving `ForecastUpdate.history`: None when saved, else why not."""
        if error is None:
            self.unsaved = False
            self._unsaved.clear()
            models = len(self.history.series)
            if note:
                self.last_save = (True, "SavedTruncated", f"{models} model(s); {note}")
            else:
                self.last_save = (True, "Saved", f"{models} model(s), every window kept")
        else:
            self.last_save = (False, "SaveFailed", f"load history not saved, retried every round: {error}"[:1000])

    def view(self, pool: PoolSpec) -> ForecastView:
        keep = self._keep
        return ForecastView(
            window=self.window,
            window_seconds=pool.forecast.window_seconds,
            demand=dict(self.demand),
            last_observed=dict(self.last_observed),
            mean_load={uid: float(np.mean(list(q)[-keep:])) for uid, q in self._recent.items() if q},
            peak_load={uid: max(q) for uid, q in self._recent.items() if q},
            history_save=self.last_save,
        )

    def _keep_unsaved(self, window: int, uid: str, avg: float, peak: float) -> None:
        """Remember a closed window for the checkpoint until a history save holds it (the newest
        `CHECKPOINT_CLOSED_WINDOWS` only: while saves keep failing, older ones would make it grow without end)."""
        self._unsaved.setdefault(window, {})[uid] = (avg, peak)
        for old in sorted(self._unsaved)[:-CHECKPOINT_CLOSED_WINDOWS]:
            del self._unsaved[old]

    def _close(self, entries: Sequence[ModelEntry], window: int) -> tuple[ClosedWindow, ...]:
        assert self.window is not None
        closed = []
        for e in entries:
            acc = self._window_samples.get(e.uid)
            if acc is None or acc.count == 0:
                continue
            self.history.record(e.uid, self.window, acc.avg, acc.peak)
            self._keep_unsaved(self.window, e.uid, acc.avg, acc.peak)
            self.last_observed[e.uid] = (acc.avg, acc.peak)
            closed.append(ClosedWindow(e.served_name, acc.avg, acc.peak, self.demand.get(e.uid)))
        planned = {e.uid for e in entries}
        self.history.forget(planned)
        for per in self._unsaved.values():  # a model no longer planned must not come back from a checkpoint
            for uid in set(per) - planned:
                del per[uid]
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
