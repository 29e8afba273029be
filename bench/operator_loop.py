"""Time the operator's pool round end to end, stage by stage, without API latency.

A round is what `controller.loop.PoolLoop.tick` runs, with the operator's own code for every stage:

* observe: `observe.KubeObserver.observe` over `MemoryApi`, an in-memory API — list the worker pods and parse
  their plan and state annotations (`reconcile.view_worker`), list and parse the ModelDeployments, their weight
  bytes, validate the pool, a load sample (a scripted scraper), read the DaemonSet;
* forecasts: `forecasts.Forecasts.advance` and `view` (windows, the autoscaler's mean and the lending peak, the
  forecast and the history encoding when a window closes, the open-window checkpoint), run inline where the
  operator uses `asyncio.to_thread`; the demand the round plans for is then the scenario's (below) at the first
  round of the window, held for the window as a forecast is, since a forecaster needs days of history this
  synthetic load does not have;
* decide: `decide.decide` — validate the models (the catalog), the planner (`planner.plan_round`: rebuild the
  ClusterState from every worker's plan and reported state, lend KV, evict-aware placement, autoscaling,
  render one plan per worker), the workers' capabilities, numbering the changed plans, the pool's and every
  model's status;
* act: `act.act` through `act.KubeActuator` over `MemoryApi` with the operator's Prometheus metrics — save the
  history (when a window closed), serialise and write the changed plans, patch the status that changed, save
  the open-window checkpoint.

`MemoryApi` does what the operator's client (`k8s.Api`) does on its side of the wire: it encodes every request
body to JSON and decodes every response (a list of every worker pod with its annotations, each write's answer).
Not timed: the network and the API server (merge patches are applied between rounds, in `settle`), kopf (the
daemon's sleep, its own watch of the pool), log output (the logger drops INFO), and the workers: between rounds
every worker applies its plan at once (replicas warm, engines serving and ready, on its own IP) and reports it,
advertising every capability, as the simulator assumes.

The cluster is 64 workers × 8 GPUs of 80 GB (a 72 GB arena each) and 100 models (7B/13B/34B/70B mix, TP
1/2/4/8) with Zipf popularity, a diurnal swing, one-minute ×4 bursts and per-round noise (`--noise-cv`: the
autoscaler sees a 5-s window mean, so 0.1 by default; 0.5 is a stress case with heavy engine churn). Rounds are
5 s of the operator's clock apart (forecast windows of 300 s: a window closes every 60 rounds) and run back to
back on the plans and states of the previous round, as in production; the first `--warmup` rounds (cluster
filling up) are not measured; the garbage collector is set up as the operator's process sets it up
(`runtime.configure_gc`). Every round is timed in CPU time (`time.process_time`, the figure `p50_ms`,
`p99_ms`, `max_ms` report: the machine is shared) and wall time (`wall_*`), as a whole and per stage.

Usage: python bench/operator_loop.py [--workers 64] [--gpus 8] [--models 100] [--rounds 200] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from warmserve.controller import builders
from warmserve.controller.act import KubeActuator, act
from warmserve.controller.decide import PlannerState, decide
from warmserve.controller.forecasts import Forecasts
from warmserve.controller.history import LoadHistory
from warmserve.controller.k8s import DAEMONSETS, MODELDEPLOYMENTS, PODS, WARMPOOLS, Resource
from warmserve.controller.observe import KubeObserver
from warmserve.controller.runtime import Runtime, configure_gc
from warmserve.controller.settings import ControllerConfig
from warmserve.core.types import GB, Demand
from warmserve.protocol import (
    PLAN_ANNOTATION,
    STATE_ANNOTATION,
    Capabilities,
    DeviceState,
    Phase,
    ReplicaState,
    WorkerState,
    engine_ports,
    parse_plan,
)

SIZES = [(13_476_839_424, 1), (26_031_738_880, 2), (68_000_000_000, 4), (137_953_316_864, 8)]
NAMESPACE, POOL = "bench", "bench"
ARENA_BYTES = int(80 * GB * 0.9)
START = 86400.0 * 20000  # the operator's clock at the first round (a window boundary)
INTERVAL = 5.0
STAGES = ("observe", "forecasts", "decide", "act")
EVERYTHING = Capabilities(kv_lend=True, tp_promotion=True, engine_settings=True, device_kind="cuda")


def merge(base: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (null deletes)."""
    if not isinstance(patch, dict) or not isinstance(base, dict):
        return patch
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


class MemoryApi:
    """The `k8s.Api` verbs a round uses, over objects held in memory: the client's JSON work, no server's.

    Every request body is encoded and every response decoded from JSON, as `k8s.Api.request` does. The objects
    are kept as JSON text only (what the operator's process would not hold is not left for its garbage
    collector to scan); writes are queued and applied by `settle` (the API server's work, between rounds). A
    patch is answered with the object as stored before it (about the size of the real answer).
    """

    def __init__(self) -> None:
        self.texts: dict[tuple[str, str], str] = {}  # (plural, name) → the object as the server would send it
        self.labels: dict[tuple[str, str], dict[str, str]] = {}
        self.pending: list[tuple[str, str, str, bool]] = []  # (plural, name, JSON body, create?)

    def put(self, res: Resource, obj: dict[str, Any]) -> None:
        key = (res.plural, obj["metadata"]["name"])
        self.texts[key], self.labels[key] = json.dumps(obj), dict(obj["metadata"].get("labels") or {})

    def read(self, res: Resource, name: str) -> dict[str, Any]:
        return dict(json.loads(self.texts[res.plural, name]))

    def names(self, res: Resource) -> list[str]:
        return [name for plural, name in self.texts if plural == res.plural]

    def settle(self) -> None:
        """Apply the queued writes, in order (a create of an existing object changes nothing)."""
        for plural, name, body, create in self.pending:
            key = (plural, name)
            if create and key in self.texts:
                continue
            current = json.loads(self.texts.get(key, "{}"))
            self.texts[key] = body if create else json.dumps(merge(current, json.loads(body)))
        self.pending.clear()

    async def get(self, res: Resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        text = self.texts.get((res.plural, name))
        return json.loads(text) if text is not None else None

    async def list(self, res: Resource, namespace: str | None, labels: Mapping[str, str] | None = None) -> list[dict]:
        texts = [
            text
            for key, text in self.texts.items()
            if key[0] == res.plural and all(self.labels[key].get(k) == v for k, v in (labels or {}).items())
        ]
        return list(json.loads('{"items":[' + ",".join(texts) + "]}")["items"])

    async def create(self, res: Resource, namespace: str | None, body: Mapping[str, Any]) -> tuple[dict, bool]:
        name = body["metadata"]["name"]
        self.pending.append((res.plural, name, json.dumps(body), True))
        text = self.texts.get((res.plural, name))
        return (json.loads(text), False) if text is not None else (dict(body), True)

    async def patch(
        self, res: Resource, namespace: str | None, name: str, patch: Mapping[str, Any], *, status: bool = False
    ) -> dict:
        self.pending.append((res.plural, name, json.dumps(patch), False))
        return dict(json.loads(self.texts.get((res.plural, name), "{}")))


class ScriptedLoad:
    """The load source: in-flight requests per served model name, set by the scenario before each round."""

    def __init__(self) -> None:
        self.load: dict[str, float] = {}

    async def sample(self, workers: Any) -> dict[str, float]:
        return dict(self.load)


def make_models(n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """`n` ModelDeployments (weights given in the spec, sources in the pool's model cache)."""
    models = []
    for i in range(n):
        size, tp = SIZES[int(rng.choice(4, p=[0.55, 0.25, 0.12, 0.08]))]
        name = f"model-{i:03d}"
        models.append(
            {
                "apiVersion": "warmserve.io/v1alpha1",
                "kind": "ModelDeployment",
                "metadata": {"name": name, "namespace": NAMESPACE, "uid": f"uid-{i:03d}", "generation": 1},
                "spec": {
                    "poolRef": {"name": POOL},
                    "model": {"source": f"pvc://weights/{name}", "tensorParallelSize": tp, "weightBytes": size},
                    "engine": {"maxConcurrency": 32},
                },
            }
        )
    return models


def pool_object(gpus: int) -> dict[str, Any]:
    return {
        "apiVersion": "warmserve.io/v1alpha1",
        "kind": "WarmPool",
        "metadata": {"name": POOL, "namespace": NAMESPACE, "uid": "pool-uid", "generation": 1},
        "spec": {
            "gpu": {"count": gpus, "memoryMiB": 76294},  # 80 GB: a 72 GB arena at the default arenaFraction 0.9
            "policy": {"intervalSeconds": INTERVAL},
            "modelCache": {"persistentVolumeClaimName": "weights", "mountPath": "/models"},
        },
    }


def worker_pod(index: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{POOL}-worker-{index:03d}",
            "namespace": NAMESPACE,
            "labels": builders.common_labels(POOL),
        },
        "spec": {"nodeName": f"gpu-node-{index:03d}", "containers": [{"name": "worker", "image": "w"}]},
        "status": {"phase": "Running", "podIP": f"10.{index // 250}.{index % 250}.1"},
    }


def apply_plans(api: MemoryApi, gpus: int, shard_bytes: Mapping[str, int]) -> None:
    """Every worker applies the plan on its pod at once and reports it (not timed)."""
    ports = engine_ports(8000)
    for name in api.names(PODS):
        pod = api.read(PODS, name)
        text = (pod["metadata"].get("annotations") or {}).get(PLAN_ANNOTATION)
        if not text:
            continue
        plan, ip = parse_plan(text), pod["status"]["podIP"]
        replicas, used = [], [0] * gpus
        for r in plan.replicas.values():
            endpoint = f"{ip}:{ports[r.gpus[0]]}" if r.serves else None
            phase = Phase.SERVING if r.serves else Phase.WARM
            shard = shard_bytes[r.uid]
            replicas.append(
                ReplicaState(r.model, r.uid, r.gpus, phase, 1.0, endpoint, r.serves, r.role, r.tp, r.kv_lend, shard)
            )
            for g in r.gpus:
                used[g] += shard
        devices = tuple(DeviceState(i, ARENA_BYTES, u, max(0, ARENA_BYTES - u)) for i, u in enumerate(used))
        state = WorkerState(plan.generation, devices, tuple(replicas), capabilities=EVERYTHING)
        annotations = {**(pod["metadata"].get("annotations") or {}), STATE_ANNOTATION: state.dumps()}
        api.put(PODS, {**pod, "metadata": {**pod["metadata"], "annotations": annotations}})


def scenario(
    models: list[dict[str, Any]],
    rounds: int,
    rng: np.random.Generator,
    noise_cv: float,
    burst_p: float,
    total_inflight: float,
) -> Iterator[tuple[dict[str, float], dict[str, Demand]]]:
    """Per round, in-flight requests by served name and demand by uid: Zipf-like popularity, a diurnal swing,
    bursts (×4 for 12 rounds = 1 min) and per-round noise (made round by round: nothing waits in the heap)."""
    weights = np.array([(i + 1) ** -0.8 for i in range(len(models))])
    weights = weights / weights.sum() * total_inflight
    burst_left = np.zeros(len(models), dtype=int)
    for r in range(rounds):
        diurnal = 1 + 0.6 * math.sin(r / 8)
        burst_left = np.where(burst_left > 0, burst_left - 1, (rng.random(len(models)) < burst_p) * 12)
        load, demand = {}, {}
        for i, m in enumerate(models):
            burst = 4.0 if burst_left[i] else 1.0
            noise = max(0.0, 1.0 + noise_cv * float(rng.standard_normal()))
            load[m["metadata"]["name"]] = float(weights[i] * diurnal * burst * noise)
            demand[m["metadata"]["uid"]] = Demand(float(weights[i] * diurnal), float(weights[i] * diurnal * 2.5))
        yield load, demand


class Stopwatch:
    """CPU and wall seconds of the stages of one round."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self._cpu, self._wall = time.process_time(), time.perf_counter()

    def lap(self, stage: str) -> None:
        cpu, wall = time.process_time(), time.perf_counter()
        self.cpu[stage], self.wall[stage] = cpu - self._cpu, wall - self._wall
        self._cpu, self._wall = cpu, wall


async def _rounds(
    workers: int, gpus: int, steps: Iterable[tuple[dict, dict]], models: list[dict], on_round: Callable
) -> None:
    api, scraper = MemoryApi(), ScriptedLoad()
    config = ControllerConfig(namespaces=(NAMESPACE,), metrics_port=0, liveness_port=0, post_events=False)
    runtime = Runtime(config=config, scraper_factory=lambda rt, pool: scraper)
    runtime.api = api  # type: ignore[assignment]  # the verbs of k8s.Api a round uses
    api.put(WARMPOOLS, pool_object(gpus))
    for i in range(workers):
        api.put(PODS, worker_pod(i))
    for m in models:
        api.put(MODELDEPLOYMENTS, m)
    daemonset = {"metadata": {"name": builders.worker_workload_name(POOL)}, "status": {}}
    api.put(DAEMONSETS, {**daemonset, "status": {"desiredNumberScheduled": workers}})
    shard_bytes = {
        m["metadata"]["uid"]: -(-m["spec"]["model"]["weightBytes"] // m["spec"]["model"]["tensorParallelSize"])
        for m in models
    }
    observer, actuator = KubeObserver(runtime, NAMESPACE, POOL), KubeActuator(runtime, NAMESPACE, POOL)
    logger = logging.getLogger("warmserve.bench")
    logger.setLevel(logging.WARNING)
    planner = PlannerState()
    forecasts = Forecasts(LoadHistory(300, 5 * 288), config.history_budget_bytes)  # the pool's defaults
    held: tuple[int | None, dict[str, Demand]] = (None, {})  # the forecast window and its demand
    for r, (load, demand) in enumerate(steps):
        scraper.load = load
        body, now = api.read(WARMPOOLS, POOL), START + INTERVAL * r  # kopf's copy of the pool
        watch = Stopwatch()
        obs = await observer.observe(body, now, logger)
        watch.lap("observe")
        update = forecasts.advance(now, obs.pool.spec, obs.catalog.entries, obs.catalog.load_by_uid(obs.load))
        if held[0] != forecasts.window:
            held = (forecasts.window, demand)
        view = replace(forecasts.view(obs.pool.spec), demand=held[1])
        watch.lap("forecasts")
        decision = decide(obs, view, planner)
        planner.memory = decision.memory
        watch.lap("decide")
        result = await act(obs, update, decision, actuator, runtime.metrics, logger, 0.0)
        watch.lap("act")
        if result.history_attempted:
            forecasts.saved(result.history_error, update.history_note)
        on_round(r, watch, decision)
        api.settle()
        apply_plans(api, gpus, shard_bytes)


def run(
    workers: int = 64,
    gpus: int = 8,
    n_models: int = 100,
    rounds: int = 200,
    warmup: int = 10,
    seed: int = 0,
    noise_cv: float = 0.1,
    burst_p: float = 0.01,
    total_inflight: float = 2000.0,
) -> dict[str, Any]:
    """Run `warmup + rounds` rounds and summarise the last `rounds` (times in ms; unprefixed: CPU time).

    The garbage collector is set up as in the operator's process (`runtime.configure_gc`, called by
    `controller.__main__`) before the rounds begin: this affects the calling process too."""
    configure_gc()
    rng = np.random.default_rng(seed)
    models = make_models(n_models, rng)
    steps = scenario(models, warmup + rounds, rng, noise_cv, burst_p, total_inflight)
    cpu: dict[str, list[float]] = {s: [] for s in ("round", *STAGES)}
    wall: dict[str, list[float]] = {s: [] for s in ("round", *STAGES)}
    written, replicas, engines, starts = [], [], [], []

    def on_round(r: int, watch: Stopwatch, decision: Any) -> None:
        if r < warmup:
            return
        for stage in STAGES:
            cpu[stage].append(watch.cpu[stage] * 1000)
            wall[stage].append(watch.wall[stage] * 1000)
        cpu["round"].append(sum(watch.cpu.values()) * 1000)
        wall["round"].append(sum(watch.wall.values()) * 1000)
        out = decision.outcome
        written.append(len(decision.plans))
        replicas.append(len(out.state.replicas) if out.state is not None else 0)
        engines.append(len(out.state.instances) if out.state is not None else 0)
        starts.append(len(out.promotions) + len(out.stops))

    asyncio.run(_rounds(workers, gpus, steps, models, on_round))

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 2)

    def summary(times: list[float]) -> dict[str, float]:
        return {"p50_ms": pct(times, 0.5), "p99_ms": pct(times, 0.99), "max_ms": round(max(times), 2)}

    whole, whole_wall = summary(cpu["round"]), summary(wall["round"])
    return {
        "workers": workers,
        "gpus_per_worker": gpus,
        "models": n_models,
        "rounds": rounds,
        "noise_cv": noise_cv,
        "burst_p": burst_p,
        "total_inflight": total_inflight,
        **whole,
        **{f"wall_{k}": v for k, v in whole_wall.items()},
        "stages": {s: {**summary(cpu[s]), **{f"wall_{k}": v for k, v in summary(wall[s]).items()}} for s in STAGES},
        "mean_plans_written": round(statistics.mean(written), 1),
        "mean_warm_replicas": round(statistics.mean(replicas), 1),
        "mean_engines": round(statistics.mean(engines), 1),
        "mean_engine_starts_and_stops": round(statistics.mean(starts), 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--models", type=int, default=100)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise-cv", type=float, default=0.1, help="per-round load noise (autoscaler-window mean)")
    p.add_argument("--total-inflight", type=float, default=2000.0, help="mean in-flight requests over all models")
    p.add_argument("--burst-p", type=float, default=0.01, help="per-model chance per round a 1-min ×4 burst starts")
    p.add_argument("--json", dest="json_path")
    a = p.parse_args(argv)
    result = run(a.workers, a.gpus, a.models, a.rounds, a.warmup, a.seed, a.noise_cv, a.burst_p, a.total_inflight)
    split = ", ".join(f"{s} {v['p50_ms']}/{v['p99_ms']}/{v['max_ms']}" for s, v in result["stages"].items())
    print(
        f"operator round: {a.workers} workers × {a.gpus} GPUs × {a.models} models, {a.rounds} rounds: "
        f"CPU p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, max {result['max_ms']} ms; "
        f"wall p50 {result['wall_p50_ms']} ms, p99 {result['wall_p99_ms']} ms, max {result['wall_max_ms']} ms\n"
        f"  CPU p50/p99/max per stage (ms): {split}\n"
        f"  ({result['mean_warm_replicas']} warm replicas, {result['mean_engines']} engines, "
        f"{result['mean_engine_starts_and_stops']} engine starts+stops and "
        f"{result['mean_plans_written']} plans written per round)"
    )
    if a.json_path:
        with open(a.json_path, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
