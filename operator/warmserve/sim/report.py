"""Run a set of policies on one scenario and present the results: table, JSON and plot."""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TextIO

import numpy as np

from warmserve.sim.costs import (
    ALL_MECHANISMS,
    DEFAULT_TABLE,
    MECHANISMS,
    CostModel,
    cost_table,
    start_cost,
    table_costs,
)
from warmserve.sim.engine import POLICIES, SimResult, Simulation
from warmserve.sim.scenarios import Scenario
from warmserve.workload.build import Workload, WorkloadSpec, build_workload


@dataclass
class Comparison:
    scenario: Scenario
    costs: CostModel
    forecaster: str
    results: dict[str, SimResult]
    initial: str = "empty"
    cost_table: str = DEFAULT_TABLE  # the table ``costs`` came from (for the sources)

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
                "cost_table": self.cost_table,
                "costs": {name: asdict(cost) for name, cost in cost_table(self.costs, self.cost_table).items()},
                "mechanisms": {name: sorted(MECHANISMS[r.policy]) for name, r in self.results.items()},
                "start_costs_s": {
                    m.name: {k: round(start_cost(k, m.shard_bytes, self.costs), 4) for k in ALL_MECHANISMS}
                    for m in self.scenario.models
                },
                "notes": dict(self.scenario.notes),
            },
            "policies": {name: r.summary(self.scenario.ttft_slo_s) for name, r in self.results.items()},
        }


def _duration(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _columns(stream: TextIO) -> int:
    """The width of the terminal ``stream`` writes to ($COLUMNS first; 80 when unknown)."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns > 0:
        return columns
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, OSError, ValueError):  # no file descriptor (a StringIO), or not a terminal
        return 80


class ProgressBar:
    """The progress of one run on stderr, with the elapsed time and an estimate of the time left (ETA).

    On a terminal a live bar, redrawn in place and fitted to the terminal's width. Anywhere else (a pipe, a
    log file, CI) no bar: one line every ``interval`` seconds while the run lasts and one when it is done, so a
    quick run writes a single line.
    """

    def __init__(
        self,
        label: str,
        stream: TextIO | None = None,
        width: int = 30,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.stream, self.width, self.interval, self.clock = (
            label,
            stream or sys.stderr,
            width,
            interval,
            clock,
        )
        self.interactive = _isatty(self.stream)
        self.started = self.last_write = clock()
        self.last_percent = -1
        self.drawn = 0  # length of the bar on screen, to blank what a shorter redraw leaves
        self.finished = False

    def _times(self, fraction: float, elapsed: float) -> str:
        if fraction >= 1:
            return f"done in {_duration(elapsed)}"
        if fraction < 0.01:  # too early for an estimate
            return f"{_duration(elapsed)} elapsed"
        return f"{_duration(elapsed)} elapsed, ETA {_duration(elapsed * (1 - fraction) / fraction)}"

    def restart(self, at: float) -> None:
        """Count the elapsed time from ``at`` (a ``clock`` reading): the run began before the bar was made."""
        self.started = self.last_write = at

    def __call__(self, fraction: float, at: float | None = None) -> None:
        """Show ``fraction`` done, as of now or of ``at`` (a ``clock`` reading: progress relayed late)."""
        if self.finished:
            return
        fraction = min(max(fraction, 0.0), 1.0)
        now = self.clock() if at is None else at
        percent, done = int(fraction * 100), fraction >= 1
        if self.interactive:
            # a redraw per percent, and twice a second for the clock; never more often than the terminal needs
            if not done and percent == self.last_percent and now - self.last_write < 0.5:
                return
            self._draw(fraction, percent, now)
        else:
            if not done and now - self.last_write < self.interval:
                return
            times = self._times(fraction, now - self.started)
            self.stream.write(f"{self.label:<24} {percent:3d}%  {times}\n")
        self.last_percent, self.last_write, self.finished = percent, now, done
        self.stream.flush()

    def _draw(self, fraction: float, percent: int, now: float) -> None:
        columns = _columns(self.stream) - 1  # the last column would wrap on some terminals
        text = f" {percent:3d}%  {self._times(fraction, now - self.started)}"
        # room for the longest text ("10 min 00 s elapsed, ETA 10 min 00 s"), so the bar keeps its width
        width = min(self.width, columns - len(f"{self.label:<24}") - 3 - 43)
        if width >= 10:
            filled = int(fraction * width)
            line = f"{self.label:<24} [{'#' * filled}{'.' * (width - filled)}]{text}"
        else:
            line = f"{self.label:<24}{text}"
        line = line[:columns]
        self.stream.write("\r" + line + " " * max(self.drawn - len(line), 0) + ("\n" if fraction >= 1 else ""))
        self.drawn = len(line)


def default_workers() -> int:
    """Processes `compare` runs policies in by default: one per CPU (1: sequential, in this process)."""
    return os.cpu_count() or 1


# In a worker process: the workload of the last spec it built, and the queue its progress goes to.
_worker_workload: dict[WorkloadSpec, Workload] = {}
_worker_progress: multiprocessing.queues.Queue | None = None


def _init_worker(progress: multiprocessing.queues.Queue | None) -> None:
    global _worker_progress
    _worker_progress = progress


def _run_policy(scenario: Scenario, policy: str, costs: CostModel, forecaster: str, initial: str) -> SimResult:
    """One policy in a worker process. The workload is rebuilt there from its spec (deterministic: the same
    arrays as the parent's), once per worker and spec, instead of being pickled to every task. Progress goes
    to the parent as (policy, fraction, time.monotonic()): a system-wide clock, the parent's bars use it."""
    workload = _worker_workload.get(scenario.workload)
    if workload is None:
        _worker_workload.clear()
        workload = _worker_workload[scenario.workload] = build_workload(scenario.workload)
    sink = _worker_progress
    report = None if sink is None else (lambda fraction: sink.put((policy, fraction, time.monotonic())))
    return Simulation(scenario, workload, policy, costs=costs, forecaster=forecaster, initial=initial).run(report)


class _OrderedProgress:
    """Relays the workers' progress to one bar per policy, one policy at a time, in the policies' order.

    The bar of the first unfinished policy is live; a later policy's newest fraction is held until every
    policy before it is done, then shown with the time it was reported (a `ProgressBar` is told when its run
    began and when each fraction was reached, so its elapsed time and ETA are its own). Output is therefore
    what the sequential path writes: one bar (or line) per policy, in order, never two at once.
    """

    def __init__(self, policies: list[str], progress: Callable[[str], Callable[[float], None] | None]) -> None:
        self.policies, self.progress = policies, progress
        self.head = 0  # index of the policy whose bar is live
        self.latest: dict[str, tuple[float, float]] = {}  # policy → newest (fraction, time) not yet shown
        self.began: dict[str, float] = {}
        self.bars: dict[str, Callable[[float], None] | None] = {}

    @property
    def done(self) -> bool:
        return self.head >= len(self.policies)

    def report(self, policy: str, fraction: float, at: float) -> None:
        self.began.setdefault(policy, at)
        self.latest[policy] = (fraction, at)
        while not self.done:
            head = self.policies[self.head]
            if head not in self.latest:
                return
            fraction, at = self.latest.pop(head)
            self._show(head, fraction, at)
            if fraction < 1:
                return
            self.head += 1

    def _show(self, policy: str, fraction: float, at: float) -> None:
        if policy not in self.bars:
            bar = self.bars[policy] = self.progress(policy)
            if isinstance(bar, ProgressBar):
                bar.restart(self.began[policy])
        bar = self.bars[policy]
        if isinstance(bar, ProgressBar):
            bar(fraction, at=at)
        elif bar is not None:
            bar(fraction)


def _compare_parallel(
    scenario: Scenario,
    policies: list[str],
    costs: CostModel,
    forecaster: str,
    progress: Callable[[str], Callable[[float], None] | None] | None,
    initial: str,
    workers: int,
) -> dict[str, SimResult]:
    """The policies in ``workers`` processes; results, and progress (`_OrderedProgress`), in the order of
    ``policies``."""
    context = multiprocessing.get_context("spawn")  # no fork of a parent that may hold threads or locks
    sink = context.Queue() if progress is not None else None
    relay = _OrderedProgress(policies, progress) if progress is not None else None
    with ProcessPoolExecutor(
        max_workers=min(workers, len(policies)), mp_context=context, initializer=_init_worker, initargs=(sink,)
    ) as pool:
        futures = {p: pool.submit(_run_policy, scenario, p, costs, forecaster, initial) for p in policies}
        if sink is not None and relay is not None:
            # until every run has reported 1.0 (each does, last, before it returns), or has failed
            while not relay.done:
                try:
                    relay.report(*sink.get(timeout=0.2))
                except queue.Empty:
                    failed = [p for p, f in futures.items() if f.done() and f.exception() is not None]
                    if failed:
                        futures[failed[0]].result()  # raises the worker's exception
        results = {p: futures[p].result() for p in policies}
    return results


def compare(
    scenario: Scenario,
    policies: Iterable[str] = POLICIES,
    costs: CostModel | None = None,
    forecaster: str = "csp",
    progress: Callable[[str], Callable[[float], None] | None] | None = None,
    initial: str = "empty",
    table: str = DEFAULT_TABLE,
    workers: int | None = None,
) -> Comparison:
    """Simulate every policy on the same workload (built once, so the comparison is paired).

    ``costs`` defaults to the cost table ``table``; when given, ``table`` names the table it was derived from.
    ``workers`` (default `default_workers`, one per CPU): with more than one, and more than one policy, the
    policies run in that many processes; results are the same, bit for bit, and in the same order as in
    the sequential path (``workers=1``), which runs them one after another in this process with one
    progress bar per policy.
    """
    costs = costs or table_costs(table)
    policies = list(policies)
    workers = default_workers() if workers is None else workers
    if workers > 1 and len(policies) > 1:
        results = _compare_parallel(scenario, policies, costs, forecaster, progress, initial, workers)
        return Comparison(scenario, costs, forecaster, results, initial, table)
    workload = build_workload(scenario.workload)
    results = {}
    for policy in policies:
        simulation = Simulation(scenario, workload, policy, costs=costs, forecaster=forecaster, initial=initial)
        results[policy] = simulation.run(progress(policy) if progress else None)
    return Comparison(scenario, costs, forecaster, results, initial, table)


COLUMNS = (
    ("policy", "{}", "policy"),
    ("TTFT p50", "{:.3f}", "ttft_p50_s"),
    ("p95", "{:.3f}", "ttft_p95_s"),
    ("p99", "{:.3f}", "ttft_p99_s"),
    ("p99.9", "{:.3f}", "ttft_p999_s"),
    ("<100ms", "{:.1%}", "ttft_under_100ms"),
    ("SLO", "{:.1%}", "slo_attainment"),
    ("GPU-h", "{:.1f}", "gpu_hours"),
    ("engine GPU-h", "{:.1f}", "gpu_hours_engines"),
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
    out.append(
        f"TTFT in seconds; SLO = TTFT ≤ {slo:g} s; GPU-h = GPU-hours of every GPU holding an engine or a warm "
        f"replica during the replay (engine GPU-h: engines only); costs: table {comparison.cost_table!r}."
    )
    return "\n".join(out)


def write_json(comparison: Comparison, path: Path) -> None:
    path.write_text(json.dumps(comparison.to_json(), indent=2, sort_keys=False) + "\n")


def identical_groups(results: dict[str, SimResult]) -> list[tuple[list[str], SimResult]]:
    """Policies whose TTFTs are identical, grouped (first result of each group kept), in the results' order."""
    groups: list[tuple[list[str], SimResult]] = []
    for name, result in results.items():
        for names, first in groups:
            if np.array_equal(first.ttft, result.ttft):
                names.append(name)
                break
        else:
            groups.append(([name], result))
    return groups


def write_plot(comparison: Comparison, path: Path) -> None:
    """TTFT CDFs (log scale) of every policy, and p99 TTFT against GPU-hours.

    Policies whose TTFTs are identical are drawn once, labelled with all their names; each curve has its own
    line style so overlapping curves stay visible, and the points' labels are stacked apart.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cdf, cost) = plt.subplots(1, 2, figsize=(12, 4.8))
    groups = identical_groups(comparison.results)
    styles = ("-", "--", "-.", ":")
    points = []
    for i, (names, result) in enumerate(groups):
        ttft = np.sort(result.ttft)
        label = " = ".join(names)
        (line,) = cdf.plot(
            ttft, np.arange(1, ttft.size + 1) / ttft.size, label=label, ls=styles[i % len(styles)], lw=1.4
        )
        summary = result.summary(comparison.scenario.ttft_slo_s)
        points.append((summary["gpu_hours"], summary["ttft_p99_s"], label))
        cost.scatter(summary["gpu_hours"], summary["ttft_p99_s"], s=40, color=line.get_color())
    # Labels of points close to one another (5 % of the x range, 0.1 decade in y) are stacked apart.
    span = (max(p[0] for p in points) - min(p[0] for p in points)) or 1.0
    done: list[tuple[float, float]] = []
    for x, y, label in sorted(points, key=lambda p: (p[1], p[0])):
        near = sum(
            1 for px, py in done if abs(px - x) < 0.05 * span and abs(np.log10(max(py, 1e-9) / max(y, 1e-9))) < 0.1
        )
        done.append((x, y))
        cost.annotate(label, (x, y), fontsize=8, xytext=(4, 4 + 11 * near), textcoords="offset points")
    cdf.set_xscale("log")
    cdf.set_xlabel("TTFT (s)")
    cdf.set_ylabel("share of requests")
    cdf.axvline(0.1, color="grey", lw=0.8, ls=":", label="100 ms")
    cdf.set_ylim(0.8, 1.001)
    cdf.set_xlim(left=0.01)
    cdf.legend(fontsize=8)
    cdf.set_title("TTFT distribution (tail)")
    cost.set_yscale("log")
    cost.set_xlabel("GPU-hours (every GPU holding an engine or a warm replica)")
    cost.set_ylabel("p99 TTFT (s)")
    cost.set_title("tail latency against cost")
    wl = comparison.scenario.workload
    fig.suptitle(
        f"{comparison.scenario.name}: {wl.n_models} models, {wl.rps:g} RPS, α={wl.alpha:g}; "
        f"costs {comparison.cost_table}"
    )
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
        (("pre-started init (s)", "prestarted_init_s", 1.0), ("storage (GB/s)", "storage_bandwidth", 1e9)),
        tuple(
            {"prestarted_init_s": start, "storage_bandwidth": gbps * 1e9}
            for start in (1.0, 3.0, 10.0, 20.0, 30.0)
            for gbps in (2.0, 6.4, 12.5)
        ),
        ("warmserve", "reactive-fast"),
    ),
    Sweep(
        "wake",
        (("wake (s)", "wake_s", 1.0), ("host→GPU (GB/s)", "load_bandwidth", 1e9)),
        tuple(
            {"wake_s": wake, "load_bandwidth": gbps * 1e9} for wake in (0.2, 1.0, 3.0) for gbps in (10.0, 21.0, 32.0)
        ),
        ("warmserve", "sleep-wake"),
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
        point = replace(costs or table_costs(DEFAULT_TABLE), **changes)
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


# ------------------------------------------------------------------------------------------ several seeds
BASELINES: tuple[str, ...] = ("reactive-cold", "reactive-fast", "sleep-wake", "gpu-share", "dedicated")
SEED_METRICS: tuple[tuple[str, str, str], ...] = (  # (summary key, heading, format); lower is better for all
    ("ttft_p50_s", "p50", "{:.3f}"),
    ("ttft_p99_s", "p99", "{:.3f}"),
    ("ttft_p999_s", "p99.9", "{:.3f}"),
    ("gpu_hours", "GPU-h", "{:.2f}"),
    ("gpu_hours_engines", "engine GPU-h", "{:.2f}"),
)


def compare_seeds(
    scenario: Scenario,
    seeds: Iterable[int],
    policies: Iterable[str] = POLICIES,
    costs: CostModel | None = None,
    forecaster: str = "csp",
    progress: Callable[[str], Callable[[float], None] | None] | None = None,
    initial: str = "empty",
    table: str = DEFAULT_TABLE,
    workers: int | None = None,
) -> dict:
    """Every policy on the workload of each seed; per metric the median and range over the seeds, and
    WarmServe's ratio to the strongest baseline (lowest median) per metric. Each seed's policies run in
    ``workers`` processes (see `compare`).

    Only summaries are kept between seeds, so a day-long run holds one seed's requests at a time.
    """
    policies = list(policies)
    runs: dict[int, dict[str, dict]] = {}
    first: Comparison | None = None
    for seed in seeds:
        labelled = None if progress is None else (lambda policy, seed=seed: progress(f"{policy} seed {seed}"))
        comparison = compare(
            scenario.with_workload(seed=seed), policies, costs, forecaster, labelled, initial, table, workers
        )
        runs[seed] = {p: r.summary(scenario.ttft_slo_s) for p, r in comparison.results.items()}
        if first is None:
            first = comparison
            first.results = {}
    assert first is not None, "at least one seed"
    aggregate: dict[str, dict[str, dict[str, float]]] = {}
    for policy in policies:
        aggregate[policy] = {}
        for key, _, _ in SEED_METRICS:
            values = [runs[seed][policy][key] for seed in runs]
            aggregate[policy][key] = {
                "median": float(np.median(values)),
                "min": float(min(values)),
                "max": float(max(values)),
            }
    baselines = [b for b in BASELINES if b in aggregate]
    versus = _versus(aggregate, baselines)
    if "warmserve" in aggregate:
        budget = aggregate["warmserve"]["gpu_hours"]["median"]
        frugal = [b for b in baselines if aggregate[b]["gpu_hours"]["median"] <= budget * (1 + 1e-9)]
        versus_frugal = _versus(aggregate, frugal)
    else:
        versus_frugal = {}
    info = first.to_json()["scenario"]
    info["workload"].pop("seed", None)
    return {
        "scenario": info,
        "seeds": list(runs),
        "runs": {str(seed): summaries for seed, summaries in runs.items()},
        "aggregate": aggregate,
        "warmserve_vs_strongest_baseline": versus,
        "warmserve_vs_strongest_baseline_within_its_gpu_hours": versus_frugal,
    }


def _versus(aggregate: dict[str, dict[str, dict[str, float]]], baselines: list[str]) -> dict[str, dict]:
    """Per metric: the baseline with the lowest median, and its median ÷ WarmServe's (> 1: WarmServe lower)."""
    versus: dict[str, dict] = {}
    if "warmserve" not in aggregate or not baselines:
        return versus
    for key, _, _ in SEED_METRICS:
        strongest = min(baselines, key=lambda b: aggregate[b][key]["median"])
        ours = aggregate["warmserve"][key]["median"]
        theirs = aggregate[strongest][key]["median"]
        versus[key] = {
            "strongest_baseline": strongest,
            "baseline_median": theirs,
            "warmserve_median": ours,
            "ratio_baseline_over_warmserve": theirs / ours if ours > 0 else float("inf"),
        }
    return versus


def format_seeds(result: dict) -> str:
    """Median [min–max] over the seeds per policy and metric, then WarmServe's ratio to the strongest baseline."""
    headers = ["policy", *(title for _, title, _ in SEED_METRICS)]
    rows = []
    for policy, metrics in result["aggregate"].items():
        cells = [policy]
        for key, _, fmt in SEED_METRICS:
            m = metrics[key]
            cells.append(f"{fmt.format(m['median'])} [{fmt.format(m['min'])}–{fmt.format(m['max'])}]")
        rows.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in [headers, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    seeds = ", ".join(str(s) for s in result["seeds"])
    lines.append(f"median [min–max] over seeds {seeds}; TTFT in seconds; GPU-h counts warm-only GPUs.")
    for title_set, versus in (
        ("", result["warmserve_vs_strongest_baseline"]),
        (" using no more GPU-hours", result["warmserve_vs_strongest_baseline_within_its_gpu_hours"]),
    ):
        for key, title, fmt in SEED_METRICS:
            v = versus.get(key)
            if v:
                lines.append(
                    f"{title}: strongest baseline{title_set} {v['strongest_baseline']} "
                    f"{fmt.format(v['baseline_median'])} vs warmserve {fmt.format(v['warmserve_median'])} "
                    f"(baseline ÷ warmserve {v['ratio_baseline_over_warmserve']:.2f}×)"
                )
    return "\n".join(lines)
