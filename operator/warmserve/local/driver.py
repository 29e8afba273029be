"""`warmserve up`: the whole system on one machine, without Kubernetes.

The same pieces as on a cluster, in one process:

- the operator's pool round (`controller.loop.PoolLoop`: observe → forecasts → decide → act) with a local
  observer (the YAML's objects, the local worker's plan and state, the router's per-model demand) and a local
  actuator (plans go straight to the worker, history to a file, status to the status line);
- one worker agent for the machine's devices (CUDA GPUs, or host shared-memory arenas: one, or `spec.gpu.count`
  of them on a CPU pool that asks for several), stepped on its own thread exactly as the sidecar steps it;
- the router on one port, fed from the worker's state after every step.

A held request wakes the pool round at once, so a model with no engine gets a promotion within a round's
latency, not a round's interval.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, TextIO

from aiohttp import web

from warmserve.controller.decide import Observation, ObservedModel, ObservedPool
from warmserve.controller.history import LoadHistory, OpenWindow
from warmserve.controller.loop import PoolLoop
from warmserve.controller.reconcile import WorkerView
from warmserve.controller.runtime import Runtime
from warmserve.controller.spec import PoolSpec, parse_model_spec, parse_pool_spec
from warmserve.local.config import LocalConfig
from warmserve.protocol import Phase, Plan, WorkerState
from warmserve.router.server import Router, RouterSettings
from warmserve.router.table import WorkerReport, build_snapshot

log = logging.getLogger("warmserve.up")
POD = "local"


class MemoryPod:
    """The worker's plan source and state sink inside one process (the sidecar's pod annotations)."""

    def __init__(self, on_state: Callable[[WorkerState], None]) -> None:
        self._plan: str | None = None
        self._lock = threading.Lock()
        self.on_state = on_state

    def set_plan(self, plan: Plan) -> None:
        with self._lock:
            self._plan = plan.dumps()

    def latest_plan(self) -> str | None:
        with self._lock:
            return self._plan

    def write_state(self, state: WorkerState) -> None:
        self.on_state(state)

    def close(self) -> None:
        pass


@dataclass
class LocalWorld:
    """What the local observer reads and the local actuator writes: the one place `up` keeps its state."""

    config: LocalConfig
    state_dir: str
    plan: Plan | None = None
    state: WorkerState | None = None
    pool_status: dict[str, Any] = field(default_factory=dict)
    model_status: dict[str, dict[str, Any]] = field(default_factory=dict)  # ModelDeployment name → status

    @property
    def history_path(self) -> str:
        return os.path.join(self.state_dir, "load-history.txt")

    @property
    def open_window_path(self) -> str:
        return os.path.join(self.state_dir, "load-window.json")

    def served_names(self) -> dict[str, str]:
        """{ModelDeployment uid: served name}."""
        return {
            m["metadata"]["uid"]: parse_model_spec(m["metadata"]["name"], m["spec"]).served_name
            for m in self.config.models
        }


class LocalObserver:
    def __init__(self, world: LocalWorld, runtime: Runtime, demand: Callable[[], Mapping[str, float]]) -> None:
        self.world = world
        self.runtime = runtime
        self.demand = demand

    async def load_history(self, pool: PoolSpec) -> LoadHistory:
        capacity = pool.forecast.history_days * pool.forecast.period
        try:
            with open(self.world.history_path) as fh:
                history = LoadHistory.decode(fh.read(), pool.forecast.window_seconds, capacity)
        except FileNotFoundError:
            history = None
        return history or LoadHistory(pool.forecast.window_seconds, capacity)

    async def load_open_window(self, pool: PoolSpec) -> OpenWindow | None:
        try:
            with open(self.world.open_window_path) as fh:
                return OpenWindow.decode(fh.read(), pool.forecast.window_seconds)
        except FileNotFoundError:
            return None

    async def observe(self, body: Mapping[str, Any], now: float, logger: Any) -> Observation:
        world = self.world
        pool = parse_pool_spec(body.get("spec"))
        meta = body.get("metadata") or {}
        worker = WorkerView(
            pod=POD,
            node=socket.gethostname(),
            ip="127.0.0.1",
            gpus=pool.gpu.count,
            ready=True,
            plan=world.plan,
            state=world.state,
        )
        models = []
        for md in world.config.models:
            m = md["metadata"]
            spec = parse_model_spec(m["name"], md["spec"])
            status = world.model_status.get(m["name"], {})
            weight = await self.runtime.weights.resolve(spec.weight_bytes, spec.source, status)
            models.append(ObservedModel(m["name"], m["uid"], 1, spec, weight, status))
        return Observation(
            now=now,
            stamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            pool=ObservedPool(
                name=meta["name"],
                namespace=meta.get("namespace"),
                uid=str(meta.get("uid", "")),
                generation=1,
                spec=pool,
                status=world.pool_status,
                body=body,
                desired_workers=1,
            ),
            workers=(worker,),
            models=tuple(models),
            load=dict(self.demand()),
        )


class LocalActuator:
    def __init__(self, world: LocalWorld, pod: MemoryPod) -> None:
        self.world = world
        self.pod = pod
        self._lock = asyncio.Lock()

    def exclusive(self) -> AbstractAsyncContextManager[Any]:
        return self._lock

    async def save_history(self, encoded: str, owner: Mapping[str, Any], logger: Any) -> None:
        from warmserve.worker.files import write_text_atomic

        write_text_atomic(self.world.history_path, encoded)

    async def save_open_window(self, encoded: str, owner: Mapping[str, Any], logger: Any) -> None:
        from warmserve.worker.files import write_text_atomic

        write_text_atomic(self.world.open_window_path, encoded)

    async def write_plan(self, pod: str, plan: Plan) -> None:
        self.world.plan = plan
        self.pod.set_plan(plan)

    async def patch_pool_status(self, status: Mapping[str, Any]) -> None:
        self.world.pool_status = {**self.world.pool_status, **status}

    async def patch_model_status(self, name: str, status: Mapping[str, Any]) -> None:
        self.world.model_status[name] = {**self.world.model_status.get(name, {}), **status}


def status_lines(world: LocalWorld, router: Router) -> list[str]:
    """One readable line per model: forecast, warm replicas, engines, requests held and in the router."""
    state = world.state
    lines = []
    for md in world.config.models:
        name, uid = md["metadata"]["name"], md["metadata"]["uid"]
        served = parse_model_spec(name, md["spec"]).served_name
        reps = [r for r in (state.replicas if state else ()) if r.uid == uid]
        warm = sum(r.phase == Phase.WARM for r in reps)
        loading = sum(r.phase == Phase.LOADING for r in reps)
        serving = sum(r.phase == Phase.SERVING for r in reps)
        starting = sum(r.phase == Phase.STARTING for r in reps)
        status = world.model_status.get(name, {})
        forecast = status.get("forecast") or {}
        fc = f"{forecast.get('avg', 0):.1f}/{forecast.get('peak', 0):.1f}" if forecast else "-"
        ready = next((c for c in status.get("conditions", []) if c.get("type") == "Valid"), None)
        problem = (
            f"  ({ready.get('reason')}: {ready.get('message')})" if ready and ready.get("status") == "False" else ""
        )
        lines.append(
            f"{served:<24} forecast {fc:>9}  warm {warm}{'+' + str(loading) if loading else ''}  "
            f"engines {serving}{'+' + str(starting) if starting else ''}  "
            f"waiting {router.dispatcher.waiting(served)}  in router {router.dispatcher.requests(served)}{problem}"
        )
    errors = [str(e) for e in (state.errors if state else ())]
    return lines + [f"worker error: {e}" for e in errors]


@dataclass
class UpSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    state_dir: str = ""  # default: a temporary directory, removed at exit
    arena_bytes: int | None = None  # CPU: bytes of the host arena (default: the pool's memoryMiB × fraction)
    engine_args: tuple[str, ...] = ("--enforce-eager",)  # the model's own max length: a fixed one may exceed it
    engine_env: Mapping[str, str] = field(
        default_factory=lambda: {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    )
    engine_port: int | None = None  # first engine port (default: the pool's worker.enginePortBase)
    shells: int = 1
    standby_engines: int | None = None  # pre-initialised engines; None: the pool's spec.worker.standbyEngines
    status_every: float = 5.0
    max_wait_seconds: float = 600.0
    max_queue: int = 256  # requests held per model before the router answers 429
    device: str = "auto"


class Up:
    """The running system; `run()` until `stop` is set (Ctrl-C), then everything is stopped and removed."""

    def __init__(self, config: LocalConfig, settings: UpSettings, out: TextIO = sys.stderr) -> None:
        if settings.standby_engines is not None:  # the planner flags as many replicas as the worker keeps
            config.pool.setdefault("spec", {}).setdefault("worker", {})["standbyEngines"] = settings.standby_engines
        self.config = config
        self.settings = settings
        self.out = out
        self._own_dir = not settings.state_dir
        self.saw_errors = False  # a worker error was reported: keep the state directory (engine logs) at exit
        self.state_dir = settings.state_dir or _tempdir()
        self.world = LocalWorld(config, self.state_dir)
        self.router = Router(
            RouterSettings(
                host=settings.host,
                port=settings.port,
                max_wait_seconds=settings.max_wait_seconds,
                max_queue=settings.max_queue,
            )
        )
        self.runtime = Runtime()
        self.wake = asyncio.Event()
        self.router.on_hold = lambda _model: self.wake.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.pod = MemoryPod(self._on_state)
        self.pool_loop = PoolLoop(
            self.runtime,
            config.pool["metadata"].get("namespace"),
            config.pool["metadata"]["name"],
            observer=LocalObserver(self.world, self.runtime, self._demand),
            actuator=LocalActuator(self.world, self.pod),
        )
        self.agent: Any = None
        self.arenas: dict[str, Any] = {}
        self._worker_stop = threading.Event()
        self._worker_thread: threading.Thread | None = None
        self.rounds = 0

    # -- the worker -----------------------------------------------------------------------------------------
    def _start_worker(self) -> None:
        from warmserve.worker.agent import Agent
        from warmserve.worker.devices import build_arenas
        from warmserve.worker.engines import EngineManager
        from warmserve.worker.runner import Runner

        pool = parse_pool_spec(self.config.pool.get("spec"))
        self.arenas = build_arenas(
            self.settings.device,
            state_dir=self.state_dir,
            cpu_devices=pool.devices_per_worker,  # host arenas: one per device the planner places on
            arena_bytes=self.settings.arena_bytes or pool.device_arena_bytes,
            page_size=pool.worker.page_size_bytes,
        )
        engines = EngineManager(
            self.state_dir,
            pool_size=self.settings.shells,
            base_port=self.settings.engine_port or pool.worker.engine_port_base,
            engine_args=list(self.settings.engine_args),
            env=dict(self.settings.engine_env),
        )
        engines.fill_pool()
        self.agent = Agent(self.arenas, self.state_dir, engines, standby_engines=pool.worker.standby_engines)
        runner = Runner(self.agent, self.pod, tick=0.2)
        self._worker_thread = threading.Thread(target=runner.run, args=(self._worker_stop,), name="worker", daemon=True)
        self._worker_thread.start()

    def _on_state(self, state: WorkerState) -> None:
        """Called on the worker thread whenever its state changes: hand it to the event loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._publish, state)

    def _publish(self, state: WorkerState) -> None:
        self.world.state = state
        self.saw_errors = self.saw_errors or bool(state.errors)
        snapshot, rejected = build_snapshot(self.world.served_names(), [WorkerReport(state, None, POD)])
        for r in rejected:
            log.warning("ignoring engine endpoint %s: %s", r.endpoint, r.reason)
        self.router.publish(snapshot)

    def _demand(self) -> dict[str, float]:
        d = self.router.dispatcher
        return {name: float(d.requests(name)) for name in d.models()}

    # -- the loop -------------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        runner = web.AppRunner(self.router.app(), access_log=None, handler_cancellation=True)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.settings.host, self.settings.port)
            await site.start()
            self._say(
                f"router listening on http://{self.settings.host}:{self.settings.port}/v1 (state in {self.state_dir})"
            )
            self._start_worker()
            self._publish(self.agent.state())
            pool = parse_pool_spec(self.config.pool.get("spec"))
            body = self.config.pool
            last_status = 0.0
            while not stop.is_set():
                self.wake.clear()
                try:
                    await self.pool_loop.tick(body, log)
                except Exception:
                    log.exception("pool round failed; retrying next interval")
                self.rounds += 1
                if time.monotonic() - last_status >= self.settings.status_every:
                    last_status = time.monotonic()
                    for line in status_lines(self.world, self.router):
                        self._say(line)
                waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.wake.wait())]
                await asyncio.wait(waits, timeout=pool.interval_seconds, return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
        finally:
            self._say("stopping: engines, worker, router")
            await runner.cleanup()
            await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Stop the worker thread and every engine, free the arenas, remove what `up` created."""
        self._worker_stop.set()
        if self._worker_thread is not None:
            self._worker_thread.join(timeout=30)
        if self.agent is not None:
            self.agent.shutdown(stop_engines=True)
        for arena in self.arenas.values():
            arena.close(unlink=True)
        if self._own_dir and self.saw_errors:
            self._say(f"the worker reported errors: engine logs kept in {self.state_dir}/engines")
        elif self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def _say(self, text: str) -> None:
        print(f"[warmserve up] {text}", file=self.out, flush=True)


def _tempdir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="warmserve-up-")
