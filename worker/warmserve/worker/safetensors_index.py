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
import stat
import struct
from dataclasses import dataclass
from typing import Any

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


def open_weight_file(path: str) -> tuple[int, int]:
    """Open a weight file for reading: ``(fd, size)``; only a regular file, and never blocking on open.

    ``os.stat`` (following symlinks) refuses a FIFO, socket, device or directory before ``open`` is tried (opening
    a FIFO would block the agent until a writer appears); ``O_NONBLOCK`` and an ``fstat`` of the open descriptor
    cover a file swapped in between.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise WeightFileError(f"{path}: not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise WeightFileError(f"{path}: {exc.strerror or type(exc).__name__}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise WeightFileError(f"{path}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey
        out[key] = value
    return out


class _DuplicateKey(ValueError):
    pass


def _ints(value: Any) -> list[int] | None:
    """``value`` when it is a JSON list of integers (not bools), else ``None``."""
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return None
    return value


def read_index(path: str) -> list[TensorRecord]:
    """Tensors of one safetensors file, sorted by file offset.

    Everything in the header is checked before a page is reserved, and a refusal names the file, the tensor (by
    its position in the header) and the field, never the file's contents (no header length, name or value read
    from it): a weight file is untrusted input and the error goes into the pod's state annotation.
    """
    fd, size = open_weight_file(path)
    try:
        raw = os.pread(fd, 8, 0)
        if len(raw) != 8:
            raise WeightFileError(f"{path}: too short to be safetensors")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > MAX_HEADER or 8 + header_len > size:
            raise WeightFileError(f"{path}: header length exceeds the file ({size} B) or the {MAX_HEADER} B limit")
        text = os.pread(fd, header_len, 8) if header_len else b""
    except OSError as exc:
        raise WeightFileError(f"{path}: {exc.strerror or type(exc).__name__}") from exc
    finally:
        os.close(fd)
    if len(text) != header_len:
        raise WeightFileError(f"{path}: header is truncated")
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise WeightFileError(f"{path}: header is not UTF-8") from None
    except _DuplicateKey:
        raise WeightFileError(f"{path}: header has duplicate keys") from None
    except json.JSONDecodeError as exc:
        raise WeightFileError(f"{path}: header is not valid JSON ({exc.msg} at byte {exc.pos})") from None
    except (ValueError, RecursionError):
        raise WeightFileError(f"{path}: header is not valid JSON") from None
    if not isinstance(header, dict):
        raise WeightFileError(f"{path}: header is not a JSON object")
    data_start = 8 + header_len
    data_size = size - data_start
    records = []
    spans = []
    for index, (name, meta) in enumerate(header.items()):
        if name == "__metadata__":
            continue
        where = f"{path}: tensor #{index}"
        if not isinstance(meta, dict):
            raise WeightFileError(f"{where}: entry is not an object")
        dtype = meta.get("dtype")
        if not isinstance(dtype, str):
            raise WeightFileError(f"{where}: dtype is missing or not a string")
        if dtype not in DTYPE_SIZES:
            raise WeightFileError(f"{where}: unsupported dtype (known: {', '.join(DTYPE_SIZES)})")
        shape = _ints(meta.get("shape"))
        if shape is None or any(d < 0 for d in shape):
            raise WeightFileError(f"{where}: shape is not a list of non-negative integers")
        offsets = _ints(meta.get("data_offsets"))
        if offsets is None or len(offsets) != 2:
            raise WeightFileError(f"{where}: data_offsets is not a pair of integers")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise WeightFileError(
                f"{where}: data_offsets are inconsistent (out of order or past the file's {data_size} data bytes)"
            )
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != expected:
            raise WeightFileError(f"{where}: shape × dtype size does not match the data_offsets span (inconsistent)")
        spans.append((begin, end, index))
        records.append(TensorRecord(name, dtype, tuple(shape), path, data_start + begin, expected))
    reached = 0  # the end of the data claimed so far, in order of offsets (empty tensors claim nothing)
    for begin, end, index in sorted(spans):
        if begin < end:
            if begin < reached:
                raise WeightFileError(f"{path}: tensor #{index}: data_offsets overlap another tensor's")
            reached = end
    records.sort(key=lambda r: r.file_offset)
    return records


def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root


def shard_files(model_dir: str, tp: int, rank: int) -> list[str]:
    """The safetensors files of one TP rank.

    TP=1 uses the plain ``*.safetensors`` files of the model directory. TP>1
    expects pre-sharded checkpoints in ``rank-<r>-of-<tp>/`` (the layout
    ``warmserve shard`` writes, :mod:`warmserve.worker.tpshard`; vLLM's own
    ``sharded_state`` format is the same idea), so every GPU reads only its own shard. A file (or rank directory)
    whose real path (symlinks resolved) leaves the model directory is refused.
    """
    root = os.path.realpath(model_dir)
    directory = model_dir if tp == 1 else os.path.join(model_dir, f"rank-{rank}-of-{tp}")
    if not os.path.isdir(directory):
        raise WeightFileError(f"{directory}: no such model directory")
    if not _inside(root, os.path.realpath(directory)):
        raise WeightFileError(f"{directory}: resolves outside the model directory")
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise WeightFileError(f"{directory}: no .safetensors files")
    paths = [os.path.join(directory, f) for f in files]
    for path in paths:
        if not _inside(root, os.path.realpath(path)):
            raise WeightFileError(f"{path}: symlink resolves outside the model directory")
    return paths
