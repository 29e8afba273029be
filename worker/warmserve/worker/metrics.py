"""Prometheus metrics of one worker (own registry, so tests can run several agents)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: Replica phases of the state contract (DESIGN.md §5); failures are counted from ``errors``.
PHASES = ("loading", "warm", "starting", "serving", "evicting")


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.arena_bytes = Gauge(
            "warmserve_worker_arena_bytes", "Arena bytes per device and kind", ["gpu", "kind"], registry=self.registry
        )
        self.replicas = Gauge("warmserve_worker_replicas", "Replicas held, by phase", ["phase"], registry=self.registry)
        self.errors = Gauge(
            "warmserve_worker_errors", "Errors in the published state (plan and per-replica)", registry=self.registry
        )
        self.generation = Gauge(
            "warmserve_worker_observed_generation", "Plan generation applied", registry=self.registry
        )
        self.ops = Counter(
            "warmserve_worker_operations", "Operations by kind and outcome", ["op", "outcome"], registry=self.registry
        )
        self.seconds = Histogram(
            "warmserve_worker_operation_seconds",
            "Duration of operations",
            ["op"],
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )

    def op(self, op: str, outcome: str) -> None:
        self.ops.labels(op, outcome).inc()

    def duration(self, op: str, seconds: float) -> None:
        self.seconds.labels(op).observe(seconds)

    def observe_state(self, state: dict[str, Any]) -> None:
        for dev in state["devices"]:
            for kind, key in (("total", "totalBytes"), ("used", "usedBytes"), ("free", "freeBytes")):
                self.arena_bytes.labels(str(dev["index"]), kind).set(dev[key])
        counts = dict.fromkeys(PHASES, 0)
        for rep in state["replicas"]:
            counts[rep["phase"]] = counts.get(rep["phase"], 0) + 1
        for phase, n in counts.items():
            self.replicas.labels(phase).set(n)
        self.errors.set(len(state["errors"]))
        self.generation.set(state["observedGeneration"])

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
