"""Weight store + arena on host shared memory: several models per arena, errors, eviction, binding."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from warmserve.protocol import ReplicaKey
from warmserve.worker.arena import Arena
from warmserve.worker.binding import bind_parameters, count_arena_views, open_arena_tensor, slot_view
from warmserve.worker.ledger import ArenaFullError
from warmserve.worker.store import ShardKey, ShardPhase, WeightStore, layout_order

MiB = 1024 * 1024


def _arena(path, size=16 * MiB, page=64 * 1024):
    return Arena.host("0", path, size, page_size=page)


def K(uid: str, gpu: int = 0, rank: int = 0) -> ShardKey:
    """The shard of replica `uid` held on GPU `gpu` (rank 0 of a TP1 replica by default)."""
    return ShardKey(ReplicaKey(uid, (gpu,)), rank)


def _pages(arena) -> int:
    return arena.usage().used // arena.page_size


def _assert_bytes_equal(store, arena, uid, model_dir):
    ref = load_file(os.path.join(model_dir, "model.safetensors"))
    flat = open_arena_tensor(arena.handle())
    manifest = store.manifest(K(uid))
    for name, tensor in ref.items():
        assert torch.equal(slot_view(flat, manifest["tensors"][name]), tensor), name


@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
def test_three_models_in_one_arena_then_evict(tiny_models, shm_path, staged):
    arena = _arena(shm_path)
    store = WeightStore({"0": arena}, staged=staged, chunk=64 * 1024)
    for uid, path in tiny_models.items():
        load = store.prewarm(K(uid), uid, path, "0", wait=True)
        assert load.phase == "warm", load.error
        assert load.bytes_done == load.bytes_total > 0 and load.progress == 1.0
    for uid, path in tiny_models.items():
        _assert_bytes_equal(store, arena, uid, path)
    usage = arena.usage()
    assert usage.used > 0 and usage.free < usage.total
    assert sorted(store.shards()) == [K("alpha"), K("beta"), K("gamma")]
    # evict two: pages go back, the third is untouched
    store.evict(K("beta"))
    store.evict(K("gamma"))
    alpha_pages = arena.extent("alpha@0/rank0").count  # ledger owner: the shard key's string form
    assert _pages(arena) == alpha_pages
    _assert_bytes_equal(store, arena, "alpha", tiny_models["alpha"])
    store.evict(K("alpha"))
    assert arena.usage().free == arena.usage().total == arena.usage().largest_free_run
    assert len(arena.free_extents()) == 1 and store.shards() == {}
    arena.close()


def test_missing_and_corrupt_files_fail_per_replica(tiny_models, shm_path, tmp_path):
    arena = _arena(shm_path)
    store = WeightStore({"0": arena})
    ok = store.prewarm(K("alpha"), "alpha", tiny_models["alpha"], "0", wait=True)
    missing = store.prewarm(K("ghost"), "ghost", str(tmp_path / "nope"), "0", wait=True)
    assert missing.phase == "failed" and "no such model directory" in missing.error
    # truncated file: header claims more bytes than exist
    bad = tmp_path / "bad"
    shutil.copytree(tiny_models["beta"], bad)
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    broken = store.prewarm(K("bad"), "bad", str(bad), "0", wait=True)
    assert broken.phase == "failed" and "inconsistent" in broken.error
    # garbage header
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}")
    garbage = store.prewarm(K("bad2"), "bad2", str(bad), "0", wait=True)
    assert garbage.phase == "failed" and "not valid JSON" in garbage.error
    # the good replica is intact and the failures hold no pages
    assert ok.phase == "warm"
    assert arena.owners() == ["alpha@0/rank0"]
    _assert_bytes_equal(store, arena, "alpha", tiny_models["alpha"])
    # a failed shard's record is released on request (a warm one is not)
    assert store.forget_failed(K("ghost")) is missing and store.forget_failed(K("alpha")) is None
    assert K("ghost") not in store.shards() and K("alpha") in store.shards()
    arena.close()


def test_read_error_midway_frees_pages(tiny_models, shm_path, tmp_path, monkeypatch):
    arena = _arena(shm_path)
    store = WeightStore({"0": arena})
    real = os.preadv
    calls = {"n": 0}

    def flaky(fd, bufs, off):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(5, "Input/output error")
        return real(fd, bufs, off)

    monkeypatch.setattr(os, "preadv", flaky)
    load = store.prewarm(K("alpha"), "alpha", tiny_models["alpha"], "0", wait=True)
    assert load.phase == "failed" and "Input/output error" in load.error
    assert _pages(arena) == 0
    arena.close()


def test_over_memory_is_an_error_not_a_crash(tiny_models, shm_path):
    arena = _arena(shm_path, size=256 * 1024, page=64 * 1024)  # smaller than one model
    store = WeightStore({"0": arena})
    load = store.prewarm(K("alpha"), "alpha", tiny_models["alpha"], "0", wait=True)
    assert load.phase == "failed" and "contiguous pages" in load.error
    assert _pages(arena) == 0
    arena.close()


def test_arena_reserves_a_run_and_its_tensor_table_together(shm_path):
    """Allocation and tensor placement are one step under the arena lock: nothing half-made is ever held."""
    arena = _arena(shm_path, size=1 * MiB, page=64 * 1024)
    slots = arena.reserve("a", [("x", "U8", (1000,), 1000), ("y", "U8", (10,), 10)], 2000)
    assert (slots["x"].offset, slots["y"].offset) == (0, 1024) and arena.tensors("a") == slots
    with pytest.raises(ValueError, match="overflows"):
        arena.reserve("b", [("z", "U8", (10**6,), 10**6)], 100)
    with pytest.raises(ArenaFullError):
        arena.reserve("c", [], 2 * MiB)
    assert arena.owners() == ["a"] and arena.extent("b") is None and arena.tensors("b") is None
    assert arena.release("a") and not arena.release("a") and arena.usage().used == 0
    arena.close()


def test_layout_puts_fused_parts_adjacent():
    names = [
        "m.l.0.self_attn.v_proj.weight",
        "m.l.0.mlp.up_proj.weight",
        "m.l.0.self_attn.k_proj.weight",
        "m.l.0.self_attn.o_proj.weight",
        "m.l.0.mlp.gate_proj.weight",
        "m.l.0.self_attn.q_proj.weight",
    ]
    order = layout_order(names)
    i = order.index("m.l.0.self_attn.q_proj.weight")
    assert order[i : i + 3] == [
        "m.l.0.self_attn.q_proj.weight",
        "m.l.0.self_attn.k_proj.weight",
        "m.l.0.self_attn.v_proj.weight",
    ]
    j = order.index("m.l.0.mlp.gate_proj.weight")
    assert order[j + 1] == "m.l.0.mlp.up_proj.weight"


class _Attn(torch.nn.Module):
    def __init__(self, qkv_rows, hidden):
        super().__init__()
        self.qkv_proj = torch.nn.Linear(hidden, qkv_rows, bias=False, dtype=torch.bfloat16)
        self.o_proj = torch.nn.Linear(hidden, hidden, bias=False, dtype=torch.float32)  # dtype differs


def test_bind_maps_fused_params_zero_copy(tiny_models, shm_path):
    arena = _arena(shm_path)
    store = WeightStore({"0": arena})
    store.prewarm(K("alpha"), "alpha", tiny_models["alpha"], "0", wait=True)
    ref = load_file(os.path.join(tiny_models["alpha"], "model.safetensors"))
    q, k, v = (ref[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv")
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.model.layers[0].self_attn = _Attn(q.shape[0] + k.shape[0] + v.shape[0], q.shape[1])
    flat = open_arena_tensor(arena.handle())
    report = bind_parameters(model, store.manifest(K("alpha")), flat)
    assert report.mapped == ["model.layers.0.self_attn.qkv_proj.weight"]
    assert report.unmapped == ["model.layers.0.self_attn.o_proj.weight"]
    qkv = model.model.layers[0].self_attn.qkv_proj.weight
    assert torch.equal(qkv, torch.cat([q, k, v]))
    assert count_arena_views(model, flat) == (1, qkv.numel() * 2)
    assert "model.layers.0.self_attn.o_proj.weight" in report.sources_for_unmapped
    arena.close()


def test_restarted_arena_is_adopted(tiny_models, shm_path):
    arena = _arena(shm_path)
    store = WeightStore({"0": arena})
    store.prewarm(K("alpha"), "alpha", tiny_models["alpha"], "0", wait=True)
    store.prewarm(K("beta"), "beta", tiny_models["beta"], "0", wait=True)
    used = _pages(arena)
    arena.close(unlink=False)  # the agent dies; the shared memory stays
    arena2 = _arena(shm_path)
    store2 = WeightStore({"0": arena2})
    adopted = {a.key: a for a in store2.adopt("0")}
    assert set(adopted) == {K("alpha"), K("beta")} and adopted[K("beta")].model == "beta"
    assert all(a.phase == ShardPhase.WARM for a in adopted.values())
    assert _pages(arena2) == used
    _assert_bytes_equal(store2, arena2, "alpha", tiny_models["alpha"])
    arena2.close()


def test_outcome_callback_runs_before_the_phase_is_visible(tiny_models, shm_path, tmp_path):
    """What on_done records (the agent's timings) is in place by the time a state shows the shard warm."""
    arena = _arena(shm_path)
    store = WeightStore({"0": arena})
    seen = []
    store.prewarm(
        K("alpha"),
        "alpha",
        tiny_models["alpha"],
        "0",
        wait=True,
        on_done=lambda load, phase: seen.append((load.phase, phase, load.seconds is not None)),
    )
    store.prewarm(
        K("ghost"),
        "ghost",
        str(tmp_path / "nope"),
        "0",
        wait=True,
        on_done=lambda load, phase: seen.append((load.phase, phase)),
    )
    assert seen == [("loading", "warm", True), ("loading", "failed")]
    shards = store.shards()
    assert shards[K("alpha")].phase == "warm" and shards[K("ghost")].phase == "failed"
    with pytest.raises(TypeError):  # a read-only view: only the store changes its table
        shards[K("x")] = shards[K("alpha")]  # type: ignore[index]
    arena.close()
