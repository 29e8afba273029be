"""The weight store's own belts: a FIFO swapped in after indexing, and an unexpected error while copying."""

from __future__ import annotations

import os
import time

import pytest
from test_hostile_worker import GOOD_HEADER, MiB, write_safetensors

from warmserve.protocol import ReplicaKey
from warmserve.worker.arena import Arena
from warmserve.worker.safetensors_index import WeightFileError, open_weight_file
from warmserve.worker.store import ShardKey, ShardPhase, WeightStore

pytestmark = pytest.mark.timeout(30)
KEY = ShardKey(ReplicaKey("bad-uid", (0,)))


@pytest.fixture
def arena(shm_path):
    arena = Arena.host("0", shm_path, 4 * MiB, page_size=64 * 1024)
    yield arena
    arena.close()


@pytest.fixture
def shm_path():
    path = f"/dev/shm/warmserve-hostile-store-{os.getpid()}-{time.monotonic_ns()}"
    yield path
    for name in os.listdir("/dev/shm"):
        if name.startswith(os.path.basename(path)):
            os.unlink(os.path.join("/dev/shm", name))


def test_open_weight_file_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(WeightFileError, match="not a regular file"):
        open_weight_file(str(fifo))
    assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
def test_a_fifo_swapped_in_after_indexing_fails_the_shard_and_frees_its_pages(tmp_path, arena, staged, monkeypatch):
    model = tmp_path / "m"
    model.mkdir()
    path = model / "model.safetensors"
    write_safetensors(path, GOOD_HEADER)
    store = WeightStore({"0": arena}, staged=staged)
    real_run = store._run

    def swap_then_run(*args):  # between reading the headers and copying the bytes
        path.unlink()
        os.mkfifo(path)
        real_run(*args)

    monkeypatch.setattr(store, "_run", swap_then_run)
    t0 = time.monotonic()
    shard = store.prewarm(KEY, "bad", str(model), "0", wait=True)
    assert time.monotonic() - t0 < 2.0
    assert shard.phase == ShardPhase.FAILED and "not a regular file" in (shard.error or ""), shard.error
    assert arena.usage().used == 0


@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
def test_an_unexpected_error_while_copying_fails_only_the_shard(tmp_path, arena, staged, monkeypatch):
    model = tmp_path / "m"
    model.mkdir()
    write_safetensors(model / "model.safetensors", GOOD_HEADER)
    store = WeightStore({"0": arena}, staged=staged)

    def broken(*args, **kwargs):
        raise ValueError("secret detail")

    monkeypatch.setattr(arena, "write", broken)
    monkeypatch.setattr(arena, "direct_buffer", broken)
    shard = store.prewarm(KEY, "bad", str(model), "0", wait=True)
    assert shard.phase == ShardPhase.FAILED, shard.error
    assert "unexpected ValueError" in (shard.error or "") and "secret" not in (shard.error or "")
    assert arena.usage().used == 0
