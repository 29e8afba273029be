"""The operator ⇄ worker protocol (DESIGN.md §5): annotations `warmserve.io/plan` and `warmserve.io/state`.

Pure: JSON in, frozen values out, and back. The operator is the only writer of the plan and the worker the
only writer of the state, so each side parses the other's annotation defensively (a malformed annotation is
a `ProtocolError`, never a crash of the control loop) and renders its own canonically (sorted keys, groups
and replicas in a stable order), so that "did the plan change?" is a plain comparison of contents.

Plan::

    {"generation": int,
     "groups": [{"gpus": [int, ...],
                 "replicas": [{"model": str, "uid": str, "source": str, "tp": int,
                               "role": "warm" | "serve", "kvLend": int}]}]}

State (written by worker/warmserve/worker/agent.py, `Agent.state`)::

    {"observedGeneration": int,            # 0 before the worker has applied any plan
     "devices": [{"index": int, "totalBytes": int, "usedBytes": int, "freeBytes": int}],
     "replicas": [{"model", "uid", "gpus", "phase": "loading|warm|starting|serving|evicting",
                   "progress": float, "endpoint": "host:port" | null, "ready": bool}],
     "errors": [{"reason": str, "uid": str, "gpus": [int]}],   # uid/gpus only for a replica's failure
     "timings": {...}}

A replica is identified by `(uid, gpus)`: `gpus` are the GPUs it occupies (the first `tp` of its plan group),
so two replicas of one model on one worker are distinct. Extra fields the worker writes (documented in
docs/worker.md) are ignored here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

GROUP = "warmserve.io"
VERSION = "v1alpha1"
PLAN_ANNOTATION = "warmserve.io/plan"
STATE_ANNOTATION = "warmserve.io/state"
POOL_LABEL = "warmserve.io/pool"

ROLES = ("warm", "serve")
PHASES = ("loading", "warm", "starting", "serving", "evicting")


class ProtocolError(ValueError):
    """An annotation does not follow the protocol; the caller reports it and carries on."""


@dataclass(frozen=True, order=True)
class PlanReplica:
    """One replica a GPU group must hold: weights only (`warm`) or a running engine (`serve`)."""

    model: str
    uid: str
    source: str
    tp: int
    role: str = "warm"
    kv_lend: int = 0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ProtocolError(f"replica of {self.model}: role {self.role!r} is not one of {ROLES}")
        if self.tp < 1:
            raise ProtocolError(f"replica of {self.model}: tp must be at least 1")
        if self.kv_lend < 0:
            raise ProtocolError(f"replica of {self.model}: kvLend must not be negative")

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "uid": self.uid,
            "source": self.source,
            "tp": self.tp,
            "role": self.role,
            "kvLend": self.kv_lend,
        }


@dataclass(frozen=True, order=True)
class PlanGroup:
    """An aligned group of GPU indices on one worker and the replicas that live on it."""

    gpus: tuple[int, ...]
    replicas: tuple[PlanReplica, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"gpus": list(self.gpus), "replicas": [r.to_json() for r in self.replicas]}


@dataclass(frozen=True)
class Plan:
    """What one worker pod must hold; `generation` increases every time the contents change."""

    generation: int
    groups: tuple[PlanGroup, ...] = ()

    @classmethod
    def build(cls, generation: int, groups: Iterable[PlanGroup]) -> Plan:
        """Canonical form: groups sorted by GPUs, replicas sorted, empty groups dropped."""
        canonical = sorted(PlanGroup(tuple(sorted(g.gpus)), tuple(sorted(g.replicas))) for g in groups if g.replicas)
        return cls(generation, tuple(canonical))

    def same_contents(self, other: Plan | None) -> bool:
        """True when both plans ask for the same replicas (generations aside)."""
        return other is not None and self.groups == other.groups

    def models(self) -> set[str]:
        return {r.model for g in self.groups for r in g.replicas}

    def uids(self) -> set[str]:
        return {r.uid for g in self.groups for r in g.replicas}

    def to_json(self) -> dict[str, Any]:
        return {"generation": self.generation, "groups": [g.to_json() for g in self.groups]}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{what} must be an integer, got {value!r}")
    return value


def _load(text: str | Mapping[str, Any], what: str) -> Mapping[str, Any]:
    if isinstance(text, Mapping):
        return text
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{what} is not JSON: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ProtocolError(f"{what} must be a JSON object")
    return data


def parse_plan(text: str | Mapping[str, Any]) -> Plan:
    """Parse a `warmserve.io/plan` annotation (the worker's reading of it, and the operator's on restart)."""
    data = _load(text, "plan")
    generation = _int(data.get("generation"), "plan.generation")
    groups = []
    for g in data.get("groups") or []:
        if not isinstance(g, Mapping):
            raise ProtocolError("plan.groups[] must be objects")
        gpus = tuple(_int(i, "plan.groups[].gpus[]") for i in g.get("gpus") or [])
        replicas = []
        for r in g.get("replicas") or []:
            if not isinstance(r, Mapping):
                raise ProtocolError("plan.groups[].replicas[] must be objects")
            try:
                replicas.append(
                    PlanReplica(
                        model=str(r["model"]),
                        uid=str(r["uid"]),
                        source=str(r["source"]),
                        tp=_int(r.get("tp", 1), "tp"),
                        role=str(r.get("role", "warm")),
                        kv_lend=_int(r.get("kvLend", 0), "kvLend"),
                    )
                )
            except KeyError as exc:
                raise ProtocolError(f"plan replica misses {exc.args[0]!r}") from exc
        groups.append(PlanGroup(gpus, tuple(replicas)))
    return Plan.build(generation, groups)


@dataclass(frozen=True)
class DeviceState:
    """Arena bytes of one GPU as the worker reports them."""

    index: int
    total_bytes: int
    used_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class ReplicaState:
    """One replica as the worker reports it."""

    model: str
    uid: str
    gpus: tuple[int, ...]
    phase: str
    progress: float = 0.0
    endpoint: str | None = None
    ready: bool = False

    @property
    def serving(self) -> bool:
        return self.phase == "serving"

    @property
    def dedicated(self) -> bool:
        return self.phase in ("starting", "serving")


@dataclass(frozen=True)
class WorkerError:
    """One error a worker reports: a rejected plan (no uid) or a replica it could not hold."""

    reason: str
    uid: str = ""
    gpus: tuple[int, ...] = ()

    def __str__(self) -> str:
        return f"{self.uid} on GPUs {list(self.gpus)}: {self.reason}" if self.uid else self.reason


@dataclass(frozen=True)
class WorkerState:
    """Everything a worker writes into `warmserve.io/state`."""

    observed_generation: int
    devices: tuple[DeviceState, ...] = ()
    replicas: tuple[ReplicaState, ...] = ()
    errors: tuple[WorkerError, ...] = ()
    timings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def free_bytes(self) -> int:
        return sum(d.free_bytes for d in self.devices)


def _gpus(raw: Any, what: str) -> tuple[int, ...]:
    if not isinstance(raw, list):
        raise ProtocolError(f"{what} must be a list of GPU indices")
    return tuple(_int(i, f"{what}[]") for i in raw)


def _objects(data: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    items = data.get(key) or []
    if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
        raise ProtocolError(f"state.{key} must be a list of objects")
    return items


def parse_state(text: str | Mapping[str, Any]) -> WorkerState:
    """Parse a `warmserve.io/state` annotation: exactly the shape of DESIGN.md §5 (module docstring).

    Anything else (a missing required field, a wrong type, an unknown phase) is a `ProtocolError`.
    """
    data = _load(text, "state")
    observed = _int(data.get("observedGeneration"), "state.observedGeneration")
    try:
        devices = tuple(
            DeviceState(
                index=_int(d["index"], "devices[].index"),
                total_bytes=_int(d["totalBytes"], "devices[].totalBytes"),
                used_bytes=_int(d["usedBytes"], "devices[].usedBytes"),
                free_bytes=_int(d["freeBytes"], "devices[].freeBytes"),
            )
            for d in _objects(data, "devices")
        )
        replicas = []
        for r in _objects(data, "replicas"):
            phase = str(r["phase"])
            if phase not in PHASES:
                raise ProtocolError(f"state replica phase {phase!r} is not one of {PHASES}")
            endpoint = r.get("endpoint")
            if endpoint is not None and not isinstance(endpoint, str):
                raise ProtocolError(f'state replica endpoint must be "host:port" or null, got {endpoint!r}')
            replicas.append(
                ReplicaState(
                    model=str(r["model"]),
                    uid=str(r["uid"]),
                    gpus=_gpus(r["gpus"], "replicas[].gpus"),
                    phase=phase,
                    progress=float(r.get("progress") or 0.0),
                    endpoint=endpoint,
                    ready=r.get("ready") is True,
                )
            )
        errors = tuple(
            WorkerError(str(e["reason"]), str(e.get("uid") or ""), _gpus(e.get("gpus") or [], "errors[].gpus"))
            for e in _objects(data, "errors")
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ProtocolError):
            raise
        raise ProtocolError(f"state malformed: missing or invalid {exc}") from exc
    timings = data.get("timings") or {}
    if not isinstance(timings, Mapping):
        raise ProtocolError("state.timings must be an object")
    return WorkerState(observed, devices, tuple(replicas), errors, dict(timings))


def plan_of_pod(pod: Mapping[str, Any]) -> Plan | None:
    """The plan currently on a pod, or None when absent or unreadable (then it is rewritten)."""
    text = ((pod.get("metadata") or {}).get("annotations") or {}).get(PLAN_ANNOTATION)
    if not text:
        return None
    try:
        return parse_plan(text)
    except ProtocolError:
        return None


def state_of_pod(pod: Mapping[str, Any]) -> WorkerState | None:
    """The state a worker pod reports; None when it has not reported yet. Raises ProtocolError if garbled."""
    text = ((pod.get("metadata") or {}).get("annotations") or {}).get(STATE_ANNOTATION)
    if not text:
        return None
    return parse_state(text)


def next_generation(previous: Plan | None, desired: Plan) -> Plan:
    """Give `desired` a generation: unchanged contents keep the previous plan, a change increments it.

    This is what makes the annotation write idempotent (nothing is written when nothing changed) and the
    generation monotonic across operator restarts (the previous plan is read back from the pod).
    """
    if previous is not None and previous.same_contents(desired):
        return previous
    base = previous.generation if previous is not None else 0
    return Plan(max(base, desired.generation - 1) + 1, desired.groups)
