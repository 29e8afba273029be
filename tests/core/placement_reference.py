"""The placement round as it was before the incremental rewrite (frozen copy; issue 14, item 1).

`test_core_placement_differential.py` runs it beside `warmserve.core.placement.plan_placement` on recorded
rounds of an evolving cluster and requires identical decisions. Do not change it: it is the reference.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

import numpy as np

from warmserve.core.cluster import ClusterState, EnginePhase
from warmserve.core.placement import NewReplica, PlacementDecision, PlacementParams, Slot, replica_slots
from warmserve.core.types import Demand, GpuGroup, ModelProfile


class _Grid:
    """Per-round numpy view of the cluster: one padded row of ``width`` GPUs per node."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self.width = 1 << max(node.gpus for node in state.nodes).bit_length() - 1
        if self.width < max(node.gpus for node in state.nodes):
            self.width <<= 1
        self.levels = self.width.bit_length()  # group sizes 1, 2, ..., width
        total = len(state.nodes) * self.width
        self.budget = np.full(total, -1, dtype=np.int64)  # padding GPUs can hold nothing
        self.used = np.zeros(total, dtype=np.int64)
        self.pending = np.zeros(total, dtype=np.int64)  # bytes of not-yet-visited (lower-score) replicas
        self.engine = np.zeros(total, dtype=bool)
        width = self.width
        for n, node in enumerate(state.nodes):
            self.budget[n * width : n * width + node.gpus] = node.gpu_bytes
        for (n, i), nbytes in state.used_by_gpu().items():
            self.used[n * width + i] = nbytes
        for n, i in state.engine_gpus():
            self.engine[n * width + i] = True
            self.budget[n * width + i] = state.lent((n, i))
        # per level, for each group: total score / count of kept replicas over every group nested with it,
        # kept up to date on each change (O(levels) small slices) instead of recomputed per replica
        self.ov_score = [np.zeros(total >> level) for level in range(self.levels)]
        self.ov_kept = [np.zeros(total >> level, dtype=np.int32) for level in range(self.levels)]
        self.exact_score = [np.zeros(total >> level) for level in range(self.levels)]  # replicas exactly on a group
        self.ov_pending: list[np.ndarray] = []  # like ov_score, over not-yet-visited replicas (set by plan_placement)

    def overlap(self, level: int, arrays: list[np.ndarray]) -> np.ndarray:
        """Per size-``2**level`` group, the total of ``arrays`` over every group nested with it."""
        total = np.zeros(len(self.budget) >> level, dtype=arrays[0].dtype)
        for other, values in enumerate(arrays):
            if other <= level:  # groups inside: sum them up
                total += values.reshape(-1, 1 << (level - other)).sum(axis=1)
            else:  # groups around: each covers 2**(other-level) of ours
                total += np.repeat(values, 1 << (other - level))
        return total

    def flat(self, node: int, gpu: int) -> int:
        return node * self.width + gpu

    def level_index(self, group: GpuGroup) -> tuple[int, int]:
        level = group.size.bit_length() - 1
        return level, self.flat(group.node, group.start) >> level

    def span(self, group: GpuGroup) -> slice:
        start = self.flat(group.node, group.start)
        return slice(start, start + group.size)

    def group_of(self, level: int, index: int) -> GpuGroup:
        size = 1 << level
        flat = index * size
        return GpuGroup(flat // self.width, flat % self.width, size)

    def bump(self, arrays: list[np.ndarray], group: GpuGroup, delta: float) -> None:
        """Add ``delta`` to every group nested with ``group`` (inside it or around it), at every level."""
        level, index = self.level_index(group)
        for other, values in enumerate(arrays):
            if other <= level:
                shift = level - other
                values[index << shift : (index + 1) << shift] += delta
            else:
                values[index >> (other - level)] += delta

    def add(self, group: GpuGroup, nbytes: int, score: float, kept: bool) -> None:
        self.used[self.span(group)] += nbytes
        self.bump(self.ov_score, group, score)
        if kept:
            self.bump(self.ov_kept, group, 1)

    def remove(self, group: GpuGroup, nbytes: int, score: float) -> None:
        self.used[self.span(group)] -= nbytes
        self.bump(self.ov_score, group, -score)


def reference_plan_placement(
    state: ClusterState,
    profiles: Mapping[str, ModelProfile],
    demand: Mapping[str, Demand],
    params: PlacementParams | None = None,
) -> PlacementDecision:
    """Decide which warm replicas to keep, drop and add for the coming window. Pure: ``state`` is not changed."""
    params = params or PlacementParams()
    decision = PlacementDecision()
    running = {name: 0 for name in profiles}
    for instance in state.instances.values():
        if instance.phase != EnginePhase.DRAINING and instance.model in running:
            running[instance.model] += 1

    slots = {
        name: replica_slots(profile, demand.get(name, Demand(0.0, 0.0)), running[name], params)
        for name, profile in sorted(profiles.items())
    }
    grid = _Grid(state)

    # Existing replicas take their model's first slots (warm before loading); the rest score 0 and go.
    existing: list[tuple[float, int]] = []  # (score, rid)
    slot_of: dict[int, int] = {}  # existing replica → the index of the slot it holds
    by_model: dict[str, list] = {}
    for replica in state.replicas.values():
        by_model.setdefault(replica.model, []).append(replica)
    for model, replicas in sorted(by_model.items()):
        # Promotable replicas first: warm ones, then those not sitting in an engine's lent KV space.
        replicas.sort(key=lambda r: (not r.warm, state.group_has_engine(r.group), r.rid))
        model_slots = slots.get(model, [])
        for position, replica in enumerate(replicas):
            if position < len(model_slots):
                score = model_slots[position].score
                existing.append((score, replica.rid))
                slot_of[replica.rid] = position
                level, index = grid.level_index(replica.group)
                grid.exact_score[level][index] += score
                grid.pending[grid.span(replica.group)] += replica.bytes_per_gpu
            else:
                decision.evict.append(replica.rid)
                grid.used[grid.span(replica.group)] -= replica.bytes_per_gpu
        if model in slots:
            slots[model] = model_slots[len(replicas) :]

    grid.ov_score = [grid.overlap(level, grid.exact_score) for level in range(grid.levels)]
    grid.ov_pending = [values.copy() for values in grid.ov_score]  # only replicas that may still be evicted

    # Model → flat GPU indices it already occupies (same-model replicas never share a GPU).
    occupied: dict[str, list[int]] = {}
    for instance in state.instances.values():
        start = grid.flat(instance.group.node, instance.group.start)
        occupied.setdefault(instance.model, []).extend(range(start, start + instance.group.size))
    scores: dict[int, float] = {}
    for score, rid in existing:
        replica = state.replicas[rid]
        scores[rid] = score
        start = grid.flat(replica.group.node, replica.group.start)
        occupied.setdefault(replica.model, []).extend(range(start, start + replica.group.size))

    # A heap, because a replica evicted to make room re-enters it as a new slot of its (lower) score.
    queue: list[tuple[float, int, str, int]] = [(-s, 0, state.replicas[r].model, r) for s, r in existing]
    queue += [(-slot.score, 1, slot.model, slot.index) for model_slots in slots.values() for slot in model_slots]
    heapq.heapify(queue)
    pending = dict(scores)  # existing replicas not visited yet (all of a lower score than the visitor)

    while queue:
        neg_score, is_new, model, key = heapq.heappop(queue)
        score = -neg_score
        if not is_new:
            if key in pending:  # visited: from now on it is protected from lower-score replicas
                del pending[key]
                replica = state.replicas[key]
                grid.pending[grid.span(replica.group)] -= replica.bytes_per_gpu
                grid.bump(grid.ov_kept, replica.group, 1)
                grid.bump(grid.ov_pending, replica.group, -score)
                decision.kept[key] = score
            continue
        profile = profiles[model]
        evicted_before = len(decision.evict)
        placed = _place_one(grid, state, profile, score, occupied.get(model, []), pending, decision)
        for rid in decision.evict[evicted_before:]:  # still wanted: try to place it elsewhere, later
            victim = state.replicas[rid]
            heapq.heappush(queue, (-scores[rid], 1, victim.model, slot_of[rid]))
        if placed is None:
            decision.unplaced.append(Slot(model, key, score))
            continue
        decision.add.append(NewReplica(model, placed, profile.shard_bytes, score))
        grid.add(placed, profile.shard_bytes, score, kept=True)
        start = grid.flat(placed.node, placed.start)
        occupied.setdefault(model, []).extend(range(start, start + placed.size))
    return decision


def _place_one(
    grid: _Grid,
    state: ClusterState,
    profile: ModelProfile,
    score: float,
    occupied: list[int],
    pending: dict[int, float],
    decision: PlacementDecision,
) -> GpuGroup | None:
    """Choose (and reserve room for) the group of one new replica; evicts lower-score replicas if needed."""
    size = profile.tp
    if size > grid.width:
        return None
    level = size.bit_length() - 1
    need = profile.shard_bytes
    excluded = np.zeros(len(grid.budget), dtype=bool)
    if occupied:
        excluded[occupied] = True
    excluded_group = excluded.reshape(-1, size).any(axis=1)
    free = grid.budget - grid.used
    fits = (free.reshape(-1, size).min(axis=1) >= need) & ~excluded_group
    overlap_sum = grid.ov_score[level]
    if fits.any():
        interferes = grid.ov_kept[level] > 0
        on_engine = np.asarray(grid.engine.reshape(-1, size).any(axis=1))  # (numpy's stubs allow a scalar)
        candidates = np.flatnonzero(fits)
        order = np.lexsort((candidates, overlap_sum[candidates], interferes[candidates], on_engine[candidates]))
        return grid.group_of(level, int(candidates[order[0]]))
    reclaimable = (free + grid.pending).reshape(-1, size).min(axis=1) >= need
    candidates = np.flatnonzero(reclaimable & ~excluded_group)
    if not len(candidates):
        return None
    # the group whose evictable replicas carry the least score: a victim never outranks the newcomer
    best = int(candidates[np.argmin(grid.ov_pending[level][candidates] + candidates * 1e-12)])
    group = grid.group_of(level, best)
    # Only replicas not visited yet can be victims, and those all score at most ``score``. Lowest score
    # first, and only those that sit on a GPU of the group that is still short of room.
    victims = sorted((pending[r.rid], r.rid) for r in state.replicas_overlapping(group) if r.rid in pending)
    span = grid.span(group)
    for victim_score, rid in victims:
        short = (grid.budget[span] - grid.used[span]) < need
        if not short.any():
            break
        replica = state.replicas[rid]
        inside = range(
            max(replica.group.start, group.start),
            min(replica.group.start + replica.group.size, group.start + group.size),
        )
        if not any(short[i - group.start] for i in inside):
            continue
        grid.remove(replica.group, replica.bytes_per_gpu, victim_score)
        grid.bump(grid.ov_pending, replica.group, -victim_score)
        grid.pending[grid.span(replica.group)] -= replica.bytes_per_gpu
        del pending[rid]
        decision.evict.append(rid)
    if (grid.budget - grid.used)[grid.span(group)].min() < need:
        return None
    return group
