"""Which warm replicas get a standby engine (`warmserve.core.standby`): per node the best-scored replicas on
GPUs without an engine, at most one on each GPU, the ones chosen before first."""

from __future__ import annotations

from warmserve.core.cluster import ClusterState
from warmserve.core.standby import standby_replicas
from warmserve.core.types import GpuGroup, NodeSpec

GB = 10**9


def test_per_node_the_best_scored_replicas_one_per_gpu():
    state = ClusterState([NodeSpec("n0", 4, 80 * GB), NodeSpec("n1", 4, 80 * GB)])
    a0 = state.add_replica("a", GpuGroup(0, 0, 1), 10 * GB).rid
    a1 = state.add_replica("a", GpuGroup(0, 1, 1), 10 * GB).rid  # a second replica of a, on another GPU
    b0 = state.add_replica("b", GpuGroup(0, 0, 1), 10 * GB).rid
    c0 = state.add_replica("c", GpuGroup(0, 2, 1), 10 * GB).rid
    d1 = state.add_replica("d", GpuGroup(1, 0, 1), 10 * GB).rid
    scores = {a0: 5.0, a1: 9.0, b0: 1.0, c0: 3.0, d1: 0.5}
    assert standby_replicas(state, scores, 1) == {a1, d1}
    assert standby_replicas(state, scores, 2) == {a1, a0, d1}  # two engines of a on two GPUs
    assert standby_replicas(state, scores, 4) == {a1, a0, c0, d1}  # b0 shares GPU 0 with a0
    assert standby_replicas(state, scores, 0) == frozenset()
    assert standby_replicas(state, {}, 1) == {a0, d1}  # unscored: by model name, then id
    # a replica chosen before keeps its standby engine while it is a candidate, whatever the scores say
    assert standby_replicas(state, scores, 1, keep={c0}) == {c0, d1}
    assert standby_replicas(state, scores, 2, keep={b0, 999}) == {b0, a1, d1}
    # models with prewarming off get none (their replicas are weights an engine left behind)
    assert standby_replicas(state, scores, 1, keep={a1}, skip_models={"a"}) == {c0, d1}


def test_a_tensor_parallel_replica_takes_its_gpus_and_none_goes_on_a_gpu_with_an_engine():
    state = ClusterState([NodeSpec("n0", 4, 80 * GB)])
    big = state.add_replica("big", GpuGroup(0, 0, 2), 10 * GB).rid
    small = state.add_replica("small", GpuGroup(0, 2, 1), 10 * GB).rid
    other = state.add_replica("other", GpuGroup(0, 3, 1), 10 * GB).rid
    state.start_instance("served", GpuGroup(0, 2, 1), 10 * GB, 0.0)  # evicts small: its GPU is the engine's
    assert small not in state.replicas
    (gpu,) = state.gpus_of(GpuGroup(0, 2, 1))
    state.set_lent(gpu, 20 * GB)
    lent = state.add_replica("lent", GpuGroup(0, 2, 1), 10 * GB).rid  # in KV space the engine lends
    assert standby_replicas(state, {big: 9.0, lent: 5.0, other: 1.0}, 4) == {big, other}
    inner = state.add_replica("inner", GpuGroup(0, 1, 1), 10 * GB).rid  # inside big's group
    assert standby_replicas(state, {big: 9.0, inner: 8.0, other: 1.0}, 4) == {big, other}
    assert standby_replicas(state, {big: 1.0, inner: 8.0, other: 1.0}, 4) == {inner, other}


def test_a_promotion_prefers_the_replica_whose_standby_engine_is_ready():
    from warmserve.core.cluster import ReplicaPhase, StartSource
    from warmserve.core.policy import WarmServePolicy
    from warmserve.core.types import ModelProfile

    state = ClusterState([NodeSpec("n0", 4, 80 * GB)])
    first = state.add_replica("a", GpuGroup(0, 0, 1), 10 * GB, ReplicaPhase.WARM).rid
    second = state.add_replica("a", GpuGroup(0, 1, 1), 10 * GB, ReplicaPhase.WARM).rid
    policy = WarmServePolicy({"a": ModelProfile("a", 10 * GB)})
    assert policy.choose_group(state, "a") == (state.replicas[first].group, StartSource.HIT)
    policy.standby_ready = frozenset({second})
    assert policy.choose_group(state, "a") == (state.replicas[second].group, StartSource.HIT)
