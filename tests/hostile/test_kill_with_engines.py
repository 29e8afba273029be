"""A worker serving a model on real vLLM, SIGKILLed at random points 20 times, converges to one engine.

The real worker process (`python -m warmserve.worker`, local mode, a host arena, one pre-started engine
shell) serves a tiny Llama model while the plan moves a 128 MiB warm replica between two models, so each start
has an engine to adopt and a load to do. Once the engine serves, the worker is killed at a random moment of
each of 20 starts, then restarted on the same arena and state directory. At the end:

* exactly one engine answers for the served model, the first one (every restart adopted it: no duplicate);
* the arena holds exactly the planned replicas' pages;
* no process is left over from the killed workers: every process carrying this test's tag belongs to the
  adopted engine or to the running worker (its idle shells included). An idle engine-core helper whose worker
  died used to wait on its socket forever; it now exits with its parent.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from test_kill_during_prewarm import pages, plan, state, write_model

# the tiny-model generator is a benchmark helper (bench/devmodels.py), not part of the product package
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
MiB = 1 << 20
PAGE = 2 * MiB
ARENA = 384 * MiB
BASE_PORT = 19700
ENGINE_ARGS = "--dtype bfloat16 --max-model-len 256 --enforce-eager --max-num-seqs 2"
TAG = "WARMSERVE_KILL_TEST_TAG"
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1200)]


def tagged(tag: str) -> dict[int, tuple[int, int]]:
    """pid -> (pgid, ppid) of every process whose environment carries the tag."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as fh:
                if f"{TAG}={tag}".encode() not in fh.read().split(b"\0"):
                    continue
            with open(f"/proc/{name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            out[int(name)] = (int(fields[2]), int(fields[1]))  # pgrp, ppid
        except (OSError, IndexError, ValueError):
            continue
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


def answering(model: str) -> list[int]:
    """Ports in the engine range where an OpenAI server lists `model`."""
    ports = []
    for port in range(BASE_PORT, BASE_PORT + 40):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=0.5) as resp:
                if any(m.get("id") == model for m in json.load(resp).get("data", [])):
                    ports.append(port)
        except (urllib.error.URLError, OSError, ValueError):
            continue
    return ports


def served_plan(generation: int, served: Path, warm: dict[str, Path]) -> str:
    doc = json.loads(plan(generation, warm))
    doc["groups"][0]["replicas"].append(
        {"model": "alpha", "uid": "uid-alpha", "source": f"file://{served}", "tp": 1, "role": "serve"}
    )
    return json.dumps(doc)


def start(tmp: Path, state_dir: str, tag: str) -> subprocess.Popen:
    args = [
        sys.executable, "-m", "warmserve.worker",
        "--plan-file", str(tmp / "plan.json"), "--state-file", str(tmp / "state.json"),
        "--state-dir", str(tmp / state_dir), "--device", "cpu", "--arena-bytes", str(ARENA),
        "--page-size", str(PAGE), "--http-port", "0", "--shells", "1", "--standby-engines", "0",
        "--engine-port", str(BASE_PORT), "--engine-host", "127.0.0.1", "--engine-args", ENGINE_ARGS, "--tick", "0.1",
    ]  # fmt: skip
    env = {**os.environ, TAG: tag, "VLLM_CPU_KVCACHE_SPACE": "1"}
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(tmp / "worker.log", "ab"), env=env)


def test_kill_a_serving_worker_twenty_times_leaves_one_engine_and_no_process(tmp_path):
    from devmodels import make_llama

    rng = random.Random(11)
    tag = uuid.uuid4().hex
    state_dir = f"killeng-{os.getpid()}"
    served = Path(make_llama(str(tmp_path / "models" / "alpha"), seed=5))
    warm = {name: write_model(tmp_path / "models" / name, 128) for name in ("b", "c")}
    size = (warm["b"] / "model.safetensors").stat().st_size
    alpha_bytes = (served / "model.safetensors").stat().st_size
    kills = []
    proc = None
    try:
        # the engine is launched and serving before the kills start: every restart must adopt it, not start
        # a second one (a pre-started shell takes longer to import vLLM than a kill leaves a worker)
        (tmp_path / "plan.json").write_text(served_plan(1, served, {"b": warm["b"]}))
        proc = start(tmp_path, state_dir, tag)
        deadline = time.monotonic() + 300
        while not any(r["phase"] == "serving" for r in state(tmp_path).get("replicas", [])):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-2000:]
            time.sleep(0.2)
        first_engine = state(tmp_path)["engines"][0]["pid"]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for i in range(1, 21):
            (tmp_path / "plan.json").write_text(served_plan(i + 1, served, {m: warm[m] for m in ("cb"[i % 2],)}))
            (tmp_path / "state.json").unlink(missing_ok=True)
            proc = start(tmp_path, state_dir, tag)
            deadline = time.monotonic() + 60
            while not state(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None, (tmp_path / "worker.log").read_text()[-2000:]
            delay = rng.uniform(0.0, 0.3) if i % 2 else rng.uniform(0.0, 3.0)  # mid-load, or anywhere
            time.sleep(delay)
            phases = sorted((r["model"], r["phase"]) for r in state(tmp_path).get("replicas", []))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills.append((round(delay, 2), phases))
        generation = 22
        (tmp_path / "plan.json").write_text(served_plan(generation, served, {"b": warm["b"]}))
        proc = start(tmp_path, state_dir, tag)
        deadline = time.monotonic() + 300
        done = False
        while time.monotonic() < deadline and not done:
            s = state(tmp_path)
            phases = sorted((r["model"], r["phase"]) for r in s.get("replicas", []))
            done = s.get("observedGeneration") == generation and phases == [("alpha", "serving"), ("b", "warm")]
            time.sleep(0.2)
        s = state(tmp_path)
        assert done, json.dumps(s)[:3000]
        assert s["errors"] == [], s["errors"]
        (engine,) = s["engines"]
        assert answering("alpha") == [int(engine["endpoint"].rsplit(":", 1)[1])]  # one engine, the recorded one
        assert engine["pid"] == first_engine  # adopted by every restart, never replaced
        (device,) = s["devices"]
        assert device["usedBytes"] == pages(size) + pages(alpha_bytes), (device, kills)
        with open(tmp_path / state_dir / "engines" / "uid-alpha_0.json") as fh:
            record = json.load(fh)
        engine_groups = {record["pid"], record["core_pid"]}

        def leftovers() -> dict[int, tuple[int, int]]:
            procs = tagged(tag)
            return {
                pid: info
                for pid, info in procs.items()
                if pid != proc.pid
                and info[0] not in engine_groups
                and info[1] != proc.pid  # an idle shell of the running worker
                and procs.get(info[0], (0, 0))[1] != proc.pid  # in the group of one
            }

        # a killed worker's pre-started shells finish importing vLLM (tens of seconds on 2 busy cores), then
        # exit: the API-server half on EOF of its stdin, the engine-core half when it sees its parent gone
        deadline = time.monotonic() + 180
        while leftovers() and time.monotonic() < deadline:
            time.sleep(1.0)
        leaked = {pid: (info, _cmdline(pid)) for pid, info in leftovers().items()}
        assert not leaked, (leaked, kills)
        print(f"{len(kills)} kills at (s after the first state, replicas then): {kills}")
        loading = sum(any(p == "loading" for _, p in phases) for _, phases in kills)
        print(f"kills while a warm replica was loading: {loading} of {len(kills)}")
        assert loading >= 3, "too few kills landed mid-load to show anything"
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        for pid in tagged(tag):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
        for name in os.listdir("/dev/shm"):
            if name.startswith(f"warmserve-{state_dir}"):
                os.unlink(os.path.join("/dev/shm", name))
