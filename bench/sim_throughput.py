"""Simulator throughput: CPU seconds per simulated request, per policy, on a replay of the paper scenario.

Each policy runs once, in this process, one after another, on the same workload (built once, not timed);
the time is the process's CPU time (``time.process_time``), so a loaded machine slows the wall clock but
not the figure. Prints a table and writes JSON
``{"replay": {...}, "cpus": n, "policies": {policy: {"requests", "cpu_s", "us_per_request",
"requests_per_s"}}, "day": {...}}``.

``day`` extrapolates to the 24-hour replay of the same seed: its request count is built (not simulated),
each measured policy's CPU time is scaled by requests (CPU time also grows with simulated time, through
the control ticks, so a replay of a busy span overestimates a day); ``all_policies_cpu_s`` sums the
measured policies and ``all_policies_wall_s_ideal`` divides it over ``--workers`` processes (no
overhead counted; `warmserve.sim.report.compare` runs policies in parallel).

    python bench/sim_throughput.py --json sim_throughput.json [--hours 2] [--start-hour 16] [--seed 0]
        [--policies warmserve,reactive-cold] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from warmserve.sim.engine import POLICIES, Simulation
from warmserve.sim.scenarios import paper
from warmserve.workload.build import build_workload


def measure(policies: list[str], hours: float, start_hour: float, seed: int) -> dict:
    """CPU time of each policy's run on the replay (workload building excluded)."""
    scenario = paper().with_workload(
        replay_s=round(hours * 3600), replay_start_s=round(start_hour * 3600) % 86400, seed=seed
    )
    workload = build_workload(scenario.workload)
    requests = int(workload.arrival_s.size)
    rows = {}
    for policy in policies:
        began = time.process_time()
        Simulation(scenario, workload, policy).run()
        cpu = time.process_time() - began
        rows[policy] = {
            "requests": requests,
            "cpu_s": cpu,
            "us_per_request": 1e6 * cpu / requests,
            "requests_per_s": requests / cpu,
        }
    return {
        "replay": {
            "scenario": "paper",
            "replay_s": scenario.workload.replay_s,
            "start_s": scenario.workload.replay_start_s,
            "seed": seed,
        },
        "policies": rows,
    }


def extrapolate_day(measured: dict, seed: int, workers: int) -> dict:
    """24-hour request count of the seed (built), and the measured policies' CPU time scaled to it."""
    day = build_workload(paper().with_workload(replay_s=86400, replay_start_s=0, seed=seed).workload)
    requests = int(day.arrival_s.size)
    per_policy = {p: requests / row["requests_per_s"] for p, row in measured["policies"].items()}
    total = sum(per_policy.values())
    return {
        "requests": requests,
        "cpu_s_per_policy": per_policy,
        "all_policies_cpu_s": total,
        "workers": workers,
        "all_policies_wall_s_ideal": total / max(1, min(workers, len(per_policy))),
    }


def format_table(measured: dict, day: dict | None) -> str:
    lines = [f"{'policy':24} {'requests':>9} {'CPU s':>8} {'µs/request':>11} {'requests/s':>11}"]
    for policy, row in measured["policies"].items():
        lines.append(
            f"{policy:24} {row['requests']:>9} {row['cpu_s']:>8.2f} {row['us_per_request']:>11.1f} "
            f"{row['requests_per_s']:>11.0f}"
        )
    replay = measured["replay"]
    lines.append(
        f"paper scenario, {replay['replay_s']} s from {replay['start_s']} s, seed {replay['seed']}; CPU time of "
        "this process, one policy at a time."
    )
    if day is not None:
        lines.append(
            f"24 h ({day['requests']} requests), scaled by requests: {day['all_policies_cpu_s']:.0f} CPU s for the "
            f"{len(day['cpu_s_per_policy'])} policies measured, {day['all_policies_wall_s_ideal']:.0f} s over "
            f"{day['workers']} processes (ideal)."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=2.0, help="replay length (default 2)")
    parser.add_argument("--start-hour", type=float, default=16.0, help="time of day the replay starts (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated (default: every policy)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="for the 24 h estimate")
    parser.add_argument("--no-day", action="store_true", help="skip the 24 h extrapolation")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        parser.error(f"unknown policies: {', '.join(unknown)}")
    measured = measure(policies, args.hours, args.start_hour, args.seed)
    day = None if args.no_day else extrapolate_day(measured, args.seed, args.workers)
    print(format_table(measured, day))
    if args.json:
        args.json.write_text(json.dumps({**measured, "cpus": os.cpu_count(), "day": day}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
