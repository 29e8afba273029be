"""Weight store: stream safetensors shards straight into arena pages.

One replica = one TP-rank shard of one model on one device. The store is keyed
by an opaque string ``uid`` chosen by the caller; the agent passes the replica id
``"<ModelDeployment uid>@<gpus>"`` (:func:`warmserve.worker.plan.replica_id`), so
two replicas of one model on different GPUs are different keys. Prewarming a
replica: parse the headers, allocate one contiguous page run for all its
tensors (fails cleanly with :class:`ArenaFullError` when it cannot fit), then
stream the bytes in. Two data paths:

* **direct** (host-addressable arenas, i.e. shared memory): a reader thread
  ``preadv``\\s each tensor's byte range straight into its arena slot: one copy,
  from the page cache / disk into the arena, nothing staged.
* **staged** (device arenas): a reader thread fills a small ring of host
  staging buffers while a copier thread moves finished buffers to the device,
  so storage reads overlap host→device copies. It runs on CPU too (forced with
  ``staged=True``) so its logic is tested here.

Tensors are placed so that the parts of each fused vLLM parameter (q/k/v →
``qkv_proj``, gate/up → ``gate_up_proj``) sit back to back: the engine can then
view the fused parameter directly in the arena instead of copying.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from warmserve.worker.arena import Arena
from warmserve.worker.files import write_json_atomic
from warmserve.worker.ledger import ArenaFullError, tensors_from_json, tensors_to_json
from warmserve.worker.safetensors_index import TensorRecord, WeightFileError, read_index, shard_files

#: Fused vLLM parameters and the checkpoint tensors they are made of, in order.
PACKED_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
_MEMBER = {m: (g, i) for g, members in PACKED_GROUPS.items() for i, m in enumerate(members)}
_NAME_RE = re.compile(r"^(?P<prefix>.*\.)(?P<member>[a-z_]+)(?P<suffix>\.(weight|bias))$")

CHUNK = 16 * 1024 * 1024


def layout_order(names: list[str]) -> list[str]:
    """Order tensor names so each packed group's members are adjacent and in order."""

    def key(name: str) -> tuple:
        m = _NAME_RE.match(name)
        if m and m.group("member") in _MEMBER:
            group, index = _MEMBER[m.group("member")]
            return (m.group("prefix"), group, m.group("suffix"), index)
        return (name, "", "", 0)

    return sorted(names, key=key)


@dataclass
class ReplicaLoad:
    """Progress and outcome of one prewarm; read by the agent for its state."""

    uid: str
    model: str
    source: str
    device: str
    tp: int = 1
    rank: int = 0
    phase: str = "loading"  # loading | warm | failed | evicted
    bytes_total: int = 0
    bytes_done: int = 0
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    seconds: float | None = None
    owner: str = ""

    @property
    def progress(self) -> float:
        return 1.0 if self.phase == "warm" else (self.bytes_done / self.bytes_total if self.bytes_total else 0.0)


class WeightStore:
    """Prewarms, lists and evicts replicas held in one or more arenas."""

    def __init__(
        self, arenas: dict[str, Arena], *, staged: bool | None = None, chunk: int = CHUNK, staging_buffers: int = 3
    ):
        self.arenas = arenas
        self.staged = staged
        self.chunk = chunk
        self.staging_buffers = staging_buffers
        self.loads: dict[str, ReplicaLoad] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._cancel: dict[str, threading.Event] = {}

    @staticmethod
    def owner_key(uid: str, rank: int) -> str:
        return f"{uid}/rank{rank}"

    # -- prewarm ---------------------------------------------------------------------
    def plan(self, source_dir: str, tp: int, rank: int) -> list[TensorRecord]:
        records: list[TensorRecord] = []
        for path in shard_files(source_dir, tp, rank):
            records.extend(read_index(path))
        names = [r.name for r in records]
        if len(set(names)) != len(names):
            raise WeightFileError(f"{source_dir}: duplicate tensor names across shard files")
        return records

    def prewarm(
        self,
        uid: str,
        model: str,
        source_dir: str,
        device: str,
        tp: int = 1,
        rank: int = 0,
        wait: bool = False,
        on_done: Callable[[ReplicaLoad, str], None] | None = None,
    ) -> ReplicaLoad:
        """Start loading one replica shard in a background thread (idempotent per uid/rank).

        ``on_done(load, phase)`` runs when the load ends, *before* ``load.phase`` shows the outcome, so what
        the callback records (timings) is in place by the time anyone sees the shard warm.
        """
        owner = self.owner_key(uid, rank)
        existing = self.loads.get(owner)
        if existing and existing.phase in ("loading", "warm"):
            return existing
        load = ReplicaLoad(uid=uid, model=model, source=source_dir, device=device, tp=tp, rank=rank, owner=owner)
        self.loads[owner] = load
        arena = self.arenas[device]
        try:
            records = self.plan(source_dir, tp, rank)
            by_name = {r.name: r for r in records}
            order = layout_order(list(by_name))
            total = sum(r.nbytes for r in records) + 256 * len(records)
            arena.allocate(owner, total)
            arena.ledger.place_tensors(
                owner, [(n, by_name[n].dtype, by_name[n].shape, by_name[n].nbytes) for n in order]
            )
        except (WeightFileError, ArenaFullError) as exc:
            load.error = str(exc)
            if on_done:
                on_done(load, "failed")
            load.phase = "failed"
            return load
        load.bytes_total = sum(r.nbytes for r in records)
        cancel = threading.Event()
        self._cancel[owner] = cancel
        thread = threading.Thread(
            target=self._run, args=(load, arena, records, cancel, on_done), name=f"prewarm-{owner}", daemon=True
        )
        self._threads[owner] = thread
        thread.start()
        if wait:
            thread.join()
        return load

    def _run(
        self,
        load: ReplicaLoad,
        arena: Arena,
        records: list[TensorRecord],
        cancel: threading.Event,
        on_done: Callable[[ReplicaLoad, str], None] | None,
    ) -> None:
        slots = arena.ledger.get(load.owner).tensors
        staged = self.staged if self.staged is not None else not arena.backend.host_addressable
        try:
            if staged:
                self._copy_staged(load, arena, records, slots, cancel)
            else:
                self._copy_direct(load, arena, records, slots, cancel)
            if cancel.is_set():
                raise InterruptedError("evicted while loading")
            load.seconds = time.monotonic() - load.started
            arena.persist()
            _write_meta(self.meta_path(arena, load.owner), load, arena.ledger.get(load.owner).tensors)
            phase = "warm"
        except (OSError, WeightFileError, InterruptedError) as exc:
            load.error = f"{load.source}: {exc}" if not isinstance(exc, InterruptedError) else str(exc)
            phase = "failed" if not isinstance(exc, InterruptedError) else "evicted"
            with arena.lock:
                if arena.ledger.get(load.owner) is not None:
                    arena.free(load.owner)
        if on_done:
            on_done(load, phase)
        load.phase = phase

    def _copy_direct(self, load, arena, records, slots, cancel) -> None:
        backend = arena.backend
        for path, recs in _by_file(records).items():
            fd = os.open(path, os.O_RDONLY)
            try:
                for rec in recs:
                    dst = backend.direct_buffer(slots[rec.name].offset, rec.nbytes)
                    done = 0
                    while done < rec.nbytes:
                        if cancel.is_set():
                            return
                        n = os.preadv(fd, [dst[done : done + self.chunk]], rec.file_offset + done)
                        if n <= 0:
                            raise WeightFileError(f"{path}: unexpected end of file in {rec.name}")
                        done += n
                        load.bytes_done += n
            finally:
                os.close(fd)

    def _copy_staged(self, load, arena, records, slots, cancel) -> None:
        """Reader thread → ring of staging buffers → copier (this thread)."""
        free_bufs: queue.Queue = queue.Queue()
        for _ in range(self.staging_buffers):
            free_bufs.put(bytearray(self.chunk))
        full: queue.Queue = queue.Queue()
        errors: list[BaseException] = []

        def reader() -> None:
            try:
                for path, recs in _by_file(records).items():
                    with open(path, "rb", buffering=0) as fh:
                        for rec in recs:
                            done = 0
                            while done < rec.nbytes:
                                if cancel.is_set():
                                    return
                                buf = free_bufs.get()
                                want = min(self.chunk, rec.nbytes - done)
                                view = memoryview(buf)[:want]
                                fh.seek(rec.file_offset + done)
                                got = fh.readinto(view)
                                if not got:
                                    raise WeightFileError(f"{path}: unexpected end of file in {rec.name}")
                                full.put((buf, view[:got], slots[rec.name].offset + done))
                                done += got
            except BaseException as exc:
                errors.append(exc)
            finally:
                full.put(None)

        thread = threading.Thread(target=reader, name=f"reader-{load.owner}", daemon=True)
        thread.start()
        while True:
            item = full.get()
            if item is None:
                break
            buf, view, offset = item
            arena.backend.write(offset, view)
            load.bytes_done += len(view)
            view.release()
            free_bufs.put(buf)
        thread.join()
        if errors:
            raise errors[0]

    # -- queries / eviction ------------------------------------------------------------
    def wait(self, uid: str, rank: int = 0, timeout: float | None = None) -> ReplicaLoad:
        owner = self.owner_key(uid, rank)
        thread = self._threads.get(owner)
        if thread:
            thread.join(timeout)
        return self.loads[owner]

    def evict(self, uid: str, rank: int = 0) -> float:
        """Free a replica's pages; returns the seconds the bookkeeping took."""
        owner = self.owner_key(uid, rank)
        t0 = time.perf_counter()
        cancel = self._cancel.get(owner)
        if cancel is not None:
            cancel.set()
        thread = self._threads.get(owner)
        if thread and thread.is_alive():
            thread.join()  # the loader frees its own pages on cancel
        load = self.loads.pop(owner, None)
        for arena in self.arenas.values():
            with arena.lock:
                if arena.ledger.get(owner) is not None:
                    arena.free(owner)
            meta = self.meta_path(arena, owner)
            if meta and os.path.exists(meta):
                os.unlink(meta)
        if load:
            load.phase = "evicted"
        self._threads.pop(owner, None)
        self._cancel.pop(owner, None)
        return time.perf_counter() - t0

    def adopt(self, arena_name: str) -> list[ReplicaLoad]:
        """Recreate ``warm`` records for every completed shard found in a re-opened arena."""
        arena = self.arenas[arena_name]
        adopted = []
        for owner, alloc in arena.ledger.allocations().items():
            if alloc.kind != "weights" or "/rank" not in owner:
                continue
            uid, rank = owner.rsplit("/rank", 1)
            meta = self.meta_path(arena, owner)
            info = _read_json(meta) if meta else {}
            if not info.get("tensors"):
                # pages of a load that never finished: give them back
                with arena.lock:
                    arena.free(owner)
                continue
            alloc.tensors = tensors_from_json(info["tensors"])
            load = ReplicaLoad(
                uid=uid,
                model=info.get("model", ""),
                source=info.get("source", ""),
                device=arena_name,
                tp=int(info.get("tp", 1)),
                rank=int(rank),
                phase="warm",
                owner=owner,
            )
            load.bytes_total = load.bytes_done = sum(t.nbytes for t in alloc.tensors.values())
            self.loads[owner] = load
            adopted.append(load)
        return adopted

    @staticmethod
    def meta_path(arena: Arena, owner: str) -> str | None:
        if not arena.ledger_path:
            return None
        return f"{arena.ledger_path}.{owner.replace('/', '_')}.meta.json"

    def manifest(self, uid: str, rank: int = 0) -> dict:
        """What the vLLM loader needs to map one warm shard: arena handle + tensor table."""
        owner = self.owner_key(uid, rank)
        load = self.loads[owner]
        if load.phase != "warm":
            raise RuntimeError(f"{owner} is {load.phase}, not warm")
        arena = self.arenas[load.device]
        alloc = arena.ledger.get(owner)
        return {
            "owner": owner,
            "model": load.model,
            "arena": arena.handle(),
            "tensors": {
                t.name: {"dtype": t.dtype, "shape": list(t.shape), "offset": t.offset, "nbytes": t.nbytes}
                for t in alloc.tensors.values()
            },
            "packed": {g: list(m) for g, m in PACKED_GROUPS.items()},
        }


def _by_file(records: list[TensorRecord]) -> dict[str, list[TensorRecord]]:
    out: dict[str, list[TensorRecord]] = {}
    for rec in records:
        out.setdefault(rec.file, []).append(rec)
    return out


def _write_meta(path: str | None, load: ReplicaLoad, slots: dict) -> None:
    """Record what a warm shard is (and where its tensors are), so a restarted agent can adopt it."""

    if not path:
        return
    write_json_atomic(
        path,
        {"uid": load.uid, "model": load.model, "source": load.source, "tp": load.tp, "tensors": tensors_to_json(slots)},
    )


def _read_json(path: str) -> dict:
    import json

    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}
