"""Calibration: the simulator on the scenario bench/e2e.py ran for real, against what that run measured.

    python bench/calibrate.py --e2e e2e.json [--json calibration.json]

`e2e.json` is the report of one full `python bench/e2e.py --json e2e.json` run. From it this command builds a
simulator scenario that mirrors the run, through bench/e2e.py's own code paths:

* **Requests.** `e2e.build_replay` on the run's settings: the same compressed trace slice, per-model requests,
  arrival offsets, prompt lengths (in words, the unit the client sends) and `max_tokens`. The request count
  per model must equal the report's, or the command refuses.
* **Models and pool.** One `ModelProfile` per model with the run's weight bytes and `engine.maxConcurrency`
  as its batch limit; one node of `gpu.count` devices, each with the arena the pool spec gives
  (`e2e.pool_memory_mib`, `PoolSpec.device_arena_bytes`) and the pool's standby engines per worker
  (`spec.worker.standbyEngines`, default: bench/e2e.py does not set it).
* **Forecast and control.** Windows of `forecast.windowSeconds`; the load history the run seeded
  (`e2e.seed_history`) replaces the simulator's own history windows, live windows come from the arrivals
  (Little's law, as the simulator does); a control step every `policy.intervalSeconds`, placing every step
  as the operator's round does; `scaling.maxReplicas` bounds every model; the run's drain time.
* **Policies.** e2e `warmserve` → the simulator's `warmserve-noproactive` (the CPU worker advertises no
  `kvLend`, so the operator lends no KV space); e2e `reactive` (prewarming off) → `reactive-cold` (no warm
  replicas; weights read from storage at every start).

Costs, each printed with its source (the `cpu-measured` table's entry where this run measures none):

* standby bind (`promote_s`): median `ready_s` of the engines the run bound from a standby engine;
* engine launch in a pre-started shell (`prestarted_init_s`): median `ready_s` of the other engines (the
  worker loads the weights into the arena before it launches an engine, so the load is not in it); the
  simulator also prices with it a warm start that finds no ready standby engine, and the time a standby
  engine takes to get ready. Both e2e policies launch engines in pre-started shells, so the reactive
  baseline's start is priced alike (`engine_init_s` = `prestarted_init_s`);
* storage bandwidth: median model bytes over the median weight-load time of the reactive run (every
  engine start there loads its weights);
* service: prefill at `e2e.PAIR_PROMPT_WORDS` words = the median TTFT of the router-overhead requests sent
  straight to an idle engine, linear in the prompt's words (the simulator's model); decode per token = their
  median time to the last token minus that TTFT, over `e2e.PAIR_MAX_TOKENS` - 1 tokens.

The simulator draws nothing at random (the requests are the run's own), so each policy runs once. The table
gives simulated and measured TTFT p50/p99 and engine starts by source (warm hit, replica still loading,
cold), with sim / measured; `> 25 %` marks a difference of more than 25 % (or a count measured as zero and
simulated as not). Printed as Markdown; `--json` writes every figure with the scenario and the cost sources.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import e2e  # noqa: E402  (a sibling module: bench/ is on the path from here on)
from warmserve.controller.forecasts import SCALE_WINDOW_SECONDS  # noqa: E402
from warmserve.controller.history import LoadHistory  # noqa: E402
from warmserve.controller.spec import parse_pool_spec  # noqa: E402
from warmserve.core.policy import StepInput  # noqa: E402
from warmserve.core.types import Demand, ModelProfile, NodeSpec  # noqa: E402
from warmserve.sim.costs import Cost, CostModel, measured_costs  # noqa: E402
from warmserve.sim.engine import SimResult, Simulation  # noqa: E402
from warmserve.sim.scenarios import Scenario, replayed  # noqa: E402
from warmserve.workload.build import Workload  # noqa: E402

SIM_POLICY = {"warmserve": "warmserve-noproactive", "reactive": "reactive-cold"}  # e2e policy → simulator policy
BASE_TABLE = "cpu-measured"  # entries the run does not measure
SOURCES = ("hit", "loading", "cold")
MARGIN = 0.25


@dataclass
class MirroredSimulation(Simulation):
    """The simulator with the two things bench/e2e.py gives its system and a scenario cannot say: the load
    history it seeded (``seeded``, windows indexed as the simulator's history, by model name) and a replica
    bound per model (``scaling.maxReplicas``)."""

    seeded: LoadHistory | None = None
    max_replicas: int | None = None

    def _prepare_load_history(self) -> None:
        super()._prepare_load_history()
        if self.seeded is None:
            return
        for m, name in enumerate(self.names):
            for stat, series in (("avg", self.avg_hist), ("peak", self.peak_hist)):
                seeded, upto = self.seeded.array(name, stat, self.first_window)
                if upto != self.first_window:
                    raise ValueError(f"seeded history of {upto} windows, the simulation's has {self.first_window}")
                series[m] = np.concatenate([seeded, series[m][self.first_window :]])

    def _step_input(self, demand: dict[str, Demand] | None, scale: bool = True) -> StepInput:
        inp = super()._step_input(demand, scale)
        return dataclasses.replace(inp, bounds={name: (0, self.max_replicas) for name in self.names})


@dataclass
class Mirror:
    settings: e2e.Settings
    replay: e2e.Replay
    scenario: Scenario
    workload: Workload
    history: LoadHistory
    standby_engines: int
    costs: CostModel
    cost_table: dict[str, Cost]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def measure_costs(report: Mapping[str, Any]) -> tuple[CostModel, dict[str, Cost], dict[str, Any]]:
    """The cost model priced from the run (see the module docstring), its printed table, and the service
    rates with their sources."""
    runs = report["policies"]
    starts = [e for run in runs.values() for e in run["engine_starts_log"] if e["ready_s"] is not None]
    binds = [e["ready_s"] for e in starts if e["standby"]]
    launches = [e["ready_s"] for e in starts if not e["standby"]]
    here = "bench/e2e.py, this run"
    measured: dict[str, tuple[float, str]] = {}
    if binds:
        measured["promote_s"] = (
            median(binds),
            f"{here}: median ready_s of the {len(binds)} engines bound from a standby engine "
            f"({min(binds):.2f}-{max(binds):.2f} s)",
        )
    if launches:
        launch = median(launches)
        text = (
            f"{here}: median ready_s of the {len(launches)} engines launched in a pre-started shell, weights "
            f"already in the arena ({min(launches):.2f}-{max(launches):.2f} s)"
        )
        measured["prestarted_init_s"] = (launch, text)
        measured["engine_init_s"] = (
            launch,
            f"bench/e2e.py's reactive run launches engines in pre-started shells: {text}",
        )
    weight_bytes = median([m["weight_bytes"] for m in report["models"].values()])
    loads = runs["reactive"]["weight_loads"]
    if loads["n"]:
        measured["storage_bandwidth"] = (
            weight_bytes / loads["p50"],
            f"{here}: median model {weight_bytes / 1e6:.1f} MB over the reactive run's median weight load "
            f"{loads['p50']:.3f} s (n {loads['n']}; warmserve run: {runs['warmserve']['weight_loads']['p50']} s)",
        )
    costs, table = measured_costs(BASE_TABLE, measured)

    overhead = report["router_overhead"]
    ttft, total = overhead["direct_ttft_ms"], overhead["direct_total_ms"]
    where = f"{here}: {ttft['n']} requests of {e2e.PAIR_PROMPT_WORDS} words straight to an idle engine"
    service = {
        "prefill_s": ttft["p50"] / 1e3,
        "prefill_ref_words": e2e.PAIR_PROMPT_WORDS,
        "prefill_source": f"{where}, median TTFT; the simulator scales it linearly with the prompt's words",
        "decode_s_per_token": (total["p50"] - ttft["p50"]) / 1e3 / (e2e.PAIR_MAX_TOKENS - 1),
        "decode_source": f"{where}, median time to the last of {e2e.PAIR_MAX_TOKENS} tokens minus the median TTFT",
    }
    return costs, table, service


def mirror(report: Mapping[str, Any]) -> tuple[Mirror, dict[str, Any]]:
    """The scenario, workload, seeded history and costs that mirror the run; and the service rates."""
    s = e2e.Settings(**report["settings"])
    replay = e2e.build_replay(s)
    counts = {name: int((replay.model_idx == i).sum()) for i, name in enumerate(replay.names)}
    if counts != report["replay"]["requests_per_model"]:
        raise SystemExit(
            f"the replay built here ({counts}) is not the run's ({report['replay']['requests_per_model']}): "
            "different trace files or code"
        )
    weight_bytes = [report["models"][name]["weight_bytes"] for name in replay.names]
    pool = parse_pool_spec({"gpu": {"count": s.devices, "memoryMiB": e2e.pool_memory_mib(weight_bytes)}})
    costs, table, service = measure_costs(report)
    models = tuple(
        ModelProfile(
            name,
            weight_bytes=size,
            max_batch=s.max_concurrency,
            prefill_s=service["prefill_s"],
            prefill_ref_tokens=service["prefill_ref_words"],
            decode_s_per_token=service["decode_s_per_token"],
        )
        for name, size in zip(replay.names, weight_bytes, strict=True)
    )
    history_days = s.season_days + 1  # the pool's historyDays: the seeded windows all lie after the history start
    scenario, workload = replayed(
        "e2e-mirror",
        nodes=(NodeSpec("cpu", pool.devices_per_worker, pool.device_arena_bytes),),
        models=models,
        arrival_s=replay.offsets,
        model_idx=replay.model_idx,
        input_tokens=replay.prompt_words,
        output_tokens=replay.max_tokens,
        replay_s=math.ceil(s.replay_s),
        window_s=s.window_s,
        history_days=history_days,
        notes={
            "requests": f"bench/e2e.py build_replay: {replay.info['slice_utc']} of {replay.info['models']}, "
            f"compressed {s.compress}x; prompt length in words",
            "pool": f"{pool.devices_per_worker} CPU arenas of {pool.device_arena_bytes} B (gpu.memoryMiB "
            f"{pool.gpu.memory_mib} x arenaFraction {pool.worker.arena_fraction})",
            "history": "bench/e2e.py seed_history: the load history the run's forecaster was given",
        },
    )
    history = e2e.seed_history(s, replay, replay.names, history_days * 86400 // s.window_s)
    return Mirror(s, replay, scenario, workload, history, pool.worker.standby_engines, costs, table), service


def simulate(m: Mirror, policy: str) -> SimResult:
    return MirroredSimulation(
        m.scenario,
        m.workload,
        SIM_POLICY[policy],
        costs=m.costs,
        forecaster="csp",  # bench/e2e.py's pool (forecast.kind)
        tick_s=m.settings.interval_s,
        placement_s=m.settings.interval_s,
        scale_window_s=SCALE_WINDOW_SECONDS,
        drain_s=m.settings.drain_s,
        seeded=m.history,
        max_replicas=m.settings.max_replicas,
        standby_per_node=m.standby_engines,
    ).run()


def ratio(simulated: float | None, measured: float | None) -> float | None:
    if simulated is None or measured is None or measured == 0:
        return None
    return simulated / measured


def differs(simulated: float | None, measured: float | None) -> bool:
    """More than MARGIN apart (a count measured as zero differs from any other)."""
    if simulated is None or measured is None:
        return False
    if measured == 0:
        return simulated != 0
    return abs(simulated / measured - 1.0) > MARGIN


def row(policy: str, metric: str, simulated: float | None, measured: float | None) -> dict[str, Any]:
    r = ratio(simulated, measured)
    return {
        "policy": policy,
        "metric": metric,
        "simulated": simulated,
        "measured": measured,
        "ratio": None if r is None else round(r, 3),
        "over_25pct": differs(simulated, measured),
    }


def pct(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if values.size else None


def compare(m: Mirror, report: Mapping[str, Any], results: Mapping[str, SimResult]) -> dict[str, Any]:
    """Rows of the table (overall, then per model) from the simulations and the run."""
    rows, per_model = [], []
    for policy, res in results.items():
        run = report["policies"][policy]
        rows.append(row(policy, "TTFT p50 (s)", pct(res.ttft, 50), run["ttft_p50_s"]))
        rows.append(row(policy, "TTFT p99 (s)", pct(res.ttft, 99), run["ttft_p99_s"]))
        for source in SOURCES:
            sim = sum(n for src, n in res.starts.items() if str(src) == source)
            rows.append(row(policy, f"engine starts: {source}", sim, run[f"promotions_{source}"]))
        for i, name in enumerate(m.replay.names):
            ttft = res.ttft[res.model_idx == i]
            measured = run["per_model"][name]
            per_model.append(row(policy, f"{name} TTFT p50 (s)", pct(ttft, 50), measured["ttft_p50_s"]))
            per_model.append(row(policy, f"{name} TTFT p99 (s)", pct(ttft, 99), measured["ttft_p99_s"]))
    return {"rows": rows, "per_model": per_model}


def calibrate(report: Mapping[str, Any]) -> dict[str, Any]:
    m, service = mirror(report)
    results = {policy: simulate(m, policy) for policy in SIM_POLICY}
    s = m.settings
    seeded = {name: m.history.windows(name) for name in m.replay.names}
    return {
        "e2e": {
            "mode": report["mode"],
            "run_seconds": report.get("run_seconds"),
            "loadavg_1m": {p: report["policies"][p]["loadavg_1m"] for p in SIM_POLICY},
            "completed": {p: report["policies"][p]["completed"] for p in SIM_POLICY},
        },
        "scenario": {
            "models": {
                p.name: {
                    "weight_bytes": p.weight_bytes,
                    "max_batch": p.max_batch,
                    "requests": int((m.workload.model_idx == i).sum()),
                }
                for i, p in enumerate(m.scenario.models)
            },
            "requests": int(m.workload.arrival_s.size),
            "devices": sum(node.gpus for node in m.scenario.nodes),
            "arena_bytes": m.scenario.nodes[0].gpu_bytes,
            "max_replicas": s.max_replicas,
            "standby_engines": m.standby_engines,
            "window_s": m.scenario.window_s,
            "replay_s": m.workload.spec.replay_s,
            "seeded_windows": seeded,
            "tick_s": s.interval_s,
            "drain_s": s.drain_s,
            "policies": SIM_POLICY,
            "notes": m.scenario.notes,
        },
        "costs": {name: dataclasses.asdict(cost) for name, cost in m.cost_table.items()},
        "service": service,
        "simulated": {policy: res.summary(m.scenario.ttft_slo_s) for policy, res in results.items()},
        **compare(m, report, results),
    }


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| e2e policy (simulated as) | metric | simulated | measured | sim / measured | > 25 % |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} ({SIM_POLICY[r['policy']]}) | {r['metric']} | {fmt(r['simulated'])} | "
            f"{fmt(r['measured'])} | {fmt(r['ratio'])} | {'yes' if r['over_25pct'] else ''} |"
        )
    return "\n".join(lines)


def print_report(out: Mapping[str, Any]) -> None:
    sc = out["scenario"]
    print(
        f"scenario: {sc['requests']} requests over {sc['replay_s']} s, models "
        + ", ".join(f"{n} ({v['weight_bytes'] / 1e6:.1f} MB, {v['requests']} req)" for n, v in sc["models"].items())
        + f"; {sc['devices']} devices of {sc['arena_bytes'] / 2**20:.0f} MiB arena; windows {sc['window_s']} s"
    )
    print("\ncosts (simulator units):")
    for name, cost in out["costs"].items():
        print(f"  {name} = {cost['value']:g} {cost['unit']}: {cost['source']}")
    sv = out["service"]
    print(f"  prefill = {sv['prefill_s']:.4f} s per {sv['prefill_ref_words']} words: {sv['prefill_source']}")
    print(f"  decode = {sv['decode_s_per_token']:.4f} s per token: {sv['decode_source']}")
    print("\n" + markdown(out["rows"]))
    print("\nper model:\n" + markdown(out["per_model"]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/calibrate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--e2e", required=True, help="the JSON report of a bench/e2e.py run (full, not --quick)")
    p.add_argument("--json", help="write the calibration (table, scenario, costs with sources) here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with open(args.e2e) as fh:
        report = json.load(fh)
    out = calibrate(report)
    print_report(out)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
