"""ClusterState: ledgers, budgets, the idle → universal → dedicated → universal state machine, and errors."""

from __future__ import annotations

import pytest

from warmserve.core.cluster import ALLOWED_TRANSITIONS, ClusterState, PlanError, Role
from warmserve.core.types import GpuGroup, NodeSpec

CAP = 100


def make_state(*gpus: int, cap: int = CAP) -> ClusterState:
    return ClusterState([NodeSpec(f"n{i}", g, cap) for i, g in enumerate(gpus)])


def snapshot(state: ClusterState) -> tuple:
    gpus = list(state.all_gpus())
    return (
        {rid: (r.model, r.group, r.bytes_per_gpu, r.phase) for rid, r in state.replicas.items()},
        {iid: (i.model, i.group, i.weight_bytes_per_gpu, i.phase) for iid, i in state.instances.items()},
        [(state.used(g), state.budget(g), state.lent(g), state.role(g)) for g in gpus],
    )


# ------------------------------------------------------------------- queries
def test_needs_a_node() -> None:
    with pytest.raises(ValueError):
        ClusterState([])


def test_all_gpus_and_groups_enumerate_aligned_groups_per_node() -> None:
    state = make_state(4, 2)
    assert list(state.all_gpus()) == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    assert list(state.groups(2)) == [GpuGroup(0, 0, 2), GpuGroup(0, 2, 2), GpuGroup(1, 0, 2)]
    assert list(state.groups(4)) == [GpuGroup(0, 0, 4)]
    assert list(state.groups(8)) == []
    assert list(state.gpus_of(GpuGroup(0, 2, 2))) == [(0, 2), (0, 3)]


def test_groups_on_a_node_whose_gpu_count_is_not_a_power_of_two() -> None:
    state = make_state(6)
    assert list(state.groups(4)) == [GpuGroup(0, 0, 4)]  # (0, 4, 4) would need GPUs 6 and 7
    assert list(state.groups(2)) == [GpuGroup(0, 0, 2), GpuGroup(0, 2, 2), GpuGroup(0, 4, 2)]
    assert not state.valid_group(GpuGroup(0, 4, 4))


def test_valid_group() -> None:
    state = make_state(4)
    assert state.valid_group(GpuGroup(0, 0, 4))
    assert not state.valid_group(GpuGroup(1, 0, 1))  # no such node
    assert not state.valid_group(GpuGroup(0, 0, 8))
    assert not state.valid_group(GpuGroup(0, 4, 1))


def test_fresh_state_is_idle_with_full_budgets() -> None:
    state = make_state(2, cap=70)
    for gpu in state.all_gpus():
        assert state.role(gpu) is Role.IDLE
        assert (state.budget(gpu), state.used(gpu), state.free(gpu), state.lent(gpu)) == (70, 0, 70, 0)
        assert state.engine_on(gpu) is None
        assert state.capacity(gpu) == 70
    state.check_invariants()


# ------------------------------------------------------------- add / evict
def test_add_replica_books_bytes_on_every_gpu_of_its_group() -> None:
    state = make_state(4)
    replica = state.add_replica("a", GpuGroup(0, 0, 2), 30)
    assert replica.phase == "loading" and not replica.warm
    assert [state.used(g) for g in state.all_gpus()] == [30, 30, 0, 0]
    assert [state.role(g) for g in state.all_gpus()] == [Role.UNIVERSAL] * 2 + [Role.IDLE] * 2
    assert state.replicas_on((0, 1)) == [replica]
    assert state.replicas_of("a") == [replica] and state.replicas_of("b") == []
    state.mark_warm(replica.rid)
    assert replica.warm
    state.check_invariants()


def test_add_replica_fills_a_gpu_exactly_but_not_beyond() -> None:
    state = make_state(2)
    state.add_replica("a", GpuGroup(0, 0, 1), 60)
    state.add_replica("b", GpuGroup(0, 0, 2), 40)  # GPU 0 now exactly full
    assert state.free((0, 0)) == 0 and state.free((0, 1)) == 60
    before = snapshot(state)
    with pytest.raises(PlanError, match="free bytes"):
        state.add_replica("c", GpuGroup(0, 0, 2), 1)
    assert snapshot(state) == before  # a refused add changes nothing
    state.check_invariants()


@pytest.mark.parametrize(
    ("group", "nbytes", "match"),
    [
        (GpuGroup(1, 0, 1), 10, "does not exist"),
        (GpuGroup(0, 0, 8), 10, "does not exist"),
        (GpuGroup(0, 0, 1), 0, "positive"),
        (GpuGroup(0, 0, 1), -5, "positive"),
        (GpuGroup(0, 0, 1), CAP + 1, "free bytes"),
    ],
)
def test_add_replica_errors(group: GpuGroup, nbytes: int, match: str) -> None:
    state = make_state(4)
    with pytest.raises(PlanError, match=match):
        state.add_replica("a", group, nbytes)
    assert state.replicas == {}


def test_one_model_never_holds_two_replicas_on_one_gpu() -> None:
    state = make_state(4)
    state.add_replica("a", GpuGroup(0, 0, 1), 10)
    with pytest.raises(PlanError, match="already has a replica"):
        state.add_replica("a", GpuGroup(0, 0, 1), 10)
    with pytest.raises(PlanError, match="already has a replica"):
        state.add_replica("a", GpuGroup(0, 0, 2), 10)  # overlaps through GPU 0
    state.add_replica("a", GpuGroup(0, 2, 2), 10)  # disjoint: fine
    state.add_replica("b", GpuGroup(0, 0, 1), 10)  # another model: fine
    assert len(state.replicas_of("a")) == 2


def test_evict_returns_the_bytes_and_can_make_a_gpu_idle() -> None:
    state = make_state(2)
    a = state.add_replica("a", GpuGroup(0, 0, 2), 30)
    b = state.add_replica("b", GpuGroup(0, 1, 1), 20)
    assert state.evict(a.rid) is a
    assert [state.used(g) for g in state.all_gpus()] == [0, 20]
    assert [state.role(g) for g in state.all_gpus()] == [Role.IDLE, Role.UNIVERSAL]  # universal → idle
    state.evict(b.rid)
    assert state.replicas == {}
    with pytest.raises(KeyError):
        state.evict(b.rid)
    state.check_invariants()


def test_replicas_overlapping_sees_inner_and_outer_groups() -> None:
    state = make_state(4)
    big = state.add_replica("big", GpuGroup(0, 0, 4), 10)
    inner = state.add_replica("inner", GpuGroup(0, 1, 1), 10)
    other = state.add_replica("other", GpuGroup(0, 2, 2), 10)
    assert state.replicas_overlapping(GpuGroup(0, 0, 2)) == [big, inner]
    assert state.replicas_overlapping(GpuGroup(0, 3, 1)) == [big, other]
    assert state.replicas_overlapping(GpuGroup(0, 0, 4)) == [big, inner, other]


# ------------------------------------------------------------ engines
def test_start_instance_on_a_warm_replica_is_a_hit_and_evicts_the_others() -> None:
    state = make_state(4)
    mine = state.add_replica("a", GpuGroup(0, 0, 2), 40, phase="warm")
    inner = state.add_replica("b", GpuGroup(0, 1, 1), 30)
    outer = state.add_replica("c", GpuGroup(0, 0, 4), 20)  # spans GPUs 2-3 too: must go entirely
    bystander = state.add_replica("d", GpuGroup(0, 3, 1), 10)
    promotion = state.start_instance("a", GpuGroup(0, 0, 2), 40, now=7.0)
    assert promotion.source == "hit"
    assert {r.rid for r in promotion.evicted} == {inner.rid, outer.rid}
    assert mine.rid not in state.replicas  # its pages became the engine's weights
    assert set(state.replicas) == {bystander.rid}
    instance = promotion.instance
    assert (instance.model, instance.group, instance.started_at, instance.phase) == (
        "a",
        GpuGroup(0, 0, 2),
        7.0,
        "starting",
    )
    assert state.instances_of("a") == [instance]
    assert [state.role(g) for g in state.all_gpus()] == [Role.DEDICATED, Role.DEDICATED, Role.IDLE, Role.UNIVERSAL]
    for gpu in [(0, 0), (0, 1)]:
        assert state.engine_on(gpu) is instance
        assert (state.budget(gpu), state.used(gpu), state.lent(gpu)) == (0, 0, 0)  # lends nothing yet
    assert state.group_has_engine(GpuGroup(0, 0, 4)) and not state.group_has_engine(GpuGroup(0, 2, 2))
    state.check_invariants()


def test_start_instance_sources() -> None:
    state = make_state(4)
    state.add_replica("a", GpuGroup(0, 0, 1), 10)  # still loading
    assert state.start_instance("a", GpuGroup(0, 0, 1), 10, 0.0).source == "loading"
    state.add_replica("b", GpuGroup(0, 1, 1), 10, phase="warm")
    promotion = state.start_instance("b", GpuGroup(0, 2, 2), 10, 0.0)
    assert promotion.source == "cold" and promotion.evicted == []
    # a replica of the model on a *different* group is not a hit: it is evicted like any other
    promotion = state.start_instance("b", GpuGroup(0, 1, 1), 10, 0.0)
    assert promotion.source == "hit"
    state.check_invariants()


def test_replica_of_the_same_model_on_another_group_is_evicted_not_used() -> None:
    state = make_state(2)
    replica = state.add_replica("a", GpuGroup(0, 0, 1), 10, phase="warm")
    promotion = state.start_instance("a", GpuGroup(0, 0, 2), 10, 0.0)
    assert promotion.source == "cold"
    assert [r.rid for r in promotion.evicted] == [replica.rid]


def test_start_instance_errors() -> None:
    state = make_state(4)
    with pytest.raises(PlanError, match="does not exist"):
        state.start_instance("a", GpuGroup(0, 0, 8), 10, 0.0)
    state.start_instance("a", GpuGroup(0, 0, 1), 10, 0.0)
    before = snapshot(state)
    for group in (GpuGroup(0, 0, 1), GpuGroup(0, 0, 2), GpuGroup(0, 0, 4)):
        with pytest.raises(PlanError, match="already runs an engine"):
            state.start_instance("b", group, 10, 0.0)
    assert snapshot(state) == before


def test_start_instance_refuses_weights_larger_than_the_gpu() -> None:
    """An engine that cannot fit must be refused up front: otherwise lend() sees a negative KV capacity and
    stop_instance fails only after it has changed the state."""
    state = make_state(2)
    state.add_replica("a", GpuGroup(0, 0, 1), 10)
    before = snapshot(state)
    with pytest.raises(PlanError, match="needs"):
        state.start_instance("huge", GpuGroup(0, 0, 2), CAP + 1, 0.0)
    assert snapshot(state) == before
    state.start_instance("fits", GpuGroup(0, 0, 2), CAP, 0.0)  # exactly the arena: fine


def test_set_lent_and_replicas_in_lent_space() -> None:
    state = make_state(2)
    engine = state.start_instance("a", GpuGroup(0, 0, 1), 30, 0.0).instance
    with pytest.raises(PlanError, match="free bytes"):
        state.add_replica("b", GpuGroup(0, 0, 1), 1)  # nothing lent yet
    with pytest.raises(PlanError, match="runs no engine"):
        state.set_lent((0, 1), 10)
    with pytest.raises(PlanError, match="cannot lend"):
        state.set_lent((0, 0), -1)
    with pytest.raises(PlanError, match="cannot lend"):
        state.set_lent((0, 0), CAP - 30 + 1)  # more than the KV space beside the weights
    state.set_lent((0, 0), CAP - 30)
    assert (state.budget((0, 0)), state.free((0, 0)), state.lent((0, 0))) == (70, 70, 70)
    lent = state.add_replica("b", GpuGroup(0, 0, 1), 50)
    assert state.role((0, 0)) is Role.DEDICATED  # a replica in lent space does not change the role
    with pytest.raises(PlanError, match="free bytes"):
        state.add_replica("c", GpuGroup(0, 0, 2), 21)
    with pytest.raises(PlanError, match="evict lent replicas"):
        state.set_lent((0, 0), 49)  # taking space back needs the replica gone first
    state.set_lent((0, 0), 50)
    assert state.free((0, 0)) == 0
    with pytest.raises(PlanError, match="already runs an engine"):
        state.add_replica("a", GpuGroup(0, 0, 2), 1)  # the engine's own model can not prewarm beside it
    state.evict(lent.rid)
    state.set_lent((0, 0), 0)
    assert state.engine_on((0, 0)) is engine
    state.check_invariants()


def test_stop_instance_keeps_weights_as_a_warm_replica() -> None:
    state = make_state(2)
    instance = state.start_instance("a", GpuGroup(0, 0, 2), 40, 0.0).instance
    state.set_lent((0, 0), 60)
    state.set_lent((0, 1), 30)
    lent = state.add_replica("b", GpuGroup(0, 0, 2), 30)
    replica = state.stop_instance(instance.iid)
    assert (replica.model, replica.group, replica.bytes_per_gpu, replica.phase) == ("a", GpuGroup(0, 0, 2), 40, "warm")
    assert state.instances == {}
    assert set(state.replicas) == {lent.rid, replica.rid}  # lent replicas survive the stop
    for gpu in state.all_gpus():
        assert state.role(gpu) is Role.UNIVERSAL  # dedicated → universal
        assert (state.budget(gpu), state.used(gpu), state.lent(gpu)) == (CAP, 70, 0)
        assert state.engine_on(gpu) is None
    with pytest.raises(KeyError):
        state.stop_instance(instance.iid)
    state.check_invariants()


def test_full_state_machine_cycle() -> None:
    """idle → universal (prewarm) → dedicated (promotion) → universal (stop) → idle (evict)."""
    state = make_state(1)
    gpu, group = (0, 0), GpuGroup(0, 0, 1)
    seen = [state.role(gpu)]
    replica = state.add_replica("a", group, 50, phase="warm")
    seen.append(state.role(gpu))
    instance = state.start_instance("a", group, 50, 1.0).instance
    seen.append(state.role(gpu))
    replica = state.stop_instance(instance.iid)
    seen.append(state.role(gpu))
    state.evict(replica.rid)
    seen.append(state.role(gpu))
    assert seen == [Role.IDLE, Role.UNIVERSAL, Role.DEDICATED, Role.UNIVERSAL, Role.IDLE]
    state.start_instance("a", group, 50, 2.0)  # idle → dedicated: a cold start
    assert state.role(gpu) is Role.DEDICATED


def test_allowed_transitions_are_exactly_the_state_machine() -> None:
    assert {
        (Role.IDLE, Role.UNIVERSAL),
        (Role.IDLE, Role.DEDICATED),
        (Role.UNIVERSAL, Role.DEDICATED),
        (Role.UNIVERSAL, Role.IDLE),
        (Role.DEDICATED, Role.UNIVERSAL),
    } == ALLOWED_TRANSITIONS
    assert (Role.DEDICATED, Role.IDLE) not in ALLOWED_TRANSITIONS  # an engine always leaves its weights behind


def test_forbidden_transition_raises() -> None:
    """No public mutation produces dedicated → idle, so the guard itself is exercised directly."""
    state = make_state(1)
    group = GpuGroup(0, 0, 1)
    with pytest.raises(PlanError, match="not allowed"):
        state._check_transitions(group, {(0, 0): Role.DEDICATED})  # now idle: dedicated → idle
    state._check_transitions(group, {(0, 0): Role.IDLE})  # unchanged: fine
    state.add_replica("a", group, 10)
    state._check_transitions(group, {(0, 0): Role.IDLE})  # idle → universal: fine
    state._check_transitions(group, {(0, 0): Role.DEDICATED})  # dedicated → universal: fine (engine stop)


def test_ids_are_unique_across_replicas_and_instances() -> None:
    state = make_state(2)
    r1 = state.add_replica("a", GpuGroup(0, 0, 1), 10)
    inst = state.start_instance("b", GpuGroup(0, 1, 1), 10, 0.0).instance
    r2 = state.stop_instance(inst.iid)
    assert len({r1.rid, inst.iid, r2.rid}) == 3


# ---------------------------------------------------------- check_invariants
def test_check_invariants_detects_a_drifted_ledger() -> None:
    state = make_state(2)
    state.add_replica("a", GpuGroup(0, 0, 1), 10)
    state._used[(0, 1)] += 1
    with pytest.raises(AssertionError, match="drifted"):
        state.check_invariants()


def test_check_invariants_detects_over_commit() -> None:
    state = make_state(1)
    state.start_instance("a", GpuGroup(0, 0, 1), 10, 0.0)
    state.set_lent((0, 0), 50)
    state.add_replica("b", GpuGroup(0, 0, 1), 40)
    state._lent[(0, 0)] = 30  # bypasses set_lent's check, as a buggy caller might
    with pytest.raises(AssertionError, match="over-committed"):
        state.check_invariants()


def test_check_invariants_detects_unnested_groups() -> None:
    state = make_state(4)
    state.add_replica("a", GpuGroup(0, 0, 2), 10)
    b = state.add_replica("b", GpuGroup(0, 2, 2), 10)
    object.__setattr__(b.group, "start", 1)  # forge a misaligned group (0, 1, 2) around the validation
    state._used = {g: 0 for g in state._used}
    for replica in state.replicas.values():
        for gpu in state.gpus_of(replica.group):
            state._used[gpu] += replica.bytes_per_gpu
    with pytest.raises(AssertionError, match="not nested"):
        state.check_invariants()
