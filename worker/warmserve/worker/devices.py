"""Device inventory and arena creation: NVML/CUDA on GPU nodes, shared memory elsewhere.

This is where a node's :class:`~warmserve.worker.backends.DeviceKind` is decided
(:func:`build_arenas`; :func:`node_kind` answers it afterwards); the rest of the worker
asks the kind. Everything GPU-specific is imported lazily, so this module (and the agent)
runs on CPU-only machines; :func:`gpu_inventory` returns ``[]`` there.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from warmserve.worker.arena import DEFAULT_PAGE_SIZE, Arena
from warmserve.worker.backends import CudaBackend, DeviceKind

GiB = 1 << 30


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str
    total: int
    free: int


def gpu_inventory(nvml: Any = None) -> list[GpuInfo]:
    """Visible GPUs via NVML (``nvidia-ml-py``); ``[]`` when NVML or a driver is absent.

    ``nvml`` is injectable so the logic is unit-tested without a GPU.
    """
    if nvml is None:
        try:
            import pynvml
        except ImportError:
            return []
        nvml = pynvml
    try:
        nvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound / DriverNotLoaded
        return []
    try:
        out = []
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            name = nvml.nvmlDeviceGetName(h)
            uuid = nvml.nvmlDeviceGetUUID(h)
            out.append(
                GpuInfo(
                    i,
                    name.decode() if isinstance(name, bytes) else name,
                    uuid.decode() if isinstance(uuid, bytes) else uuid,
                    int(mem.total),
                    int(mem.free),
                )
            )
        return out
    finally:
        nvml.nvmlShutdown()


def arena_bytes_for(free: int, fraction: float, page_size: int) -> int:
    """Arena size: ``fraction`` of free memory, whole pages only."""
    if not 0 < fraction <= 1:
        raise ValueError("memory fraction must be in (0, 1]")
    return int(free * fraction) // page_size * page_size


def build_arenas(
    device: str,
    *,
    state_dir: str,
    shm_dir: str = "/dev/shm",
    cpu_devices: int = 1,
    arena_bytes: int | None = None,
    memory_fraction: float = 0.9,
    page_size: int = DEFAULT_PAGE_SIZE,
    nvml: Any = None,
) -> dict[str, Arena]:
    """One arena per device, named by GPU index ("0", "1", ...) as in the plan's ``gpus``.

    The node's kind is decided here: CUDA arenas when NVML reports GPUs (``device`` ``auto`` or ``cuda``),
    host shared memory otherwise; never a mix.
    """
    gpus = gpu_inventory(nvml) if device in ("auto", "cuda") else []
    if device == "cuda" and not gpus:
        raise RuntimeError("--device cuda but NVML reports no GPU")
    if gpus:
        return {
            str(g.index): Arena(
                str(g.index),
                CudaBackend(g.index, arena_bytes_for(g.free, memory_fraction, page_size), device_bytes=g.total),
                page_size,
            )
            for g in gpus
        }
    size = arena_bytes or GiB
    prefix = host_arena_prefix(state_dir)
    return {
        str(i): Arena.host(str(i), os.path.join(shm_dir, f"{prefix}{i}"), size, page_size) for i in range(cpu_devices)
    }


def host_arena_prefix(state_dir: str) -> str:
    """Name prefix of the host arenas of the worker whose state directory is `state_dir` (arena i is
    `<shm_dir>/<prefix><i>`): its base name for the reader, and a hash of its full path so that two workers on
    one host (two users, two state directories of the same name) never share an arena."""
    path = os.path.realpath(state_dir)
    tag = os.path.basename(path) or "worker"
    return f"warmserve-{tag}-{hashlib.sha256(path.encode()).hexdigest()[:10]}-arena"


def node_kind(arenas: Mapping[str, Arena]) -> DeviceKind:
    """The kind of memory this node's arenas live in (:func:`build_arenas` never mixes kinds)."""
    kinds = {arena.kind for arena in arenas.values()}
    if len(kinds) > 1:
        raise ValueError(f"arenas of mixed kinds: {sorted(kinds)}")
    return kinds.pop() if kinds else DeviceKind.SHM
