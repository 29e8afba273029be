"""Which engines serve which model: a pure function of the ModelDeployments and the workers' states.

The router trusts nothing a worker reports beyond what it can check: an engine endpoint is used only when it
is on the reporting worker pod's own IP (when that is known) and its port is inside the allowed range, so a
compromised worker cannot point the router at another address (a metadata service, another namespace).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from warmserve.protocol import WorkerState


@dataclass(frozen=True, order=True)
class Backend:
    """One ready engine: clients name `model`; the engine itself knows the model as `engine_model`."""

    model: str
    url: str  # "http://host:port"
    engine_model: str

    @property
    def address(self) -> str:
        return self.url.removeprefix("http://")


@dataclass(frozen=True)
class Snapshot:
    """Everything the router routes by: the known model names and the ready engines."""

    models: frozenset[str] = frozenset()
    backends: tuple[Backend, ...] = ()
    synced: bool = True  # False until discovery has listed everything once

    def backends_of(self, model: str) -> tuple[Backend, ...]:
        return tuple(b for b in self.backends if b.model == model)


@dataclass(frozen=True)
class WorkerReport:
    """A worker's state with what the router knows independently of it (its pod IP, None when local)."""

    state: WorkerState
    pod_ip: str | None = None
    name: str = ""


@dataclass(frozen=True)
class Rejected:
    """An endpoint a worker reported that the router refuses to use, and why."""

    worker: str
    endpoint: str
    reason: str


def check_endpoint(endpoint: str, pod_ip: str | None, ports: range) -> str | None:
    """Why `endpoint` ("host:port") must not be used, or None when it is acceptable."""
    host, sep, port_text = endpoint.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        return "not host:port"
    if int(port_text) not in ports:
        return f"port {port_text} outside {ports.start}-{ports.stop - 1}"
    if pod_ip is not None and host != pod_ip:
        return f"host {host} is not the worker pod's IP {pod_ip}"
    if pod_ip is None and host not in ("127.0.0.1", "localhost", "::1"):
        return f"host {host} is not local"
    return None


def build_snapshot(
    models: Mapping[str, str],
    workers: Iterable[WorkerReport],
    ports: range = range(1024, 65536),
    synced: bool = True,
) -> tuple[Snapshot, list[Rejected]]:
    """The routing snapshot from {ModelDeployment uid: served name} and the workers' reports.

    An engine counts when its replica is `serving` and ready, its uid belongs to a known ModelDeployment, and
    its endpoint passes `check_endpoint`; the engine knows the model by the name the worker reports for it.
    """
    backends: set[Backend] = set()
    rejected: list[Rejected] = []
    for w in workers:
        for r in w.state.replicas:
            if not (r.serving and r.ready and r.endpoint) or r.uid not in models:
                continue
            why = check_endpoint(r.endpoint, w.pod_ip, ports)
            if why is not None:
                rejected.append(Rejected(w.name, r.endpoint, why))
                continue
            backends.add(Backend(models[r.uid], f"http://{r.endpoint}", r.model))
    return Snapshot(frozenset(models.values()), tuple(sorted(backends)), synced), rejected
