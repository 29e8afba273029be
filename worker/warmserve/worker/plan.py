"""The operator → worker plan (annotation ``warmserve.io/plan``): parsing and validation.

Contract (DESIGN.md §5, written down in docs/worker.md)::

    {"generation": 7,
     "groups": [{"gpus": [0, 1],
                 "replicas": [{"model": "llama-8b", "uid": "<ModelDeployment uid>",
                               "source": "file:///models/llama-8b", "tp": 2,
                               "role": "warm" | "serve", "kvLend": 0}]}]}

A replica is identified by ``(uid, gpus)``: the ModelDeployment uid and the GPUs
it occupies (the first ``tp`` GPUs of its group). Placement legitimately puts two
replicas of one model on one worker (e.g. two TP1 engines on GPUs 0 and 1), so the
uid alone is not a key; two replicas with the same uid *and* GPUs are a duplicate.

Pure functions only; a malformed plan raises :class:`PlanError` with a message
that goes into the state annotation instead of crashing the agent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PLAN_ANNOTATION = "warmserve.io/plan"
STATE_ANNOTATION = "warmserve.io/state"
ROLES = ("warm", "serve")


class PlanError(ValueError):
    """The plan cannot be used as a whole."""


ReplicaKey = tuple[str, tuple[int, ...]]
"""``(ModelDeployment uid, GPUs the replica occupies)``: the identity of a replica on one worker."""


def replica_id(key: ReplicaKey) -> str:
    """The key as one string (``"<uid>@<gpu>-<gpu>"``), for ledger owners, engine records and file names.

    Kubernetes uids are UUIDs (no ``@``), and the GPU part is digits and dashes, so the
    last ``@`` separates the two unambiguously (:func:`parse_replica_id` inverts it).
    """
    uid, gpus = key
    return f"{uid}@{'-'.join(str(g) for g in gpus)}"


def parse_replica_id(text: str) -> ReplicaKey | None:
    """Inverse of :func:`replica_id`; ``None`` for a string that is not one (e.g. an older record)."""
    uid, sep, gpus = text.rpartition("@")
    if not sep or not uid or not gpus or not all(part.isdigit() for part in gpus.split("-")):
        return None
    return uid, tuple(int(part) for part in gpus.split("-"))


@dataclass(frozen=True)
class PlannedReplica:
    uid: str
    model: str
    source: str
    tp: int
    role: str
    kv_lend: int
    gpus: tuple[int, ...]

    @property
    def key(self) -> ReplicaKey:
        return (self.uid, self.gpus)

    @property
    def id(self) -> str:
        return replica_id(self.key)

    def device_of_rank(self, rank: int) -> str:
        return str(self.gpus[rank])

    @property
    def path(self) -> str:
        return source_path(self.source)


@dataclass(frozen=True)
class Plan:
    generation: int
    replicas: dict[ReplicaKey, PlannedReplica]


def source_path(source: str) -> str:
    """Local path of a model source; only ``file://`` (or a bare absolute path) is local."""
    if source.startswith("file://"):
        return source[len("file://") :]
    if source.startswith("/"):
        return source
    raise PlanError(
        f"unsupported model source {source!r}: the worker reads file:// paths "
        "(pvc:// and hf:// are resolved by the operator into a mounted file:// path)"
    )


def parse_plan(data: Any) -> Plan:
    """Validate a plan document; replicas are keyed by ``(uid, gpus)`` (see the module docstring)."""
    if not isinstance(data, dict):
        raise PlanError("plan must be a JSON object")
    try:
        generation = int(data["generation"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError("plan.generation must be an integer") from exc
    replicas: dict[ReplicaKey, PlannedReplica] = {}
    for gi, group in enumerate(data.get("groups") or []):
        gpus = group.get("gpus")
        if not isinstance(gpus, list) or not gpus or not all(isinstance(g, int) and g >= 0 for g in gpus):
            raise PlanError(f"groups[{gi}].gpus must be a non-empty list of GPU indices")
        if len(set(gpus)) != len(gpus):
            raise PlanError(f"groups[{gi}].gpus has duplicates")
        serving = 0
        for ri, rep in enumerate(group.get("replicas") or []):
            where = f"groups[{gi}].replicas[{ri}]"
            try:
                uid, model, source = str(rep["uid"]), str(rep["model"]), str(rep["source"])
            except (KeyError, TypeError) as exc:
                raise PlanError(f"{where}: model, uid and source are required") from exc
            tp = int(rep.get("tp", 1))
            role = rep.get("role", "warm")
            if role not in ROLES:
                raise PlanError(f"{where}: role must be one of {ROLES}")
            if tp < 1 or tp > len(gpus):
                raise PlanError(f"{where}: tp={tp} does not fit a group of {len(gpus)} GPUs")
            planned = PlannedReplica(uid, model, source, tp, role, int(rep.get("kvLend", 0) or 0), tuple(gpus[:tp]))
            if planned.key in replicas:
                raise PlanError(
                    f"{where}: duplicate replica: uid {uid} is already planned on GPUs {list(planned.gpus)}"
                )
            serving += role == "serve"
            replicas[planned.key] = planned
        if serving > 1:
            raise PlanError(f"groups[{gi}]: at most one replica per group may be served")
    return Plan(generation, replicas)
