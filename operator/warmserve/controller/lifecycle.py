"""Operator start-up and clean-up: kopf settings, API client, metrics endpoint."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from warmserve.controller import demand, k8s
from warmserve.controller.runtime import Runtime
from warmserve.controller.settings import ANNOTATION_PREFIX, FINALIZER

log = logging.getLogger(__name__)
_background: set[asyncio.Task[None]] = set()  # the router demand watcher, while the operator runs


def configure(settings: kopf.OperatorSettings, runtime: Runtime) -> None:
    """Our finalizer and annotation prefix, so no kopf.zalando.org key ever lands on our objects."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX, v1=False)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration", v1=False
    )
    settings.posting.enabled = runtime.config.post_events
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.execution.max_workers = 4
    # HA: with a peering name, replicas elect the highest priority one; others pause (daemons stop too).
    settings.peering.standalone = runtime.config.standalone
    if not runtime.config.standalone:
        settings.peering.name = runtime.config.peering
        settings.peering.priority = runtime.config.priority
        settings.peering.mandatory = True
        settings.peering.clusterwide = runtime.config.clusterwide


async def startup(runtime: Runtime, settings: kopf.OperatorSettings, logger: Any) -> None:
    configure(settings, runtime)
    credentials = runtime.credentials
    runtime.api = k8s.Api(lambda: credentials(settings))
    try:
        runtime.metrics.serve(runtime.config.metrics_port)
    except OSError as exc:  # a port clash must not keep the operator from reconciling
        logger.warning(f"metrics endpoint on port {runtime.config.metrics_port} not started: {exc}")
    if runtime.config.router_url:
        task = asyncio.create_task(
            demand.watch_router(runtime.config.router_url, runtime.wakeups), name="router-demand"
        )
        _background.add(task)
        task.add_done_callback(_background.discard)
    logger.info(
        "warmserve operator started",
        extra={
            "namespaces": list(runtime.config.namespaces),
            "peering": runtime.config.peering or "standalone",
        },
    )


async def cleanup(runtime: Runtime, logger: Any) -> None:
    for task in list(_background):
        task.cancel()
    if runtime.api is not None:
        await runtime.api.close()
        runtime.api = None
    logger.info("warmserve operator stopped")
