"""Run a set of policies on one scenario and present the results: table, JSON and plot."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TextIO

import numpy as np

from warmserve.sim.costs import CostModel
from warmserve.sim.engine import POLICIES, SimResult, Simulation
from warmserve.sim.scenarios import Scenario
from warmserve.workload.build import build_workload


@dataclass
class Comparison:
    scenario: Scenario
    costs: CostModel
    forecaster: str
    results: dict[str, SimResult]
    initial: str = "empty"

    def to_json(self) -> dict:
        wl = self.scenario.workload
        return {
            "scenario": {
                "name": self.scenario.name,
                "nodes": [asdict(n) for n in self.scenario.nodes],
                "models": [asdict(m) for m in self.scenario.models],
                "workload": asdict(wl),
                "window_s": self.scenario.window_s,
                "ttft_slo_s": self.scenario.ttft_slo_s,
                "forecaster": self.forecaster,
                "initial": self.initial,
                "costs": asdict(self.costs),
                "notes": dict(self.scenario.notes),
            },
            "policies": {name: r.summary(self.scenario.ttft_slo_s) for name, r in self.results.items()},
        }


class ProgressBar:
    """A one-line progress bar on stderr (no dependency; silent when stderr is not a terminal and quiet)."""

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 30) -> None:
        self.label, self.stream, self.width = label, stream or sys.stderr, width
        self.last = -1

    def __call__(self, fraction: float) -> None:
        interactive = self.stream.isatty()
        step = 1 if interactive else 25  # a log file gets a line per quarter, a terminal a live bar
        percent = int(fraction * 100) // step * step
        if percent == self.last:
            return
        self.last = percent
        filled = int(fraction * self.width)
        bar = f"{self.label:<24} [{'#' * filled}{'.' * (self.width - filled)}] {percent:3d}%"
        self.stream.write(f"\r{bar}" if interactive else f"{bar}\n")
        if interactive and percent >= 100:
            self.stream.write("\n")
        self.stream.flush()


def compare(
    scenario: Scenario,
    policies: Iterable[str] = POLICIES,
    costs: CostModel | None = None,
    forecaster: str = "csp",
    progress: Callable[[str], Callable[[float], None] | None] | None = None,
    initial: str = "empty",
) -> Comparison:
    """Simulate every policy on the same workload (built once, so the comparison is paired)."""
    costs = costs or CostModel()
    workload = build_workload(scenario.workload)
    results = {}
    for policy in policies:
        simulation = Simulation(scenario, workload, policy, costs=costs, forecaster=forecaster, initial=initial)
        results[policy] = simulation.run(progress(policy) if progress else None)
    return Comparison(scenario, costs, forecaster, results, initial)


COLUMNS = (
    ("policy", "{}", "policy"),
    ("TTFT p50", "{:.3f}", "ttft_p50_s"),
    ("p95", "{:.3f}", "ttft_p95_s"),
    ("p99", "{:.3f}", "ttft_p99_s"),
    ("p99.9", "{:.3f}", "ttft_p999_s"),
    ("<100ms", "{:.1%}", "ttft_under_100ms"),
    ("SLO", "{:.1%}", "slo_attainment"),
    ("GPU-h", "{:.1f}", "gpu_hours"),
    ("hit rate", "{:.0%}", "prewarm_hit_rate"),
    ("starts", "{}", "starts"),
    ("wasted GB", "{:.0f}", "wasted_prewarm_gb"),
)


def format_table(comparison: Comparison) -> str:
    rows = []
    for name, result in comparison.results.items():
        summary = result.summary(comparison.scenario.ttft_slo_s)
        summary["policy"] = name
        summary["starts"] = sum(summary["engine_starts"].values())
        rows.append([fmt.format(summary[key]) for _, fmt, key in COLUMNS])
    headers = [title for title, _, _ in COLUMNS]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        padded = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded)

    header = line(headers)
    out = [header, "-" * len(header), *(line(row) for row in rows)]
    slo = comparison.scenario.ttft_slo_s
    out.append(f"TTFT in seconds; SLO = TTFT ≤ {slo:g} s; GPU-h = GPU-hours held by engines during the replay.")
    return "\n".join(out)


def write_json(comparison: Comparison, path: Path) -> None:
    path.write_text(json.dumps(comparison.to_json(), indent=2, sort_keys=False) + "\n")


def write_plot(comparison: Comparison, path: Path) -> None:
    """TTFT CDFs (log scale) of every policy, and p99 TTFT against GPU-hours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cdf, cost) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, result in comparison.results.items():
        ttft = np.sort(result.ttft)
        cdf.plot(ttft, np.arange(1, ttft.size + 1) / ttft.size, label=name)
        summary = result.summary(comparison.scenario.ttft_slo_s)
        cost.scatter(summary["gpu_hours"], summary["ttft_p99_s"], s=40)
        cost.annotate(
            name, (summary["gpu_hours"], summary["ttft_p99_s"]), fontsize=8, xytext=(4, 4), textcoords="offset points"
        )
    cdf.set_xscale("log")
    cdf.set_xlabel("TTFT (s)")
    cdf.set_ylabel("share of requests")
    cdf.axvline(0.1, color="grey", lw=0.8, ls=":")
    cdf.set_ylim(0.8, 1.001)
    cdf.set_xlim(left=0.01)
    cdf.legend(fontsize=8)
    cdf.set_title("TTFT distribution (tail)")
    cost.set_yscale("log")
    cost.set_xlabel("GPU-hours")
    cost.set_ylabel("p99 TTFT (s)")
    cost.set_title("tail latency against cost")
    wl = comparison.scenario.workload
    fig.suptitle(f"{comparison.scenario.name}: {wl.n_models} models, {wl.rps:g} RPS, α={wl.alpha:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass(frozen=True)
class Sweep:
    """A grid of cost settings, and the two policies whose p99 / p99.9 ratio it shows at each point."""

    name: str
    columns: tuple[tuple[str, str, float], ...]  # (heading, CostModel field, unit the table shows it in)
    points: tuple[dict[str, float], ...]  # CostModel fields changed at each point
    policies: tuple[str, str]


SWEEPS = (
    Sweep(
        "startup",
        (("engine start (s)", "engine_start_s", 1.0), ("load (GB/s)", "load_bandwidth", 1e9)),
        tuple(
            {"engine_start_s": start, "load_bandwidth": gbps * 1e9}
            for start in (1.0, 3.0, 10.0, 20.0, 30.0)
            for gbps in (12.5, 25.0, 50.0)
        ),
        ("warmserve", "autoscale"),
    ),
    Sweep(
        "contention",
        (("share contention", "share_contention", 1.0),),
        tuple({"share_contention": c} for c in (0.0, 0.25, 0.5, 0.75, 1.0)),
        ("warmserve", "gpu-share"),
    ),
)


def sensitivity(
    scenario: Scenario,
    sweep: Sweep,
    costs: CostModel | None = None,
    forecaster: str = "csp",
    progress: Callable[[str], None] | None = None,
    initial: str = "empty",
) -> list[dict]:
    """TTFT summaries of the sweep's two policies at every point of its grid (other costs from ``costs``)."""
    workload = build_workload(scenario.workload)
    rows = []
    for changes in sweep.points:
        point = replace(costs or CostModel(), **changes)
        row: dict = {"costs": changes}
        for policy in sweep.policies:
            simulation = Simulation(scenario, workload, policy, costs=point, forecaster=forecaster, initial=initial)
            row[policy] = simulation.run().summary(scenario.ttft_slo_s)
        rows.append(row)
        if progress:
            progress(f"{sweep.name}: " + ", ".join(f"{h} {changes[f] / unit:g}" for h, f, unit in sweep.columns))
    return rows


def format_sensitivity(rows: list[dict], sweep: Sweep) -> str:
    a, b = sweep.policies
    header = " ".join(h for h, _, _ in sweep.columns) + (
        f" {a + ' p99':>14} {b + ' p99':>14} {'ratio':>7} {a + ' p99.9':>16} {b + ' p99.9':>16} {'ratio':>7}"
    )
    out = [header, "-" * len(header)]
    for row in rows:
        settings = " ".join(f"{row['costs'][field] / unit:>{len(h)}g}" for h, field, unit in sweep.columns)
        pa, pb = row[a]["ttft_p99_s"], row[b]["ttft_p99_s"]
        qa, qb = row[a]["ttft_p999_s"], row[b]["ttft_p999_s"]
        out.append(f"{settings} {pa:>14.3f} {pb:>14.3f} {pb / pa:>6.1f}× {qa:>16.3f} {qb:>16.3f} {qb / qa:>6.1f}×")
    return "\n".join(out)
