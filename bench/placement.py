"""Decision time of a full placement round on a large cluster (issue #2, item 10: p99 < 50 ms).

    python bench/placement.py --gpus 1024 --models 200 [--rounds 200] [--warmup 24] [--seed 0] \
        [--engine-share 0.5] [--json out/placement.json] [--profile] [--default-gc]

What is measured
* Cluster: ``gpus / 8`` nodes of 8 GPUs, each GPU with an arena of 80 GB × 0.9 = 72 GB.
* Models: a seeded mix of fp16 weights of 7B (14 GB, TP1), 13B (26 GB, TP1 or TP2), 34B (68 GB, TP2 or
  TP4) and 70B-class (140 GB, TP4 or TP8) models, max batch 32, priorities 1 (a few at 2).
* Demand per 5-minute window: popularity ∝ (i+1)^-0.5 over the models (the paper's α = 0.5), a seeded
  diurnal phase per model, log-normal noise (σ = 0.25) per window, a per-model peak/avg ratio in
  [1.1, 4], and 20 % of the models idle in any window (avg 0, sometimes a small forecast peak); idleness
  is sticky (an idle model wakes with probability 0.1 per window, a busy one idles at the matching
  rate). The total is scaled so that the engines the autoscaler runs at the mean load occupy about half
  of the GPUs (``--engine-share``): the rest is for warm replicas, the regime WarmServe is built for.
* Steady state: ``--warmup`` control steps run before timing, exactly as the simulator runs them —
  autoscaler (``WarmServePolicy.scale``), engine starts through ``choose_group``/``start_instance`` (a stopped
  engine leaves its weights as a warm replica), KV lending (``lend``), placement (``place``), and the
  placement's evictions and additions applied to ``ClusterState``; replicas finish loading before the next
  window. Every timed round is one more such step: only the ``WarmServePolicy.place`` call is timed (that
  is the placement decision), the rest keeps the state evolving, so every round sees new demand, running
  engines, lent KV space and earlier replicas.
* Garbage collector: set up as the operator's process sets it up (`warmserve.controller.runtime.configure_gc`),
  because that is where a placement round runs; ``--default-gc`` keeps Python's defaults, under which full
  collections of the cluster's objects fall into some rounds and set the p99.
* Cold round: ``place`` on the same cluster with no replica and no engine, for the first window's demand
  (every replica is new), timed separately (``--cold-repeats`` times).

Output: a table on stdout and, with ``--json``, ``p50_ms``, ``p99_ms``, ``max_ms``, ``mean_ms`` of the steady
rounds, ``cold_p50_ms``/``cold_max_ms``, what a round decides (replicas added/evicted/kept/unplaced), the state
it starts from, and the per-call time of ``choose_group`` and ``lend`` for context. Times are wall-clock
(``time.perf_counter``) on this machine, single-threaded; ``cpu_p50_ms``/``cpu_p99_ms`` are the same rounds in
process CPU time, which other processes sharing the cores do not inflate.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import math
import platform
import pstats
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from warmserve.controller.runtime import configure_gc
from warmserve.core.autoscaler import EngineView
from warmserve.core.cluster import ClusterState, EnginePhase, Role
from warmserve.core.placement import PlacementDecision, replica_slots
from warmserve.core.policy import EngineLoad, PolicyParams, WarmServePolicy
from warmserve.core.types import GB, Demand, ModelProfile, NodeSpec

GPU_BYTES = int(80 * GB * 0.9)
GPUS_PER_NODE = 8
WINDOW_S = 300.0
WINDOWS_PER_DAY = 288
ALPHA = 0.5
ENGINE_GPU_SHARE = 0.5  # engines at the mean load use about this share of the GPUs
IDLE_SHARE = 0.2  # share of the models idle in any one window
IDLE_FLIP = 0.1  # chance an idle model wakes up in a window (and a matching chance that a busy one idles)
MAX_BATCH = 32
# (class, fp16 weight bytes, TP choices, share of the models)
MODEL_CLASSES = (
    ("7b", 14 * GB, (1,), 0.40),
    ("13b", 26 * GB, (1, 2), 0.25),
    ("34b", 68 * GB, (2, 4), 0.20),
    ("70b", 140 * GB, (4, 8), 0.15),
)


@dataclass
class Workload:
    profiles: dict[str, ModelProfile]
    base: np.ndarray  # mean concurrency per model
    phase: np.ndarray  # diurnal phase per model (radians)
    burst: np.ndarray  # peak / avg per model
    rng: np.random.Generator
    idle: np.ndarray | None = None  # which models are idle now (sticky: a model flips with IDLE_FLIP a window)

    def demand(self, window: int) -> dict[str, Demand]:
        """The forecast of one window: diurnal × noise, some models idle."""
        names = list(self.profiles)
        day = 2 * math.pi * window / WINDOWS_PER_DAY
        diurnal = 1.0 + 0.6 * np.sin(day + self.phase)
        noise = self.rng.lognormal(0.0, 0.25, len(names))
        avg = self.base * diurnal * noise
        if self.idle is None:
            self.idle = self.rng.random(len(names)) < IDLE_SHARE
        else:  # a two-state Markov chain whose stationary idle share is IDLE_SHARE
            flip = self.rng.random(len(names))
            wake = self.idle & (flip < IDLE_FLIP)
            sleep = ~self.idle & (flip < IDLE_FLIP * IDLE_SHARE / (1 - IDLE_SHARE))
            self.idle = (self.idle & ~wake) | sleep
        idle = self.idle
        peak = avg * self.burst * self.rng.uniform(0.9, 1.1, len(names))
        small_peak = self.rng.random(len(names)) < 0.3
        demand = {}
        for i, name in enumerate(names):
            if idle[i]:
                demand[name] = Demand(0.0, float(self.rng.uniform(1, 20)) if small_peak[i] else 0.0)
            else:
                demand[name] = Demand(float(avg[i]), float(peak[i]))
        return demand


def build_workload(models: int, gpus: int, seed: int, engine_share: float = ENGINE_GPU_SHARE) -> Workload:
    rng = np.random.default_rng(seed)
    shares = np.array([c[3] for c in MODEL_CLASSES])
    kinds = rng.choice(len(MODEL_CLASSES), size=models, p=shares / shares.sum())
    profiles: dict[str, ModelProfile] = {}
    for i, kind in enumerate(kinds):
        label, nbytes, tp_choices, _ = MODEL_CLASSES[kind]
        name = f"m{i:03d}-{label}"
        profiles[name] = ModelProfile(
            name,
            weight_bytes=int(nbytes * rng.uniform(0.95, 1.05)),
            tp=int(rng.choice(tp_choices)),
            max_batch=MAX_BATCH,
            priority=2.0 if rng.random() < 0.05 else 1.0,
        )
    popularity = (np.arange(models) + 1.0) ** -ALPHA
    popularity = popularity[rng.permutation(models)] / popularity.sum()
    upper = PolicyParams().autoscaler.upper
    tps = np.array([p.tp for p in profiles.values()])

    def engine_gpus(total: float) -> int:
        return int(sum(math.ceil(total * w / (MAX_BATCH * upper)) * tp for w, tp in zip(popularity, tps, strict=True)))

    # bisection: the total concurrency whose engines (of the models not idle) fill ENGINE_GPU_SHARE of the GPUs
    target = engine_share * gpus / (1 - IDLE_SHARE)
    if engine_gpus(1e-9) >= target:
        raise SystemExit(
            f"{models} models need {engine_gpus(1e-9)} GPUs for one engine each, more than --engine-share "
            f"{engine_share} of {gpus} GPUs allows: use more GPUs, fewer models or a larger --engine-share"
        )
    low, high = 0.0, float(gpus * MAX_BATCH)
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if engine_gpus(mid) < target else (low, mid)
    return Workload(
        profiles=profiles,
        base=low * popularity,
        phase=rng.uniform(0, 2 * math.pi, models),
        burst=rng.uniform(1.1, 4.0, models),
        rng=rng,
    )


def build_cluster(gpus: int) -> ClusterState:
    if gpus % GPUS_PER_NODE:
        raise SystemExit(f"--gpus must be a multiple of {GPUS_PER_NODE}")
    return ClusterState(NodeSpec(f"node{n}", GPUS_PER_NODE, GPU_BYTES) for n in range(gpus // GPUS_PER_NODE))


@dataclass
class Step:
    place_ms: float
    place_cpu_ms: float
    decision: PlacementDecision
    dropped: int  # evictions of replicas beyond their model's slots (score 0); the rest made room
    choose_ms: list[float]
    lend_ms: float


def control_step(state: ClusterState, policy: WarmServePolicy, demand: dict[str, Demand], now: float) -> Step:
    """One window of the control loop, as the simulator runs it; only ``place`` is the timed decision."""
    choose_ms: list[float] = []
    for name, profile in policy.profiles.items():  # reactive autoscaler on the load that materialises
        load = demand[name].avg
        instances = state.instances_of(name)
        per_engine = load / len(instances) if instances else 0.0
        views = [EngineView(i.iid, i.started_at, round(per_engine)) for i in instances]
        scale = policy.scale(now, name, load, views)
        for iid in scale.stop:
            state.stop_instance(iid)  # the weights stay as a warm replica
        for _ in range(scale.start):
            t0 = time.perf_counter()
            choice = policy.choose_group(state, name)
            choose_ms.append((time.perf_counter() - t0) * 1e3)
            if choice is None:
                break
            state.start_instance(name, choice[0], profile.shard_bytes, now).instance.phase = EnginePhase.SERVING
    loads = {}
    for iid, instance in state.instances.items():
        profile = policy.profiles[instance.model]
        engines = len(state.instances_of(instance.model))
        in_flight = min(profile.max_batch, round(demand[instance.model].avg / engines))
        kv_capacity = GPU_BYTES - instance.weight_bytes_per_gpu
        loads[iid] = EngineLoad(in_flight, kv_capacity * in_flight // (2 * profile.max_batch))
    t0 = time.perf_counter()
    lend = policy.lend(state, loads)
    lend_ms = (time.perf_counter() - t0) * 1e3
    for rid in lend.evict:
        state.evict(rid)
    for gpu, nbytes in lend.lent.items():
        state.set_lent(gpu, nbytes)

    dropped = len(beyond_slots(state, policy, demand))
    t0, c0 = time.perf_counter(), time.process_time()
    decision = policy.place(state, demand)
    place_ms, place_cpu_ms = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3

    for rid in decision.evict:
        state.evict(rid)
    for new in decision.add:
        replica = state.add_replica(new.model, new.group, new.bytes_per_gpu)
        policy.record_added(replica.rid, new.score)
    for rid in list(state.replicas):  # loads finish inside the window
        state.mark_warm(rid)
    return Step(place_ms, place_cpu_ms, decision, dropped, choose_ms, lend_ms)


def beyond_slots(state: ClusterState, policy: WarmServePolicy, demand: dict[str, Demand]) -> set[int]:
    """Replicas the placement drops for score 0, by the rule of its docstring (not timed)."""
    running = Counter(i.model for i in state.instances.values() if i.phase != EnginePhase.DRAINING)
    dropped = set()
    for name in {r.model for r in state.replicas.values()}:
        profile = policy.profiles[name]
        slots = replica_slots(profile, demand.get(name, Demand(0.0, 0.0)), running[name], policy.params.placement)
        ordered = sorted(state.replicas_of(name), key=lambda r: (not r.warm, state.group_has_engine(r.group), r.rid))
        dropped |= {r.rid for r in ordered[len(slots) :]}
    return dropped


def describe_state(state: ClusterState) -> dict:
    roles = Counter(state.role(g).value for g in state.all_gpus())
    return {
        "replicas": len(state.replicas),
        "engines": len(state.instances),
        "gpus_idle": roles.get(Role.IDLE.value, 0),
        "gpus_universal": roles.get(Role.UNIVERSAL.value, 0),
        "gpus_dedicated": roles.get(Role.DEDICATED.value, 0),
        "replicas_in_lent_space": sum(1 for r in state.replicas.values() if state.group_has_engine(r.group)),
    }


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


def measure(
    gpus: int,
    models: int,
    rounds: int = 200,
    warmup: int = 24,
    cold_repeats: int = 5,
    seed: int = 0,
    engine_share: float = ENGINE_GPU_SHARE,
    profiler: cProfile.Profile | None = None,
    operator_gc: bool = True,
) -> dict:
    """Time ``rounds`` steady placement rounds (and ``cold_repeats`` cold ones); the JSON of ``--json``.

    ``operator_gc``: set up the garbage collector as the operator's process does (`runtime.configure_gc`:
    start-up objects frozen, young collections every 50,000 allocations) while it runs, so that a round is
    timed as the operator runs it (Python's settings are restored afterwards); False keeps Python's defaults,
    under which full collections of the cluster's objects land in some rounds.
    """
    saved = gc.get_threshold()
    if operator_gc:
        configure_gc()
    try:
        return _measure(gpus, models, rounds, warmup, cold_repeats, seed, engine_share, profiler, operator_gc)
    finally:
        gc.set_threshold(*saved)
        gc.unfreeze()


def _measure(
    gpus: int,
    models: int,
    rounds: int,
    warmup: int,
    cold_repeats: int,
    seed: int,
    engine_share: float,
    profiler: cProfile.Profile | None,
    operator_gc: bool,
) -> dict:
    build_cluster(gpus)  # validates --gpus before anything else
    workload = build_workload(models, gpus, seed, engine_share)
    policy = WarmServePolicy(workload.profiles)

    first_demand = workload.demand(0)
    cold_ms, cold_cpu_ms, cold_decision = [], [], None
    for _ in range(cold_repeats):
        empty = build_cluster(gpus)
        t0, c0 = time.perf_counter(), time.process_time()
        cold_decision = policy.place(empty, first_demand)
        cold_ms.append((time.perf_counter() - t0) * 1e3)
        cold_cpu_ms.append((time.process_time() - c0) * 1e3)

    state = build_cluster(gpus)
    now = 0.0
    for window in range(warmup):
        control_step(state, policy, first_demand if window == 0 else workload.demand(window), now)
        now += WINDOW_S
    start_state = describe_state(state)

    steps: list[Step] = []
    for window in range(warmup, warmup + rounds):
        demand = workload.demand(window)
        if profiler is not None:
            profiler.enable()
        steps.append(control_step(state, policy, demand, now))
        if profiler is not None:
            profiler.disable()
        now += WINDOW_S
        state.check_invariants()

    times = [s.place_ms for s in steps]
    choose = [t for s in steps for t in s.choose_ms]
    slots_total = sum(len(s.decision.add) + len(s.decision.kept) + len(s.decision.unplaced) for s in steps)
    result = {
        "gpus": gpus,
        "models": models,
        "nodes": gpus // GPUS_PER_NODE,
        "gpu_arena_bytes": GPU_BYTES,
        "seed": seed,
        "engine_share": engine_share,
        "rounds": rounds,
        "warmup_rounds": warmup,
        "operator_gc": operator_gc,
        "p50_ms": percentile(times, 50),
        "p99_ms": percentile(times, 99),
        "max_ms": max(times),
        "mean_ms": float(np.mean(times)),
        "cpu_p50_ms": percentile([s.place_cpu_ms for s in steps], 50),
        "cpu_p99_ms": percentile([s.place_cpu_ms for s in steps], 99),
        "cold_p50_ms": percentile(cold_ms, 50),
        "cold_max_ms": max(cold_ms),
        "cold_cpu_p50_ms": percentile(cold_cpu_ms, 50),
        "cold_cpu_max_ms": max(cold_cpu_ms),
        "cold_replicas_placed": len(cold_decision.add) if cold_decision else 0,
        "cold_replicas_unplaced": len(cold_decision.unplaced) if cold_decision else 0,
        "per_round": {
            "added_mean": float(np.mean([len(s.decision.add) for s in steps])),
            "added_max": max(len(s.decision.add) for s in steps),
            "evicted_mean": float(np.mean([len(s.decision.evict) for s in steps])),
            "dropped_mean": float(np.mean([s.dropped for s in steps])),
            "evicted_for_room_mean": float(np.mean([len(s.decision.evict) - s.dropped for s in steps])),
            "kept_mean": float(np.mean([len(s.decision.kept) for s in steps])),
            "unplaced_mean": float(np.mean([len(s.decision.unplaced) for s in steps])),
            "slots_mean": slots_total / len(steps),
        },
        "state_before_timing": start_state,
        "state_after_timing": describe_state(state),
        "choose_group_ms": {"calls": len(choose), "p50": percentile(choose, 50), "p99": percentile(choose, 99)},
        "lend_ms": {
            "p50": percentile([s.lend_ms for s in steps], 50),
            "p99": percentile([s.lend_ms for s in steps], 99),
        },
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
    }

    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=1024)
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=200, help="timed steady-state placement rounds")
    parser.add_argument("--warmup", type=int, default=24, help="control steps before timing (2 hours)")
    parser.add_argument("--cold-repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--engine-share",
        type=float,
        default=ENGINE_GPU_SHARE,
        help="share of the GPUs the engines take at the mean load (higher: more memory pressure)",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--profile", action="store_true", help="cProfile the timed rounds, print the top 25")
    parser.add_argument(
        "--default-gc", action="store_true", help="keep Python's garbage-collector settings (default: the operator's)"
    )
    args = parser.parse_args(argv)

    profiler = cProfile.Profile() if args.profile else None
    result = measure(
        args.gpus,
        args.models,
        args.rounds,
        args.warmup,
        args.cold_repeats,
        args.seed,
        args.engine_share,
        profiler,
        operator_gc=not args.default_gc,
    )
    rows = [
        ("steady round (place)", f"{result['p50_ms']:.1f}", f"{result['p99_ms']:.1f}", f"{result['max_ms']:.1f}"),
        ("steady round, CPU time", f"{result['cpu_p50_ms']:.1f}", f"{result['cpu_p99_ms']:.1f}", "-"),
        ("cold round (empty cluster)", f"{result['cold_p50_ms']:.1f}", "-", f"{result['cold_max_ms']:.1f}"),
        (
            "choose_group (per call)",
            f"{result['choose_group_ms']['p50']:.2f}",
            f"{result['choose_group_ms']['p99']:.2f}",
            "-",
        ),
        ("lend (per round)", f"{result['lend_ms']['p50']:.2f}", f"{result['lend_ms']['p99']:.2f}", "-"),
    ]
    print(
        f"placement: {args.gpus} GPUs ({result['nodes']} nodes × 8, 72 GB arena), {args.models} models, "
        f"{args.rounds} timed rounds after {args.warmup} warm-up, seed {args.seed}"
    )
    print(f"{'':28s} {'p50 ms':>9s} {'p99 ms':>9s} {'max ms':>9s}")
    for label, p50, p99, top in rows:
        print(f"{label:28s} {p50:>9s} {p99:>9s} {top:>9s}")
    pr = result["per_round"]
    print(
        f"per steady round: {pr['added_mean']:.1f} added (max {pr['added_max']}), {pr['evicted_mean']:.1f} evicted "
        f"({pr['dropped_mean']:.1f} dropped for score 0, {pr['evicted_for_room_mean']:.1f} to make room), "
        f"{pr['kept_mean']:.1f} kept, {pr['unplaced_mean']:.1f} unplaced"
    )
    print(f"cold round: {result['cold_replicas_placed']} replicas placed, {result['cold_replicas_unplaced']} unplaced")
    s = result["state_after_timing"]
    print(
        f"state: {s['engines']} engines, {s['replicas']} warm replicas ({s['replicas_in_lent_space']} in lent KV), "
        f"GPUs idle/universal/dedicated = {s['gpus_idle']}/{s['gpus_universal']}/{s['gpus_dedicated']}"
    )
    verdict = "meets" if result["p99_ms"] < 50 else "MISSES"
    print(f"target p99 < 50 ms: {verdict}")
    if profiler:
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(25)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
