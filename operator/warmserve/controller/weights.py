"""Weight bytes of a model from its safetensors headers, reading only the headers.

A safetensors file starts with an 8-byte little-endian header length N and N bytes of JSON mapping tensor
names to {dtype, shape, data_offsets}; the data follows. The byte size of the weights is the sum of
`data_offsets[1] - data_offsets[0]`. Reading 8 + N bytes per file is cheap even for a 140 GB model, so the
operator can fill in `weightBytes` when a user leaves it out and the source is readable from the operator.

`WeightResolver` is the one place the operator decides a model's weight bytes (the ModelDeployment handler and
the pool round's observe stage both ask it), so the two can never disagree.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit


class WeightsError(ValueError):
    """The source is readable but its safetensors files are not usable."""


def header_tensor_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of the tensor data described by one safetensors file's header."""
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) != 8:
            raise WeightsError(f"{path}: shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length <= 1 or length > MAX_HEADER_BYTES:
            raise WeightsError(f"{path}: header length {length} is not plausible")
        raw = fh.read(length)
    if len(raw) != length:
        raise WeightsError(f"{path}: header truncated")
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise WeightsError(f"{path}: header is not JSON: {exc}") from exc
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"{path}: tensor {name} has no data_offsets") from exc
        if not (isinstance(start, int) and isinstance(end, int)) or end < start:
            raise WeightsError(f"{path}: tensor {name} has bad data_offsets")
        total += end - start
    return total


def safetensors_weight_bytes(path: str | os.PathLike[str]) -> int:
    """Sum over a file or every `*.safetensors` file of a directory (sharded checkpoints)."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(root.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{path}: no .safetensors files")
    return sum(header_tensor_bytes(f) for f in files)


def local_path_of(source: str, pvc_root: str = "") -> Path | None:
    """Where the operator can read a model source, or None when it cannot (hf://, pvc:// without a root).

    `file:///abs/path` is read as is; `pvc://<claim>/<path>` resolves to `<pvc_root>/<claim>/<path>` when the
    operator has the claims mounted under `pvc_root` (setting WARMSERVE_PVC_ROOT).
    """
    if source.startswith("file://"):
        return Path(source[len("file://") :])
    if source.startswith("pvc://") and pvc_root:
        return Path(pvc_root) / source[len("pvc://") :]
    return None


def resolve_weight_bytes(spec_bytes: int | None, source: str, pvc_root: str = "") -> tuple[int | None, str, str]:
    """(bytes, origin, message): from the spec, else from safetensors headers, else unknown with why."""
    if spec_bytes:
        return spec_bytes, "spec", "weightBytes given in the spec"
    path = local_path_of(source, pvc_root)
    if path is None:
        return None, "unknown", f"weightBytes not given and {source} is not readable from the operator"
    try:
        return safetensors_weight_bytes(path), "safetensors", f"read from safetensors headers under {path}"
    except (OSError, WeightsError) as exc:
        return None, "unknown", f"weightBytes not given and the headers could not be read: {exc}"


@dataclass(frozen=True)
class WeightInfo:
    """A model's weight bytes (None: unknown), where they come from (`spec`, `safetensors`, `unknown`) and why."""

    bytes: int | None
    origin: str
    message: str


class WeightResolver:
    """Weight bytes of a ModelDeployment: the spec's `weightBytes`, else its safetensors headers, else the bytes
    recorded in its status by an earlier read.

    Header reads run off the event loop and a successful read is cached per source (a failed one is retried
    next time, so a model directory that appears later is picked up).
    """

    def __init__(self, pvc_root: str = "") -> None:
        self.pvc_root = pvc_root
        self._read: dict[str, WeightInfo] = {}  # source → successful header read

    async def resolve(self, spec_bytes: int | None, source: str, status: Mapping[str, Any] | None = None) -> WeightInfo:
        if spec_bytes:
            return WeightInfo(spec_bytes, "spec", "weightBytes given in the spec")
        cached = self._read.get(source)
        if cached is not None:
            return cached
        found = WeightInfo(*await asyncio.to_thread(resolve_weight_bytes, None, source, self.pvc_root))
        if found.bytes is not None:
            self._read[source] = found
            return found
        recorded = (status or {}).get("weightBytes")
        if recorded:
            return WeightInfo(int(recorded), "safetensors", "weightBytes recorded in status by an earlier header read")
        return found
