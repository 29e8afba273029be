"""Split a checkpoint into the per-rank files a tensor-parallel replica is prewarmed from.

A TP-``k`` replica is prewarmed as ``k`` shards, one per GPU of its group, each read from
``<model dir>/rank-<r>-of-<k>/`` (:func:`warmserve.worker.safetensors_index.shard_files`). Every tensor there is
the slice of the checkpoint tensor that rank ``r`` of a vLLM engine with ``tensor_parallel_size=k`` holds, in
checkpoint naming, so that the engine's parameters are bound to arena views exactly as for ``k = 1``
(a fused ``qkv_proj`` of rank ``r`` is its ``q``, ``k`` and ``v`` slices stacked, which the store keeps
adjacent):

- column-parallel projections (``q/k/v/gate/up_proj``) are split along their rows;
- row-parallel projections (``o_proj``, ``down_proj``) along their columns (their biases are replicated);
- the vocabulary (``embed_tokens``, ``lm_head``) is padded, as vLLM pads it, to a multiple of 64 rows, then
  split along its rows (the padding rows are zeros);
- norms are replicated.

That is the Llama family's layout (Llama, Mistral, Qwen2 and others that share its tensor names); a tensor it
does not know is refused by name rather than guessed. The split works on raw bytes (numpy views of the
element size), so every dtype is kept as it is and torch is not needed. Used as ``warmserve shard MODEL_DIR
--tp K``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from warmserve.worker.safetensors_index import DTYPE_SIZES, TensorRecord, WeightFileError, read_index

#: vLLM pads a vocabulary-parallel embedding (and the LM head) to a multiple of this many rows
#: (`vllm.model_executor.layers.vocab_parallel_embedding.DEFAULT_VOCAB_PADDING_SIZE`).
VOCAB_PADDING = 64
_COLUMN = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$")
_ROW = re.compile(r"\.(o_proj|down_proj)\.weight$")
_REPLICATED = re.compile(r"(norm\.weight|norm\.bias|\.(o_proj|down_proj)\.bias)$")
_VOCAB = re.compile(r"(^|\.)(embed_tokens|lm_head)\.weight$")
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


class ShardError(ValueError):
    """A checkpoint cannot be split for this tensor-parallel size; the message names what and why."""


@dataclass(frozen=True)
class Split:
    """How one tensor is split: along ``dim`` (None: replicated), after padding dim 0 to ``pad_rows`` rows."""

    dim: int | None
    pad_rows: int = 0


def rank_dir(model_dir: str, tp: int, rank: int) -> str:
    """Where rank ``rank`` of a TP-``tp`` replica reads its files (the layout `shard_files` expects)."""
    return os.path.join(model_dir, f"rank-{rank}-of-{tp}")


def split_of(name: str, shape: Sequence[int], tp: int) -> Split:
    """How ``name`` is split over ``tp`` ranks; ShardError for a tensor whose layout is unknown or indivisible."""
    if _VOCAB.search(name):
        rows = math.ceil(shape[0] / VOCAB_PADDING) * VOCAB_PADDING
        if rows % tp:
            raise ShardError(f"{name}: {rows} padded vocabulary rows do not split over {tp} ranks")
        return Split(0, rows)
    if _REPLICATED.search(name):
        return Split(None)
    for pattern, dim in ((_COLUMN, 0), (_ROW, 1)):
        if pattern.search(name):
            if len(shape) <= dim or shape[dim] % tp:
                raise ShardError(f"{name}: dimension {dim} of shape {list(shape)} does not split over {tp} ranks")
            return Split(dim)
    raise ShardError(f"{name}: not a tensor of the Llama-family layout this splitter knows; not guessing its split")


def check_heads(config: dict[str, object], tp: int) -> None:
    """Attention heads must split evenly (vLLM replicates KV heads when there are fewer than ranks; not this)."""
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads", heads)
    for what, value in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if not isinstance(value, int) or value <= 0 or value % tp:
            raise ShardError(f"config.json {what} = {value!r} does not split over {tp} ranks")


def _read(rec: TensorRecord) -> np.ndarray:
    """A tensor's raw elements (an unsigned integer array of its element size, in its shape)."""
    size = DTYPE_SIZES[rec.dtype]
    if size not in _UINT:
        raise ShardError(f"{rec.name}: dtype {rec.dtype} has no element size the splitter can slice")
    data = np.fromfile(rec.file, dtype=_UINT[size], count=rec.nbytes // size, offset=rec.file_offset)
    return data.reshape(rec.shape)


def rank_slices(rec: TensorRecord, tp: int) -> Iterator[np.ndarray]:
    """Rank 0's, then rank 1's, ... slice of one tensor (contiguous arrays)."""
    split = split_of(rec.name, rec.shape, tp)
    data = _read(rec)
    if split.dim is None:
        for _ in range(tp):
            yield data
        return
    if split.pad_rows > data.shape[0]:
        pad = np.zeros((split.pad_rows - data.shape[0], *data.shape[1:]), dtype=data.dtype)
        data = np.concatenate([data, pad])
    for part in np.split(data, tp, axis=split.dim):
        yield np.ascontiguousarray(part)


def write_safetensors(path: str, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """Write ``name → (safetensors dtype, raw elements)`` as one safetensors file (atomically)."""
    header: dict[str, object] = {}
    offset = 0
    for name, (dtype, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(data.shape), "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for _, data in tensors.values():
            fh.write(data.tobytes())
    os.replace(tmp, path)


def checkpoint_files(model_dir: str) -> list[str]:
    """The checkpoint's safetensors files: those its ``model.safetensors.index.json`` maps tensors to when it
    has one (some repositories also ship other files, e.g. Mistral's ``consolidated.safetensors``), else all."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as fh:
                weight_map = json.load(fh)["weight_map"]
            return sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ShardError(f"{index}: {exc!r}") from None
    return sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))


def shard_checkpoint(
    model_dir: str, tp: int, progress: Callable[[str], None] | None = None, force: bool = False
) -> list[str]:
    """Write ``rank-<r>-of-<tp>/model-<n>.safetensors`` for every rank (one output file per input file).

    Returns the rank directories. Refuses (ShardError) a checkpoint this layout does not cover, before writing
    anything; an existing rank directory is refused unless ``force``.
    """
    if tp < 2:
        raise ShardError(f"--tp must be at least 2, got {tp}")
    files = checkpoint_files(model_dir)
    if not files:
        raise ShardError(f"{model_dir}: no .safetensors files")
    config_path = os.path.join(model_dir, "config.json")
    try:
        with open(config_path) as fh:
            check_heads(json.load(fh), tp)
    except ShardError:
        raise
    except (OSError, ValueError) as exc:
        raise ShardError(f"{config_path}: {exc}") from None
    indexes = {f: read_index(os.path.join(model_dir, f)) for f in files}
    for records in indexes.values():
        for rec in records:
            split_of(rec.name, rec.shape, tp)  # refuse before writing anything
    dirs = [rank_dir(model_dir, tp, rank) for rank in range(tp)]
    for d in dirs:
        if os.path.exists(d) and not force:
            raise ShardError(f"{d} exists (pass --force to overwrite)")
        os.makedirs(d, exist_ok=True)
        for old in os.listdir(d):  # the worker reads every *.safetensors of a rank directory
            if old.endswith(".safetensors"):
                os.unlink(os.path.join(d, old))
    for n, (name, records) in enumerate(indexes.items(), 1):
        per_rank: list[dict[str, tuple[str, np.ndarray]]] = [{} for _ in range(tp)]
        for rec in records:
            for rank, part in enumerate(rank_slices(rec, tp)):
                per_rank[rank][rec.name] = (rec.dtype, part)
        for rank, tensors in enumerate(per_rank):
            write_safetensors(os.path.join(dirs[rank], name), tensors)
        if progress is not None:
            progress(f"[{n}/{len(indexes)}] {name}: {len(records)} tensors split over {tp} ranks")
    return dirs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="warmserve shard",
        description="Split a checkpoint (Llama-family safetensors) into the per-rank files "
        "(rank-<r>-of-<tp>/) a tensor-parallel replica is prewarmed from.",
    )
    parser.add_argument("model_dir", help="the model directory (config.json and *.safetensors)")
    parser.add_argument("--tp", type=int, required=True, help="tensor-parallel size (at least 2)")
    parser.add_argument("--force", action="store_true", help="overwrite existing rank directories")
    args = parser.parse_args(argv)
    try:
        dirs = shard_checkpoint(args.model_dir, args.tp, lambda line: print(line, file=sys.stderr), args.force)
    except (ShardError, WeightFileError, OSError) as exc:
        print(f"warmserve shard: {exc}", file=sys.stderr)
        return 1
    print("\n".join(dirs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
