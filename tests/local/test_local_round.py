"""`warmserve up`'s pool round without vLLM: `PoolLoop` with the local observer and actuator and a fake demand
(what the router would report), the status lines, and the router's `on_hold` hook that wakes the round."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from warmserve.controller.loop import PoolLoop
from warmserve.controller.runtime import Runtime
from warmserve.local.config import API_VERSION, LocalConfig, parse_documents
from warmserve.local.driver import POD, LocalActuator, LocalObserver, LocalWorld, MemoryPod, status_lines
from warmserve.protocol import DeviceState, Phase, Plan, ReplicaState, Role, WorkerState
from warmserve.router.dispatch import Dispatcher
from warmserve.router.server import Router, RouterSettings
from warmserve.router.table import Snapshot

MiB = 1 << 20
log = logging.getLogger("test-local-round")


def model_doc(name: str, served: str | None = None, min_warm: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {
                "source": f"file:///models/{name}",
                "weightBytes": 4 * MiB,
                **({"servedName": served} if served else {}),
            },
            "engine": {"maxConcurrency": 4},
            "prewarm": {"minWarmReplicas": min_warm},
        },
    }


def pool_doc() -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "WarmPool",
        "metadata": {"name": "cpu"},
        "spec": {
            "gpu": {"count": 0, "memoryMiB": 64},
            "forecast": {"windowSeconds": 60},
            "policy": {"intervalSeconds": 1},
        },
    }


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Harness:
    """One pool round driven by hand: the demand is a dict the test sets, the clock advances one second a tick."""

    def __init__(self, config: LocalConfig, state_dir: str) -> None:
        self.config = config
        self.world = LocalWorld(config, state_dir)
        self.demand: dict[str, float] = {}
        self.clock = Clock()
        self.runtime = Runtime(clock=self.clock)
        self.published: list[WorkerState] = []
        self.pod = MemoryPod(self.published.append)
        self.loop = PoolLoop(
            self.runtime,
            config.pool["metadata"].get("namespace"),
            config.pool["metadata"]["name"],
            observer=LocalObserver(self.world, self.runtime, lambda: self.demand),
            actuator=LocalActuator(self.world, self.pod),
        )

    async def tick(self) -> Plan:
        self.clock.now += 1.0
        await self.loop.tick(self.config.pool, log)
        assert self.world.plan is not None
        return self.world.plan

    def uid(self, name: str) -> str:
        return next(m["metadata"]["uid"] for m in self.config.models if m["metadata"]["name"] == name)

    def roles(self, plan: Plan) -> dict[str, list[Role]]:
        """ModelDeployment name → the roles of its replicas in `plan`."""
        names = {m["metadata"]["uid"]: m["metadata"]["name"] for m in self.config.models}
        out: dict[str, list[Role]] = {}
        for rep in plan.replicas.values():
            out.setdefault(names[rep.uid], []).append(rep.spec.role)
        return out


@pytest.fixture
def harness(tmp_path) -> Harness:
    config = parse_documents([pool_doc(), model_doc("alpha"), model_doc("beta", served="b")], "test.yaml")
    return Harness(config, str(tmp_path))


async def test_demand_for_a_model_at_zero_engines_gets_it_served_in_one_round(harness):
    harness.demand = {"alpha": 1.0}  # what the router reports: one request held for alpha
    plan = await harness.tick()
    roles = harness.roles(plan)
    assert roles == {"alpha": [Role.SERVE]}, roles  # one CPU device: beta's warm weights make room
    assert harness.pod.latest_plan() == plan.dumps()  # the worker gets exactly the plan the world holds
    serve = next(r for r in plan.replicas.values() if r.spec.role == Role.SERVE)
    assert serve.uid == harness.uid("alpha") and serve.model == "alpha" and serve.source == "file:///models/alpha"


async def test_without_demand_each_model_gets_its_warm_replica_only(harness):
    plan = await harness.tick()
    assert harness.roles(plan) == {"alpha": [Role.WARM], "beta": [Role.WARM]}
    plan = await harness.tick()  # and it stays so
    assert harness.roles(plan) == {"alpha": [Role.WARM], "beta": [Role.WARM]}
    assert harness.world.model_status["alpha"]  # the round wrote the models' status into the world


async def test_demand_named_by_the_served_name(harness):
    harness.demand = {"b": 2.0}  # beta is served as "b": the router counts requests by that name
    plan = await harness.tick()
    assert Role.SERVE in harness.roles(plan)["beta"]
    # the CPU pool has one device: promoting beta there frees the other warm weights on it (an eviction)
    assert harness.roles(plan) == {"beta": [Role.SERVE]}


async def test_status_lines_one_per_model(harness):
    await harness.tick()
    plan = harness.world.plan
    assert plan is not None
    replicas = []
    for rep in plan.replicas.values():
        served = rep.uid == harness.uid("alpha")
        replicas.append(
            ReplicaState(
                model=rep.model,
                uid=rep.uid,
                gpus=rep.gpus,
                phase=Phase.SERVING if served else Phase.WARM,
                endpoint="127.0.0.1:18100" if served else None,
                ready=served,
            )
        )
    harness.world.state = WorkerState(
        plan.generation, devices=(DeviceState(0, 64 * MiB, 8 * MiB, 56 * MiB),), replicas=tuple(replicas)
    )
    router = Router(RouterSettings())
    lines = status_lines(harness.world, router)
    assert len(lines) == 2, lines
    assert lines[0].startswith("alpha ") and "engines 1" in lines[0] and "warm 0" in lines[0]
    assert lines[1].startswith("b ") and "engines 0" in lines[1] and "warm 1" in lines[1]
    assert all("waiting 0" in line and "in router 0" in line for line in lines)


def test_status_lines_add_worker_errors(harness):
    from warmserve.protocol import WorkerError

    harness.world.state = WorkerState(1, errors=(WorkerError("bad weights", harness.uid("alpha"), (0,)),))
    lines = status_lines(harness.world, Router(RouterSettings()))
    assert len(lines) == 3 and lines[2] == "worker error: " + str(
        WorkerError("bad weights", harness.uid("alpha"), (0,))
    )


def test_memory_pod_hands_the_plan_to_the_worker_and_the_state_back():
    seen: list[WorkerState] = []
    pod = MemoryPod(seen.append)
    assert pod.latest_plan() is None
    plan = Plan.build(3, ())
    pod.set_plan(plan)
    assert pod.latest_plan() == plan.dumps()
    pod.write_state(WorkerState(3))
    assert seen == [WorkerState(3)] and POD == "local"


async def test_dispatcher_calls_on_hold_for_a_held_request():
    dispatcher = Dispatcher()
    held: list[str] = []
    dispatcher.on_hold = held.append
    dispatcher.update(Snapshot(frozenset({"alpha"}), ()))
    dispatcher.admit("alpha")
    waiter = asyncio.create_task(dispatcher.acquire("alpha", dispatcher.clock() + 5))
    await asyncio.sleep(0.05)
    assert held == ["alpha"] and not waiter.done()
    assert dispatcher.waiting("alpha") == 1 and dispatcher.requests("alpha") == 1
    waiter.cancel()


async def test_on_hold_is_not_called_when_an_engine_is_ready():
    from warmserve.router.table import Backend

    dispatcher = Dispatcher()
    held: list[str] = []
    dispatcher.on_hold = held.append
    backend = Backend("alpha", "http://127.0.0.1:18100", "alpha")
    dispatcher.update(Snapshot(frozenset({"alpha"}), (backend,)))
    assert await dispatcher.acquire("alpha", dispatcher.clock() + 5) == backend
    assert held == []


async def test_a_retried_request_is_not_refused_by_a_full_queue():
    import socket

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from warmserve.router.table import Backend

    with socket.socket() as s:  # a port nobody listens on: the engine is dead
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"choices": [{"text": "ok"}]})

    engine_app = web.Application()
    engine_app.router.add_post("/v1/completions", answer)
    engine = TestServer(engine_app)
    router = Router(RouterSettings(max_queue=1))
    client = TestClient(TestServer(router.app()))
    await client.start_server()
    try:
        router.publish(Snapshot(frozenset({"a"}), (Backend("a", f"http://127.0.0.1:{dead_port}", "a"),)))
        body = {"model": "a", "prompt": "the quick brown fox", "max_tokens": 2}
        # both are sent to the dead engine at once (it is ready), fail there, and go back to the queue
        tasks = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(2)]
        await asyncio.sleep(0.5)
        await engine.start_server()
        router.publish(Snapshot(frozenset({"a"}), (Backend("a", f"http://127.0.0.1:{engine.port}", "a"),)))
        statuses = [r.status for r in await asyncio.wait_for(asyncio.gather(*tasks), 10)]
        assert statuses == [200, 200]
    finally:
        await client.close()
        await engine.close()
