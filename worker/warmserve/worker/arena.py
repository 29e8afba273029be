"""A device arena: one backend allocation + the page ledger that carves it up.

The arena is the only place where ledger decisions meet real memory. It also
persists the ledger beside a host-memory arena (``<path>.ledger.json``) so an
agent restarted on the same node can re-open the same pages instead of leaking
them or reading the weights again.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import Any

from warmserve.worker.backends import MemoryBackend, ShmBackend
from warmserve.worker.files import write_json_atomic
from warmserve.worker.ledger import Allocation, Ledger

DEFAULT_PAGE_SIZE = 2 * 1024 * 1024


@dataclass(frozen=True)
class DeviceUsage:
    device: str
    total: int
    used: int
    free: int


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
        self.backend = backend
        self.page_size = page_size
        pages = backend.size // page_size
        self.ledger = ledger or Ledger(pages, page_size)
        if self.ledger.page_count != pages or self.ledger.page_size != page_size:
            raise ValueError("persisted ledger does not match the arena geometry")
        self.ledger_path = ledger_path
        self.lock = threading.RLock()

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

    # -- bookkeeping ---------------------------------------------------------------
    def usage(self) -> DeviceUsage:
        with self.lock:
            used = self.ledger.used_pages * self.page_size
            total = self.ledger.page_count * self.page_size
            return DeviceUsage(self.name, total, used, total - used)

    def allocate(self, owner: str, nbytes: int, kind: str = "weights") -> Allocation:
        with self.lock:
            alloc = self.ledger.allocate(owner, nbytes, kind)
            return alloc

    def free(self, owner: str) -> None:
        """Evict: give ``owner``'s pages back. Bookkeeping only, independent of size."""
        with self.lock:
            ext = self.ledger.free(owner)
            self.persist()
        self.backend.release_pages(ext.start * self.page_size, ext.count * self.page_size)

    def persist(self) -> None:
        """Write the page extents next to a host arena (atomic rename).

        Tensor tables are not rewritten here (they live in each replica's meta
        file, written once when it turns warm), so an eviction rewrites a few
        hundred bytes whatever the size of the models involved.
        """
        if not self.ledger_path:
            return
        with self.lock:  # one writer at a time, so the file on disk follows the ledger's order of changes
            write_json_atomic(self.ledger_path, self.ledger.to_json(with_tensors=False))

    def handle(self) -> dict[str, Any]:
        return self.backend.handle()

    def close(self, unlink: bool = True) -> None:
        self.backend.close(unlink=unlink)
        if unlink and self.ledger_path:
            directory, base = os.path.split(self.ledger_path)
            for name in os.listdir(directory or "."):
                if name == base or (name.startswith(base + ".") and name.endswith(".meta.json")):
                    os.unlink(os.path.join(directory, name))
