"""Demand reaches the operator fast: a request held by the router makes the operator plan a promotion at once.

The real operator (kopf against the emulated API) with `--router-url` pointing at a real router (aiohttp on
loopback) whose snapshot knows the model but has no engine for it. The pool's interval is 10 s, so only the
router's wake-up can explain a plan within 2 s of the request.
"""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
from aiohttp import web
from controller_support import (
    MIB,
    NS,
    SimulatedWorkers,
    make_runtime,
    model_body,
    pool_body,
    running_operator,
    wait_for,
    worker_pod,
)

from warmserve.controller.k8s import MODELDEPLOYMENTS, PODS, WARMPOOLS
from warmserve.controller.settings import ControllerConfig
from warmserve.protocol import Role, plan_of_pod
from warmserve.router.server import Router
from warmserve.router.table import Snapshot

GPU_BYTES = int(1024 * MIB * 0.9)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serving_roles(em, uid: str) -> list:
    out = []
    for i in range(2):
        try:
            pod = em.objects["v1/pods", NS, f"pool1-worker-{i}"]
        except KeyError:
            continue
        plan = plan_of_pod(pod)
        out += [
            g.gpus for g in (plan.groups if plan else ()) for r in g.replicas if r.uid == uid and r.role == Role.SERVE
        ]
    return out


async def test_a_held_request_gets_a_serve_role_planned_within_two_seconds_and_scales_back_to_zero(emulator, client):
    router = Router()
    router.publish(Snapshot(frozenset({"model-a"}), ()))  # deployed, no engine: requests are held
    runner = web.AppRunner(router.app(), handler_cancellation=True)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    config = ControllerConfig(
        namespaces=(NS,), metrics_port=0, liveness_port=0, post_events=False, router_url=f"http://127.0.0.1:{port}"
    )
    loops = []
    runtime = make_runtime(config=config, on_loop=loops.append)
    workers = SimulatedWorkers(client, "pool1", GPU_BYTES)
    md = (await client.create(MODELDEPLOYMENTS, NS, model_body("model-a", scaling={"minReplicas": 0})))[0]
    uid = md["metadata"]["uid"]
    for i in range(2):
        await client.create(PODS, NS, worker_pod("pool1", i))
    session = aiohttp.ClientSession()
    try:
        async with running_operator(emulator, runtime):
            body = pool_body(policy={"intervalSeconds": 10, "protectionSeconds": 1})
            await client.create(WARMPOOLS, NS, body)
            workers.start()
            await wait_for(lambda: loops and loops[0].rounds >= 1, what="a first round")
            await asyncio.sleep(0.5)  # well inside the 10 s interval
            assert serving_roles(emulator, uid) == []
            request = asyncio.create_task(
                session.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "model-a", "prompt": "x"})
            )
            t0 = time.monotonic()
            await wait_for(lambda: serving_roles(emulator, uid), timeout=5, what="a serve role for model-a")
            elapsed = time.monotonic() - t0
            print(f"serve role planned {elapsed:.3f} s after the request")
            assert elapsed < 2.0, elapsed
            # the client gives up: no demand left, and after the protection period the next rounds stop the
            # engine (scale back to zero; its weights stay as a warm replica)
            request.cancel()
            await wait_for(lambda: router.dispatcher.requests("model-a") == 0, what="the request gone")
            await wait_for(lambda: not serving_roles(emulator, uid), timeout=30, what="scaled back to zero")
    finally:
        await workers.stop()
        await session.close()
        await runner.cleanup()
