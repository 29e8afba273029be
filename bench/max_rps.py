"""Highest total request rate each policy sustains within a TTFT SLO on the paper scenario.

For each policy, simulates a grid of total rates (same workload construction, same seed) and reports the
largest rate whose p99 TTFT stays at or below the SLO. A grid rather than a bisection, because the p99 of
reactive autoscaling is not monotone in the rate: at low rates each cold start hits a larger share of the
requests. Prints a table and writes JSON
``{"slo_p99_s": x, "policies": {policy: {"max_rps": r, "probes": [[rps, p99], ...]}}}``.

    python bench/max_rps.py --json max_rps.json [--slo 1.0] [--policies warmserve,autoscale,gpu-share]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TypedDict

from warmserve.sim.engine import POLICIES, Simulation
from warmserve.sim.scenarios import paper
from warmserve.workload.build import build_workload


class PolicyResult(TypedDict):
    max_rps: float
    probes: list[list[float]]  # [rps, p99 TTFT] per probed rate


def p99_at(policy: str, rps: float, seed: int) -> float:
    scenario = paper().with_workload(rps=rps, seed=seed)
    result = Simulation(scenario, build_workload(scenario.workload), policy).run()
    return result.summary(scenario.ttft_slo_s)["ttft_p99_s"]


def max_rps(policy: str, slo: float, grid: list[float], seed: int) -> tuple[float, list[list[float]]]:
    """Largest rate of ``grid`` with p99 TTFT ≤ slo (0 if none), and every probe."""
    probes = [[rps, p99_at(policy, rps, seed)] for rps in grid]
    passing = [rps for rps, p99 in probes if p99 <= slo]
    return (max(passing) if passing else 0.0), probes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--slo", type=float, default=1.0, help="p99 TTFT target in seconds (default 1.0)")
    parser.add_argument("--grid", default="2,5,10,15,20,25,30,35,40,45,50", help="total rates to probe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    results: dict[str, PolicyResult] = {}
    started = time.perf_counter()
    for policy in args.policies.split(","):
        rate, probes = max_rps(policy, args.slo, [float(x) for x in args.grid.split(",")], args.seed)
        results[policy] = {"max_rps": rate, "probes": probes}
        print(
            f"[{time.perf_counter() - started:6.1f}s] {policy:<22} max RPS at p99 ≤ {args.slo:g} s: {rate:.1f}",
            file=sys.stderr,
        )
    grid = [rps for rps, _ in next(iter(results.values()))["probes"]]
    print(f"{'policy':<22} {'max RPS':>8}   p99 TTFT (s) at RPS " + " ".join(f"{r:>6g}" for r in grid))
    for policy, row in results.items():
        p99s = " ".join(f"{p99:>6.2f}" if p99 < 100 else f"{p99:>6.0f}" for _, p99 in row["probes"])
        print(f"{policy:<22} {row['max_rps']:>8g}   {'':<19} {p99s}")
    if args.json:
        args.json.write_text(json.dumps({"slo_p99_s": args.slo, "policies": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
