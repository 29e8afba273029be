"""Evict-aware placement of warm replicas (the paper's prewarm scheduler, with the original's gaps closed).

Each model asks for warm replicas from its forecast:

* ``n_f`` *foundation* replicas: instances the autoscaler will want at the forecast average load, minus the
  engines already running;
* ``n_b`` *burst* replicas: the extra instances the forecast peak needs.

Instances are sized the way the autoscaler sizes them (``max_batch × upper`` requests each), so a warm
replica exists for every engine the autoscaler will start inside the window. Replica ``j`` of a model gets
the score ``exp(-j / n) × cold × priority`` (foundation) or ``exp(-j / n) × cold × peak/avg × priority``
(burst), where ``cold`` is the time a cold load of one shard would take. Existing replicas take the first
score slots of their model; replicas beyond the model's slots get score 0 and are dropped.

All replicas are then visited in descending score. An existing replica is kept where it is. A new replica
goes to the aligned GPU group (``GpuGroup``) that, in order of preference,

1. fits in free memory without eviction,
2. lies on GPUs without a running engine (a replica in lent KV space cannot be promoted until that
   engine retires, and the engine may take the space back),
3. overlaps no replica of a higher score (promoting it later would destroy nothing more important),
4. overlaps the smallest total score.

When no group has free memory, the replica may evict *lower-score* replicas (never higher ones), the
cheapest group first. Unlike the original, which had ``# TODO: consider eviction`` and never dropped a
replica, this keeps the cluster's warm memory on the replicas that matter now.

Groups are aligned buddy groups, so tensor-parallel replicas nest by construction and the candidate set of
a size-``tp`` replica is just ``gpus / tp`` groups. A round reads the cluster once into padded per-node numpy
arrays (free bytes per GPU; per group size, each group's overlapping score and preference rank), keeps them
up to date with one indexed operation per change, and defers what only some reads need: the ranks kept
replicas raise are applied when the vectorised search reads them (`_Grid.ranks`), what only the eviction
path reads when that path runs (`_Grid.evictable`). An empty group beats every other for a new replica, so
most new replicas take the lowest-index empty group with room from a list made once per round
(`_Grid.first_empty`); the rest take a fixed handful of vectorised operations over the groups of their size
(`_Grid.best`). A round over 1,024 GPUs and 200 models takes about 2 ms.
"""

from __future__ import annotations

import functools
import heapq
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from warmserve.core.autoscaler import engines_for
from warmserve.core.cluster import ClusterState, EnginePhase
from warmserve.core.types import Demand, GpuGroup, ModelProfile

BURST_FACTOR_CAP = 10.0  # peak/avg is capped so a model idle on average cannot outrank everything


@dataclass(frozen=True)
class PlacementParams:
    upper: float = 0.8  # the autoscaler's scale-up threshold: an engine is "full" at max_batch × upper
    load_bandwidth: float = 25e9  # bytes/s used to rank replicas by the cold load they save


@dataclass(slots=True)  # not frozen: a frozen dataclass is several times slower to make, and a round makes many
class Slot:
    """One warm replica a model asks for, with its score."""

    model: str
    index: int
    score: float


class NewReplica(NamedTuple):
    model: str
    group: GpuGroup
    bytes_per_gpu: int
    score: float


@dataclass
class PlacementDecision:
    add: list[NewReplica] = field(default_factory=list)
    evict: list[int] = field(default_factory=list)  # replica ids
    kept: dict[int, float] = field(default_factory=dict)  # replica id → score
    unplaced: list[Slot] = field(default_factory=list)


def engines_needed(load: float, profile: ModelProfile, upper: float) -> int:
    """Engines the autoscaler keeps for ``load`` concurrent requests (0 for no load)."""
    return engines_for(load, profile.max_batch * upper)


def replica_slots(profile: ModelProfile, demand: Demand, running_engines: int, params: PlacementParams) -> list[Slot]:
    """The warm replicas ``profile`` asks for, highest score first."""
    need_avg = engines_needed(demand.avg, profile, params.upper)
    need_peak = engines_needed(demand.peak, profile, params.upper)
    n_burst = max(need_peak - max(running_engines, need_avg), 0)
    # min_warm is a floor on the warm replicas, not an addition to what the forecast asks for
    n_foundation = max(need_avg - running_engines, profile.min_warm - n_burst, 0)
    total = n_foundation + n_burst
    if total == 0:
        return []
    cold = profile.shard_bytes / params.load_bandwidth * profile.priority
    burst_factor = min(demand.peak / demand.avg, BURST_FACTOR_CAP) if demand.avg > 0 else BURST_FACTOR_CAP
    burst_factor = max(burst_factor, 1.0)
    scores = [math.exp(-j / total) * cold for j in range(n_foundation)]
    scores += [math.exp(-(n_foundation + j) / total) * cold * burst_factor for j in range(n_burst)]
    # A burst slot (× peak/avg) can outrank a foundation slot: hand them out highest score first.
    return [Slot(profile.name, j, score) for j, score in enumerate(sorted(scores, reverse=True))]


class _Levels:
    """One value per aligned group at every level (sizes 1, 2, 4, ...), kept in one flat array.

    ``at[level]`` is a view of the level's groups, so a change to every group nested with one group (inside it
    and around it, all levels) is one indexed operation on the flat array (:meth:`_Grid.nested`).
    """

    def __init__(self, total: int, levels: int, dtype: type) -> None:
        self.offsets = [0]
        for level in range(levels):
            self.offsets.append(self.offsets[-1] + (total >> level))
        self.flat: np.ndarray = np.zeros(self.offsets[-1], dtype=dtype)
        self.at = [self.flat[self.offsets[level] : self.offsets[level + 1]] for level in range(levels)]


@functools.lru_cache(maxsize=8)
def _nested_table(offsets: tuple[int, ...]) -> list[np.ndarray]:
    """Per level, one row per group of that level: the positions, in a `_Levels` flat array laid out by
    ``offsets``, of every group nested with it (the groups inside it at the levels below, the one around it at
    each level above).

    Made at once for every group, and kept across rounds: a cluster of a given size asks for the same groups
    round after round.
    """
    levels, total = len(offsets) - 1, offsets[1]
    tables = []
    for level in range(levels):
        index = np.arange(total >> level)[:, None]
        parts = []
        for other in range(levels):
            if other <= level:
                shift = level - other
                parts.append((index << shift) + np.arange(1 << shift) + offsets[other])
            else:
                parts.append((index >> (other - level)) + offsets[other])
        table = np.concatenate(parts, axis=1)
        table.flags.writeable = False
        tables.append(table)
    return tables


_WORDS = {2: np.uint16, 4: np.uint32, 8: np.uint64}  # an unsigned integer of 2, 4 and 8 bytes


def _all_of(mask: np.ndarray, size: int) -> np.ndarray:
    """Per aligned run of ``size`` entries of the contiguous bool array ``mask``: are they all true?

    A run of up to 8 bools read as one unsigned integer is all true exactly when every byte is 1, so a run of
    up to 8 costs one comparison per run, a longer one a step more per factor of 8 (numpy's reductions along a
    short axis are several times slower).
    """
    while size > 1:
        step = min(size, 8)
        mask = mask.view(_WORDS[step]) == int.from_bytes(b"\x01" * step, "little")
        size //= step
    return mask


_UNFIT = np.int8(4)  # added to the rank (0 to 3) of a group without room (`_Grid.best`)


class _Grid:
    """Per-round numpy view of the cluster: one padded row of ``width`` GPUs per node.

    A group is addressed by its level (size ``2**level``) and the flat index of its first GPU, ``start``
    (``node * width + first GPU``); ``start >> level`` is its index among the groups of its level.
    """

    def __init__(self, state: ClusterState) -> None:
        nodes = state.nodes
        gpus = np.fromiter((node.gpus for node in nodes), np.int64, len(nodes))
        self.width = 1 << (int(gpus.max()) - 1).bit_length()  # the smallest power of two with room for every node
        self.levels = self.width.bit_length()  # group sizes 1, 2, ..., width
        width = self.width
        real = (np.arange(width) < gpus[:, None]).ravel()  # padding GPUs belong to no node
        budget = np.fromiter((node.gpu_bytes for node in nodes), np.int64, len(nodes))
        self.free = np.where(real, np.repeat(budget, width), -1)  # budget minus used; padding GPUs hold nothing
        lent = state.lent_by_gpu()  # an entry per GPU that runs an engine
        engine_at = np.fromiter((n * width + i for n, i in lent), np.intp, len(lent))
        self.free[engine_at] = np.fromiter(lent.values(), np.int64, len(lent))
        self.free[real] -= np.fromiter(state.used_by_gpu().values(), np.int64, int(gpus.sum()))
        total = len(self.free)
        # per level, for each group: total score of the replicas over every group nested with it, kept up to
        # date on each change (one indexed add) instead of recomputed per replica
        self.ov_score = _Levels(total, self.levels, np.float64)
        self.exact_score = _Levels(total, self.levels, np.float64)  # replicas exactly on a group
        # the same over the existing replicas not visited yet (those a newcomer may evict), and their bytes per
        # GPU: read only when no group has room, so visits are logged and applied then (`evictable`)
        self.ov_pending = _Levels(total, self.levels, np.float64)
        self.pending = np.zeros(total, dtype=np.int64)
        self._visited: list[tuple[int, int, int, float]] = []
        # Room only shrinks during a round (free plus evictable bytes per GPU never grow, a model's GPUs never
        # shrink), so a replica no group can take even by evicting stays unplaceable: per level, the least bytes
        # per GPU no group has that room for, and the models no group off their own GPUs has it for
        self.hopeless: list[float] = [math.inf] * self.levels
        self.stuck: set[str] = set()
        # per level, the first key of a new replica's preference (see _place_one): 2 for a group with a running
        # engine on any of its GPUs (engines do not change in a round), plus 1 once a kept replica overlaps it
        # (a round only ever adds kept replicas)
        self.rank = _Levels(total, self.levels, np.int8)
        self.engine_in: list[list[bool]] = []  # per level and group: does an engine run on any of its GPUs?
        engine = np.zeros(total, dtype=bool)
        engine[engine_at] = True
        for level in range(self.levels):
            if level:
                engine = engine[0::2] | engine[1::2]
            self.rank.at[level][:] = engine * 2
            self.engine_in.append(engine.tolist())
        self._nested = _nested_table(tuple(self.ov_score.offsets))
        # groups whose rank a kept or new replica raises, applied when a rank is next read (`ranks`)
        self._raise: list[np.ndarray] = []
        # per level, the empty groups (see `first_empty`) in descending index order, made on first use; None for
        # the rest of the round once a key may have fallen below an empty group's (`remove`)
        self._empty: list[list[int] | None] | None = [None] * self.levels

    def overlap(self, level: int, arrays: list[np.ndarray]) -> np.ndarray:
        """Per size-``2**level`` group, the total of ``arrays`` over every group nested with it."""
        total = np.zeros(len(self.free) >> level, dtype=arrays[0].dtype)
        for other, values in enumerate(arrays):
            if other <= level:  # groups inside: sum them up
                total += values.reshape(-1, 1 << (level - other)).sum(axis=1)
            else:  # groups around: each covers 2**(other-level) of ours
                total += np.repeat(values, 1 << (other - level))
        return total

    def group_of(self, level: int, index: int) -> GpuGroup:
        size = 1 << level
        flat = index * size
        return GpuGroup(flat // self.width, flat % self.width, size)

    def nested(self, start: int, level: int) -> np.ndarray:
        """Positions in a `_Levels` flat array of every group nested with a group (inside it or around it)."""
        return self._nested[level][start >> level]

    def add(self, start: int, level: int, nbytes: int, score: float) -> None:
        """A new replica: kept from now on."""
        nested = self.nested(start, level)
        self.free[start : start + (1 << level)] -= nbytes
        self.ov_score.flat[nested] += score
        self._raise.append(nested)

    def keep(self, start: int, level: int, nbytes: int, score: float) -> None:
        """An existing replica is visited: kept, so no longer evictable."""
        self._raise.append(self.nested(start, level))
        self._visited.append((start, level, nbytes, score))

    def ranks(self, level: int) -> np.ndarray:
        """The rank of every group of ``level`` (see `__init__`), with every kept replica so far counted.

        Marks are applied in one operation when a rank is read: `first_empty`, which most new replicas take,
        reads no rank a kept replica could change (a group nested with one has a score).
        """
        if self._raise:
            self.rank.flat[np.concatenate(self._raise)] |= 1
            self._raise.clear()
        return self.rank.at[level]

    def evictable(self) -> tuple[np.ndarray, _Levels]:
        """Bytes per GPU and overlapping score per group of the replicas that may still be evicted."""
        if self._visited:
            np.subtract.at(
                self.pending, *_per_gpu([(start, 1 << level, nbytes) for start, level, nbytes, _ in self._visited])
            )
            nested = [self.nested(start, level) for start, level, _, _ in self._visited]
            scores = np.repeat([score for *_, score in self._visited], [len(positions) for positions in nested])
            # unbuffered and in visiting order: each group's total is the one a change at a time would leave
            np.subtract.at(self.ov_pending.flat, np.concatenate(nested), scores)
            self._visited.clear()
        return self.pending, self.ov_pending

    def remove(self, start: int, level: int, nbytes: int, score: float) -> None:
        """A not-yet-visited replica is evicted (after `evictable`)."""
        nested = self.nested(start, level)
        span = slice(start, start + (1 << level))
        self.free[span] += nbytes
        self.pending[span] -= nbytes
        self.ov_score.flat[nested] -= score
        self.ov_pending.flat[nested] -= score
        self.no_shortcut()  # a score may now be slightly below 0 (floating point)

    def no_shortcut(self) -> None:
        """`first_empty` no longer answers this round: `best` decides every choice."""
        self._empty = None

    def first_empty(self, level: int, need: int) -> int | None:
        """`best`'s choice for a replica of ``need`` bytes per GPU when an empty group has room for it, else None.

        While every replica's score is positive (see `no_shortcut`), an empty group (rank 0 and overlapping
        score 0: no engine, no replica on any of its GPUs) has the least key `best` can find, so the empty group
        of the lowest index wins if it has room; most new replicas go to one. Groups only fill during a round
        (until `remove`), so the empty groups are listed once per level and those that filled are dropped from
        the front as they come up. The model's own GPUs are never empty.
        """
        if self._empty is None:
            return None
        empty = self._empty[level]
        rank, score = self.rank.at[level], self.ov_score.at[level]  # a rank not yet raised has a score
        if empty is None:
            empty = self._empty[level] = np.flatnonzero((rank == 0) & (score == 0))[::-1].tolist()
        while empty:
            index = empty[-1]
            if rank[index] or score[index]:  # filled since
                empty.pop()
                continue
            start = index << level
            if self.free[start : start + (1 << level)].min() >= need:
                return index
            return None  # a smaller GPU: `best` looks further
        return None

    def best(self, level: int, fits: np.ndarray) -> int | None:
        """The preferred group of ``level`` among those ``fits`` marks (see _place_one), or None."""
        rank = self.ranks(level) + (~fits).view(np.int8) * _UNFIT  # a group without room ranks after every other
        lowest = rank.min()
        if lowest >= _UNFIT:
            return None
        # the least score among the lowest rank; argmin takes the first, so the lowest index among equals
        return int(np.where(rank == lowest, self.ov_score.at[level], np.inf).argmin())


class _Taken:
    """Per model, the flat GPU indices its engines and replicas hold (same-model replicas never share a GPU).

    Kept as spans and made into a set for a model only when a choice needs it (`_place_one`: not for an empty
    group, which holds nothing of any model).
    """

    def __init__(self) -> None:
        self._spans: dict[str, list[tuple[int, int]]] = {}
        self._sets: dict[str, set[int]] = {}

    def add(self, model: str, start: int, size: int) -> None:
        gpus = self._sets.get(model)
        if gpus is None:
            self._spans.setdefault(model, []).append((start, size))
        else:
            gpus.update(range(start, start + size))

    def of(self, model: str) -> set[int]:
        gpus = self._sets.get(model)
        if gpus is None:
            spans = self._spans.pop(model, [])
            gpus = self._sets[model] = {gpu for start, size in spans for gpu in range(start, start + size)}
        return gpus


class _Held(NamedTuple):
    """An existing replica that holds one of its model's slots this round."""

    model: str
    start: int
    level: int
    nbytes: int
    score: float
    slot: int


def plan_placement(
    state: ClusterState,
    profiles: Mapping[str, ModelProfile],
    demand: Mapping[str, Demand],
    params: PlacementParams | None = None,
) -> PlacementDecision:
    """Decide which warm replicas to keep, drop and add for the coming window. Pure: ``state`` is not changed."""
    params = params or PlacementParams()
    decision = PlacementDecision()
    grid = _Grid(state)
    width = grid.width
    taken = _Taken()
    running = dict.fromkeys(profiles, 0)
    for instance in state.instances.values():
        group = instance.group
        taken.add(instance.model, group.node * width + group.start, group.size)
        if instance.phase != EnginePhase.DRAINING and instance.model in running:
            running[instance.model] += 1

    slots = {
        name: replica_slots(profile, demand.get(name, Demand(0.0, 0.0)), running[name], params)
        for name, profile in sorted(profiles.items())
    }
    if any(model_slots[-1].score <= 0 for model_slots in slots.values() if model_slots):
        grid.no_shortcut()  # a priority of 0: a group holding a replica can have a score of 0 (`first_empty`)

    # Existing replicas take their model's first slots (warm before loading); the rest score 0 and go. Per
    # model, promotable replicas first: warm ones, then those not sitting in an engine's lent KV space.
    ordered = []
    engine_in = grid.engine_in
    for replica in state.replicas.values():
        group = replica.group
        start, level = group.node * width + group.start, group.size.bit_length() - 1
        ordered.append(
            (
                replica.model,
                not replica.warm,
                engine_in[level][start >> level],
                replica.rid,
                start,
                level,
                replica.bytes_per_gpu,
            )
        )
    ordered.sort()
    held: dict[int, _Held] = {}
    exact: dict[int, float] = {}  # position in grid.exact_score → score of the replicas exactly on that group
    kept_spans: list[tuple[int, int, int]] = []  # (start, size, bytes)
    dropped_spans: list[tuple[int, int, int]] = []
    position, previous = 0, None
    model_slots: list[Slot] = []
    for model, _, _, rid, start, level, nbytes in ordered:
        if model != previous:
            position, previous, model_slots = 0, model, slots.get(model, [])
        if position < len(model_slots):
            score = model_slots[position].score
            held[rid] = _Held(model, start, level, nbytes, score, position)
            at = grid.exact_score.offsets[level] + (start >> level)
            exact[at] = exact.get(at, 0.0) + score
            kept_spans.append((start, 1 << level, nbytes))
            taken.add(model, start, 1 << level)
        else:
            decision.evict.append(rid)
            dropped_spans.append((start, 1 << level, nbytes))
        position += 1
    for model, count in Counter(row[0] for row in ordered).items():
        if model in slots:
            slots[model] = slots[model][count:]
    grid.exact_score.flat[list(exact)] = list(exact.values())
    np.add.at(grid.pending, *_per_gpu(kept_spans))
    np.add.at(grid.free, *_per_gpu(dropped_spans))
    for level in range(grid.levels):
        grid.ov_score.at[level][:] = grid.overlap(level, grid.exact_score.at)
    grid.ov_pending.flat[:] = grid.ov_score.flat  # only replicas that may still be evicted

    # A heap, because a replica evicted to make room re-enters it as a new slot of its (lower) score.
    queue: list[tuple[float, int, str, int]] = [(-h.score, 0, h.model, rid) for rid, h in held.items()]
    queue += [(-slot.score, 1, slot.model, slot.index) for model_slots in slots.values() for slot in model_slots]
    heapq.heapify(queue)
    pending = set(held)  # existing replicas not visited yet (all of a lower score than the visitor)

    while queue:
        neg_score, is_new, model, key = heapq.heappop(queue)
        score = -neg_score
        if not is_new:
            if key in pending:  # visited: from now on it is protected from lower-score replicas
                pending.remove(key)
                h = held[key]
                grid.keep(h.start, h.level, h.nbytes, score)
                decision.kept[key] = score
            continue
        profile = profiles[model]
        nbytes = profile.shard_bytes
        evicted_before = len(decision.evict)
        placed = _place_one(grid, state, model, profile.tp, nbytes, taken, held, pending, decision)
        for rid in decision.evict[evicted_before:]:  # still wanted: try to place it elsewhere, later
            victim = held[rid]
            heapq.heappush(queue, (-victim.score, 1, victim.model, victim.slot))
        if placed is None:
            decision.unplaced.append(Slot(model, key, score))
            continue
        start, level = placed
        decision.add.append(NewReplica(model, grid.group_of(level, start >> level), nbytes, score))
        grid.add(start, level, nbytes, score)
        taken.add(model, start, 1 << level)
    return decision


def _place_one(
    grid: _Grid,
    state: ClusterState,
    model: str,
    size: int,
    need: int,
    taken: _Taken,
    held: Mapping[int, _Held],
    pending: set[int],
    decision: PlacementDecision,
) -> tuple[int, int] | None:
    """Choose (and reserve room for) the group of one new replica of ``model``, ``size`` GPUs and ``need`` bytes
    per GPU, as ``(start, level)``; evicts lower-score replicas if needed."""
    if size > grid.width:
        return None
    level = size.bit_length() - 1
    if need >= grid.hopeless[level] or model in grid.stuck:
        return None
    # In order of preference: no running engine, no kept replica overlapping (the two as one rank, engine
    # first), then the least overlapping score, then the lowest index (`_Grid.best`). Same-model replicas
    # never share a GPU, but the model's own GPUs seldom hold the best group (its replicas are kept, its
    # engines run): they are masked out only when they do.
    best = grid.first_empty(level, need)
    if best is not None:
        return best << level, level
    occupied = taken.of(model)
    fits = _all_of(grid.free >= need, size)
    best = grid.best(level, fits)
    if best is not None and not occupied.isdisjoint(range(best << level, (best + 1) << level)):
        fits[_groups_of(occupied, level)] = False
        best = grid.best(level, fits)
    if best is not None:
        return best << level, level
    pending_bytes, pending_score = grid.evictable()
    reclaimable = _all_of(grid.free + pending_bytes >= need, size)
    if not reclaimable.any():
        grid.hopeless[level] = need
        return None
    if occupied:
        reclaimable[_groups_of(occupied, level)] = False
    candidates = np.flatnonzero(reclaimable)
    if not len(candidates):  # for good (see _Grid.hopeless)
        grid.stuck.add(model)
        return None
    # the group whose evictable replicas carry the least score: a victim never outranks the newcomer
    best = int(candidates[np.argmin(pending_score.at[level][candidates] + candidates * 1e-12)])
    start = best << level
    span = slice(start, start + size)
    # Only replicas not visited yet can be victims, and those all score at most the newcomer. Lowest score
    # first, and only those that sit on a GPU of the group that is still short of room.
    overlapping = state.replicas_overlapping(grid.group_of(level, best))
    for victim_score, rid in sorted((held[r.rid].score, r.rid) for r in overlapping if r.rid in pending):
        short = grid.free[span] < need
        if not short.any():
            break
        victim = held[rid]
        if not short[max(victim.start - start, 0) : victim.start + (1 << victim.level) - start].any():
            continue
        grid.remove(victim.start, victim.level, victim.nbytes, victim_score)
        pending.remove(rid)
        decision.evict.append(rid)
    if grid.free[span].min() < need:
        return None
    return start, level


def _groups_of(gpus: set[int], level: int) -> np.ndarray:
    """The size-``2**level`` groups (indices) holding the flat GPU indices ``gpus``."""
    return np.fromiter(gpus, np.intp, len(gpus)) >> level


def _per_gpu(spans: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Flat GPU indices and bytes of ``(start, size, bytes)`` spans, one entry per GPU (for ``ufunc.at``)."""
    if not spans:
        return np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.int64)
    starts, sizes, nbytes = (np.array(column) for column in zip(*spans, strict=True))
    offsets = np.cumsum(sizes) - sizes  # where each span begins in the result
    return np.repeat(starts - offsets, sizes) + np.arange(sizes.sum()), np.repeat(nbytes, sizes)
