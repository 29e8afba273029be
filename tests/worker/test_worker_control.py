"""The control middleware a standby engine is bound through (pure ASGI; no vLLM needed).

Only the worker may bind: a request from another address, without the token or with a wrong one is a 403
and never reaches the engine; other paths pass through untouched.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

from warmserve.worker import vllm_control
from warmserve.worker.vllm_control import BIND_PATH, TOKEN_ENV

TOKEN = "s3cret-token"


class FakeEngine:
    def __init__(self, fail: bool = False):
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.resets = 0
        self.fail = fail

    async def collective_rpc(self, method: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        self.calls.append((method, args))
        if self.fail:
            raise RuntimeError("shape mismatch")
        return [{"released_layers": 5}] if method == "warmserve_release" else [{"mapped_params": 3}]

    async def reset_prefix_cache(self) -> None:
        self.resets += 1


def call(
    middleware: vllm_control.ControlMiddleware,
    engine: FakeEngine,
    path: str = BIND_PATH,
    method: str = "POST",
    body: bytes = b'{"manifest": "/state/manifest-x.json"}',
    client: str = "127.0.0.1",
    token: str | None = TOKEN,
) -> tuple[int, Any]:
    headers = [(b"content-type", b"application/json")]
    if token is not None:
        headers.append((b"x-warmserve-token", token.encode()))
    scope = {
        "type": "http",
        "path": path,
        "method": method,
        "headers": headers,
        "client": (client, 5555),
        "app": SimpleNamespace(state=SimpleNamespace(engine_client=engine)),
    }
    sent: list[dict[str, Any]] = []
    chunks = [
        {"type": "http.request", "body": body[:10], "more_body": True},
        {"type": "http.request", "body": body[10:]},
    ]

    async def receive() -> dict[str, Any]:
        return chunks.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    status = sent[0]["status"]
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    return status, json.loads(payload) if payload.startswith(b"{") else payload


@pytest.fixture
def middleware(monkeypatch: pytest.MonkeyPatch) -> vllm_control.ControlMiddleware:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"engine"})

    return vllm_control.ControlMiddleware(app)


def test_the_worker_binds_through_the_loopback_with_its_token(middleware):
    engine = FakeEngine()
    status, body = call(middleware, engine)
    assert status == 200 and body == {"ranks": [{"mapped_params": 3}]}
    assert engine.calls == [("warmserve_bind", ("/state/manifest-x.json",))] and engine.resets == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"client": "10.0.0.7"},  # the router or any other pod
        {"token": None},
        {"token": "s3cret-tokem"},
        {"token": ""},
        {"client": "10.0.0.7", "path": "/warmserve/anything"},
    ],
)
def test_anyone_else_gets_403_and_reaches_nothing(middleware, kwargs):
    engine = FakeEngine()
    status, body = call(middleware, engine, **kwargs)
    assert status == 403 and body == {"error": "forbidden"}
    assert engine.calls == [] and engine.resets == 0


def test_an_engine_without_a_token_refuses_every_bind(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise AssertionError("not reached")

    engine = FakeEngine()
    assert call(vllm_control.ControlMiddleware(app), engine, token="")[0] == 403
    assert engine.calls == []


@pytest.mark.parametrize(
    ("body", "why"),
    [(b"not json", "bad bind request"), (b"{}", "bad bind request"), (b'{"manifest": 3}', "manifest must be a path")],
)
def test_a_bad_body_is_400(middleware, body, why):
    engine = FakeEngine()
    status, answer = call(middleware, engine, body=body)
    assert status == 400 and why in answer["error"] and engine.calls == []


def test_a_huge_body_is_refused(middleware):
    status, answer = call(middleware, FakeEngine(), body=b'{"manifest": "' + b"x" * (70 << 10) + b'"}')
    assert status == 400 and "too large" in answer["error"]


def test_a_failed_bind_is_a_500_with_the_reason(middleware):
    status, answer = call(middleware, FakeEngine(fail=True))
    assert status == 500 and "shape mismatch" in answer["error"]


def test_release_drops_the_standby_kernels_on_every_rank(middleware):
    engine = FakeEngine()
    status, body = call(middleware, engine, path="/warmserve/release", body=b"{}")
    assert status == 200 and body == {"ranks": [{"released_layers": 5}]}
    assert engine.calls == [("warmserve_release", ())] and engine.resets == 0
    assert call(middleware, FakeEngine(), path="/warmserve/release", client="10.1.2.3")[0] == 403


def test_other_control_paths_are_404(middleware):
    assert call(middleware, FakeEngine(), path="/warmserve/sleep")[0] == 404
    assert call(middleware, FakeEngine(), method="GET")[0] == 404


def test_every_other_path_passes_through_to_the_engine(middleware):
    status, body = call(middleware, FakeEngine(), path="/v1/completions", client="10.0.0.7", token=None)
    assert (status, body) == (299, b"engine")
