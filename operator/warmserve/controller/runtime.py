"""The operator's process-wide services, created once and handed to every handler through `register()`.

Keeping them in one explicit object (instead of module globals) lets the tests run a fresh operator per test,
point it at an emulated API server, and inject a fake load scraper and clock. It holds services, not shared
data: what a pool's loop knows stays in its `PoolLoop`, what a WarmPool handler tells that loop goes through
kopf's per-object memo (`pools.record_workload_problem`), and status is written by the owners listed in
docs/operator.md ("Status owners").
"""

from __future__ import annotations

import asyncio
import gc
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


#: Tracked objects allocated (net of those freed) before a young collection runs: Python's default is 700.
GC_YOUNG_THRESHOLD = 50_000


def configure_gc() -> None:
    """Keep the cyclic garbage collector off a pool round's path; called once, before the pools' loops start.

    What the process holds from startup to exit — modules, classes and functions of kopf, aiohttp, numpy,
    prometheus_client and its own, tens of thousands of objects — would be traversed again by every full
    collection: ~25 ms against a ~29 ms round at 64 workers, every ten rounds or so (`bench/operator_loop.py`).
    A collection first (no garbage is left to freeze), then `gc.freeze` moves them to the permanent
    generation: a full collection traverses only what was made since. Frozen objects are still freed by
    reference counting; only cycles among them would never be collected.

    A round replaces the state the last one built (parsed plans and states, the cluster state, the status):
    objects that live for exactly one round. With young collections every 700 allocations, they are still
    alive when collected, move to the older generations and die there, which runs a full collection every
    round at 512 workers (~10 ms of a ~42 ms round, with the young ones). At `GC_YOUNG_THRESHOLD` a round's
    churn, balanced by what it frees, no longer triggers collections; garbage cycles still do, once that
    many objects are waiting (a few MB).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
