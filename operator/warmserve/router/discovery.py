"""Where the router's table comes from: a Kubernetes watch, or a function of the local runtime.

`KubeDiscovery` lists the ModelDeployments and the worker pods (label `warmserve.io/pool`) once, publishes a
synced snapshot, then follows both with watch streams and publishes again on every change; a stream that ends
(the API server closes watches after a few minutes) or fails is listed and watched again. No polling.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from warmserve.protocol import POOL_LABEL, ProtocolError, WorkerState, state_of_pod
from warmserve.router.table import Snapshot, WorkerReport, build_snapshot

log = logging.getLogger(__name__)


class WatchApi(Protocol):
    """What discovery needs of the Kubernetes client (`warmserve.controller.k8s.Api` has it)."""

    async def list_with_version(
        self, res: Any, namespace: str | None, label_selector: str | None = None
    ) -> tuple[list[dict[str, Any]], str]: ...

    def watch(
        self, res: Any, namespace: str | None, resource_version: str, label_selector: str | None = None
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]: ...


def served_name(obj: Mapping[str, Any]) -> str:
    """The name clients use for a ModelDeployment: `spec.model.servedName`, else the object's name."""
    meta = obj.get("metadata") or {}
    model = (obj.get("spec") or {}).get("model") or {}
    name = model.get("servedName") if isinstance(model, Mapping) else None
    return str(name or meta.get("name") or "")


@dataclass
class KubeDiscovery:
    api: WatchApi
    pods: Any  # k8s.PODS
    models: Any  # k8s.MODELDEPLOYMENTS
    namespaces: tuple[str, ...] = ()  # empty: all namespaces
    ports: range = range(1024, 65536)
    on_rejected: Callable[[str], None] | None = None
    _models: dict[str, str] = field(default_factory=dict)  # uid → served name
    _workers: dict[str, WorkerReport] = field(default_factory=dict)  # namespace/name → report

    def _model_event(self, kind: str, obj: Mapping[str, Any]) -> None:
        uid = (obj.get("metadata") or {}).get("uid") or ""
        if kind == "DELETED" or (obj.get("metadata") or {}).get("deletionTimestamp"):
            self._models.pop(uid, None)
        elif uid:
            self._models[uid] = served_name(obj)

    def _pod_event(self, kind: str, pod: Mapping[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        state: WorkerState | None = None
        if kind != "DELETED":
            try:
                state = state_of_pod(pod)
            except ProtocolError as exc:
                log.warning("worker %s reports a state the router cannot read: %s", key, exc)
        if state is None:
            self._workers.pop(key, None)
            return
        self._workers[key] = WorkerReport(state, (pod.get("status") or {}).get("podIP") or "", key)

    def snapshot(self) -> Snapshot:
        snap, rejected = build_snapshot(self._models, self._workers.values(), self.ports)
        for r in rejected:
            message = f"ignoring endpoint {r.endpoint} reported by {r.worker}: {r.reason}"
            log.warning(message)
            if self.on_rejected:
                self.on_rejected(message)
        return snap

    async def __call__(self, publish: Callable[[Snapshot], None]) -> None:
        self._models.clear()
        self._workers.clear()
        streams: list[tuple[str, Any, str | None, str, str | None]] = []
        for namespace in self.namespaces or (None,):
            models, model_version = await self.api.list_with_version(self.models, namespace)
            pods, pod_version = await self.api.list_with_version(self.pods, namespace, POOL_LABEL)
            for obj in models:
                self._model_event("ADDED", obj)
            for pod in pods:
                self._pod_event("ADDED", pod)
            streams += [
                ("model", self.models, namespace, model_version, None),
                ("pod", self.pods, namespace, pod_version, POOL_LABEL),
            ]
        publish(self.snapshot())
        events: asyncio.Queue[tuple[str, str, dict[str, Any]] | None] = asyncio.Queue()

        async def follow(what: str, res: Any, namespace: str | None, version: str, selector: str | None) -> None:
            try:
                async for kind, obj in self.api.watch(res, namespace, version, selector):
                    await events.put((what, kind, obj))
            finally:
                await events.put(None)  # a stream ended: list and watch again

        tasks = [asyncio.create_task(follow(*stream)) for stream in streams]
        try:
            while (item := await events.get()) is not None:
                what, kind, obj = item
                if kind == "BOOKMARK":
                    continue
                (self._model_event if what == "model" else self._pod_event)(kind, obj)
                publish(self.snapshot())
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
