"""`warmserve router`: one OpenAI-compatible endpoint for every ModelDeployment of the cluster.

Discovers engines by watching the worker pods' `warmserve.io/state` and the ModelDeployments (read-only
access), routes each request by its `model` to a ready engine, and holds requests for a model that has no
ready engine until the operator has promoted one. Also: python -m warmserve.router.

It needs a cluster (the pod's service account, or the kubeconfig at $KUBECONFIG or ~/.kube/config); without
one it exits with status 3.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from warmserve.cliutil import EXIT_FAILED, EXIT_NO_CLUSTER, HelpFormatter, require_cluster
from warmserve.router.server import RouterSettings

LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_ports(text: str) -> range:
    low, sep, high = text.partition("-")
    try:
        ports = range(int(low), int(high if sep else low) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port or a range like 8000-8999") from None
    if not ports or ports.start < 1 or ports.stop > 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port range within 1-65535")
    return ports


def build_parser(prog: str = "warmserve router") -> argparse.ArgumentParser:
    d = RouterSettings()
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--host", default=d.host, help="address to listen on")
    p.add_argument("--port", type=int, default=d.port, help="port to listen on")
    p.add_argument(
        "--namespace",
        action="append",
        default=None,
        help="namespace to discover models and workers in; repeat for several "
        "(env WATCH_NAMESPACE, comma-separated; default: all namespaces)",
    )
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="held requests per model before 429")
    p.add_argument("--max-wait-seconds", type=float, default=d.max_wait_seconds, help="longest hold before 504")
    p.add_argument("--retry-after-seconds", type=int, default=d.retry_after_seconds, help="Retry-After of a 429")
    p.add_argument(
        "--engine-ports",
        type=parse_ports,
        default="1024-65535",
        help="ports an engine endpoint may use (others reported by a worker are ignored)",
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("WARMSERVE_LOG_LEVEL", "info"),
        help="debug, info, warning or error; env WARMSERVE_LOG_LEVEL",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_level.lower() not in LOG_LEVELS:
        parser.error(
            f"--log-level / WARMSERVE_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {args.log_level!r}"
        )
    if args.namespace is None:
        args.namespace = [ns for ns in os.environ.get("WATCH_NAMESPACE", "").split(",") if ns]
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import kopf

    from warmserve.controller import k8s
    from warmserve.router.discovery import KubeDiscovery
    from warmserve.router.server import Router, run

    no_cluster = require_cluster("warmserve router")
    if no_cluster is not None:
        return no_cluster
    settings = kopf.OperatorSettings()
    try:
        k8s.login(settings)
    except (kopf.LoginError, OSError) as error:
        print(f"warmserve router: cannot log in to the Kubernetes cluster: {error}", file=sys.stderr)
        return EXIT_NO_CLUSTER
    api = k8s.Api(lambda: k8s.login(settings))
    router = Router(
        RouterSettings(
            host=args.host,
            port=args.port,
            max_queue=args.max_queue,
            max_wait_seconds=args.max_wait_seconds,
            retry_after_seconds=args.retry_after_seconds,
        )
    )
    router.discovery = KubeDiscovery(
        api,
        k8s.PODS,
        k8s.MODELDEPLOYMENTS,
        namespaces=tuple(args.namespace),
        ports=args.engine_ports,
        on_rejected=lambda _message: router.metrics.rejected_endpoints.inc(),
    )
    try:
        run(router, args.host, args.port, drain_seconds=args.max_wait_seconds + 10, on_cleanup=api.close)
    except OSError as error:  # e.g. the port is taken
        print(f"warmserve router: cannot listen on {args.host}:{args.port}: {error.strerror or error}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
