"""Per-model holding queues and the choice of an engine (asyncio, no HTTP).

A request for a known model takes a ready engine at once (fewest requests in flight first) or waits in its
model's queue, first come first served, until an engine is ready. It is refused only when the queue is full
(`QueueFull`, the HTTP layer answers 429 with Retry-After) or its wait exceeds the maximum (`WaitTimeout`,
504); a model nobody deployed is `UnknownModel` (404). An engine that failed a request is set aside until
discovery reports it again after the failure, so a retry goes to another engine or back to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from warmserve.router.table import Backend, Snapshot


class DispatchError(Exception):
    """A request cannot be given an engine."""


class UnknownModel(DispatchError):
    pass


class QueueFull(DispatchError):
    pass


class WaitTimeout(DispatchError):
    pass


@dataclass
class _Model:
    waiting: deque[asyncio.Future[Backend]] = field(default_factory=deque)
    requests: int = 0  # in the router: waiting + sent to an engine


class Dispatcher:
    """Hands out engines to requests; `update` installs a new snapshot and wakes whoever it can serve."""

    def __init__(
        self, max_queue: int = 256, down_seconds: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_queue = max_queue
        self.down_seconds = down_seconds
        self.clock = clock
        self.snapshot = Snapshot(synced=False)
        self._models: dict[str, _Model] = {}
        self._inflight: dict[Backend, int] = {}
        self._down: dict[Backend, float] = {}  # engine → clock time until which it is set aside
        self.on_hold: Callable[[str], None] | None = None  # told when a request must wait (wake the planner)

    # -- what the metrics and the operator read -------------------------------------------------------------
    def requests(self, model: str) -> int:
        """Requests for `model` in the router now: held plus sent to an engine (the model's demand)."""
        m = self._models.get(model)
        return m.requests if m else 0

    def waiting(self, model: str) -> int:
        m = self._models.get(model)
        return sum(not f.done() for f in m.waiting) if m else 0

    def inflight(self, backend: Backend) -> int:
        return self._inflight.get(backend, 0)

    def models(self) -> list[str]:
        return sorted(self.snapshot.models | set(self._models))

    def known(self, model: str) -> bool:
        """A deployed model; before discovery has synced once every name is held as possibly known."""
        return model in self.snapshot.models or not self.snapshot.synced

    # -- discovery ------------------------------------------------------------------------------------------
    def update(self, snapshot: Snapshot) -> None:
        """Install a new snapshot: engines reported again are usable again; waiters are served in order."""
        self.snapshot = snapshot
        current = set(snapshot.backends)
        # an engine that failed stays aside while discovery keeps listing it, for at most `down_seconds`: a
        # stale report cannot send traffic straight back to a dead engine, a restarted one is used again
        self._down = {b: until for b, until in self._down.items() if b in current}
        for backend in list(self._inflight):
            if backend not in current and self._inflight[backend] == 0:
                del self._inflight[backend]
        for model in list(self._models):
            self._wake(model)
            if snapshot.synced and model not in snapshot.models:
                self._fail_waiters(model, UnknownModel(f"The model `{model}` does not exist."))

    def tick(self) -> None:
        """Serve waiters whose model has an engine again after a set-aside ran out (called every second)."""
        for model in list(self._models):
            self._wake(model)

    def mark_down(self, backend: Backend) -> None:
        """`backend` failed a request before answering: route around it until discovery reports it anew."""
        self._down[backend] = self.clock() + self.down_seconds

    # -- requests -------------------------------------------------------------------------------------------
    def _ready(self, model: str) -> list[Backend]:
        now = self.clock()
        return [b for b in self.snapshot.backends_of(model) if self._down.get(b, now) <= now]

    def _pick(self, model: str) -> Backend | None:
        ready = self._ready(model)
        if not ready:
            return None
        backend = min(ready, key=lambda b: (self._inflight.get(b, 0), b.url))
        self._inflight[backend] = self._inflight.get(backend, 0) + 1
        return backend

    def admit(self, model: str) -> None:
        """Count a new request for `model` (before `acquire`); raises UnknownModel for an unknown model."""
        if not self.known(model):
            raise UnknownModel(f"The model `{model}` does not exist.")
        self._models.setdefault(model, _Model()).requests += 1

    def finish(self, model: str) -> None:
        """The request counted by `admit` has left the router (answered or refused)."""
        m = self._models.get(model)
        if m is not None:
            m.requests -= 1
            if m.requests <= 0 and not m.waiting and model not in self.snapshot.models and self.snapshot.synced:
                del self._models[model]

    async def acquire(self, model: str, deadline: float, retry: bool = False) -> Backend:
        """An engine for `model`, holding the request until one is ready or `deadline` (clock time) passes.

        A `retry` (its engine failed before answering) was admitted already: it is never refused for a full
        queue and waits at the head of it, so a dying engine loses no request and reorders none.
        """
        if not self.known(model):
            raise UnknownModel(f"The model `{model}` does not exist.")
        m = self._models.setdefault(model, _Model())
        if retry or not m.waiting:
            backend = self._pick(model)
            if backend is not None:
                return backend
        if not retry and self.waiting(model) >= self.max_queue:
            raise QueueFull(f"{self.max_queue} requests for {model!r} are already waiting for an engine")
        future: asyncio.Future[Backend] = asyncio.get_running_loop().create_future()
        if retry:
            m.waiting.appendleft(future)
        else:
            m.waiting.append(future)
        if self.on_hold is not None:
            self.on_hold(model)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=max(0.0, deadline - self.clock()))
        except TimeoutError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result())  # served at the very last moment: give the engine back
            raise WaitTimeout(f"no engine for {model!r} became ready in time") from None
        finally:
            if not future.done():
                future.cancel()
            with contextlib.suppress(ValueError):
                m.waiting.remove(future)

    def release(self, backend: Backend) -> None:
        """A request sent to `backend` is done; the engine may take a waiter."""
        n = self._inflight.get(backend, 0) - 1
        if n > 0:
            self._inflight[backend] = n
        else:
            self._inflight.pop(backend, None)
        self._wake(backend.model)

    def _wake(self, model: str) -> None:
        m = self._models.get(model)
        if m is None:
            return
        while m.waiting:
            future = m.waiting[0]
            if future.done():
                m.waiting.popleft()
                continue
            backend = self._pick(model)
            if backend is None:
                return
            m.waiting.popleft()
            future.set_result(backend)

    def _fail_waiters(self, model: str, error: Exception) -> None:
        m = self._models.get(model)
        while m is not None and m.waiting:
            future = m.waiting.popleft()
            if not future.done():
                future.set_exception(error)
