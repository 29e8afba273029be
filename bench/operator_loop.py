"""Time one placement round of the operator's control loop, without API latency.

What is timed is everything the loop does between reading the pods and writing annotations: rebuilding the
ClusterState from every worker's plan and reported state, KV lending, evict-aware placement, autoscaling,
rendering one plan per worker, serialising it, and comparing it with the plan on the pod
(`planner.plan_round` + `Plan.dumps` + `next_generation`). The cluster is 64 workers × 8 GPUs of 80 GB and
100 models (7B/13B/34B/70B mix, TP 1/2/4/8) with Zipf popularity, a diurnal swing, one-minute ×4 bursts and
per-round noise (`--noise-cv`: the autoscaler sees a 5-s window mean, so 0.1 by default; 0.5 is a stress
case with heavy engine churn); rounds run back to back on the plans of the previous round, as in production,
and the first rounds (cluster filling up) are excluded.

Usage: python bench/operator_loop.py [--workers 64] [--gpus 8] [--models 100] [--rounds 40] [--json F]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import numpy as np

from warmserve.controller.planner import ModelEntry, PlannerMemory, RoundInput, WorkerSnapshot, plan_round
from warmserve.core.policy import WarmServePolicy
from warmserve.core.types import GB, Demand, ModelProfile
from warmserve.protocol import Phase, Plan, ReplicaState, WorkerState, next_generation

SIZES = [(13_476_839_424, 1), (26_031_738_880, 2), (68_000_000_000, 4), (137_953_316_864, 8)]


def make_models(n: int, rng: np.random.Generator) -> list[ModelEntry]:
    models = []
    for i in range(n):
        size, tp = SIZES[int(rng.choice(4, p=[0.55, 0.25, 0.12, 0.08]))]
        uid = f"uid-{i:03d}"
        models.append(
            ModelEntry(uid, f"model-{i:03d}", f"pvc://w/model-{i:03d}", ModelProfile(uid, size, tp, max_batch=32))
        )
    return models


def scenario(
    models: list[ModelEntry],
    rounds: int,
    rng: np.random.Generator,
    noise_cv: float,
    burst_p: float,
    total_inflight: float,
) -> list[tuple[dict, dict]]:
    """Zipf-like popularity, a diurnal swing, bursts (×4 for 12 rounds = 1 min) and per-round noise."""
    weights = np.array([(i + 1) ** -0.8 for i in range(len(models))])
    weights = weights / weights.sum() * total_inflight
    burst_left = np.zeros(len(models), dtype=int)
    steps = []
    for r in range(rounds):
        diurnal = 1 + 0.6 * math.sin(r / 8)
        burst_left = np.where(burst_left > 0, burst_left - 1, (rng.random(len(models)) < burst_p) * 12)
        load, demand = {}, {}
        for i, m in enumerate(models):
            burst = 4.0 if burst_left[i] else 1.0
            noise = max(0.0, 1.0 + noise_cv * float(rng.standard_normal()))
            load[m.uid] = float(weights[i] * diurnal * burst * noise)
            demand[m.uid] = Demand(float(weights[i] * diurnal), float(weights[i] * diurnal * 2.5))
        steps.append((load, demand))
    return steps


def reports(plan: Plan | None) -> WorkerState | None:
    if plan is None:
        return None
    replicas = tuple(  # a worker that applied the plan completely: replicas loaded, engines serving
        ReplicaState(r.model, r.uid, r.gpus, Phase.SERVING if r.serves else Phase.WARM, 1.0, None, r.serves)
        for r in plan.replicas.values()
    )
    return WorkerState(plan.generation, (), replicas)


def run(
    workers: int,
    gpus: int,
    n_models: int,
    rounds: int,
    warmup: int,
    seed: int,
    noise_cv: float = 0.1,
    burst_p: float = 0.01,
    total_inflight: float = 2000.0,
) -> dict:
    rng = np.random.default_rng(seed)
    models = make_models(n_models, rng)
    pods = [f"worker-{i:03d}" for i in range(workers)]
    policy = WarmServePolicy({m.uid: m.profile for m in models})
    memory = PlannerMemory()
    plans: dict[str, Plan | None] = dict.fromkeys(pods)
    timings, cpu_timings, changed, replicas, engines, starts = [], [], [], [], [], []
    for r, (load, demand) in enumerate(scenario(models, warmup + rounds, rng, noise_cv, burst_p, total_inflight)):
        snapshots = [WorkerSnapshot(p, gpus, int(80 * GB * 0.9), plans[p], reports(plans[p])) for p in pods]
        started, cpu_started = time.perf_counter(), time.process_time()
        out = plan_round(policy, RoundInput(5.0 * r, snapshots, models, load, demand, memory))
        writes = 0
        new_plans: dict[str, Plan | None] = {}
        for pod in pods:
            plan = next_generation(plans[pod], out.plans[pod])
            if plan is not plans[pod]:
                plan.dumps()
                writes += 1
            new_plans[pod] = plan
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        memory, plans = out.memory, new_plans
        assert out.state is not None
        if r >= warmup:
            timings.append(elapsed * 1000)
            cpu_timings.append(cpu * 1000)
            changed.append(writes)
            replicas.append(len(out.state.replicas))
            engines.append(len(out.state.instances))
            starts.append(len(out.promotions) + len(out.stops))
    timings.sort()
    cpu_timings.sort()

    def pct(values: list[float], q: float) -> float:
        return round(values[min(len(values) - 1, math.ceil(q * len(values)) - 1)], 2)

    return {
        "workers": workers,
        "gpus_per_worker": gpus,
        "models": n_models,
        "rounds": rounds,
        "noise_cv": noise_cv,
        "burst_p": burst_p,
        "total_inflight": total_inflight,
        "p50_ms": pct(timings, 0.5),
        "p99_ms": pct(timings, 0.99),
        "max_ms": round(timings[-1], 2),
        "cpu_p50_ms": pct(cpu_timings, 0.5),
        "cpu_p99_ms": pct(cpu_timings, 0.99),
        "mean_plans_written": round(statistics.mean(changed), 1),
        "mean_warm_replicas": round(statistics.mean(replicas), 1),
        "mean_engines": round(statistics.mean(engines), 1),
        "mean_engine_starts_and_stops": round(statistics.mean(starts), 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--models", type=int, default=100)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise-cv", type=float, default=0.1, help="per-round load noise (autoscaler-window mean)")
    p.add_argument("--total-inflight", type=float, default=2000.0, help="mean in-flight requests over all models")
    p.add_argument("--burst-p", type=float, default=0.01, help="per-model chance per round a 1-min ×4 burst starts")
    p.add_argument("--json", dest="json_path")
    a = p.parse_args(argv)
    result = run(a.workers, a.gpus, a.models, a.rounds, a.warmup, a.seed, a.noise_cv, a.burst_p, a.total_inflight)
    print(
        f"operator loop round: {a.workers} workers × {a.gpus} GPUs × {a.models} models: "
        f"wall p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, max {result['max_ms']} ms; "
        f"CPU p50 {result['cpu_p50_ms']} ms, p99 {result['cpu_p99_ms']} ms "
        f"({result['mean_warm_replicas']} warm replicas, {result['mean_engines']} engines, "
        f"{result['mean_engine_starts_and_stops']} engine starts+stops and "
        f"{result['mean_plans_written']} plans written per round)"
    )
    if a.json_path:
        with open(a.json_path, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
