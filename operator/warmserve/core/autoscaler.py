"""Reactive autoscaler: how many engines each model should run, from its measured concurrency.

Same rule as the original WarmServe manager (thresholds 0.8/0.5 of batch capacity, 5 s protection): it
reacts to load, while the forecast only decides what is prewarmed, so a wrong forecast costs a cold start,
never a dropped request. ``min_replicas``/``max_replicas`` come from the ModelDeployment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def engines_for(load: float, per_engine: float) -> int:
    """Engines needed so that each carries at most ``per_engine`` of ``load`` (0 for no load).

    The tiny tolerance keeps a load of exactly ``k × per_engine`` at ``k`` engines despite float rounding
    (3 × 32 × 0.8 is 76.80000000000001), so the autoscaler and the placement always agree.
    """
    return math.ceil(load / per_engine - 1e-9) if load > 0 else 0


@dataclass(frozen=True)
class AutoscalerParams:
    upper: float = 0.8  # scale up above this share of batch capacity
    lower: float = 0.5  # scale down below this share
    protection_s: float = 5.0  # an engine younger than this is never stopped

    def __post_init__(self) -> None:
        if not 0 < self.lower < self.upper <= 1:
            raise ValueError("need 0 < lower < upper <= 1")


@dataclass(frozen=True)
class EngineView:
    """What the autoscaler needs of one engine (not draining)."""

    iid: int
    started_at: float
    in_flight: int


@dataclass(frozen=True)
class ScaleDecision:
    start: int = 0
    stop: tuple[int, ...] = ()


def decide_scale(
    now: float,
    load: float,
    engines: Sequence[EngineView],
    max_batch: int,
    params: AutoscalerParams,
    min_replicas: int = 0,
    max_replicas: int | None = None,
) -> ScaleDecision:
    """Engines to start, and which to stop (fewest in-flight requests first), for one model."""
    count = len(engines)
    capacity = count * max_batch
    target = count
    if load > params.upper * capacity:
        target = engines_for(load, params.upper * max_batch)
    elif load < params.lower * capacity:
        target = engines_for(load, params.lower * max_batch)
    target = max(target, min_replicas)
    if max_replicas is not None:
        target = min(target, max_replicas)
    if target > count:
        return ScaleDecision(start=target - count)
    if target < count:
        eligible = sorted(
            (e for e in engines if now - e.started_at >= params.protection_s),
            key=lambda e: (e.in_flight, -e.started_at, e.iid),
        )
        return ScaleDecision(stop=tuple(e.iid for e in eligible[: count - target]))
    return ScaleDecision()
