"""The cluster's memory state: which GPU holds which warm replicas and which engines.

`ClusterState` is the single bookkeeping object the policy reasons about. Every mutation checks the
invariants that make WarmServe safe, so a policy bug surfaces as an exception in a test or in the simulator
instead of as an out-of-memory engine on a real GPU:

* a GPU never holds more warm-replica bytes than its budget (the whole arena when no engine runs on it,
  the KV space its engine lends when one does);
* groups are aligned buddy groups (`GpuGroup`), so replicas and engines are nested by construction;
* a GPU moves only along the node state machine idle → universal → dedicated → universal.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable, Iterator, KeysView, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from warmserve.core.types import GpuGroup, NodeSpec

Gpu = tuple[int, int]  # (node index, GPU index on the node)


class Role(enum.StrEnum):
    """What a GPU is doing; derived from its contents, never stored separately."""

    IDLE = "idle"  # holds nothing
    UNIVERSAL = "universal"  # holds warm replicas of one or more models, no engine
    DEDICATED = "dedicated"  # runs an engine (and may hold warm replicas in lent KV space)


class ReplicaPhase(enum.StrEnum):
    """Phase of a warm replica in the core's books."""

    LOADING = "loading"  # memory is reserved, not every rank's shard is in place yet
    WARM = "warm"  # every shard is loaded: ready to be promoted


class EnginePhase(enum.StrEnum):
    """Phase of an engine in the core's books: starting → serving → draining."""

    STARTING = "starting"  # booked, not ready yet (lends no KV space)
    SERVING = "serving"  # ready and taking requests
    DRAINING = "draining"  # retired by the autoscaler, finishing its requests


class StartSource(enum.StrEnum):
    """Where a new engine's weights came from (the order is `choose_group`'s preference)."""

    HIT = "hit"  # a warm replica on exactly the engine's group
    LOADING = "loading"  # a replica of the model still loading there
    COLD = "cold"  # nothing: the weights load from storage


ALLOWED_TRANSITIONS: frozenset[tuple[Role, Role]] = frozenset(
    {
        (Role.IDLE, Role.UNIVERSAL),  # prewarm
        (Role.IDLE, Role.DEDICATED),  # cold start
        (Role.UNIVERSAL, Role.DEDICATED),  # promotion (hit) or start beside evicted replicas
        (Role.UNIVERSAL, Role.IDLE),  # last replica evicted
        (Role.DEDICATED, Role.UNIVERSAL),  # engine stopped, its weights stay as a warm replica
    }
)


class PlanError(ValueError):
    """A requested change would break an invariant (over-commit, bad group, wrong phase)."""


@dataclass
class WarmReplica:
    """Weights of one model held on a GPU group without an engine, ready to be promoted."""

    rid: int
    model: str
    group: GpuGroup
    bytes_per_gpu: int
    phase: ReplicaPhase = ReplicaPhase.LOADING  # WARM once every rank's shard is in place

    @property
    def warm(self) -> bool:
        return self.phase == ReplicaPhase.WARM


@dataclass
class Instance:
    """A dedicated engine serving one model on one GPU group."""

    iid: int
    model: str
    group: GpuGroup
    weight_bytes_per_gpu: int
    started_at: float
    phase: EnginePhase = EnginePhase.STARTING


@dataclass
class Promotion:
    """What happened when an engine was placed: where its weights came from and what was evicted."""

    instance: Instance
    source: StartSource
    evicted: list[WarmReplica] = field(default_factory=list)
    consumed: WarmReplica | None = None  # the replica whose weights the engine took over (hit or loading)


class ClusterState:
    """Replicas and engines over the cluster's GPUs, with invariant checks on every change."""

    def __init__(self, nodes: Iterable[NodeSpec]) -> None:
        self.nodes: tuple[NodeSpec, ...] = tuple(nodes)
        if not self.nodes:
            raise ValueError("a cluster needs at least one node")
        self.replicas: dict[int, WarmReplica] = {}
        self.instances: dict[int, Instance] = {}
        self._ids = itertools.count(1)
        self._replicas_on: dict[Gpu, set[int]] = {g: set() for g in self.all_gpus()}
        self._used: dict[Gpu, int] = dict.fromkeys(self._replicas_on, 0)
        self._engine_on: dict[Gpu, int] = {}
        self._lent: dict[Gpu, int] = {}
        self._gpus_of: dict[GpuGroup, tuple[Gpu, ...]] = {}

    # ----------------------------------------------------------------- queries
    def all_gpus(self) -> Iterator[Gpu]:
        for n, node in enumerate(self.nodes):
            for i in range(node.gpus):
                yield (n, i)

    def gpus_of(self, group: GpuGroup) -> tuple[Gpu, ...]:
        gpus = self._gpus_of.get(group)
        if gpus is None:  # memoised: the placement and the operator ask for the same groups all the time
            gpus = self._gpus_of[group] = tuple((group.node, i) for i in group.gpus)
        return gpus

    def valid_group(self, group: GpuGroup) -> bool:
        return 0 <= group.node < len(self.nodes) and group.start + group.size <= self.nodes[group.node].gpus

    def groups(self, size: int) -> Iterator[GpuGroup]:
        """Every aligned group of ``size`` GPUs in the cluster, node by node."""
        for n, node in enumerate(self.nodes):
            for start in range(0, node.gpus - size + 1, size):
                yield GpuGroup(n, start, size)

    def capacity(self, gpu: Gpu) -> int:
        return self.nodes[gpu[0]].gpu_bytes

    def budget(self, gpu: Gpu) -> int:
        """Bytes warm replicas may use on ``gpu``: the arena, or only the KV space its engine lends."""
        if gpu in self._engine_on:
            return self._lent.get(gpu, 0)
        return self.capacity(gpu)

    def used(self, gpu: Gpu) -> int:
        return self._used[gpu]

    def free(self, gpu: Gpu) -> int:
        return self.budget(gpu) - self._used[gpu]

    def lent(self, gpu: Gpu) -> int:
        return self._lent.get(gpu, 0)

    def used_by_gpu(self) -> Mapping[Gpu, int]:
        """Warm-replica bytes per GPU, in `all_gpus` order (read-only view, for vectorised callers such as the
        placement)."""
        return MappingProxyType(self._used)

    def lent_by_gpu(self) -> Mapping[Gpu, int]:
        """KV bytes lent per GPU that runs an engine, with an entry for every such GPU (read-only view)."""
        return MappingProxyType(self._lent)

    def engine_gpus(self) -> KeysView[Gpu]:
        """GPUs that run an engine."""
        return self._engine_on.keys()

    def engine_on(self, gpu: Gpu) -> Instance | None:
        iid = self._engine_on.get(gpu)
        return None if iid is None else self.instances[iid]

    def replicas_on(self, gpu: Gpu) -> list[WarmReplica]:
        return [self.replicas[r] for r in sorted(self._replicas_on[gpu])]

    def replicas_overlapping(self, group: GpuGroup) -> list[WarmReplica]:
        rids: set[int] = set()
        for gpu in self.gpus_of(group):
            rids |= self._replicas_on[gpu]
        return [self.replicas[r] for r in sorted(rids)]

    def replicas_of(self, model: str) -> list[WarmReplica]:
        return [r for r in self.replicas.values() if r.model == model]

    def instances_of(self, model: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.model == model]

    def role(self, gpu: Gpu) -> Role:
        if gpu in self._engine_on:
            return Role.DEDICATED
        return Role.UNIVERSAL if self._replicas_on[gpu] else Role.IDLE

    def group_has_engine(self, group: GpuGroup) -> bool:
        return any(g in self._engine_on for g in self.gpus_of(group))

    # --------------------------------------------------------------- mutations
    def add_replica(
        self, model: str, group: GpuGroup, bytes_per_gpu: int, phase: ReplicaPhase = ReplicaPhase.LOADING
    ) -> WarmReplica:
        """Reserve memory for a new warm replica (its load starts now)."""
        if not self.valid_group(group):
            raise PlanError(f"group {group} does not exist in this cluster")
        if bytes_per_gpu <= 0:
            raise PlanError("a replica must hold a positive number of bytes")
        gpus = self.gpus_of(group)
        for gpu in gpus:
            engine = self.engine_on(gpu)
            if engine is not None and engine.model == model:
                raise PlanError(f"{model} already runs an engine on GPU {gpu}")
            if any(self.replicas[r].model == model for r in self._replicas_on[gpu]):
                raise PlanError(f"{model} already has a replica on GPU {gpu}")
            if self.free(gpu) < bytes_per_gpu:
                raise PlanError(f"GPU {gpu} has {self.free(gpu)} free bytes, replica of {model} needs {bytes_per_gpu}")
        # a GPU goes idle → universal or keeps its role: always an allowed transition, nothing to check
        replica = WarmReplica(next(self._ids), model, group, bytes_per_gpu, phase)
        self.replicas[replica.rid] = replica
        for gpu in gpus:
            self._replicas_on[gpu].add(replica.rid)
            self._used[gpu] += bytes_per_gpu
        return replica

    def mark_warm(self, rid: int) -> None:
        self.replicas[rid].phase = ReplicaPhase.WARM

    def evict(self, rid: int) -> WarmReplica:
        """Drop a warm replica: its pages go back to the free list (no copy)."""
        replica = self.replicas.pop(rid)
        for gpu in self.gpus_of(replica.group):
            self._replicas_on[gpu].discard(rid)
            self._used[gpu] -= replica.bytes_per_gpu
        return replica

    def start_instance(self, model: str, group: GpuGroup, weight_bytes_per_gpu: int, now: float) -> Promotion:
        """Turn ``group`` into a dedicated engine of ``model``.

        A replica of ``model`` on exactly this group becomes the engine's weights (a hit, or a replica still
        loading); every other replica on the group's GPUs is evicted.
        """
        if not self.valid_group(group):
            raise PlanError(f"group {group} does not exist in this cluster")
        if self.group_has_engine(group):
            raise PlanError(f"group {group} already runs an engine")
        gpus = self.gpus_of(group)
        capacity = self.nodes[group.node].gpu_bytes
        if weight_bytes_per_gpu > capacity:
            raise PlanError(f"GPU {gpus[0]} holds {capacity} bytes, an engine of {model} needs {weight_bytes_per_gpu}")
        # no GPU of the group runs an engine: each goes idle or universal → dedicated, always allowed
        source = StartSource.COLD
        evicted: list[WarmReplica] = []
        consumed: WarmReplica | None = None
        for replica in self.replicas_overlapping(group):
            if replica.model == model and replica.group == group:
                source = StartSource.HIT if replica.warm else StartSource.LOADING
                consumed = self.evict(replica.rid)  # its pages now belong to the engine
            else:
                evicted.append(self.evict(replica.rid))
        instance = Instance(next(self._ids), model, group, weight_bytes_per_gpu, now)
        self.instances[instance.iid] = instance
        for gpu in gpus:
            self._engine_on[gpu] = instance.iid
            self._lent[gpu] = 0
        return Promotion(instance, source, evicted, consumed)

    def stop_instance(self, iid: int) -> WarmReplica:
        """Stop an engine; its weights stay on the group as a warm replica (dedicated → universal)."""
        instance = self.instances.pop(iid)
        before = {g: Role.DEDICATED for g in self.gpus_of(instance.group)}
        for gpu in self.gpus_of(instance.group):
            del self._engine_on[gpu]
            self._lent.pop(gpu, None)
        replica = WarmReplica(
            next(self._ids), instance.model, instance.group, instance.weight_bytes_per_gpu, ReplicaPhase.WARM
        )
        self.replicas[replica.rid] = replica
        for gpu in self.gpus_of(instance.group):
            self._replicas_on[gpu].add(replica.rid)
            self._used[gpu] += replica.bytes_per_gpu
            if self._used[gpu] > self.capacity(gpu):
                raise PlanError(f"GPU {gpu}: lent replicas plus the stopped engine's weights exceed capacity")
        self._check_transitions(instance.group, before)
        return replica

    def set_lent(self, gpu: Gpu, lent_bytes: int) -> None:
        """Set how much of its KV space the engine on ``gpu`` lends to warm replicas."""
        iid = self._engine_on.get(gpu)
        if iid is None:
            raise PlanError(f"GPU {gpu} runs no engine, it has nothing to lend")
        if lent_bytes < 0 or lent_bytes > self.nodes[gpu[0]].gpu_bytes - self.instances[iid].weight_bytes_per_gpu:
            raise PlanError(f"GPU {gpu}: cannot lend {lent_bytes} bytes")
        if lent_bytes < self._used[gpu]:
            raise PlanError(f"GPU {gpu}: evict lent replicas before taking {self._used[gpu] - lent_bytes} bytes back")
        self._lent[gpu] = lent_bytes

    # ---------------------------------------------------------------- internal
    def _roles(self, group: GpuGroup) -> dict[Gpu, Role]:
        return {g: self.role(g) for g in self.gpus_of(group)}

    def _check_transitions(self, group: GpuGroup, before: dict[Gpu, Role]) -> None:
        for gpu, old in before.items():
            new = self.role(gpu)
            if new != old and (old, new) not in ALLOWED_TRANSITIONS:
                raise PlanError(f"GPU {gpu}: transition {old} → {new} is not allowed")

    def check_invariants(self) -> None:
        """Recompute every ledger from scratch and compare (used by tests and the simulator's debug mode)."""
        used = dict.fromkeys(self._used, 0)
        for replica in self.replicas.values():
            for gpu in self.gpus_of(replica.group):
                used[gpu] += replica.bytes_per_gpu
        if used != self._used:
            raise AssertionError("replica byte ledger drifted")
        for gpu in self._used:
            if self._used[gpu] > self.budget(gpu):
                raise AssertionError(f"GPU {gpu} over-committed: {self._used[gpu]} > {self.budget(gpu)}")
        groups = [r.group for r in self.replicas.values()] + [i.group for i in self.instances.values()]
        for a, b in itertools.combinations(groups, 2):
            if a.node == b.node and not a.overlaps(b) and set(a.gpus) & set(b.gpus):
                raise AssertionError(f"groups {a} and {b} are not nested")
