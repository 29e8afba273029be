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
from warmserve.worker.plan import Plan, PlanError, PlannedReplica, parse_plan
from warmserve.worker.store import WeightStore


@dataclass
class Failure:
    generation: int
    message: str


@dataclass
class Agent:
    arenas: dict[str, Arena]
    state_dir: str
    engines: EngineManager | None = None
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    store: WeightStore = field(init=False)
    plan: Plan | None = None
    plan_error: str | None = None
    failures: dict[str, Failure] = field(default_factory=dict)
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

    def _stop_unserved(self) -> None:
        if self.engines is None:
            return
        for uid in list(self.engines.engines):
            want = self.plan.replicas.get(uid)
            if want is None or want.role != "serve":
                self._timed("stop", uid, self.engines.stop, uid)
                self._promote_recorded.discard(uid)

    def _evict_unplanned(self) -> None:
        for owner, load in list(self.store.loads.items()):
            want = self.plan.replicas.get(load.uid)
            stale = want is None or (load.rank >= want.tp or want.device_of_rank(load.rank) != load.device)
            if stale:
                self._timed("evict", load.uid, self.store.evict, load.uid, load.rank)
            elif load.phase == "failed":
                # remember why and release the record; retried on the next generation
                self.failures[load.uid] = Failure(self.plan.generation, load.error or "load failed")
                self.store.loads.pop(owner, None)
                if self.engines is not None and load.uid in self.engines.engines:
                    self.engines.stop(load.uid)
        for uid in list(self.failures):
            if uid not in self.plan.replicas:
                del self.failures[uid]

    def _promote(self) -> None:
        if self.engines is None:
            return
        for rep in self.plan.replicas.values():
            if rep.role != "serve" or self._failed(rep):
                continue
            if rep.uid in self.engines.engines:
                rec = self.engines.poll(rep.uid)
                if not rec.ready and not self.engines.alive(rep.uid):
                    self.engines.stop(rep.uid)
                    self._fail(rep, f"engine exited before becoming ready (log: {rec.log})")
                elif rec.ready and rep.uid not in self._promote_recorded:
                    self._promote_recorded.add(rep.uid)
                    self._record("promote", rep.uid, rec.ready_s or 0.0)
                continue
            shards = [self.store.loads.get(self.store.owner_key(rep.uid, r)) for r in range(rep.tp)]
            if not all(s is not None and s.phase == "warm" for s in shards):
                continue
            if rep.tp > 1:
                self._fail(rep, "tp>1 promotion needs one engine process per GPU rank (CUDA); "
                                "not supported by the CPU shared-memory path")
                continue
            manifest_path = os.path.join(self.state_dir, f"manifest-{_safe(rep.uid)}.json")
            with open(manifest_path, "w") as fh:
                json.dump(self.store.manifest(rep.uid, 0), fh)
            report = os.path.join(self.state_dir, f"load-report-{_safe(rep.uid)}.json")
            try:
                self.engines.promote(rep.uid, rep.model, rep.path, manifest_path, report_path=report,
                                     served_name=rep.model)
                self.metrics.op("promote", "started")
            except (TimeoutError, OSError) as exc:
                self._fail(rep, f"promotion failed: {exc}")

    def _prewarm(self) -> None:
        for rep in self.plan.replicas.values():
            if self._failed(rep):
                continue
            for rank in range(rep.tp):
                owner = self.store.owner_key(rep.uid, rank)
                if owner in self.store.loads:
                    continue
                device = rep.device_of_rank(rank)
                if device not in self.arenas:
                    self._fail(rep, f"GPU {device} is not managed by this worker "
                                    f"(has {sorted(self.arenas)})")
                    break
                try:
                    path = rep.path
                except PlanError as exc:
                    self._fail(rep, str(exc))
                    break
                load = self.store.prewarm(rep.uid, rep.model, path, device, rep.tp, rank,
                                          on_done=self._on_loaded)
                if load.phase == "failed":
                    self._fail(rep, load.error or "prewarm failed")
                    self.store.loads.pop(owner, None)
                    break

    def _on_loaded(self, load) -> None:
        if load.phase == "warm":
            self._record("prewarm", load.uid, load.seconds or 0.0, bytes=load.bytes_total)
        self.metrics.op("prewarm", load.phase)

    # -- helpers ---------------------------------------------------------------------
    def _failed(self, rep: PlannedReplica) -> bool:
        f = self.failures.get(rep.uid)
        return f is not None and f.generation == self.plan.generation

    def _fail(self, rep: PlannedReplica, message: str) -> None:
        self.failures[rep.uid] = Failure(self.plan.generation, message)
        self.metrics.op("replica", "failed")

    def _timed(self, op: str, uid: str, fn, *args):
        t0 = time.perf_counter()
        result = fn(*args)
        self._record(op, uid, time.perf_counter() - t0)
        self.metrics.op(op, "ok")
        return result

    def _record(self, op: str, uid: str, seconds: float, **extra: Any) -> None:
        with self._timings_lock:
            self.timings[op] = {"uid": uid, "seconds": round(seconds, 6), "at": time.time(), **extra}
        self.metrics.duration(op, seconds)

    # -- output --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The ``warmserve.io/state`` document (DESIGN.md §5)."""
        devices = []
        for name, arena in sorted(self.arenas.items()):
            u = arena.usage()
            devices.append({"gpu": name, "kind": arena.backend.kind, "bytesTotal": u.total, "bytesUsed": u.used,
                            "bytesFree": u.free, "pageSize": arena.page_size,
                            "largestFreeRun": arena.ledger.largest_free_run * arena.page_size})
        replicas = []
        planned = self.plan.replicas if self.plan else {}
        uids = sorted(set(planned) | {ld.uid for ld in self.store.loads.values()})
        for uid in uids:
            rep = planned.get(uid)
            shards = [ld for ld in self.store.loads.values() if ld.uid == uid]
            entry: dict[str, Any] = {
                "uid": uid, "model": rep.model if rep else (shards[0].model if shards else ""),
                "role": rep.role if rep else None, "tp": rep.tp if rep else len(shards),
                "gpus": list(rep.gpus) if rep else sorted({s.device for s in shards}),
                "kvLend": rep.kv_lend if rep else 0,
            }
            total = sum(s.bytes_total for s in shards)
            done = sum(s.bytes_done if s.phase != "warm" else s.bytes_total for s in shards)
            entry["bytes"] = total
            entry["progress"] = round(done / total, 4) if total else 0.0
            failure = self.failures.get(uid)
            engine = self.engines.engines.get(uid) if self.engines else None
            if failure is not None and (self.plan is None or failure.generation == self.plan.generation):
                entry["phase"], entry["error"] = "failed", failure.message
            elif rep is None:
                entry["phase"] = "evicting"
            elif engine is not None:
                entry["phase"] = "serving" if engine.ready else "starting"
                entry["endpoint"] = {"host": engine.host, "port": engine.port, "ready": engine.ready}
            elif shards and all(s.phase == "warm" for s in shards) and len(shards) == rep.tp:
                entry["phase"] = "warm"
            else:
                entry["phase"] = "loading"
            replicas.append(entry)
        engines = [{"uid": e.uid, "model": e.served_name, "endpoint": e.endpoint, "ready": e.ready, "pid": e.pid}
                   for e in (self.engines.engines.values() if self.engines else [])]
        errors = [r["error"] for r in replicas if r.get("error")]
        if self.plan_error:
            errors.insert(0, self.plan_error)
        with self._timings_lock:
            timings = {op: dict(t) for op, t in self.timings.items()}
        return {
            "observedGeneration": self.plan.generation if self.plan else None,
            "devices": devices,
            "replicas": replicas,
            "engines": engines,
            "timings": timings,
            "errors": errors,
        }

    def shutdown(self, stop_engines: bool = True) -> None:
        if self.engines is not None:
            self.engines.shutdown(stop_engines=stop_engines)


def _safe(uid: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in uid)
