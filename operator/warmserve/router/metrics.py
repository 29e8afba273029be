"""The router's Prometheus metrics (own registry, so tests can run several routers).

Demand gauges are read from the dispatcher at scrape time, so they can never drift from the queues:

- `warmserve_inflight_requests{model}`: requests for the model in the router now, held or sent to an engine.
  This is the model's load: the operator's pool round reads it (and its forecaster learns from it).
- `warmserve_waiting_requests{model}`: of those, the ones held because no engine is ready.
- `warmserve_engine_inflight_requests{model,endpoint}`: requests in flight per engine (for KV reservation).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from warmserve.router.dispatch import Dispatcher

INFLIGHT = "warmserve_inflight_requests"
WAITING = "warmserve_waiting_requests"
ENGINE_INFLIGHT = "warmserve_engine_inflight_requests"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _DemandCollector(Collector):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    def collect(self) -> Iterator[GaugeMetricFamily]:
        d = self.dispatcher
        inflight = GaugeMetricFamily(INFLIGHT, "Requests in the router per model, held or sent", labels=["model"])
        waiting = GaugeMetricFamily(WAITING, "Requests held per model until an engine is ready", labels=["model"])
        for model in d.models():
            inflight.add_metric([model], d.requests(model))
            waiting.add_metric([model], d.waiting(model))
        engines = GaugeMetricFamily(ENGINE_INFLIGHT, "Requests in flight per engine", labels=["model", "endpoint"])
        for backend in d.snapshot.backends:
            engines.add_metric([backend.model, backend.address], d.inflight(backend))
        yield inflight
        yield waiting
        yield engines


class RouterMetrics:
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_DemandCollector(dispatcher))
        self.arrivals = Counter(
            "warmserve_router_arrivals", "Requests that arrived, per model", ["model"], registry=self.registry
        )
        self.responses = Counter(
            "warmserve_router_responses",
            'Responses per model and HTTP status (499: the client went away; model "": an unknown model)',
            ["model", "code"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "warmserve_router_ttft_seconds",
            "Time from a request's arrival to the first byte of its answer, per model",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "warmserve_router_queue_wait_seconds",
            "Time a request was held before an engine took it, per model",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.retries = Counter(
            "warmserve_router_retries",
            "Requests sent again because an engine failed before answering, per model",
            ["model"],
            registry=self.registry,
        )
        self.rejected_endpoints = Counter(
            "warmserve_router_rejected_endpoints",
            "Engine endpoints reported by a worker that the router refused to use",
            registry=self.registry,
        )
        # labelled children by label values: `labels()` costs a lock and a tuple build per call, on every request
        self._children: dict[tuple[object, ...], Any] = {}

    def _child(self, metric: Counter | Histogram, *values: str) -> Any:
        key = (metric, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def arrival(self, model: str) -> None:
        self._child(self.arrivals, model).inc()

    def response(self, model: str, code: str) -> None:
        """Count a response; `model` must be a known model's name ("" for an unknown one: client-supplied names
        never become label values, so a client cannot grow the series without bound)."""
        self._child(self.responses, model, code).inc()

    def retry(self, model: str) -> None:
        self._child(self.retries, model).inc()

    def observe_ttft(self, model: str, seconds: float) -> None:
        self._child(self.ttft, model).observe(seconds)

    def observe_queue_wait(self, model: str, seconds: float) -> None:
        self._child(self.queue_wait, model).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
