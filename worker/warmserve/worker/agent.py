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
replica is retried only when the plan's generation changes.

Replicas are keyed by ``(ModelDeployment uid, gpus)`` throughout (plan diffing,
state, engines, adoption), so two replicas of one model on one worker coexist.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from warmserve.worker.arena import Arena
from warmserve.worker.engines import EngineManager
from warmserve.worker.metrics import WorkerMetrics
from warmserve.worker.plan import Plan, PlanError, PlannedReplica, ReplicaKey, parse_plan, parse_replica_id
from warmserve.worker.store import WeightStore


@dataclass
class Failure:
    generation: int
    message: str


@dataclass
class Agent:
    """Reconciles the arenas and engines of one worker with its plan.

    Replicas are keyed by ``(uid, gpus)`` (:data:`~warmserve.worker.plan.ReplicaKey`): two replicas
    of one model on different GPUs of this worker are two replicas. The weight store and the engine
    manager are keyed by the string form of that key (:func:`~warmserve.worker.plan.replica_id`), which
    is also what ledger owners, engine records and manifest files are named after, so a restarted
    agent recovers the same keys from what it finds on the node.
    """

    arenas: dict[str, Arena]
    state_dir: str
    engines: EngineManager | None = None
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    store: WeightStore = field(init=False)
    plan: Plan | None = None
    plan_error: str | None = None
    failures: dict[ReplicaKey, Failure] = field(default_factory=dict)
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _promote_recorded: set[str] = field(default_factory=set)
    # Loader threads report timings; they must not take the agent lock (evict joins them under it).
    _timings_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        os.makedirs(self.state_dir, exist_ok=True)
        self.store = WeightStore(self.arenas)
        for name in self.arenas:
            self.store.adopt(name)
        if self.engines is not None:
            self.engines.adopt()

    # -- inputs --------------------------------------------------------------------
    def apply(self, raw: Any) -> None:
        """Take a new plan (a dict or JSON text); a bad plan keeps the old one and records why."""
        with self._lock:
            try:
                data = json.loads(raw) if isinstance(raw, str | bytes) else raw
                plan = parse_plan(data)
            except (PlanError, ValueError) as exc:
                self.plan_error = f"plan rejected: {exc}"
                return
            if self.plan is not None and plan.generation < self.plan.generation:
                self.plan_error = f"plan generation {plan.generation} is older than {self.plan.generation}"
                return
            self.plan, self.plan_error = plan, None

    # -- the reconcile pass ----------------------------------------------------------
    def step(self) -> dict[str, Any]:
        with self._lock:
            if self.plan is not None:
                self._stop_unserved()
                self._evict_unplanned()
                self._promote()
                self._prewarm()
            state = self.state()
            self.metrics.observe_state(state)
            return state

    def _planned(self, rid: str) -> PlannedReplica | None:
        key = parse_replica_id(rid)
        return self.plan.replicas.get(key) if key is not None else None

    def _stop_unserved(self) -> None:
        if self.engines is None:
            return
        for rid in list(self.engines.engines):
            want = self._planned(rid)
            if want is None or want.role != "serve":
                self._timed("stop", rid, self.engines.stop, rid)
                self._promote_recorded.discard(rid)

    def _evict_unplanned(self) -> None:
        for owner, load in list(self.store.loads.items()):
            want = self._planned(load.uid)
            stale = want is None or (load.rank >= want.tp or want.device_of_rank(load.rank) != load.device)
            if stale:
                self._timed("evict", load.uid, self.store.evict, load.uid, load.rank)
            elif load.phase == "failed":
                # remember why and release the record; retried on the next generation
                self.failures[want.key] = Failure(self.plan.generation, load.error or "load failed")
                self.store.loads.pop(owner, None)
                if self.engines is not None and load.uid in self.engines.engines:
                    self.engines.stop(load.uid)
        for key in list(self.failures):
            if key not in self.plan.replicas:
                del self.failures[key]

    def _promote(self) -> None:
        if self.engines is None:
            return
        for rep in self.plan.replicas.values():
            if rep.role != "serve" or self._failed(rep):
                continue
            rid = rep.id
            if rid in self.engines.engines:
                rec = self.engines.poll(rid)
                if not rec.ready and not self.engines.alive(rid):
                    self.engines.stop(rid)
                    self._fail(rep, f"engine exited before becoming ready (log: {rec.log})")
                elif rec.ready and rid not in self._promote_recorded:
                    self._promote_recorded.add(rid)
                    self._record("promote", rid, rec.ready_s or 0.0)
                continue
            shards = [self.store.loads.get(self.store.owner_key(rid, r)) for r in range(rep.tp)]
            if not all(s is not None and s.phase == "warm" for s in shards):
                continue
            if rep.tp > 1:
                self._fail(
                    rep,
                    "tp>1 promotion needs one engine process per GPU rank (CUDA); "
                    "not supported by the CPU shared-memory path",
                )
                continue
            manifest_path = os.path.join(self.state_dir, f"manifest-{_safe(rid)}.json")
            with open(manifest_path, "w") as fh:
                json.dump(self.store.manifest(rid, 0), fh)
            report = os.path.join(self.state_dir, f"load-report-{_safe(rid)}.json")
            try:
                self.engines.promote(rid, rep.model, rep.path, manifest_path, report_path=report, served_name=rep.model)
                self.metrics.op("promote", "started")
            except (TimeoutError, OSError) as exc:
                self._fail(rep, f"promotion failed: {exc}")

    def _prewarm(self) -> None:
        for rep in self.plan.replicas.values():
            if self._failed(rep):
                continue
            rid = rep.id
            for rank in range(rep.tp):
                owner = self.store.owner_key(rid, rank)
                if owner in self.store.loads:
                    continue
                device = rep.device_of_rank(rank)
                if device not in self.arenas:
                    self._fail(rep, f"GPU {device} is not managed by this worker (has {sorted(self.arenas)})")
                    break
                try:
                    path = rep.path
                except PlanError as exc:
                    self._fail(rep, str(exc))
                    break
                load = self.store.prewarm(rid, rep.model, path, device, rep.tp, rank, on_done=self._on_loaded)
                if load.phase == "failed":
                    self._fail(rep, load.error or "prewarm failed")
                    self.store.loads.pop(owner, None)
                    break

    def _on_loaded(self, load, phase: str) -> None:
        if phase == "warm":
            self._record("prewarm", load.uid, load.seconds or 0.0, bytes=load.bytes_total)
        self.metrics.op("prewarm", phase)

    # -- helpers ---------------------------------------------------------------------
    def _failed(self, rep: PlannedReplica) -> bool:
        f = self.failures.get(rep.key)
        return f is not None and f.generation == self.plan.generation

    def _fail(self, rep: PlannedReplica, message: str) -> None:
        self.failures[rep.key] = Failure(self.plan.generation, message)
        self.metrics.op("replica", "failed")

    def _timed(self, op: str, rid: str, fn, *args):
        t0 = time.perf_counter()
        result = fn(*args)
        self._record(op, rid, time.perf_counter() - t0)
        self.metrics.op(op, "ok")
        return result

    def _record(self, op: str, rid: str, seconds: float, **extra: Any) -> None:
        uid, gpus = _key_of(rid)
        with self._timings_lock:
            self.timings[op] = {
                "uid": uid,
                "gpus": list(gpus),
                "seconds": round(seconds, 6),
                "at": time.time(),
                **extra,
            }
        self.metrics.duration(op, seconds)

    # -- output --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The ``warmserve.io/state`` document, exactly the shape of DESIGN.md §5 (see docs/worker.md §1).

        Contract fields: ``observedGeneration`` (int, 0 before any plan); ``devices[]`` with
        ``index``/``totalBytes``/``usedBytes``/``freeBytes``; ``replicas[]`` with ``uid``, ``model``,
        ``gpus``, ``phase`` (loading|warm|starting|serving|evicting), ``progress``, ``endpoint``
        (``"host:port"`` or null) and ``ready``; ``errors[]`` as ``{"reason"}`` plus ``uid``/``gpus``
        when a replica failed; ``timings``. Documented extras: device ``kind``/``pageSize``/
        ``largestFreeRun``, replica ``role``/``tp``/``kvLend``/``bytes``, and ``engines[]``.

        A replica that failed and holds nothing is not in ``replicas`` (it is only in ``errors``); one
        that failed but still holds warm weights (e.g. its engine died) is reported ``warm``.
        """
        devices = []
        for name, arena in sorted(self.arenas.items(), key=lambda item: int(item[0])):
            u = arena.usage()
            devices.append(
                {
                    "index": int(name),
                    "totalBytes": u.total,
                    "usedBytes": u.used,
                    "freeBytes": u.free,
                    "kind": arena.backend.kind,
                    "pageSize": arena.page_size,
                    "largestFreeRun": arena.ledger.largest_free_run * arena.page_size,
                }
            )
        planned = self.plan.replicas if self.plan else {}
        shards_of: dict[ReplicaKey, list] = {}
        for load in self.store.loads.values():
            shards_of.setdefault(_key_of(load.uid, load.device), []).append(load)
        engine_of = {_key_of(rid): rec for rid, rec in (self.engines.engines.items() if self.engines else [])}
        replicas, errors = [], []
        if self.plan_error:
            errors.append({"reason": self.plan_error})
        for key in sorted(set(planned) | set(shards_of) | set(engine_of)):
            uid, gpus = key
            rep, shards, engine = planned.get(key), shards_of.get(key, []), engine_of.get(key)
            failure = self.failures.get(key)
            if failure is not None and (self.plan is None or failure.generation == self.plan.generation):
                errors.append({"uid": uid, "gpus": list(gpus), "reason": failure.message})
                if not shards and engine is None:
                    continue  # holds nothing: the error is the whole story
            total = sum(s.bytes_total for s in shards)
            done = sum(s.bytes_done if s.phase != "warm" else s.bytes_total for s in shards)
            if rep is None:
                phase = "evicting"
            elif engine is not None:
                phase = "serving" if engine.ready else "starting"
            elif len(shards) == rep.tp and all(s.phase == "warm" for s in shards):
                phase = "warm"
            else:
                phase = "loading"
            replicas.append(
                {
                    "uid": uid,
                    "model": rep.model if rep else (shards[0].model if shards else engine.served_name),
                    "gpus": list(gpus),
                    "phase": phase,
                    "progress": round(done / total, 4) if total else 0.0,
                    "endpoint": engine.endpoint if engine is not None else None,
                    "ready": bool(engine is not None and engine.ready),
                    "role": rep.role if rep else None,
                    "tp": rep.tp if rep else len(gpus),
                    "kvLend": rep.kv_lend if rep else 0,
                    "bytes": total,
                }
            )
        engines = [
            {
                "uid": key[0],
                "gpus": list(key[1]),
                "model": e.served_name,
                "endpoint": e.endpoint,
                "ready": e.ready,
                "pid": e.pid,
            }
            for key, e in sorted(engine_of.items())
        ]
        with self._timings_lock:
            timings = {op: dict(t) for op, t in self.timings.items()}
        return {
            "observedGeneration": self.plan.generation if self.plan else 0,
            "devices": devices,
            "replicas": replicas,
            "engines": engines,
            "timings": timings,
            "errors": errors,
        }

    def shutdown(self, stop_engines: bool = True) -> None:
        if self.engines is not None:
            self.engines.shutdown(stop_engines=stop_engines)


def _key_of(rid: str, device: str | None = None) -> ReplicaKey:
    """The ``(uid, gpus)`` of a store/engine key; a string that is not a replica id (a record left by an
    older worker) is reported under its own name on the device that holds it, so it is evicted visibly."""
    key = parse_replica_id(rid)
    if key is not None:
        return key
    return rid, (int(device),) if device is not None and device.isdigit() else ()


def _safe(rid: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in rid)
