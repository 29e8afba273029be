"""Weight store: stream safetensors shards straight into arena pages.

The store holds *shards*: one TP rank of one replica on one device, keyed by a
:class:`ShardKey` ``(ReplicaKey(uid, gpus), rank)``, so two replicas of one model
on different GPUs are different keys. Its string form (``"<uid>@<gpus>/rank<r>"``)
names the shard's pages in the arena ledger and its meta file, which is how a
restarted agent finds the same keys again (:meth:`WeightStore.adopt`). Prewarming a
shard: parse the headers, reserve one contiguous page run for all its tensors
(fails cleanly with :class:`ArenaFullError` when it cannot fit), then stream the
bytes in. Two data paths:

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

import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum, auto
from types import MappingProxyType
from typing import Any

from warmserve.protocol import ReplicaKey
from warmserve.worker.arena import Arena
from warmserve.worker.files import read_json, write_json_atomic
from warmserve.worker.ledger import ArenaFullError, TensorSlot, tensors_from_json, tensors_to_json
from warmserve.worker.safetensors_index import (
    TensorRecord,
    WeightFileError,
    open_weight_file,
    read_index,
    shard_files,
)

#: Fused vLLM parameters and the checkpoint tensors they are made of, in order.
PACKED_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
_MEMBER = {m: (g, i) for g, members in PACKED_GROUPS.items() for i, m in enumerate(members)}
_NAME_RE = re.compile(r"^(?P<prefix>.*\.)(?P<member>[a-z_]+)(?P<suffix>\.(weight|bias))$")

CHUNK = 16 * 1024 * 1024

log = logging.getLogger(__name__)


def layout_order(names: list[str]) -> list[str]:
    """Order tensor names so each packed group's members are adjacent and in order."""

    def key(name: str) -> tuple[str, str, str, int]:
        m = _NAME_RE.match(name)
        if m and m.group("member") in _MEMBER:
            group, index = _MEMBER[m.group("member")]
            return (m.group("prefix"), group, m.group("suffix"), index)
        return (name, "", "", 0)

    return sorted(names, key=key)


@dataclass(frozen=True, order=True)
class ShardKey:
    """One tensor-parallel rank of one replica: what a run of arena pages holds."""

    replica: ReplicaKey
    rank: int = 0

    @property
    def owner(self) -> str:
        """The string form (``"<uid>@<gpus>/rank<r>"``): ledger owner and meta file name in the arena."""
        return f"{self.replica.id}/rank{self.rank}"

    def __str__(self) -> str:
        return self.owner

    @classmethod
    def of_owner(cls, owner: str, device: str) -> ShardKey | None:
        """The key of a ledger owner found in a re-opened arena; ``None`` for pages that are not a shard.

        An owner written by an older worker (``"<name>/rank<r>"`` without GPUs) is keyed by its name on the
        device that holds it, so it is reported and evicted like any unplanned shard.
        """
        name, sep, rank = owner.rpartition("/rank")
        if not sep or not name or not rank.isdigit():
            return None
        replica = ReplicaKey.parse(name) or ReplicaKey(name, (int(device),) if device.isdigit() else ())
        return cls(replica, int(rank))


class ShardPhase(StrEnum):
    """Where a shard's load stands (the store's own bookkeeping; the agent maps it to replica phases)."""

    LOADING = auto()
    WARM = auto()
    FAILED = auto()
    EVICTED = auto()


@dataclass
class Shard:
    """Progress and outcome of one shard's prewarm; the agent reads it for its state."""

    key: ShardKey
    model: str
    source: str
    device: str
    tp: int = 1
    phase: ShardPhase = ShardPhase.LOADING
    bytes_total: int = 0
    bytes_done: int = 0
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    seconds: float | None = None
    #: Its pages' name in the arena ledger: ``key.owner``, or the name an older worker gave them.
    owner: str = ""

    def __post_init__(self) -> None:
        self.owner = self.owner or self.key.owner

    @property
    def replica(self) -> ReplicaKey:
        return self.key.replica

    @property
    def rank(self) -> int:
        return self.key.rank

    @property
    def progress(self) -> float:
        if self.phase == ShardPhase.WARM:
            return 1.0
        return self.bytes_done / self.bytes_total if self.bytes_total else 0.0


#: ``on_done(shard, phase)``: called by the loader when a load ends (see :meth:`WeightStore.prewarm`).
OnDone = Callable[[Shard, ShardPhase], None]


class WeightStore:
    """Prewarms, lists and evicts shards held in one or more arenas.

    The shard table is changed only by the caller's thread (``prewarm``, ``evict``, ``forget_failed``,
    ``adopt``); loader threads update the progress fields of their own :class:`Shard`. Others read it through
    :meth:`shards` / :meth:`get`.
    """

    def __init__(
        self, arenas: Mapping[str, Arena], *, staged: bool | None = None, chunk: int = CHUNK, staging_buffers: int = 3
    ):
        self.arenas = arenas
        self.staged = staged
        self.chunk = chunk
        self.staging_buffers = staging_buffers
        self._shards: dict[ShardKey, Shard] = {}
        self._threads: dict[ShardKey, threading.Thread] = {}
        self._cancel: dict[ShardKey, threading.Event] = {}

    # -- queries -----------------------------------------------------------------------
    def shards(self) -> Mapping[ShardKey, Shard]:
        """Every shard held or being loaded (a read-only snapshot of the table)."""
        return MappingProxyType(dict(self._shards))

    def get(self, key: ShardKey) -> Shard | None:
        return self._shards.get(key)

    # -- prewarm ---------------------------------------------------------------------
    def _tensor_records(self, source_dir: str, tp: int, rank: int) -> list[TensorRecord]:
        records: list[TensorRecord] = []
        for path in shard_files(source_dir, tp, rank):
            records.extend(read_index(path))
        names = [r.name for r in records]
        if len(set(names)) != len(names):
            raise WeightFileError(f"{source_dir}: duplicate tensor names across shard files")
        return records

    def prewarm(
        self,
        key: ShardKey,
        model: str,
        source_dir: str,
        device: str,
        tp: int = 1,
        *,
        wait: bool = False,
        on_done: OnDone | None = None,
    ) -> Shard:
        """Start loading one shard in a background thread (idempotent while it is loading or warm).

        ``on_done(shard, phase)`` runs when the load ends, *before* ``shard.phase`` shows the outcome, so what
        the callback records (timings) is in place by the time anyone sees the shard warm. A load that fails
        before any byte is read (bad headers, no room) returns a ``failed`` shard at once.
        """
        existing = self._shards.get(key)
        if existing and existing.phase in (ShardPhase.LOADING, ShardPhase.WARM):
            return existing
        shard = Shard(key=key, model=model, source=source_dir, device=device, tp=tp)
        self._shards[key] = shard
        arena = self.arenas[device]
        try:
            records = self._tensor_records(source_dir, tp, key.rank)
            by_name = {r.name: r for r in records}
            order = layout_order(list(by_name))
            total = sum(r.nbytes for r in records) + 256 * len(records)
            slots = arena.reserve(
                shard.owner, [(n, by_name[n].dtype, by_name[n].shape, by_name[n].nbytes) for n in order], total
            )
        except (WeightFileError, ArenaFullError) as exc:
            shard.error = str(exc)
        except Exception as exc:  # anything else a hostile checkpoint provokes is this shard's error, not a crash
            log.warning("indexing %s failed", source_dir, exc_info=True)
            shard.error = f"{source_dir}: unexpected {type(exc).__name__} while reading the headers"
        if shard.error is not None:
            if on_done:
                on_done(shard, ShardPhase.FAILED)
            shard.phase = ShardPhase.FAILED
            return shard
        shard.bytes_total = sum(r.nbytes for r in records)
        cancel = threading.Event()
        self._cancel[key] = cancel
        thread = threading.Thread(
            target=self._run,
            args=(shard, arena, records, slots, cancel, on_done),
            name=f"prewarm-{shard.owner}",
            daemon=True,
        )
        self._threads[key] = thread
        thread.start()
        if wait:
            thread.join()
        return shard

    def _run(
        self,
        shard: Shard,
        arena: Arena,
        records: list[TensorRecord],
        slots: dict[str, TensorSlot],
        cancel: threading.Event,
        on_done: OnDone | None,
    ) -> None:
        staged = self.staged if self.staged is not None else not arena.kind.host_addressable
        try:
            if staged:
                self._copy_staged(shard, arena, records, slots, cancel)
            else:
                self._copy_direct(shard, arena, records, slots, cancel)
            if cancel.is_set():
                raise InterruptedError("evicted while loading")
            shard.seconds = time.monotonic() - shard.started
            arena.persist()
            _write_meta(arena.meta_path(shard.owner), shard, slots)
            phase = ShardPhase.WARM
        except Exception as exc:  # a load that fails in any way frees its pages and fails only this shard
            interrupted = isinstance(exc, InterruptedError)
            if isinstance(exc, WeightFileError):
                shard.error = str(exc)
            elif isinstance(exc, OSError):
                shard.error = f"{shard.source}: {exc.strerror or type(exc).__name__}"
            elif interrupted:
                shard.error = str(exc)
            else:
                log.warning("loading %s failed", shard.source, exc_info=True)
                shard.error = f"{shard.source}: unexpected {type(exc).__name__} while loading"
            phase = ShardPhase.EVICTED if interrupted else ShardPhase.FAILED
            arena.release(shard.owner)
        if on_done:
            on_done(shard, phase)
        shard.phase = phase

    def _copy_direct(
        self,
        shard: Shard,
        arena: Arena,
        records: list[TensorRecord],
        slots: dict[str, TensorSlot],
        cancel: threading.Event,
    ) -> None:
        for path, recs in _by_file(records).items():
            fd, _ = open_weight_file(path)
            try:
                for rec in recs:
                    dst = arena.direct_buffer(slots[rec.name].offset, rec.nbytes)
                    done = 0
                    while done < rec.nbytes:
                        if cancel.is_set():
                            return
                        n = os.preadv(fd, [dst[done : done + self.chunk]], rec.file_offset + done)
                        if n <= 0:
                            raise WeightFileError(f"{path}: unexpected end of file in {rec.name}")
                        done += n
                        shard.bytes_done += n
            finally:
                os.close(fd)

    def _copy_staged(
        self,
        shard: Shard,
        arena: Arena,
        records: list[TensorRecord],
        slots: dict[str, TensorSlot],
        cancel: threading.Event,
    ) -> None:
        """Reader thread → ring of staging buffers → copier (this thread)."""
        free_bufs: queue.Queue[bytearray] = queue.Queue()
        for _ in range(self.staging_buffers):
            free_bufs.put(bytearray(self.chunk))
        full: queue.Queue[tuple[bytearray, memoryview, int] | None] = queue.Queue()
        errors: list[BaseException] = []

        def reader() -> None:
            try:
                for path, recs in _by_file(records).items():
                    with os.fdopen(open_weight_file(path)[0], "rb", buffering=0) as fh:
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

        thread = threading.Thread(target=reader, name=f"reader-{shard.owner}", daemon=True)
        thread.start()
        while True:
            item = full.get()
            if item is None:
                break
            buf, view, offset = item
            arena.write(offset, view)
            shard.bytes_done += len(view)
            view.release()
            free_bufs.put(buf)
        thread.join()
        if errors:
            raise errors[0]

    # -- eviction / release --------------------------------------------------------------
    def evict(self, key: ShardKey) -> float:
        """Free a shard's pages (cancelling its load if it is still loading); returns the seconds it took."""
        t0 = time.perf_counter()
        cancel = self._cancel.get(key)
        if cancel is not None:
            cancel.set()
        thread = self._threads.get(key)
        if thread and thread.is_alive():
            thread.join()  # the loader frees its own pages on cancel
        shard = self._shards.pop(key, None)
        owner = shard.owner if shard is not None else key.owner
        for arena in self.arenas.values():
            arena.release(owner)
            meta = arena.meta_path(owner)
            if meta and os.path.exists(meta):
                os.unlink(meta)
        if shard:
            shard.phase = ShardPhase.EVICTED
        self._threads.pop(key, None)
        self._cancel.pop(key, None)
        return time.perf_counter() - t0

    def forget_failed(self, key: ShardKey) -> Shard | None:
        """Drop the record of a failed shard (it holds no pages); returns it, or ``None`` if it had not failed."""
        shard = self._shards.get(key)
        if shard is None or shard.phase != ShardPhase.FAILED:
            return None
        self._threads.pop(key, None)
        self._cancel.pop(key, None)
        return self._shards.pop(key)

    # -- restart adoption -----------------------------------------------------------------
    def adopt(self, device: str) -> list[Shard]:
        """Recreate ``warm`` records for every completed shard found in a re-opened arena.

        Pages of a load that never finished (no meta file) are given back.
        """
        arena = self.arenas[device]
        adopted = []
        for owner in arena.owners("weights"):
            key = ShardKey.of_owner(owner, device)
            if key is None:
                continue
            meta = arena.meta_path(owner)
            info = read_json(meta) if meta else {}
            if not info.get("tensors"):
                arena.release(owner)
                continue
            slots = tensors_from_json(info["tensors"])
            arena.restore(owner, slots)
            shard = Shard(
                key=key,
                model=str(info.get("model", "")),
                source=str(info.get("source", "")),
                device=device,
                tp=int(info.get("tp", 1)),
                phase=ShardPhase.WARM,
                owner=owner,
            )
            shard.bytes_total = shard.bytes_done = sum(t.nbytes for t in slots.values())
            self._shards[key] = shard
            adopted.append(shard)
        return adopted

    # -- promotion -----------------------------------------------------------------------
    def manifest(self, key: ShardKey) -> dict[str, Any]:
        """What the vLLM loader needs to map one warm shard: arena handle + tensor table."""
        shard = self._shards[key]
        if shard.phase != ShardPhase.WARM:
            raise RuntimeError(f"{shard.owner} is {shard.phase}, not warm")
        arena = self.arenas[shard.device]
        slots = arena.tensors(shard.owner)
        if slots is None:
            raise RuntimeError(f"{shard.owner} holds no pages in arena {arena.name}")
        return {
            "owner": shard.owner,
            "model": shard.model,
            "arena": arena.handle(),
            "tensors": {
                t.name: {"dtype": t.dtype, "shape": list(t.shape), "offset": t.offset, "nbytes": t.nbytes}
                for t in slots.values()
            },
            "packed": {g: list(m) for g, m in PACKED_GROUPS.items()},
        }


def _by_file(records: list[TensorRecord]) -> dict[str, list[TensorRecord]]:
    out: dict[str, list[TensorRecord]] = {}
    for rec in records:
        out.setdefault(rec.file, []).append(rec)
    return out


def _write_meta(path: str | None, shard: Shard, slots: dict[str, TensorSlot]) -> None:
    """Record what a warm shard is (and where its tensors are), so a restarted agent can adopt it."""
    if not path:
        return
    write_json_atomic(
        path,
        {
            "uid": shard.replica.id,
            "model": shard.model,
            "source": shard.source,
            "tp": shard.tp,
            "tensors": tensors_to_json(slots),
        },
    )
