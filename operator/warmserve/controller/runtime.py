"""The operator's process-wide services, created once and handed to every handler through `register()`.

Keeping them in one explicit object (instead of module globals) lets the tests run a fresh operator per test,
point it at an emulated API server, and inject a fake load scraper and clock. It holds services, not shared
data: what a pool's loop knows stays in its `PoolLoop`, what a WarmPool handler tells that loop goes through
kopf's per-object memo (`pools.record_workload_problem`), and status is written by the owners listed in
docs/operator.md ("Status owners").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kopf

from warmserve.controller import k8s
from warmserve.controller.demand import Wakeups
from warmserve.controller.metrics import OperatorMetrics
from warmserve.controller.settings import ControllerConfig
from warmserve.controller.weights import WeightResolver

Credentials = Callable[[kopf.OperatorSettings], kopf.ConnectionInfo]


@dataclass
class Runtime:
    config: ControllerConfig = field(default_factory=ControllerConfig)
    credentials: Credentials = k8s.login
    clock: Callable[[], float] = time.time
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    scraper_factory: Callable[..., Any] | None = None  # (runtime, pool spec) → LoadScraper; None = default
    on_loop: Callable[[Any], None] | None = None  # called with every PoolLoop a daemon starts (tests look inside)
    api: k8s.Api | None = None
    weights: WeightResolver = field(init=False)  # the one place weight bytes are decided
    wakeups: Wakeups = field(default_factory=Wakeups)  # set by the router's demand: run the pool rounds now
    _locks: dict[tuple[str | None, str], asyncio.Lock] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.weights = WeightResolver(self.config.pvc_root)

    def pool_lock(self, namespace: str | None, pool: str) -> asyncio.Lock:
        """Serialises plan writes of one pool between the control loop and ModelDeployment deletion."""
        return self._locks.setdefault((namespace, pool), asyncio.Lock())

    def require_api(self) -> k8s.Api:
        if self.api is None:
            raise kopf.TemporaryError("the operator has not finished starting", delay=1)
        return self.api
