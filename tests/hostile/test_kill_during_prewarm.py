"""A worker killed (SIGKILL) at random points of its prewarming, 20 times, converges without leaked memory.

The real worker process (`python -m warmserve.worker`, local mode, a host shared-memory arena) loads
models of 160 MiB (three of them, two planned at a time: every restart evicts one and loads another); it is
killed at a random moment, then restarted on the same arena and state directory. After the last restart it
must hold exactly the planned replicas: the arena's used bytes equal their pages (no page leaked by a load or
an eviction that was cut), no replica twice, no engine (the plan serves none), and a final plan change evicts
to exactly the remaining replica. No vLLM is needed: no replica is served.
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

MiB = 1 << 20
STATE = f"kill-{os.getpid()}"  # the arena's /dev/shm name derives from the state directory's name
PAGE = 2 * MiB
ARENA = 512 * MiB
pytestmark = pytest.mark.timeout(600)


def write_model(directory: Path, mib: int) -> Path:
    """A safetensors checkpoint of `mib` MiB (bf16 tensors of 8 MiB, random bytes), written without torch."""
    directory.mkdir(parents=True)
    header, offset, n = {}, 0, 8 * MiB
    for i in range(mib // 8):
        header[f"layer{i}.weight"] = {
            "dtype": "BF16",
            "shape": [n // 2 // 1024, 1024],
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(directory / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for _ in range(offset // n):
            fh.write(os.urandom(n))
    return directory


def plan(generation: int, models: dict[str, Path]) -> str:
    replicas = [
        {"model": name, "uid": f"uid-{name}", "source": f"file://{path}", "tp": 1, "role": "warm", "kvLend": 0}
        for name, path in models.items()
    ]
    return json.dumps({"generation": generation, "groups": [{"gpus": [0], "replicas": replicas}]})


def start(tmp: Path) -> subprocess.Popen:
    args = [
        sys.executable, "-m", "warmserve.worker",
        "--plan-file", str(tmp / "plan.json"), "--state-file", str(tmp / "state.json"),
        "--state-dir", str(tmp / STATE), "--device", "cpu", "--arena-bytes", str(ARENA),
        "--page-size", str(PAGE), "--http-port", "0", "--shells", "0", "--tick", "0.05",
    ]  # fmt: skip
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(tmp / "worker.log", "ab"))


def state(tmp: Path) -> dict:
    try:
        return json.loads((tmp / "state.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def pages(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


def test_kill_at_random_points_of_prewarm_twenty_times_leaks_nothing(tmp_path):
    rng = random.Random(7)
    models = {name: write_model(tmp_path / "models" / name, 160) for name in ("a", "b", "c")}
    size = (models["a"] / "model.safetensors").stat().st_size
    shm = Path("/dev/shm") / f"warmserve-{STATE}-arena0"
    generation = 0
    kills = []
    pairs = [("a", "b"), ("b", "c"), ("c", "a")]
    try:
        for i in range(20):
            # every restart has work to do: the plan moves to another pair, so one replica is evicted and
            # one loaded (the one both plans share is adopted from the arena)
            generation += 1
            (tmp_path / "plan.json").write_text(plan(generation, {m: models[m] for m in pairs[i % 3]}))
            (tmp_path / "state.json").unlink(missing_ok=True)
            proc = start(tmp_path)
            # wait until it has started loading (a state was published), then kill at a random moment
            deadline = time.monotonic() + 60
            while not state(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None, (tmp_path / "worker.log").read_text()[-2000:]
            delay = rng.uniform(0.0, 0.15)
            time.sleep(delay)
            phases = sorted((r["model"], r["phase"]) for r in state(tmp_path).get("replicas", []))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills.append((round(delay, 3), phases))
        # the last start must converge to exactly the planned replicas
        generation += 1
        (tmp_path / "plan.json").write_text(plan(generation, {"a": models["a"], "b": models["b"]}))
        proc = start(tmp_path)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                s = state(tmp_path)
                done = s.get("observedGeneration") == generation and sorted(
                    (r["model"], r["phase"]) for r in s.get("replicas", [])
                ) == [("a", "warm"), ("b", "warm")]
                if done:
                    break
                time.sleep(0.1)
            s = state(tmp_path)
            assert done, json.dumps(s)[:2000]
            assert s["errors"] == [] and s.get("engines", []) == []
            (device,) = s["devices"]
            assert device["usedBytes"] == 2 * pages(size), (device, kills)  # nothing leaked by a cut load
            assert len(s["replicas"]) == 2  # no replica twice
            # and an eviction after all this frees exactly one model's pages
            generation += 1
            (tmp_path / "plan.json").write_text(plan(generation, {"b": models["b"]}))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and state(tmp_path).get("observedGeneration") != generation:
                time.sleep(0.1)
            time.sleep(0.5)
            (device,) = state(tmp_path)["devices"]
            assert device["usedBytes"] == pages(size), device
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        print(f"{len(kills)} kills at (s after the first state, replicas then): {kills}")
        mid_load = sum(any(p == "loading" for _, p in phases) for _, phases in kills)
        print(f"kills that landed while a replica was loading: {mid_load} of {len(kills)}")
        assert mid_load >= 5, "too few kills landed mid-load to show anything"
    finally:
        for name in os.listdir("/dev/shm"):
            if name.startswith(shm.name):
                os.unlink(os.path.join("/dev/shm", name))
