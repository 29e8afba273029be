"""`python -m warmserve.controller`: run the operator with settings from env and flags (see settings.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
from collections.abc import Sequence
from typing import Any

import kopf

from warmserve.cliutil import EXIT_FAILED, EXIT_USAGE, require_cluster
from warmserve.controller.handlers import register
from warmserve.controller.runtime import Runtime, configure_gc
from warmserve.controller.settings import ControllerConfig


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the object kopf is handling."""

    _skip = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._skip and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool | type(None)) else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(config: ControllerConfig) -> None:
    handler = logging.StreamHandler(sys.stdout)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())


def port_in_use(port: int) -> str | None:
    """Why kopf could not serve its liveness endpoint on `port` (it binds every address), or None."""
    try:
        with socket.create_server(("0.0.0.0", port)):
            return None
    except OSError as error:
        return error.strerror or str(error)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = ControllerConfig.from_args(argv)
    except ValueError as error:  # a WARMSERVE_* variable that does not parse (flags are checked by argparse)
        print(f"warmserve operator: invalid setting (a flag or a WARMSERVE_* variable): {error}", file=sys.stderr)
        return EXIT_USAGE
    # Without a cluster kopf would log a traceback per task and exit; say what is missing instead.
    no_cluster = require_cluster("warmserve operator")
    if no_cluster is not None:
        return no_cluster
    if config.liveness_port and (busy := port_in_use(config.liveness_port)):
        print(
            f"warmserve operator: cannot listen on --liveness-port {config.liveness_port} ({busy}); "
            "choose a free port, or 0 to disable the endpoint",
            file=sys.stderr,
        )
        return EXIT_FAILED
    setup_logging(config)
    registry = kopf.OperatorRegistry()
    # A bare OperatorRegistry has no login handler (kopf's default registry adds them): log in as kopf's default
    # does with the kubernetes client installed, in-cluster service account first, then the kubeconfig.
    kopf.on.login(registry=registry, id="login_via_client", errors=kopf.ErrorsMode.IGNORED)(kopf.login_via_client)
    register(registry, Runtime(config=config))
    liveness = f"http://0.0.0.0:{config.liveness_port}/healthz" if config.liveness_port else None
    configure_gc()
    asyncio.run(
        kopf.operator(
            registry=registry,
            standalone=config.standalone,
            priority=config.priority,
            peering_name=config.peering or None,
            clusterwide=config.clusterwide,
            namespaces=list(config.namespaces),
            liveness_endpoint=liveness,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
