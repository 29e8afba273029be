"""Offered load: in-flight requests implied by arrivals and a per-model latency model (pure).

WarmServe forecasts *concurrency* (requests in flight), not arrival rate, because concurrency is what
occupies batch slots and KV cache. Without a serving engine we derive it from arrivals with Little's
law: a request that arrives at second ``s`` and is served for ``S`` seconds (``S`` = the model's mean
service time, e.g. prefill + output tokens × per-token decode) is in flight during ``[s, s + S)``. The
in-flight count at second ``t`` is therefore the sliding sum of the arrivals over the last ``S``
seconds, with the oldest second weighted by the fractional part of ``S``:

    conc[t] = Σ_{j=0}^{⌊S⌋-1} a[t-j]  +  (S - ⌊S⌋) · a[t-⌊S⌋]

Its long-run mean is exactly ``mean(a) · S`` (Little's law ``L = λW``). Seconds before the series
starts count as zero arrivals. The original code instead drew each request's own service time; using
the mean keeps this function a linear filter of the rate, so forecasting the scaled rate history and
the replayed arrivals give consistent loads.

NaN marks missing data (ServeGen collection gaps): any concurrency value whose sliding window touches
a NaN second is NaN, and :func:`window_load` turns a window containing a NaN second into a NaN
(masked) window, which forecasters and scores skip.
"""

from __future__ import annotations

import numpy as np


def service_kernel(mean_service_s: float) -> np.ndarray:
    """Weights of the sliding sum: ``⌊S⌋`` ones then the fractional remainder (dropped if zero)."""
    if not np.isfinite(mean_service_s) or mean_service_s <= 0:
        raise ValueError(f"mean_service_s must be a positive finite number, got {mean_service_s!r}")
    whole = int(np.floor(mean_service_s))
    frac = float(mean_service_s - whole)
    kernel = [1.0] * whole + ([frac] if frac > 1e-12 else [])
    return np.asarray(kernel, dtype=np.float64)


def offered_concurrency(per_second_rate: np.ndarray, mean_service_s: float) -> np.ndarray:
    """In-flight requests per second from arrivals per second (last axis = time), by Little's law.

    ``per_second_rate`` may be integer counts (replayed arrivals) or expected rates (float, possibly
    with NaN gaps); a 2-D input is treated as one series per row.
    """
    rate = np.asarray(per_second_rate, dtype=np.float64)
    kernel = service_kernel(mean_service_s)
    if rate.ndim == 0:
        raise ValueError("per_second_rate must be at least 1-D")
    if rate.ndim > 1:
        return np.stack([offered_concurrency(row, mean_service_s) for row in rate.reshape(-1, rate.shape[-1])]).reshape(
            rate.shape
        )
    n = rate.shape[0]
    missing = np.isnan(rate)
    conc = np.convolve(np.where(missing, 0.0, rate), kernel)[:n]
    if missing.any():
        touched = np.convolve(missing.astype(np.float64), np.ones(kernel.size))[:n] > 0
        conc[touched] = np.nan
    return conc


def window_load(concurrency: np.ndarray, window_s: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Per-window (avg, peak) of a 1-s concurrency series: mean and max over each window.

    Windows are ``[w·window_s, (w+1)·window_s)``; a trailing partial window is dropped, so the series
    should start on a window boundary. A window with any NaN second is NaN in both outputs (masked).
    """
    if window_s <= 0:
        raise ValueError("window_s must be positive")
    conc = np.asarray(concurrency, dtype=np.float64)
    n_windows = conc.shape[-1] // window_s
    shaped = conc[..., : n_windows * window_s].reshape(*conc.shape[:-1], n_windows, window_s)
    # mean/max of a window containing NaN is NaN, which is exactly the masking rule wanted here.
    return shaped.mean(axis=-1), shaped.max(axis=-1)
