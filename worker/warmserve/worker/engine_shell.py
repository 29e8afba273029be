"""A pre-started vLLM engine shell: imports done, waiting for its arguments.

``python -m warmserve.worker.engine_shell`` imports vLLM's OpenAI server stack
(torch, transformers, FastAPI, the engine) — ~10 s on a small CPU — then prints
``WARMSERVE-SHELL-READY`` and blocks on stdin. The agent keeps a few of these
idle; promoting a replica writes one JSON line ``{"argv": [...], "env": {...}}``
to a shell, which then runs vLLM's own API-server ``main()`` in-process. The
interpreter start-up and imports are therefore already paid when the burst
arrives, as in the original system's pre-spawned API servers.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

READY_LINE = "WARMSERVE-SHELL-READY"


def preload() -> float:
    """Import everything an API server needs before it knows its model."""
    t0 = time.perf_counter()
    import uvloop  # noqa: F401
    import vllm.entrypoints.launchers.api_server.entry  # noqa: F401
    from vllm.entrypoints.launchers.cli_args import make_arg_parser  # noqa: F401
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup  # noqa: F401
    from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401

    for optional in (
        "vllm.v1.worker.cpu_worker",
        "vllm.v1.executor.uniproc_executor",
        "vllm.model_executor.models.llama",
    ):
        with contextlib.suppress(Exception):  # platform-specific modules may be absent
            __import__(optional)
    from vllm.v1.engine.core import EngineCore  # noqa: F401

    try:
        from warmserve.worker.vllm_plugin import register

        register()
    except Exception as exc:  # keep the shell usable for plain loads
        print(f"warmserve: plugin preload failed: {exc}", file=sys.stderr)
    return time.perf_counter() - t0


def main() -> None:
    import threading

    from warmserve.worker.core_zygote import exit_with_parent, serve_one

    handed_over = threading.Event()
    exit_with_parent(handed_over)  # an orphaned shell stops importing and exits
    import_s = preload()
    if len(sys.argv) == 3 and sys.argv[1] == "--core":
        # engine-core zygote: becomes the process vLLM's API server spawns
        serve_one(sys.argv[2], f"{READY_LINE} import_s={import_s:.2f}", handed_over)
        return
    print(f"{READY_LINE} import_s={import_s:.2f}", flush=True)
    line = sys.stdin.readline()
    handed_over.set()
    if not line.strip():
        return  # the agent closed us without a job: exit quietly
    job = json.loads(line)
    os.environ.update({k: str(v) for k, v in job.get("env", {}).items()})
    # Detach from the agent's pipes: stdin from /dev/null, stdout/stderr to the
    # engine log, so the engine survives an agent restart (no EPIPE on logging).
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    if job.get("log"):
        log_fd = os.open(job["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
    if job.get("mode") == "generate":
        generate_once(job)
        return
    sys.argv = ["vllm-api-server", *job["argv"]]
    if os.environ.get("WARMSERVE_CORE_CLIENT"):
        from warmserve.worker.core_zygote import install_client

        install_client(os.environ["WARMSERVE_CORE_CLIENT"])
    from vllm.entrypoints.launchers.api_server.entry import main as serve_main

    serve_main()


def generate_once(job: dict) -> None:
    """Benchmark mode: build an in-process engine (``vllm.LLM``), decode greedily, report.

    With ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` the engine runs in this process, so
    the measurement isolates loading + engine init from vLLM's process start-up.
    """
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams

    llm = LLM(**job["llm"])
    t1 = time.perf_counter()
    out = llm.generate([job["prompt"]], SamplingParams(max_tokens=int(job.get("max_tokens", 1)), temperature=0))
    t2 = time.perf_counter()
    print(
        "WARMSERVE-RESULT " + json.dumps({"init_s": t1 - t0, "first_token_s": t2 - t0, "text": out[0].outputs[0].text}),
        flush=True,
    )


if __name__ == "__main__":
    main()
