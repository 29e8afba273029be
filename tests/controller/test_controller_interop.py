"""The operator's side of the plan/state protocol against the worker agent's own code.

The operator writes plans and reads states; the worker reads plans and writes states. Both parse with the
one protocol module (`warmserve.protocol`; docs/design.md, "Protocol"), so these tests check what that
module alone cannot: plans the operator's planner renders are accepted by a real worker `Agent`, and the
state a real `Agent` (real shared-memory arenas, real weight store, real reconcile pass; only the vLLM engine
processes are replaced) writes for an operator-rendered plan is what the operator's status and planner read.
"""

from __future__ import annotations

import json
import os
import struct
import time
import uuid

import pytest

from warmserve.controller.planner import (
    ModelEntry,
    PlannerMemory,
    RoundInput,
    WorkerSnapshot,
    plan_round,
    rebuild_state,
)
from warmserve.controller.reconcile import WorkerView, observe_models
from warmserve.core.policy import WarmServePolicy
from warmserve.core.types import GB, Demand, ModelProfile
from warmserve.protocol import (
    Phase,
    Plan,
    PlanGroup,
    PlanReplica,
    ProtocolError,
    ReplicaKey,
    Role,
    WorkerError,
    WorkerState,
    parse_plan,
    parse_state,
)

agent_module = pytest.importorskip("warmserve.worker.agent")
MIB = 1 << 20


def _entry(name: str, size: int, tp: int) -> ModelEntry:
    return ModelEntry(
        f"uid-{name}", name, f"file:///models/{name}", ModelProfile(f"uid-{name}", size, tp, max_batch=16)
    )


def test_rendered_plans_parse_and_a_worker_accepts_them(tmp_path):
    models = [_entry("a", 13 * GB, 1), _entry("b", 26 * GB, 2), _entry("c", 130 * GB, 4)]
    workers = [WorkerSnapshot(f"w{i}", 8, 72 * GB) for i in range(3)]
    demand = {m.uid: Demand(4.0, 10.0) for m in models}
    out = plan_round(
        WarmServePolicy({m.uid: m.profile for m in models}),
        RoundInput(0.0, workers, models, {models[2].uid: 5.0}, demand, PlannerMemory()),
    )
    checked = 0
    for plan in out.plans.values():
        parsed = parse_plan(plan.dumps())  # the annotation text, read the way the worker reads it
        assert parsed == plan
        assert len(parsed.replicas) == sum(len(g.replicas) for g in plan.groups)
        for g in plan.groups:
            for r in g.replicas:
                got = parsed.replicas[ReplicaKey(r.uid, tuple(g.gpus[: r.tp]))]
                assert (got.model, got.source, got.tp, got.role, got.kv_lend, got.gpus) == (
                    r.model,
                    r.source,
                    r.tp,
                    r.role,
                    r.kv_lend,
                    g.gpus,
                )
        agent = agent_module.Agent({}, str(tmp_path / f"state-{checked}"))
        agent.apply(plan.dumps())
        assert agent.plan_error is None and agent.plan == plan
        checked += 1
    assert checked >= 1


def test_two_replicas_of_one_model_on_one_worker_are_accepted():
    replica = PlanReplica("a", "uid-a", "file:///models/a", 1, Role.SERVE, 0)
    plan = Plan.build(3, [PlanGroup((0,), (replica,)), PlanGroup((1,), (replica,))])
    parsed = parse_plan(plan.to_json())
    assert sorted(parsed.replicas) == [ReplicaKey("uid-a", (0,)), ReplicaKey("uid-a", (1,))]
    assert {r.device_of_rank(0) for r in parsed.replicas.values()} == {"0", "1"}


def test_the_same_replica_twice_on_the_same_gpus_is_still_a_duplicate():
    text = {
        "generation": 1,
        "groups": [
            {
                "gpus": [0],
                "replicas": [{"model": "a", "uid": "uid-a", "source": "/m/a", "tp": 1, "role": "warm", "kvLend": 0}]
                * 2,
            }
        ],
    }
    with pytest.raises(ProtocolError, match="duplicate replica"):
        parse_plan(text)


def _write_safetensors(directory, seed: int, nbytes: int) -> str:
    """A one-tensor safetensors file (the store only needs valid headers and bytes)."""
    os.makedirs(directory, exist_ok=True)
    header = json.dumps({"w": {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}}).encode()
    with open(os.path.join(directory, "model.safetensors"), "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header + bytes((seed + i) % 251 for i in range(nbytes)))
    return str(directory)


class _Engines:
    """The engine-manager surface the agent uses (`warmserve.worker.engines.Engines`) with real `EngineRecord`s
    and no vLLM processes: a shell is always ready, an engine is ready on its second poll (like an API server
    answering `/v1/models` a bit later)."""

    def __init__(self, host: str):
        from warmserve.worker.engines import EngineRecord

        self.record, self.host = EngineRecord, host
        self.engines: dict = {}
        self.polls: dict = {}

    def running(self):
        return dict(self.engines)

    def acquire_shell(self, timeout):
        return "shell"

    def release_shell(self, shell):
        pass

    def launch(
        self, key, shell, model, model_dir, manifest_path, report_path=None, served_name=None, extra_args=None, env=None
    ):
        n = len(self.engines)
        rec = self.record(key.id, model, served_name or model, 8000 + n, 1000 + n, host=self.host)
        self.engines[key] = rec
        return rec

    def poll(self, key):
        self.polls[key] = self.polls.get(key, 0) + 1
        rec = self.engines[key]
        rec.ready = rec.ready or self.polls[key] >= 2
        return rec

    def alive(self, key):
        return key in self.engines

    def stop(self, key):
        self.engines.pop(key, None)
        return 0.0

    def adopt(self):
        return []

    def shutdown(self, stop_engines=True):
        self.engines.clear()


@pytest.fixture
def worker_agent(tmp_path):
    """A real worker Agent over two real shared-memory arenas ("GPUs" 0 and 1)."""
    from warmserve.worker.arena import Arena

    prefix = f"/dev/shm/warmserve-interop-{uuid.uuid4().hex[:10]}"
    arenas = {str(i): Arena.host(str(i), f"{prefix}-{i}", 4 * MIB, page_size=64 * 1024) for i in range(2)}
    agent = agent_module.Agent(arenas, str(tmp_path / "state"), _Engines("10.1.2.3"))
    try:
        yield agent
    finally:
        agent.shutdown()
        for arena in arenas.values():
            arena.close()
        for name in os.listdir("/dev/shm"):
            if name.startswith(os.path.basename(prefix)):
                os.unlink(os.path.join("/dev/shm", name))


def _step_until(agent, predicate, timeout: float = 20.0) -> WorkerState:
    deadline = time.monotonic() + timeout
    while True:
        state = agent.step()
        if predicate(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.02)


def test_operator_reads_the_state_the_worker_writes(worker_agent, tmp_path):
    # before any plan: generation 0, both devices, nothing held
    empty = parse_state(worker_agent.step().dumps())
    assert empty.observed_generation == 0 and [d.index for d in empty.devices] == [0, 1]
    assert empty.replicas == () and empty.errors == ()

    a = _write_safetensors(tmp_path / "models" / "a", 1, 300_000)
    b = _write_safetensors(tmp_path / "models" / "b", 2, 200_000)
    serve_a = PlanReplica("a", "uid-a", f"file://{a}", 1, Role.SERVE, 0)
    warm_a = PlanReplica("a", "uid-a", f"file://{a}", 1, Role.WARM, 0)
    warm_b = PlanReplica("b", "uid-b", f"file://{b}", 1, Role.WARM, 0)
    ghost = PlanReplica("c", "uid-c", f"file://{tmp_path}/no-such-model", 1, Role.WARM, 0)
    # an engine of `a` on GPU 0 and a warm replica of the same model on GPU 1 of the same worker
    plan = Plan.build(7, [PlanGroup((0,), (serve_a,)), PlanGroup((1,), (warm_a, warm_b, ghost))])
    worker_agent.apply(plan.dumps())  # the annotation text the operator writes

    def settled(s: WorkerState) -> bool:
        phases = {(r.uid, r.gpus): r.phase for r in s.replicas}
        return phases == {("uid-a", (0,)): Phase.SERVING, ("uid-a", (1,)): Phase.WARM, ("uid-b", (1,)): Phase.WARM}

    written = _step_until(worker_agent, settled)
    assert settled(written), written.dumps()
    state = parse_state(written.dumps())  # the annotation text the worker writes

    assert state.observed_generation == 7
    assert [d.index for d in state.devices] == [0, 1]
    assert all(d.total_bytes == 4 * MIB and d.used_bytes + d.free_bytes == d.total_bytes for d in state.devices)
    assert state.devices[1].used_bytes > state.devices[0].used_bytes > 0  # a + b on GPU 1, a on GPU 0
    by_key = {(r.uid, r.gpus): r for r in state.replicas}
    assert set(by_key) == {("uid-a", (0,)), ("uid-a", (1,)), ("uid-b", (1,))}
    serving, warm = by_key[("uid-a", (0,))], by_key[("uid-a", (1,))]
    assert serving.serving and serving.ready and serving.endpoint == "10.1.2.3:8000" and serving.progress == 1.0
    assert warm.phase == Phase.WARM and not warm.ready and warm.endpoint is None and not warm.dedicated
    (error,) = state.errors  # the missing model: an error with its uid/gpus, not a replica phase
    assert (error.uid, error.gpus) == ("uid-c", (1,)) and "no such model directory" in error.reason

    # what the operator does with it: per-model observations and the planner's reported phases
    view = WorkerView("w0", "node-0", "10.1.2.3", 2, True, plan, state)
    obs = observe_models([view])
    assert (obs["uid-a"].desired_serve, obs["uid-a"].ready, obs["uid-a"].prewarmed) == (1, 1, 1)
    assert obs["uid-a"].endpoints == ["10.1.2.3:8000"] and obs["uid-b"].prewarmed == 1
    assert obs["uid-c"].errors and "uid-c on GPUs [1]" in obs["uid-c"].errors[0] and not obs["uid-a"].errors
    models = [_entry("a", 300_000, 1), _entry("b", 200_000, 1)]
    cluster, _ = rebuild_state([WorkerSnapshot("w0", 2, 4 * MIB, plan, state)], models, PlannerMemory())
    assert sorted(i.phase for i in cluster.instances.values()) == ["serving"]
    assert sorted(r.phase for r in cluster.replicas.values()) == ["warm", "warm"]


def test_state_outside_the_contract_is_a_protocol_error():
    good = {
        "observedGeneration": 1,
        "devices": [{"index": 0, "totalBytes": 8, "usedBytes": 2, "freeBytes": 6}],
        "replicas": [
            {"model": "a", "uid": "u", "gpus": [0], "phase": "warm", "progress": 1.0, "endpoint": None, "ready": False}
        ],
        "errors": [{"reason": "plan rejected: x"}],
        "timings": {},
    }
    assert parse_state(good).errors == (WorkerError("plan rejected: x"),)
    bad = [
        {**good, "observedGeneration": None},
        {**good, "devices": [{"gpu": "0", "bytesTotal": 8, "bytesUsed": 2, "bytesFree": 6}]},
        {**good, "replicas": [{**good["replicas"][0], "phase": "failed"}]},
        {**good, "replicas": [{**good["replicas"][0], "endpoint": {"host": "h", "port": 1, "ready": True}}]},
        {**good, "errors": ["a bare string"]},
    ]
    for doc in bad:
        with pytest.raises(ProtocolError):
            parse_state(doc)
