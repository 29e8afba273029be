"""A device arena: one backend allocation + the page ledger that carves it up.

The arena is the only place where ledger decisions meet real memory, and the only
owner of its ledger, backend and lock: the weight store and the agent go through the
methods below, each of which takes the lock, so a loader thread and the agent never
see a half-made allocation. It also persists the ledger beside a host-memory arena
(``<path>.ledger.json``) so an agent restarted on the same node can re-open the same
pages instead of leaking them or reading the weights again.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from warmserve.worker.backends import DeviceKind, MemoryBackend, ShmBackend
from warmserve.worker.files import write_json_atomic
from warmserve.worker.ledger import Extent, Ledger, TensorSlot

DEFAULT_PAGE_SIZE = 2 * 1024 * 1024

#: What :meth:`Arena.reserve` places: ``(name, dtype, shape, nbytes)`` per tensor, in layout order.
TensorSpec = tuple[str, str, tuple[int, ...], int]


@dataclass(frozen=True)
class DeviceUsage:
    """Bytes of one arena: total, used, free and the largest contiguous free run."""

    device: str
    total: int
    used: int
    free: int
    largest_free_run: int


class Arena:
    """Pages of one device; thread-safe (loader threads and the agent share it)."""

    def __init__(
        self,
        name: str,
        backend: MemoryBackend,
        page_size: int = DEFAULT_PAGE_SIZE,
        ledger: Ledger | None = None,
        ledger_path: str | None = None,
    ):
        self.name = name
        self.page_size = page_size
        self._backend = backend
        pages = backend.size // page_size
        self._ledger = ledger or Ledger(pages, page_size)
        if self._ledger.page_count != pages or self._ledger.page_size != page_size:
            raise ValueError("persisted ledger does not match the arena geometry")
        self._ledger_path = ledger_path
        self._lock = threading.RLock()

    @classmethod
    def host(cls, name: str, path: str, size: int, page_size: int = DEFAULT_PAGE_SIZE, adopt: bool = True) -> Arena:
        """A shared-memory arena; re-opens an existing one (and its ledger) when ``adopt``."""
        size = (size // page_size) * page_size
        ledger_path = path + ".ledger.json"
        ledger = None
        if adopt and os.path.exists(path) and os.path.exists(ledger_path):
            try:
                with open(ledger_path) as fh:
                    candidate = Ledger.from_json(json.load(fh))
                if candidate.page_count * candidate.page_size == size and candidate.page_size == page_size:
                    ledger = candidate
            except (ValueError, KeyError, json.JSONDecodeError):
                ledger = None
        backend = ShmBackend(path, size, reuse=ledger is not None)
        return cls(name, backend, page_size, ledger=ledger, ledger_path=ledger_path)

    # -- what it is ----------------------------------------------------------------
    @property
    def kind(self) -> DeviceKind:
        return self._backend.kind

    @property
    def device_bytes(self) -> int:
        """Total memory of the device this arena lives on (0 for host memory; see ``MemoryBackend``)."""
        return self._backend.device_bytes

    def handle(self) -> dict[str, Any]:
        """What an engine process needs to map this arena (see :meth:`MemoryBackend.handle`)."""
        return self._backend.handle()

    # -- queries -------------------------------------------------------------------
    def usage(self) -> DeviceUsage:
        with self._lock:
            used = self._ledger.used_pages * self.page_size
            total = self._ledger.page_count * self.page_size
            largest = self._ledger.largest_free_run * self.page_size
            return DeviceUsage(self.name, total, used, total - used, largest)

    def extent(self, owner: str) -> Extent | None:
        """The pages ``owner`` holds (``None`` when it holds none)."""
        with self._lock:
            alloc = self._ledger.get(owner)
            return alloc.extent if alloc is not None else None

    def free_extents(self) -> list[Extent]:
        with self._lock:
            return self._ledger.free_extents()

    def owners(self, kind: str = "weights") -> list[str]:
        """Owners holding pages of ``kind`` (``weights`` or ``kv``)."""
        with self._lock:
            return [owner for owner, alloc in self._ledger.allocations().items() if alloc.kind == kind]

    def tensors(self, owner: str) -> dict[str, TensorSlot] | None:
        """Where ``owner``'s tensors live (a copy), or ``None`` when it holds no pages."""
        with self._lock:
            alloc = self._ledger.get(owner)
            return dict(alloc.tensors) if alloc is not None else None

    # -- mutations -------------------------------------------------------------------
    def reserve(self, owner: str, tensors: Sequence[TensorSpec], nbytes: int) -> dict[str, TensorSlot]:
        """Allocate one contiguous run of ``nbytes`` for ``owner`` and place ``tensors`` in it, in order.

        Both happen under the lock, so nobody sees the run without its tensor table. Raises
        :class:`~warmserve.worker.ledger.ArenaFullError` when no run is large enough (nothing is held then).
        """
        with self._lock:
            self._ledger.allocate(owner, nbytes)
            try:
                return dict(self._ledger.place_tensors(owner, list(tensors)))
            except BaseException:
                self._ledger.free(owner)
                raise

    def restore(self, owner: str, tensors: dict[str, TensorSlot]) -> None:
        """Re-attach the tensor table of an owner found in a re-opened arena (restart adoption)."""
        with self._lock:
            alloc = self._ledger.get(owner)
            if alloc is None:
                raise KeyError(owner)
            alloc.tensors = dict(tensors)

    def release(self, owner: str) -> bool:
        """Evict: give ``owner``'s pages back if it holds any. Bookkeeping only, independent of size."""
        with self._lock:
            if self._ledger.get(owner) is None:
                return False
            self._ledger.free(owner)
            self.persist()
            return True

    def write(self, offset: int, data: memoryview) -> None:
        """Copy ``data`` into the arena at byte ``offset`` (any kind of memory)."""
        self._backend.write(offset, data)

    def direct_buffer(self, offset: int, nbytes: int) -> memoryview:
        """A writable view of arena bytes, for ``preadv`` straight into them (``kind.host_addressable`` only)."""
        return self._backend.direct_buffer(offset, nbytes)

    # -- persistence -------------------------------------------------------------------
    def persist(self) -> None:
        """Write the page extents next to a host arena (atomic rename).

        Tensor tables are not rewritten here (they live in each replica's meta
        file, written once when it turns warm), so an eviction rewrites a few
        hundred bytes whatever the size of the models involved.
        """
        if not self._ledger_path:
            return
        with self._lock:  # one writer at a time, so the file on disk follows the ledger's order of changes
            write_json_atomic(self._ledger_path, self._ledger.to_json(with_tensors=False))

    def meta_path(self, owner: str) -> str | None:
        """A per-owner file beside the persisted ledger (removed with the arena); ``None`` when not persisted."""
        if not self._ledger_path:
            return None
        return f"{self._ledger_path}.{owner.replace('/', '_')}.meta.json"

    def close(self, unlink: bool = True) -> None:
        self._backend.close(unlink=unlink)
        if unlink and self._ledger_path:
            directory, base = os.path.split(self._ledger_path)
            for name in os.listdir(directory or "."):
                if name == base or (name.startswith(base + ".") and name.endswith(".meta.json")):
                    os.unlink(os.path.join(directory, name))
