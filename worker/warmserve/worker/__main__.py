"""``python -m warmserve.worker``: run the GPU-pod sidecar agent.

Kubernetes mode (default in a pod): watches ``warmserve.io/plan`` on its own pod
(``--namespace``/``--pod`` or the downward-API env vars POD_NAMESPACE/POD_NAME).
Local mode: ``--plan-file plan.json --state-file state.json``, no Kubernetes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from warmserve.worker.arena import DEFAULT_PAGE_SIZE
from warmserve.worker.devices import build_arenas
from warmserve.worker.engines import EngineManager


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m warmserve.worker", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = p.add_argument_group("plan source")
    mode.add_argument("--plan-file", help="local mode: read the plan from this JSON file")
    mode.add_argument("--state-file", help="local mode: write the state JSON here")
    mode.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE"), help="pod namespace")
    mode.add_argument("--pod", default=os.environ.get("POD_NAME"), help="this pod's name")
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
    mem.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE)
    mem.add_argument("--shm-dir", default="/dev/shm")
    run = p.add_argument_group("runtime")
    run.add_argument("--state-dir", default="/var/run/warmserve", help="ledger, manifests, engine records")
    run.add_argument("--http-host", default="0.0.0.0")
    run.add_argument("--http-port", type=int, default=9400, help="/metrics and /healthz (0 disables)")
    run.add_argument("--engine-port", type=int, default=8000, help="first port for engines")
    run.add_argument("--engine-host", default="0.0.0.0", help="address engines bind to")
    run.add_argument(
        "--advertise-host",
        default=os.environ.get("POD_IP", "127.0.0.1"),
        help="host written into engine endpoints (the pod IP in Kubernetes)",
    )
    run.add_argument("--shells", type=int, default=1, help="pre-started engine shells to keep idle")
    run.add_argument(
        "--no-core-zygote",
        action="store_true",
        help="do not pre-start the engine-core half (useful where vLLM forks instead of spawning)",
    )
    run.add_argument("--engine-args", default="", help="extra vLLM args (one string, shell-split)")
    run.add_argument("--tick", type=float, default=0.5)
    run.add_argument("--once", action="store_true", help="one reconcile pass, print state, exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import shlex

    from warmserve.worker.agent import Agent
    from warmserve.worker.kube import KubePod, LocalFiles
    from warmserve.worker.runner import Runner, serve_http

    args = parse_args(argv)
    if args.plan_file:
        pod = LocalFiles(args.plan_file, args.state_file or os.path.join(args.state_dir, "state.json"))
    elif args.namespace and args.pod:
        pod = KubePod(args.namespace, args.pod)
    else:
        print("need --plan-file (local mode) or --namespace/--pod (Kubernetes mode)", file=sys.stderr)
        return 2
    os.makedirs(args.state_dir, exist_ok=True)
    arenas = build_arenas(
        args.device,
        state_dir=args.state_dir,
        shm_dir=args.shm_dir,
        cpu_devices=args.cpu_devices,
        arena_bytes=args.arena_bytes,
        memory_fraction=args.memory_fraction,
        page_size=args.page_size,
    )
    # On CPU, keep vLLM's model in the engine-core process (no extra spawned worker);
    # on GPU with TP=1 vLLM already uses its in-process ("uni") executor.
    cpu_only = all(a.backend.kind == "shm" for a in arenas.values())
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if cpu_only else {}
    engines = EngineManager(
        args.state_dir,
        pool_size=args.shells,
        base_port=args.engine_port,
        engine_args=shlex.split(args.engine_args),
        env=env,
        bind_host=args.engine_host,
        advertise_host=args.advertise_host,
        core_zygote=not args.no_core_zygote,
    )
    agent = Agent(arenas, args.state_dir, engines)
    runner = Runner(agent, pod, tick=args.tick)
    if args.once:
        print(json.dumps(runner.run_once(), indent=1))
        agent.shutdown(stop_engines=False)
        return 0
    engines.fill_pool()
    server = serve_http(runner, args.http_host, args.http_port) if args.http_port else None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        runner.run(stop)
    finally:
        if server:
            server.shutdown()
        pod.close()
        # Host arenas outlive us, so engines keep serving and are adopted after a restart.
        # CUDA IPC memory dies with its exporting process (us): stop GPU engines with it.
        agent.shutdown(stop_engines=not cpu_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
