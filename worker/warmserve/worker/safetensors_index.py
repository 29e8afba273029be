"""Read and validate safetensors headers without loading data.

The format is an 8-byte little-endian header length, a JSON header mapping
tensor names to ``{dtype, shape, data_offsets}``, then the raw data. Parsing it
ourselves costs microseconds and gives exact byte ranges, which is all the
weight store needs to stream a file straight into arena pages. Validation
catches truncated or corrupt files before a single page is written.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
MAX_HEADER = 100 * 1024 * 1024


class WeightFileError(Exception):
    """A weight file is missing, unreadable, or not a valid safetensors file."""


@dataclass(frozen=True)
class TensorRecord:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    file_offset: int  # absolute offset of the first byte in the file
    nbytes: int


def read_index(path: str) -> list[TensorRecord]:
    """Tensors of one safetensors file, sorted by file offset."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise WeightFileError(f"{path}: too short to be safetensors")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > MAX_HEADER or 8 + header_len > size:
                raise WeightFileError(f"{path}: corrupt header length {header_len}")
            header = json.loads(fh.read(header_len))
    except OSError as exc:
        raise WeightFileError(f"{path}: {exc.strerror or exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightFileError(f"{path}: header is not valid JSON ({exc})") from exc
    data_start = 8 + header_len
    records = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = meta["dtype"], tuple(int(d) for d in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightFileError(f"{path}: bad entry for {name}") from exc
        if dtype not in DTYPE_SIZES:
            raise WeightFileError(f"{path}: {name} has unsupported dtype {dtype}")
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != expected or begin < 0 or data_start + end > size:
            raise WeightFileError(
                f"{path}: {name} byte range {begin}..{end} is inconsistent "
                f"(expected {expected} B, file has {size - data_start} data bytes)"
            )
        records.append(TensorRecord(name, dtype, shape, path, data_start + begin, expected))
    records.sort(key=lambda r: r.file_offset)
    return records


def shard_files(model_dir: str, tp: int, rank: int) -> list[str]:
    """The safetensors files of one TP rank.

    TP=1 uses the plain ``*.safetensors`` files of the model directory. TP>1
    expects pre-sharded checkpoints in ``rank-<r>-of-<tp>/`` (the layout the
    operator's conversion job writes; vLLM's own ``sharded_state`` format is the
    same idea), so every GPU reads only its own shard.
    """
    directory = model_dir if tp == 1 else os.path.join(model_dir, f"rank-{rank}-of-{tp}")
    if not os.path.isdir(directory):
        raise WeightFileError(f"{directory}: no such model directory")
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise WeightFileError(f"{directory}: no .safetensors files")
    return [os.path.join(directory, f) for f in files]
