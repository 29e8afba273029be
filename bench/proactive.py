"""When does proactive prewarming (lending running engines' idle KV space) decide a promotion?

Runs ``warmserve`` and ``warmserve-noproactive`` side by side on the same workload in three settings and
counts, besides TTFT, the replicas prewarmed into lent KV space and the engines promoted from them:

* ``paper``: the paper scenario (2 × 8 × 80 GB, four Llama-2 models, 15 RPS, first 20 minutes);
* ``paper-30rps``: the same at twice the rate, where engines hold nearly every GPU;
* ``pressure``: more models than GPUs — twelve Llama-2-7B models on one node of 8 × 40 GB at 3 RPS, an
  hour of the afternoon from a running system — where idle GPU memory is scarce.

Prints a table and writes JSON ``{setting: {policy: summary}}`` (the simulator's summary keys, including
``lent_kv_replicas`` and ``lent_kv_promotions``).

    python bench/proactive.py --json proactive.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from warmserve.core.types import GB, ModelProfile, NodeSpec
from warmserve.sim.engine import Simulation
from warmserve.sim.scenarios import ARENA_FRACTION, LLAMA2_7B, Scenario, paper
from warmserve.workload.build import build_workload

POLICIES = ("warmserve", "warmserve-noproactive")


def pressure(models: int = 12, gpus: int = 8, gpu_gb: int = 40, rps: float = 3.0) -> Scenario:
    """More 7B models than 40 GB GPUs: a running engine's GPU has room for one more replica only in its KV."""
    base = paper()
    return replace(
        base,
        name="pressure",
        nodes=(NodeSpec("node-0", gpus, int(gpu_gb * GB * ARENA_FRACTION)),),
        models=tuple(ModelProfile(f"llama-2-7b-{i}", **LLAMA2_7B) for i in range(models)),
    ).with_workload(n_models=models, rps=rps, replay_start_s=16 * 3600, replay_s=3600)


SETTINGS = {
    "paper": (paper(), "empty"),
    "paper-30rps": (paper().with_workload(rps=30.0), "empty"),
    "pressure": (pressure(), "steady"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of the settings")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    results: dict[str, dict[str, dict]] = {}
    for name in args.settings.split(","):
        if name not in SETTINGS:
            parser.error(f"unknown setting {name!r}; choose from {', '.join(SETTINGS)}")
        scenario, initial = SETTINGS[name]
        workload = build_workload(scenario.workload)
        results[name] = {}
        for policy in POLICIES:
            result = Simulation(scenario, workload, policy, initial=initial).run()
            results[name][policy] = result.summary(scenario.ttft_slo_s)
            print(f"[{time.perf_counter() - started:6.1f}s] {name} {policy}", file=sys.stderr)

    header = (
        f"{'setting':<12} {'policy':<22} {'p99':>7} {'p99.9':>7} {'<100ms':>7} {'hits':>5} {'starts':>6}"
        f" {'lent replicas':>13} {'promoted from lent':>18}"
    )
    print(header)
    print("-" * len(header))
    for name, by_policy in results.items():
        for policy, s in by_policy.items():
            starts = s["engine_starts"]
            print(
                f"{name:<12} {policy:<22} {s['ttft_p99_s']:>7.3f} {s['ttft_p999_s']:>7.3f}"
                f" {s['ttft_under_100ms']:>7.1%} {starts['hit']:>5} {sum(starts.values()):>6}"
                f" {s['lent_kv_replicas']:>13} {s['lent_kv_promotions']:>18}"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
