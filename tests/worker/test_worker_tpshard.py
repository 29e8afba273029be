"""`warmserve shard`: per-rank checkpoint files for tensor-parallel replicas, and where a TP engine's ranks run.

numpy only (the splitter works on raw bytes); the real-vLLM check that the slices are vLLM's is
test_worker_vllm_tp.py.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from warmserve.cli import main as cli_main
from warmserve.worker.engines import placement
from warmserve.worker.safetensors_index import read_index, shard_files
from warmserve.worker.tpshard import VOCAB_PADDING, ShardError, shard_checkpoint, split_of

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 64, 4, 2, 16, 96, 100


def llama_checkpoint(directory, extra=None, heads=HEADS, kv_heads=KV_HEADS, dtype=np.float32):
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)

    def rnd(*shape):
        return rng.standard_normal(shape).astype(dtype)

    tensors = {"model.embed_tokens.weight": rnd(VOCAB, HIDDEN), "lm_head.weight": rnd(VOCAB, HIDDEN)}
    tensors["model.norm.weight"] = rnd(HIDDEN)
    p = "model.layers.0."
    tensors |= {
        p + "input_layernorm.weight": rnd(HIDDEN),
        p + "post_attention_layernorm.weight": rnd(HIDDEN),
        p + "self_attn.q_proj.weight": rnd(heads * HEAD_DIM, HIDDEN),
        p + "self_attn.k_proj.weight": rnd(kv_heads * HEAD_DIM, HIDDEN),
        p + "self_attn.v_proj.weight": rnd(kv_heads * HEAD_DIM, HIDDEN),
        p + "self_attn.q_proj.bias": rnd(heads * HEAD_DIM),
        p + "self_attn.o_proj.weight": rnd(HIDDEN, heads * HEAD_DIM),
        p + "mlp.gate_proj.weight": rnd(INTER, HIDDEN),
        p + "mlp.up_proj.weight": rnd(INTER, HIDDEN),
        p + "mlp.down_proj.weight": rnd(HIDDEN, INTER),
    }
    tensors |= extra or {}
    half = sorted(tensors)[: len(tensors) // 2]  # two input files: one output file each per rank
    save_file(
        {k: v for k, v in tensors.items() if k in half}, os.path.join(directory, "model-00001-of-00002.safetensors")
    )
    save_file(
        {k: v for k, v in tensors.items() if k not in half}, os.path.join(directory, "model-00002-of-00002.safetensors")
    )
    config = {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "hidden_size": HIDDEN}
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(config, fh)
    return tensors


def _rank(directory, tp, rank):
    out = {}
    for path in shard_files(str(directory), tp, rank):
        read_index(path)  # valid safetensors, as the weight store reads them
        out |= load_file(path)
    return out


@pytest.mark.parametrize("tp", [2, 4])
def test_rank_slices_put_back_together_are_the_checkpoint(tmp_path, tp):
    original = llama_checkpoint(tmp_path, kv_heads=tp)
    dirs = shard_checkpoint(str(tmp_path), tp)
    assert dirs == [str(tmp_path / f"rank-{r}-of-{tp}") for r in range(tp)]
    ranks = [_rank(tmp_path, tp, r) for r in range(tp)]
    assert all(set(r) == set(original) for r in ranks)
    for name, full in original.items():
        parts = [r[name] for r in ranks]
        if name.endswith(("o_proj.weight", "down_proj.weight")):  # row-parallel: split along the inputs
            np.testing.assert_array_equal(np.concatenate(parts, axis=1), full)
        elif name.endswith("norm.weight"):  # replicated
            for part in parts:
                np.testing.assert_array_equal(part, full)
        elif "embed_tokens" in name or "lm_head" in name:  # padded as vLLM pads the vocabulary, then split
            padded = -(-VOCAB // VOCAB_PADDING) * VOCAB_PADDING
            assert all(part.shape == (padded // tp, HIDDEN) for part in parts)
            stacked = np.concatenate(parts)
            np.testing.assert_array_equal(stacked[:VOCAB], full)
            assert not stacked[VOCAB:].any()
        else:  # column-parallel: split along the outputs
            assert all(part.shape[0] == full.shape[0] // tp for part in parts)
            np.testing.assert_array_equal(np.concatenate(parts), full)


def test_raw_bytes_keep_every_dtype(tmp_path):
    original = llama_checkpoint(tmp_path, dtype=np.float16)
    shard_checkpoint(str(tmp_path), 2)
    rank0 = _rank(tmp_path, 2, 0)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert rank0[name].dtype == np.float16
    np.testing.assert_array_equal(rank0[name], original[name][: HEADS * HEAD_DIM // 2])


@pytest.mark.parametrize(
    ("kwargs", "tp", "message"),
    [
        ({"extra": {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}}, 2, "not guessing"),
        ({"kv_heads": 1}, 2, "num_key_value_heads = 1 does not split over 2"),
        ({"heads": 3, "kv_heads": 3}, 2, "num_attention_heads = 3"),
        ({}, 1, "at least 2"),
    ],
)
def test_what_cannot_be_split_is_refused_before_anything_is_written(tmp_path, kwargs, tp, message):
    llama_checkpoint(tmp_path, **kwargs)
    with pytest.raises(ShardError, match=message):
        shard_checkpoint(str(tmp_path), tp)
    assert not any(name.startswith("rank-") for name in os.listdir(tmp_path))


def test_an_indivisible_dimension_is_refused_by_name():
    with pytest.raises(ShardError, match=r"mlp.up_proj.weight: dimension 0 of shape \[6, 4\]"):
        split_of("model.layers.0.mlp.up_proj.weight", (6, 4), 4)


def test_existing_rank_directories_are_kept_unless_forced(tmp_path):
    llama_checkpoint(tmp_path)
    shard_checkpoint(str(tmp_path), 2)
    with pytest.raises(ShardError, match="exists"):
        shard_checkpoint(str(tmp_path), 2)
    assert len(shard_checkpoint(str(tmp_path), 2, force=True)) == 2


def test_the_index_names_the_files_and_force_leaves_no_stale_file(tmp_path):
    tensors = llama_checkpoint(tmp_path)
    # another format of the same weights beside the checkpoint (as Mistral's repositories ship it)
    save_file(
        {"layers.0.attention.wq.weight": np.zeros((4, 4), np.float32)}, str(tmp_path / "consolidated.safetensors")
    )
    names = sorted(f for f in os.listdir(tmp_path) if f.startswith("model-"))
    weight_map = {name: names[0] if name in sorted(tensors)[: len(tensors) // 2] else names[1] for name in tensors}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shard_checkpoint(str(tmp_path), 2)
    stale = tmp_path / "rank-0-of-2" / "model-old.safetensors"
    stale.write_bytes(b"")
    shard_checkpoint(str(tmp_path), 2, force=True)
    assert sorted(os.listdir(tmp_path / "rank-0-of-2")) == names
    assert set(_rank(tmp_path, 2, 1)) == set(tensors)


def test_cli_splits_and_reports_errors_in_one_line(tmp_path, capsys):
    llama_checkpoint(tmp_path)
    assert cli_main(["shard", str(tmp_path), "--tp", "2"]) == 0
    out, err = capsys.readouterr()
    assert out.split() == [str(tmp_path / "rank-0-of-2"), str(tmp_path / "rank-1-of-2")]
    assert "[2/2]" in err
    assert cli_main(["shard", str(tmp_path), "--tp", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("warmserve shard: ") and "exists" in err and "Traceback" not in err


def test_placement_on_gpus_shows_the_engine_exactly_its_group_in_rank_order():
    assert placement(True, (3,), {}, [0, 1]) == ([], {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "3"})
    args, env = placement(True, (6, 4), {}, [0, 1])
    assert args == ["--tensor-parallel-size", "2", "--distributed-executor-backend", "mp"]
    assert env["CUDA_VISIBLE_DEVICES"] == "6,4"


def test_placement_on_cpu_gives_each_rank_its_share_of_the_cpus():
    assert placement(False, (0,), {}, [0, 1]) == ([], {})  # one rank: vLLM binds it itself
    assert placement(False, (0, 1), {}, [0, 1, 2, 3, 4])[1] == {"VLLM_CPU_OMP_THREADS_BIND": "0,1,2|3,4"}
    assert placement(False, (0, 1, 2), {}, [5, 7])[1] == {"VLLM_CPU_OMP_THREADS_BIND": "5|7|5"}
    assert placement(False, (0, 1), {"VLLM_CPU_OMP_THREADS_BIND": "auto"}, [0, 1])[1] == {}  # the node decides
