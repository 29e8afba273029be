"""The worker's control path into a running vLLM API server: ``POST /warmserve/bind`` and ``/warmserve/release``.

Installed with vLLM's ``--middleware`` option (an ASGI class; every other path passes straight through).
``release`` drops the kernels a standby engine built from its scratch weights once it is initialised
(``collective_rpc("warmserve_release")``); ``bind`` binds it to a warm replica (``collective_rpc("warmserve_bind")``
on every rank, then a prefix-cache reset: blocks computed before the bind came from scratch weights).

Only the worker that started the engine may call it: the request must come from the loopback interface
(the worker and its engines share the pod's network namespace; the router and clients do not) and carry the
engine's secret (``X-WarmServe-Token``, compared in constant time), which the worker hands the engine in its
environment and never publishes. Anything else is a 403 and reaches no engine code.

Imported only inside vLLM processes.
"""

from __future__ import annotations

import hmac
import json
import os
from typing import Any

TOKEN_ENV = "WARMSERVE_CONTROL_TOKEN"
TOKEN_HEADER = b"x-warmserve-token"
PREFIX = "/warmserve/"
BIND_PATH = "/warmserve/bind"
RELEASE_PATH = "/warmserve/release"
LOOPBACK = {"127.0.0.1", "::1"}
MAX_BODY = 64 << 10


class ControlMiddleware:
    """Pure ASGI middleware (no per-request cost on other paths, streaming untouched)."""

    def __init__(self, app: Any):
        self.app = app
        self.token = os.environ.get(TOKEN_ENV, "")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or not str(scope.get("path", "")).startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        if not self._allowed(scope):
            await _reply(send, 403, {"error": "forbidden"})
            return
        if scope["path"] not in (BIND_PATH, RELEASE_PATH) or scope.get("method") != "POST":
            await _reply(send, 404, {"error": f"no control endpoint {scope['method']} {scope['path']}"})
            return
        engine = scope["app"].state.engine_client
        if scope["path"] == RELEASE_PATH:
            try:
                ranks = await engine.collective_rpc("warmserve_release")
            except Exception as exc:
                await _reply(send, 500, {"error": f"release failed: {type(exc).__name__}: {exc}"})
                return
            await _reply(send, 200, {"ranks": ranks})
            return
        try:
            body = json.loads(await _read_body(receive))
            manifest = body["manifest"]
            if not isinstance(manifest, str):
                raise TypeError("manifest must be a path")
        except (ValueError, KeyError, TypeError) as exc:
            await _reply(send, 400, {"error": f"bad bind request: {exc}"})
            return
        try:
            ranks = await engine.collective_rpc("warmserve_bind", args=(manifest,))
            await engine.reset_prefix_cache()
        except Exception as exc:  # the worker turns this into a per-replica error
            await _reply(send, 500, {"error": f"bind failed: {type(exc).__name__}: {exc}"})
            return
        await _reply(send, 200, {"ranks": ranks})

    def _allowed(self, scope: dict[str, Any]) -> bool:
        client = scope.get("client") or ("", 0)
        if not self.token or client[0] not in LOOPBACK:
            return False
        given = dict(scope.get("headers") or []).get(TOKEN_HEADER, b"")
        return hmac.compare_digest(given, self.token.encode())


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > MAX_BODY:
            raise ValueError("body too large")
        if not message.get("more_body"):
            return body


async def _reply(send: Any, status: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
