"""Prometheus metrics of one worker (own registry, so tests can run several agents)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from warmserve.protocol import Phase, WorkerState


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
        self.last_pass = Gauge(
            "warmserve_worker_last_pass_timestamp_seconds",
            "Unix time the worker last finished a reconcile pass (its state is published after each pass)",
            registry=self.registry,
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

    def observe_state(self, state: WorkerState) -> None:
        """Gauges from a published state: one replica count per phase (failures are counted from ``errors``), and
        the time of this pass (a worker whose passes stop, e.g. stuck behind a lock, shows as stale)."""
        for dev in state.devices:
            for kind, value in (("total", dev.total_bytes), ("used", dev.used_bytes), ("free", dev.free_bytes)):
                self.arena_bytes.labels(str(dev.index), kind).set(value)
        counts = dict.fromkeys(Phase, 0)
        for rep in state.replicas:
            counts[rep.phase] += 1
        for phase, n in counts.items():
            self.replicas.labels(str(phase)).set(n)
        self.errors.set(len(state.errors))
        self.generation.set(state.observed_generation)
        self.last_pass.set_to_current_time()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
