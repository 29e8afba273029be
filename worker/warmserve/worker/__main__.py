"""`warmserve worker` (also: python -m warmserve.worker): run the GPU-pod sidecar agent.

Kubernetes mode (default in a pod): watches the plan annotation on its own pod
(--namespace/--pod or the downward-API env vars POD_NAMESPACE/POD_NAME); it needs the
pod's service account or a kubeconfig, and without one it exits with status 3.
Local mode: --plan-file plan.json --state-file state.json, no Kubernetes.
Logs go to stderr (--log-level or WARMSERVE_LOG_LEVEL, default info).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping

from warmserve.cliutil import EXIT_FAILED, EXIT_USAGE, HelpFormatter, require_cluster
from warmserve.worker.arena import DEFAULT_PAGE_SIZE
from warmserve.worker.devices import build_arenas, node_kind
from warmserve.worker.engines import EngineManager

LOG_LEVELS = ("debug", "info", "warning", "error")
SYSTEM_STATE_DIR = "/var/run/warmserve"  # what the operator's pods pass (controller/builders.py STATE_DIR)
log = logging.getLogger("warmserve.worker")


def default_state_dir(environ: Mapping[str, str] | None = None, euid: int | None = None) -> str:
    """Where the worker keeps its ledgers, manifests and engine records unless --state-dir says otherwise.

    /var/run/warmserve for root, or where that directory exists and is writable (a pod's volume); otherwise a
    per-user runtime directory, so running the worker by hand needs no root: $XDG_RUNTIME_DIR/warmserve, else
    $XDG_CACHE_HOME/warmserve (~/.cache/warmserve).
    """
    environ = os.environ if environ is None else environ
    euid = os.geteuid() if euid is None else euid
    if euid == 0 or os.access(SYSTEM_STATE_DIR, os.W_OK):
        return SYSTEM_STATE_DIR
    if environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(environ["XDG_RUNTIME_DIR"], "warmserve")
    cache = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "warmserve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="warmserve worker", description=__doc__, formatter_class=HelpFormatter)
    mode = p.add_argument_group("plan source")
    mode.add_argument("--plan-file", help="local mode: read the plan from this JSON file")
    mode.add_argument("--state-file", help="local mode: write the state JSON here (default: STATE_DIR/state.json)")
    mode.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE"), help="pod namespace; env POD_NAMESPACE")
    mode.add_argument("--pod", default=os.environ.get("POD_NAME"), help="this pod's name; env POD_NAME")
    mem = p.add_argument_group("memory")
    mem.add_argument(
        "--device",
        choices=["auto", "cuda", "cpu"],
        default="auto",
        help="cuda: one arena per visible GPU; cpu: host shared-memory arenas",
    )
    mem.add_argument("--cpu-devices", type=int, default=1, help="number of host arenas in cpu mode")
    mem.add_argument("--arena-bytes", type=int, default=None, help="bytes per arena (cpu mode; default 1 GiB)")
    mem.add_argument(
        "--memory-fraction", type=float, default=0.9, help="fraction of free GPU memory per arena (cuda mode)"
    )
    mem.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE, help="arena page size in bytes")
    mem.add_argument("--shm-dir", default="/dev/shm", help="where host arenas are created (cpu mode)")
    run = p.add_argument_group("runtime")
    run.add_argument(
        "--state-dir",
        default=default_state_dir(),
        help=f"ledger, manifests, engine records; {SYSTEM_STATE_DIR} for root or where it is writable, else "
        "$XDG_RUNTIME_DIR/warmserve or ~/.cache/warmserve",
    )
    run.add_argument("--http-host", default="0.0.0.0", help="address of /metrics, /healthz and /state")
    run.add_argument("--http-port", type=int, default=9400, help="/metrics and /healthz (0 disables)")
    run.add_argument("--engine-port", type=int, default=8000, help="first port for engines")
    run.add_argument("--engine-host", default="0.0.0.0", help="address engines bind to")
    run.add_argument(
        "--advertise-host",
        default=os.environ.get("POD_IP", "127.0.0.1"),
        help="host written into engine endpoints (the pod IP in Kubernetes); env POD_IP",
    )
    run.add_argument("--shells", type=int, default=1, help="pre-started engine shells to keep idle")
    run.add_argument(
        "--standby-engines",
        type=int,
        default=1,
        help="pre-initialised engines to keep, one per prewarmed model (promotion binds one in ~1 s; "
        "each holds an engine's KV cache and runtime); 0 disables them (default: 1)",
    )
    run.add_argument(
        "--no-core-zygote",
        action="store_true",
        help="do not pre-start the engine-core half (useful where vLLM forks instead of spawning)",
    )
    run.add_argument("--engine-args", default="", help="extra vLLM args (one string, shell-split)")
    run.add_argument("--tick", type=float, default=0.5, help="seconds between reconcile passes")
    run.add_argument("--once", action="store_true", help="one reconcile pass, print state, exit")
    run.add_argument(
        "--log-level",
        type=str.lower,
        default=os.environ.get("WARMSERVE_LOG_LEVEL", "info"),
        help=f"one of {', '.join(LOG_LEVELS)} (default: $WARMSERVE_LOG_LEVEL or info); logs go to stderr",
    )
    args = p.parse_args(argv)
    args.log_level = args.log_level.lower()
    if args.log_level not in LOG_LEVELS:
        p.error(f"--log-level / WARMSERVE_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {args.log_level!r}")
    return args


def setup_logging(level: str) -> None:
    """Everything the worker logs goes to stderr at ``level`` (stdout stays free for ``--once``)."""
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )


GiB = 1 << 30


def cpu_kv_cache_env(
    environ: Mapping[str, str], engine_args: list[str], available: int | None, arena_total: int, engines: int
) -> dict[str, str]:
    """``VLLM_CPU_KVCACHE_SPACE`` for engines on a CPU node, unless the operator of the node set one.

    vLLM's CPU backend otherwise reserves ``--gpu-memory-utilization`` (0.92 by default) of the node's memory
    per engine and refuses to start when less is free. The KV cache of each engine is sized instead from what
    the node has available after the arenas: a quarter of it split over the engines that may run at once,
    between 1 and 16 GiB.
    """
    if environ.get("VLLM_CPU_KVCACHE_SPACE") or any(a.startswith("--kv-cache-memory-bytes") for a in engine_args):
        return {}
    spare = max((available or 0) - arena_total, 0)
    gib = min(max(spare // 4 // max(engines, 1) // GiB, 1), 16)
    return {"VLLM_CPU_KVCACHE_SPACE": str(gib)}


def mem_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    import shlex

    from warmserve.worker.agent import Agent
    from warmserve.worker.kube import KubePod, LocalFiles, PodAnnotations
    from warmserve.worker.runner import Runner, serve_http

    args = parse_args(argv)
    setup_logging(args.log_level)
    # CUDA numbers devices fastest first by default, NVML (whose indices name the arenas) by PCI bus: the same
    # order everywhere, here (arenas are allocated on cuda:<NVML index>) and in the engines (engines.placement)
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    if not args.plan_file and not (args.namespace and args.pod):
        print(
            "warmserve worker: need --plan-file (local mode) or --namespace and --pod (Kubernetes mode; env "
            "POD_NAMESPACE, POD_NAME); see --help",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not args.plan_file:
        no_cluster = require_cluster("warmserve worker")
        if no_cluster is not None:
            return no_cluster
    try:
        os.makedirs(args.state_dir, exist_ok=True)
    except OSError as error:
        print(f"warmserve worker: cannot create --state-dir {args.state_dir}: {error.strerror}", file=sys.stderr)
        return EXIT_USAGE
    try:
        arenas = build_arenas(
            args.device,
            state_dir=args.state_dir,
            shm_dir=args.shm_dir,
            cpu_devices=args.cpu_devices,
            arena_bytes=args.arena_bytes,
            memory_fraction=args.memory_fraction,
            page_size=args.page_size,
        )
    except OSError as error:  # e.g. --shm-dir missing, not writable or too small
        print(f"warmserve worker: cannot create the arenas in --shm-dir {args.shm_dir}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as error:  # --device cuda without a GPU, CUDA unavailable
        print(f"warmserve worker: {error}", file=sys.stderr)
        return EXIT_USAGE
    pod: PodAnnotations
    if args.plan_file:
        state_file = args.state_file or os.path.join(args.state_dir, "state.json")
        pod = LocalFiles(args.plan_file, state_file)
        log.info("local mode: plan from %s, state to %s", args.plan_file, state_file)
    else:
        pod = KubePod(args.namespace, args.pod)
        log.info("Kubernetes mode: watching pod %s/%s", args.namespace, args.pod)
    kind = node_kind(arenas)
    log.info(
        "%d %s arenas (GPUs %s), %d B each; state in %s",
        len(arenas),
        kind,
        ",".join(sorted(arenas, key=int)),
        next(iter(arenas.values())).usage().total if arenas else 0,
        args.state_dir,
    )
    # On CPU, keep vLLM's model in the engine-core process (no extra spawned worker);
    # on GPU with TP=1 vLLM already uses its in-process ("uni") executor.
    engine_args = shlex.split(args.engine_args)
    env: dict[str, str] = {}
    if not kind.on_gpu:
        arena_total = sum(arena.usage().total for arena in arenas.values())
        engines_at_once = len(arenas) + max(args.standby_engines, 0)
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        env.update(cpu_kv_cache_env(os.environ, engine_args, mem_available_bytes(), arena_total, engines_at_once))
    engines = EngineManager(
        args.state_dir,
        pool_size=args.shells,
        base_port=args.engine_port,
        engine_args=engine_args,
        env=env,
        bind_host=args.engine_host,
        advertise_host=args.advertise_host,
        core_zygote=not args.no_core_zygote,
    )
    agent = Agent(arenas, args.state_dir, engines, standby_engines=args.standby_engines)
    runner = Runner(agent, pod, tick=args.tick)
    if args.once:
        print(json.dumps(runner.run_once().to_json(), indent=1))
        agent.shutdown(stop_engines=False)
        return 0
    try:
        server = serve_http(runner, args.http_host, args.http_port) if args.http_port else None
    except OSError as error:  # e.g. the port is taken
        print(
            f"warmserve worker: cannot listen on --http-host {args.http_host} --http-port {args.http_port}: "
            f"{error.strerror or error}",
            file=sys.stderr,
        )
        pod.close()
        agent.shutdown(stop_engines=False)  # nothing started yet
        return EXIT_FAILED
    engines.fill_pool()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if server:
        log.info("/metrics, /healthz and /state on %s:%d", args.http_host, server.server_address[1])
    try:
        runner.run(stop)
    finally:
        log.info("shutting down")
        if server:
            server.shutdown()
        pod.close()
        # Host arenas outlive us, so engines keep serving and are adopted after a restart.
        # CUDA IPC memory dies with its exporting process (us): stop GPU engines with it.
        agent.shutdown(stop_engines=not kind.outlives_agent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
