"""The operator ⇄ worker protocol: the `warmserve.io/plan` and `warmserve.io/state` pod annotations.

This is the only module that knows the wire format; the operator (`warmserve.controller`) and the worker
(`warmserve.worker`) both import it, and no annotation key, label key, role or phase string is spelled
anywhere else. It is pure: JSON in, frozen values out, and back.

The operator is the only writer of the plan and the worker the only writer of the state, so each side parses
the other's annotation defensively (a malformed document is a `ProtocolError` with a message naming the
field, never a crash) and renders its own canonically (sorted keys, groups and replicas in a stable order),
so that "did the plan change?" is a plain comparison of contents. Both sides parse with the same function,
so they cannot disagree about what a valid plan is.

Plan::

    {"generation": int,
     "groups": [{"gpus": [int, ...],                  # non-empty, distinct, >= 0
                 "replicas": [{"model": str, "uid": str, "source": str, "tp": int,
                               "role": "warm" | "serve", "kvLend": int, "standby"?: bool,
                               "engine"?: {"args"?: [str], "maxModelLen"?: int, "dtype"?: str}}]}]}

A replica with `tp = k` occupies the first `k` GPUs of its group; at most one replica of a group is served.
`engine` (the ModelDeployment's `spec.engine.args`, `spec.engine.maxModelLen`, `spec.model.dtype`) is present
only when one of them is set; `EngineSettings.argv()` is what the worker appends to `vllm serve`, after checking
it with `forbidden_engine_flag` (the operator refuses such a ModelDeployment before it is planned).
`standby: true` (warm replicas only, present only when true) asks the worker to keep a pre-initialised engine
for the replica (`warmserve.core.standby`); a worker with no standby engines configured ignores it.

State::

    {"observedGeneration": int,            # 0 before the worker has applied any plan
     "devices": [{"index": int, "totalBytes": int, "usedBytes": int, "freeBytes": int,
                  "kind"?: str, "pageSize"?: int, "largestFreeRun"?: int}],
     "replicas": [{"model", "uid", "gpus", "phase": "loading|warm|starting|serving|evicting",
                   "progress": float, "endpoint": "host:port" | null, "ready": bool,
                   "role"?: str | null, "tp"?: int, "kvLend"?: int, "bytes"?: int}],
     "engines"?: [{"uid", "gpus", "model", "endpoint", "ready", "pid"}],
     "errors": [{"reason": str, "uid"?: str, "gpus"?: [int]}],   # uid/gpus only for a replica's failure
     "timings": {op: {...}},
     "capabilities"?: {"kvLend": bool, "tpPromotion": bool, "standbyEngines": bool, "engineSettings": bool,
                       "deviceKind": str, "reasons": {capability: why unsupported}},
     "standby"?: [{"model": str, "ready": bool, "bytes": int}]}

`capabilities` absent means an older worker that does not say: the operator then assumes none (no `kvLend`,
no `tp > 1` engine). `standby` lists pre-initialised engines, which serve nothing: never endpoints.

A replica is identified by `ReplicaKey(uid, gpus)`: `gpus` are the GPUs it occupies, so two replicas of one
model on one worker are distinct (placement puts two TP1 engines of a model on GPUs 0 and 1).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property, total_ordering
from typing import Any

GROUP = "warmserve.io"
VERSION = "v1alpha1"
PLAN_ANNOTATION = f"{GROUP}/plan"
STATE_ANNOTATION = f"{GROUP}/state"
POOL_LABEL = f"{GROUP}/pool"
#: Engines of a worker listen on `enginePortBase` .. `enginePortBase + ENGINE_PORT_SPAN - 1`; an endpoint a
#: worker reports outside that range (or off its pod's IP) is not used by the operator or the router.
ENGINE_PORT_SPAN = 64
#: The largest plan generation either side honours (int64-safe and exact in a JSON double); a reported
#: `observedGeneration` above it is not believed.
MAX_GENERATION = 2**53 - 1


def engine_ports(base: int) -> range:
    """The ports a worker's engines may listen on, for a pool whose `worker.enginePortBase` is `base`."""
    return range(base, base + ENGINE_PORT_SPAN)


class Role(StrEnum):
    """What a planned replica is for: hold the weights (`warm`) or hold them and run an engine (`serve`)."""

    WARM = "warm"
    SERVE = "serve"


class Phase(StrEnum):
    """Where a replica the worker holds stands."""

    LOADING = "loading"
    WARM = "warm"
    STARTING = "starting"
    SERVING = "serving"
    EVICTING = "evicting"


ROLES = tuple(Role)
PHASES = tuple(Phase)


class ProtocolError(ValueError):
    """A document does not follow the protocol; the caller reports it and carries on."""


# -- replica identity ---------------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class ReplicaKey:
    """`(ModelDeployment uid, GPUs the replica occupies)`: the identity of a replica on one worker."""

    uid: str
    gpus: tuple[int, ...]

    @property
    def id(self) -> str:
        """One string (`"<uid>@<gpu>-<gpu>"`) for ledger owners, engine records and file names.

        Kubernetes uids are UUIDs (no `@`) and the GPU part is digits and dashes, so the last `@` separates
        the two unambiguously (`ReplicaKey.parse` inverts it).
        """
        return f"{self.uid}@{'-'.join(str(g) for g in self.gpus)}"

    @classmethod
    def parse(cls, text: str) -> ReplicaKey | None:
        """Inverse of `id`; None for a string that is not one (e.g. a record of an older worker)."""
        uid, sep, gpus = text.rpartition("@")
        if not sep or not uid or not gpus or not all(part.isdigit() for part in gpus.split("-")):
            return None
        return cls(uid, tuple(int(part) for part in gpus.split("-")))

    def __str__(self) -> str:
        return self.id


# -- field readers -------------------------------------------------------------------------------------------
def _int(value: Any, what: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{what} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ProtocolError(f"{what} must be at least {minimum}, got {value}")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ProtocolError(f"{what} must be an object, got {type(value).__name__}")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ProtocolError(f"{what} must be a list, got {type(value).__name__}")
    return value


def _gpus(raw: Any, what: str) -> tuple[int, ...]:
    return tuple(_int(i, f"{what}[]", minimum=0) for i in _list(raw, what))


def _load(text: str | bytes | Mapping[str, Any], what: str) -> Mapping[str, Any]:
    if isinstance(text, Mapping):
        return text
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{what} is not JSON: {exc}") from exc
    return _object(data, what)


def _dumps(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


# -- engine settings -----------------------------------------------------------------------------------------
#: The dtypes a ModelDeployment's `spec.model.dtype` may name (the CRD's enum); `auto` is vLLM's own default.
DTYPES = ("auto", "float16", "bfloat16", "float32")
MAX_ENGINE_ARGS = 64  # the CRD's `spec.engine.args` maxItems
MAX_ENGINE_ARG_CHARS = 512  # the CRD's maxLength of one entry

#: vLLM flags a ModelDeployment's `spec.engine.args` must not carry, because the worker sets them itself or
#: because they would break its contract (`forbidden_engine_flag` also refuses their `--flag=value`, underscore,
#: `--no-` and abbreviated spellings):
FORBIDDEN_ENGINE_FLAGS = frozenset(
    {
        # the worker owns the engine's endpoint (a port in its pool's engine range, on its pod's IP)
        "--port",
        "--host",
        "--uds",
        # the worker maps the weights it holds into the engine: the model, its name and how it is loaded
        "--model",
        "--served-model-name",
        "--load-format",
        "--model-loader-extra-config",
        "--download-dir",
        # the worker places the engine on the GPUs of its group, in its own process layout
        "--device",
        "--tensor-parallel-size",
        "-tp",
        "--pipeline-parallel-size",
        "-pp",
        "--data-parallel-size",
        "-dp",
        "--distributed-executor-backend",
        # the worker's arena accounts for every byte of the device: the engine's memory budget is the worker's
        "--gpu-memory-utilization",
        "--kv-cache-memory-bytes",
        "--cpu-offload-gb",
        "--swap-space",
        "--enable-sleep-mode",
        # code, files and secrets an engine would load or serve with the worker's privileges
        "--worker-extension-cls",
        "--middleware",
        "--trust-remote-code",
        "--api-key",
        "--ssl-keyfile",
        "--ssl-certfile",
        "--allowed-local-media-path",
        "--config",  # reads more flags from a file, past this check
        # set from their own CRD fields (spec.engine.maxModelLen, spec.model.dtype): `EngineSettings.argv()`
        "--max-model-len",
        "--dtype",
    }
)
_FORBIDDEN_LONG = tuple(sorted(f for f in FORBIDDEN_ENGINE_FLAGS if f.startswith("--")))
_FORBIDDEN_SHORT = tuple(sorted(f for f in FORBIDDEN_ENGINE_FLAGS if not f.startswith("--")))


def _flag_name(arg: str) -> str:
    """The option an argument names: up to the first `=` or whitespace, lower case, `_` spelled `-`."""
    name = arg.split("=", 1)[0].split(None, 1)[0] if arg.strip() else arg
    return name.lower().replace("_", "-")


def forbidden_engine_flag(args: Sequence[str]) -> str | None:
    """The first argument of `args` that would break the worker's contract, or None.

    For a flag: the entry of `FORBIDDEN_ENGINE_FLAGS` it spells, in any form vLLM's parser accepts: exact,
    `--flag=value`, `--flag_with_underscores`, `--no-flag`, an abbreviation argparse would expand (`--tensor-par`,
    `-t`) and a short flag with its value glued on (`-tp8`). For an argument holding a NUL or a line break:
    that argument's `repr()` (shortened). Every argument that starts with `-` is checked, wherever it is (vLLM
    reads one as a flag even after a flag that takes a value); any other passes (vLLM refuses unknown ones).
    """
    for arg in args:
        if any(ch in arg for ch in "\x00\n\r"):
            return repr(arg[:64])
        if not arg.startswith("-") or len(arg) < 2:
            continue
        name = _flag_name(arg)
        if name.startswith("--"):
            if len(name) <= 2:
                continue  # `--`: the end of the options, not one
            candidates = [name] + ([f"--{name[5:]}"] if name.startswith("--no-") and len(name) > 5 else [])
            for flag in candidates:
                if flag in FORBIDDEN_ENGINE_FLAGS:
                    return flag
                abbreviates = [f for f in _FORBIDDEN_LONG if f.startswith(flag)]
                if abbreviates:
                    return abbreviates[0]
        elif len(name) >= 2:
            for short in _FORBIDDEN_SHORT:
                if name.startswith(short) or short.startswith(name):
                    return short
    return None


def _engine_problem(args: Any, max_model_len: Any, dtype: Any, what: str) -> str | None:
    if not isinstance(args, list | tuple):
        return f"{what}.args must be a list, got {type(args).__name__}"
    if len(args) > MAX_ENGINE_ARGS:
        return f"{what}.args has {len(args)} entries; at most {MAX_ENGINE_ARGS} are allowed"
    for i, arg in enumerate(args):
        if not isinstance(arg, str):
            return f"{what}.args[{i}] must be a string, got {arg!r}"[:200]
        if len(arg) > MAX_ENGINE_ARG_CHARS:
            return f"{what}.args[{i}] is {len(arg)} characters long; at most {MAX_ENGINE_ARG_CHARS} are allowed"
    if max_model_len is not None and (
        isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len < 1
    ):
        return f"{what}.maxModelLen must be an integer of at least 1, got {max_model_len!r}"
    if dtype is not None and dtype not in DTYPES:
        return f"{what}.dtype must be one of {list(DTYPES)}, got {dtype!r}"[:200]
    return None


@total_ordering
@dataclass(frozen=True)
class EngineSettings:
    """How the engine of a replica is configured: a ModelDeployment's `spec.engine.args`,
    `spec.engine.maxModelLen` and `spec.model.dtype`. The default (nothing set) is not written into a plan."""

    args: tuple[str, ...] = ()
    max_model_len: int | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.args, list):
            object.__setattr__(self, "args", tuple(self.args))
        problem = _engine_problem(self.args, self.max_model_len, self.dtype, "engine")
        if problem is not None:
            raise ProtocolError(problem)

    @property
    def empty(self) -> bool:
        return not self.args and self.max_model_len is None and self.dtype is None

    def _key(self) -> tuple[tuple[str, ...], int, str]:
        return (self.args, self.max_model_len or 0, self.dtype or "")

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, EngineSettings):
            return NotImplemented
        return self._key() < other._key()

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.args:
            doc["args"] = list(self.args)
        if self.max_model_len is not None:
            doc["maxModelLen"] = self.max_model_len
        if self.dtype is not None:
            doc["dtype"] = self.dtype
        return doc

    def argv(self) -> list[str]:
        """The vLLM flags, in order: `--dtype X`, `--max-model-len N`, then `args` as given."""
        out: list[str] = []
        if self.dtype is not None:
            out += ["--dtype", self.dtype]
        if self.max_model_len is not None:
            out += ["--max-model-len", str(self.max_model_len)]
        return out + list(self.args)


def _engine_settings(raw: Any, what: str) -> EngineSettings:
    if raw is None:
        return EngineSettings()
    doc = _object(raw, what)
    args = doc.get("args")
    args = [] if args is None else args
    problem = _engine_problem(args, doc.get("maxModelLen"), doc.get("dtype"), what)
    if problem is not None:
        raise ProtocolError(problem)
    return EngineSettings(tuple(args), doc.get("maxModelLen"), doc.get("dtype"))


# -- plan ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class PlanReplica:
    """One replica a GPU group must hold: weights only (`warm`) or a running engine (`serve`)."""

    model: str
    uid: str
    source: str
    tp: int
    role: Role = Role.WARM
    kv_lend: int = 0
    engine: EngineSettings = field(default_factory=EngineSettings)
    standby: bool = False  # keep a pre-initialised engine for this warm replica

    def __post_init__(self) -> None:
        if self.standby and self.role != Role.WARM:
            raise ProtocolError(f"replica of {self.model}: only a warm replica can ask for a standby engine")
        if self.role not in ROLES:
            raise ProtocolError(f"replica of {self.model}: role {self.role!r} is not one of {list(ROLES)}")
        if self.tp < 1:
            raise ProtocolError(f"replica of {self.model}: tp must be at least 1")
        if self.kv_lend < 0:
            raise ProtocolError(f"replica of {self.model}: kvLend must not be negative")

    def to_json(self) -> dict[str, Any]:
        return (
            {
                "model": self.model,
                "uid": self.uid,
                "source": self.source,
                "tp": self.tp,
                "role": str(self.role),
                "kvLend": self.kv_lend,
            }
            | ({} if self.engine.empty else {"engine": self.engine.to_json()})
            | ({"standby": True} if self.standby else {})
        )


@dataclass(frozen=True)
class PlannedReplica:
    """A plan replica together with the GPUs it occupies (the first `tp` of its group): the worker's view."""

    spec: PlanReplica
    gpus: tuple[int, ...]

    @property
    def key(self) -> ReplicaKey:
        return ReplicaKey(self.spec.uid, self.gpus)

    @property
    def uid(self) -> str:
        return self.spec.uid

    @property
    def model(self) -> str:
        return self.spec.model

    @property
    def source(self) -> str:
        return self.spec.source

    @property
    def tp(self) -> int:
        return self.spec.tp

    @property
    def role(self) -> Role:
        return self.spec.role

    @property
    def kv_lend(self) -> int:
        return self.spec.kv_lend

    @property
    def engine(self) -> EngineSettings:
        """How to configure this replica's engine (`EngineSettings.argv()`: the flags for `vllm serve`)."""
        return self.spec.engine

    @property
    def serves(self) -> bool:
        return self.spec.role == Role.SERVE

    def device_of_rank(self, rank: int) -> str:
        """The device name (GPU index as a string) that holds tensor-parallel rank `rank`."""
        return str(self.gpus[rank])


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

    @cached_property
    def replicas(self) -> dict[ReplicaKey, PlannedReplica]:
        """Every replica keyed by `(uid, gpus)` (unique: `parse_plan` refuses duplicates)."""
        out: dict[ReplicaKey, PlannedReplica] = {}
        for g in self.groups:
            for r in g.replicas:
                planned = PlannedReplica(r, g.gpus[: r.tp])
                out[planned.key] = planned
        return out

    def to_json(self) -> dict[str, Any]:
        return {"generation": self.generation, "groups": [g.to_json() for g in self.groups]}

    def dumps(self) -> str:
        return _dumps(self.to_json())


def parse_plan(text: str | bytes | Mapping[str, Any]) -> Plan:
    """Parse and validate a `warmserve.io/plan` document (the worker's reading, and the operator's on restart).

    Refused, with a message naming the field: a generation that is not a non-negative integer; a group
    without GPUs, with a negative or repeated GPU index; a replica missing `model`, `uid` or `source`, with a
    role that is not `warm`/`serve`, a `tp` that does not fit its group, a negative `kvLend`, an `engine` that is
    not an object (`args`: at most 64 strings of at most 512 characters; `maxModelLen`: an integer >= 1; `dtype`:
    one of `DTYPES`); two replicas
    with the same `(uid, gpus)`; more than one served replica in a group.
    """
    data = _load(text, "plan")
    generation = _int(data.get("generation"), "plan.generation", minimum=0)
    groups: list[PlanGroup] = []
    seen: set[ReplicaKey] = set()
    for gi, raw_group in enumerate(_list(data.get("groups"), "plan.groups")):
        where_g = f"plan.groups[{gi}]"
        group = _object(raw_group, where_g)
        gpus = _gpus(group.get("gpus"), f"{where_g}.gpus")
        if not gpus:
            raise ProtocolError(f"{where_g}.gpus must be a non-empty list of GPU indices")
        if len(set(gpus)) != len(gpus):
            raise ProtocolError(f"{where_g}.gpus has duplicates: {list(gpus)}")
        replicas: list[PlanReplica] = []
        for ri, raw_rep in enumerate(_list(group.get("replicas"), f"{where_g}.replicas")):
            where = f"{where_g}.replicas[{ri}]"
            rep = _object(raw_rep, where)
            role = rep.get("role", Role.WARM.value)
            if role not in ROLES:
                raise ProtocolError(f"{where}.role must be one of {[str(r) for r in ROLES]}, got {role!r}")
            tp = _int(rep.get("tp", 1), f"{where}.tp", minimum=1)
            if tp > len(gpus):
                raise ProtocolError(f"{where}: tp={tp} does not fit a group of {len(gpus)} GPUs")
            replica = PlanReplica(
                model=_str(rep.get("model"), f"{where}.model"),
                uid=_str(rep.get("uid"), f"{where}.uid"),
                source=_str(rep.get("source"), f"{where}.source"),
                tp=tp,
                role=Role(role),
                kv_lend=_int(rep.get("kvLend", 0), f"{where}.kvLend", minimum=0),
                engine=_engine_settings(rep.get("engine"), f"{where}.engine"),
                standby=_bool(rep.get("standby"), f"{where}.standby"),
            )
            key = ReplicaKey(replica.uid, gpus[:tp])
            if key in seen:
                raise ProtocolError(
                    f"{where}: duplicate replica: uid {replica.uid} is already planned on GPUs {list(key.gpus)}"
                )
            seen.add(key)
            replicas.append(replica)
        if sum(r.role == Role.SERVE for r in replicas) > 1:
            raise ProtocolError(f"{where_g}: at most one replica per group may be served")
        groups.append(PlanGroup(gpus, tuple(replicas)))
    return Plan.build(generation, groups)


#: The fields `parse_plan` reads, per level (anything else is an unknown field: accepted, see `unknown_plan_fields`).
PLAN_FIELDS = frozenset({"generation", "groups"})
PLAN_GROUP_FIELDS = frozenset({"gpus", "replicas"})
PLAN_REPLICA_FIELDS = frozenset({"model", "uid", "source", "tp", "role", "kvLend", "engine", "standby"})
PLAN_ENGINE_FIELDS = frozenset({"args", "maxModelLen", "dtype"})


def unknown_plan_fields(text: str | bytes | Mapping[str, Any]) -> list[str]:
    """The fields of a plan document that `parse_plan` does not read, as paths (`plan.groups[0].x`).

    Unknown fields are not refused (a newer operator may add some); the worker logs them. Call it on a document
    `parse_plan` accepted; for anything else it returns what it can (never raises `ProtocolError`).
    """
    try:
        data = _load(text, "plan")
    except ProtocolError:
        return []
    out = [f"plan.{k}" for k in data if k not in PLAN_FIELDS]
    groups = data.get("groups")
    for gi, group in enumerate(groups if isinstance(groups, list) else []):
        if not isinstance(group, Mapping):
            continue
        out += [f"plan.groups[{gi}].{k}" for k in group if k not in PLAN_GROUP_FIELDS]
        replicas = group.get("replicas")
        for ri, rep in enumerate(replicas if isinstance(replicas, list) else []):
            if isinstance(rep, Mapping):
                out += [f"plan.groups[{gi}].replicas[{ri}].{k}" for k in rep if k not in PLAN_REPLICA_FIELDS]
                engine = rep.get("engine")
                if isinstance(engine, Mapping):
                    out += [
                        f"plan.groups[{gi}].replicas[{ri}].engine.{k}" for k in engine if k not in PLAN_ENGINE_FIELDS
                    ]
    return out


def next_generation(previous: Plan | None, desired: Plan) -> Plan:
    """Give `desired` a generation: unchanged contents keep the previous plan, a change increments it.

    This is what makes the annotation write idempotent (nothing is written when nothing changed) and the
    generation monotonic across operator restarts (the previous plan is read back from the pod).
    """
    if previous is not None and previous.same_contents(desired):
        return previous
    base = previous.generation if previous is not None else 0
    return Plan(max(base, desired.generation - 1) + 1, desired.groups)


# -- state ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceState:
    """Arena bytes of one GPU as the worker reports them (`kind`, `page_size`, `largest_free_run` optional)."""

    index: int
    total_bytes: int
    used_bytes: int
    free_bytes: int
    kind: str | None = None
    page_size: int | None = None
    largest_free_run: int | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "index": self.index,
            "totalBytes": self.total_bytes,
            "usedBytes": self.used_bytes,
            "freeBytes": self.free_bytes,
        }
        for key, value in (
            ("kind", self.kind),
            ("pageSize", self.page_size),
            ("largestFreeRun", self.largest_free_run),
        ):
            if value is not None:
                doc[key] = value
        return doc


@dataclass(frozen=True)
class ReplicaState:
    """One replica as the worker reports it."""

    model: str
    uid: str
    gpus: tuple[int, ...]
    phase: Phase
    progress: float = 0.0
    endpoint: str | None = None
    ready: bool = False
    role: Role | None = None
    tp: int | None = None
    kv_lend: int = 0
    bytes: int = 0

    @property
    def key(self) -> ReplicaKey:
        return ReplicaKey(self.uid, self.gpus)

    @property
    def serving(self) -> bool:
        return self.phase == Phase.SERVING

    @property
    def dedicated(self) -> bool:
        return self.phase in (Phase.STARTING, Phase.SERVING)

    def to_json(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "model": self.model,
            "gpus": list(self.gpus),
            "phase": str(self.phase),
            "progress": self.progress,
            "endpoint": self.endpoint,
            "ready": self.ready,
            "role": str(self.role) if self.role is not None else None,
            "tp": self.tp if self.tp is not None else len(self.gpus),
            "kvLend": self.kv_lend,
            "bytes": self.bytes,
        }


@dataclass(frozen=True)
class EngineState:
    """One engine process of the worker (informational: the replica list carries what the operator uses)."""

    uid: str
    gpus: tuple[int, ...]
    model: str
    endpoint: str | None
    ready: bool
    pid: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "gpus": list(self.gpus),
            "model": self.model,
            "endpoint": self.endpoint,
            "ready": self.ready,
            "pid": self.pid,
        }


@dataclass(frozen=True)
class WorkerError:
    """One error a worker reports: a rejected plan (no uid) or a replica it could not hold."""

    reason: str
    uid: str = ""
    gpus: tuple[int, ...] = ()

    def __str__(self) -> str:
        return f"{self.uid} on GPUs {list(self.gpus)}: {self.reason}" if self.uid else self.reason

    def to_json(self) -> dict[str, Any]:
        if not self.uid:
            return {"reason": self.reason}
        return {"uid": self.uid, "gpus": list(self.gpus), "reason": self.reason}


@dataclass(frozen=True)
class Capabilities:
    """What a worker says it can do; the operator plans nothing else for it.

    `kv_lend`: it can lend an engine's idle KV space to warm replicas (`kvLend > 0` in a plan); `tp_promotion`: it
    can start a `tp > 1` engine from the warm shards it holds; `standby_engines`: it pre-initialises engines
    (reported in `WorkerState.standby`); `engine_settings`: it applies a plan replica's `engine`; `device_kind`:
    what its devices are (e.g. "cuda", "cpu"); `reasons`: capability name (the JSON key, e.g. "kvLend") → why it
    is not supported.
    """

    kv_lend: bool = False
    tp_promotion: bool = False
    standby_engines: bool = False
    engine_settings: bool = False
    device_kind: str = ""
    reasons: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "kvLend": self.kv_lend,
            "tpPromotion": self.tp_promotion,
            "standbyEngines": self.standby_engines,
            "engineSettings": self.engine_settings,
            "deviceKind": self.device_kind,
            "reasons": dict(self.reasons),
        }


@dataclass(frozen=True)
class StandbyState:
    """A pre-initialised engine a worker keeps for `model` (not serving: never an endpoint, never a replica)."""

    model: str
    ready: bool
    bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "ready": self.ready, "bytes": self.bytes}


@dataclass(frozen=True)
class WorkerState:
    """Everything a worker writes into `warmserve.io/state`."""

    observed_generation: int
    devices: tuple[DeviceState, ...] = ()
    replicas: tuple[ReplicaState, ...] = ()
    errors: tuple[WorkerError, ...] = ()
    timings: Mapping[str, Any] = field(default_factory=dict)
    engines: tuple[EngineState, ...] = ()
    capabilities: Capabilities | None = None  # None: a worker that does not say (assume it supports nothing)
    standby: tuple[StandbyState, ...] = ()

    @property
    def free_bytes(self) -> int:
        return sum(d.free_bytes for d in self.devices)

    def to_json(self) -> dict[str, Any]:
        return {
            "observedGeneration": self.observed_generation,
            "devices": [d.to_json() for d in self.devices],
            "replicas": [r.to_json() for r in self.replicas],
            "engines": [e.to_json() for e in self.engines],
            "errors": [e.to_json() for e in self.errors],
            "timings": {op: dict(t) for op, t in self.timings.items()},
        } | self._optional_json()

    def _optional_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.capabilities is not None:
            doc["capabilities"] = self.capabilities.to_json()
        if self.standby:
            doc["standby"] = [s.to_json() for s in self.standby]
        return doc

    def dumps(self) -> str:
        return _dumps(self.to_json())


def _opt_int(value: Any, what: str) -> int | None:
    return None if value is None else _int(value, what)


def parse_state(text: str | bytes | Mapping[str, Any]) -> WorkerState:
    """Parse a `warmserve.io/state` document; anything off the contract is a `ProtocolError` naming the field."""
    data = _load(text, "state")
    observed = _int(data.get("observedGeneration"), "state.observedGeneration", minimum=0)
    devices = []
    for i, raw in enumerate(_list(data.get("devices"), "state.devices")):
        d = _object(raw, f"state.devices[{i}]")
        where = f"state.devices[{i}]"
        kind = d.get("kind")
        if kind is not None and not isinstance(kind, str):
            raise ProtocolError(f"{where}.kind must be a string, got {kind!r}")
        devices.append(
            DeviceState(
                index=_int(d.get("index"), f"{where}.index", minimum=0),
                total_bytes=_int(d.get("totalBytes"), f"{where}.totalBytes", minimum=0),
                used_bytes=_int(d.get("usedBytes"), f"{where}.usedBytes", minimum=0),
                free_bytes=_int(d.get("freeBytes"), f"{where}.freeBytes", minimum=0),
                kind=kind,
                page_size=_opt_int(d.get("pageSize"), f"{where}.pageSize"),
                largest_free_run=_opt_int(d.get("largestFreeRun"), f"{where}.largestFreeRun"),
            )
        )
    replicas = []
    for i, raw in enumerate(_list(data.get("replicas"), "state.replicas")):
        where = f"state.replicas[{i}]"
        r = _object(raw, where)
        phase = r.get("phase")
        if phase not in PHASES:
            raise ProtocolError(f"{where}.phase {phase!r} is not one of {[str(p) for p in PHASES]}")
        endpoint = r.get("endpoint")
        if endpoint is not None and not isinstance(endpoint, str):
            raise ProtocolError(f'{where}.endpoint must be "host:port" or null, got {endpoint!r}')
        role = r.get("role")
        if role is not None and role not in ROLES:
            raise ProtocolError(f"{where}.role {role!r} is not one of {[str(x) for x in ROLES]}")
        progress = r.get("progress") or 0.0
        if isinstance(progress, bool) or not isinstance(progress, int | float):
            raise ProtocolError(f"{where}.progress must be a number, got {progress!r}")
        replicas.append(
            ReplicaState(
                model=_str(r.get("model"), f"{where}.model"),
                uid=_str(r.get("uid"), f"{where}.uid"),
                gpus=_gpus(r.get("gpus"), f"{where}.gpus"),
                phase=Phase(phase),
                progress=float(progress),
                endpoint=endpoint,
                ready=r.get("ready") is True,
                role=Role(role) if role is not None else None,
                tp=_opt_int(r.get("tp"), f"{where}.tp"),
                kv_lend=_int(r.get("kvLend") or 0, f"{where}.kvLend", minimum=0),
                bytes=_int(r.get("bytes") or 0, f"{where}.bytes", minimum=0),
            )
        )
    engines = []
    for i, raw in enumerate(_list(data.get("engines"), "state.engines")):
        where = f"state.engines[{i}]"
        e = _object(raw, where)
        endpoint = e.get("endpoint")
        if endpoint is not None and not isinstance(endpoint, str):
            raise ProtocolError(f'{where}.endpoint must be "host:port" or null, got {endpoint!r}')
        engines.append(
            EngineState(
                uid=_str(e.get("uid"), f"{where}.uid"),
                gpus=_gpus(e.get("gpus"), f"{where}.gpus"),
                model=str(e.get("model") or ""),
                endpoint=endpoint,
                ready=e.get("ready") is True,
                pid=_opt_int(e.get("pid"), f"{where}.pid"),
            )
        )
    errors = []
    for i, raw in enumerate(_list(data.get("errors"), "state.errors")):
        where = f"state.errors[{i}]"
        e = _object(raw, where)
        uid = e.get("uid") or ""
        if not isinstance(uid, str):
            raise ProtocolError(f"{where}.uid must be a string, got {uid!r}")
        errors.append(WorkerError(_str(e.get("reason"), f"{where}.reason"), uid, _gpus(e.get("gpus"), f"{where}.gpus")))
    timings = data.get("timings") or {}
    if not isinstance(timings, Mapping):
        raise ProtocolError("state.timings must be an object")
    return WorkerState(
        observed,
        tuple(devices),
        tuple(replicas),
        tuple(errors),
        dict(timings),
        tuple(engines),
        _capabilities(data.get("capabilities"), "state.capabilities"),
        _standby(data.get("standby"), "state.standby"),
    )


def _bool(value: Any, what: str, default: bool = False) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ProtocolError(f"{what} must be true or false, got {value!r}"[:200])
    return value


def _capabilities(raw: Any, what: str) -> Capabilities | None:
    """`state.capabilities`: absent (or null) is None; unknown keys are ignored (a newer worker may add some)."""
    if raw is None:
        return None
    doc = _object(raw, what)
    kind = doc.get("deviceKind") or ""
    if not isinstance(kind, str):
        raise ProtocolError(f"{what}.deviceKind must be a string, got {kind!r}"[:200])
    reasons = doc.get("reasons") or {}
    if not isinstance(reasons, Mapping) or not all(isinstance(v, str) for v in reasons.values()):
        raise ProtocolError(f"{what}.reasons must be an object of strings")
    return Capabilities(
        kv_lend=_bool(doc.get("kvLend"), f"{what}.kvLend"),
        tp_promotion=_bool(doc.get("tpPromotion"), f"{what}.tpPromotion"),
        standby_engines=_bool(doc.get("standbyEngines"), f"{what}.standbyEngines"),
        engine_settings=_bool(doc.get("engineSettings"), f"{what}.engineSettings"),
        device_kind=kind,
        reasons={str(k): v for k, v in reasons.items()},
    )


def _standby(raw: Any, what: str) -> tuple[StandbyState, ...]:
    out = []
    for i, item in enumerate(_list(raw, what)):
        where = f"{what}[{i}]"
        s = _object(item, where)
        out.append(
            StandbyState(
                model=_str(s.get("model"), f"{where}.model"),
                ready=_bool(s.get("ready"), f"{where}.ready"),
                bytes=_int(s.get("bytes") or 0, f"{where}.bytes", minimum=0),
            )
        )
    return tuple(out)


# -- pods ----------------------------------------------------------------------------------------------------
def annotations_of(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    return ((pod.get("metadata") or {}).get("annotations")) or {}


def plan_of_pod(pod: Mapping[str, Any]) -> Plan | None:
    """The plan currently on a pod, or None when absent or unreadable (then it is rewritten)."""
    text = annotations_of(pod).get(PLAN_ANNOTATION)
    if not text:
        return None
    try:
        return parse_plan(text)
    except ProtocolError:
        return None


def state_of_pod(pod: Mapping[str, Any]) -> WorkerState | None:
    """The state a worker pod reports; None when it has not reported yet. Raises ProtocolError if garbled."""
    text = annotations_of(pod).get(STATE_ANNOTATION)
    if not text:
        return None
    return parse_state(text)


def plan_patch(plan: Plan) -> dict[str, Any]:
    """The merge patch that writes `plan` onto a worker pod."""
    return {"metadata": {"annotations": {PLAN_ANNOTATION: plan.dumps()}}}


def state_patch(state: WorkerState) -> dict[str, Any]:
    """The merge patch that writes `state` onto the worker's own pod."""
    return {"metadata": {"annotations": {STATE_ANNOTATION: state.dumps()}}}
