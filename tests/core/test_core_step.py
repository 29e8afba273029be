"""WarmServePolicy.step: the control step the simulator and the operator share."""

from __future__ import annotations

from warmserve.core.autoscaler import EngineView
from warmserve.core.cluster import ClusterState, Instance, Promotion, WarmReplica
from warmserve.core.policy import EngineLoad, StepInput, WarmServePolicy
from warmserve.core.types import Demand, GpuGroup, ModelProfile, NodeSpec

GPU = 100


def setup(gpus: int = 4) -> tuple[ClusterState, WarmServePolicy]:
    state = ClusterState([NodeSpec("n", gpus, GPU)])
    profiles = {"a": ModelProfile("a", 40, 1, max_batch=10), "b": ModelProfile("b", 40, 1, max_batch=10)}
    return state, WarmServePolicy(profiles)


class Recorder:
    """StepEffects that log every call, in order."""

    def __init__(self, state: ClusterState, stop_at_once: bool = True) -> None:
        self.state, self.stop_at_once, self.calls = state, stop_at_once, []

    def evicting(self, replica: WarmReplica, reason: str) -> None:
        assert replica.rid in self.state.replicas  # called before the eviction
        self.calls.append(("evicting", replica.model, reason))

    def added(self, replica: WarmReplica, score: float) -> None:
        assert replica.rid in self.state.replicas and score > 0
        self.calls.append(("added", replica.model))

    def draining(self, instance: Instance) -> None:
        assert instance.phase == "draining"
        self.calls.append(("draining", instance.model))
        if self.stop_at_once:
            self.state.stop_instance(instance.iid)

    def started(self, promotion: Promotion) -> None:
        assert promotion.instance.iid in self.state.instances
        self.calls.append(("started", promotion.instance.model, promotion.source))


def test_placement_then_promotion_of_the_prewarmed_replica():
    state, policy = setup()
    effects = Recorder(state)
    # forecast only: prewarm one replica of a, start nothing
    record = policy.step(state, StepInput(0.0, {}, {}, demand={"a": Demand(5, 5)}, scale=False), effects)
    assert record.added == [("a", GpuGroup(0, 0, 1))] and not record.started
    state.mark_warm(next(iter(state.replicas)))
    # load arrives: the autoscaler starts a, on the prewarmed group (a hit)
    record = policy.step(state, StepInput(1.0, {"a": 5.0}, {"a": []}), effects)
    assert record.started == [("a", GpuGroup(0, 0, 1), "hit")]
    assert effects.calls == [("added", "a"), ("started", "a", "hit")]
    state.check_invariants()


def test_order_is_lend_then_place_then_scale():
    state, policy = setup(2)
    promotion = policy.start_engine(state, "a", 0.0)
    state.instances[promotion.instance.iid].phase = "serving"
    effects = Recorder(state)
    # a idle for long: lend everything, place b into the lent space? no — GPU 1 is free; then stop a
    inp = StepInput(
        100.0,
        {"a": 0.0, "b": 0.0},
        {"a": [EngineView(promotion.instance.iid, 0.0, 0)], "b": []},
        {promotion.instance.iid: EngineLoad(0, 0)},
        demand={"a": Demand(0, 0), "b": Demand(5, 5)},
    )
    record = policy.step(state, inp, effects)
    assert [c[0] for c in effects.calls] == ["added", "draining"]
    assert record.draining == [("a", GpuGroup(0, 0, 1))]
    # the stopped engine's weights stay as a warm replica of a
    assert {r.model for r in state.replicas.values()} == {"a", "b"}
    state.check_invariants()


def test_promotion_evicts_the_other_replicas_on_its_group_through_the_effects():
    state, policy = setup(1)
    state.add_replica("b", GpuGroup(0, 0, 1), 40, phase="warm")
    effects = Recorder(state)
    record = policy.step(state, StepInput(0.0, {"a": 9.0}, {"a": []}), effects)
    assert effects.calls == [("evicting", "b", "promotion"), ("started", "a", "cold")]
    assert record.evicted == [("b", GpuGroup(0, 0, 1), "promotion")]


def test_draining_engines_may_stop_later():
    state, policy = setup(1)
    promotion = policy.start_engine(state, "a", 0.0)
    effects = Recorder(state, stop_at_once=False)
    inp = StepInput(100.0, {"a": 0.0}, {"a": [EngineView(promotion.instance.iid, 0.0, 3)]})
    policy.step(state, inp, effects)
    assert state.instances[promotion.instance.iid].phase == "draining"  # the driver stops it when drained
