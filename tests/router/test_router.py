"""The router against fake engines: holding, refusals, retries, streaming, least-in-flight, metrics."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from fake_engine import FakeEngine
from prometheus_client.parser import text_string_to_metric_families

from warmserve.protocol import Phase, ReplicaState, WorkerState
from warmserve.router.server import Router, RouterSettings
from warmserve.router.table import Backend, Snapshot, WorkerReport, build_snapshot, check_endpoint


def snapshot(models: list[str], engines: list[FakeEngine]) -> Snapshot:
    backends = tuple(Backend(e.model, f"http://{e.endpoint}", e.model) for e in engines)
    return Snapshot(frozenset(models), backends)


@pytest.fixture
async def router_client():
    clients = []

    async def make(**settings) -> tuple[Router, TestClient]:
        router = Router(RouterSettings(**settings))
        client = TestClient(TestServer(router.app(), handler_cancellation=True))
        await client.start_server()
        clients.append(client)
        return router, client

    yield make
    for c in clients:
        await c.close()


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(name)


async def completion(client: TestClient, model: str, **extra) -> aiohttp.ClientResponse:
    return await client.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 3, **extra})


async def test_unknown_model_is_an_openai_404(router_client):
    router, client = await router_client()
    router.publish(snapshot(["a"], []))
    resp = await completion(client, "nope")
    assert resp.status == 404
    err = (await resp.json())["error"]
    assert err["code"] == "model_not_found" and "nope" in err["message"]


async def test_unknown_model_names_never_become_metric_labels(router_client):
    router, client = await router_client()
    router.publish(snapshot(["a"], []))
    for i in range(20):
        assert (await completion(client, f"made-up-{i}")).status == 404
    page = await (await client.get("/metrics")).text()
    assert "made-up" not in page
    assert metric(page, "warmserve_router_responses_total", model="", code="404") == 20


async def test_models_lists_every_deployed_model_even_at_zero_engines(router_client):
    engine = await FakeEngine("a").start()
    try:
        router, client = await router_client()
        router.publish(snapshot(["a", "b"], [engine]))
        data = await (await client.get("/v1/models")).json()
        assert [m["id"] for m in data["data"]] == ["a", "b"]
    finally:
        await engine.stop()


async def test_request_for_a_model_without_engine_is_held_then_answered(router_client):
    router, client = await router_client()
    router.publish(snapshot(["a"], []))
    pending = asyncio.create_task(completion(client, "a"))
    await asyncio.sleep(0.3)
    assert not pending.done()
    page = await (await client.get("/metrics")).text()
    assert metric(page, "warmserve_waiting_requests", model="a") == 1
    assert metric(page, "warmserve_inflight_requests", model="a") == 1
    engine = await FakeEngine("a").start()
    try:
        router.publish(snapshot(["a"], [engine]))
        resp = await asyncio.wait_for(pending, 5)
        assert resp.status == 200 and (await resp.json())["choices"][0]["text"]
        page = await (await client.get("/metrics")).text()
        assert metric(page, "warmserve_inflight_requests", model="a") == 0
        assert metric(page, "warmserve_router_queue_wait_seconds_count", model="a") == 1
    finally:
        await engine.stop()


async def test_full_queue_is_429_with_retry_after(router_client):
    router, client = await router_client(max_queue=2, retry_after_seconds=3)
    router.publish(snapshot(["a"], []))
    held = [asyncio.create_task(completion(client, "a")) for _ in range(2)]
    await asyncio.sleep(0.3)
    resp = await completion(client, "a")
    assert resp.status == 429 and resp.headers["Retry-After"] == "3"
    assert (await resp.json())["error"]["code"] == "queue_full"
    for t in held:
        t.cancel()


async def test_wait_beyond_the_maximum_is_504(router_client):
    router, client = await router_client(max_wait_seconds=0.3)
    router.publish(snapshot(["a"], []))
    resp = await completion(client, "a")
    assert resp.status == 504


async def test_dead_engine_before_answering_goes_to_another_engine(router_client):
    alive = await FakeEngine("a").start()
    dead = FakeEngine("a")  # never started: connection refused
    try:
        router, client = await router_client()
        router.publish(snapshot(["a"], [dead, alive]))
        results = await asyncio.gather(*(completion(client, "a") for _ in range(6)))
        assert [r.status for r in results] == [200] * 6
        assert alive.served == 6
    finally:
        await alive.stop()


async def test_engine_killed_with_requests_in_flight_and_queued_answers_all_of_them(router_client):
    first = await FakeEngine("a", delay=1.0).start()
    router, client = await router_client()
    router.publish(snapshot(["a"], [first]))
    tasks = [asyncio.create_task(completion(client, "a")) for _ in range(4)]
    await asyncio.wait_for(first.started.wait(), 5)
    await first.kill()  # dies with every request in flight, nothing answered yet
    await asyncio.sleep(0.2)
    second = await FakeEngine("a").start()
    try:
        router.publish(snapshot(["a"], [second]))
        results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert [r.status for r in results] == [200] * 4
        assert second.served == 4
    finally:
        await second.stop()


async def test_streaming_passes_chunks_through_and_a_broken_stream_ends_with_an_error_event(router_client):
    engine = await FakeEngine("a", chunks=5).start()
    try:
        router, client = await router_client()
        router.publish(snapshot(["a"], [engine]))
        resp = await completion(client, "a", stream=True)
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        events = [line for line in (await resp.text()).splitlines() if line.startswith("data: ")]
        assert len(events) == 6 and events[-1] == "data: [DONE]"
        engine.break_after = 2
        resp = await completion(client, "a", stream=True)
        events = [line for line in (await resp.text()).splitlines() if line.startswith("data: ")]
        assert len(events) == 3
        assert json.loads(events[-1].removeprefix("data: "))["error"]["type"] == "engine_error"
    finally:
        await engine.stop()


async def test_least_inflight_engine_first(router_client):
    slow, fast = await FakeEngine("a", delay=0.5).start(), await FakeEngine("a").start()
    try:
        router, client = await router_client()
        router.publish(snapshot(["a"], [slow, fast]))
        busy = asyncio.create_task(completion(client, "a"))
        await asyncio.wait_for(slow.started.wait() if slow.endpoint < fast.endpoint else fast.started.wait(), 5)
        # one engine holds a request: the next ones go to whichever has fewer in flight
        results = await asyncio.gather(*(completion(client, "a") for _ in range(3)))
        assert all(r.status == 200 for r in results)
        await busy
        assert slow.served + fast.served == 4 and min(slow.served, fast.served) >= 1
    finally:
        await slow.stop()
        await fast.stop()


async def test_engine_model_name_is_rewritten(router_client):
    engine = await FakeEngine("engine-name").start()
    try:
        router, client = await router_client()
        router.publish(
            Snapshot(frozenset({"public"}), (Backend("public", f"http://{engine.endpoint}", "engine-name"),))
        )
        resp = await completion(client, "public")
        assert resp.status == 200 and engine.served == 1
    finally:
        await engine.stop()


async def test_not_ready_until_discovery_synced_and_requests_held_meanwhile(router_client):
    router, client = await router_client()
    assert (await client.get("/readyz")).status == 503
    pending = asyncio.create_task(completion(client, "later"))
    await asyncio.sleep(0.2)
    router.publish(snapshot(["other"], []))  # synced: "later" does not exist
    assert (await asyncio.wait_for(pending, 5)).status == 404
    assert (await client.get("/readyz")).status == 200


def test_endpoint_checks():
    ports = range(8000, 9000)
    assert check_endpoint("10.0.0.5:8001", "10.0.0.5", ports) is None
    assert "not the worker pod" in (check_endpoint("169.254.169.254:8001", "10.0.0.5", ports) or "")
    assert "outside" in (check_endpoint("10.0.0.5:80", "10.0.0.5", ports) or "")
    assert check_endpoint("garbage", "10.0.0.5", ports) == "not host:port"
    assert check_endpoint("127.0.0.1:8001", None, ports) is None
    assert "not local" in (check_endpoint("10.0.0.9:8001", None, ports) or "")


def test_build_snapshot_uses_ready_serving_replicas_of_known_models_only():
    def rep(uid, endpoint, phase=Phase.SERVING, ready=True, gpus=(0,)):
        return ReplicaState(model=f"engine-{uid}", uid=uid, gpus=gpus, phase=phase, endpoint=endpoint, ready=ready)

    state = WorkerState(
        1,
        replicas=(
            rep("u1", "10.0.0.5:8001"),
            rep("u1", "10.0.0.5:8002", gpus=(1,)),
            rep("u2", "10.0.0.5:8003", phase=Phase.STARTING, ready=False),
            rep("u3", "10.0.0.5:8004"),  # no such ModelDeployment
            rep("u2", "169.254.169.254:8005", gpus=(2,)),  # forged
        ),
    )
    snap, rejected = build_snapshot(
        {"u1": "m1", "u2": "m2"}, [WorkerReport(state, "10.0.0.5", "w0")], range(8000, 9000)
    )
    assert snap.models == {"m1", "m2"}
    assert [b.url for b in snap.backends_of("m1")] == ["http://10.0.0.5:8001", "http://10.0.0.5:8002"]
    assert snap.backends_of("m2") == ()
    assert [r.endpoint for r in rejected] == ["169.254.169.254:8005"]


async def test_a_client_that_goes_away_releases_its_place_in_the_queue(router_client):
    router, client = await router_client()
    router.publish(snapshot(["a"], []))
    pending = asyncio.create_task(completion(client, "a"))
    for _ in range(50):
        await asyncio.sleep(0.05)
        if router.dispatcher.waiting("a") == 1:
            break
    assert router.dispatcher.waiting("a") == 1
    pending.cancel()
    for _ in range(50):
        await asyncio.sleep(0.05)
        if router.dispatcher.requests("a") == 0:
            break
    assert router.dispatcher.waiting("a") == 0 and router.dispatcher.requests("a") == 0
    page = await (await client.get("/metrics")).text()
    assert metric(page, "warmserve_router_responses_total", model="a", code="499") == 1


async def test_demand_long_poll_answers_when_a_request_is_held(router_client):
    router, client = await router_client()
    router.publish(snapshot(["a"], []))
    first = await (await client.get("/v1/warmserve/demand", params={"after": "-1", "timeout": "0"})).json()
    assert first["holds"] == 0
    poll = asyncio.create_task(client.get("/v1/warmserve/demand", params={"after": "0", "boot": first["boot"]}))
    await asyncio.sleep(0.2)
    assert not poll.done()
    held = asyncio.create_task(completion(client, "a"))
    answer = await (await asyncio.wait_for(poll, 5)).json()
    assert answer["holds"] == 1 and answer["models"]["a"] == {"requests": 1, "waiting": 1}
    held.cancel()
    # a poller that saw another router process is answered at once
    other = await (await client.get("/v1/warmserve/demand", params={"after": "5", "boot": "old"})).json()
    assert other["boot"] == first["boot"]


def timing(resp) -> dict[str, float]:
    """`Server-Timing: queue;dur=X, engine;dur=Y` as {name: milliseconds}."""
    out = {}
    for part in resp.headers["Server-Timing"].split(","):
        name, _, dur = part.strip().partition(";dur=")
        out[name] = float(dur)
    return out


async def test_answers_say_how_long_they_were_held_and_how_long_the_engine_took(router_client):
    router, client = await router_client()
    router.publish(snapshot(["a"], []))
    pending = asyncio.create_task(completion(client, "a", stream=True))
    await asyncio.sleep(0.3)  # held: no engine yet
    engine = await FakeEngine("a", chunks=2).start()
    try:
        router.publish(snapshot(["a"], [engine]))
        held = await asyncio.wait_for(pending, 5)
        assert held.status == 200
        t = timing(held)
        assert t["queue"] >= 250 and 0 <= t["engine"] < 1000  # the hold is queue time, not the engine's
        plain = await completion(client, "a")
        t = timing(plain)
        assert plain.status == 200 and t["queue"] < 250 and t["engine"] >= 0
    finally:
        await engine.stop()
