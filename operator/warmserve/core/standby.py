"""Which warm replicas a worker keeps a pre-initialised (standby) engine for.

A standby engine is initialised ahead of need without weights and binds a warm replica of its model in about
half a second, against seconds for an engine started at promotion (docs/worker.md, "Pre-initialised (standby)
engines"). It costs an engine's memory outside the arena and a pre-started process, so a worker keeps only a
few: `per_node`, a WarmPool setting (`spec.worker.standbyEngines`). They go to the replicas the placement
values most (its scores: the replicas it would evict last), at most one on each GPU: on a GPU, an engine is
sized to the whole budget its arena leaves, so a second one would not start (a TP-k replica's standby engine
takes its k GPUs). A worker builds none on a GPU that runs an engine, so none is chosen there. On a GPU pool
the budget outside the arena is there for an engine anyway: one standby engine per GPU (`standbyEngines` =
GPUs per worker) costs no arena memory; on a CPU pool each takes node memory.

Starting a standby engine costs an engine initialisation, so a choice is kept while it stays possible: the
replicas chosen before (`keep`) come first, and only the slots they leave go to the best-scored others.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from warmserve.core.cluster import ClusterState


def standby_replicas(
    state: ClusterState,
    scores: Mapping[int, float],
    per_node: int,
    keep: Collection[int] = (),
    skip_models: Collection[str] = (),
) -> frozenset[int]:
    """Ids of the warm replicas to keep a standby engine for: per node `per_node` replicas on GPUs without an
    engine, at most one on each GPU; those in `keep` first, then the best-scored (ties: model name, then replica
    id); none for the models in `skip_models` (prewarming off: a replica an engine left behind gets no standby
    engine). (On a CPU node every replica of a model has the same shape: the worker keeps one engine for them.)"""
    if per_node <= 0:
        return frozenset()
    candidates: dict[int, list[tuple[bool, float, str, int]]] = {}
    for rep in state.replicas.values():
        if rep.model in skip_models or state.group_has_engine(rep.group):
            continue
        rank = (rep.rid not in keep, -scores.get(rep.rid, 0.0), rep.model, rep.rid)
        candidates.setdefault(rep.group.node, []).append(rank)
    chosen: set[int] = set()
    for ranked in candidates.values():
        taken: set[int] = set()
        count = 0
        for _, _, _, rid in sorted(ranked):
            gpus = set(state.replicas[rid].group.gpus)
            if not taken & gpus:
                taken |= gpus
                chosen.add(rid)
                count += 1
                if count == per_node:
                    break
    return frozenset(chosen)
