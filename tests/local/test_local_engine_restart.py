"""The worker agent restarts a serving engine whose process died (fast: fake engines, a real arena and store).

`warmserve up` (and the sidecar) rely on it: when a ready engine is killed (OOM killer, a crash in a kernel,
SIGKILL), the agent must notice, drop it from its state (so the router stops sending to it) and, as the plan
still serves the replica and its weights are still warm, promote it again — without marking the replica
failed. Before the fix the agent only checked the processes of engines that were not yet ready: a dead
serving engine was reported `serving` for ever.
"""

from __future__ import annotations

import json
import os
import struct
import time
import uuid
from dataclasses import dataclass

import pytest

from warmserve.protocol import Phase, ReplicaKey, WorkerState
from warmserve.worker.agent import Agent
from warmserve.worker.arena import Arena

MiB = 1 << 20
KEY = ReplicaKey("a", (0,))
pytestmark = pytest.mark.timeout(60)


@dataclass
class FakeRecord:
    uid: str
    served_name: str
    port: int
    pid: int
    host: str = "127.0.0.1"
    ready: bool = False
    ready_s: float | None = None
    bound_s: float | None = None  # set when a standby engine was bound
    log: str = "fake.log"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


class FakeEngines:
    """The agent's engine surface (`warmserve.worker.engines.Engines`): ready on the second poll; `kill(key)` makes
    an engine's process gone while the manager still has its record, as when a real engine is SIGKILLed."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, str]] = []
        self._engines: dict[ReplicaKey, FakeRecord] = {}
        self._polls: dict[ReplicaKey, int] = {}
        self.dead: set[ReplicaKey] = set()
        self.pids = iter(range(5000, 6000))

    def running(self):
        return dict(self._engines)

    def acquire_shell(self, timeout):
        return "shell"

    def release_shell(self, shell):
        pass

    def launch(
        self, key, shell, model, model_dir, manifest_path, report_path=None, served_name=None, extra_args=None, env=None
    ):
        self.ops.append(("promote", key.id))
        self._polls[key] = 0
        self._engines[key] = FakeRecord(key.id, served_name or model, 18000 + len(self.ops), next(self.pids))
        return self._engines[key]

    def poll(self, key):
        rec = self._engines.get(key)
        if rec is None:
            return None
        self._polls[key] += 1
        if self._polls[key] >= 2 and key not in self.dead:
            rec.ready, rec.ready_s = True, 0.01
        return rec

    def alive(self, key):
        return key in self._engines and key not in self.dead

    def kill(self, key):
        self.dead.add(key)

    def stop(self, key):
        self.ops.append(("stop", key.id))
        self._engines.pop(key, None)
        self.dead.discard(key)
        return 0.0

    def adopt(self):
        return []

    def shutdown(self, stop_engines=True):
        pass


def write_model(directory: str) -> str:
    """A minimal safetensors checkpoint (two fp16 tensors), written without torch."""
    os.makedirs(directory, exist_ok=True)
    tensors = {"w1": (4, 256), "w2": (256,)}
    header, offset = {}, 0
    for name, shape in tensors.items():
        n = 2 * (shape[0] * (shape[1] if len(shape) > 1 else 1))
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(os.path.join(directory, "model.safetensors"), "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return directory


def plan(generation: int, path: str, role: str) -> str:
    rep = {"model": "a", "uid": "a", "source": f"file://{path}", "tp": 1, "role": role, "kvLend": 0}
    return json.dumps({"generation": generation, "groups": [{"gpus": [0], "replicas": [rep]}]})


def step_until(agent: Agent, predicate, what: str, timeout: float = 10.0) -> WorkerState:
    deadline = time.monotonic() + timeout
    while True:
        state = agent.step()
        if predicate(state):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached; last state: {state.to_json()}")
        time.sleep(0.02)


def phase(state: WorkerState) -> Phase | None:
    return next((r.phase for r in state.replicas if r.uid == "a"), None)


@pytest.fixture
def agent(tmp_path):
    shm = f"/dev/shm/warmserve-test-{uuid.uuid4().hex[:10]}"
    arena = Arena.host("0", shm, 4 * MiB, page_size=64 * 1024)
    engines = FakeEngines()
    agent = Agent({"0": arena}, str(tmp_path / "state"), engines)
    try:
        yield agent
    finally:
        agent.shutdown()
        arena.close()


def serving(state: WorkerState) -> bool:
    return phase(state) == Phase.SERVING and any(e.ready for e in state.engines)


def test_a_serving_engine_that_died_is_stopped_and_promoted_again(agent, tmp_path):
    engines = agent.engines
    assert isinstance(engines, FakeEngines)
    model = write_model(str(tmp_path / "model"))
    agent.apply(plan(1, model, "serve"))
    first = step_until(agent, serving, "the first engine serving")
    (engine,) = first.engines
    engines.kill(KEY)  # the process is gone; the manager still has its record

    # the dead engine leaves the state (the router stops using it) without the replica being marked failed
    gone = step_until(agent, lambda s: not any(e.pid == engine.pid for e in s.engines), "the dead engine dropped")
    assert gone.errors == () and phase(gone) in (Phase.WARM, Phase.STARTING, Phase.SERVING)
    # and, the plan still serving the replica whose weights are warm, a new engine comes up
    again = step_until(agent, serving, "a new engine serving")
    (new,) = again.engines
    assert new.pid != engine.pid and again.errors == ()
    assert engines.ops == [("promote", "a@0"), ("stop", "a@0"), ("promote", "a@0")], engines.ops
    assert agent.failures == {}


def test_an_engine_that_dies_before_ready_fails_the_replica_and_is_tried_again_after_a_delay(
    agent, tmp_path, monkeypatch
):
    """The operator's plan does not change because an engine failed to start, so the worker itself tries
    again (after RETRY_BASE_S, doubling): a request held for the model is not left waiting for nothing."""
    import warmserve.worker.agent as agent_module

    monkeypatch.setattr(agent_module, "RETRY_BASE_S", 0.5)
    engines = agent.engines
    assert isinstance(engines, FakeEngines)
    model = write_model(str(tmp_path / "model"))
    agent.apply(plan(1, model, "serve"))
    step_until(agent, lambda s: bool(s.engines), "an engine launched")
    engines.kill(KEY)  # dies while starting (before its second poll)
    state = step_until(agent, lambda s: bool(s.errors), "the failure reported")
    assert "exited before becoming ready" in state.errors[0].reason
    assert agent.step().engines == ()  # not at once
    assert [op for op, _ in engines.ops].count("promote") == 1
    again = step_until(agent, serving, "the replica promoted again after the delay")
    assert [op for op, _ in engines.ops].count("promote") == 2
    assert again.errors == () and agent.failures == {}
