"""Bind a model's parameters to tensors that already sit in an arena (torch only, no vLLM).

Given a manifest (tensor name → dtype/shape/byte offset in the arena) and the
arena as one flat ``uint8`` tensor (a shared-memory mapping on CPU, a CUDA IPC
rebuild on GPU), every parameter of the freshly built model is pointed at a
*view* of the arena: ``param.data = arena[off:off+n].view(dtype).view(shape)``.
Nothing is copied. A fused parameter (``qkv_proj`` = q|k|v stacked on dim 0)
maps when its parts are adjacent in the arena, which the weight store
guarantees for TP-rank shards. Anything that cannot be viewed (a dtype cast,
a different layout) is returned to the caller, which copies it from the arena
through the model's own ``load_weights`` (memory → memory, still no file read).
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from warmserve.worker.backends import DeviceKind, decode_cuda_ipc

TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

_MAPPINGS: list[Any] = []  # keep host mappings alive for the life of the process


def open_arena_tensor(handle: dict[str, Any], device_index: int = 0) -> torch.Tensor:
    """The whole arena as one flat uint8 tensor in *this* process (a handle from ``Arena.handle()``)."""
    kind = arena_kind(handle)
    if kind is DeviceKind.SHM:
        fd = os.open(handle["path"], os.O_RDONLY)
        try:
            # MAP_PRIVATE + PROT_WRITE: reads share the arena's pages (zero copy); a
            # stray in-place write by the engine copies one page privately instead of
            # corrupting the warm replica other engines may map later.
            mm = mmap.mmap(fd, int(handle["size"]), flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        _MAPPINGS.append(mm)
        return torch.frombuffer(mm, dtype=torch.uint8)
    return decode_cuda_ipc(handle["ipc"], device_index)


def arena_kind(handle: dict[str, Any]) -> DeviceKind:
    """The :class:`DeviceKind` an arena handle names (ValueError for anything else)."""
    try:
        return DeviceKind(handle["kind"])
    except (KeyError, ValueError):
        raise ValueError(f"unknown arena kind {handle.get('kind')!r}") from None


def slot_view(arena: torch.Tensor, slot: dict[str, Any]) -> torch.Tensor:
    dtype = TORCH_DTYPES[slot["dtype"]]
    raw = arena[int(slot["offset"]) : int(slot["offset"]) + int(slot["nbytes"])]
    return raw.view(dtype).view(tuple(slot["shape"]))


@dataclass
class BindReport:
    mapped: list[str] = field(default_factory=list)  # params now viewing the arena
    mapped_bytes: int = 0
    unmapped: list[str] = field(default_factory=list)  # params the caller must fill
    sources_for_unmapped: list[str] = field(default_factory=list)  # checkpoint tensors to copy


def rank_manifest(manifest: dict[str, Any], rank: int) -> dict[str, Any]:
    """The part of a promotion manifest that tensor-parallel rank ``rank`` binds.

    A ``tp > 1`` replica's manifest lists one manifest per rank under ``ranks`` (each shard sits in the arena of
    its own GPU; the part returned says ``tp``); a standby engine's (``"standby": true``, no weights) is every
    rank's; any other manifest is rank 0's own.
    """
    ranks = manifest.get("ranks")
    if ranks is None:
        if rank != 0 and not manifest.get("standby"):
            raise ValueError(f"the manifest is for one rank, not for rank {rank} of a tensor-parallel engine")
        return manifest
    if not isinstance(ranks, list) or not 0 <= rank < len(ranks):
        raise ValueError(f"the manifest has no entry for rank {rank} ({len(ranks or [])} ranks)")
    return {**ranks[rank], "tp": len(ranks)}


def copy_sliced(model: torch.nn.Module, manifest: dict[str, Any], arena: torch.Tensor, names: list[str]) -> int:
    """Fill parameters ``names`` from a tensor-parallel rank's pre-sliced tensors (cast to the parameter's
    dtype; a fused parameter from its members stacked). Returns the bytes copied.

    A model's own ``load_weights`` cannot take these: its weight loaders slice full checkpoint tensors by rank.
    Raises ValueError naming a parameter the rank's tensors cannot fill.
    """
    tensors: dict[str, dict[str, Any]] = manifest["tensors"]
    packed: dict[str, list[str]] = manifest.get("packed", {})
    params = dict(model.named_parameters())
    copied = 0
    for name in names:
        param = params[name]
        sources = [name] if name in tensors else fused_members(name, packed) or []
        if not sources or not all(s in tensors for s in sources):
            raise ValueError(f"the rank's tensors hold nothing for parameter {name}")
        parts = [slot_view(arena, tensors[s]) for s in sources]
        value = parts[0] if len(parts) == 1 else torch.cat(parts)
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"parameter {name} has shape {list(param.shape)} on this rank; the rank's tensors give "
                f"{list(value.shape)} (was the checkpoint split for this tensor-parallel size?)"
            )
        param.data = value.to(device=param.device, dtype=param.dtype).contiguous()
        copied += param.numel() * param.element_size()
    return copied


def fused_members(param_name: str, packed: dict[str, list[str]]) -> list[str] | None:
    """Checkpoint names that make up a fused parameter, e.g. ``...qkv_proj.weight`` → q/k/v."""
    for group, members in packed.items():
        token = f".{group}."
        if token in param_name:
            return [param_name.replace(token, f".{m}.") for m in members]
    return None


def bind_parameters(model: torch.nn.Module, manifest: dict[str, Any], arena: torch.Tensor) -> BindReport:
    """Point every parameter we can at its arena bytes; report the rest."""
    tensors: dict[str, dict[str, Any]] = manifest["tensors"]
    packed: dict[str, list[str]] = manifest.get("packed", {})
    report = BindReport()
    used_sources: set[str] = set()
    for name, param in model.named_parameters():
        view = None
        if name in tensors:
            sources = [name]
            view = _compatible(slot_view(arena, tensors[name]), param)
        else:
            sources = fused_members(name, packed) or []
            if sources and all(s in tensors for s in sources):
                view = _fused_view(arena, [tensors[s] for s in sources], param)
        if view is not None:
            param.data = view
            report.mapped.append(name)
            report.mapped_bytes += view.numel() * view.element_size()
            used_sources.update(sources)
        else:
            report.unmapped.append(name)
    report.sources_for_unmapped = sorted(set(tensors) - used_sources)
    return report


def iter_arena_tensors(
    manifest: dict[str, Any], arena: torch.Tensor, names: list[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs straight from the arena, for a model's ``load_weights``."""
    for name in names:
        yield name, slot_view(arena, manifest["tensors"][name])


def _compatible(view: torch.Tensor, param: torch.Tensor) -> torch.Tensor | None:
    if view.dtype != param.dtype or tuple(view.shape) != tuple(param.shape):
        return None
    return view


def _fused_view(arena: torch.Tensor, slots: list[dict[str, Any]], param: torch.Tensor) -> torch.Tensor | None:
    """View of adjacent slots stacked along dim 0, if layout, dtype and shape allow it."""
    dtypes = {s["dtype"] for s in slots}
    if len(dtypes) != 1 or TORCH_DTYPES[dtypes.pop()] != param.dtype:
        return None
    for a, b in itertools.pairwise(slots):
        if int(a["offset"]) + int(a["nbytes"]) != int(b["offset"]) or list(a["shape"][1:]) != list(b["shape"][1:]):
            return None
    rows = sum(int(s["shape"][0]) for s in slots)
    shape = (rows, *slots[0]["shape"][1:])
    if tuple(shape) != tuple(param.shape):
        return None
    merged = {
        "dtype": slots[0]["dtype"],
        "shape": list(shape),
        "offset": slots[0]["offset"],
        "nbytes": sum(int(s["nbytes"]) for s in slots),
    }
    if merged["nbytes"] != math.prod(shape) * param.element_size():
        return None
    return slot_view(arena, merged)


def arena_span(arena: torch.Tensor) -> tuple[int, int]:
    start = arena.data_ptr()
    return start, start + arena.numel()


def count_arena_views(model: torch.nn.Module, arena: torch.Tensor) -> tuple[int, int]:
    """(number, bytes) of parameters whose storage lies inside the arena mapping."""
    lo, hi = arena_span(arena)
    count = nbytes = 0
    for _, p in model.named_parameters():
        if p.numel() and lo <= p.data_ptr() < hi:
            count += 1
            nbytes += p.numel() * p.element_size()
    return count, nbytes
