"""The router's HTTP side: OpenAI routes proxied to engines, with holding, retries and streaming.

- `GET /v1/models`: every deployed model's served name, including models scaled to zero.
- `POST /v1/completions`, `POST /v1/chat/completions`: routed by the body's `model`. A request is held while
  its model has no ready engine and sent as soon as one is. Answers of the router itself: 404 (OpenAI shape)
  for a model nobody deployed, 429 with `Retry-After` when the model's queue is full, 504 when the request
  waited longer than the maximum, 400 for a body that is not a JSON object with a string `model`.
- An engine that fails before the first byte of its answer reached the client (connection refused or
  dropped, the engine no longer serves the model, 503) is set aside and the request goes to another engine or
  back to the queue, so a dying engine loses no request. A streamed answer that breaks after it started ends
  with an SSE error event (`data: {"error": ...}`) instead of a silent cut.
- `GET /healthz` (the process runs), `GET /readyz` (discovery has listed everything once), `GET /metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from warmserve.router.dispatch import Dispatcher, QueueFull, UnknownModel, WaitTimeout
from warmserve.router.metrics import RouterMetrics
from warmserve.router.table import Backend, Snapshot

log = logging.getLogger(__name__)

ROUTES = ("/v1/completions", "/v1/chat/completions")
RETRYABLE_STATUSES = frozenset({404, 502, 503})  # the engine does not (or no longer) serve the model
SSE = "text/event-stream"
JSON_HEADERS = {"Content-Type": "application/json"}

#: Discovery: runs for ever, calling `publish(snapshot)` whenever what it knows changes.
Discovery = Callable[[Callable[[Snapshot], None]], Awaitable[None]]


@dataclass(frozen=True)
class RouterSettings:
    host: str = "0.0.0.0"
    port: int = 8080
    max_queue: int = 256  # held requests per model before 429
    max_wait_seconds: float = 300.0  # longest a request is held before 504
    retry_after_seconds: int = 2  # Retry-After of a 429
    connect_timeout_seconds: float = 5.0
    read_timeout_seconds: float = 600.0  # longest silence from an engine mid-answer
    max_body_bytes: int = 16 << 20


class EngineFailed(Exception):
    """The engine failed before anything was sent to the client: the request can go elsewhere."""


def openai_error(status: int, message: str, kind: str, code: str | None = None, **headers: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers or None)


class Router:
    """One router: a dispatcher, its metrics, a client session to the engines and the aiohttp routes."""

    def __init__(
        self,
        settings: RouterSettings | None = None,
        discovery: Discovery | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or RouterSettings()
        self.discovery = discovery
        self.clock = clock
        self.dispatcher = Dispatcher(max_queue=self.settings.max_queue, clock=clock)
        self.metrics = RouterMetrics(self.dispatcher)
        self._session: aiohttp.ClientSession | None = None
        # a counter of "a request had to wait for an engine" events and a condition for `GET /v1/warmserve/demand`
        self.holds = 0
        self.boot = uuid.uuid4().hex  # tells a demand poller that the router restarted (counts start again)
        self._held = asyncio.Condition()
        self.on_hold: Callable[[str], None] | None = None  # in-process listeners (warmserve up)
        self.dispatcher.on_hold = self._on_hold

    def _on_hold(self, model: str) -> None:
        self.holds += 1
        if self.on_hold is not None:
            self.on_hold(model)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._held:
            self._held.notify_all()

    # -- lifecycle ----------------------------------------------------------------------------------------
    def publish(self, snapshot: Snapshot) -> None:
        self.dispatcher.update(snapshot)

    async def _background(self, app: web.Application) -> AsyncIterator[None]:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.settings.connect_timeout_seconds,
                sock_read=self.settings.read_timeout_seconds,
            ),
            auto_decompress=False,
        )
        tasks = [asyncio.create_task(self._ticker(), name="router-ticker")]
        if self.discovery is not None:
            tasks.append(asyncio.create_task(self._discover(), name="router-discovery"))
        yield
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._session.close()

    async def _discover(self) -> None:
        assert self.discovery is not None
        while True:
            try:
                await self.discovery(self.publish)  # returns when a watch ends: list and watch again
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep routing with what is known; discovery starts again
                log.warning("router discovery failed (%s: %s); retrying in 2 s", type(exc).__name__, exc)
                await asyncio.sleep(2.0)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.dispatcher.tick()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body_bytes)
        app.cleanup_ctx.append(self._background)
        app.router.add_get("/v1/models", self.models)
        for route in ROUTES:
            app.router.add_post(route, self.proxy)
        app.router.add_get("/v1/warmserve/demand", self.demand)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_page)
        return app

    # -- small routes ---------------------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "warmserve"}
            for name in sorted(self.dispatcher.snapshot.models)
        ]
        return web.json_response({"object": "list", "data": data})

    async def demand(self, request: web.Request) -> web.Response:
        """Per-model demand, answered as soon as a request had to wait after hold number `after` (a long poll
        of at most `timeout` seconds): how the operator hears of a model without engines within a second."""
        try:
            after = int(request.query.get("after", "-1"))
            timeout = min(max(float(request.query.get("timeout", "30")), 0.0), 60.0)
        except ValueError:
            return openai_error(400, "after must be an integer and timeout a number", "invalid_request_error")
        if self.holds <= after and request.query.get("boot", self.boot) == self.boot:
            async with self._held:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._held.wait_for(lambda: self.holds > after), timeout)
        d = self.dispatcher
        models = {m: {"requests": d.requests(m), "waiting": d.waiting(m)} for m in d.models()}
        return web.json_response({"holds": self.holds, "boot": self.boot, "models": models})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        if not self.dispatcher.snapshot.synced:
            return web.Response(status=503, text="discovery has not synced yet\n")
        return web.Response(text="ok\n")

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), content_type="text/plain", charset="utf-8")

    # -- the proxy ------------------------------------------------------------------------------------------
    async def proxy(self, request: web.Request) -> web.StreamResponse:
        arrival = self.clock()
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return openai_error(400, "The request body must be a JSON object.", "invalid_request_error")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
            return openai_error(400, "The request needs a string `model`.", "invalid_request_error", "model")
        model: str = body["model"]
        try:
            self.dispatcher.admit(model)
        except UnknownModel as exc:
            self.metrics.response("", "404")
            return openai_error(404, str(exc), "invalid_request_error", "model_not_found")
        self.metrics.arrival(model)
        code = "500"
        try:
            response = await self._route(request, raw, body, model, arrival)
            code = str(response.status)
            return response
        except (ConnectionResetError, asyncio.CancelledError):  # the client went away (handler cancellation)
            code = "499"
            raise
        finally:
            self.dispatcher.finish(model)
            self.metrics.response(model, code)

    async def _route(
        self, request: web.Request, raw: bytes, body: dict[str, Any], model: str, arrival: float
    ) -> web.StreamResponse:
        deadline = arrival + self.settings.max_wait_seconds
        waited = False
        while True:
            try:
                backend = await self.dispatcher.acquire(model, deadline, retry=waited)
            except UnknownModel as exc:
                return openai_error(404, str(exc), "invalid_request_error", "model_not_found")
            except QueueFull as exc:
                return openai_error(
                    429,
                    str(exc),
                    "rate_limit_error",
                    "queue_full",
                    **{"Retry-After": str(self.settings.retry_after_seconds)},
                )
            except WaitTimeout as exc:
                return openai_error(504, str(exc), "timeout_error", "no_engine_ready")
            if not waited:
                self.metrics.observe_queue_wait(model, self.clock() - arrival)
                waited = True
            try:
                return await self._forward(request, backend, raw, body, arrival)
            except EngineFailed as exc:
                log.warning(
                    "engine %s failed a request for %s before answering (%s); sending it again",
                    backend.address,
                    model,
                    exc,
                )
                self.dispatcher.mark_down(backend)
                self.metrics.retry(model)
            finally:
                self.dispatcher.release(backend)

    async def _forward(
        self, request: web.Request, backend: Backend, raw: bytes, body: dict[str, Any], arrival: float
    ) -> web.StreamResponse:
        """Send the request to `backend` (its bytes as they came when the engine serves the model under the name
        the client used, else re-encoded with the engine's name) and relay the answer, streamed chunk by chunk."""
        assert self._session is not None
        if body["model"] == backend.engine_model:
            data = raw
        else:
            data = json.dumps({**body, "model": backend.engine_model}).encode()
        sent = self.clock()
        try:
            resp = await self._session.post(backend.url + request.path, data=data, headers=JSON_HEADERS)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EngineFailed(f"{type(exc).__name__}: {exc}") from exc
        async with resp:
            if resp.status in RETRYABLE_STATUSES:
                raise EngineFailed(f"HTTP {resp.status}")
            if not resp.content_type.startswith(SSE):
                try:
                    data = await resp.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raise EngineFailed(f"{type(exc).__name__} while reading the answer") from exc
                now = self.clock()
                self.metrics.observe_ttft(backend.model, now - arrival)
                return web.Response(
                    body=data,
                    status=resp.status,
                    content_type=resp.content_type,
                    headers={"Server-Timing": server_timing(arrival, sent, now)},
                )
            try:
                first = await resp.content.readany()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise EngineFailed(f"{type(exc).__name__} before the first chunk") from exc
            if not first:
                raise EngineFailed("the stream ended before its first chunk")
            now = self.clock()
            headers = {
                "Content-Type": SSE,
                "Cache-Control": "no-cache",
                "Server-Timing": server_timing(arrival, sent, now),
            }
            out = web.StreamResponse(status=resp.status, headers=headers)
            await out.prepare(request)
            self.metrics.observe_ttft(backend.model, now - arrival)
            await out.write(first)
            try:
                async for chunk in resp.content.iter_any():
                    await out.write(chunk)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("engine %s broke a streamed answer for %s: %s", backend.address, backend.model, exc)
                error = {
                    "error": {
                        "message": f"the engine serving {backend.model} failed mid-answer",
                        "type": "engine_error",
                        "code": 502,
                    }
                }
                await out.write(f"data: {json.dumps(error)}\n\n".encode())
            await out.write_eof()
            return out


def server_timing(arrival: float, sent: float, first: float) -> str:
    """The `Server-Timing` header of an answer: time before the engine was asked (`queue`: held, admitted,
    routed) and the engine's time to its first chunk as the router saw it (`engine`), in milliseconds. A client
    subtracts `engine` from its own time to first token to get what the router added to that request."""
    return f"queue;dur={(sent - arrival) * 1e3:.3f}, engine;dur={(first - sent) * 1e3:.3f}"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (less CPU per proxied request, so a shorter tail on a busy node), else
    asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(
    router: Router,
    host: str,
    port: int,
    drain_seconds: float = 60.0,
    on_cleanup: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM, then give held and running requests `drain_seconds` to finish.

    `on_cleanup` runs last, after the router's own clean-up, also when the server could not start (an `OSError`
    such as a port in use is raised after it)."""
    app = router.app()
    if on_cleanup is not None:
        app.on_cleanup.append(lambda _app: on_cleanup())
    web.run_app(
        app,
        loop=new_event_loop(),
        host=host,
        port=port,
        print=None,
        access_log=None,
        shutdown_timeout=drain_seconds,
        handler_cancellation=True,  # a client that goes away releases its place in the queue
    )
