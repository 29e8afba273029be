"""vLLM engine processes: a pool of pre-started shells, promotion, readiness, adoption.

Every engine is a process group started from :mod:`warmserve.worker.engine_shell`
(``start_new_session``), so stopping it kills vLLM's engine-core and worker
children too. Engines are keyed by an opaque string ``uid`` chosen by the caller:
the agent passes the replica id ``"<ModelDeployment uid>@<gpus>"``
(:func:`warmserve.worker.plan.replica_id`), so two engines of one model on
different GPUs of one worker are distinct. Each running engine is recorded in
``<state_dir>/engines/<uid>.json`` (pid, port, model); a restarted agent adopts live records whose process is
still an engine shell and deletes stale ones, so engines are never duplicated
or orphaned.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass

from warmserve.worker.engine_shell import READY_LINE
from warmserve.worker.files import write_json_atomic

SHELL_MODULE = "warmserve.worker.engine_shell"


@dataclass
class EngineRecord:
    uid: str
    model: str
    served_name: str
    port: int
    pid: int
    host: str = "127.0.0.1"
    started: float = 0.0
    ready: bool = False
    ready_s: float | None = None
    log: str = ""
    core_pid: int | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


class Shell:
    """One idle pre-started engine: an API-server shell, plus (``core=True``) an engine-core zygote.

    With the zygote, vLLM's spawn of the engine-core process is handed to a
    process that already imported vLLM (:mod:`warmserve.worker.core_zygote`),
    so neither half of the engine pays interpreter start-up at promotion.
    """

    def __init__(self, log_path: str, env: dict[str, str] | None = None, core: bool = False):
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the process
        env = {**os.environ, **(env or {})}
        self.core_proc: subprocess.Popen | None = None
        self.core_ready = threading.Event()
        if core:
            from warmserve.worker.core_zygote import write_client

            base = os.path.splitext(log_path)[0]
            sock = base + ".sock"
            env["WARMSERVE_CORE_CLIENT"] = write_client(base + "-client.py")
            env["WARMSERVE_CORE_SOCKET"] = sock
            self.core_proc = subprocess.Popen(
                [sys.executable, "-m", SHELL_MODULE, "--core", sock],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._log,
                start_new_session=True,
                env=env,
            )
            threading.Thread(target=self._wait_core, daemon=True).start()
        else:
            self.core_ready.set()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", SHELL_MODULE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            start_new_session=True,
            env=env,
        )
        self._front_ready = threading.Event()
        self.import_s: float | None = None
        threading.Thread(target=self._wait_ready, daemon=True).start()

    @property
    def ready(self) -> threading.Event:
        """Set once both halves finished their imports."""
        if self._front_ready.is_set() and self.core_ready.is_set():
            done = threading.Event()
            done.set()
            return done
        return _Both(self._front_ready, self.core_ready)

    def _wait_core(self) -> None:
        for raw in self.core_proc.stdout:
            if raw.decode(errors="replace").startswith(READY_LINE):
                self.core_ready.set()
                break
        for raw in self.core_proc.stdout:
            self._log.write(raw)

    def _wait_ready(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            if line.startswith(READY_LINE):
                self.import_s = float(line.split("import_s=")[1]) if "import_s=" in line else None
                self._front_ready.set()
                break
        # from now on vLLM's own stdout goes nowhere we read: drain it to the log
        for raw in self.proc.stdout:
            self._log.write(raw)

    def alive(self) -> bool:
        return self.proc.poll() is None and (self.core_proc is None or self.core_proc.poll() is None)

    def launch(self, argv: list[str], env: dict[str, str]) -> int:
        job = {"argv": argv, "env": env, "log": self.log_path}
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.flush()
        self.proc.stdin.close()
        return self.proc.pid

    def close(self) -> None:
        kill_group(self.proc.pid)
        if self.core_proc is not None:
            kill_group(self.core_proc.pid)
        self._log.close()


class _Both:
    """Minimal Event-like view over two events (``is_set``/``wait``)."""

    def __init__(self, a: threading.Event, b: threading.Event):
        self.a, self.b = a, b

    def is_set(self) -> bool:
        return self.a.is_set() and self.b.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for ev in (self.a, self.b):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not ev.wait(left):
                return False
        return True


def kill_group(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM a process group, then SIGKILL what is left after ``timeout``."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _group_alive(pid):
            break
        _reap(pid)
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    _reap(pid)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def is_engine_process(pid: int) -> bool:
    """True when ``pid`` is alive and is one of our engine shells (not a recycled pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return SHELL_MODULE.encode() in fh.read()
    except OSError:
        return False


def free_port(start: int) -> int:
    port = start
    while True:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                port += 1


def model_ready(host: str, port: int, served_name: str, timeout: float = 1.0) -> bool:
    """Model-aware readiness: ``/v1/models`` lists the served name."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/v1/models", timeout=timeout) as resp:
            data = json.load(resp)
        return any(m.get("id") == served_name for m in data.get("data", []))
    except (urllib.error.URLError, OSError, ValueError):
        return False


class EngineManager:
    """Starts, tracks, stops and adopts engines; keeps ``pool_size`` shells warm."""

    def __init__(
        self,
        state_dir: str,
        *,
        pool_size: int = 1,
        base_port: int = 18000,
        engine_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        refill: bool = True,
        core_zygote: bool = True,
        bind_host: str = "127.0.0.1",
        advertise_host: str | None = None,
    ):
        self.dir = os.path.join(state_dir, "engines")
        os.makedirs(self.dir, exist_ok=True)
        self.pool_size = pool_size
        self.base_port = base_port
        self.engine_args = engine_args or []
        self.env = env or {}
        self.refill = refill
        self.core_zygote = core_zygote
        self.bind_host = bind_host
        self.advertise_host = advertise_host or bind_host
        self.shells: list[Shell] = []
        self.engines: dict[str, EngineRecord] = {}
        self._procs: dict[str, Shell] = {}
        self._lock = threading.Lock()

    # -- shell pool ------------------------------------------------------------------
    def fill_pool(self) -> None:
        with self._lock:
            self.shells = [s for s in self.shells if s.alive()]
            while len(self.shells) < self.pool_size:
                log = os.path.join(self.dir, f"shell-{time.time_ns()}.log")
                self.shells.append(Shell(log, self.env, core=self.core_zygote))

    def _take_shell(self, timeout: float) -> Shell:
        self.fill_pool()
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                ready = [s for s in self.shells if s.ready.is_set() and s.alive()]
                if ready:
                    shell = ready[0]
                    self.shells.remove(shell)
                    return shell
                if time.monotonic() > deadline:
                    raise TimeoutError("no engine shell became ready")
                self._lock.release()
                time.sleep(0.05)
                self._lock.acquire()

    # -- engines ---------------------------------------------------------------------
    def promote(
        self,
        uid: str,
        model: str,
        model_dir: str,
        manifest_path: str | None,
        report_path: str | None = None,
        served_name: str | None = None,
        extra_args: list[str] | None = None,
        shell_timeout: float = 120.0,
    ) -> EngineRecord:
        """Hand a ready shell its arguments; returns at once (readiness is polled)."""
        if uid in self.engines:
            return self.engines[uid]
        served = served_name or model
        port = free_port(self.base_port)
        argv = [
            "--model",
            model_dir,
            "--served-model-name",
            served,
            "--host",
            self.bind_host,
            "--port",
            str(port),
            *self.engine_args,
            *(extra_args or []),
        ]
        if manifest_path:
            cfg = {"manifest": manifest_path, **({"report": report_path} if report_path else {})}
            argv += ["--load-format", "warmserve", "--model-loader-extra-config", json.dumps(cfg)]
        shell = self._take_shell(shell_timeout)
        pid = shell.launch(argv, {"HF_HUB_OFFLINE": "1", **self.env})
        rec = EngineRecord(
            uid=uid,
            model=model,
            served_name=served,
            port=port,
            pid=pid,
            host=self.advertise_host,
            started=time.time(),
            log=shell.log_path,
            core_pid=shell.core_proc.pid if shell.core_proc is not None else None,
        )
        self.engines[uid] = rec
        self._procs[uid] = shell
        self._save(rec)
        if self.refill:
            self.fill_pool()  # refill in the background for the next burst
        return rec

    def poll(self, uid: str) -> EngineRecord | None:
        rec = self.engines.get(uid)
        if rec is None:
            return None
        if not rec.ready and model_ready("127.0.0.1", rec.port, rec.served_name):
            rec.ready = True
            rec.ready_s = time.time() - rec.started
            self._save(rec)
        return rec

    def alive(self, uid: str) -> bool:
        rec = self.engines.get(uid)
        if rec is None:
            return False
        shell = self._procs.get(uid)
        if shell is not None:
            return shell.alive()
        return is_engine_process(rec.pid) and (rec.core_pid is None or is_engine_process(rec.core_pid))

    def wait_ready(self, uid: str, timeout: float) -> EngineRecord:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = self.poll(uid)
            if rec and rec.ready:
                return rec
            if not self.alive(uid):
                raise RuntimeError(f"engine {uid} exited; see {rec.log if rec else '?'}")
            time.sleep(0.1)
        raise TimeoutError(f"engine {uid} not ready after {timeout}s")

    def stop(self, uid: str) -> float:
        t0 = time.perf_counter()
        rec = self.engines.pop(uid, None)
        shell = self._procs.pop(uid, None)
        if rec is not None:
            if shell is not None:
                shell.close()
            else:
                for pid in (rec.pid, rec.core_pid):
                    if pid and is_engine_process(pid):
                        kill_group(pid)
        path = os.path.join(self.dir, f"{_safe(uid)}.json")
        if os.path.exists(path):
            os.unlink(path)
        return time.perf_counter() - t0

    def adopt(self) -> list[EngineRecord]:
        """Re-attach engines recorded by a previous agent; drop records of dead ones."""
        adopted = []
        for name in os.listdir(self.dir):
            if not name.endswith(".json"):
                continue
            path = os.path.join(self.dir, name)
            try:
                with open(path) as fh:
                    rec = EngineRecord(**json.load(fh))
            except (OSError, ValueError, TypeError):
                os.unlink(path)
                continue
            if is_engine_process(rec.pid):
                self.engines[rec.uid] = rec
                adopted.append(rec)
            else:
                os.unlink(path)
        return adopted

    def shutdown(self, stop_engines: bool = True) -> None:
        for shell in self.shells:
            shell.close()
        self.shells = []
        if stop_engines:
            for uid in list(self.engines):
                self.stop(uid)

    def _save(self, rec: EngineRecord) -> None:
        path = os.path.join(self.dir, f"{_safe(rec.uid)}.json")
        write_json_atomic(path, asdict(rec))


def _safe(uid: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in uid)
