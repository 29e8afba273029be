"""A fast fake of a vLLM OpenAI server, for router tests and the router-overhead benchmark (bench/e2e.py).

It answers `/v1/completions` and `/v1/chat/completions` for one model name, streaming (SSE) or not, after an
optional delay; it can be told to drop connections mid-stream and counts what it served. Tests import it
(tests/router/conftest.py puts bench/ on the path); the benchmark runs it as its own process:

    python bench/fake_engine.py --port PORT [--model NAME] [--chunks N] [--delay SECONDS]

which prints one line `READY <port>` once it listens and serves until it is terminated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeEngine:
    def __init__(self, model: str, delay: float = 0.0, chunks: int = 3, port: int | None = None) -> None:
        self.model = model
        self.delay = delay
        self.chunks = chunks
        self.break_after: int | None = None  # drop the connection after this many streamed chunks
        self.served = 0
        self.started = asyncio.Event()  # set when a request arrived (the engine is "in flight")
        self.port = port or free_port()
        self.server: TestServer | None = None
        self._transports: set[asyncio.BaseTransport] = set()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> FakeEngine:
        app = web.Application()
        app.router.add_post("/v1/completions", self.handle)
        app.router.add_post("/v1/chat/completions", self.handle)
        self.server = TestServer(app, host="127.0.0.1", port=self.port)
        await self.server.start_server()
        return self

    async def kill(self) -> None:
        """Die at once: every open connection is cut, nothing in flight is answered."""
        for transport in self._transports:
            transport.close()
        await self.stop()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None

    def _chunk(self, i: int, chat: bool) -> dict[str, Any]:
        if chat:
            choice: dict[str, Any] = {"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}
            return {
                "id": "x",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": self.model,
                "choices": [choice],
            }
        return {
            "id": "x",
            "object": "text_completion",
            "created": 0,
            "model": self.model,
            "choices": [{"index": 0, "text": f"tok{i} ", "finish_reason": None}],
        }

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("model") != self.model:
            return web.json_response(
                {"error": {"message": f"The model `{body.get('model')}` does not exist."}}, status=404
            )
        self.started.set()
        if request.transport is not None:
            self._transports.add(request.transport)
        if self.delay:
            await asyncio.sleep(self.delay)
        chat = request.path.endswith("chat/completions")
        if not body.get("stream"):
            self.served += 1
            if chat:
                msg = {"role": "assistant", "content": "".join(f"tok{i} " for i in range(self.chunks))}
                choice = {"index": 0, "message": msg, "finish_reason": "length"}
                return web.json_response(
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": self.model,
                        "choices": [choice],
                        "usage": {
                            "prompt_tokens": 1,
                            "completion_tokens": self.chunks,
                            "total_tokens": self.chunks + 1,
                        },
                    }
                )
            return web.json_response(
                {
                    "id": "x",
                    "object": "text_completion",
                    "created": 0,
                    "model": self.model,
                    "choices": [
                        {"index": 0, "text": "".join(f"tok{i} " for i in range(self.chunks)), "finish_reason": "length"}
                    ],
                }
            )
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for i in range(self.chunks):
            if self.break_after is not None and i >= self.break_after:
                assert request.transport is not None
                request.transport.close()  # the engine dies mid-answer
                return out
            await out.write(f"data: {json.dumps(self._chunk(i, chat))}\n\n".encode())
            await asyncio.sleep(0.01)
        await out.write(b"data: [DONE]\n\n")
        self.served += 1
        await out.write_eof()
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--model", default="fake", help="the one model name it serves (default fake)")
    parser.add_argument("--chunks", type=int, default=3, help="streamed chunks per answer (default 3)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before answering (default 0)")
    args = parser.parse_args(argv)

    async def serve() -> None:
        engine = await FakeEngine(args.model, delay=args.delay, chunks=args.chunks, port=args.port or None).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"READY {engine.port}", flush=True)
        await stop.wait()
        await engine.stop()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
