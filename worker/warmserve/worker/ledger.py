"""Page ledger of one device arena: pure bookkeeping, no memory, no I/O.

The arena is one allocation split into ``page_count`` fixed pages. The ledger
records which pages belong to which owner (a replica's TP-rank shard, or KV
space lent to an engine) and which are free. Every tensor of a replica is
placed inside one *contiguous run* of pages allocated for the whole replica, so
a tensor larger than a page is simply a byte range that spans several pages
and can be exposed as one strided view without gathering.

Allocation is first-fit over a sorted list of free extents; freeing merges the
returned extent with its neighbours. Both are O(number of extents), never
O(bytes): eviction moves no data. A request that does not fit raises
:class:`ArenaFullError` with the numbers needed to act on it, instead of
letting the device allocator crash the process.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


class ArenaFullError(Exception):
    """A plan asked for more contiguous pages than the arena has free."""

    def __init__(self, owner: str, need_pages: int, free_pages: int, largest_run: int, page_size: int):
        self.owner = owner
        self.need_pages = need_pages
        self.free_pages = free_pages
        self.largest_run = largest_run
        self.page_size = page_size
        super().__init__(
            f"{owner}: needs {need_pages} contiguous pages ({need_pages * page_size} B) but only "
            f"{free_pages} pages are free (largest free run {largest_run} pages)"
        )


@dataclass(frozen=True)
class Extent:
    """A run of ``count`` pages starting at page ``start``."""

    start: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.count


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives: byte offset from the start of the arena."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass
class Allocation:
    """Pages held by one owner (``kind`` is ``weights`` or ``kv``)."""

    owner: str
    kind: str
    extent: Extent
    tensors: dict[str, TensorSlot] = field(default_factory=dict)


def pages_for(nbytes: int, page_size: int) -> int:
    """Number of pages needed to hold ``nbytes`` (at least one)."""
    return max(1, -(-nbytes // page_size))


class Ledger:
    """Free-extent list plus owner → allocation map for one arena."""

    def __init__(self, page_count: int, page_size: int):
        if page_count <= 0 or page_size <= 0:
            raise ValueError("page_count and page_size must be positive")
        self.page_count = page_count
        self.page_size = page_size
        self._free: list[Extent] = [Extent(0, page_count)]
        self._allocations: dict[str, Allocation] = {}

    # -- queries -----------------------------------------------------------------
    @property
    def free_pages(self) -> int:
        return sum(e.count for e in self._free)

    @property
    def used_pages(self) -> int:
        return self.page_count - self.free_pages

    @property
    def largest_free_run(self) -> int:
        return max((e.count for e in self._free), default=0)

    def free_extents(self) -> list[Extent]:
        return list(self._free)

    def allocations(self) -> dict[str, Allocation]:
        return dict(self._allocations)

    def get(self, owner: str) -> Allocation | None:
        return self._allocations.get(owner)

    def owner_of_page(self, page: int) -> str | None:
        """Which owner holds ``page`` (``None`` when free): for audits and tests."""
        for alloc in self._allocations.values():
            if alloc.extent.start <= page < alloc.extent.end:
                return alloc.owner
        return None

    # -- mutations ---------------------------------------------------------------
    def allocate(self, owner: str, nbytes: int, kind: str = "weights") -> Allocation:
        """Reserve a contiguous run for ``owner`` (first fit); no data is touched."""
        if owner in self._allocations:
            raise ValueError(f"{owner} already holds pages")
        need = pages_for(nbytes, self.page_size)
        for index, ext in enumerate(self._free):
            if ext.count >= need:
                taken = Extent(ext.start, need)
                rest = Extent(ext.start + need, ext.count - need)
                if rest.count:
                    self._free[index] = rest
                else:
                    del self._free[index]
                alloc = Allocation(owner=owner, kind=kind, extent=taken)
                self._allocations[owner] = alloc
                return alloc
        raise ArenaFullError(owner, need, self.free_pages, self.largest_free_run, self.page_size)

    def place_tensors(
        self, owner: str, tensors: list[tuple[str, str, tuple[int, ...], int]], align: int = 256
    ) -> dict[str, TensorSlot]:
        """Assign byte offsets inside ``owner``'s run, in the order given.

        The order matters: callers put the parts of a fused vLLM parameter
        (q/k/v, gate/up) next to each other so the engine can view them as one
        tensor. Offsets are aligned to ``align`` bytes only between groups the
        caller marks by passing ``align``; packed neighbours must have sizes that
        are already multiples of ``align`` to stay adjacent (checked by the engine).
        """
        alloc = self._allocations[owner]
        base = alloc.extent.start * self.page_size
        limit = alloc.extent.count * self.page_size
        cursor = 0
        slots: dict[str, TensorSlot] = {}
        for name, dtype, shape, nbytes in tensors:
            cursor = -(-cursor // align) * align
            if cursor + nbytes > limit:
                raise ValueError(f"{owner}: tensor {name} overflows its {limit} B run")
            slots[name] = TensorSlot(name, dtype, tuple(shape), base + cursor, nbytes)
            cursor += nbytes
        alloc.tensors = slots
        return slots

    def free(self, owner: str) -> Extent:
        """Return ``owner``'s pages to the free list, merging neighbours."""
        alloc = self._allocations.pop(owner)
        ext = alloc.extent
        starts = [e.start for e in self._free]
        pos = bisect.bisect_left(starts, ext.start)
        self._free.insert(pos, ext)
        # merge with right neighbour, then left neighbour
        if pos + 1 < len(self._free) and self._free[pos].end == self._free[pos + 1].start:
            self._free[pos] = Extent(self._free[pos].start, self._free[pos].count + self._free[pos + 1].count)
            del self._free[pos + 1]
        if pos > 0 and self._free[pos - 1].end == self._free[pos].start:
            self._free[pos - 1] = Extent(self._free[pos - 1].start, self._free[pos - 1].count + self._free[pos].count)
            del self._free[pos]
        return ext

    # -- persistence (lets a restarted agent adopt the arena) ---------------------
    def to_json(self, with_tensors: bool = True) -> dict:
        """Serialisable form; ``with_tensors=False`` keeps only page extents (cheap to rewrite)."""
        return {
            "page_count": self.page_count,
            "page_size": self.page_size,
            "allocations": [
                {
                    "owner": a.owner,
                    "kind": a.kind,
                    "start": a.extent.start,
                    "count": a.extent.count,
                    "tensors": tensors_to_json(a.tensors) if with_tensors else [],
                }
                for a in self._allocations.values()
            ],
        }

    @classmethod
    def from_json(cls, data: dict) -> Ledger:
        """Rebuild a ledger; overlapping or out-of-range records are rejected."""
        ledger = cls(int(data["page_count"]), int(data["page_size"]))
        for rec in sorted(data.get("allocations", []), key=lambda r: r["start"]):
            ext = Extent(int(rec["start"]), int(rec["count"]))
            ledger._take(rec["owner"], rec.get("kind", "weights"), ext)
            ledger._allocations[rec["owner"]].tensors = tensors_from_json(rec.get("tensors", []))
        return ledger

    def _take(self, owner: str, kind: str, ext: Extent) -> None:
        for index, free in enumerate(self._free):
            if free.start <= ext.start and ext.end <= free.end:
                parts = [Extent(free.start, ext.start - free.start), Extent(ext.end, free.end - ext.end)]
                self._free[index : index + 1] = [p for p in parts if p.count]
                self._allocations[owner] = Allocation(owner, kind, ext)
                return
        raise ValueError(f"{owner}: pages {ext.start}..{ext.end} are not free")


def tensors_to_json(slots: dict[str, TensorSlot]) -> list[dict]:
    return [
        {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "offset": t.offset, "nbytes": t.nbytes}
        for t in slots.values()
    ]


def tensors_from_json(items: list[dict]) -> dict[str, TensorSlot]:
    return {
        t["name"]: TensorSlot(t["name"], t["dtype"], tuple(t["shape"]), int(t["offset"]), int(t["nbytes"]))
        for t in items
    }
