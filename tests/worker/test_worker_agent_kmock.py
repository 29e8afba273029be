"""The agent against kmock's Kubernetes emulator: plan annotation in, state annotation out.

Engines are replaced by a recording fake here (a real vLLM start costs ~40 s and is
covered once in test_worker_vllm.py); arenas, the weight store, the reconcile
order, the Kubernetes watch/patch client and restart convergence are all real.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import urllib.request
from dataclasses import dataclass

import pytest
from kubernetes import client

from warmserve.worker.agent import Agent
from warmserve.worker.arena import Arena
from warmserve.worker.kube import KubePod
from warmserve.worker.plan import PLAN_ANNOTATION, STATE_ANNOTATION
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
    log: str = "fake.log"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


class FakeEngines:
    """Same surface as EngineManager; becomes ready on the second poll."""

    def __init__(self, ops: list, persisted: dict | None = None):
        self.ops, self.engines, self._polls = ops, {}, {}
        self.persisted = persisted if persisted is not None else {}

    def promote(self, uid, model, model_dir, manifest_path, report_path=None, served_name=None, **_):
        with open(manifest_path) as fh:
            assert json.load(fh)["tensors"], "promotion needs a manifest of warm tensors"
        self.ops.append(("promote", uid))
        self.engines[uid] = self.persisted[uid] = FakeRecord(uid, served_name or model, 18000 + len(self.ops))
        return self.engines[uid]

    def poll(self, uid):
        self._polls[uid] = self._polls.get(uid, 0) + 1
        rec = self.engines[uid]
        if self._polls[uid] >= 2:
            rec.ready, rec.ready_s = True, 0.01
        return rec

    def alive(self, uid):
        return uid in self.engines

    def stop(self, uid):
        self.ops.append(("stop", uid))
        self.engines.pop(uid, None)
        self.persisted.pop(uid, None)
        return 0.0

    def adopt(self):
        self.engines.update(self.persisted)
        return list(self.persisted.values())

    def shutdown(self, stop_engines=True):
        pass


def _record_store_ops(agent: Agent, ops: list) -> None:
    evict, prewarm = agent.store.evict, agent.store.prewarm

    def rec_evict(uid, rank=0):
        ops.append(("evict", uid))
        return evict(uid, rank)

    def rec_prewarm(uid, *a, **kw):
        ops.append(("prewarm", uid))
        return prewarm(uid, *a, **kw)

    agent.store.evict, agent.store.prewarm = rec_evict, rec_prewarm


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
    """Per-replica errors by uid, plan errors under None (DESIGN.md §5: ``{"reason", "uid", "gpus"}``)."""
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
        used_a = arena.ledger.get("a@0/rank0").extent.count * arena.page_size
        assert s2["devices"][0]["usedBytes"] == used_a
        # demote: serve → warm stops the engine, keeps the weights
        ops.clear()
        await _set_plan(pod_api, _plan(3, [_rep("a", a)]))
        s3 = await _state(kmock, lambda s: _phases(s) == {"a": "warm"} and not s["engines"])
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
        assert arena.ledger.used_pages == 0  # gen 3 dropped "ok": its pages are back
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
        after = await asyncio.to_thread(runner.run_once)
        for _ in range(20):
            if after["observedGeneration"] == 5:
                break
            await asyncio.sleep(0.1)
            after = await asyncio.to_thread(runner.run_once)
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
            if runner.run_once()["replicas"][0]["phase"] == "warm":
                break
            await asyncio.sleep(0.05)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert 'warmserve_worker_replicas{phase="warm"} 1.0' in metrics
        assert 'warmserve_worker_arena_bytes{gpu="0",kind="total"} 4.194304e+06' in metrics
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
