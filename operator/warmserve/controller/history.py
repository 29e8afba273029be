"""Per-window load history of a pool's models, and its compact encoding for a ConfigMap.

Why persisted: the forecaster's seasonal term needs the same window on the previous D days; an operator
restart (upgrade, node drain, leader change) must not lose those seasons. The history is keyed by the
absolute window index `floor(unix_time / window_seconds)`, so windows line up across days and restarts,
and missing windows (operator down) stay NaN, which the forecasters skip instead of reading as zero.

Pure: the loop decides when to save; `encode`/`decode` turn it into zlib-compressed JSON for `binaryData`.

`OpenWindow` is the checkpoint of what a saved history does not hold yet (a few numbers per model, saved apart
from the history several times per window): the samples of the window still being measured, and the windows
that closed since the last successful history save. An operator killed before it saved a window that just
closed restores that window from the checkpoint, so no window is lost, only the samples of its last moments.
"""

from __future__ import annotations

import base64
import json
import math
import zlib
from dataclasses import dataclass, field

import numpy as np

STATS = ("avg", "peak")


@dataclass
class WindowAccumulator:
    """Samples of the current window for one model: running mean and maximum of in-flight requests."""

    total: float = 0.0
    count: int = 0
    peak: float = 0.0

    def add(self, value: float) -> None:
        self.total += value
        self.count += 1
        self.peak = max(self.peak, value)

    @property
    def avg(self) -> float:
        return self.total / self.count if self.count else 0.0


@dataclass
class OpenWindow:
    """The checkpoint of a pool's load windows that a saved history does not hold yet: the samples so far of the
    open window `window` (absolute index) per model uid, and the closed windows not yet saved
    (`closed`: window → uid → (avg, peak))."""

    window: int
    window_seconds: int
    samples: dict[str, WindowAccumulator]
    closed: dict[int, dict[str, tuple[float, float]]] = field(default_factory=dict)

    def encode(self) -> str:
        doc = {
            "version": 1,
            "window": self.window,
            "windowSeconds": self.window_seconds,
            "models": {m: [a.total, a.count, a.peak] for m, a in sorted(self.samples.items()) if a.count},
            "closed": {str(w): {m: list(v) for m, v in sorted(per.items())} for w, per in sorted(self.closed.items())},
        }
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def decode(cls, text: str, window_seconds: int) -> OpenWindow | None:
        """Inverse of `encode`; None for anything unreadable or of another window length (never raises)."""
        try:
            doc = json.loads(text)
            if doc.get("version") != 1 or doc.get("windowSeconds") != window_seconds:
                return None
            samples = {}
            for model, (total, count, peak) in doc["models"].items():
                acc = WindowAccumulator(float(total), int(count), float(peak))
                if isinstance(model, str) and acc.count > 0 and all(map(math.isfinite, (acc.total, acc.peak))):
                    samples[model] = acc
            closed: dict[int, dict[str, tuple[float, float]]] = {}
            for w, per in (doc.get("closed") or {}).items():
                values = {m: (float(a), float(p)) for m, (a, p) in per.items() if isinstance(m, str)}
                closed[int(w)] = {m: v for m, v in values.items() if all(map(math.isfinite, v))}
            return cls(int(doc["window"]), window_seconds, samples, closed)
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


@dataclass
class LoadHistory:
    """avg and peak per model per absolute window index, bounded to `capacity` windows."""

    window_seconds: int
    capacity: int
    series: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)

    def record(self, model: str, window: int, avg: float, peak: float) -> None:
        per = self.series.setdefault(model, {s: {} for s in STATS})
        per["avg"][window] = float(avg)
        per["peak"][window] = float(peak)
        self._trim(model, window)

    def _trim(self, model: str, newest: int) -> None:
        for stat in STATS:
            if len(self.series[model][stat]) <= self.capacity:
                continue  # cannot hold anything older than the capacity (one entry per window)
            old = [w for w in self.series[model][stat] if w <= newest - self.capacity]
            for w in old:
                del self.series[model][stat][w]

    def windows(self, model: str) -> int:
        return len(self.series.get(model, {}).get("avg", {}))

    def array(self, model: str, stat: str, upto: int) -> tuple[np.ndarray, int]:
        """(history, t): the series over [upto - capacity, upto) with NaN gaps, and t = index of `upto`."""
        start = upto - self.capacity
        values = np.full(self.capacity, np.nan)
        for w, v in self.series.get(model, {}).get(stat, {}).items():
            if start <= w < upto:
                values[w - start] = v
        return values, self.capacity

    def forget(self, keep: set[str]) -> None:
        for model in list(self.series):
            if model not in keep:
                del self.series[model]

    # ------------------------------------------------------------ encoding
    def encode_within(self, budget: int) -> tuple[str, int]:
        """`encode`, dropping the oldest windows (whole days while more than a day is kept) until the text fits
        `budget` bytes; returns (text, windows dropped). A ConfigMap holds 1 MiB, so a pool keeps its history
        under a budget (900 KB by default): at 10 s windows one model's 35 days encode to about 1 MB.

        If not even the newest window of every model fits, the smallest encoding is returned (the save then
        fails and is reported).
        """
        text = self.encode()
        if len(text) <= budget or not self.series:
            return text, 0
        windows = [w for per in self.series.values() for w in per["avg"]]
        if not windows:
            return text, 0
        newest, oldest = max(windows), min(windows)
        span = newest - oldest + 1
        per_day = max(1, 86400 // self.window_seconds)
        keep = span
        while keep > 1:
            keep = min(keep - 1, int(keep * budget / len(text) * 0.95))
            if keep > per_day:
                keep -= keep % per_day  # whole days, oldest first
            keep = max(keep, 1)
            text = self.encode(since=newest - keep + 1)
            if len(text) <= budget:
                break
        return text, span - keep

    def encode(self, since: int | None = None) -> str:
        """base64(zlib(JSON)): per model and stat, a start window and a dense array (null = gap), values
        rounded to 3 significant digits (far below forecast error). `since` drops windows before it."""

        def dense(per: dict[int, float]) -> dict[str, object]:
            if since is not None:
                per = {w: v for w, v in per.items() if w >= since}
            if not per:
                return {"start": 0, "values": []}
            start, end = min(per), max(per)
            return {
                "start": start,
                "values": [
                    float(f"{per[w]:.3g}") if w in per and math.isfinite(per[w]) else None
                    for w in range(start, end + 1)
                ],
            }

        doc = {
            "version": 2,
            "windowSeconds": self.window_seconds,
            "capacity": self.capacity,
            "models": {m: {s: dense(per[s]) for s in STATS} for m, per in sorted(self.series.items())},
        }
        raw = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        return base64.b64encode(zlib.compress(raw, 6)).decode()

    @classmethod
    def decode(cls, text: str, window_seconds: int, capacity: int) -> LoadHistory:
        """Inverse of `encode`; a history saved with another window length is discarded (not comparable)."""
        history = cls(window_seconds, capacity)
        try:
            doc = json.loads(zlib.decompress(base64.b64decode(text)))
        except (ValueError, zlib.error):
            return history
        if doc.get("windowSeconds") != window_seconds or doc.get("version") != 2:
            return history
        for model, per in (doc.get("models") or {}).items():
            series: dict[str, dict[int, float]] = {}
            for stat in STATS:
                block = per.get(stat) or {}
                start = int(block.get("start", 0))
                series[stat] = {start + i: float(v) for i, v in enumerate(block.get("values") or []) if v is not None}
            history.series[model] = series
            newest = max(series["avg"], default=0)
            history._trim(model, newest)
        return history
