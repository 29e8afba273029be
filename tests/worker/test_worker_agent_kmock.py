"""The agent against kmock's Kubernetes emulator: plan annotation in, state annotation out.

Engines are replaced by a recording fake here (a real vLLM start costs ~40 s and is
covered once in test_worker_vllm.py); arenas, the weight store, the reconcile
order, the Kubernetes watch/patch client and restart convergence are all real.
The last tests show that a pass never waits for an engine: the state keeps being
published and /healthz stays fresh while a promotion waits for a shell or an engine
takes its time to stop.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest
from kubernetes import client

from warmserve.protocol import PLAN_ANNOTATION, STATE_ANNOTATION, parse_state
from warmserve.worker.agent import Agent
from warmserve.worker.arena import Arena
from warmserve.worker.kube import KubePod
from warmserve.worker.runner import Runner, serve_http

NS, POD = "gpu", "worker-0"
MiB = 1 << 20
pytestmark = pytest.mark.timeout(120)


@dataclass
class FakeRecord:
    uid: str
    served_name: str
    port: int
    pid: int = 4242
    host: str = "127.0.0.1"
    ready: bool = False
    ready_s: float | None = None
    bound_s: float | None = None  # set when a standby engine was bound
    log: str = "fake.log"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


class FakeEngines:
    """The engine surface the agent uses (`warmserve.worker.engines.Engines`); ready on the second poll.

    A shell is always ready here; ops are recorded by replica id (`"<uid>@<gpus>"`).
    """

    def __init__(self, ops: list, persisted: dict | None = None):
        self.ops, self._engines, self._polls = ops, {}, {}
        self.persisted = persisted if persisted is not None else {}

    def running(self):
        return dict(self._engines)

    def acquire_shell(self, timeout):
        return "shell"

    def release_shell(self, shell):
        pass

    def launch(
        self, key, shell, model, model_dir, manifest_path, report_path=None, served_name=None, extra_args=None, env=None
    ):
        with open(manifest_path) as fh:
            assert json.load(fh)["tensors"], "promotion needs a manifest of warm tensors"
        self.ops.append(("promote", key.id))
        self._engines[key] = self.persisted[key] = FakeRecord(key.id, served_name or model, 18000 + len(self.ops))
        return self._engines[key]

    def poll(self, key):
        self._polls[key] = self._polls.get(key, 0) + 1
        rec = self._engines[key]
        if self._polls[key] >= 2:
            rec.ready, rec.ready_s = True, 0.01
        return rec

    def alive(self, key):
        return key in self._engines

    def stop(self, key):
        self.ops.append(("stop", key.id))
        self._engines.pop(key, None)
        self.persisted.pop(key, None)
        return 0.0

    def adopt(self):
        self._engines.update(self.persisted)
        return list(self.persisted.values())

    def shutdown(self, stop_engines=True):
        pass


def _record_store_ops(agent: Agent, ops: list) -> None:
    evict, prewarm = agent.store.evict, agent.store.prewarm

    def rec_evict(key):
        ops.append(("evict", key.replica.id))
        return evict(key)

    def rec_prewarm(key, *a, **kw):
        ops.append(("prewarm", key.replica.id))
        return prewarm(key, *a, **kw)

    agent.store.evict, agent.store.prewarm = rec_evict, rec_prewarm


async def _until(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what} not reached in {timeout} s")


def _api(kmock) -> client.CoreV1Api:
    cfg = client.Configuration(host=str(kmock.url).rstrip("/"))
    return client.CoreV1Api(client.ApiClient(cfg))


def _plan(gen, replicas):
    return json.dumps({"generation": gen, "groups": [{"gpus": [0], "replicas": replicas}]})


def _rep(uid, path, role="warm"):
    return {"model": uid, "uid": uid, "source": f"file://{path}", "tp": 1, "role": role, "kvLend": 0}


async def _state(kmock, predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            pod = kmock.objects["v1/pods", NS, POD]
            raw = pod.get("metadata", {}).get("annotations", {}).get(STATE_ANNOTATION)
            if raw:
                last = json.loads(raw)
                if predicate(last):
                    return last
        except KeyError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"state not reached: {json.dumps(last, indent=1)}")


async def _set_plan(api, plan: str):
    body = {"metadata": {"annotations": {PLAN_ANNOTATION: plan}}}
    await asyncio.to_thread(api.patch_namespaced_pod, POD, NS, body)


def _phases(state):
    return {r["uid"]: r["phase"] for r in state["replicas"]}


def _errors(state):
    """Per-replica errors by uid, plan errors under None (docs/design.md "Protocol": ``{"reason", "uid", "gpus"}``)."""
    return {e.get("uid"): e["reason"] for e in state["errors"]}


_RUNNING: list[_Running] = []


@pytest.fixture(autouse=True)
def _stop_agents():
    """Stop every agent thread a test started, also when the test failed half-way."""
    yield
    while _RUNNING:
        _RUNNING.pop().close()


class _Running:
    def __init__(self, agent, api):
        _RUNNING.append(self)
        self.pod = KubePod(NS, POD, api=api, read_timeout=0.5)
        self.runner = Runner(agent, self.pod, tick=0.05)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.runner.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self):
        if self.stop.is_set():
            return
        self.stop.set()
        self.thread.join(5)
        self.pod.close()


@pytest.fixture
async def pod_api(kmock):
    kmock.resources.load_bundled()
    api = _api(kmock)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": POD, "namespace": NS},
        "spec": {"containers": [{"name": "worker", "image": "warmserve-worker"}]},
    }
    await asyncio.to_thread(api.create_namespaced_pod, NS, pod)
    return api


async def test_worker_kmock_plan_drives_prewarm_promote_evict_in_order(kmock, pod_api, tiny_models, shm_path, tmp_path):
    ops: list = []
    arena = Arena.host("0", shm_path, 16 * MiB, page_size=64 * 1024)
    agent = Agent({"0": arena}, str(tmp_path / "state"), FakeEngines(ops))
    _record_store_ops(agent, ops)
    running = _Running(agent, pod_api)
    try:
        a, b, c = (tiny_models[k] for k in ("alpha", "beta", "gamma"))
        await _set_plan(pod_api, _plan(1, [_rep("a", a), _rep("b", b), _rep("c", c)]))
        s1 = await _state(kmock, lambda s: s["observedGeneration"] == 1 and set(_phases(s).values()) == {"warm"})
        assert s1["devices"][0]["usedBytes"] > 0 and s1["timings"]["prewarm"]["bytes"] > 0
        ops.clear()
        await _set_plan(pod_api, _plan(2, [_rep("a", a, role="serve")]))
        s2 = await _state(kmock, lambda s: _phases(s) == {"a": "serving"})
        assert ops == [("evict", "b@0"), ("evict", "c@0"), ("promote", "a@0")], ops
        (served,) = s2["replicas"]
        assert served["ready"] is True and served["endpoint"] == s2["engines"][0]["endpoint"]
        assert served["endpoint"].startswith("127.0.0.1:") and served["gpus"] == [0]
        assert s2["timings"]["evict"]["seconds"] < 0.1 and s2["errors"] == []
        used_a = arena.extent("a@0/rank0").count * arena.page_size
        assert s2["devices"][0]["usedBytes"] == used_a
        # demote: serve → warm stops the engine, keeps the weights
        ops.clear()
        await _set_plan(pod_api, _plan(3, [_rep("a", a)]))
        s3 = await _state(kmock, lambda s: _phases(s) == {"a": "warm"} and not s["engines"])
        await _until(lambda: ops, what="the engine stop")  # stops run off the reconcile thread
        assert ops == [("stop", "a@0")] and s3["devices"][0]["usedBytes"] == used_a
        assert s3["replicas"][0]["endpoint"] is None and s3["replicas"][0]["ready"] is False
    finally:
        running.close()
        arena.close()


async def test_worker_kmock_bad_plans_become_errors_not_crashes(kmock, pod_api, tiny_models, shm_path, tmp_path):
    arena = Arena.host("0", shm_path, 1 * MiB, page_size=64 * 1024)  # fits one tiny model, not two
    agent = Agent({"0": arena}, str(tmp_path / "state"), FakeEngines([]))
    running = _Running(agent, pod_api)
    try:
        await _set_plan(
            pod_api,
            _plan(
                1,
                [
                    _rep("ok", tiny_models["alpha"]),
                    _rep("ghost", "/no/such/model"),
                    _rep("big", tiny_models["gamma"]),
                    {**_rep("hf", "x"), "source": "hf://org/model"},
                ],
            ),
        )
        s = await _state(
            kmock, lambda s: s["observedGeneration"] == 1 and _phases(s).get("ok") == "warm" and len(s["errors"]) == 3
        )
        # failed replicas hold nothing: they are errors (uid, gpus, reason), not replicas with a phase
        assert _phases(s) == {"ok": "warm"}
        errors = _errors(s)
        assert "no such model directory" in errors["ghost"] and "contiguous pages" in errors["big"]
        assert "unsupported model source" in errors["hf"]
        assert all(e["gpus"] == [0] for e in s["errors"])
        # malformed plan: rejected as a whole, previous plan kept, agent alive
        await _set_plan(pod_api, "{not json")
        s = await _state(kmock, lambda s: "plan rejected" in _errors(s).get(None, ""))
        assert s["observedGeneration"] == 1 and _phases(s)["ok"] == "warm"
        await _set_plan(pod_api, json.dumps({"generation": 2, "groups": [{"gpus": [0, 0], "replicas": []}]}))
        s = await _state(kmock, lambda s: "duplicates" in _errors(s).get(None, ""))
        # a GPU this worker does not have
        await _set_plan(
            pod_api,
            json.dumps({"generation": 3, "groups": [{"gpus": [7], "replicas": [_rep("g7", tiny_models["alpha"])]}]}),
        )
        s = await _state(kmock, lambda s: s["observedGeneration"] == 3 and s["errors"])
        assert "not managed by this worker" in _errors(s)["g7"] and s["errors"][0]["gpus"] == [7]
        assert arena.usage().used == 0  # gen 3 dropped "ok": its pages are back
        assert running.thread.is_alive()
    finally:
        running.close()
        arena.close()


async def test_worker_kmock_restarted_agent_converges_to_same_state(kmock, pod_api, tiny_models, shm_path, tmp_path):
    persisted: dict = {}
    state_dir = str(tmp_path / "state")
    arena = Arena.host("0", shm_path, 16 * MiB, page_size=64 * 1024)
    agent = Agent({"0": arena}, state_dir, FakeEngines([], persisted))
    running = _Running(agent, pod_api)
    plan = _plan(5, [_rep("a", tiny_models["alpha"], role="serve"), _rep("b", tiny_models["beta"])])
    await _set_plan(pod_api, plan)
    before = await _state(kmock, lambda s: _phases(s) == {"a": "serving", "b": "warm"})
    running.close()
    arena.close(unlink=False)  # the agent process dies; shared memory and engines survive
    # restart: new objects, same node
    ops: list = []
    arena2 = Arena.host("0", shm_path, 16 * MiB, page_size=64 * 1024)
    agent2 = Agent({"0": arena2}, state_dir, FakeEngines(ops, persisted))
    _record_store_ops(agent2, ops)
    runner = Runner(agent2, KubePod(NS, POD, api=pod_api, read_timeout=0.5))
    try:
        await asyncio.sleep(0.3)  # let the watch deliver the current plan
        after = (await asyncio.to_thread(runner.run_once)).to_json()
        for _ in range(20):
            if after["observedGeneration"] == 5:
                break
            await asyncio.sleep(0.1)
            after = (await asyncio.to_thread(runner.run_once)).to_json()
        assert ops == []  # nothing reloaded, no second engine
        strip = lambda s: {k: s[k] for k in ("observedGeneration", "devices", "replicas", "engines")}  # noqa: E731
        assert strip(after) == strip(before)
    finally:
        runner.pod.close()
        arena2.close()


async def test_worker_http_metrics_and_healthz(tiny_models, shm_path, tmp_path):
    arena = Arena.host("0", shm_path, 4 * MiB, page_size=64 * 1024)
    agent = Agent({"0": arena}, str(tmp_path / "s"), None)

    class Plan:
        def latest_plan(self):
            return _plan(1, [_rep("a", tiny_models["alpha"])])

        def write_state(self, state):
            pass

        def close(self):
            pass

    runner = Runner(agent, Plan())
    server = serve_http(runner, "127.0.0.1", 0)
    port = server.server_address[1]
    try:
        for _ in range(50):
            if runner.run_once().replicas[0].phase == "warm":
                break
            await asyncio.sleep(0.05)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert 'warmserve_worker_replicas{phase="warm"} 1.0' in metrics
        assert 'warmserve_worker_arena_bytes{gpu="0",kind="total"} 4.194304e+06' in metrics
        (last_pass,) = [
            float(line.split()[1])
            for line in metrics.splitlines()
            if line.startswith("warmserve_worker_last_pass_timestamp_seconds ")
        ]
        assert abs(time.time() - last_pass) < 60, "set by the pass that just ran"
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").read() == b"ok"
        state = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/state"))
        assert state["observedGeneration"] == 1
        runner.last_loop -= 3600
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz")
        assert err.value.code == 503
    finally:
        server.shutdown()
        arena.close()
        assert not os.path.exists(shm_path)


# -- a pass never waits for an engine -------------------------------------------------------------------------
def _weights(directory, seed: int, nbytes: int) -> str:
    """A one-tensor safetensors model (the store needs valid headers and bytes, not a real model)."""
    os.makedirs(directory, exist_ok=True)
    header = json.dumps({"w": {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}}).encode()
    with open(os.path.join(directory, "model.safetensors"), "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header + bytes((seed + i) % 251 for i in range(nbytes)))
    return str(directory)


class SlowEngines(FakeEngines):
    """No engine shell is ready until `shell_ready` is set (every pre-started shell still importing vLLM),
    and an engine stop takes until `stopped` is set (vLLM shutting down)."""

    def __init__(self, ops: list):
        super().__init__(ops)
        self.shell_ready, self.stopped = threading.Event(), threading.Event()
        self.waiting_for_shell, self.stopping = threading.Event(), threading.Event()

    def acquire_shell(self, timeout):
        if not self.shell_ready.is_set():
            self.waiting_for_shell.set()
        if not self.shell_ready.wait(timeout):
            raise TimeoutError("no engine shell became ready")
        return "shell"

    def stop(self, key):
        self.stopping.set()
        self.stopped.wait(60)
        return super().stop(key)


class MemoryPod:
    """Plan from a variable, every published state kept (the runner publishes only when the state changes)."""

    def __init__(self, plan: str):
        self.plan, self.states = plan, []

    def latest_plan(self):
        return self.plan

    def write_state(self, state):
        self.states.append(json.loads(state.dumps()))

    def close(self):
        pass


@pytest.fixture
def slow_worker(shm_path, tmp_path):
    """A real agent and runner (ticking on a thread, /healthz served) over slow fake engines."""
    arena = Arena.host("0", shm_path, 4 * MiB, page_size=64 * 1024)
    engines = SlowEngines([])
    agent = Agent({"0": arena}, str(tmp_path / "state"), engines)
    pod = MemoryPod(_plan(1, []))
    runner = Runner(agent, pod, tick=0.02, stale_after=1.0)
    server = serve_http(runner, "127.0.0.1", 0)
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    thread.start()

    def healthz() -> int:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/healthz", timeout=5).status
        except urllib.error.HTTPError as err:
            return err.code

    try:
        yield arena, engines, pod, healthz
    finally:
        engines.shell_ready.set()
        engines.stopped.set()
        stop.set()
        thread.join(10)
        server.shutdown()
        agent.shutdown()
        arena.close()


def _last(pod: MemoryPod, predicate):
    return next((s for s in reversed(pod.states) if predicate(s)), None)


async def test_worker_state_and_healthz_stay_fresh_while_a_promotion_waits_for_a_shell(slow_worker, tmp_path):
    """The named bug: a promotion waiting (up to 120 s) for an engine shell held the agent lock, so no state
    was published and /healthz went stale (a liveness probe would restart the pod and kill its engines)."""
    _, engines, pod, healthz = slow_worker
    a, b = _weights(tmp_path / "a", 1, 100_000), _weights(tmp_path / "b", 2, 50_000)
    pod.plan = _plan(1, [_rep("a", a, role="serve")])
    # the replica turns warm and its promotion starts waiting for a shell: reported as starting, no endpoint
    s1 = await _until(
        lambda: _last(pod, lambda s: s["observedGeneration"] == 1 and _phases(s) == {"a": "starting"}),
        what="a published state with the promotion waiting",
    )
    assert engines.waiting_for_shell.is_set() and engines.running() == {}
    assert s1["replicas"][0]["endpoint"] is None and not s1["replicas"][0]["ready"] and s1["engines"] == []
    assert parse_state(s1).replicas[0].dedicated  # the operator counts it as an engine being started
    # while it waits, a new plan is applied and its outcome published
    pod.plan = _plan(2, [_rep("a", a, role="serve"), _rep("b", b)])
    await _until(
        lambda: _last(pod, lambda s: s["observedGeneration"] == 2 and _phases(s) == {"a": "starting", "b": "warm"}),
        what="the next plan's state published during the wait",
    )
    # and the loop stays healthy for longer than its staleness limit (1 s here, 30 s in a pod)
    for _ in range(3):
        await asyncio.sleep(0.5)
        assert await asyncio.to_thread(healthz) == 200
    assert not engines.shell_ready.is_set() and engines.running() == {}  # still waiting all along
    # a shell becomes ready: the engine is launched and serves
    engines.shell_ready.set()
    s3 = await _until(
        lambda: _last(pod, lambda s: _phases(s) == {"a": "serving", "b": "warm"}), what="the engine serving"
    )
    assert engines.ops == [("promote", "a@0")] and s3["replicas"][0]["endpoint"] == s3["engines"][0]["endpoint"]


async def test_worker_state_stays_fresh_while_an_engine_stops_and_its_pages_wait(slow_worker, tmp_path):
    """Stopping an engine (up to ~15 s) runs off the lock too; its pages are freed, and reused, once it is gone."""
    arena, engines, pod, healthz = slow_worker
    engines.shell_ready.set()
    a, b = _weights(tmp_path / "a", 1, 2 * MiB), _weights(tmp_path / "b", 2, 2 * MiB)  # the arena holds one
    pod.plan = _plan(1, [_rep("a", a, role="serve")])
    await _until(lambda: _last(pod, lambda s: _phases(s) == {"a": "serving"}), what="a serving")
    used_a = arena.usage().used
    pod.plan = _plan(2, [_rep("b", b)])  # drop a (its engine must stop before its pages go), load b
    s2 = await _until(
        lambda: _last(pod, lambda s: s["observedGeneration"] == 2 and _phases(s) == {"a": "evicting", "b": "loading"}),
        what="the next plan's state published while the engine stops",
    )
    assert engines.stopping.is_set() and s2["engines"] == [] and s2["errors"] == []
    assert [r["bytes"] for r in s2["replicas"]] == [2 * MiB, 0]  # b is not started before a's pages are back
    for _ in range(3):
        await asyncio.sleep(0.5)
        assert await asyncio.to_thread(healthz) == 200
    assert arena.usage().used == used_a  # a's pages stay while its engine may still map them; b waits for them
    engines.stopped.set()
    s3 = await _until(lambda: _last(pod, lambda s: _phases(s) == {"b": "warm"}), what="b warm in a's place")
    assert engines.ops == [("promote", "a@0"), ("stop", "a@0")] and s3["errors"] == []
    assert s3["timings"]["stop"]["uid"] == "a" and s3["timings"]["evict"]["uid"] == "a"
