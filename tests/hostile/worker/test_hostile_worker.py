"""The worker's hostile corpus: bad plans and bad weight directories never crash, leak or leak content.

Every case runs against a real :class:`~warmserve.worker.agent.Agent` (a small shared-memory arena, no engine
manager) that already holds one GOOD replica warm (plan generation 1):

* ``plans/*.json``: ``{"expect", "why", "plan" | "raw"}``. ``$GOOD`` / ``$BAD`` in strings become a valid model
  directory and a missing one. ``plan_error``: the plan is refused (``errors`` entry without uid), generation 1
  stays in force. ``replica_error``: the plan is taken, the bad replica gets an error with its uid. ``warning``:
  the plan is taken and its unknown fields are logged once for the generation.
* ``weights/*.json``: ``{"why", "files": [...], "match": [...], "tp"?}``, a model directory materialised in
  ``tmp_path`` (``kind``: ``safetensors`` with ``header`` / ``header_text`` / ``header_hex`` / ``header_len`` /
  ``data``, ``text``, ``fifo``, ``chardev``, ``symlink`` to ``target`` (``$OUTSIDE`` is a valid checkpoint outside
  the directory, ``$OUTSIDE_DIR`` its directory), or ``dir``). The bad replica must get an error naming the
  offending file (the last one listed) and each ``match`` word, echoing none of the file's bytes.

For every case: no exception out of ``apply``/``step``; the good replica stays warm with the same pages and
bytes; once the bad replica leaves the plan the arena holds exactly the good replica's pages; each case takes
less than 2 s (a FIFO is never opened blocking). The table of outcomes is printed at the end of the run.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import struct
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from warmserve.protocol import Phase, WorkerState
from warmserve.worker.agent import Agent
from warmserve.worker.arena import Arena

HERE = Path(__file__).resolve().parent
PLANS = sorted((HERE / "plans").glob("*.json"))
WEIGHTS = sorted((HERE / "weights").glob("*.json"))
MIN_CORPUS = 30
MiB = 1 << 20
pytestmark = pytest.mark.timeout(60)
#: case → how it was refused (filled as the cases run; printed by conftest.py).
RESULTS: dict[str, str] = {}


# ------------------------------------------------------------------------------------------------ fixtures
def write_safetensors(path: Path, header: Any = None, *, header_raw: bytes | None = None, **kw: Any) -> bytes:
    raw = header_raw if header_raw is not None else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = kw.get("data")
    if data is None:
        ends = (
            [m["data_offsets"][-1] for m in header.values() if isinstance(m, dict)] if isinstance(header, dict) else []
        )
        ends = [e for e in ends if isinstance(e, int) and 0 <= e < MiB]
        data = max(ends, default=64)
    length = kw.get("header_len", len(raw))
    blob = struct.pack("<Q", length) + raw + bytes(range(256)) * (data // 256) + bytes(data % 256)
    path.write_bytes(blob)
    return blob


GOOD_HEADER = {"w1": {"dtype": "F16", "shape": [64, 64], "data_offsets": [0, 8192]},
               "w2": {"dtype": "F32", "shape": [256], "data_offsets": [8192, 9216]}}  # fmt: skip


def materialise(spec: dict[str, Any], model: Path, outside: Path) -> list[bytes]:
    """Build the case's model directory; returns the contents of the regular files (the secrets)."""
    model.mkdir(parents=True)
    contents: list[bytes] = []
    for f in spec["files"]:
        path = model / f["name"]
        kind = f["kind"]
        if kind == "safetensors":
            raw = None
            if "header_text" in f:
                raw = f["header_text"].encode()
            elif "header_hex" in f:
                raw = bytes.fromhex(f["header_hex"])
            extra = {k: f[k] for k in ("header_len", "data") if k in f}
            contents.append(write_safetensors(path, f.get("header"), header_raw=raw, **extra))
        elif kind == "text":
            path.write_text(f["text"])
            contents.append(f["text"].encode())
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "symlink":
            target = f["target"].replace("$OUTSIDE_DIR", str(outside))
            os.symlink(target.replace("$OUTSIDE", str(outside / "model.safetensors")), path)
        elif kind == "chardev":  # a character device inside the model directory (what /dev/zero is: 1, 5)
            try:
                os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))
            except PermissionError:
                pytest.skip("no CAP_MKNOD here")
        elif kind == "dir":
            path.mkdir()
        else:
            raise AssertionError(f"unknown kind {kind}")
    return contents


def secrets_of(contents: list[bytes]) -> list[str]:
    """Strings that must never appear in an error: leak markers, and the header length read from the file."""
    out = ["leak", "LEAK", "root:x", "ERROR forged"]
    for blob in contents:
        if len(blob) >= 8 and struct.unpack("<Q", blob[:8])[0] >= 10_000:  # (short numbers occur in any path)
            out.append(str(struct.unpack("<Q", blob[:8])[0]))
    return out


@pytest.fixture
def world(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    write_safetensors(good / "model.safetensors", GOOD_HEADER)
    outside = tmp_path / "outside"
    outside.mkdir()
    write_safetensors(outside / "model.safetensors", GOOD_HEADER)
    shm = f"/dev/shm/warmserve-hostile-{uuid.uuid4().hex[:10]}"
    arenas = {str(i): Arena.host(str(i), f"{shm}-{i}", 4 * MiB, page_size=64 * 1024) for i in range(3)}
    agent = Agent(arenas, state_dir=str(tmp_path / "state"))
    yield agent, good, outside, tmp_path
    agent.shutdown()
    for arena in arenas.values():
        arena.close()
    for name in os.listdir("/dev/shm"):
        if name.startswith(os.path.basename(shm)):
            os.unlink(os.path.join("/dev/shm", name))


def plan_doc(generation: int, good: Path, extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    rep = {"model": "good", "uid": "good-uid", "source": f"file://{good}", "tp": 1, "role": "warm", "kvLend": 0}
    groups: list[dict[str, Any]] = [{"gpus": [0], "replicas": [rep]}]
    for i, bad in enumerate(extra or []):
        groups.append({"gpus": list(range(i + 1, i + 1 + bad["tp"])), "replicas": [bad]})
    return {"generation": generation, "groups": groups}


def settle(agent: Agent, deadline_s: float = 1.5) -> WorkerState:
    """Step until nothing is loading (or the deadline)."""
    end = time.monotonic() + deadline_s
    while True:
        state = agent.step()
        if all(r.phase != Phase.LOADING for r in state.replicas) or time.monotonic() > end:
            return state
        time.sleep(0.01)


def good_snapshot(agent: Agent) -> tuple[Any, bytes]:
    arena = agent.arenas["0"]
    extent = arena.extent("good-uid@0/rank0")
    assert extent is not None, "the good replica holds no pages"
    slots = arena.tensors("good-uid@0/rank0") or {}
    data = b"".join(
        bytes(arena.direct_buffer(s.offset, s.nbytes)) for s in sorted(slots.values(), key=lambda s: s.offset)
    )
    return extent, data


def used_pages(agent: Agent) -> dict[str, int]:
    return {name: a.usage().used // a.page_size for name, a in agent.arenas.items()}


def start(agent: Agent, good: Path) -> tuple[Any, bytes, dict[str, int]]:
    agent.apply(json.dumps(plan_doc(1, good)))
    state = settle(agent)
    assert [(r.uid, r.phase) for r in state.replicas] == [("good-uid", Phase.WARM)], state
    extent, data = good_snapshot(agent)
    assert len(data) == 9216
    return extent, data, used_pages(agent)


def check_good_unchanged(agent: Agent, extent: Any, data: bytes, pages: dict[str, int]) -> None:
    state = agent.state()
    good = [r for r in state.replicas if r.uid == "good-uid"]
    assert [r.phase for r in good] == [Phase.WARM], state
    assert good_snapshot(agent) == (extent, data), "the good replica's pages or bytes changed"
    assert not [e for e in state.errors if e.uid == "good-uid"], state.errors
    assert used_pages(agent) == pages, "pages leaked"


def substitute(value: Any, mapping: dict[str, str]) -> Any:
    if isinstance(value, str):
        for k, v in mapping.items():
            value = value.replace(k, v)
        return value
    if isinstance(value, list):
        return [substitute(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, mapping) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------------------------ the corpus
def test_corpus_is_large_enough():
    assert len(PLANS) + len(WEIGHTS) >= MIN_CORPUS


@pytest.mark.parametrize("path", PLANS, ids=[p.stem for p in PLANS])
def test_hostile_plan(path, world, caplog):
    agent, good, _outside, tmp = world
    case = json.loads(path.read_text())
    extent, data, pages = start(agent, good)
    mapping = {"$GOOD": str(good), "$BAD": str(tmp / "missing")}
    raw = case["raw"] if "raw" in case else json.dumps(substitute(case["plan"], mapping))
    t0 = time.monotonic()
    caplog.set_level(logging.WARNING, logger="warmserve")
    caplog.clear()
    agent.apply(raw)
    agent.apply(raw)  # the annotation is seen again (watch events): nothing changes, nothing is logged twice
    state = settle(agent)
    state = settle(agent)
    expect = case["expect"]
    plan_errors = [e for e in state.errors if not e.uid]
    if expect == "plan_error":
        assert state.observed_generation == 1, "a refused plan replaced the plan in force"
        assert len(plan_errors) == 1 and plan_errors[0].reason, state.errors
        outcome = f"plan_error: {plan_errors[0].reason[:70]}"
    elif expect == "replica_error":
        assert not plan_errors, plan_errors
        bad = [e for e in state.errors if e.uid == "bad-uid"]
        assert len(bad) == 1, state.errors
        assert "bad-uid" not in [r.uid for r in state.replicas]
        outcome = f"replica_error: {bad[0].reason[:70]}"
    else:
        assert expect == "warning"
        assert not plan_errors and state.observed_generation == 2, state.errors
        warnings = [r.getMessage() for r in caplog.records if "unknown field" in r.getMessage()]
        assert len(warnings) == 1, warnings
        for fld in ("plan.priority", "plan.hostile", "plan.groups[0].shape", "plan.groups[0].replicas[1].extra"):
            assert fld in warnings[0], warnings[0]
        outcome = "accepted, warned once: unknown fields"
    check_good_unchanged(agent, extent, data, pages)
    # the plan moves on: the bad replica (if any) goes, its pages come back; a good plan clears the plan error
    agent.apply(json.dumps(plan_doc(3, good)))
    state = settle(agent)
    assert state.observed_generation == 3 and not state.errors, state.errors
    check_good_unchanged(agent, extent, data, pages)
    assert time.monotonic() - t0 < 2.0
    RESULTS[f"plans/{path.name}"] = outcome


@pytest.mark.parametrize("path", WEIGHTS, ids=[p.stem for p in WEIGHTS])
def test_hostile_weights(path, world):
    agent, good, outside, tmp = world
    case = json.loads(path.read_text())
    extent, data, pages = start(agent, good)
    model = tmp / "models" / "bad"
    contents = materialise(case, model, outside)
    bad = {
        "model": "bad",
        "uid": "bad-uid",
        "source": f"file://{model}",
        "tp": case.get("tp", 1),
        "role": "warm",
        "kvLend": 0,
    }
    t0 = time.monotonic()
    agent.apply(json.dumps(plan_doc(2, good, [bad])))
    state = settle(agent)
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0, f"took {elapsed:.1f} s (blocked on a FIFO or device?)"
    errors = [e for e in state.errors if e.uid == "bad-uid"]
    assert len(errors) == 1, f"not refused: {state.errors} {state.replicas}"
    reason = errors[0].reason
    assert case["files"][-1]["name"] in reason, f"does not name the file: {reason}"
    for word in case["match"]:
        assert word.lower() in reason.lower(), f"{word!r} not in {reason!r}"
    for secret in secrets_of(contents):
        assert secret not in reason, f"echoes file content {secret!r}: {reason}"
    assert "bad-uid" not in [r.uid for r in state.replicas]
    check_good_unchanged(agent, extent, data, pages)
    agent.apply(json.dumps(plan_doc(3, good)))
    state = settle(agent)
    assert state.observed_generation == 3 and not state.errors, state.errors
    check_good_unchanged(agent, extent, data, pages)
    RESULTS[f"weights/{path.name}"] = f"replica_error: {reason.split(': ', 1)[-1][:70]}"


# ------------------------------------------------------------------------------------------------ the table
def table(results: dict[str, str]) -> str:
    width = max(len(k) for k in results)
    lines = [f"{k:<{width}}  {v}" for k, v in sorted(results.items())]
    counts = Counter(v.split(":", 1)[0] for v in results.values())
    lines.append("totals: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) + f" (of {len(results)})")
    return "\n".join(lines)
