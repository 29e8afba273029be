"""Integration: the real `kopf.operator()` with our handlers against kmock's emulator over HTTP.

Each test starts a fresh emulator and operator; the emulator stamps uid/resourceVersion/generation
(conftest.StampingEmulator). Worker pods are plain pods the test creates (the emulator has no kubelet),
and `SimulatedWorkers` answers plans with states, as the sidecar would.
"""

from __future__ import annotations

import asyncio
import json
import math

import kmock
from controller_support import (
    MIB,
    NS,
    FakeClock,
    FakeScraper,
    SimulatedWorkers,
    get_obj,
    make_runtime,
    model_body,
    pool_body,
    running_operator,
    wait_for,
    worker_pod,
    writes_to,
)

from warmserve.controller.k8s import CONFIGMAPS, DAEMONSETS, MODELDEPLOYMENTS, PODS, WARMPOOLS
from warmserve.protocol import PLAN_ANNOTATION, Role, plan_of_pod

POOLS = "warmserve.io/v1alpha1/warmpools"
MDS = "warmserve.io/v1alpha1/modeldeployments"
GPU_BYTES = int(1024 * MIB * 0.9)


def cond(obj, type_):
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c
    return None


def no_kopf_keys(obj):
    meta = obj["metadata"]
    keys = list(meta.get("annotations") or {}) + list(meta.get("finalizers") or []) + list(obj.get("status") or {})
    return [k for k in keys if "kopf.zalando.org" in k or k == "kopf"]


def plans(em, pool="pool1", count=2):
    out = {}
    for i in range(count):
        pod = get_obj(em, "v1/pods", f"{pool}-worker-{i}")
        out[f"{pool}-worker-{i}"] = plan_of_pod(pod) if pod else None
    return out


async def test_pool_creates_worker_workload_and_status(emulator, client):
    runtime = make_runtime()
    async with running_operator(emulator, runtime):
        await client.create(WARMPOOLS, NS, pool_body(gpus=8, memory_mib=81920))
        ds = await wait_for(lambda: get_obj(emulator, "apps/v1/daemonsets", "pool1-worker"), what="DaemonSet")
        pool = await wait_for(
            lambda: (p := get_obj(emulator, POOLS, "pool1")) and cond(p, "Ready") and p, what="pool status"
        )
    spec = ds["spec"]["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    owner = ds["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("WarmPool", "pool1", True)
    assert pool["status"]["observedGeneration"] == 1
    assert pool["status"]["workload"] == "DaemonSet/pool1-worker"
    assert cond(pool, "Ready")["status"] in ("False", "Unknown") and cond(pool, "Ready")["reason"]
    assert pool["metadata"]["finalizers"] == ["operator.warmserve.io/finalizer"]
    assert no_kopf_keys(pool) == [], "kopf bookkeeping must use our prefix, and nothing lands in status"


async def test_model_gets_conditions_and_observed_generation(emulator, client):
    runtime = make_runtime()
    async with running_operator(emulator, runtime):
        await client.create(MODELDEPLOYMENTS, NS, model_body("orphan", pool="missing"))
        await client.create(WARMPOOLS, NS, pool_body(gpus=8, memory_mib=81920))
        await client.create(MODELDEPLOYMENTS, NS, model_body("m1", weight=13_000_000_000))
        md = await wait_for(
            lambda: (m := get_obj(emulator, MDS, "m1")) and cond(m, "Valid") and m, what="m1 conditions"
        )
        assert md["status"]["observedGeneration"] == 1 and cond(md, "Valid")["status"] == "True"
        assert {c["type"] for c in md["status"]["conditions"]} == {"Valid", "Ready", "Prewarmed", "Degraded"}
        orphan = await wait_for(lambda: (m := get_obj(emulator, MDS, "orphan")) and cond(m, "Valid") and m)
        assert cond(orphan, "Valid")["reason"] == "PoolNotFound" and cond(orphan, "Ready")["status"] == "False"
        valid_since = cond(md, "Valid")["lastTransitionTime"]

        # A spec the schema allows but the pool cannot serve: a condition with a reason, no crash loop.
        await client.patch(MODELDEPLOYMENTS, NS, "m1", {"spec": {"model": {"tensorParallelSize": 16}}})
        md = await wait_for(
            lambda: (m := get_obj(emulator, MDS, "m1")) and m["status"].get("observedGeneration") == 2 and m,
            what="observedGeneration 2",
        )
        assert cond(md, "Valid")["status"] == "False"
        assert cond(md, "Valid")["reason"] == "TensorParallelDoesNotDividePool"
        assert cond(md, "Degraded")["status"] == "True"

        await client.patch(MODELDEPLOYMENTS, NS, "m1", {"spec": {"model": {"tensorParallelSize": 2}}})
        md = await wait_for(
            lambda: (m := get_obj(emulator, MDS, "m1")) and m["status"].get("observedGeneration") == 3 and m
        )
        assert cond(md, "Valid")["status"] == "True"
        assert cond(md, "Valid")["lastTransitionTime"] >= valid_since
        assert no_kopf_keys(md) == []


async def test_simulated_workers_reporting_state_drive_status(emulator, client):
    runtime = make_runtime()
    workers = SimulatedWorkers(client, "pool1", GPU_BYTES)
    async with running_operator(emulator, runtime):
        for i in range(2):
            await client.create(PODS, NS, worker_pod("pool1", i))
        await client.create(WARMPOOLS, NS, pool_body())
        await client.create(MODELDEPLOYMENTS, NS, model_body("warm-one", prewarm={"minWarmReplicas": 1}))
        await client.create(MODELDEPLOYMENTS, NS, model_body("always-on", scaling={"minReplicas": 1}))
        workers.start()
        try:
            warm = await wait_for(
                lambda: (
                    (m := get_obj(emulator, MDS, "warm-one"))
                    and (cond(m, "Prewarmed") or {}).get("status") == "True"
                    and m
                ),
                what="warm-one Prewarmed",
            )
            serving = await wait_for(
                lambda: (
                    (m := get_obj(emulator, MDS, "always-on"))
                    and (cond(m, "Ready") or {}).get("status") == "True"
                    and m["status"].get("endpoints")
                    and m
                ),
                what="always-on Ready",
            )
            pool = await wait_for(
                lambda: (p := get_obj(emulator, POOLS, "pool1")) and p["status"].get("readyWorkers") == 2 and p,
                what="pool readyWorkers",
            )
        finally:
            await workers.stop()
    assert warm["status"]["warmReplicas"]["prewarmed"] == 1 and warm["status"]["replicas"]["ready"] == 0
    assert serving["status"]["replicas"]["ready"] == 1 and serving["status"]["endpoints"][0].startswith("10.0.0.")
    states = {d["state"] for w in pool["status"]["workers"] for d in w.get("devices", [])}
    assert "dedicated" in states and "universal" in states
    assert pool["status"]["totalFreeBytes"] > 0 and pool["status"]["planGeneration"] >= 1
    assert cond(pool, "Ready")["status"] == "True"


def seasonal_history(uids, window_start, burst_model, days=5, period=24, burst_hours=(9, 10, 11)):
    """Previous days' load per hour: `burst_model` rises to a burst at `burst_hours`, others stay idle."""
    from warmserve.controller.history import LoadHistory

    history = LoadHistory(3600, capacity=days * period)
    day0 = window_start - window_start % period
    shape = {burst_hours[0] - 1: 4.0, burst_hours[0]: 12.0, burst_hours[1]: 20.0, burst_hours[2]: 12.0}
    for d in range(days, 0, -1):
        for h in range(period):
            w = day0 - d * period + h
            for uid in uids:
                value = shape.get(h, 0.0) if uid == burst_model else 0.0
                history.record(uid, w, value, value * 1.2)
    return history


async def test_rising_load_history_prewarms_then_promotes_the_right_model(emulator, client):
    """Seasons say model A bursts at 10:00. At 09:00 (no load yet) A is prewarmed, B is not; when the
    burst arrives the autoscaler promotes A onto the GPUs that hold its warm replicas (hits)."""
    from warmserve.controller.builders import build_history_configmap

    clock, scraper = FakeClock(), FakeScraper()
    day = 86400 * 20000
    clock.now = day + 8 * 3600 + 1  # 08:00:01 of some day
    runtime = make_runtime(clock=clock, scraper_factory=lambda rt, pool: scraper)
    workers = SimulatedWorkers(client, "pool1", GPU_BYTES)
    a = (await client.create(MODELDEPLOYMENTS, NS, model_body("model-a")))[0]
    b = (await client.create(MODELDEPLOYMENTS, NS, model_body("model-b")))[0]
    ua, ub = a["metadata"]["uid"], b["metadata"]["uid"]
    history = seasonal_history([ua, ub], int(clock.now // 3600), ua)
    await client.create(CONFIGMAPS, NS, build_history_configmap("pool1", NS, history.encode()))
    for i in range(2):
        await client.create(PODS, NS, worker_pod("pool1", i))
    async with running_operator(emulator, runtime):
        await client.create(WARMPOOLS, NS, pool_body())
        workers.start()
        try:
            # 08:00, the forecast of the next window (09:00, load 4 → 1 engine) asks for a warm replica of A.
            def warm_a():
                p = plans(emulator)
                replicas = [r for plan in p.values() if plan for g in plan.groups for r in g.replicas]
                return replicas and all(r.uid == ua and r.role == Role.WARM for r in replicas) and replicas

            await wait_for(warm_a, what="A prewarmed")
            await wait_for(
                lambda: (
                    ((get_obj(emulator, MDS, "model-a") or {}).get("status") or {})
                    .get("warmReplicas", {})
                    .get("prewarmed", 0)
                    >= 1
                ),
                what="A reported warm",
            )
            # 10:00 the burst arrives: 20 in flight, 8 per engine at 0.8 → 4 engines of A
            clock.now = day + 10 * 3600 + 1
            scraper.load = {"model-a": 20.0}

            def promoted():
                p = plans(emulator)
                serve = [
                    (pod, g.gpus)
                    for pod, plan in p.items()
                    if plan
                    for g in plan.groups
                    for r in g.replicas
                    if r.role == Role.SERVE and r.uid == ua
                ]
                return len(serve) >= 1 and serve

            serve = await wait_for(promoted, what="A promoted")
            metric = runtime.metrics.promotions.labels
            await wait_for(
                lambda: sum(metric("pool1", ua, s)._value.get() for s in ("hit", "loading", "cold")),
                what="promotion counted",
            )
        finally:
            await workers.stop()
        assert not any(
            r.uid == ub for plan in plans(emulator).values() if plan for g in plan.groups for r in g.replicas
        )
        hits = runtime.metrics.promotions.labels("pool1", ua, "hit")._value.get()
        colds = runtime.metrics.promotions.labels("pool1", ua, "cold")._value.get()
        assert hits >= 1, f"promotions should hit warm replicas (hit={hits}, cold={colds}, serve={serve})"
        md = get_obj(emulator, MDS, "model-a")
        assert md["status"]["forecast"]["peak"] > 0 and md["status"]["forecast"]["windowSeconds"] == 3600


async def test_restart_creates_no_duplicates_and_keeps_forecast_history(emulator, client):
    clock, scraper = FakeClock(), FakeScraper()
    clock.now = 86400 * 20000 + 3600 * 5 + 1
    scraper.load = {"m1": 3.0}
    for i in range(2):
        await client.create(PODS, NS, worker_pod("pool1", i))
    first_loops, second_loops = [], []  # the PoolLoop each operator's daemon runs
    first = make_runtime(clock=clock, scraper_factory=lambda rt, pool: scraper, on_loop=first_loops.append)
    async with running_operator(emulator, first):
        await client.create(WARMPOOLS, NS, pool_body())
        md = (await client.create(MODELDEPLOYMENTS, NS, model_body("m1", prewarm={"minWarmReplicas": 1})))[0]
        uid = md["metadata"]["uid"]
        await wait_for(lambda: any(plans(emulator).values()), what="first plan")
        await wait_for(lambda: first_loops and first_loops[-1].rounds >= 2)
        clock.now += 3600  # close the window: history recorded and saved
        await wait_for(lambda: get_obj(emulator, "v1/configmaps", "pool1-load-history"), what="history ConfigMap")
        await wait_for(lambda: (m := get_obj(emulator, MDS, "m1")) and m["status"].get("observedLoad"))
        before_plans = {k: v.generation for k, v in plans(emulator).items() if v}
        before_history = dict(first_loops[-1].history.series[uid]["avg"])
        before_forecast = get_obj(emulator, MDS, "m1")["status"]["forecast"]
    ds_posts_before = len(list(emulator["post", emulator.resource("apps/v1/daemonsets")]))

    second = make_runtime(clock=clock, scraper_factory=lambda rt, pool: scraper, on_loop=second_loops.append)
    async with running_operator(emulator, second):
        await wait_for(lambda: second_loops and second_loops[-1].rounds >= 3, what="second loop")
        loop = second_loops[-1]
        assert dict(loop.history.series[uid]["avg"]) == before_history, "history restored from the ConfigMap"
        assert before_history and next(iter(before_history.values())) == 3.0
        after_plans = {k: v.generation for k, v in plans(emulator).items() if v}
        forecast = get_obj(emulator, MDS, "m1")["status"]["forecast"]
    assert after_plans == before_plans, "unchanged plans are not rewritten (no generation bump)"
    assert forecast == before_forecast
    daemonsets = [k for k in emulator.objects if "daemonsets" in str(k[0]) and not emulator.objects[k].deleted]
    assert len(daemonsets) == 1
    ds_posts_after = len(list(emulator["post", emulator.resource("apps/v1/daemonsets")]))
    assert ds_posts_after - ds_posts_before <= 1, "at most one ensure-create attempt, answered 409"
    configmaps = sorted(k[2] for k in emulator.objects if "configmaps" in str(k[0]))
    assert configmaps == ["pool1-load-history", "pool1-load-window"], "one history and one open-window checkpoint"


async def test_injected_faults_refuse_the_write(emulator, client):
    """The fault injection the tests below rely on: a refused write stores nothing (kmock's own error
    reactions, `emulator[...] << 500`, answer the error but store the object anyway)."""
    from warmserve.controller.k8s import ApiError

    refusal = emulator.refuse(writes_to("warmpools", "refused"), times=1, status=500)
    try:
        await client.create(WARMPOOLS, NS, pool_body("refused"))
    except ApiError as exc:
        assert exc.status == 500
    else:
        raise AssertionError("the create was not refused")
    assert refusal.refused == 1 and get_obj(emulator, POOLS, "refused") is None, "nothing stored"
    await client.create(WARMPOOLS, NS, pool_body("refused"))  # the fault is spent: the write lands
    assert get_obj(emulator, POOLS, "refused") is not None


async def test_api_errors_are_retried_or_surfaced_never_crash(emulator, client):
    runtime = make_runtime()
    stored_when_refused = []  # was the object there when a write of it was refused? (it must not be)

    def daemonset_of(pool):
        match = writes_to("daemonsets", f"{pool}-worker")

        def predicate(request):
            if match(request):
                stored_when_refused.append(get_obj(emulator, "apps/v1/daemonsets", f"{pool}-worker") is not None)
                return True
            return False

        return predicate

    def status_of(name):
        match = writes_to("modeldeployments", name)
        return lambda request: match(request) and request.subresource == "status"

    ds_faults = emulator.refuse(daemonset_of("pool1"), times=2, status=500)
    md_faults = emulator.refuse(status_of("m1"), times=2, status=503)
    async with running_operator(emulator, runtime) as task:
        await client.create(WARMPOOLS, NS, pool_body(gpus=8, memory_mib=81920))
        await wait_for(lambda: get_obj(emulator, "apps/v1/daemonsets", "pool1-worker"), what="DaemonSet after 500s")
        posts = [r for r in list(emulator) if writes_to("daemonsets", "pool1-worker")(r)]
        assert ds_faults.refused == 2 and len(posts) == 3, "refused twice, stored by the third attempt (a retry)"
        assert stored_when_refused == [False, False], "a refused write stored nothing"
        await client.create(MODELDEPLOYMENTS, NS, model_body("m1"))
        await wait_for(lambda: cond(get_obj(emulator, MDS, "m1"), "Valid"), what="status after 503s on its patch")
        assert md_faults.refused == 2, "the status write landed after two refused attempts"

        # 409 on create: a DaemonSet an earlier operator created (and someone edited) exists; the create is a
        # genuine conflict, so the operator reads it and patches it back to the pool's spec.
        from warmserve.controller.builders import build_worker_daemonset
        from warmserve.controller.spec import parse_pool_spec

        stale = build_worker_daemonset(
            "pool2", NS, parse_pool_spec(pool_body("pool2", gpus=8, memory_mib=81920)["spec"])
        )
        stale["spec"]["template"]["spec"]["containers"][0]["image"] = "someone/else:latest"
        await client.create(DAEMONSETS, NS, stale)
        await client.create(WARMPOOLS, NS, pool_body("pool2", gpus=8, memory_mib=81920))
        await wait_for(
            lambda: (
                (d := get_obj(emulator, "apps/v1/daemonsets", "pool2-worker"))
                and d["spec"]["template"]["spec"]["containers"][0]["image"] != "someone/else:latest"
            ),
            what="the existing DaemonSet patched back",
        )
        daemonsets = [k for k in emulator.objects if "daemonsets" in str(k[0]) and not emulator.objects[k].deleted]
        assert len(daemonsets) == 2

        # 422 (the API refuses our object): surfaced as a condition, retried slowly, operator alive.
        rejected_writes = emulator.refuse(writes_to("daemonsets", "pool3-worker"), times=math.inf, status=422)
        await client.create(WARMPOOLS, NS, pool_body("pool3", gpus=8, memory_mib=81920))
        rejected = await wait_for(
            lambda: (c := cond(get_obj(emulator, POOLS, "pool3"), "Ready")) and c["reason"] == "WorkloadRejected" and c,
            what="WorkloadRejected",
        )
        assert rejected["status"] == "False" and rejected_writes.refused >= 1
        assert get_obj(emulator, "apps/v1/daemonsets", "pool3-worker") is None
        assert not task.done()
    assert runtime.metrics.reconcile_errors.labels("WarmPool", "reconcile")._value.get() >= 1


async def test_a_restart_during_a_refused_history_save_loses_no_window(emulator, client):
    """The window closes, its save is refused, the operator is stopped before any later save could land, and a
    new operator starts: the window is in the history it restores (retried every round and once more when
    the daemon stops), the refusal was visible (metric, HistorySaved=False), and nothing is duplicated."""
    clock, scraper = FakeClock(), FakeScraper()
    clock.now = 86400 * 20000 + 3600 * 5 + 1
    scraper.load = {"m1": 3.0}
    for i in range(2):
        await client.create(PODS, NS, worker_pod("pool1", i))
    loops = []
    first = make_runtime(clock=clock, scraper_factory=lambda rt, pool: scraper, on_loop=loops.append)
    refused = emulator.refuse(writes_to("configmaps", "pool1-load-history"), times=math.inf, status=500)
    async with running_operator(emulator, first, graceful=True):  # stopped as SIGTERM (a rollout) stops it
        await client.create(WARMPOOLS, NS, pool_body())
        md = (await client.create(MODELDEPLOYMENTS, NS, model_body("m1", prewarm={"minWarmReplicas": 1})))[0]
        uid = md["metadata"]["uid"]
        await wait_for(lambda: any(plans(emulator).values()), what="first plan")
        await wait_for(lambda: loops and loops[-1].rounds >= 2)
        window = int(clock.now // 3600)
        clock.now += 3600  # close the window: its save is refused, and retried at every round
        failures = first.metrics.history_save_failures.labels("pool1")._value.get
        await wait_for(lambda: failures() >= 3, what="the save retried round after round")
        await wait_for(
            lambda: (c := cond(get_obj(emulator, POOLS, "pool1"), "HistorySaved")) and c["status"] == "False",
            what="HistorySaved=False",
        )
        assert refused.refused >= 3
        assert get_obj(emulator, "v1/configmaps", "pool1-load-history") is None
        refused.stop()  # the API server recovers just as the operator is stopped
    saved = get_obj(emulator, "v1/configmaps", "pool1-load-history")
    assert saved is not None, "the history was saved at the latest when the daemon stopped"

    second_loops = []
    second = make_runtime(clock=clock, scraper_factory=lambda rt, pool: scraper, on_loop=second_loops.append)
    ds_posts_before = len([r for r in list(emulator) if writes_to("daemonsets")(r) and r.action == kmock.action.CREATE])
    async with running_operator(emulator, second):
        await wait_for(lambda: second_loops and second_loops[-1].rounds >= 2, what="second loop")
        restored = second_loops[-1].history.series[uid]["avg"]
        assert restored.get(window) == 3.0, "the window that closed while saves were refused is not lost"
        await wait_for(
            lambda: (c := cond(get_obj(emulator, POOLS, "pool1"), "HistorySaved")) is None or c["status"] == "True",
            what="HistorySaved recovers",
        )
    daemonsets = [k for k in emulator.objects if "daemonsets" in str(k[0]) and not emulator.objects[k].deleted]
    assert len(daemonsets) == 1, "no duplicate DaemonSet"
    ds_posts = len([r for r in list(emulator) if writes_to("daemonsets")(r) and r.action == kmock.action.CREATE])
    assert ds_posts - ds_posts_before <= 1
    configmaps = sorted(k[2] for k in emulator.objects if "configmaps" in str(k[0]))
    assert configmaps == ["pool1-load-history", "pool1-load-window"], "one history and one open-window checkpoint"


async def test_a_pool_that_asks_for_privileges_gets_no_workers_and_says_why(emulator, client):
    """WarmPools that would run workers as the operator, mount the host's root, tolerate every taint, use a
    system priority class, or carry an affinity the operator cannot read: no DaemonSet, a reason, no crash."""
    runtime = make_runtime()
    hostile = {
        "as-operator": ({"worker": {"serviceAccountName": "warmserve-operator"}}, "ServiceAccountNotAllowed"),
        "host-root": ({"modelCache": {"hostPath": "/", "mountPath": "/models"}}, "HostPathNotAllowed"),
        "all-taints": ({"tolerations": [{"operator": "Exists"}]}, "TolerationNotAllowed"),
        "node-critical": ({"priorityClassName": "system-node-critical"}, "PriorityClassNotAllowed"),
        "affinity-yes": ({"affinity": {"nodeAffinity": "yes"}}, "InvalidAffinity"),
        "terms-string": (
            {
                "affinity": {
                    "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": "x"}}
                }
            },
            "InvalidAffinity",
        ),
    }
    async with running_operator(emulator, runtime) as task:
        for name, (spec, _) in hostile.items():
            body = pool_body(name)
            body["spec"].update(spec)
            await client.create(WARMPOOLS, NS, body)
        for name, (_, expected) in hostile.items():
            ready = await wait_for(
                lambda name=name: (
                    (c := cond(get_obj(emulator, POOLS, name), "Ready")) and c["reason"] != "NoWorkers" and c
                ),
                what=f"{name} Ready condition",
            )
            assert ready["status"] == "False" and ready["reason"] == expected, (name, ready)
            valid = cond(get_obj(emulator, POOLS, name), "Valid")
            assert valid["status"] == "False" and valid["reason"] == expected
        await asyncio.sleep(1.0)  # a few more rounds and handler runs
        assert not [k for k in emulator.objects if "daemonsets" in str(k[0])], "no DaemonSet for any of them"
        assert not task.done()
    assert runtime.metrics.reconcile_errors.labels("WarmPool", "reconcile")._value.get() == 0, "nothing raised"
    assert runtime.metrics.reconcile_errors.labels("WarmPool", "round")._value.get() == 0


async def test_a_forged_endpoint_is_not_published(emulator, client):
    """A worker reporting the metadata service as its engine: not in status.endpoints, a Degraded message."""
    import json

    from warmserve.protocol import STATE_ANNOTATION

    runtime = make_runtime()
    pod = worker_pod("pool1", 0)
    await client.create(PODS, NS, pod)
    async with running_operator(emulator, runtime):
        await client.create(WARMPOOLS, NS, pool_body())
        md = (await client.create(MODELDEPLOYMENTS, NS, model_body("m1", scaling={"minReplicas": 1})))[0]
        await wait_for(lambda: plans(emulator, count=1)["pool1-worker-0"], what="a plan")
        plan = plans(emulator, count=1)["pool1-worker-0"]
        (group,) = [g for g in plan.groups if any(r.role == Role.SERVE for r in g.replicas)]
        state = {
            "observedGeneration": plan.generation,
            "devices": [
                {"index": g, "totalBytes": GPU_BYTES, "usedBytes": 0, "freeBytes": GPU_BYTES} for g in range(2)
            ],
            "replicas": [
                {
                    "model": "m1",
                    "uid": md["metadata"]["uid"],
                    "gpus": list(group.gpus),
                    "phase": "serving",
                    "progress": 1.0,
                    "endpoint": "169.254.169.254:80",
                    "ready": True,
                }
            ],
            "errors": [],
        }
        await client.patch(
            PODS, NS, "pool1-worker-0", {"metadata": {"annotations": {STATE_ANNOTATION: json.dumps(state)}}}
        )
        degraded = await wait_for(
            lambda: (c := cond(get_obj(emulator, MDS, "m1"), "Degraded")) and c["reason"] == "EndpointsRejected" and c,
            what="EndpointsRejected",
        )
        assert "169.254.169.254:80" in degraded["message"]
        assert get_obj(emulator, MDS, "m1")["status"]["endpoints"] == []
        pool_degraded = cond(get_obj(emulator, POOLS, "pool1"), "Degraded")
        assert pool_degraded["status"] == "True" and "169.254.169.254" in pool_degraded["message"]


async def test_deleting_a_model_removes_it_from_every_plan(emulator, client):
    runtime = make_runtime()
    workers = SimulatedWorkers(client, "pool1", GPU_BYTES)
    for i in range(2):
        await client.create(PODS, NS, worker_pod("pool1", i))
    async with running_operator(emulator, runtime):
        await client.create(WARMPOOLS, NS, pool_body())
        gone = (await client.create(MODELDEPLOYMENTS, NS, model_body("gone", prewarm={"minWarmReplicas": 2})))[0]
        await client.create(MODELDEPLOYMENTS, NS, model_body("kept", prewarm={"minWarmReplicas": 1}))
        workers.start()
        try:
            uid = gone["metadata"]["uid"]

            def both_pods_hold_gone():
                p = plans(emulator)
                return all(plan and uid in plan.uids() for plan in p.values())

            await wait_for(both_pods_hold_gone, what="'gone' placed on both workers")
            await client.delete(MODELDEPLOYMENTS, NS, "gone")
            await wait_for(lambda: get_obj(emulator, MDS, "gone") is None, what="finalizer released")
            current = plans(emulator)
            assert all(plan is not None and uid not in plan.uids() for plan in current.values())
            assert any(plan.models() == {"kept"} for plan in current.values())
            await asyncio.sleep(1.2)  # a few more loop rounds must not bring it back
            assert all(uid not in plan.uids() for plan in plans(emulator).values())
        finally:
            await workers.stop()
    raw = get_obj(emulator, "v1/pods", "pool1-worker-0")["metadata"]["annotations"][PLAN_ANNOTATION]
    assert json.loads(raw)["generation"] >= 2
