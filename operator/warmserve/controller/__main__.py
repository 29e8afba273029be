"""`python -m warmserve.controller`: run the operator with settings from env and flags (see settings.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import kopf

from warmserve.controller.handlers import register
from warmserve.controller.runtime import Runtime
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


def main(argv: Sequence[str] | None = None) -> None:
    config = ControllerConfig.from_args(argv)
    setup_logging(config)
    registry = kopf.OperatorRegistry()
    register(registry, Runtime(config=config))
    liveness = f"http://0.0.0.0:{config.liveness_port}/healthz" if config.liveness_port else None
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


if __name__ == "__main__":
    main()
