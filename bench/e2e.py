"""End-to-end benchmark: `warmserve up` with real vLLM engines, a real trace compressed in time, WarmServe
against a reactive baseline on the same machine, plus the router's overhead.

    python bench/e2e.py --json e2e.json [--quick] [--size tiny|small|medium|large] [--models N] ...

What it does, in one run (progress lines on stderr, a table on stdout, every figure in the JSON):

1. **Models.** N generated Llama models (bench/devmodels.py, random bf16 weights; cached in --model-dir, which
   becomes the pool's `modelCache.mountPath` and so may not lie under /tmp). The pool has one CPU arena per
   device, `gpu.count` = the smallest power of two >= N (the schema allows 0, 1, 2, 4, ...), so every model
   can run an engine at once; each arena can hold every model (one-for-many). Engines: `--enforce-eager
   --max-model-len 512 --dtype bfloat16 --max-num-seqs C`, `engine.maxConcurrency` C, at most one engine per
   model, one pre-started shell per model, a pool round every 0.5 s (--interval-s).
2. **Replay.** `warmserve.workload.build_workload` on the real Azure 2024 *code* trace (per-second counts,
   read from ../shared/data/traces or $WARMSERVE_TRACES, else the package's bundle, which holds the same
   arrays): model i replays the busy hour (--start-hour, default 19:00 UTC) of trace day D+i (Mon, Tue, Wed
   for D = 3) with the trace's own per-second burstiness (binomial thinning to --rps), token lengths drawn
   from the Azure 2023 code trace (scaled down to what a 2-core CPU can prefill). The hour is compressed
   --compress times (15: one hour in 240 s), so a 5-minute trace window becomes a --compress-th of it (20 s),
   which is the pool's `forecast.windowSeconds` (it must divide 86400).
3. **History.** The forecaster reads absolute windows floor(t / W) with a season of P = 86400 / W windows, so
   "the previous days" of live window w0 + m are w0 + m - d·P. Before the replay the load history file
   (`<state_dir>/load-history.txt`, `LoadHistory.encode()`) is seeded with the in-flight load the same trace
   implies (Little's law with --service-s, `warmserve.core.load`) for days d = 1..D at those indices, and
   with the trace windows just before the replay (day 0, m < 0) for the forecaster's correction term. It is
   read back the way `up` reads it (`LocalObserver.load_history`). The idle windows while `up` starts are not
   recorded over the seed (the seed stands for them); from the replay start on, windows are measured live.
4. **Two policies**, each a fresh in-process `warmserve.local.driver.Up` (operator pool round + worker agent +
   router) on a config validated like `warmserve up -f` does: `warmserve` (prewarming on) and `reactive`
   (`spec.prewarm.enabled: false` on every model, so every engine start reads its weights from disk). The
   placement does not read `prewarm.enabled` yet, so the benchmark zeroes those models' forecast demand
   (`bench_forecasts`); the JSON's promotions show the effect (reactive: hit 0, loading 0). The page cache is
   dropped before each (`/proc/sys/vm/drop_caches` as root, else `posix_fadvise(DONTNEED)` on the model
   files). The pre-started engine shells are waited for before the replay. Engine launches get distinct
   ports (`distinct_engine_ports`, see there; `--keep-port-race` to run without it).
5. **Client.** A separate process replays the schedule open loop through the router over loopback (aiohttp,
   `stream: true`); each request records its TTFT (first streamed chunk) and status. `lost` = sent but never
   answered.
6. **Router overhead**, (a) against a real engine: after the warmserve replay, ≥ 200 requests to the router
   and ≥ 200 straight to the engine it routes to, one at a time, interleaved; (b) against
   bench/fake_engine.py (its own process) at 200 requests/s open loop, in 0.25-s blocks that alternate
   between the router and the engine itself (so each path sees 200 requests/s under the same conditions).
   (b) runs twice: with the router pinned to a CPU of its own and the client and fake engine to the others
   (`isolated`: as deployed, where the router is its own pod and the load comes from elsewhere; the headline
   keys), then with all three processes sharing every CPU (`shared`: the worst case of a 2-core machine, where
   the router waits for a CPU behind the load generator). The router process's CPU time per proxied request
   is reported for both.

Counters come from the running system: promotions by source from the operator metrics
(`warmserve_promotions_total{source=hit|loading|cold}`), engine lifetimes (engine-seconds) and weight loads
from the worker agent, sampled every 0.25 s.

`--quick` (a smoke run; no test runs it, the suite would take minutes more): two tiny models, one pre-started shell, the
first half of the busy hour compressed 30x into a 60 s replay per policy (10 s windows, the schema's
minimum), fewer overhead samples.

The machine's 1-minute load average is sampled during each replay and reported (`loadavg`): other work on a
2-core machine moves every figure here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # devmodels, fake_engine

from devmodels import CORPUS  # noqa: E402  (a sibling module: bench/ is on the path from here on)

MIB = 1 << 20
TRACE_WINDOW_S = 300  # the trace's own forecast window (5 minutes)
SIZES: dict[str, dict[str, int]] = {
    # bench/devmodels.py shapes (head_dim 64, as vLLM's CPU attention needs)
    "tiny": {"hidden": 128, "layers": 2, "heads": 2, "kv_heads": 1, "intermediate": 256, "vocab": 512},
    "small": {"hidden": 512, "layers": 4, "heads": 8, "kv_heads": 2, "intermediate": 1408, "vocab": 32000},
    "medium": {"hidden": 768, "layers": 6, "heads": 12, "kv_heads": 4, "intermediate": 2048, "vocab": 32000},
    "large": {"hidden": 1536, "layers": 17, "heads": 12, "kv_heads": 4, "intermediate": 4096, "vocab": 32000},
}
DAY_NAMES = ("fri", "sat", "sun", "mon", "tue", "wed", "thu")  # Azure 2024 code trace days 0..6
POLICIES = ("warmserve", "reactive")
WORDS = tuple(sorted({word.strip(",") for line in CORPUS for word in line.split()}))  # the tokenizer's corpus
PAIR_PROMPT_WORDS, PAIR_MAX_TOKENS = 16, 2  # the router-overhead requests to a real engine (`client_pairs`)


def say(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


def spread(values: Sequence[float], scale: float = 1.0) -> dict[str, float | int | None]:
    """p50/p90/p99/max/mean of `values` × scale (None when empty)."""
    out: dict[str, float | int | None] = {"n": len(values)}
    for name, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        v = pct(values, q)
        out[name] = None if v is None else round(v * scale, 4)
    out["max"] = round(max(values) * scale, 4) if len(values) else None
    out["mean"] = round(float(np.mean(values)) * scale, 4) if len(values) else None
    return out


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Settings:
    quick: bool
    size: str
    models: int
    devices: int
    start_hour: float
    span_s: int  # trace seconds replayed
    compress: int
    rps: float  # replayed (compressed) aggregate request rate
    alpha: float
    season_days: int
    correction_windows: int
    service_s: float
    max_concurrency: int
    max_replicas: int
    interval_s: float
    shells: int
    prompt_div: int
    max_prompt_words: int
    max_output_tokens: int
    drain_s: float
    pairs: int
    fake_rps: float
    fake_seconds: float
    seed: int
    keep_port_race: bool

    @property
    def window_s(self) -> int:
        return TRACE_WINDOW_S // self.compress

    @property
    def replay_s(self) -> float:
        return self.span_s / self.compress

    @property
    def period(self) -> int:
        return 86400 // self.window_s


def settings_from(args: argparse.Namespace) -> Settings:
    quick = bool(args.quick)

    def pick(name: str, full: Any, fast: Any) -> Any:
        value = getattr(args, name)
        return value if value is not None else (fast if quick else full)

    models = pick("models", 3, 2)
    devices = 1
    while devices < models:
        devices *= 2
    s = Settings(
        quick=quick,
        size=pick("size", "small", "tiny"),
        models=models,
        devices=pick("devices", devices, devices),
        start_hour=pick("start_hour", 19.0, 19.0),
        span_s=int(pick("span_minutes", 60, 30) * 60),
        compress=pick("compress", 15, 30),
        rps=pick("rps", 1.5, 2.0),
        alpha=pick("alpha", 0.5, 0.5),
        season_days=pick("season_days", 3, 3),
        correction_windows=pick("correction_windows", 12, 6),
        service_s=pick("service_s", 0.5, 0.3),
        max_concurrency=pick("max_concurrency", 8, 8),
        max_replicas=pick("max_replicas", 1, 1),
        interval_s=pick("interval_s", 0.5, 0.5),
        shells=pick("shells", models, 1),
        prompt_div=pick("prompt_div", 32, 32),
        max_prompt_words=pick("max_prompt_words", 48, 48),
        max_output_tokens=pick("max_output_tokens", 8, 8),
        drain_s=pick("drain_s", 90.0, 30.0),
        pairs=pick("pairs", 250, 40),
        fake_rps=pick("fake_rps", 200.0, 200.0),
        fake_seconds=pick("fake_seconds", 10.0, 3.0),
        seed=args.seed,
        keep_port_race=bool(args.keep_port_race),
    )
    if TRACE_WINDOW_S % s.compress or 86400 % s.window_s or s.window_s < 10:
        raise SystemExit(
            f"--compress {s.compress}: 300/compress must be a whole number of seconds, at least 10 (the WarmPool "
            "schema's minimum windowSeconds), dividing 86400"
        )
    if s.span_s % TRACE_WINDOW_S:
        raise SystemExit("--span-minutes must be a multiple of 5")
    if s.devices not in (1, 2, 4, 8, 16):
        raise SystemExit("--devices must be 1, 2, 4, 8 or 16 (the WarmPool schema's gpu.count)")
    return s


# --------------------------------------------------------------------------------------------------- models
def model_dirs(s: Settings, root: str) -> list[str]:
    """Generate (or reuse) the models: one directory per model, named by shape and seed."""
    shape = SIZES[s.size]
    dirs = []
    for i in range(s.models):
        path = os.path.join(root, f"{s.size}-seed{100 + i}")
        if not os.path.exists(os.path.join(path, "model.safetensors")):
            say(f"generating model {i + 1}/{s.models} ({s.size}) into {path}")
            flags = [f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]
            subprocess.run(
                [sys.executable, os.path.join(HERE, "devmodels.py"), path, *flags, f"--seed={100 + i}"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        dirs.append(path)
    return dirs


def default_model_dir() -> str:
    """Outside /tmp: the pool's model cache (modelCache.mountPath) may not lie in a directory a worker needs."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "warmserve-e2e-models")


def weight_files(directory: str) -> list[str]:
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".safetensors"))


def drop_page_cache(dirs: Sequence[str]) -> str:
    """Drop the page cache: all of it as root, else the model files' pages. Returns what was done."""
    files = [f for d in dirs for f in weight_files(d)]
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return "drop_caches"
    except OSError:
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"


# --------------------------------------------------------------------------------------------------- replay
@dataclass
class Replay:
    """The compressed schedule, and the per-trace-window load the history is seeded from."""

    names: list[str]
    trace_days: list[int]
    offsets: np.ndarray  # seconds from the replay start (compressed), sorted
    model_idx: np.ndarray
    prompt_words: np.ndarray
    max_tokens: np.ndarray
    window_avg: np.ndarray  # (models, trace windows) in-flight avg, windows of TRACE_WINDOW_S trace seconds
    window_peak: np.ndarray
    replay_window: int  # index of the first replayed trace window
    source: str
    info: dict[str, Any] = field(default_factory=dict)


def build_replay(s: Settings) -> Replay:
    from warmserve.core.load import offered_concurrency, window_load
    from warmserve.workload.build import WorkloadSpec, build_workload
    from warmserve.workload.bundle import load_bundle, load_bundle_from_traces
    from warmserve.workload.traces import trace_root

    try:
        root = trace_root()
        data = load_bundle_from_traces(root)
        source = str(root)
    except FileNotFoundError:
        data = load_bundle()
        source = "the package's trace bundle (same arrays as the trace files)"
    start_s = round(s.start_hour * 3600) // TRACE_WINDOW_S * TRACE_WINDOW_S
    spec = WorkloadSpec(
        n_models=s.models,
        rps=s.rps / s.compress,  # trace-time rate; the compression multiplies it back
        alpha=s.alpha,
        source="azure2024_code",
        replay_start_s=start_s,
        replay_s=s.span_s,
        history_days=s.season_days,
        token_kind="code",
        max_input_tokens=4096,
        seed=s.seed,
    )
    wl = build_workload(spec, data)
    names = [f"code-{DAY_NAMES[d]}" for d in wl.model_days]
    words = np.clip(wl.input_tokens // s.prompt_div, 8, s.max_prompt_words)
    tokens = np.clip(wl.output_tokens, 4, s.max_output_tokens)
    # in-flight load per trace second: arrivals/s (trace time) × service time in trace seconds
    conc = offered_concurrency(wl.history_rate, s.service_s * s.compress)
    avg, peak = window_load(conc, TRACE_WINDOW_S)
    info = {
        "trace": "Azure LLM inference 2024, code service (per-second request counts)",
        "trace_source": source,
        "models": {
            n: f"trace day {DAY_NAMES[d]} (2024-05-{10 + d})" for n, d in zip(names, wl.model_days, strict=True)
        },
        "slice_utc": f"{start_s // 3600:02d}:{start_s % 3600 // 60:02d} + {s.span_s // 60} min",
        "compression": s.compress,
        "replay_seconds": s.replay_s,
        "window_seconds": s.window_s,
        "requests": int(wl.arrival_s.shape[0]),
        "requests_per_model": {n: int((wl.model_idx == i).sum()) for i, n in enumerate(names)},
        "replayed_rps": round(wl.arrival_s.shape[0] / s.replay_s, 3),
        "token_lengths": "Azure 2023 code trace: prompt words = input tokens / "
        f"{s.prompt_div} clipped to [8, {s.max_prompt_words}], max_tokens = output tokens clipped to "
        f"[4, {s.max_output_tokens}]",
        "history": f"{s.season_days} previous trace days per model, Little's law with {s.service_s} s service",
    }
    return Replay(
        names=names,
        trace_days=list(wl.model_days),
        offsets=wl.arrival_s / s.compress,
        model_idx=wl.model_idx,
        prompt_words=words,
        max_tokens=tokens,
        window_avg=avg,
        window_peak=peak,
        replay_window=s.season_days * 86400 // TRACE_WINDOW_S,
        source=source,
        info=info,
    )


def seed_history(s: Settings, replay: Replay, uids: Sequence[str], w0: int) -> Any:
    """The load history the forecaster would have after `season_days` days of this trace, on the absolute
    window indices it reads: trace window (replay start + m, d days earlier) → w0 + m - d·P."""
    from warmserve.controller.history import LoadHistory

    capacity = (s.season_days + 1) * s.period
    history = LoadHistory(s.window_s, capacity)
    per_day = 86400 // TRACE_WINDOW_S
    replay_windows = s.span_s // TRACE_WINDOW_S
    m_range = range(-(s.correction_windows + 2), replay_windows + 2)
    for i, uid in enumerate(uids):
        for d in range(0, s.season_days + 1):
            for m in m_range:
                if d == 0 and m >= 0:
                    continue  # the replay itself: measured live
                j = replay.replay_window + m - d * per_day
                if 0 <= j < replay.window_avg.shape[1] and np.isfinite(replay.window_avg[i, j]):
                    history.record(uid, w0 + m - d * s.period, replay.window_avg[i, j], replay.window_peak[i, j])
    return history


# --------------------------------------------------------------------------------------------------- config
def pool_memory_mib(weight_bytes: Sequence[int]) -> int:
    """The pool's `gpu.memoryMiB`: each device's arena can hold every model (one-for-many), with room to spare."""
    return math.ceil(max(weight_bytes) * (len(weight_bytes) + 0.5) / MIB / 0.9) + 16


def config_docs(s: Settings, names: Sequence[str], dirs: Sequence[str], prewarm: bool) -> list[dict[str, Any]]:
    memory_mib = pool_memory_mib([sum(os.path.getsize(f) for f in weight_files(d)) for d in dirs])
    pool = {
        "apiVersion": "warmserve.io/v1alpha1",
        "kind": "WarmPool",
        "metadata": {"name": "bench"},
        "spec": {
            "gpu": {"count": s.devices, "memoryMiB": memory_mib},
            "forecast": {
                "windowSeconds": s.window_s,
                "kind": "csp",
                "seasonDays": s.season_days,
                "correctionWindows": s.correction_windows,
                "historyDays": s.season_days + 1,
            },
            "policy": {"intervalSeconds": s.interval_s},
            # sources must lie inside the pool's model cache; `up` reads it in place (nothing is mounted)
            "modelCache": {"mountPath": os.path.commonpath([os.path.dirname(d) for d in dirs])},
        },
    }
    models: list[dict[str, Any]] = [
        {
            "apiVersion": "warmserve.io/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": name},
            "spec": {
                "poolRef": {"name": "bench"},
                "model": {"source": f"file://{path}", "dtype": "bfloat16"},
                "engine": {"maxConcurrency": s.max_concurrency},
                "scaling": {"minReplicas": 0, "maxReplicas": s.max_replicas},
                "prewarm": {"enabled": prewarm},
            },
        }
        for name, path in zip(names, dirs, strict=True)
    ]
    return [pool, *models]


def bench_forecasts(history: Any, live_from: int, no_prewarm: set[str]) -> Any:
    """The pool round's `Forecasts`, with two benchmark adjustments:

    * windows before `live_from` (the idle minute while `up` starts) are not recorded over the seeded history;
    * models whose ModelDeployment has `prewarm.enabled: false` get a zero forecast demand. The placement does
      not read `prewarm.enabled` (decide.catalog only zeroes `minWarmReplicas`), so without this a
      "prewarming off" model would still get warm replicas from its forecast, and a stopped engine's weights
      would stay warm for the next start.
    """
    from warmserve.controller.forecasts import ClosedWindow, Forecasts
    from warmserve.controller.planner import ModelEntry
    from warmserve.controller.spec import PoolSpec
    from warmserve.core.types import Demand

    class BenchForecasts(Forecasts):
        def _close(self, entries: Sequence[ModelEntry], window: int) -> tuple[ClosedWindow, ...]:
            if self.window is not None and self.window < live_from:
                self._window_samples.clear()
                self.window = window
                return ()
            return super()._close(entries, window)

        def _forecast(self, pool: PoolSpec, entries: Sequence[ModelEntry], window: int) -> list[tuple[str, str, float]]:
            gauges = super()._forecast(pool, entries, window)
            for uid in no_prewarm & set(self.demand):
                self.demand[uid] = Demand(0.0, 0.0)
            return gauges

    return BenchForecasts(history)


# --------------------------------------------------------------------------------------------------- client
def prompt_text(words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(int(words)))


def engine_seconds(header: str) -> float | None:
    """The router's `Server-Timing: ..., engine;dur=<ms>` (the engine's time to its first chunk as the router
    saw it), in seconds; None without one (a direct request)."""
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        if name == "engine" and params.startswith("dur="):
            return float(params[4:]) / 1e3
    return None


async def _one(session: Any, url: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    """POST one streamed completion; returns status, ttft (first chunk), total and outcome."""
    import aiohttp

    t0 = time.perf_counter()
    rec: dict[str, Any] = {"status": None, "ttft": None, "total": None, "outcome": "lost", "engine": None}
    try:
        async with session.post(url, json=payload, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            rec["status"] = resp.status
            rec["engine"] = engine_seconds(resp.headers.get("Server-Timing", ""))
            if resp.status != 200:
                await resp.read()
                rec["outcome"] = f"http_{resp.status}"
                rec["total"] = time.perf_counter() - t0
                return rec
            done = False
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                if rec["ttft"] is None:
                    rec["ttft"] = time.perf_counter() - t0
                body = line[5:].strip()
                if body == b"[DONE]":
                    done = True
                elif b'"error"' in body:
                    rec["outcome"] = "stream_error"
            rec["total"] = time.perf_counter() - t0
            if rec["outcome"] == "lost":
                rec["outcome"] = "completed" if done else "stream_cut"
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"
    return rec


async def client_replay(spec: dict[str, Any]) -> dict[str, Any]:
    """Open loop: request k is sent at start + offset_k, whatever the answers before it."""
    import aiohttp

    rng = random.Random(spec["seed"])
    reqs = spec["requests"]
    url = spec["url"] + "/v1/completions"
    perf_of_epoch = time.perf_counter() - time.time()
    start = spec["start"] + perf_of_epoch
    results: list[dict[str, Any]] = [{} for _ in reqs]
    sent = 0

    async def fire(k: int, payload: dict[str, Any], lag: float) -> None:
        rec = await _one(session, url, payload, spec["timeout"])
        rec.update(model=payload["model"], offset=reqs[k][0], lag=lag)
        results[k] = rec

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = []
        last_report = time.perf_counter()
        for k, (offset, model, words, max_tokens) in enumerate(reqs):
            payload = {
                "model": model,
                "prompt": prompt_text(words, rng),
                "max_tokens": int(max_tokens),
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
            }
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lag = time.perf_counter() - (start + offset)
            tasks.append(asyncio.create_task(fire(k, payload, lag)))
            sent += 1
            if time.perf_counter() - last_report >= 30:
                last_report = time.perf_counter()
                done = sum(t.done() for t in tasks)
                print(f"[e2e client] sent {sent}/{len(reqs)}, answered {done}", file=sys.stderr, flush=True)
        _, pending = await asyncio.wait(tasks, timeout=spec["drain"]) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for k, rec in enumerate(results):
        if not rec:  # cancelled at the end of the drain: sent, never answered
            results[k] = {"model": reqs[k][1], "offset": reqs[k][0], "status": None, "outcome": "lost"}
    return {"results": results}


async def client_pairs(spec: dict[str, Any]) -> dict[str, Any]:
    """Closed loop, one at a time: router and direct requests alternate (order flipped every pair)."""
    import aiohttp

    rng = random.Random(spec["seed"])
    out: dict[str, list[float]] = {"router": [], "direct": []}
    totals: list[float] = []  # per direct request: time to its last chunk (prefill + the second token's decode)
    diffs: list[float] = []  # router − direct within a pair, when both succeeded
    added: list[float] = []  # per router request: its TTFT minus the engine's time to first chunk (Server-Timing)
    failures: dict[str, int] = {"router": 0, "direct": 0}
    targets = {
        "router": (spec["router"] + "/v1/completions", spec["model"]),
        "direct": (spec["direct"] + "/v1/completions", spec["engine_model"]),
    }
    if "start" in spec:
        await asyncio.sleep(max(0.0, spec["start"] - time.time()))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for i in range(spec["pairs"]):
            prompt = prompt_text(PAIR_PROMPT_WORDS, rng)
            pair: dict[str, float] = {}
            for path in ("router", "direct") if i % 2 == 0 else ("direct", "router"):
                url, model = targets[path]
                payload = {
                    "model": model,
                    "prompt": prompt,
                    "max_tokens": PAIR_MAX_TOKENS,
                    "temperature": 0,
                    "stream": True,
                }
                rec = await _one(session, url, payload, 60.0)
                if rec["outcome"] == "completed" and rec["ttft"] is not None:
                    out[path].append(rec["ttft"])
                    pair[path] = rec["ttft"]
                    if path == "direct" and rec["total"] is not None:
                        totals.append(rec["total"])
                    if rec["engine"] is not None:
                        added.append(rec["ttft"] - rec["engine"])
                else:
                    failures[path] += 1
            if len(pair) == 2:
                diffs.append(pair["router"] - pair["direct"])
    return {"ttft": out, "failures": failures, "paired_diff": diffs, "added": added, "direct_total": totals}


async def client_rate(spec: dict[str, Any]) -> dict[str, Any]:
    """Open loop at `rps` in blocks of 0.25 s that alternate between the router and the engine itself, so the
    engine sees `rps` throughout and each path sees it under the same conditions; the first second is a
    warm-up (dropped)."""
    import aiohttp

    rps, seconds = spec["rps"], spec["seconds"]
    block_s = 0.25
    per_block = round(rps * block_s)
    blocks = 2 * (math.ceil(seconds / block_s) + 4)  # + one warm-up second per path, dropped
    plan = [
        (b * block_s + i / rps, "router" if b % 2 == 0 else "direct", b >= 8)
        for b in range(blocks)
        for i in range(per_block)
    ]
    urls = {"router": spec["router"] + "/v1/completions", "direct": spec["direct"] + "/v1/completions"}
    perf_of_epoch = time.perf_counter() - time.time()
    start = spec["start"] + perf_of_epoch
    ttft: dict[str, list[float]] = {"router": [], "direct": []}
    failures: dict[str, int] = {"router": 0, "direct": 0}
    lags: list[float] = []
    added: list[float] = []  # per router request: its TTFT minus the engine's time to first chunk (Server-Timing)

    async def fire(path: str, keep: bool) -> None:
        payload = {"model": spec["model"], "prompt": "hello world this is a test", "max_tokens": 3, "stream": True}
        rec = await _one(session, urls[path], payload, 30.0)
        if rec["outcome"] != "completed" or rec["ttft"] is None:
            failures[path] += 1
        elif keep:
            ttft[path].append(rec["ttft"])
            if rec["engine"] is not None:
                added.append(rec["ttft"] - rec["engine"])

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = []
        for offset, path, keep in plan:
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lags.append(time.perf_counter() - (start + offset))
            tasks.append(asyncio.create_task(fire(path, keep)))
        await asyncio.gather(*tasks)
    return {
        "ttft": ttft,
        "failures": failures,
        "added": added,
        "router_sent": sum(1 for _, path, _ in plan if path == "router"),
        "lag_p99_ms": round((pct(lags, 99) or 0.0) * 1e3, 3),
    }


def client_main(spec_path: str) -> int:
    with open(spec_path) as fh:
        spec = json.load(fh)
    mode = {"replay": client_replay, "pairs": client_pairs, "rate": client_rate}[spec["mode"]]
    from warmserve.router.server import new_event_loop

    with asyncio.Runner(loop_factory=new_event_loop) as runner:  # the loop the router itself runs on
        result = runner.run(mode(spec))
    with open(spec["out"], "w") as fh:
        json.dump(result, fh)
    return 0


def pinned(cpus: set[int] | None) -> Callable[[], None] | None:
    """A `preexec_fn` that pins the child process to `cpus` (None: no pinning)."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_client(work: str, name: str, spec: dict[str, Any], cpus: set[int] | None = None) -> dict[str, Any]:
    """Run the client in its own process (same interpreter, pinned to `cpus` if given) and return what it
    wrote."""
    spec_path = os.path.join(work, f"client-{name}.json")
    out_path = os.path.join(work, f"client-{name}-out.json")
    with open(spec_path, "w") as fh:
        json.dump({**spec, "out": out_path}, fh)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, os.path.abspath(__file__), "--_client", spec_path, preexec_fn=pinned(cpus)
    )
    code = await proc.wait()
    if code != 0:
        raise RuntimeError(f"the {name} client exited with {code}")
    with open(out_path) as fh:
        result: dict[str, Any] = json.load(fh)
    return result


# ------------------------------------------------------------------------------------------------- sampling
class Sampler:
    """Engines and weight loads of the worker agent, sampled every `every` seconds."""

    def __init__(self, agent: Any, every: float = 0.25) -> None:
        self.agent = agent
        self.every = every
        self.engines: dict[tuple[str, int], dict[str, Any]] = {}  # (replica id, pid) → started, last, ready_s
        self.loads: dict[tuple[str, float], float] = {}  # (shard key, started) → seconds
        self.loadavg: list[float] = []  # the machine's 1-minute load average, once a second
        self._last_loadavg = 0.0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        now = time.time()
        if now - self._last_loadavg >= 1.0:
            self._last_loadavg = now
            self.loadavg.append(os.getloadavg()[0])
        for rec in self.agent.engines.running().values():
            e = self.engines.setdefault((rec.uid, rec.pid), {"started": rec.started, "last": now, "ready_s": None})
            e["last"] = now
            e["standby"] = rec.bound_s is not None
            if rec.ready_s is not None:
                e["ready_s"] = rec.ready_s
        for key, shard in self.agent.store.shards().items():
            if shard.seconds is not None:
                self.loads[(str(key), shard.started)] = shard.seconds

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.every)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()

    def engine_seconds(self, t0: float, t1: float) -> float:
        return sum(max(0.0, min(e["last"], t1) - max(e["started"], t0)) for e in self.engines.values())


def promotions(metrics: Any) -> dict[str, int]:
    """Engines started so far by source (hit, loading, cold), from the operator's promotions counter."""
    out = {"hit": 0, "loading": 0, "cold": 0}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "warmserve_promotions_total":
                source = sample.labels.get("source", "")
                out[source] = out.get(source, 0) + int(sample.value)
    return out


# ------------------------------------------------------------------------------------------------- policies
async def wait_for(predicate: Any, timeout: float, what: str, task: asyncio.Task[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if task is not None and task.done():
            task.result()  # raises what stopped `up`
            raise RuntimeError(f"warmserve up stopped while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.2)


def replay_requests(replay: Replay) -> list[tuple[float, str, int, int]]:
    return [
        (float(o), replay.names[int(m)], int(w), int(t))
        for o, m, w, t in zip(replay.offsets, replay.model_idx, replay.prompt_words, replay.max_tokens, strict=True)
    ]


def summarize_replay(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    ttft = [r["ttft"] for r in results if r.get("outcome") == "completed" and r.get("ttft") is not None]
    status = [r.get("status") for r in results]
    outcomes: dict[str, int] = {}
    for r in results:
        outcomes[r.get("outcome", "lost")] = outcomes.get(r.get("outcome", "lost"), 0) + 1
    lags = [r["lag"] for r in results if r.get("lag") is not None]
    return {
        "requests": len(results),
        "completed": outcomes.get("completed", 0),
        "status_5xx": sum(1 for s in status if s is not None and s >= 500),
        "status_429": sum(1 for s in status if s == 429),
        "lost": outcomes.get("lost", 0),
        "stream_errors": outcomes.get("stream_error", 0) + outcomes.get("stream_cut", 0),
        "outcomes": outcomes,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p90_s": pct(ttft, 90),
        "ttft_p99_s": pct(ttft, 99),
        "ttft_max_s": max(ttft) if ttft else None,
        "ttft_mean_s": float(np.mean(ttft)) if ttft else None,
        "ttft_over_1s": sum(1 for t in ttft if t > 1.0),
        "client_lag_p99_ms": round((pct(lags, 99) or 0.0) * 1e3, 3),
    }


async def run_policy(
    policy: str, s: Settings, replay: Replay, dirs: Sequence[str], work: str, measure_overhead: bool
) -> dict[str, Any]:
    from warmserve.controller.spec import parse_model_spec, parse_pool_spec
    from warmserve.local.config import load
    from warmserve.local.driver import Up, UpSettings

    prewarm = policy == "warmserve"
    pdir = os.path.join(work, policy)
    os.makedirs(pdir, exist_ok=True)
    import yaml

    config_path = os.path.join(pdir, "models.yaml")
    with open(config_path, "w") as fh:
        yaml.safe_dump_all(config_docs(s, replay.names, dirs, prewarm), fh, sort_keys=False)
    config = load(config_path)  # validated as `warmserve up -f` validates it
    cache = drop_page_cache(dirs)
    say(f"{policy}: page cache dropped ({cache}); starting warmserve up ({s.models} models, {s.devices} devices)")
    port = free_port()
    settings = UpSettings(
        host="127.0.0.1",
        port=port,
        # short: the engine shells' AF_UNIX sockets live in it (108 bytes at most); it names the arenas too
        state_dir=tempfile.mkdtemp(prefix=f"ws-{policy[:4]}-"),
        engine_args=(
            "--enforce-eager",
            "--max-model-len",
            "512",
            "--dtype",
            "bfloat16",
            "--max-num-seqs",
            str(s.max_concurrency),
        ),
        engine_port=20000 + (0 if prewarm else 500),
        shells=s.shells,
        status_every=5.0,
        max_wait_seconds=120.0,
    )
    uids = [m["metadata"]["uid"] for m in config.models]
    no_prewarm = {
        m["metadata"]["uid"]
        for m in config.models
        if not parse_model_spec(m["metadata"]["name"], m["spec"]).prewarm_enabled
    }
    pool_spec = parse_pool_spec(config.pool["spec"])
    log_path = os.path.join(pdir, "up.log")
    result: dict[str, Any] = {"page_cache": cache}
    with open(log_path, "w") as up_log:
        up = Up(config, settings, out=up_log)
        stop = asyncio.Event()
        task = asyncio.create_task(up.run(stop))
        sampler: Sampler | None = None
        try:
            t_boot = time.monotonic()
            await wait_for(lambda: up.agent is not None, 60, "the worker agent", task)
            if not s.keep_port_race:
                distinct_engine_ports(up.agent.engines)
            await wait_for(lambda: shells_ready(up.agent.engines), 300, f"{s.shells} pre-started engine shells", task)
            await wait_for(lambda: up.rounds > 0, 60, "the first pool round", task)
            invalid = model_problems(up)
            if invalid:
                raise RuntimeError(f"{policy}: warmserve up refuses the models: {'; '.join(invalid)}")
            result["shells_ready_s"] = round(time.monotonic() - t_boot, 1)
            say(f"{policy}: {s.shells} engine shells ready after {result['shells_ready_s']} s")

            # the replay starts on a window boundary; the seeded forecasts are in place one window before
            w0 = math.ceil((time.time() + 3.0) / s.window_s)
            t_start = w0 * s.window_s
            history = seed_history(s, replay, uids, w0)
            with open(up.world.history_path, "w") as fh:
                fh.write(history.encode())
            restored = await up.pool_loop.observer.load_history(pool_spec)  # as `up` reads it
            up.pool_loop.forecasts = bench_forecasts(restored, w0, no_prewarm)
            result["seeded_windows"] = sum(restored.windows(u) for u in uids)
            sampler = Sampler(up.agent)
            sampler.start()
            before = promotions(up.runtime.metrics)
            say(
                f"{policy}: history seeded ({result['seeded_windows']} windows); replay starts in "
                f"{t_start - time.time():.1f} s, {len(replay.offsets)} requests over {s.replay_s:.0f} s"
            )
            reqs = replay_requests(replay)
            progress = asyncio.create_task(report_progress(policy, up, t_start, s.replay_s))
            try:
                out = await run_client(
                    work,
                    policy,
                    {
                        "mode": "replay",
                        "url": f"http://127.0.0.1:{port}",
                        "start": t_start,
                        "requests": reqs,
                        "timeout": 300.0,
                        "drain": s.drain_s,
                        "seed": s.seed,
                    },
                )
            finally:
                progress.cancel()
            t_end = time.time()
            sampler.sample()
            after = promotions(up.runtime.metrics)
            result.update(summarize_replay(out["results"]))
            result["promotions_hit"] = after["hit"] - before["hit"]
            result["promotions_loading"] = after["loading"] - before["loading"]
            result["promotions_cold"] = after["cold"] - before["cold"]
            result["gpu_or_cpu_seconds_busy"] = round(sampler.engine_seconds(t_start, t_end), 2)
            result["window_seconds_of_run"] = round(t_end - t_start, 2)
            result["engine_starts"] = len(sampler.engines)
            result["loadavg_1m"] = spread(sampler.loadavg)
            ready = [e["ready_s"] for e in sampler.engines.values() if e["ready_s"] is not None]
            result["engine_ready_s"] = spread(ready)
            # per engine (bench/calibrate.py prices the simulator's starts from these): ready_s and whether a
            # standby engine was bound (else it was launched in a pre-started shell)
            result["engine_starts_log"] = [
                {"ready_s": e["ready_s"], "standby": e["standby"]} for e in sampler.engines.values()
            ]
            result["request_results"] = out["results"]  # per request: offset, model, status, TTFT, total, engine
            result["weight_loads"] = spread(list(sampler.loads.values()))
            result["per_model"] = {
                name: summarize_replay([r for r in out["results"] if r.get("model") == name]) for name in replay.names
            }
            say(
                f"{policy}: replay done: {result['completed']}/{result['requests']} completed, TTFT p50 "
                f"{fmt(result['ttft_p50_s'])} s p99 {fmt(result['ttft_p99_s'])} s, promotions hit "
                f"{result['promotions_hit']} cold {result['promotions_cold']}, engine-seconds "
                f"{result['gpu_or_cpu_seconds_busy']}"
            )
            if measure_overhead:
                result["router_overhead"] = await engine_overhead(s, up, replay.names[0], port, work)
        finally:
            if sampler is not None:
                await sampler.stop()
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 120)
            logs = os.path.join(settings.state_dir, "engines")  # keep the engine logs with the work directory
            if os.path.isdir(logs):
                shutil.copytree(logs, os.path.join(pdir, "engine-logs"), ignore=shutil.ignore_patterns("*.sock"))
            shutil.rmtree(settings.state_dir, ignore_errors=True)
    say(f"{policy}: warmserve up stopped")
    return result


def shells_ready(engines: Any) -> bool:
    """All pre-started shells have imported vLLM; raises (with the log's end) if one of them died."""
    for shell in engines.shells:
        if not shell.alive():
            with open(shell.log_path, errors="replace") as fh:
                tail = fh.read()[-1500:]
            raise RuntimeError(f"an engine shell died before it was ready ({shell.log_path}):\n{tail}")
    return bool(engines.shells) and all(shell.ready.is_set() for shell in engines.shells)


def distinct_engine_ports(engines: Any) -> None:
    """Give every engine launch a port above the previous one's.

    `EngineManager.launch` picks the first port from its base that can be bound *now*; an engine binds it only
    seconds later, so two launches within those seconds get the same port (seen here: two engines of different
    models on one port, the second never ready and holding its device for good). The benchmark works around it
    by moving the base past each port handed out; `--keep-port-race` runs the manager as it is.
    """
    launch = engines.launch

    def launch_distinct(*args: Any, **kwargs: Any) -> Any:
        rec = launch(*args, **kwargs)
        engines.base_port = max(engines.base_port, rec.port + 1)
        return rec

    engines.launch = launch_distinct


def model_problems(up: Any) -> list[str]:
    """The reasons `up` gives for ModelDeployments it will not serve (Valid=False), if any."""
    problems = []
    for name, status in up.world.model_status.items():
        for c in status.get("conditions", ()):
            if c.get("type") == "Valid" and c.get("status") == "False":
                problems.append(f"{name}: {c.get('reason')}: {c.get('message')}")
    return problems


async def report_progress(policy: str, up: Any, t_start: float, replay_s: float) -> None:
    while True:
        await asyncio.sleep(20)
        state = up.world.state
        parts = []
        for m in up.config.models:
            uid, name = m["metadata"]["uid"], m["metadata"]["name"]
            reps = [r for r in (state.replicas if state else ()) if r.uid == uid]
            engines = sum(r.serving for r in reps)
            warm = sum(str(r.phase) == "warm" for r in reps)
            parts.append(f"{name} e{engines}/w{warm}/q{up.router.dispatcher.requests(name)}")
        elapsed = time.time() - t_start
        say(f"{policy}: t={elapsed:+.0f}/{replay_s:.0f} s  " + "  ".join(parts))


async def keep_busy(router_url: str, model: str) -> None:
    """Requests to `model` through the router back to back (always one in flight), until cancelled: the
    autoscaler samples in-flight requests, and short ones spaced out read as no load at all."""
    import aiohttp

    payload = {"model": model, "prompt": "hello world this is a test", "max_tokens": 2}
    async with aiohttp.ClientSession() as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.post(router_url + "/v1/completions", json=payload) as resp:
                    await resp.read()
            await asyncio.sleep(0.01)


async def engine_overhead(s: Settings, up: Any, model: str, port: int, work: str) -> dict[str, Any]:
    """Router vs direct to the same real engine: interleaved, closed loop, `pairs` of each."""
    say(f"router overhead (real engine): making sure {model} has an engine ...")
    router_url = f"http://127.0.0.1:{port}"
    await run_client(
        work,
        "overhead-warmup",
        {
            "mode": "pairs",
            "router": router_url,
            "direct": router_url,
            "model": model,
            "engine_model": model,
            "pairs": 3,
            "seed": s.seed,
        },
    )
    # The engine start refills the shell pool, and a refilling shell imports vLLM for a while: wait for that
    # (not measured), keeping the engine busy meanwhile so that the autoscaler does not retire it, and until
    # the measuring client (started ahead, it waits for `start`) sends its first request.
    keep = asyncio.create_task(keep_busy(router_url, model))
    try:
        await wait_for(lambda: bool(up.router.dispatcher.snapshot.backends_of(model)), 120, f"an engine of {model}")
        with contextlib.suppress(TimeoutError):
            await wait_for(lambda: all(sh.ready.is_set() for sh in up.agent.engines.shells), 120, "refilled shells")
        await wait_for(lambda: bool(up.router.dispatcher.snapshot.backends_of(model)), 120, f"an engine of {model}")
        backend = up.router.dispatcher.snapshot.backends_of(model)[0]
        say(f"router overhead (real engine): {s.pairs} router + {s.pairs} direct requests to {backend.address}")
        start = time.time() + 5.0
        client = asyncio.create_task(
            run_client(
                work,
                "overhead",
                {
                    "mode": "pairs",
                    "router": router_url,
                    "direct": backend.url,
                    "model": model,
                    "engine_model": backend.engine_model,
                    "pairs": s.pairs,
                    "seed": s.seed + 1,
                    "start": start,
                },
            )
        )
        await asyncio.sleep(max(0.0, start - time.time() - 0.3))
    finally:
        keep.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keep
    out = await client
    summary = overhead_summary(out["ttft"], out["failures"], {"engine": backend.address, "model": model})
    summary["paired_diff_ms"] = spread(out["paired_diff"], 1e3)
    summary["added_ms"] = spread(out["added"], 1e3)
    summary["direct_total_ms"] = spread(out["direct_total"], 1e3)
    return summary


def overhead_summary(
    ttft: Mapping[str, Sequence[float]], failures: Mapping[str, int], extra: Mapping[str, Any]
) -> dict[str, Any]:
    r, d = spread(ttft["router"], 1e3), spread(ttft["direct"], 1e3)
    out: dict[str, Any] = {**extra, "router_ttft_ms": r, "direct_ttft_ms": d, "failures": dict(failures)}
    for q in ("p50", "p99", "max"):
        rv, dv = r[q], d[q]
        out[f"overhead_{q}_ms"] = None if rv is None or dv is None else round(float(rv) - float(dv), 3)
    return out


def router_answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def router_main(router_port: int, engine_url: str) -> int:
    """`--_router PORT URL`: the router as it is deployed (its own process, `server.run`), one static backend."""
    from warmserve.router.server import Router, RouterSettings, run
    from warmserve.router.table import Backend, Snapshot

    router = Router(RouterSettings(host="127.0.0.1", port=router_port))
    router.publish(Snapshot(frozenset({"fake"}), (Backend("fake", engine_url, "fake"),)))
    run(router, "127.0.0.1", router_port, drain_seconds=1.0)
    return 0


def cpu_split() -> tuple[set[int], set[int]] | None:
    """(the router's CPU, everyone else's) from this process's CPUs; None with fewer than two."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {cpus[-1]}, set(cpus[:-1])


async def fake_overhead(s: Settings, work: str, isolate: bool) -> dict[str, Any]:
    """Router vs direct against bench/fake_engine.py, both at `fake_rps` open loop, interleaved; the router runs
    in its own process, as `warmserve router` does, on a CPU of its own when `isolate` (and the machine has two)."""
    split = cpu_split() if isolate else None
    router_cpus, other_cpus = split if split else (None, None)
    engine_port, router_port = free_port(), free_port()
    engine_url = f"http://127.0.0.1:{engine_port}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        os.path.join(HERE, "fake_engine.py"),
        "--port",
        str(engine_port),
        "--model",
        "fake",
        stdout=asyncio.subprocess.PIPE,
        preexec_fn=pinned(other_cpus),
    )
    router_proc: asyncio.subprocess.Process | None = None
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if not line.startswith(b"READY"):
            raise RuntimeError(f"fake engine did not start: {line!r}")
        router_proc = await asyncio.create_subprocess_exec(
            sys.executable,
            os.path.abspath(__file__),
            "--_router",
            str(router_port),
            engine_url,
            preexec_fn=pinned(router_cpus),
        )
        await wait_for(lambda: router_answers(router_port), 60, "the router process", None)
        where = (
            f"router on CPU {sorted(router_cpus)}, client and engine on {sorted(other_cpus)}"
            if router_cpus and other_cpus
            else "all processes share every CPU"
        )
        say(
            f"router overhead (fake engine, {where}): {s.fake_rps:g} req/s open loop, 0.25-s blocks alternating "
            f"router and direct, {s.fake_seconds:g} s of each"
        )
        cpu0 = cpu_seconds(router_proc.pid)
        out = await run_client(
            work,
            f"fake-rate-{'isolated' if split else 'shared'}",
            {
                "mode": "rate",
                "router": f"http://127.0.0.1:{router_port}",
                "direct": engine_url,
                "model": "fake",
                "rps": s.fake_rps,
                "seconds": s.fake_seconds,
                "start": time.time() + 2.0,
            },
            other_cpus,
        )
        router_cpu_s = cpu_seconds(router_proc.pid) - cpu0
    finally:
        for child in (router_proc, proc):
            if child is not None and child.returncode is None:
                child.terminate()
                await child.wait()
    summary = overhead_summary(out["ttft"], out["failures"], {"rps_each": s.fake_rps, "seconds": s.fake_seconds})
    summary["cpus"] = (
        {"router": sorted(router_cpus), "client_and_engine": sorted(other_cpus)}
        if router_cpus and other_cpus
        else "shared"
    )
    summary["client_lag_p99_ms"] = out["lag_p99_ms"]
    summary["added_ms"] = spread(out["added"], 1e3)
    summary["router_cpu_ms_per_request"] = round(router_cpu_s * 1e3 / max(1, out["router_sent"]), 3)
    return summary


# ---------------------------------------------------------------------------------------------------- main
def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def print_table(report: Mapping[str, Any]) -> None:
    cols = (
        ("requests", "req", 5),
        ("completed", "done", 5),
        ("status_5xx", "5xx", 4),
        ("status_429", "429", 4),
        ("lost", "lost", 5),
        ("ttft_p50_s", "p50 s", 9),
        ("ttft_p90_s", "p90 s", 9),
        ("ttft_p99_s", "p99 s", 9),
        ("ttft_max_s", "max s", 9),
        ("promotions_hit", "hit", 4),
        ("promotions_loading", "load", 5),
        ("promotions_cold", "cold", 5),
        ("engine_starts", "starts", 7),
        ("gpu_or_cpu_seconds_busy", "engine-s", 9),
    )
    if report["policies"]:
        print()
        print(f"{'policy':<11}" + "".join(f"{h:>{w}}" for _, h, w in cols))
        print("-" * (11 + sum(w for _, _, w in cols)))
        for name, row in report["policies"].items():
            print(f"{name:<11}" + "".join(f"{fmt(row.get(k)):>{w}}" for k, _, w in cols))
        ratio = report.get("ttft_p99_ratio_reactive_over_warmserve")
        print(f"\np99 TTFT reactive / warmserve: {fmt(ratio, 2)}x")
    for key, title in (
        ("router_overhead", "real engine, closed loop"),
        ("router_overhead_200rps", "fake engine, router on its own CPU"),
        ("router_overhead_200rps_shared", "fake engine, every CPU shared"),
    ):
        o = report.get(key)
        if not o:
            continue
        r, d = o["router_ttft_ms"], o["direct_ttft_ms"]
        print(
            f"router vs direct ({title}): TTFT ms p50 {fmt(r['p50'])} vs {fmt(d['p50'])}, p99 {fmt(r['p99'])} vs "
            f"{fmt(d['p99'])}, max {fmt(r['max'])} vs {fmt(d['max'])} (n {r['n']}/{d['n']}); overhead p50 "
            f"{fmt(o['overhead_p50_ms'])} ms, p99 {fmt(o['overhead_p99_ms'])} ms"
        )
        a = o.get("added_ms") or {}
        print(
            f"  per request, router TTFT minus the engine's own time to first chunk (Server-Timing): p50 "
            f"{fmt(a.get('p50'))} ms, p99 {fmt(a.get('p99'))} ms, max {fmt(a.get('max'))} ms (n {a.get('n')})"
            + (
                f"; router CPU {fmt(o['router_cpu_ms_per_request'])} ms/request"
                if "router_cpu_ms_per_request" in o
                else ""
            )
        )


async def fake_overhead_report(s: Settings, work: str) -> dict[str, Any]:
    """The fake-engine overhead twice: router isolated (the headline keys: the deployed shape) and shared."""
    fake = await fake_overhead(s, work, isolate=True)
    shared = await fake_overhead(s, work, isolate=False) if fake["cpus"] != "shared" else fake
    return {
        "router_overhead_200rps": fake,
        "router_overhead_200rps_p50_ms": fake["overhead_p50_ms"],
        "router_overhead_200rps_p99_ms": fake["overhead_p99_ms"],
        "router_overhead_200rps_shared": shared,
        "router_overhead_200rps_shared_p99_ms": shared["overhead_p99_ms"],
    }


async def main_async(s: Settings, args: argparse.Namespace, work: str) -> dict[str, Any]:
    t0 = time.monotonic()
    if args.overhead_only:
        only: dict[str, Any] = {"mode": "overhead-only", "settings": dataclasses.asdict(s), "policies": {}}
        only.update(await fake_overhead_report(s, work))
        only["run_seconds"] = round(time.monotonic() - t0, 1)
        return only
    replay = build_replay(s)
    say(
        f"replay: {replay.info['requests']} requests, {replay.info['slice_utc']} of "
        f"{', '.join(replay.info['models'].values())}, compressed {s.compress}x into {s.replay_s:.0f} s "
        f"(windows of {s.window_s} s)"
    )
    model_root = os.path.abspath(args.model_dir or default_model_dir())
    dirs = model_dirs(s, model_root)
    model_bytes = [sum(os.path.getsize(f) for f in weight_files(d)) for d in dirs]
    report: dict[str, Any] = {
        "mode": "quick" if s.quick else "full",
        "settings": dataclasses.asdict(s),
        "replay": replay.info,
        "models": {
            n: {"dir": d, "size": s.size, "weight_bytes": b}
            for n, d, b in zip(replay.names, dirs, model_bytes, strict=True)
        },
        "policies": {},
    }
    report.update(await fake_overhead_report(s, work))
    for policy in POLICIES:
        report["policies"][policy] = await run_policy(
            policy, s, replay, dirs, work, measure_overhead=(policy == "warmserve")
        )
    ws, rx = report["policies"]["warmserve"], report["policies"]["reactive"]
    overhead = ws.pop("router_overhead", None)
    report["router_overhead"] = overhead
    report["router_overhead_p50_ms"] = overhead["overhead_p50_ms"] if overhead else None
    report["router_overhead_p99_ms"] = overhead["overhead_p99_ms"] if overhead else None
    if ws.get("ttft_p99_s") and rx.get("ttft_p99_s"):
        report["ttft_p99_ratio_reactive_over_warmserve"] = round(rx["ttft_p99_s"] / ws["ttft_p99_s"], 3)
    report["page_cache"] = sorted({p["page_cache"] for p in report["policies"].values()})
    report["run_seconds"] = round(time.monotonic() - t0, 1)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/e2e.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json", required=False, help="write the report here")
    p.add_argument("--quick", action="store_true", help="CI smoke size: 2 tiny models, 60 s replay per policy")
    p.add_argument(
        "--size", choices=sorted(SIZES), help="model shape: tiny 1 MB, small 88 MB (default), medium 174 MB, large 1 GB"
    )
    p.add_argument("--models", type=int, help="models, one per trace day (default 3; quick 2)")
    p.add_argument("--devices", type=int, help="CPU arenas of the pool (power of two >= models; default)")
    p.add_argument("--start-hour", type=float, help="UTC hour the replayed slice starts (default 19)")
    p.add_argument("--span-minutes", type=int, help="trace minutes replayed (default 60; quick 30)")
    p.add_argument("--compress", type=int, help="time compression (default 15: 60 min in 240 s; quick 30)")
    p.add_argument("--rps", type=float, help="replayed aggregate request rate (default 1.5; quick 2.0)")
    p.add_argument("--alpha", type=float, help="Zipf popularity exponent over the models (default 0.5)")
    p.add_argument("--season-days", type=int, help="history days seeded and forecast over (default 3)")
    p.add_argument("--correction-windows", type=int, help="CSP correction windows (default 12; quick 6)")
    p.add_argument("--service-s", type=float, help="mean service time for the seeded load (default 0.5)")
    p.add_argument("--max-concurrency", type=int, help="engine.maxConcurrency and --max-num-seqs (default 8)")
    p.add_argument("--max-replicas", type=int, help="scaling.maxReplicas per model (default 1)")
    p.add_argument("--interval-s", type=float, help="pool round interval, spec.policy.intervalSeconds (default 0.5)")
    p.add_argument("--shells", type=int, help="pre-started engine shells (default: one per model)")
    p.add_argument("--prompt-div", type=int, help="prompt words = trace input tokens / this (default 32)")
    p.add_argument("--max-prompt-words", type=int, help="prompt cap (default 48)")
    p.add_argument("--max-output-tokens", type=int, help="max_tokens cap (default 8)")
    p.add_argument("--drain-s", type=float, help="wait for answers after the last send (default 90; quick 30)")
    p.add_argument("--pairs", type=int, help="router/direct requests each against a real engine (default 250)")
    p.add_argument("--fake-rps", type=float, help="open-loop rate per path against the fake engine (default 200)")
    p.add_argument("--fake-seconds", type=float, help="duration of that (default 10; quick 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--overhead-only",
        action="store_true",
        help="only the router's overhead against the fake engine (a minute; no replay, no vLLM)",
    )
    p.add_argument(
        "--keep-port-race",
        action="store_true",
        help="do not work around engines launched within seconds of each other getting the same port",
    )
    p.add_argument(
        "--model-dir",
        help="where generated models are cached; it becomes the pool's modelCache.mountPath, so not under /tmp "
        "(default ~/.cache/warmserve-e2e-models)",
    )
    p.add_argument("--work-dir", help="logs, configs and state (default: a temporary directory, kept)")
    p.add_argument("--_client", help=argparse.SUPPRESS)
    p.add_argument("--_router", nargs=2, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args._client:
        return client_main(args._client)
    if args._router:
        return router_main(int(args._router[0]), args._router[1])
    if not args.json:
        build_parser().error("--json is required")
    s = settings_from(args)
    work = args.work_dir or tempfile.mkdtemp(prefix="warmserve-e2e-")
    os.makedirs(work, exist_ok=True)
    logging.basicConfig(
        filename=os.path.join(work, "e2e.log"),
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    errors = logging.StreamHandler(sys.stderr)
    errors.setLevel(logging.ERROR)
    logging.getLogger().addHandler(errors)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    say(f"work directory {work} ({'quick' if s.quick else 'full'} mode)")
    from warmserve.router.server import new_event_loop

    with asyncio.Runner(loop_factory=new_event_loop) as runner:  # `warmserve up` and the router run on it too
        report = runner.run(main_async(s, args, work))
    with open(args.json, "w") as fh:
        json.dump(report, fh, indent=1)
    print_table(report)
    say(f"done in {report['run_seconds']:.0f} s; JSON in {args.json}")
    if s.quick and not args.work_dir:  # a full run keeps its logs for inspection
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
