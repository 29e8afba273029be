"""The agent's main loop and its small HTTP endpoint (``/metrics``, ``/healthz``, ``/state``)."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from warmserve.protocol import WorkerState
from warmserve.worker.agent import Agent
from warmserve.worker.kube import PodAnnotations

log = logging.getLogger(__name__)


class Runner:
    """Feeds plan changes to the agent, ticks it, publishes state when it changes.

    ``/healthz`` reports stale once no pass has completed for ``stale_after`` seconds (a pass never waits
    for engines: see :mod:`warmserve.worker.agent`).
    """

    def __init__(self, agent: Agent, pod: PodAnnotations, tick: float = 0.5, stale_after: float = 30.0):
        self.agent, self.pod, self.tick, self.stale_after = agent, pod, tick, stale_after
        self._plan_text: str | None = None
        self._published: str | None = None
        self.last_loop = time.monotonic()
        self.last_state: WorkerState | None = None

    def run_once(self) -> WorkerState:
        plan = self.pod.latest_plan()
        if plan is not None and plan != self._plan_text:
            self._plan_text = plan
            self.agent.apply(plan)
        state = self.agent.step()
        text = state.dumps()
        if text != self._published:
            try:
                self.pod.write_state(state)
                self._published = text
            except Exception:  # API hiccup: the state is published again next tick
                log.warning("publishing the worker state failed; retrying", exc_info=True)
        self.last_state = state
        self.last_loop = time.monotonic()
        return state

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.run_once()
            stop.wait(self.tick)

    def healthy(self) -> bool:
        return time.monotonic() - self.last_loop < self.stale_after


def serve_http(runner: Runner, host: str, port: int) -> ThreadingHTTPServer:
    """Start the endpoint in a daemon thread; returns the server (``.shutdown()`` to stop)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                body, ctype, code = runner.agent.metrics.exposition(), "text/plain; version=0.0.4", 200
            elif self.path == "/healthz":
                ok = runner.healthy()
                body, ctype, code = (b"ok" if ok else b"stale"), "text/plain", 200 if ok else 503
            elif self.path == "/state":
                state = runner.last_state.to_json() if runner.last_state is not None else {}
                body, ctype, code = json.dumps(state).encode(), "application/json", 200
            else:
                body, ctype, code = b"not found", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="worker-http", daemon=True).start()
    return server
