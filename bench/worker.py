"""Worker benchmark: prewarm vs raw read bandwidth, warm vs cold promotion, eviction latency.

    python bench/worker.py --json worker-bench.json [--model-dir DIR] [--skip-vllm]

* ``read_gbps``: raw sequential read of the model's safetensors files into a
  reused 16 MiB buffer. ``prewarm_gbps``: the weight store loading the same
  files into a shared-memory arena. **Page cache:** before every measured read
  the files are dropped from the page cache with ``posix_fadvise(DONTNEED)``
  (the files are clean, so this works without root), so both figures are
  storage reads; the hot-cache figures (no drop) are reported beside them as
  ``*_hot_gbps``.
* ``promote_cold_s``: a fresh process runs vLLM's OpenAI server over the files
  (default loader, page cache dropped first) until the first token of a
  1-token completion. ``promote_warm_s``: the replica is already in the arena
  and a pre-started engine shell is idle; the clock runs from handing the shell
  its arguments (``--load-format warmserve``) to the first token. Same vLLM
  flags in both.
* ``evict_small_ms`` / ``evict_large_ms``: time to evict a warm replica of the
  tiny and the large model (median of several).
* ``model_bytes``: tensor bytes of the large model (≥ 1 GB).

The ≥ 1 GB model is generated locally (random bf16 weights, never committed).
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

if __package__ in (None, ""):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "worker"))

ENGINE_ARGS = ["--dtype", "bfloat16", "--max-model-len", "256", "--enforce-eager", "--max-num-seqs", "4"]
# One engine-core process without a separate worker process (vLLM keeps the
# "uni" executor on CPU when multiprocessing is off); same setting cold and warm.
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
PROMPT = "the quick brown fox"


COLD_MEMORY: dict[str, int] = {}
WARM_MEMORY: dict[str, int] = {}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


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


def first_token(port: int, model: str, timeout: float = 600) -> str:
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.load(resp)["choices"][0]["text"]


def greedy(port: int, model: str) -> str:
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.load(resp)["choices"][0]["text"]


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


def inproc(model_dir: str, llm_kwargs: dict, warm: bool) -> dict:
    """In-process engine (``vllm.LLM``) in an engine shell: warm = shell pre-started, clock at the job."""
    job = {
        "mode": "generate",
        "prompt": PROMPT,
        "max_tokens": 1,
        "llm": {
            "model": model_dir,
            "served_model_name": "large",
            "dtype": "bfloat16",
            "max_model_len": 256,
            "enforce_eager": True,
            "max_num_seqs": 4,
            **llm_kwargs,
        },
    }
    if not warm:
        drop_cache(weight_files(model_dir))
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "warmserve.worker.engine_shell"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **ENV},
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stdin is not None  # both are pipes
    try:
        line = proc.stdout.readline().decode()
        if not line.startswith("WARMSERVE-SHELL-READY"):
            raise RuntimeError(f"shell failed: {line!r}")
        if warm:
            t0 = time.perf_counter()  # the burst arrives after the shell is ready
        proc.stdin.write((json.dumps(job) + "\n").encode())
        proc.stdin.flush()
        for raw in proc.stdout:
            text = raw.decode(errors="replace")
            if text.startswith("WARMSERVE-RESULT "):
                result = json.loads(text[len("WARMSERVE-RESULT ") :])
                result["wall_s"] = time.perf_counter() - t0
                return result
        raise RuntimeError("in-process engine exited without a result")
    finally:
        from warmserve.worker.engines import kill_group

        kill_group(proc.pid)


def cold_start(model_dir: str, port: int, log_path: str) -> tuple[float, str]:
    from warmserve.worker.engines import kill_group, model_ready

    drop_cache(weight_files(model_dir))
    t0 = time.perf_counter()
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.launchers.api_server.entry",
                "--model",
                model_dir,
                "--served-model-name",
                "large",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *ENGINE_ARGS,
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **ENV},
        )
    try:
        while not model_ready("127.0.0.1", port, "large"):
            if proc.poll() is not None:
                raise RuntimeError(f"cold engine exited; see {log_path}")
            time.sleep(0.1)
        first_token(port, "large")
        elapsed = time.perf_counter() - t0
        COLD_MEMORY.update(group_memory(proc.pid))
        return elapsed, greedy(port, "large")
    finally:
        kill_group(proc.pid)


def warm_start(store, model_dir: str, work: str, port: int) -> tuple[float, str, dict, float | None]:
    from warmserve.worker.engines import EngineManager

    manifest = os.path.join(work, "manifest.json")
    report = os.path.join(work, "load-report.json")
    with open(manifest, "w") as fh:
        json.dump(store.manifest(shard("large")), fh)
    em = EngineManager(
        os.path.join(work, "warm"), pool_size=1, base_port=port, engine_args=ENGINE_ARGS, env=ENV, refill=False
    )
    em.fill_pool()
    shell = em.shells[0]
    log("waiting for the pre-started shell to finish its imports (not timed: done before the burst)")
    if not shell.ready.wait(300):
        raise RuntimeError("shell did not become ready")
    try:
        t0 = time.perf_counter()
        key = shard("large").replica
        rec = em.promote(key, "large", model_dir, manifest, report_path=report, served_name="large")
        em.wait_ready(key, 600)
        first_token(rec.port, "large")
        elapsed = time.perf_counter() - t0
        for pgid in (rec.pid, rec.core_pid):  # API server group + engine-core zygote group
            if pgid:
                for k, v in group_memory(pgid).items():
                    WARM_MEMORY[k] = WARM_MEMORY.get(k, 0) + v
        text = greedy(rec.port, "large")
        with open(report) as fh:
            load_report = json.load(fh)
        return elapsed, text, load_report, shell.import_s
    finally:
        em.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="write the results here")
    ap.add_argument("--model-dir", help="reuse a generated large model directory (else a temp dir)")
    ap.add_argument("--skip-vllm", action="store_true", help="only the storage and eviction figures")
    ap.add_argument("--evict-repeats", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="storage measurement rounds (medians)")
    args = ap.parse_args()

    from devmodels import LARGE, make_llama

    from warmserve.worker.arena import Arena
    from warmserve.worker.store import WeightStore

    os.environ.update(ENV)
    tmp = tempfile.mkdtemp(prefix="warmserve-bench-")
    large_dir = args.model_dir or os.path.join(tmp, "large")
    if not os.path.exists(os.path.join(large_dir, "model.safetensors")):
        log(f"generating the large model into {large_dir} ...")
        make_llama(large_dir, **LARGE, seed=11)
    small_dir = make_llama(os.path.join(tmp, "small"), seed=12)
    files = weight_files(large_dir)
    size = sum(os.path.getsize(f) for f in files)
    log(f"large model: {size / 1e9:.3f} GB in {len(files)} file(s)")

    results: dict = {}
    shm = f"/dev/shm/warmserve-bench-{os.getpid()}"
    arena = Arena.host("0", shm, int(size * 1.05) + (64 << 20), page_size=2 << 20, adopt=False)
    try:
        # Interleave raw reads and prewarms, cold (page cache dropped) and hot, and take
        # medians: the disk here is a shared VM volume whose speed drifts.
        samples: dict[str, list[float]] = {}
        direct, staged = WeightStore({"0": arena}, staged=False), WeightStore({"0": arena}, staged=True)
        for rep in range(args.repeats):
            for cache in ("cold", "hot"):
                if cache == "cold":
                    drop_cache(files)
                samples.setdefault(f"read_{cache}", []).append(raw_read_gbps(files))
                for key, store in (("prewarm", direct), ("prewarm_staged", staged)):
                    if cache == "cold":
                        drop_cache(files)
                    gbps, nbytes = prewarm_gbps(store, "large", large_dir)
                    store.evict(shard("large"))
                    samples.setdefault(f"{key}_{cache}", []).append(gbps)
            log(
                f"storage round {rep + 1}/{args.repeats}: "
                + ", ".join(f"{k} {v[-1]:.2f}" for k, v in samples.items())
                + " GB/s"
            )
        med = {k: statistics.median(v) for k, v in samples.items()}
        results["read_gbps"], results["read_hot_gbps"] = med["read_cold"], med["read_hot"]
        results["prewarm_gbps"], results["prewarm_hot_gbps"] = med["prewarm_cold"], med["prewarm_hot"]
        results["prewarm_staged_gbps"] = med["prewarm_staged_cold"]
        results["prewarm_staged_hot_gbps"] = med["prewarm_staged_hot"]
        results["storage_samples_gbps"] = samples
        results["model_bytes"] = nbytes
        results["prewarm_vs_read"] = results["prewarm_gbps"] / results["read_gbps"]
        results["prewarm_vs_read_hot"] = results["prewarm_hot_gbps"] / results["read_hot_gbps"]

        store = WeightStore({"0": arena})
        small_ms, large_ms = [], []
        for _ in range(args.evict_repeats):
            # same arena contents around each timed eviction (the other model stays resident)
            prewarm_gbps(store, "small", small_dir)
            prewarm_gbps(store, "large", large_dir)
            small_ms.append(store.evict(shard("small")) * 1e3)
            prewarm_gbps(store, "small", small_dir)
            large_ms.append(store.evict(shard("large")) * 1e3)
            store.evict(shard("small"))
        results["evict_small_ms"] = statistics.median(small_ms)
        results["evict_large_ms"] = statistics.median(large_ms)
        assert arena.usage().used == 0
        log(f"evict: small {results['evict_small_ms']:.3f} ms, large {results['evict_large_ms']:.3f} ms")

        if not args.skip_vllm:
            prewarm_gbps(store, "large", large_dir)
            log("cold start: fresh vLLM process, weights from disk ...")
            results["promote_cold_s"], cold_text = cold_start(large_dir, 18700, os.path.join(tmp, "cold.log"))
            log(f"cold start to first token: {results['promote_cold_s']:.1f} s")
            log("warm promotion from the arena ...")
            warm_s, warm_text, report, import_s = warm_start(store, large_dir, tmp, 18800)
            results["promote_warm_s"] = warm_s
            results["shell_import_s"] = import_s
            results["promote_speedup"] = results["promote_cold_s"] / warm_s
            results["greedy_identical"] = warm_text == cold_text
            results["load_report"] = report
            log(f"warm promotion to first token: {warm_s:.1f} s (x{results['promote_speedup']:.2f})")
            results["engine_memory_cold"], results["engine_memory_warm"] = dict(COLD_MEMORY), dict(WARM_MEMORY)
            log("in-process engine (vllm.LLM, no API server, no spawned engine process): cold ...")
            cold_ip = inproc(large_dir, {}, warm=False)
            manifest = os.path.join(tmp, "manifest.json")
            log("in-process engine: warm (pre-started shell, weights mapped from the arena) ...")
            warm_ip = inproc(
                large_dir, {"load_format": "warmserve", "model_loader_extra_config": {"manifest": manifest}}, warm=True
            )
            results["inproc_cold_s"], results["inproc_warm_s"] = cold_ip["wall_s"], warm_ip["wall_s"]
            results["inproc_speedup"] = cold_ip["wall_s"] / warm_ip["wall_s"]
            results["inproc_greedy_identical"] = cold_ip["text"] == warm_ip["text"]
            log(
                f"in-process: cold {cold_ip['wall_s']:.1f} s, warm {warm_ip['wall_s']:.1f} s "
                f"(x{results['inproc_speedup']:.2f})"
            )
    finally:
        arena.close()

    with open(args.json, "w") as fh:
        json.dump(results, fh, indent=1)
    print()
    print(f"{'metric':<28}{'value':>14}")
    for key, value in results.items():
        if isinstance(value, dict):
            continue
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{key:<28}{shown:>14}")
    if "load_report" in results:
        r = results["load_report"]
        print(
            f"\nvLLM post-load processing on the promoted engine: {r['postprocess_s']:.2f} s, "
            f"RssAnon +{r['postprocess_rss_anon_growth_bytes'] / 2**20:.0f} MiB, arena views "
            f"{r['arena_views_before_postprocess']} -> {r['arena_views_after_postprocess']} params"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
