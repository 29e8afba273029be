"""Reactive autoscaler: thresholds, protection period, min/max replicas and the order engines stop in."""

from __future__ import annotations

import pytest

from warmserve.core.autoscaler import AutoscalerParams, EngineView, ScaleDecision, decide_scale
from warmserve.core.placement import engines_needed
from warmserve.core.types import ModelProfile

PARAMS = AutoscalerParams()  # upper 0.8, lower 0.5, protection 5 s
B = 10


def fleet(*in_flight: int, started_at: float = 0.0) -> list[EngineView]:
    return [EngineView(iid=i + 1, started_at=started_at, in_flight=q) for i, q in enumerate(in_flight)]


def scale(load: float, engines: list[EngineView], now: float = 100.0, **kwargs: int | None) -> ScaleDecision:
    return decide_scale(now, load, engines, B, PARAMS, **kwargs)


@pytest.mark.parametrize(("lower", "upper"), [(0.5, 0.5), (0.6, 0.5), (0.0, 0.8), (-0.1, 0.8), (0.5, 1.01)])
def test_params_validation(lower: float, upper: float) -> None:
    with pytest.raises(ValueError):
        AutoscalerParams(upper=upper, lower=lower)


def test_no_engines_no_load_does_nothing() -> None:
    assert scale(0.0, []) == ScaleDecision()


@pytest.mark.parametrize(("load", "start"), [(0.1, 1), (8.0, 1), (8.5, 2), (16.0, 2), (17.0, 3), (100.0, 13)])
def test_cold_scale_up_from_zero(load: float, start: int) -> None:
    assert scale(load, []) == ScaleDecision(start=start)  # ceil(load / (0.8 × 10))


def test_scale_up_only_above_the_upper_threshold() -> None:
    assert scale(16.0, fleet(8, 8)) == ScaleDecision()  # exactly 0.8 × 20: hold
    assert scale(16.5, fleet(8, 8)) == ScaleDecision(start=1)  # ceil(16.5 / 8) = 3
    assert scale(40.0, fleet(10, 10)) == ScaleDecision(start=3)  # ceil(40 / 8) = 5


def test_band_between_thresholds_holds() -> None:
    for load in (10.0, 12.0, 16.0):  # 0.5 × 20 ≤ load ≤ 0.8 × 20
        assert scale(load, fleet(5, 5)) == ScaleDecision()


def test_scale_down_below_the_lower_threshold_to_a_count_that_stays_below_it() -> None:
    # 4 engines, capacity 40, lower 20: load 15 → ceil(15 / 5) = 3 engines (15 / 30 = 0.5, not below)
    decision = scale(15.0, fleet(4, 3, 5, 3))
    assert len(decision.stop) == 1 and decision.start == 0
    assert scale(20.0, fleet(5, 5, 5, 5)) == ScaleDecision()  # exactly 0.5 × 40: hold
    assert len(scale(4.0, fleet(1, 1, 1, 1)).stop) == 3


def test_zero_load_stops_everything_eligible() -> None:
    assert scale(0.0, fleet(0, 0, 0)) == ScaleDecision(stop=(1, 2, 3))


def test_stop_order_fewest_in_flight_then_youngest_then_id() -> None:
    engines = [
        EngineView(1, started_at=10.0, in_flight=2),
        EngineView(2, started_at=20.0, in_flight=0),
        EngineView(3, started_at=30.0, in_flight=0),
        EngineView(4, started_at=30.0, in_flight=0),
        EngineView(5, started_at=0.0, in_flight=1),
    ]
    assert scale(0.0, engines).stop == (3, 4, 2, 5, 1)
    assert scale(6.0, engines).stop == (3, 4, 2)  # ceil(6 / 5) = 2 engines stay


def test_protection_period_shields_young_engines() -> None:
    engines = [EngineView(1, 96.0, 0), EngineView(2, 95.0, 0), EngineView(3, 10.0, 3)]
    # at now=100 engine 1 is 4 s old (protected), engine 2 exactly 5 s (eligible)
    assert scale(0.0, engines, now=100.0).stop == (2, 3)
    assert scale(0.0, engines, now=99.0).stop == (3,)
    assert scale(0.0, engines, now=101.0).stop == (1, 2, 3)


def test_min_replicas_is_a_floor() -> None:
    assert scale(0.0, [], min_replicas=2) == ScaleDecision(start=2)
    assert scale(0.0, fleet(0, 0, 0), min_replicas=2) == ScaleDecision(stop=(1,))  # all equal: lowest id
    assert scale(0.0, fleet(0, 0), min_replicas=2) == ScaleDecision()


def test_max_replicas_is_a_ceiling_and_wins_over_min() -> None:
    assert scale(100.0, fleet(10), max_replicas=3) == ScaleDecision(start=2)
    assert scale(12.0, fleet(3, 3, 3, 3), max_replicas=2).stop == (1, 2)  # in the band, but over the max
    assert scale(0.0, [], min_replicas=3, max_replicas=1) == ScaleDecision(start=1)
    assert scale(50.0, fleet(9), max_replicas=0) == ScaleDecision(stop=(1,))


def test_custom_thresholds() -> None:
    params = AutoscalerParams(upper=1.0, lower=0.25, protection_s=0.0)
    assert decide_scale(0.0, 20.0, fleet(10, 10), B, params) == ScaleDecision()
    assert decide_scale(0.0, 21.0, fleet(10, 10), B, params) == ScaleDecision(start=1)
    assert decide_scale(0.0, 4.0, fleet(2, 2), B, params) == ScaleDecision()  # 4 < 5, but ceil(4 / 2.5) = 2
    assert decide_scale(0.0, 2.0, fleet(1, 1), B, params) == ScaleDecision(stop=(1,))  # ceil(2 / 2.5) = 1


@pytest.mark.parametrize("k", [3, 6, 12, 77])
@pytest.mark.parametrize("max_batch", [8, 32, 256])
def test_scale_up_agrees_with_the_placements_engine_count_at_the_threshold(k: int, max_batch: int) -> None:
    """k × B × 0.8 is not exact in floats (3 × 32 × 0.8 = 76.80000000000001): both sides must still say k."""
    load = k * max_batch * PARAMS.upper
    assert engines_needed(load, ModelProfile("m", 1, max_batch=max_batch), PARAMS.upper) == k
    assert decide_scale(0.0, load, [], max_batch, PARAMS) == ScaleDecision(start=k)
    assert decide_scale(0.0, load, fleet(1), max_batch, PARAMS) == ScaleDecision(start=k - 1)
