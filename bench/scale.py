"""Scaling benchmark: placement, the operator's pool round and the simulator, swept over cluster sizes.

    python bench/scale.py --json scale.json [--rounds 200] [--operator-rounds 200] [--skip-sim]

What it runs, one after another in this process (nothing else should run on the machine meanwhile):

* **Placement** (`bench/placement.py`'s `measure`): GPUs ∈ {256, 1,024, 4,096} × models ∈ {50, 200, 800},
  ``--rounds`` steady rounds after 24 warm-up windows, seed 0, engines at the mean load on half of the
  GPUs. A size whose models need more GPUs than that for one engine each is reported as skipped, with the
  reason. Per size: CPU-time p50/p99 of a steady round (`WarmServePolicy.place`), its wall-clock p99, what
  the state held (warm replicas, engines), and the cold round (every replica new) in CPU time.
* **Growth exponents**: least-squares slope of log(steady p50 CPU time) against log(GPUs), with one
  intercept per model count (so sizes of different model counts are compared only through their GPUs), over
  every size measured; the same against log(warm replicas + engines), the state a round visits.
* **Simulator**: the 24-hour paper replay with every policy, as `warmserve simulate --hours 24` runs it (wall
  seconds, policies in one process per CPU), and requests per CPU second of each policy run alone
  (`bench/sim_throughput.py`'s `measure`).
* **Operator round** (`bench/operator_loop.py`'s `run`, the whole pool round): {64, 512} workers × 8 GPUs ×
  100 models, ``--operator-rounds`` rounds: p50/p99/max CPU time (and wall p99). Last, because it sets up the
  garbage collector as the operator's process does (`runtime.configure_gc`), for this whole process.

Prints a table per part and writes JSON with the keys ``placement["<gpus>x<models>"].{p50_ms, p99_ms,
wall_p99_ms, cold_ms, warm_replicas, engines}`` (or ``.skipped``), ``placement_cold_ms["<gpus>"]`` (the
largest model count measured at that size), ``placement_exponent_gpus``, ``placement_exponent_state``,
``operator_round["<workers>x8"].{p50_ms, p99_ms, max_ms, wall_p99_ms, rounds}``, ``sim_day_all_policies_s``,
``sim_requests_per_s`` (per policy) and ``sim_requests_per_s_min``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # the sibling benchmarks

import operator_loop  # noqa: E402  (siblings: bench/ is on the path from here on)
import placement  # noqa: E402
import sim_throughput  # noqa: E402

GPUS = (256, 1024, 4096)
MODELS = (50, 200, 800)
WORKERS = (64, 512)


def sweep_placement(gpu_sizes, model_counts, rounds: int, warmup: int, log) -> dict:
    out: dict[str, dict] = {}
    for gpus in gpu_sizes:
        for models in model_counts:
            key = f"{gpus}x{models}"
            log(f"placement {key} ...")
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    r = placement.measure(gpus, models, rounds=rounds, warmup=warmup, cold_repeats=3)
            except SystemExit as exc:  # the workload cannot give every model an engine on that many GPUs
                out[key] = {"skipped": str(exc)}
                continue
            state = r["state_after_timing"]
            out[key] = {
                "p50_ms": r["cpu_p50_ms"],
                "p99_ms": r["cpu_p99_ms"],
                "wall_p99_ms": r["p99_ms"],
                "cold_ms": r["cold_cpu_p50_ms"],
                "warm_replicas": state["replicas"],
                "engines": state["engines"],
                "rounds": rounds,
            }
    return out


def growth_exponent(rows: dict[str, dict], size_of) -> float:
    """Slope of log(p50) on log(size), one intercept per model count (least squares)."""
    points = [(int(k.split("x")[1]), size_of(k, r), r["p50_ms"]) for k, r in rows.items() if "p50_ms" in r]
    if len({size for _, size, _ in points}) < 2:
        return float("nan")  # fewer than two sizes measured: no growth to fit
    groups = sorted({m for m, _, _ in points})
    x = np.array([[np.log(size)] + [float(m == g) for g in groups] for m, size, _ in points])
    y = np.log([p50 for _, _, p50 in points])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return float(coef[0])


def operator_rounds(worker_counts, rounds: int, log) -> dict:
    out = {}
    for workers in worker_counts:
        log(f"operator round {workers}x8 ...")
        r = operator_loop.run(workers=workers, gpus=8, n_models=100, rounds=rounds, warmup=10, seed=0)
        out[f"{workers}x8"] = {k: r[k] for k in ("p50_ms", "p99_ms", "max_ms", "wall_p99_ms", "rounds") if k in r}
    return out


def simulator(log) -> dict:
    from warmserve.sim import report
    from warmserve.sim.engine import POLICIES
    from warmserve.sim.scenarios import paper

    log("simulator: 24 h paper replay, every policy ...")
    scenario = paper().with_workload(replay_s=86400)
    began = time.perf_counter()
    report.compare(scenario, POLICIES)
    day_s = time.perf_counter() - began
    log("simulator: requests per CPU second, each policy alone ...")
    measured = sim_throughput.measure(list(POLICIES), hours=24, start_hour=0, seed=0)
    per_policy = {p: row["requests_per_s"] for p, row in measured["policies"].items()}
    return {
        "sim_day_all_policies_s": day_s,
        "sim_workers": os.cpu_count() or 1,
        "sim_requests_per_s": per_policy,
        "sim_requests_per_s_min": min(per_policy.values()),
    }


def format_tables(result: dict) -> str:
    lines = ["placement, CPU ms per round", f"{'GPUs x models':>14} {'p50':>7} {'p99':>7} {'cold':>7} {'state':>12}"]
    for key, r in result["placement"].items():
        if "skipped" in r:
            lines.append(f"{key:>14}  skipped: {r['skipped'].splitlines()[0][:90]}")
        else:
            state = f"{r['warm_replicas']}+{r['engines']}"
            lines.append(f"{key:>14} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['cold_ms']:>7.1f} {state:>12}")
    lines.append(
        f"growth exponent: in GPUs {result['placement_exponent_gpus']:.2f}, in warm replicas + engines "
        f"{result['placement_exponent_state']:.2f}"
    )
    if "operator_round" in result:
        lines.append("operator round (pool round, no API latency), CPU ms")
        for key, r in result["operator_round"].items():
            lines.append(
                f"{key:>14} p50 {r['p50_ms']:.1f}  p99 {r['p99_ms']:.1f}  max {r['max_ms']:.1f}  ({r['rounds']} rounds)"
            )
    if "sim_day_all_policies_s" in result:
        lines.append(
            f"simulator: 24 h paper replay, {len(result['sim_requests_per_s'])} policies: "
            f"{result['sim_day_all_policies_s']:.1f} s wall on {result['sim_workers']} CPUs; requests per CPU "
            f"second, slowest policy: {result['sim_requests_per_s_min']:.0f}"
        )
    return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=_ints, default=GPUS, help="GPU counts (default 256,1024,4096)")
    parser.add_argument("--models", type=_ints, default=MODELS, help="model counts (default 50,200,800)")
    parser.add_argument("--workers", type=_ints, default=WORKERS, help="operator-round workers (default 64,512)")
    parser.add_argument("--rounds", type=int, default=200, help="steady placement rounds per size (default 200)")
    parser.add_argument("--warmup", type=int, default=24, help="control windows before timing (default 24)")
    parser.add_argument("--operator-rounds", type=int, default=200, help="operator rounds per size (default 200)")
    parser.add_argument("--skip-operator", action="store_true")
    parser.add_argument("--skip-sim", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    def log(text: str) -> None:
        print(f"  {text}", file=sys.stderr, flush=True)

    rows = sweep_placement(args.gpus, args.models, args.rounds, args.warmup, log)
    result: dict = {
        "placement": rows,
        "placement_cold_ms": {},
        "placement_exponent_gpus": growth_exponent(rows, lambda key, r: int(key.split("x")[0])),
        "placement_exponent_state": growth_exponent(rows, lambda key, r: r["warm_replicas"] + r["engines"]),
    }
    for gpus in args.gpus:
        measured = [r for k, r in rows.items() if k.startswith(f"{gpus}x") and "cold_ms" in r]
        if measured:
            result["placement_cold_ms"][str(gpus)] = measured[-1]["cold_ms"]
    if not args.skip_sim:
        result |= simulator(log)
    if not args.skip_operator:  # last: it sets up the garbage collector as the operator does, for this process
        result["operator_round"] = operator_rounds(args.workers, args.operator_rounds, log)
    print(format_tables(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
