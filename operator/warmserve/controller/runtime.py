"""The operator's process-wide state, created once and handed to every handler through `register()`.

Keeping it in one explicit object (instead of module globals) lets the tests run a fresh operator per test,
point it at an emulated API server, and inject a fake load scraper and clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kopf

from warmserve.controller import k8s
from warmserve.controller.metrics import OperatorMetrics
from warmserve.controller.settings import ControllerConfig

Credentials = Callable[[kopf.OperatorSettings], kopf.ConnectionInfo]


@dataclass
class Runtime:
    config: ControllerConfig = field(default_factory=ControllerConfig)
    credentials: Credentials = k8s.login
    clock: Callable[[], float] = time.time
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    scraper_factory: Callable[..., Any] | None = None  # (pool spec, runtime) → LoadScraper; None = default
    api: k8s.Api | None = None
    loops: dict[str, Any] = field(default_factory=dict)  # WarmPool uid → PoolLoop
    weight_cache: dict[str, tuple[int | None, str, str]] = field(default_factory=dict)
    validations: dict[str, Any] = field(default_factory=dict)  # ModelDeployment uid → (Validation, bytes)
    observations: dict[str, Any] = field(default_factory=dict)  # ModelDeployment uid → ModelObservation
    model_extras: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid → forecast/observedLoad
    workload_problems: dict[str, tuple[str, str]] = field(default_factory=dict)  # pool uid → (reason, message)
    _locks: dict[tuple[str | None, str], asyncio.Lock] = field(default_factory=dict)

    def pool_lock(self, namespace: str | None, pool: str) -> asyncio.Lock:
        """Serialises plan writes of one pool between the control loop and ModelDeployment deletion."""
        return self._locks.setdefault((namespace, pool), asyncio.Lock())

    def require_api(self) -> k8s.Api:
        if self.api is None:
            raise kopf.TemporaryError("the operator has not finished starting", delay=1)
        return self.api
