"""The worker agent: make the node hold what the plan says, report what it holds.

:meth:`Agent.step` is one idempotent reconcile pass, called whenever the plan
changes and on a short tick (to notice loads finishing and engines becoming
ready). The order inside a pass is what keeps memory safe:

1. **stop** engines whose replica is no longer served (demote: weights stay);
2. **evict** shards no longer in the plan (pages back to the free list);
3. **promote** served replicas whose shards are warm (engine maps them);
4. **prewarm** planned shards not yet held (allocates only if the pages fit).

Allocation happens after every free of the same pass and goes through the
ledger, so the arena is never over-committed; a replica that does not fit (or
whose files are bad) gets a per-replica error and the rest proceeds. A failed
replica is tried again when the plan's generation changes; a transient failure
(an engine that died starting, no engine shell in time, a load that failed) also
after a delay within the same generation (5 s, doubling up to 5 min).

A pass never waits long under the agent lock, so the state keeps being computed and
published (and ``/healthz`` stays fresh) whatever the engines do:

* a promotion that finds no idle pre-started engine shell waits for one on a
  background thread (up to ``shell_timeout``); meanwhile the replica is reported
  ``starting`` (with no endpoint yet). When a shell is ready the thread takes the lock
  briefly, re-checks that the replica is still served and warm, and launches the engine
  (or hands the shell back);
* stopping an engine (SIGTERM, then waiting up to ~15 s for its processes) runs on a
  background thread too. Until it is gone, the shards it maps are not evicted, and
  nothing is prewarmed on a GPU whose pages are about to be freed by that eviction.

Replicas are keyed by :class:`~warmserve.protocol.ReplicaKey` ``(uid, gpus)``
throughout (plan diffing, state, engines, adoption), so two replicas of one model on
one worker coexist; shards by :class:`~warmserve.worker.store.ShardKey`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from warmserve.protocol import (
    MAX_GENERATION,
    Capabilities,
    DeviceState,
    EngineState,
    Phase,
    Plan,
    PlannedReplica,
    ReplicaKey,
    ReplicaState,
    StandbyState,
    WorkerError,
    WorkerState,
    forbidden_engine_flag,
    parse_plan,
    unknown_plan_fields,
)
from warmserve.worker.arena import Arena
from warmserve.worker.engines import BindError, EngineRecord, Engines, Shape, gpu_memory_utilization, placement
from warmserve.worker.files import SourceError, safe_name, source_path
from warmserve.worker.metrics import WorkerMetrics
from warmserve.worker.store import Shard, ShardKey, ShardPhase, WeightStore

log = logging.getLogger(__name__)

#: How long a promotion waits for a pre-started engine shell before it fails.
SHELL_TIMEOUT_S = 120.0


@dataclass
class Failure:
    generation: int
    message: str
    attempts: int = 1
    retry_at: float = math.inf  # monotonic time from which a transient failure is tried again (same generation)


#: A transient failure (an engine that died starting, no shell in time, a load that failed) is tried again
#: within the same plan generation after RETRY_BASE_S, doubling per attempt up to RETRY_MAX_S: the operator's
#: plan does not change because of it, so without a retry a held request would wait for nothing.
RETRY_BASE_S = 5.0
RETRY_MAX_S = 300.0


@dataclass
class Agent:
    """Reconciles the arenas and engines of one worker with its plan.

    Replicas are keyed by ``(uid, gpus)`` (:class:`~warmserve.protocol.ReplicaKey`): two replicas of one
    model on different GPUs of this worker are two replicas. Ledger owners, meta files, engine records and
    manifest files are named by the key's string form (``ReplicaKey.id``), so a restarted agent recovers the
    same keys from what it finds on the node.
    """

    arenas: dict[str, Arena]
    state_dir: str
    engines: Engines | None = None
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    shell_timeout: float = SHELL_TIMEOUT_S
    #: pre-initialised engines to keep (at most one per model, warm-only models first); 0 disables them
    standby_engines: int = 0
    store: WeightStore = field(init=False)
    plan: Plan | None = None
    plan_error: str | None = None
    failures: dict[ReplicaKey, Failure] = field(default_factory=dict)
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _promote_recorded: set[ReplicaKey] = field(default_factory=set)
    # Loader threads report timings; they must not take the agent lock (evict joins them under it).
    _timings_lock: threading.Lock = field(default_factory=threading.Lock)
    # Promotions waiting for an engine shell, and engines being stopped, each on a background thread.
    _shell_waits: set[ReplicaKey] = field(default_factory=set)
    _stopping: dict[ReplicaKey, threading.Thread] = field(default_factory=dict)
    _closed: bool = False
    # what `engines.placement` needs of this node, read once: the engines' environment and the usable CPUs
    _node_env: dict[str, str] = field(default_factory=dict)
    _cpus: list[int] = field(default_factory=list)
    _bind_failed: set[Shape] = field(default_factory=set)  # shapes whose bind failed: fresh engines for them
    _warned_generation: int | None = None  # unknown plan fields are logged once per generation

    def __post_init__(self) -> None:
        self._node_env = {**os.environ, **(getattr(self.engines, "env", None) or {})}  # engines inherit both
        self._cpus = sorted(os.sched_getaffinity(0))
        os.makedirs(self.state_dir, exist_ok=True)
        self.store = WeightStore(self.arenas)
        adopted = sum(len(self.store.adopt(name)) for name in self.arenas)
        engines = self.engines.adopt() if self.engines is not None else []
        if adopted or engines:
            log.info("adopted %d warm shards and %d running engines from a previous agent", adopted, len(engines))

    # -- inputs --------------------------------------------------------------------
    def apply(self, raw: str | bytes | Mapping[str, Any]) -> None:
        """Take a new plan (JSON text or a parsed document); a bad plan keeps the old one and records why."""
        with self._lock:
            try:
                plan = parse_plan(raw)
                _check_plan(plan)
            except (ValueError, TypeError, RecursionError) as exc:  # ProtocolError, and what a garbled one raises
                self.plan_error = f"plan rejected: {exc}"
                log.error("%s", self.plan_error)
                return
            if self.plan is not None and plan.generation < self.plan.generation:
                self.plan_error = f"plan generation {plan.generation} is older than {self.plan.generation}"
                log.error("%s", self.plan_error)
                return
            if self.plan is None or self.plan != plan:
                served = sum(r.serves for r in plan.replicas.values())
                log.info(
                    "plan generation %d applied: %d replicas (%d served)", plan.generation, len(plan.replicas), served
                )
            self.plan, self.plan_error = plan, None
            if self._warned_generation != plan.generation:
                unknown = unknown_plan_fields(raw)
                if unknown:
                    self._warned_generation = plan.generation
                    log.warning("plan generation %d has unknown fields (ignored): %s", plan.generation, unknown)

    # -- the reconcile pass ----------------------------------------------------------
    def step(self) -> WorkerState:
        with self._lock:
            plan = self.plan
            if plan is not None:
                self._stop_unserved(plan)
                self._evict_unplanned(plan)
                self._promote(plan)
                self._prewarm(plan)
                self._keep_standby(plan)
            state = self.state()
        self.metrics.observe_state(state)
        return state

    @staticmethod
    def _stale(shard: Shard, plan: Plan) -> bool:
        """A shard the plan no longer asks for (on this device, at this rank)."""
        want = plan.replicas.get(shard.replica)
        return want is None or shard.rank >= want.tp or want.device_of_rank(shard.rank) != shard.device

    def _stop_unserved(self, plan: Plan) -> None:
        if self.engines is None:
            return
        for key in self.engines.running():
            want = plan.replicas.get(key)
            if key not in self._stopping and (want is None or not want.serves):
                self._stop_engine(key, "no longer served")

    def _evict_unplanned(self, plan: Plan) -> None:
        for key, shard in self.store.shards().items():
            if key.replica in self._stopping:
                continue  # its engine may still map these pages: evicted once it is gone
            want = plan.replicas.get(key.replica)
            if want is None or self._stale(shard, plan):
                seconds = self._timed("evict", key.replica, self.store.evict, key)
                log.info("evicted %s (%s) from GPU %s in %.2f ms", key, shard.model, shard.device, seconds * 1e3)
            elif shard.phase == ShardPhase.FAILED:
                # remember why and release the record; tried again after a delay (or at the next generation)
                self._fail(want, plan, shard.error or "load failed", transient=True)
                self.store.forget_failed(key)
                running = self.engines.running() if self.engines is not None else {}
                if key.replica in running and key.replica not in self._stopping:
                    self._stop_engine(key.replica, "its weights failed to load")
        for replica in list(self.failures):
            if replica not in plan.replicas:
                del self.failures[replica]

    def _promote(self, plan: Plan) -> None:
        if self.engines is None:
            return
        running = self.engines.running()
        for rep in plan.replicas.values():
            key = rep.key
            if not rep.serves and key in self.failures and self._shards_warm(rep):
                del self.failures[key]  # a load that failed before has succeeded on a later try
            if not rep.serves or self._failed(rep, plan) or key in self._stopping or key in self._shell_waits:
                continue
            if key in running:
                rec = self.engines.poll(key)
                if rec is None:
                    continue
                if not self.engines.alive(key):
                    if rec.ready:
                        # died while serving (crash, OOM kill): drop it; its weights stay warm, so once it is
                        # stopped a later pass promotes the replica again (not a failure of the replica)
                        log.warning("engine of %s (%s) exited while serving (log: %s)", key, rep.model, rec.log)
                        self.metrics.op("engine", "exited")
                        self._stop_engine(key, "exited while serving")
                    else:
                        self._stop_engine(key, "exited before becoming ready")
                        self._fail(rep, plan, f"engine exited before becoming ready (log: {rec.log})", transient=True)
                elif rec.ready and key not in self._promote_recorded:
                    self._promote_recorded.add(key)
                    self.failures.pop(key, None)  # an earlier try failed: this one serves
                    self._record("promote", key, rec.ready_s or 0.0, standby=rec.bound_s is not None)
                    log.info(
                        "engine of %s (%s) ready at %s, %.1f s after its launch",
                        key,
                        rep.model,
                        rec.endpoint,
                        rec.ready_s or 0.0,
                    )
                continue
            if not self._shards_warm(rep):
                continue
            flag = forbidden_engine_flag(rep.engine.args)
            if flag is not None:  # the operator refuses these too; a worker never passes one to vLLM
                self._fail(rep, plan, f"engine argument {flag} is not allowed (the worker sets it)")
                continue
            if self._bind_standby(rep, plan):
                continue
            self._yield_standby(rep)
            try:
                shell = self.engines.acquire_shell(0.0)  # only look: waiting happens off the lock
            except TimeoutError:
                self._wait_for_shell(key)
                continue
            self._launch(rep, plan, shell)

    def _prewarm(self, plan: Plan) -> None:
        # GPUs where an engine is still stopping and its shards wait to be evicted: their pages come back
        # in a later pass, so allocating there now could fail for want of room that is about to be freed.
        pending = {
            shard.device
            for shard in self.store.shards().values()
            if shard.replica in self._stopping and self._stale(shard, plan)
        }
        for rep in plan.replicas.values():
            if self._failed(rep, plan):
                continue
            for rank in range(rep.tp):
                key = ShardKey(rep.key, rank)
                if self.store.get(key) is not None:
                    continue
                device = rep.device_of_rank(rank)
                if device not in self.arenas:
                    self._fail(rep, plan, f"GPU {device} is not managed by this worker (has {sorted(self.arenas)})")
                    break
                try:
                    path = source_path(rep.source)
                except SourceError as exc:
                    self._fail(rep, plan, str(exc))
                    break
                if device in pending:
                    break
                try:
                    shard = self.store.prewarm(key, rep.model, path, device, rep.tp, on_done=self._on_loaded)
                except Exception as exc:  # one replica's load must not take the agent (and the others) down
                    log.exception("prewarming %s failed", key)
                    self.store.evict(key)
                    self._fail(rep, plan, f"prewarm failed: unexpected {type(exc).__name__}")
                    break
                if shard.phase == ShardPhase.FAILED:
                    self._fail(rep, plan, shard.error or "prewarm failed")
                    self.store.forget_failed(key)
                    break
                log.info("loading %s (%s) on GPU %s: %d bytes from %s", key, rep.model, device, shard.bytes_total, path)

    def _on_loaded(self, shard: Shard, phase: ShardPhase) -> None:
        """Runs on the loader thread when a load ends (failures are reported by the next pass)."""
        if phase == ShardPhase.WARM:
            seconds = shard.seconds or 0.0
            self._record("prewarm", shard.replica, seconds, bytes=shard.bytes_total)
            log.info(
                "loaded %s (%s) on GPU %s: %d bytes in %.2f s (%.2f GB/s)",
                shard.key,
                shard.model,
                shard.device,
                shard.bytes_total,
                seconds,
                shard.bytes_total / seconds / 1e9 if seconds else 0.0,
            )
        self.metrics.op("prewarm", str(phase))

    # -- engines off the lock ------------------------------------------------------------
    def _launch(self, rep: PlannedReplica, plan: Plan, shell: Any) -> None:
        """Write the manifest of a warm replica and hand ``shell`` its engine (under the lock; returns at once)."""
        assert self.engines is not None
        key = rep.key
        report_path = os.path.join(self.state_dir, f"load-report-{safe_name(key.id)}.json")
        try:
            manifest_path = self._write_manifest(rep)
            model_dir = source_path(rep.source)
            args, env = self._placement(rep)
        except (OSError, ValueError) as exc:
            self.engines.release_shell(shell)
            self._fail(rep, plan, f"promotion failed: {exc}")
            return
        try:
            rec = self.engines.launch(
                key,
                shell,
                rep.model,
                model_dir,
                manifest_path,
                report_path=report_path,
                served_name=rep.model,
                extra_args=rep.engine.argv() + args,
                env=env,
            )
        except (TimeoutError, OSError) as exc:
            self._fail(rep, plan, f"promotion failed: {exc}")
            return
        self.metrics.op("promote", "started")
        log.info("engine of %s (%s) starting: pid %d, port %d", key, rep.model, rec.pid, rec.port)

    def _write_manifest(self, rep: PlannedReplica) -> str:
        """The loader's manifest of a warm replica (arena handle and tensor table), written for its engine.

        A ``tp > 1`` replica's lists one such manifest per rank (``ranks``): each rank of the engine binds the
        shard in the arena of its own GPU (``binding.rank_manifest``).
        """
        path = os.path.join(self.state_dir, f"manifest-{safe_name(rep.key.id)}.json")
        if rep.tp == 1:
            manifest = self.store.manifest(ShardKey(rep.key, 0))
        else:
            manifest = {
                "model": rep.model,
                "ranks": [self.store.manifest(ShardKey(rep.key, rank)) for rank in range(rep.tp)],
            }
        with open(path, "w") as fh:
            json.dump(manifest, fh)
        return path

    def _on_gpu(self, rep: PlannedReplica) -> bool:
        return any(self.arenas[str(gpu)].kind.on_gpu for gpu in rep.gpus if str(gpu) in self.arenas)

    def _placement(self, rep: PlannedReplica, *, standby: bool = False) -> tuple[list[str], dict[str, str]]:
        """Engine arguments and environment that put ``rep``'s engine on its GPUs (``engines.placement``) and,
        on GPUs, give it the memory its arenas leave (``engines.gpu_memory_utilization``; a ``ValueError`` when
        they leave none): a fresh engine maps its replica's shards, a ``standby`` one binds them later."""
        on_gpu = self._on_gpu(rep)
        args, env = placement(on_gpu, rep.gpus, self._node_env, self._cpus)
        if on_gpu:
            arenas = [self.arenas[str(gpu)] for gpu in rep.gpus[: rep.tp]]
            held = [0 if standby else self._shard_bytes(rep, rank) for rank in range(rep.tp)]
            budget = gpu_memory_utilization([(a.device_bytes, a.usage().total) for a in arenas], held)
            args += ["--gpu-memory-utilization", f"{budget:.4f}"]
        return args, env

    def _shard_bytes(self, rep: PlannedReplica, rank: int) -> int:
        shard = self.store.get(ShardKey(rep.key, rank))
        return shard.bytes_total if shard is not None else 0

    # -- pre-initialised engines -------------------------------------------------------------
    def _shape(self, rep: PlannedReplica) -> Shape | None:
        try:
            model_dir = source_path(rep.source)
        except SourceError:
            return None
        try:
            args, env = self._placement(rep, standby=True)
        except ValueError:
            return None  # no budget on its GPU: promotions there fail with the reason (`_launch`)
        gpus = tuple(rep.gpus[: rep.tp]) if self._on_gpu(rep) else ()
        return Shape(rep.model, model_dir, tuple(rep.engine.argv() + args), tuple(sorted(env.items())), gpus)

    def _keep_standby(self, plan: Plan) -> None:
        """Keep up to ``standby_engines`` pre-initialised engines, one per shape (model, engine settings and, on
        GPUs, device: `_shape`), for the warm replicas the plan flags ``standby`` (the operator's choice,
        `warmserve.core.standby`); by model name when more are flagged than kept. A ``tp > 1`` replica's is one
        engine over its group (a process per rank). On GPUs at most one per GPU and none on a GPU that runs (or
        is starting) an engine: each engine there is sized to the whole budget the arena leaves."""
        if self.engines is None or self.standby_engines <= 0:
            return
        busy = self._engine_gpus()
        shapes: set[Shape] = set()
        for rep in plan.replicas.values():
            shape = self._shape(rep) if rep.spec.standby and not self._failed(rep, plan) else None
            if shape is not None and shape not in self._bind_failed:
                shapes.add(shape)
        keep: dict[Shape, int] = {}
        for shape in sorted(shapes, key=lambda shape: (shape.model, shape.gpus, shape.id)):
            if len(keep) < self.standby_engines and not busy.intersection(shape.gpus):
                keep[shape] = 1
                busy.update(shape.gpus)  # one per GPU: each is sized to the GPU's whole engine budget
        self.engines.keep_standby(keep)

    def _engine_gpus(self) -> set[int]:
        """GPUs with an engine running, starting, binding or waiting for a shell (host arenas count too, but
        only GPU shapes name devices)."""
        assert self.engines is not None
        return {gpu for key in [*self.engines.running(), *self._shell_waits] for gpu in key.gpus}

    def _yield_standby(self, rep: PlannedReplica) -> None:
        """Stop the standby engines on ``rep``'s GPUs before a fresh engine starts there (they hold the budget
        it is sized to; `_keep_standby` does not restart them while the engine runs)."""
        assert self.engines is not None
        if self.standby_engines <= 0 or not self._on_gpu(rep):
            return
        standby = self.engines.standby()
        keep = {shape: 1 for shape, _ in standby if not set(shape.gpus).intersection(rep.gpus)}
        if len(keep) < len(standby):
            log.info("stopping the standby engines on GPUs %s for the engine of %s", list(rep.gpus), rep.key)
            self.engines.keep_standby(keep, start=False)

    def _bind_standby(self, rep: PlannedReplica, plan: Plan) -> bool:
        """Promote by binding a ready standby engine of the replica's shape (off the lock); False if none."""
        assert self.engines is not None
        shape = self._shape(rep) if self.standby_engines > 0 else None
        if shape is None or shape in self._bind_failed:
            return False
        try:
            manifest_path = self._write_manifest(rep)
        except (OSError, ValueError) as exc:
            self._fail(rep, plan, f"promotion failed: {exc}")
            return True
        standby = self.engines.claim_standby(shape)  # now: the pass's keep_standby must not stop it
        if standby is None:
            return False
        self._shell_waits.add(rep.key)  # reported starting until the bind returns
        thread = threading.Thread(
            target=self._await_bind,
            args=(rep.key, shape, standby, manifest_path),
            name=f"bind-{rep.key.id}",
            daemon=True,
        )
        thread.start()
        return True

    def _await_bind(self, key: ReplicaKey, shape: Shape, standby: EngineRecord, manifest_path: str) -> None:
        """Background: bind the claimed standby engine; a failed bind sends this shape to fresh engines."""
        assert self.engines is not None
        try:
            rec = self.engines.bind(key, standby, manifest_path)
        except (LookupError, BindError) as exc:
            with self._lock:
                self._shell_waits.discard(key)
                if isinstance(exc, BindError):
                    self._bind_failed.add(shape)
                    self.metrics.op("bind", "failed")
                    log.error("%s; %s is promoted with a fresh engine instead", exc, key)
            return
        with self._lock:
            self._shell_waits.discard(key)
        self.metrics.op("bind", "ok")
        log.info("standby engine bound to %s (%s) in %.3f s at %s", key, shape.model, rec.bound_s or 0.0, rec.endpoint)

    def _wait_for_shell(self, key: ReplicaKey) -> None:
        self._shell_waits.add(key)
        log.info("promotion of %s waits for an engine shell (up to %.0f s)", key, self.shell_timeout)
        threading.Thread(target=self._await_shell, args=(key,), name=f"shell-wait-{key.id}", daemon=True).start()

    def _await_shell(self, key: ReplicaKey) -> None:
        """Background: wait for a shell without the lock, then launch if the replica still wants one."""
        engines = self.engines
        assert engines is not None
        shell: Any = None
        error: Exception | None = None
        try:
            shell = engines.acquire_shell(self.shell_timeout)
        except (TimeoutError, OSError) as exc:
            error = exc
        with self._lock:
            self._shell_waits.discard(key)
            plan = self.plan
            rep = plan.replicas.get(key) if plan is not None else None
            wanted = (
                plan is not None
                and rep is not None
                and rep.serves
                and not self._closed
                and not self._failed(rep, plan)
                and key not in self._stopping
                and key not in engines.running()
            )
            if shell is None:
                if wanted and plan is not None and rep is not None:
                    self._fail(rep, plan, f"promotion failed: {error}", transient=True)
                return
            if wanted and plan is not None and rep is not None and self._shards_warm(rep):
                self._launch(rep, plan, shell)
            else:
                engines.release_shell(shell)  # a later pass starts over if it is still wanted

    def _stop_engine(self, key: ReplicaKey, why: str) -> None:
        self._promote_recorded.discard(key)
        log.info("stopping the engine of %s (%s)", key, why)
        thread = threading.Thread(target=self._stop_in_background, args=(key,), name=f"stop-{key.id}", daemon=True)
        self._stopping[key] = thread
        thread.start()

    def _stop_in_background(self, key: ReplicaKey) -> None:
        assert self.engines is not None
        try:
            seconds = self.engines.stop(key)
        except Exception:  # keep the agent going; the engine is dropped from our books either way
            log.exception("stopping the engine of %s failed", key)
            seconds = None
        with self._lock:
            self._stopping.pop(key, None)
        if seconds is not None:
            self._record("stop", key, seconds)
            self.metrics.op("stop", "ok")
            log.info("engine of %s stopped in %.1f s", key, seconds)

    # -- helpers ---------------------------------------------------------------------
    def _shards_warm(self, rep: PlannedReplica) -> bool:
        shards = [self.store.get(ShardKey(rep.key, rank)) for rank in range(rep.tp)]
        return all(s is not None and s.phase == ShardPhase.WARM for s in shards)

    def _failed(self, rep: PlannedReplica, plan: Plan) -> bool:
        """Failed in this generation and not yet due for another try."""
        f = self.failures.get(rep.key)
        return f is not None and f.generation == plan.generation and time.monotonic() < f.retry_at

    def _fail(self, rep: PlannedReplica, plan: Plan, message: str, transient: bool = False) -> None:
        """Record a failure; a `transient` one is tried again after a growing delay, others next generation."""
        previous = self.failures.get(rep.key)
        attempts = previous.attempts + 1 if previous is not None and previous.generation == plan.generation else 1
        delay = min(RETRY_BASE_S * 2 ** (attempts - 1), RETRY_MAX_S) if transient else math.inf
        self.failures[rep.key] = Failure(plan.generation, message, attempts, time.monotonic() + delay)
        self.metrics.op("replica", "failed")
        again = f"; trying again in {delay:.0f} s" if transient else ""
        log.error("replica %s (%s) failed: %s%s", rep.key, rep.model, message, again)

    def _timed(self, op: str, key: ReplicaKey, fn: Callable[..., Any], *args: Any) -> float:
        t0 = time.perf_counter()
        fn(*args)
        seconds = time.perf_counter() - t0
        self._record(op, key, seconds)
        self.metrics.op(op, "ok")
        return seconds

    def _record(self, op: str, key: ReplicaKey, seconds: float, **extra: Any) -> None:
        with self._timings_lock:
            self.timings[op] = {
                "uid": key.uid,
                "gpus": list(key.gpus),
                "seconds": round(seconds, 6),
                "at": time.time(),
                **extra,
            }
        self.metrics.duration(op, seconds)

    # -- output --------------------------------------------------------------------------
    def state(self) -> WorkerState:
        """What goes into the state annotation (docs/design.md "Protocol"; docs/worker.md §1).

        Contract fields: ``observedGeneration`` (0 before any plan); ``devices[]``; ``replicas[]`` with
        their phase, progress, endpoint (``"host:port"`` while an engine exists) and readiness; ``errors[]``
        (a rejected plan, or a replica with its ``uid``/``gpus``); ``timings``. Documented extras: device
        ``kind``/``pageSize``/``largestFreeRun``, replica ``role``/``tp``/``kvLend``/``bytes``, and
        ``engines[]``.

        A replica that failed and holds nothing is not in ``replicas`` (it is only in ``errors``); one
        that failed but still holds warm weights (e.g. its engine died) is reported ``warm``. A served
        replica whose promotion waits for an engine shell is ``starting`` with no endpoint yet.
        """
        with self._lock:
            plan = self.plan
            devices = tuple(
                self._device_state(name, arena)
                for name, arena in sorted(self.arenas.items(), key=lambda item: int(item[0]))
            )
            planned = plan.replicas if plan is not None else {}
            shards_of: dict[ReplicaKey, list[Shard]] = {}
            for shard in self.store.shards().values():
                shards_of.setdefault(shard.replica, []).append(shard)
            running = self.engines.running() if self.engines is not None else {}
            engine_of = {key: rec for key, rec in running.items() if key not in self._stopping}
            replicas: list[ReplicaState] = []
            errors: list[WorkerError] = []
            if self.plan_error:
                errors.append(WorkerError(self.plan_error))
            for key in sorted(set(planned) | set(shards_of) | set(engine_of)):
                rep, shards, engine = planned.get(key), shards_of.get(key, []), engine_of.get(key)
                failure = self.failures.get(key)
                if failure is not None and (plan is None or failure.generation == plan.generation):
                    errors.append(WorkerError(failure.message, key.uid, key.gpus))
                    if not shards and engine is None:
                        continue  # holds nothing: the error is the whole story
                total = sum(s.bytes_total for s in shards)
                done = sum(s.bytes_done if s.phase != ShardPhase.WARM else s.bytes_total for s in shards)
                if rep is None:
                    phase = Phase.EVICTING
                elif engine is not None:
                    phase = Phase.SERVING if engine.ready else Phase.STARTING
                elif rep.serves and key in self._shell_waits:
                    phase = Phase.STARTING
                elif len(shards) == rep.tp and all(s.phase == ShardPhase.WARM for s in shards):
                    phase = Phase.WARM
                else:
                    phase = Phase.LOADING
                if rep is not None:
                    model = rep.model
                elif shards:
                    model = shards[0].model
                else:
                    model = engine.served_name if engine is not None else ""
                replicas.append(
                    ReplicaState(
                        model=model,
                        uid=key.uid,
                        gpus=key.gpus,
                        phase=phase,
                        progress=round(done / total, 4) if total else 0.0,
                        endpoint=engine.endpoint if engine is not None else None,
                        ready=bool(engine is not None and engine.ready),
                        role=rep.role if rep is not None else None,
                        tp=rep.tp if rep is not None else len(key.gpus),
                        kv_lend=rep.kv_lend if rep is not None else 0,
                        bytes=total,
                    )
                )
            engines = tuple(
                EngineState(key.uid, key.gpus, rec.served_name, rec.endpoint, rec.ready, rec.pid)
                for key, rec in sorted(engine_of.items())
            )
            standby = tuple(
                StandbyState(shape.model, rec.ready, self._standby_bytes(shape))
                for shape, rec in (self.engines.standby() if self.engines is not None and self.standby_engines else [])
            )
        with self._timings_lock:
            timings = {op: dict(t) for op, t in self.timings.items()}
        return WorkerState(
            capabilities=self._capabilities(),
            standby=standby,
            observed_generation=plan.generation if plan is not None else 0,
            devices=devices,
            replicas=tuple(replicas),
            errors=tuple(errors),
            timings=timings,
            engines=engines,
        )

    def _capabilities(self) -> Capabilities:
        on_gpu = any(arena.kind.on_gpu for arena in self.arenas.values())
        return Capabilities(
            kv_lend=False,
            tp_promotion=True,
            standby_engines=self.engines is not None and self.standby_engines > 0,
            engine_settings=True,
            device_kind="cuda" if on_gpu else "cpu",
            reasons={
                "kvLend": "engines size their own KV cache; lending idle KV space to warm replicas is not built",
            },
        )

    def _standby_bytes(self, shape: Shape) -> int:
        """Memory a standby engine may hold outside the arenas: on GPUs its budget (``--gpu-memory-utilization``
        of its device), on a CPU node its KV cache where the node sets it."""
        if shape.gpus:
            utilization = float(shape.args[shape.args.index("--gpu-memory-utilization") + 1])
            return int(utilization * self.arenas[str(shape.gpus[0])].device_bytes)
        env = getattr(self.engines, "env", None) or {}
        try:
            return int(env.get("VLLM_CPU_KVCACHE_SPACE", 0)) << 30
        except ValueError:
            return 0

    @staticmethod
    def _device_state(name: str, arena: Arena) -> DeviceState:
        usage = arena.usage()
        return DeviceState(
            index=int(name),
            total_bytes=usage.total,
            used_bytes=usage.used,
            free_bytes=usage.free,
            kind=str(arena.kind),
            page_size=arena.page_size,
            largest_free_run=usage.largest_free_run,
        )

    def shutdown(self, stop_engines: bool = True) -> None:
        """Let engine stops in flight finish, then close the shell pool (and stop the engines if asked)."""
        with self._lock:
            self._closed = True
            stopping = list(self._stopping.values())
        for thread in stopping:
            thread.join(timeout=30)
        if self.engines is not None:
            self.engines.shutdown(stop_engines=stop_engines)


def _check_plan(plan: Plan) -> None:
    """What the worker refuses beyond `parse_plan`: a generation it could never move past, unprintable uids."""
    if plan.generation > MAX_GENERATION:
        raise ValueError(f"plan.generation must be at most {MAX_GENERATION}")
    for key in plan.replicas:
        if not key.uid.strip() or key.uid != key.uid.strip() or not key.uid.isprintable():
            raise ValueError(f"replica uid {key.uid!r} is blank, padded with whitespace or has control characters")
