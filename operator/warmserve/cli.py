"""The `warmserve` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from warmserve.cliutil import EXIT_USAGE, HelpFormatter
from warmserve.core.forecast import FORECASTER_KINDS
from warmserve.sim.costs import COST_TABLES, DEFAULT_TABLE, table_costs
from warmserve.sim.engine import ALIASES, INITIAL_STATES, POLICIES
from warmserve.sim.scenarios import SCENARIOS

# Subcommands that hand their arguments to a component's own parser, and the extra that component needs.
#: subcommand → (module whose main() runs it, the extra it needs)
COMPONENTS = {
    "up": ("warmserve.local.__main__", "operator,worker,vllm"),
    "operator": ("warmserve.controller.__main__", "operator"),
    "worker": ("warmserve.worker.__main__", "worker"),
    "router": ("warmserve.router.__main__", "operator"),
    "shard": ("warmserve.worker.tpshard", "worker"),
}


def _policies(text: str) -> list[str]:
    names = [ALIASES.get(p.strip(), p.strip()) for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown policy {', '.join(unknown)}; choose from {', '.join(POLICIES)}")
    return names


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="warmserve", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser(
        "simulate",
        help="replay a real-trace workload against WarmServe and its baselines",
        description="Trace-driven simulation of WarmServe and the baselines on one workload (the bundled Azure\n"
        "2024 code trace by default); prints a comparison table. Progress goes to stderr.",
        formatter_class=HelpFormatter,
    )
    sim.add_argument("--scenario", choices=sorted(SCENARIOS), default="paper")
    sim.add_argument("--policies", type=_policies, default=list(POLICIES), help="comma-separated (default: all)")
    sim.add_argument(
        "--rps", type=_positive(float), help="total requests per second (default: the scenario's; paper: 15)"
    )
    sim.add_argument(
        "--alpha",
        type=float,
        help="popularity skew: share of model i ∝ (i+1)^-alpha (default: the scenario's; paper: 0.5)",
    )
    sim.add_argument(
        "--hours",
        type=_positive(float),
        help="replayed hours (default: the scenario's; paper: 1/3, the first 20 minutes)",
    )
    sim.add_argument(
        "--start-hour", type=float, help="time of day the replay starts, UTC (default: the scenario's; paper: 0)"
    )
    sim.add_argument(
        "--initial",
        choices=INITIAL_STATES,
        default="empty",
        help="state at t=0: 'empty' (no engine, the paper's protocol) or 'steady' (engines for the load before)",
    )
    sim.add_argument("--cv", type=_positive(float), help="re-draw arrivals with this Gamma CV (default: real)")
    sim.add_argument("--seed", type=int, help="workload seed (default: the scenario's; paper: 0)")
    sim.add_argument(
        "--history-days", type=int, help="days of history before the replay (default: the scenario's; paper: 3)"
    )
    sim.add_argument("--window-s", type=_positive(int), help="forecast window in seconds (default: 300)")
    sim.add_argument("--forecaster", choices=FORECASTER_KINDS, default="csp", help="load forecaster of WarmServe")
    sim.add_argument(
        "--costs",
        choices=sorted(COST_TABLES),
        default=DEFAULT_TABLE,
        help="cost table: public A100 figures or this repository's CPU measurements (bench/worker.py); "
        "the JSON lists every value with its unit and source",
    )
    sim.add_argument(
        "--engine-init-s",
        type=_positive(float),
        help="engine initialisation in a fresh process (s; default: the cost table's)",
    )
    sim.add_argument(
        "--prestarted-init-s",
        "--engine-start-s",
        dest="prestarted_init_s",
        type=_positive(float),
        help="engine initialisation in a pre-started process (s; --engine-start-s is its old name; default: "
        "the cost table's)",
    )
    sim.add_argument(
        "--promote-s", type=_positive(float), help="standby engine binds a warm replica (s; default: the cost table's)"
    )
    sim.add_argument(
        "--wake-s", type=_positive(float), help="fixed part of a wake from sleep (s; default: the cost table's)"
    )
    sim.add_argument(
        "--storage-gbps",
        type=_positive(float),
        help="storage read bandwidth per GPU (GB/s; default: the cost table's)",
    )
    sim.add_argument(
        "--load-gbps", type=_positive(float), help="host→GPU bandwidth per GPU (GB/s; default: the cost table's)"
    )
    sim.add_argument(
        "--share-contention",
        type=_fraction,
        help="gpu-share: prefill slow-down per co-located decoding engine, 0 (overlap) to 1 (time slicing) "
        "(default: the cost table's)",
    )
    sim.add_argument("--json", type=Path, help="write the results as JSON")
    sim.add_argument("--plot", type=Path, help="write TTFT CDFs and p99-vs-cost as a PNG")
    sim.add_argument(
        "--sensitivity",
        action="store_true",
        help="also sweep pre-started init and storage bandwidth (warmserve vs reactive-fast), wake cost and "
        "host→GPU bandwidth (vs sleep-wake) and share contention (vs gpu-share)",
    )
    sim.add_argument(
        "--seeds",
        type=_positive(int),
        help="run N workload seeds (from --seed, default 0) and report the median and range of each metric per "
        "policy, and "
        "WarmServe's ratio to the strongest baseline per metric (not with --plot or --sensitivity)",
    )
    sim.add_argument(
        "--quiet",
        action="store_true",
        help="no progress output (on stderr: a live bar on a terminal, otherwise a line per policy and one "
        "every 10 s while a policy runs)",
    )
    for name, text in (
        ("up", "serve the models of a YAML file on this machine, no Kubernetes (-f models.yaml; --help lists options)"),
        ("operator", "run the Kubernetes operator (same as python -m warmserve.controller; --help lists settings)"),
        ("worker", "run the GPU-pod worker agent (same as python -m warmserve.worker; --help lists options)"),
        ("router", "run the OpenAI-compatible router (same as python -m warmserve.router; --help lists options)"),
        ("shard", "split a checkpoint into the per-rank files a tensor-parallel replica is prewarmed from"),
    ):
        sub.add_parser(name, help=text, description=text, add_help=False)  # its arguments are passed through
    return parser


def simulate(args: argparse.Namespace) -> int:
    from warmserve.sim import report

    scenario = SCENARIOS[args.scenario]()
    changes = {}
    if args.rps is not None:
        changes["rps"] = args.rps
    if args.alpha is not None:
        changes["alpha"] = args.alpha
    if args.hours is not None:
        changes["replay_s"] = round(args.hours * 3600)
    if args.start_hour is not None:
        changes["replay_start_s"] = round(args.start_hour * 3600) % 86400
    if args.cv is not None:
        changes["cv"] = args.cv
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.history_days is not None:
        changes["history_days"] = args.history_days
    scenario = scenario.with_workload(**changes)
    if args.window_s is not None:
        if 86400 % args.window_s:
            raise ValueError("--window-s must divide a day (86400 s)")
        scenario = replace(scenario, window_s=args.window_s)
    overrides = {
        "engine_init_s": args.engine_init_s,
        "prestarted_init_s": args.prestarted_init_s,
        "promote_s": args.promote_s,
        "wake_s": args.wake_s,
        "storage_bandwidth": None if args.storage_gbps is None else args.storage_gbps * 1e9,
        "load_bandwidth": None if args.load_gbps is None else args.load_gbps * 1e9,
        "share_contention": args.share_contention,
    }
    costs = table_costs(args.costs, **{k: v for k, v in overrides.items() if v is not None})

    progress = None if args.quiet else (lambda policy: report.ProgressBar(policy))
    if args.seeds is not None:
        if args.plot or args.sensitivity:
            raise ValueError("--seeds cannot be combined with --plot or --sensitivity")
        first = 0 if args.seed is None else args.seed
        seeds = range(first, first + args.seeds)
        result = report.compare_seeds(
            scenario, seeds, args.policies, costs, args.forecaster, progress, args.initial, args.costs
        )
        print(report.format_seeds(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
            print(f"wrote {args.json}")
        return 0
    comparison = report.compare(scenario, args.policies, costs, args.forecaster, progress, args.initial, args.costs)
    print(report.format_table(comparison))
    if args.json:
        report.write_json(comparison, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        report.write_plot(comparison, args.plot)
        print(f"wrote {args.plot}")
    if args.sensitivity:
        log = None if args.quiet else (lambda text: print(f"  sensitivity: {text}", file=sys.stderr))
        for sweep in report.SWEEPS:
            rows = report.sensitivity(scenario, sweep, costs, args.forecaster, log, args.initial)
            print()
            print(report.format_sensitivity(rows, sweep))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in COMPONENTS:  # imported lazily: they need the operator / worker extras
        module, extra = COMPONENTS[args.command]
        try:
            component_main: Callable[[list[str]], int | None] = importlib.import_module(module).main
        except ImportError as error:
            print(
                f"warmserve {args.command}: {error}; install it with pip install 'warmserve[{extra}]'",
                file=sys.stderr,
            )
            return EXIT_USAGE
        return component_main(rest) or 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "simulate":
        try:
            return simulate(args)
        except ValueError as error:  # invalid workload or scenario parameters
            print(f"warmserve simulate: {error}", file=sys.stderr)
            return EXIT_USAGE
    raise AssertionError(f"unhandled command {args.command}")  # argparse requires one of the commands above


if __name__ == "__main__":
    sys.exit(main())
