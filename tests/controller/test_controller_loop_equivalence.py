"""The whole control loop (API reads, scraping, windows, forecast, plan writes, state reads) decides what a
persistent policy state decides for the same recorded inputs.

`PoolLoop.tick` runs against kmock's emulator over HTTP with a scripted clock and load; simulated workers
apply each written plan before the next tick. A `PersistentReference` (one ClusterState kept in memory and
driven like the simulator's control step) gets the same load, the same lend load and the loop's own
forecast, and both must hold the same replicas and engines after every tick.
"""

from __future__ import annotations

import logging
import math

from controller_support import (
    GPU_BYTES_DEFAULT,
    NS,
    FakeClock,
    FakeScraper,
    SimulatedWorkers,
    make_runtime,
    model_body,
    pool_body,
    worker_pod,
)
from test_controller_equivalence import PersistentReference, snapshot

from warmserve.controller.builders import selector_labels
from warmserve.controller.k8s import MODELDEPLOYMENTS, PODS, WARMPOOLS
from warmserve.controller.loop import LEND_WINDOW_ROUNDS, SCALE_WINDOW_SECONDS, PoolLoop
from warmserve.controller.planner import ModelEntry
from warmserve.core.types import GpuGroup, ModelProfile
from warmserve.protocol import Role, plan_of_pod

LOG = logging.getLogger("test")
GPUS = 4


def load_script(tick: int) -> dict[str, float]:
    """Recorded in-flight requests per served model: a rising model, a falling one, a bursty one."""
    return {
        "rise": float(min(2 * tick, 24)),
        "fall": float(max(20 - 2 * tick, 0)),
        "burst": 24.0 if tick % 12 in (4, 5, 6) else 0.0,
    }


def state_from_plans(pods: list[dict], reference: PersistentReference) -> tuple:
    """The operator's decisions as written on the pods, in the reference's snapshot shape."""
    from warmserve.core.cluster import ClusterState
    from warmserve.core.types import NodeSpec

    profiles = {m.uid: m.profile for m in reference.models}
    state = ClusterState(NodeSpec(p["metadata"]["name"], GPUS, GPU_BYTES_DEFAULT) for p in pods)
    for n, pod in enumerate(pods):
        plan = plan_of_pod(pod)
        for g in plan.groups if plan else ():
            for r in g.replicas:
                group = GpuGroup(n, min(g.gpus), len(g.gpus))
                if r.role == Role.SERVE:
                    state.start_instance(r.uid, group, profiles[r.uid].shard_bytes, 0.0)
                    for gpu in state.gpus_of(group):
                        state.set_lent(gpu, r.kv_lend)
    for n, pod in enumerate(pods):
        plan = plan_of_pod(pod)
        for g in plan.groups if plan else ():
            for r in g.replicas:
                if r.role == Role.WARM:
                    state.add_replica(r.uid, GpuGroup(n, min(g.gpus), len(g.gpus)), profiles[r.uid].shard_bytes)
    replicas, engines, lent = snapshot(state, {})
    return [x[:4] for x in replicas], engines, lent


async def test_loop_over_the_api_matches_a_persistent_state(emulator, client):
    clock, scraper = FakeClock(), FakeScraper()
    clock.now = 86400 * 20000 + 3600 * 12
    runtime = make_runtime(clock=clock, scraper_factory=lambda rt, pool: scraper)
    runtime.api = client
    workers = SimulatedWorkers(client, "pool1", GPU_BYTES_DEFAULT, gpus=GPUS)
    for i in range(2):
        await client.create(PODS, NS, worker_pod("pool1", i))
    pool, _ = await client.create(WARMPOOLS, NS, pool_body(gpus=GPUS, window=60))
    uids = {}
    for name in ("rise", "fall", "burst"):
        md, _ = await client.create(MODELDEPLOYMENTS, NS, model_body(name, prewarm={"minWarmReplicas": 1}))
        uids[name] = md["metadata"]["uid"]
    entries = [
        ModelEntry(uid, name, f"file:///models/{name}", ModelProfile(uid, 300_000_000, 1, max_batch=8, min_warm=1))
        for name, uid in sorted(uids.items(), key=lambda kv: kv[1])
    ]
    loop = PoolLoop(runtime, NS, "pool1")
    pods = ["pool1-worker-0", "pool1-worker-1"]
    reference = PersistentReference(entries, pods, gpus=GPUS)
    reference.state = type(reference.state)(type(n)(n.name, n.gpus, GPU_BYTES_DEFAULT) for n in reference.state.nodes)
    interval = 0.5
    keep = max(1, round(SCALE_WINDOW_SECONDS / interval))
    samples: dict[str, list[float]] = {uid: [] for uid in uids.values()}
    kinds, changes, previous = set(), 0, None
    for tick in range(12):
        clock.now += interval * 8  # a window (60 s) closes every ~2 ticks: forecasts move
        scraper.load = load_script(tick)
        for name, uid in uids.items():
            samples[uid].append(scraper.load[name])
        await loop.tick(pool, LOG)
        # the reference gets the loop's inputs: same autoscaler mean, lend peak and forecast
        load = {uid: sum(s[-keep:]) / len(s[-keep:]) for uid, s in samples.items()}
        peak = {uid: max(s[-max(keep, LEND_WINDOW_ROUNDS) :]) for uid, s in samples.items()}
        promotions = reference.step(clock.now, load, peak, dict(loop.demand))
        kinds.update(source for _, source in promotions)
        listed = sorted(await client.list(PODS, NS, selector_labels("pool1")), key=lambda p: p["metadata"]["name"])
        want = snapshot(reference.state, {})
        got = state_from_plans(listed, reference)
        assert got == ([x[:4] for x in want[0]], want[1], want[2]), f"tick {tick}: loop and reference differ"
        changes += got != previous
        previous = got
        # the workers apply the plan before the next tick (loading, then warm)
        await workers.one_pass()
        await workers.one_pass()
    assert changes >= 5 and "hit" in kinds, (changes, kinds)
    assert math.isfinite(sum(d.peak for d in loop.demand.values()))
