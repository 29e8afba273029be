"""Worker benchmark: prewarm vs raw read, four ways to promote a model, eviction latency.

    python bench/worker.py --json worker-bench.json [--model-dir DIR] [--promote-repeats N] [--skip-vllm] [--quick]

* ``read_gbps``: raw sequential read of the model's safetensors files into a reused 16 MiB buffer.
  ``prewarm_gbps``: the weight store loading the same files into a shared-memory arena. Before every
  measured read the files are dropped from the page cache (``posix_fadvise(DONTNEED)`` after ``fsync``; no
  root needed), so both are storage reads; the hot-cache figures are reported beside them (``*_hot_gbps``).
  Medians of ``--repeats`` interleaved rounds (the disk is a shared VM volume whose speed drifts).
* Promotion, always to the first token of a 1-token completion, same vLLM flags (``ENGINE_ARGS``) and
  environment (``ENV``) in every variant; the variants are interleaved in each of ``--promote-repeats``
  rounds (p50 / max and the per-round values are reported):

  - ``promote_warm_s``: a pre-initialised ("standby") engine is ready (started and waited for, untimed) and
    the replica is in the arena; the clock runs from ``EngineManager.bind`` to the first token.
  - ``promote_shell_warm_s``: a pre-started engine shell (vLLM imported; waited for, untimed) is handed its
    arguments with ``--load-format warmserve`` (weights mapped from the arena); launch to first token.
  - ``promote_shell_disk_s``: the same pre-started shell, weights read from disk (page cache dropped first).
  - ``promote_cold_s``: a fresh vLLM API-server process over the files (page cache dropped first).

  ``speedup_vs_cold`` is ``promote_cold_s / promote_warm_s`` (p50s); ``shell_warm_speedup_vs_cold`` and
  ``shell_disk_speedup_vs_cold`` likewise. ``standby_memory``: RssAnon / RssShmem of the standby engine's
  process groups while idle and ready, before binding.
* Greedy identity: 16 greedy tokens with ``ignore_eos`` compared by *token id* (``logprobs`` with
  ``return_tokens_as_token_ids``), plus text and ``usage.completion_tokens``, between the cold engine and the
  standby-bound one (``greedy_identical``) and the shell-warm one (``greedy_identical_shell_warm``).
* ``evict_small_ms`` / ``evict_large_ms``: time to evict a warm replica of a tiny and of the large model
  (median of several); ``evict_large_vs_small`` their ratio.
* ``acceptance``: the issue's targets, each with PASS/FAIL (also printed).

The ≥ 1 GB model is generated locally (``bench/devmodels.py``, random bf16 weights, never committed);
``--quick`` uses a tiny generated model and one promotion round (tests). The functions here are reused by
``e2e/gpu/check.py`` (which passes its own device, engine arguments and arena).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "worker"))

ENGINE_ARGS = ["--dtype", "bfloat16", "--max-model-len", "256", "--enforce-eager", "--max-num-seqs", "4"]
# One engine-core process without a separate worker process (vLLM keeps the "uni" executor on CPU when
# multiprocessing is off); the same setting in every variant.
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
PROMPT = "the quick brown fox"
SERVED = "large"  # served name of every engine (and the model name of the prewarmed replica)
GREEDY_TOKENS = 16
VARIANTS = ("cold", "shell_disk", "shell_warm", "warm")  # the order inside one promotion round
KEYS = {
    "warm": "promote_warm_s",
    "shell_warm": "promote_shell_warm_s",
    "shell_disk": "promote_shell_disk_s",
    "cold": "promote_cold_s",
}
# acceptance targets stated by the issue
WARM_TARGET_S = 1.0
SPEEDUP_TARGET = 20.0
PREWARM_TARGET = 0.9
EVICT_FLAT_RATIO = 3.0
EVICT_FLAT_MS = 1.0  # sub-millisecond jitter is not growth with model size


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- storage ----------------------------------------------------------------------------
def drop_cache(paths: list[str]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read_gbps(paths: list[str], chunk: int = 16 << 20) -> float:
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total / (time.perf_counter() - t0) / 1e9


def weight_files(model_dir: str) -> list[str]:
    return sorted(os.path.join(model_dir, f) for f in os.listdir(model_dir) if f.endswith(".safetensors"))


def shard(name: str):
    """The store key of model `name`'s one shard on arena "0" (a TP1 replica on GPU 0)."""
    from warmserve.protocol import ReplicaKey
    from warmserve.worker.store import ShardKey

    return ShardKey(ReplicaKey(name, (0,)))


def prewarm_gbps(store, name: str, model_dir: str) -> tuple[float, int]:
    load = store.prewarm(shard(name), name, model_dir, "0", wait=True)
    if load.phase != "warm":
        raise RuntimeError(load.error)
    return load.bytes_total / load.seconds / 1e9, load.bytes_total


def measure_storage(arena, model_dir: str, repeats: int, stores: Mapping[str, bool | None]) -> dict[str, Any]:
    """Raw read vs prewarm (page cache dropped, then hot), interleaved; medians and the samples.

    ``stores`` maps a result prefix to ``WeightStore(staged=...)``; the first one is ``prewarm``.
    """
    from warmserve.worker.store import WeightStore

    files = weight_files(model_dir)
    samples: dict[str, list[float]] = {}
    built = {prefix: WeightStore({"0": arena}, staged=staged) for prefix, staged in stores.items()}
    nbytes = 0
    for rep in range(repeats):
        for cache in ("cold", "hot"):
            if cache == "cold":
                drop_cache(files)
            samples.setdefault(f"read_{cache}", []).append(raw_read_gbps(files))
            for prefix, store in built.items():
                if cache == "cold":
                    drop_cache(files)
                gbps, nbytes = prewarm_gbps(store, SERVED, model_dir)
                store.evict(shard(SERVED))
                samples.setdefault(f"{prefix}_{cache}", []).append(gbps)
        log(
            f"storage round {rep + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in samples.items()) + " GB/s"
        )
    med = {k: statistics.median(v) for k, v in samples.items()}
    out: dict[str, Any] = {"model_bytes": nbytes, "read_gbps": med["read_cold"], "read_hot_gbps": med["read_hot"]}
    for prefix in built:
        out[f"{prefix}_gbps"], out[f"{prefix}_hot_gbps"] = med[f"{prefix}_cold"], med[f"{prefix}_hot"]
    out["prewarm_vs_read"] = out["prewarm_gbps"] / out["read_gbps"]
    out["prewarm_vs_read_hot"] = out["prewarm_hot_gbps"] / out["read_hot_gbps"]
    out["storage_samples_gbps"] = samples
    return out


def measure_eviction(arena, small_dir: str, large_dir: str, repeats: int) -> dict[str, float]:
    """Median time to evict a warm replica of the small and of the large model (the other stays resident)."""
    from warmserve.worker.store import WeightStore

    store = WeightStore({"0": arena})
    small_ms, large_ms = [], []
    for _ in range(repeats):
        prewarm_gbps(store, "small", small_dir)
        prewarm_gbps(store, SERVED, large_dir)
        small_ms.append(store.evict(shard("small")) * 1e3)
        prewarm_gbps(store, "small", small_dir)
        large_ms.append(store.evict(shard(SERVED)) * 1e3)
        store.evict(shard("small"))
    out = {"evict_small_ms": statistics.median(small_ms), "evict_large_ms": statistics.median(large_ms)}
    out["evict_large_vs_small"] = out["evict_large_ms"] / out["evict_small_ms"]
    log(f"evict: small {out['evict_small_ms']:.3f} ms, large {out['evict_large_ms']:.3f} ms")
    return out


# -- engines ----------------------------------------------------------------------------
def _post(port: int, path: str, payload: dict, timeout: float) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", json.dumps(payload).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.load(resp)


def first_token(port: int, model: str = SERVED, timeout: float = 600) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    return _post(port, "/v1/completions", body, timeout)["choices"][0]["text"]


def greedy(port: int, model: str = SERVED) -> dict[str, Any]:
    """16 greedy tokens (``ignore_eos``): their ids, the text and ``usage.completion_tokens``."""
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": GREEDY_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 1,
        "return_tokens_as_token_ids": True,
    }
    data = _post(port, "/v1/completions", body, 300)
    choice = data["choices"][0]
    return {
        "token_ids": [int(t.rsplit(":", 1)[1]) for t in choice["logprobs"]["tokens"]],
        "text": choice["text"],
        "completion_tokens": data["usage"]["completion_tokens"],
    }


def group_memory(pgid: int) -> dict[str, int]:
    """RssAnon / RssShmem summed over a process group (the engine and its children)."""
    totals = {"rss_anon_bytes": 0, "rss_shmem_bytes": 0}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if int(fh.read().rsplit(")", 1)[1].split()[2]) != pgid:
                    continue
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("RssAnon:"):
                        totals["rss_anon_bytes"] += int(line.split()[1]) * 1024
                    elif line.startswith("RssShmem:"):
                        totals["rss_shmem_bytes"] += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return totals


def engine_memory(*pgids: int | None) -> dict[str, int]:
    """:func:`group_memory` summed over an engine's groups (API server, engine-core zygote)."""
    totals = {"rss_anon_bytes": 0, "rss_shmem_bytes": 0}
    for pgid in pgids:
        if pgid:
            for k, v in group_memory(pgid).items():
                totals[k] += v
    return totals


@dataclass
class Promotion:
    """One timed promotion: seconds to the first token, the greedy completion, the engine's memory."""

    variant: str
    seconds: float
    greedy: dict[str, Any]
    memory: dict[str, int]
    report: dict[str, Any] | None = None  # the warmserve loader's report, or the bind report (rank 0)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Setup:
    """What every promotion of a run shares: the model, vLLM flags and environment, a work directory."""

    model_dir: str
    work: str
    engine_args: list[str] = field(default_factory=lambda: list(ENGINE_ARGS))
    env: dict[str, str] = field(default_factory=lambda: dict(ENV))
    base_port: int = 18700
    timeout: float = 900.0


def _manager(setup: Setup, name: str):
    from warmserve.worker.engines import EngineManager, free_port

    return EngineManager(
        os.path.join(setup.work, name),
        pool_size=1,
        base_port=free_port(setup.base_port),
        engine_args=setup.engine_args,
        env=setup.env,
        refill=False,
    )


def _wait_shell(em, timeout: float) -> float | None:
    em.fill_pool()
    shell = em.shells[0]
    if not shell.ready.wait(timeout):
        raise RuntimeError(f"the pre-started shell did not finish its imports; see {shell.log_path}")
    return shell.import_s


def promote_cold(setup: Setup, rnd: int) -> Promotion:
    """A fresh vLLM API server over the files (page cache dropped first), launch to first token."""
    from warmserve.worker.engines import free_port, kill_group, model_ready

    port = free_port(setup.base_port)
    log_path = os.path.join(setup.work, f"cold-{rnd}.log")
    drop_cache(weight_files(setup.model_dir))
    t0 = time.perf_counter()
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.launchers.api_server.entry",
                "--model",
                setup.model_dir,
                "--served-model-name",
                SERVED,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *setup.engine_args,
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **setup.env},
        )
    try:
        deadline = time.monotonic() + setup.timeout
        while not model_ready("127.0.0.1", port, SERVED):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"cold engine exited or timed out; see {log_path}")
            time.sleep(0.1)
        first_token(port)
        elapsed = time.perf_counter() - t0
        return Promotion("cold", elapsed, greedy(port), group_memory(proc.pid))
    finally:
        kill_group(proc.pid)


def promote_shell(setup: Setup, rnd: int, manifest_path: str | None) -> Promotion:
    """A pre-started shell (imports done, untimed) handed its arguments: arena weights, or files from disk."""
    em = _manager(setup, f"shell-{rnd}-{'warm' if manifest_path else 'disk'}")
    try:
        import_s = _wait_shell(em, setup.timeout)
        report = os.path.join(em.dir, "load-report.json") if manifest_path else None
        if manifest_path is None:
            drop_cache(weight_files(setup.model_dir))
        key = shard(SERVED).replica
        t0 = time.perf_counter()
        rec = em.promote(key, SERVED, setup.model_dir, manifest_path, report_path=report, served_name=SERVED)
        em.wait_ready(key, setup.timeout)
        first_token(rec.port)
        elapsed = time.perf_counter() - t0
        memory = engine_memory(rec.pid, rec.core_pid)
        out = greedy(rec.port)
        load_report = None
        if report:
            with open(report) as fh:
                load_report = json.load(fh)
        variant = "shell_warm" if manifest_path else "shell_disk"
        return Promotion(variant, elapsed, out, memory, load_report, {"shell_import_s": import_s})
    finally:
        em.shutdown()


def promote_standby(setup: Setup, rnd: int, manifest_path: str) -> Promotion:
    """A ready standby engine (started and waited for, untimed) bound to the warm replica: bind to first token."""
    from warmserve.worker.engines import Shape

    em = _manager(setup, f"standby-{rnd}")
    shape = Shape(SERVED, setup.model_dir)
    try:
        import_s = _wait_shell(em, setup.timeout)
        t_start = time.perf_counter()
        deadline = time.monotonic() + setup.timeout
        while True:
            em.keep_standby({shape: 1})
            ready = [rec for s, rec in em.standby() if rec.ready]
            if ready:
                break
            if not em.standby() or time.monotonic() > deadline:
                raise RuntimeError(f"no standby engine became ready; see {em.dir}")
            time.sleep(0.2)
        standby_start_s = time.perf_counter() - t_start
        time.sleep(1.0)  # idle and ready: let the warm-up's transient allocations settle
        standby_memory = engine_memory(ready[0].pid, ready[0].core_pid)
        t0 = time.perf_counter()
        claimed = em.claim_standby(shape)
        assert claimed is not None
        rec = em.bind(shard(SERVED).replica, claimed, manifest_path, timeout=setup.timeout)
        first_token(rec.port)
        elapsed = time.perf_counter() - t0
        ranks = (rec.bind_report or {}).get("ranks")
        report = ranks[0] if isinstance(ranks, list) and ranks and isinstance(ranks[0], dict) else None
        memory = engine_memory(rec.pid, rec.core_pid)
        extra = {
            "standby_memory": standby_memory,
            "standby_start_s": standby_start_s,
            "bound_s": rec.bound_s,
            "shell_import_s": import_s,
        }
        return Promotion("warm", elapsed, greedy(rec.port), memory, report, extra)
    finally:
        em.shutdown()


def write_manifest(store, path: str) -> str:
    with open(path, "w") as fh:
        json.dump(store.manifest(shard(SERVED)), fh)
    return path


def p50_max(values: list[float]) -> dict[str, float]:
    return {"p50": statistics.median(values), "max": max(values)}


def measure_promotions(
    setup: Setup, manifest_path: str, repeats: int, variants: tuple[str, ...] = VARIANTS
) -> dict[str, Any]:
    """Every variant once per round, interleaved; p50/max per variant, speed-ups and greedy identity.

    The replica named SERVED must be warm in the arena ``manifest_path`` points at (and stay so).
    """
    runs: dict[str, list[Promotion]] = {v: [] for v in variants}
    for rnd in range(repeats):
        for variant in variants:
            log(f"round {rnd + 1}/{repeats}: {variant} ...")
            if variant == "cold":
                run = promote_cold(setup, rnd)
            elif variant == "shell_disk":
                run = promote_shell(setup, rnd, None)
            elif variant == "shell_warm":
                run = promote_shell(setup, rnd, manifest_path)
            else:
                run = promote_standby(setup, rnd, manifest_path)
            runs[variant].append(run)
            log(f"round {rnd + 1}/{repeats}: {variant} to first token {run.seconds:.2f} s")
    out: dict[str, Any] = {"promote_repeats": repeats, "promote_rounds_s": {}}
    for variant, done in runs.items():
        seconds = [r.seconds for r in done]
        stats = p50_max(seconds)
        out[KEYS[variant]] = stats["p50"]
        out[f"{KEYS[variant]}_max"] = stats["max"]
        out["promote_rounds_s"][variant] = seconds
        out.setdefault("engine_memory", {})[variant] = done[-1].memory
    if "cold" in runs:
        cold = out["promote_cold_s"]
        for variant, name in (("warm", "speedup_vs_cold"), ("shell_warm", "shell_warm_speedup_vs_cold")):
            if variant in runs:
                out[name] = cold / out[KEYS[variant]]
        if "shell_disk" in runs:
            out["shell_disk_speedup_vs_cold"] = cold / out["promote_shell_disk_s"]
        reference = runs["cold"][0].greedy
        out["greedy_reference"] = reference
        for variant, name in (
            ("warm", "greedy_identical"),
            ("shell_warm", "greedy_identical_shell_warm"),
            ("shell_disk", "greedy_identical_shell_disk"),
        ):
            if variant in runs:
                out[name] = all(
                    r.greedy["token_ids"] == reference["token_ids"]
                    and r.greedy["text"] == reference["text"]
                    and r.greedy["completion_tokens"] == reference["completion_tokens"] == GREEDY_TOKENS
                    for r in runs[variant] + runs["cold"]
                )
    if "warm" in runs:
        last = runs["warm"][-1]
        out["standby_memory"] = last.extra["standby_memory"]
        out["standby_start_s"] = last.extra["standby_start_s"]
        out["bound_s"] = [r.extra["bound_s"] for r in runs["warm"]]
        out["bind_report"] = last.report
    if "shell_warm" in runs:
        out["load_report"] = runs["shell_warm"][-1].report
        out["shell_import_s"] = runs["shell_warm"][-1].extra["shell_import_s"]
    return out


# -- verdict ----------------------------------------------------------------------------
def acceptance(results: Mapping[str, Any]) -> list[tuple[str, bool, str]]:
    """The issue's targets that the results cover: (name, passed, one-line detail)."""
    checks: list[tuple[str, bool, str]] = []
    if "promote_warm_s" in results:
        warm = results["promote_warm_s"]
        checks.append(("warm_first_token", warm <= WARM_TARGET_S, f"p50 {warm:.3f} s (target <= {WARM_TARGET_S} s)"))
    if "speedup_vs_cold" in results:
        x = results["speedup_vs_cold"]
        checks.append(("warm_vs_cold", x >= SPEEDUP_TARGET, f"{x:.1f}x faster than cold (target >= {SPEEDUP_TARGET}x)"))
    if "greedy_identical" in results:
        same = results["greedy_identical"] and results.get("greedy_identical_shell_warm", True)
        checks.append(("greedy_identical", bool(same), "standby-bound and shell-warm greedy token ids == cold's"))
    if "prewarm_vs_read" in results:
        r = results["prewarm_vs_read"]
        checks.append(("prewarm_vs_read", r >= PREWARM_TARGET, f"{r:.0%} of raw read (target >= {PREWARM_TARGET:.0%})"))
    if "evict_large_vs_small" in results:
        r = results["evict_large_vs_small"]
        checks.append(
            (
                "evict_flat",
                r <= EVICT_FLAT_RATIO or results["evict_large_ms"] - results["evict_small_ms"] <= EVICT_FLAT_MS,
                f"large/small eviction time {r:.2f}, {results['evict_large_ms']:.3f} ms vs "
                f"{results['evict_small_ms']:.3f} ms (flat: ratio <= {EVICT_FLAT_RATIO} or within {EVICT_FLAT_MS} ms)",
            )
        )
    return checks


def print_table(results: Mapping[str, Any], checks: list[tuple[str, bool, str]]) -> None:
    print()
    if "promote_rounds_s" in results:
        print(f"{'promotion to first token':<28}{'p50 s':>9}{'max s':>9}{'x cold':>8}   rounds")
        for variant in VARIANTS:
            key = KEYS[variant]
            if key not in results:
                continue
            x = results["promote_cold_s"] / results[key] if "promote_cold_s" in results else float("nan")
            rounds = ", ".join(f"{s:.2f}" for s in results["promote_rounds_s"][variant])
            print(f"{key:<28}{results[key]:>9.2f}{results[key + '_max']:>9.2f}{x:>8.1f}   {rounds}")
        print()
    print(f"{'metric':<30}{'value':>16}")
    for key, value in results.items():
        if isinstance(value, dict | list) or key.startswith("promote_") or key in ("acceptance",):
            continue
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{key:<30}{shown:>16}")
    if "standby_memory" in results:
        m = results["standby_memory"]
        print(
            f"{'standby_memory (idle, ready)':<30}{'anon ' + str(round(m['rss_anon_bytes'] / 2**20)) + ' MiB':>16}"
            f"  shmem {m['rss_shmem_bytes'] / 2**20:.0f} MiB"
        )
    for name, report in (("bind_report", results.get("bind_report")), ("load_report", results.get("load_report"))):
        if report:
            keys = ("mapped_params", "copied_params", "bind_s", "postprocess_s", "arena_views_after_postprocess")
            print(f"{name}: " + ", ".join(f"{k}={report.get(k)}" for k in keys))
    print()
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="write the results here")
    ap.add_argument("--model-dir", help="reuse a generated model directory (else generated into a temp dir)")
    ap.add_argument("--skip-vllm", action="store_true", help="only the storage and eviction figures")
    ap.add_argument("--quick", action="store_true", help="a tiny generated model, one round of everything (tests)")
    ap.add_argument("--evict-repeats", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="storage measurement rounds (medians)")
    ap.add_argument("--promote-repeats", type=int, default=3, help="promotion rounds (variants interleaved)")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.promote_repeats, args.evict_repeats = 1, 1, 2

    from devmodels import LARGE, make_llama

    from warmserve.worker.arena import Arena

    os.environ.update(ENV)
    tmp = tempfile.mkdtemp(prefix="warmserve-bench-")
    large_dir = args.model_dir or os.path.join(tmp, "large")
    shape: dict[str, int] = {"hidden": 256, "layers": 2, "heads": 4} if args.quick else LARGE
    if not os.path.exists(os.path.join(large_dir, "model.safetensors")):
        log(f"generating the {'quick' if args.quick else 'large'} model into {large_dir} ...")
        make_llama(large_dir, **shape, seed=11)
    small_dir = make_llama(os.path.join(tmp, "small"), seed=12)
    size = sum(os.path.getsize(f) for f in weight_files(large_dir))
    log(f"model: {size / 1e9:.3f} GB")

    results: dict[str, Any] = {"model_dir": large_dir, "quick": args.quick}
    shm = f"/dev/shm/warmserve-bench-{os.getpid()}"
    arena = Arena.host("0", shm, int(size * 1.05) + (64 << 20), page_size=2 << 20, adopt=False)
    try:
        results |= measure_storage(arena, large_dir, args.repeats, {"prewarm": False, "prewarm_staged": True})
        results |= measure_eviction(arena, small_dir, large_dir, args.evict_repeats)
        assert arena.usage().used == 0
        if not args.skip_vllm:
            from warmserve.worker.store import WeightStore

            store = WeightStore({"0": arena})
            prewarm_gbps(store, SERVED, large_dir)
            manifest = write_manifest(store, os.path.join(tmp, "manifest.json"))
            results |= measure_promotions(Setup(large_dir, tmp), manifest, args.promote_repeats)
    finally:
        arena.close()

    checks = acceptance(results)
    results["acceptance"] = {name: {"pass": ok, "detail": detail} for name, ok, detail in checks}
    with open(args.json, "w") as fh:
        json.dump(results, fh, indent=1)
    print_table(results, checks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
