"""Prometheus metrics of the operator, on their own registry (so tests can run several operators).

Served by `prometheus_client.start_http_server` on WARMSERVE_METRICS_PORT when the operator starts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import kopf
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class ConditionRetry(kopf.TemporaryError):
    """Ask kopf to run a handler again later for something the object's conditions already report (a CRD that
    may be installed later, an RBAC rule that may be granted): expected, so not a reconcile error."""


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.forecast = Gauge(
            "warmserve_forecast_concurrency",
            "Forecast in-flight requests for the current window",
            ["pool", "model", "stat"],
            registry=r,
        )
        self.observed = Gauge(
            "warmserve_observed_concurrency",
            "Measured in-flight requests in the last completed window",
            ["pool", "model", "stat"],
            registry=r,
        )
        self.forecast_abs_error = Gauge(
            "warmserve_forecast_abs_error",
            "|forecast - observed| for the last completed window",
            ["pool", "model", "stat"],
            registry=r,
        )
        self.plan_changes = Counter(
            "warmserve_plan_changes_total", "Plans written to worker pods", ["pool"], registry=r
        )
        self.plan_generation = Gauge(
            "warmserve_plan_generation", "Latest plan generation per pool", ["pool"], registry=r
        )
        self.promotions = Counter(
            "warmserve_promotions_total",
            "Engines started, by where the weights came from (hit, loading, cold)",
            ["pool", "model", "source"],
            registry=r,
        )
        self.reconcile_seconds = Histogram(
            "warmserve_reconcile_duration_seconds",
            "Duration of reconcile handlers and control-loop rounds",
            ["kind", "step"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.reconcile_errors = Counter(
            "warmserve_reconcile_errors_total",
            "Failed reconciles and loop rounds",
            ["kind", "step"],
            registry=r,
        )
        self.scrape_errors = Counter("warmserve_load_scrape_errors_total", "Failed load scrapes", ["pool"], registry=r)
        self.history_save_failures = Counter(
            "warmserve_history_save_failures_total",
            "Load-history saves that failed (retried every round until one succeeds)",
            ["pool"],
            registry=r,
        )
        self.checkpoint_failures = Counter(
            "warmserve_history_checkpoint_failures_total",
            "Saves of the open load window's checkpoint that failed (retried at the next round)",
            ["pool"],
            registry=r,
        )

    @contextmanager
    def timed(self, kind: str, step: str) -> Iterator[None]:
        """Observe how long a reconcile step takes, and count it as an error if it raises (not a
        `ConditionRetry`: an expected retry whose reason a condition already shows)."""
        started = time.perf_counter()
        try:
            yield
        except ConditionRetry:
            raise
        except Exception:
            self.reconcile_errors.labels(kind, step).inc()
            raise
        finally:
            self.reconcile_seconds.labels(kind, step).observe(time.perf_counter() - started)

    def serve(self, port: int) -> None:
        if port:
            start_http_server(port, registry=self.registry)
