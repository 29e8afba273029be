"""The only module that talks to Kubernetes: read/watch our pod's plan, patch our state.

Behind a tiny interface (:class:`PodAnnotations`) so the agent loop is the same
against a real API server, kmock's emulator, or files (:class:`LocalFiles`).
Uses the official ``kubernetes`` client (synchronous) in a background thread.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Protocol

from warmserve.protocol import PLAN_ANNOTATION, WorkerState, state_patch
from warmserve.worker.files import write_json_atomic

log = logging.getLogger(__name__)


class PodAnnotations(Protocol):
    def latest_plan(self) -> str | None:
        """The newest plan text seen (``None`` until there is one)."""

    def write_state(self, state: WorkerState) -> None: ...

    def close(self) -> None: ...


class LocalFiles:
    """Local mode: plan from a JSON file (re-read when it changes), state to a file."""

    def __init__(self, plan_path: str, state_path: str):
        self.plan_path, self.state_path = plan_path, state_path
        self._mtime: int | None = None
        self._text: str | None = None

    def latest_plan(self) -> str | None:
        try:
            mtime = os.stat(self.plan_path).st_mtime_ns
        except FileNotFoundError:
            return self._text
        if mtime != self._mtime:
            with open(self.plan_path) as fh:
                self._text = fh.read()
            self._mtime = mtime
        return self._text

    def write_state(self, state: WorkerState) -> None:
        write_json_atomic(self.state_path, state.to_json(), indent=1)

    def close(self) -> None:
        pass


class KubePod:
    """Watches one pod (ours) for its plan annotation; patches the state annotation."""

    def __init__(self, namespace: str, name: str, api: Any = None, read_timeout: float = 30.0):
        from kubernetes import client, config

        if api is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api = client.CoreV1Api()
        self.api, self.namespace, self.name = api, namespace, name
        # A client-side read timeout bounds how long a quiet watch blocks, so close()
        # returns promptly; the loop simply re-lists and re-watches.
        self.read_timeout = read_timeout
        self._plan: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch_loop, name="plan-watch", daemon=True)
        self._thread.start()

    def _set_from(self, pod: Any) -> None:
        meta = pod.metadata if hasattr(pod, "metadata") else None
        if meta is None or meta.name != self.name:
            return  # the emulator ignores field selectors: filter ourselves
        plan = (meta.annotations or {}).get(PLAN_ANNOTATION)
        if plan is not None:
            self._plan = plan

    def _watch_loop(self) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            try:
                self._set_from(self.api.read_namespaced_pod(self.name, self.namespace))
                w = watch.Watch()
                for event in w.stream(
                    self.api.list_namespaced_pod,
                    self.namespace,
                    field_selector=f"metadata.name={self.name}",
                    timeout_seconds=300,
                    _request_timeout=(5, self.read_timeout),
                ):
                    if self._stop.is_set():
                        w.stop()
                        break
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        self._set_from(event["object"])
            except Exception as exc:  # keep watching through API hiccups and read timeouts
                if self._stop.is_set():
                    break
                if "timed out" not in str(exc).lower():
                    log.warning("watching pod %s/%s failed (%s); retrying", self.namespace, self.name, exc)
                    self._stop.wait(1.0)

    def latest_plan(self) -> str | None:
        return self._plan

    def write_state(self, state: WorkerState) -> None:
        self.api.patch_namespaced_pod(self.name, self.namespace, state_patch(state))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.read_timeout + 5)
