"""Memory backends behind the arena: host shared memory (CPU) and CUDA (GPU).

A backend owns the one big allocation of a device and knows two things the
ledger does not: how to write bytes at an offset, and how another process (the
vLLM engine) can map the same memory. Everything else (pages, owners) is the
ledger's business, and only the :class:`~warmserve.worker.arena.Arena` talks to a
backend.

What kind of memory a node uses is decided once (:func:`warmserve.worker.devices.build_arenas`)
and carried as a :class:`DeviceKind`; every other module asks the kind's properties
(``host_addressable``, ``on_gpu``, ``outlives_agent``) instead of comparing names.

* :class:`ShmBackend` — a file under ``/dev/shm`` mapped with ``MAP_SHARED``.
  The engine re-opens the file by path and maps it, so promotion is zero copy.
  Because the file outlives the agent process, a restarted agent can re-open
  it and adopt the pages (no leak, no reload).
* :class:`CudaBackend` — one ``torch.uint8`` tensor on a GPU; the engine rebuilds
  it from a single CUDA IPC handle (``torch.multiprocessing.reductions``), then
  takes views by offset. One handle per arena is what lets *many* models share a
  GPU (vLLM's own ``ipc_cache`` daemon ships one handle per tensor of one
  model). Imported lazily; not exercised on this CPU-only machine.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from abc import ABC, abstractmethod
from enum import StrEnum
from typing import Any


class DeviceKind(StrEnum):
    """The memory an arena lives in (also its ``kind`` in arena handles and in the state's devices)."""

    SHM = "shm"  # host shared memory: a /dev/shm file (CPU nodes)
    CUDA = "cuda"  # one CUDA allocation per GPU, shared with engines through one IPC handle

    @property
    def host_addressable(self) -> bool:
        """Arena bytes can be filled by ``preadv``/``readinto`` directly (else they are staged and copied)."""
        return self is DeviceKind.SHM

    @property
    def on_gpu(self) -> bool:
        """The weights sit in GPU memory: engines open them by CUDA IPC and count them against the GPU."""
        return self is DeviceKind.CUDA

    @property
    def outlives_agent(self) -> bool:
        """The arena survives the agent process (a file), so engines keep serving across an agent restart.

        CUDA IPC memory dies with the process that exported it (the agent), so GPU engines must stop with it.
        """
        return self is DeviceKind.SHM


class MemoryBackend(ABC):
    """One device allocation that pages are carved from."""

    kind: DeviceKind
    #: total memory of the device the allocation lives on (a GPU's, from NVML); 0 for host memory, where
    #: engines are sized from the node's memory instead (worker ``__main__.cpu_kv_cache_env``)
    device_bytes: int = 0

    @property
    @abstractmethod
    def size(self) -> int: ...

    @abstractmethod
    def write(self, offset: int, data: memoryview) -> None:
        """Copy ``data`` into the arena at byte ``offset``."""

    def direct_buffer(self, offset: int, nbytes: int) -> memoryview:
        """A writable view of arena bytes (host backends only)."""
        raise NotImplementedError(f"{self.kind} memory is not host addressable")

    @abstractmethod
    def handle(self) -> dict[str, Any]:
        """What an engine process needs to map the arena (JSON-serialisable; ``kind`` is a DeviceKind)."""

    @abstractmethod
    def close(self, unlink: bool = True) -> None: ...


class ShmBackend(MemoryBackend):
    """Host shared memory: a ``/dev/shm`` file, pre-faulted so copies run at memory speed."""

    kind = DeviceKind.SHM

    def __init__(self, path: str, size: int, *, reuse: bool = False, populate: bool = True):
        self.path = path
        self._size = size
        exists = os.path.exists(path)
        if reuse and exists and os.path.getsize(path) == size:
            fd = os.open(path, os.O_RDWR)
        else:
            if exists:
                # Never truncate in place: an engine may still map the old file
                # (SIGBUS). Unlinking keeps its inode alive until that engine exits.
                os.unlink(path)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                os.close(fd)
                os.unlink(path)
                raise MemoryError(f"cannot reserve {size} B of shared memory at {path}: {exc}") from exc
        self._fd = fd
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        self._mm: mmap.mmap | None = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._view = memoryview(self._mm)

    @property
    def size(self) -> int:
        return self._size

    def write(self, offset: int, data: memoryview) -> None:
        self._view[offset : offset + len(data)] = data

    def direct_buffer(self, offset: int, nbytes: int) -> memoryview:
        return self._view[offset : offset + nbytes]

    def handle(self) -> dict[str, Any]:
        return {"kind": str(self.kind), "path": self.path, "size": self._size}

    def close(self, unlink: bool = True) -> None:
        if self._mm is None:
            return
        self._view.release()
        # BufferError: a caller still holds a view; the mapping goes away with the process
        with contextlib.suppress(BufferError):
            self._mm.close()
        os.close(self._fd)
        self._mm = None
        if unlink and os.path.exists(self.path):
            os.unlink(self.path)


class CudaBackend(MemoryBackend):
    """One ``uint8`` CUDA tensor per GPU, shared with engines through one IPC handle.

    Written for real GPUs; needs ``torch`` with CUDA. ``write`` copies from host
    memory on a dedicated stream. TP ranks of a replica live on different GPUs,
    so each GPU has its own backend and the engine for rank *r* opens the
    handle of GPU *r*.
    """

    kind = DeviceKind.CUDA

    def __init__(self, device_index: int, size: int, device_bytes: int = 0):
        import torch  # lazy: the CPU path must not need CUDA

        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
        self.device_index = device_index
        self.device_bytes = device_bytes
        self._torch = torch
        self._size = size
        self._tensor: Any = torch.empty(size, dtype=torch.uint8, device=f"cuda:{device_index}")
        self._stream = torch.cuda.Stream(device=device_index, priority=-1)

    @property
    def size(self) -> int:
        return self._size

    def write(self, offset: int, data: memoryview) -> None:
        torch = self._torch
        src = torch.frombuffer(data, dtype=torch.uint8)
        with torch.cuda.stream(self._stream):
            self._tensor[offset : offset + len(data)].copy_(src, non_blocking=False)
        self._stream.synchronize()

    def handle(self) -> dict[str, Any]:
        return {"kind": str(self.kind), "device": self.device_index, "ipc": encode_cuda_ipc(self._tensor)}

    def close(self, unlink: bool = True) -> None:
        self._tensor = None
        self._torch.cuda.empty_cache()


def encode_cuda_ipc(tensor: Any) -> str:
    """Serialise a CUDA tensor's IPC handle (torch's reducer) as hex-pickled text."""
    import pickle

    from torch.multiprocessing.reductions import reduce_tensor

    rebuild, args = reduce_tensor(tensor)
    return pickle.dumps((rebuild, args)).hex()


def decode_cuda_ipc(text: str, device_index: int) -> Any:
    """Rebuild the arena tensor in another process (the engine) from its handle."""
    import pickle

    rebuild, args = pickle.loads(bytes.fromhex(text))
    args = list(args)
    args[6] = device_index  # torch's rebuild_cuda_tensor: storage_device
    return rebuild(*args)
