"""vLLM engine processes: a pool of pre-started shells, promotion, readiness, adoption.

Every engine is a process group started from :mod:`warmserve.worker.engine_shell`
(``start_new_session``), so stopping it kills vLLM's engine-core and worker
children too. Engines are keyed by the :class:`~warmserve.protocol.ReplicaKey` of
the replica they serve, so two engines of one model on different GPUs of one worker
are distinct. Each running engine is recorded in ``<state_dir>/engines/<replica id>.json``
(the string form of the key, made file-safe; pid, port, model); a restarted agent
adopts live records whose process is still an engine shell and deletes stale ones, so
engines are never duplicated or orphaned.

Promotion comes in two steps so that a caller can wait for a shell without holding
anything else: :meth:`EngineManager.acquire_shell` (may wait until a pre-started shell
has finished its imports) and :meth:`EngineManager.launch` (hands it its arguments;
returns at once). :meth:`EngineManager.promote` does both.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any, Protocol

from warmserve.protocol import ReplicaKey
from warmserve.worker.engine_shell import READY_LINE
from warmserve.worker.files import safe_name, write_json_atomic
from warmserve.worker.vllm_control import BIND_PATH, RELEASE_PATH, TOKEN_ENV  # stdlib-only: one set of names

SHELL_MODULE = "warmserve.worker.engine_shell"
#: vLLM extension points every engine is started with (see vllm_extension / vllm_control): they make any
#: engine bindable to a warm replica and add nothing to its request path.
EXTENSION_CLS = "warmserve.worker.vllm_extension.WarmServeWorkerExtension"
CONTROL_MIDDLEWARE = "warmserve.worker.vllm_control.ControlMiddleware"
log = logging.getLogger(__name__)


class NoShellError(TimeoutError):
    """No pre-started engine shell became ready in time (or the manager was shut down)."""


@dataclass
class EngineRecord:
    """One engine process as recorded on disk (``uid`` is the replica's string form, ``ReplicaKey.id``)."""

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
    standby: str = ""  # the Shape.id of a pre-initialised engine not yet bound to a replica
    bound_s: float | None = None  # a standby engine bound to this replica: seconds the bind took
    bind_report: dict[str, Any] | None = None  # what each rank reported about the bind
    released: bool = False  # a standby engine dropped the kernels built from its scratch weights

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


def placement(
    on_gpu: bool, gpus: Sequence[int], node_env: Mapping[str, str], cpus: Sequence[int]
) -> tuple[list[str], dict[str, str]]:
    """The vLLM arguments and environment that put an engine on its replica's devices, rank ``r`` on ``gpus[r]``.

    On GPUs the engine sees exactly its group, in rank order (``CUDA_VISIBLE_DEVICES`` in PCI bus order, the
    order NVML numbers the devices the arenas are named after), so its rank ``r`` runs on local device ``r`` and
    opens the IPC handle of the arena that holds its shard there. A ``tp > 1`` engine runs one process per rank
    (``mp`` backend); on a CPU node each rank gets its share of the CPUs this worker may use
    (``VLLM_CPU_OMP_THREADS_BIND``; vLLM's automatic binding wants one NUMA node per rank), unless the node's own
    engine environment sets it.
    """
    tp = len(gpus)
    args = [] if tp == 1 else ["--tensor-parallel-size", str(tp), "--distributed-executor-backend", "mp"]
    if on_gpu:
        return args, {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus)}
    if tp == 1 or "VLLM_CPU_OMP_THREADS_BIND" in node_env:
        return args, {}
    ordered = sorted(cpus)
    if len(ordered) < tp:  # fewer CPUs than ranks: they take turns on them
        groups = [[ordered[rank % len(ordered)]] for rank in range(tp)]
    else:
        size, extra = divmod(len(ordered), tp)
        starts = [rank * size + min(rank, extra) for rank in range(tp + 1)]
        groups = [ordered[starts[rank] : starts[rank + 1]] for rank in range(tp)]
    return args, {"VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(str(c) for c in group) for group in groups)}


#: Memory of a GPU that an engine must not plan for although the worker's arena leaves it free: the CUDA
#: contexts of the worker (it holds one on every GPU, for the arena) and of the engine, and allocator slack.
#: A margin chosen, not measured here (no GPU); an engine that needs more fails at start with vLLM's message.
ENGINE_RESERVE_BYTES = 2 << 30


def gpu_memory_utilization(
    devices: Sequence[tuple[int, int]], weights: Sequence[int], reserve: int = ENGINE_RESERVE_BYTES
) -> float:
    """vLLM's ``--gpu-memory-utilization`` for an engine whose rank ``r`` runs on a GPU with ``devices[r]`` =
    (total bytes, bytes of the worker's arena there) and maps ``weights[r]`` bytes of its weights from that arena
    (0 for a standby engine, which binds them later).

    vLLM requires ``utilization x total - external weights`` to be free when it starts (``request_memory``; the
    external weights are what the loader's ``get_external_weight_memory`` reports) and sizes its KV cache within
    that budget. The arena holds most of each GPU, so vLLM's default (0.92) can never pass: an engine's budget
    is what the arena leaves, less ``reserve``. Every rank gets the one value that fits all of them (rounded
    down). A GPU that leaves no budget is a ``ValueError`` naming it.
    """
    fractions = []
    for rank, ((total, arena), held) in enumerate(zip(devices, weights, strict=True)):
        if total - arena - reserve <= 0:
            raise ValueError(
                f"the GPU of rank {rank} has {total - arena} B outside the worker's arena, not more than the "
                f"{reserve} B an engine leaves for CUDA contexts: lower the worker's --memory-fraction"
            )
        fractions.append((held + total - arena - reserve) / total)
    utilization = int(min(fractions) * 10_000) / 10_000
    for rank, ((total, _), held) in enumerate(zip(devices, weights, strict=True)):
        if utilization * total <= held:
            raise ValueError(
                f"the GPUs of this engine differ too much: rank {rank}'s {held} B of weights leave it no budget"
            )
    return utilization


@dataclass(frozen=True)
class Shape:
    """What a pre-initialised engine is built for: one model's files, its engine arguments and environment.

    A standby engine of a shape serves that model (its served name is fixed at start) once it is bound to any
    warm replica of the model whose placement gives the same environment (on GPUs: the same device); one shape
    per model and device group is the first granularity.
    """

    model: str
    model_dir: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    #: on GPUs, the devices it runs on (a promotion there that cannot bind it stops it: one engine per GPU's
    #: budget); empty on a CPU node, where one standby engine serves any replica of the model
    gpus: tuple[int, ...] = ()

    @property
    def id(self) -> str:
        text = json.dumps([self.model, self.model_dir, list(self.args), [list(kv) for kv in self.env]])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class BindError(RuntimeError):
    """A standby engine could not be bound (it is stopped; the caller falls back to a fresh engine)."""


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
        self.core_proc: subprocess.Popen[bytes] | None = None
        self._sock_dir: str | None = None
        self.core_ready = threading.Event()
        if core:
            from warmserve.worker.core_zygote import write_client

            base = os.path.splitext(log_path)[0]
            # a Unix socket path is limited to ~107 bytes: beside a deep state directory it would not fit
            self._sock_dir = tempfile.mkdtemp(prefix="ws-core-")
            sock = os.path.join(self._sock_dir, "core.sock")
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
            threading.Thread(target=self._wait_core, args=(_pipe(self.core_proc.stdout),), daemon=True).start()
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
        threading.Thread(target=self._wait_ready, args=(_pipe(self.proc.stdout),), daemon=True).start()

    @property
    def ready(self) -> _Both:
        """Set once both halves finished their imports (``is_set()`` / ``wait(timeout)``)."""
        return _Both(self._front_ready, self.core_ready)

    def _wait_core(self, out: IO[bytes]) -> None:
        for raw in out:
            if raw.decode(errors="replace").startswith(READY_LINE):
                self.core_ready.set()
                break
        for raw in out:
            self._log.write(raw)

    def _wait_ready(self, out: IO[bytes]) -> None:
        for raw in out:
            line = raw.decode(errors="replace")
            if line.startswith(READY_LINE):
                self.import_s = float(line.split("import_s=")[1]) if "import_s=" in line else None
                self._front_ready.set()
                break
        # from now on vLLM's own stdout goes nowhere we read: drain it to the log
        for raw in out:
            self._log.write(raw)

    def alive(self) -> bool:
        return self.proc.poll() is None and (self.core_proc is None or self.core_proc.poll() is None)

    def launch(self, argv: list[str], env: dict[str, str]) -> int:
        """Hand the shell its job (one JSON line on stdin); raises OSError if the shell died."""
        job = {"argv": argv, "env": env, "log": self.log_path}
        stdin = _pipe(self.proc.stdin)
        stdin.write((json.dumps(job) + "\n").encode())
        stdin.flush()
        stdin.close()
        return self.proc.pid

    def close(self) -> None:
        kill_group(self.proc.pid)
        if self.core_proc is not None:
            kill_group(self.core_proc.pid)
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
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


def _pipe(stream: IO[bytes] | None) -> IO[bytes]:
    if stream is None:  # every pipe of a shell is created with subprocess.PIPE
        raise OSError("engine shell pipe is not open")
    return stream


def _detail(exc: BaseException) -> str:
    """An engine's error answer (its body, shortened) or the exception itself."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.read().decode(errors="replace")[:300]
    return str(exc)


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


def free_port(start: int, taken: Collection[int] = ()) -> int:
    """The first port from `start` that no engine of ours was given (`taken`) and that binds now.

    An engine binds its port seconds after its launch, so "binds now" alone would hand the same port to two
    engines launched close together; the ports of our own engines are skipped explicitly.
    """
    port = start
    while True:
        if port not in taken:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                    return port
                except OSError:
                    pass
        port += 1


def model_ready(host: str, port: int, served_name: str, timeout: float = 1.0) -> bool:
    """Model-aware readiness: ``/v1/models`` lists the served name."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/v1/models", timeout=timeout) as resp:
            data = json.load(resp)
        return any(m.get("id") == served_name for m in data.get("data", []))
    except (urllib.error.URLError, OSError, ValueError):
        return False


class Engines(Protocol):
    """What the agent needs from an engine manager (:class:`EngineManager`; tests pass fakes)."""

    env: dict[str, str]  # the engines' environment on this node (on top of the worker's own)

    def running(self) -> dict[ReplicaKey, EngineRecord]: ...

    def poll(self, key: ReplicaKey) -> EngineRecord | None: ...

    def alive(self, key: ReplicaKey) -> bool: ...

    def acquire_shell(self, timeout: float) -> Any: ...

    def release_shell(self, shell: Any) -> None: ...

    def launch(
        self,
        key: ReplicaKey,
        shell: Any,
        model: str,
        model_dir: str,
        manifest_path: str | None,
        report_path: str | None = None,
        served_name: str | None = None,
        extra_args: list[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> EngineRecord: ...

    def stop(self, key: ReplicaKey) -> float: ...

    def standby(self) -> list[tuple[Shape, EngineRecord]]: ...

    def keep_standby(self, wanted: dict[Shape, int], start: bool = True) -> None: ...

    def claim_standby(self, shape: Shape) -> EngineRecord | None: ...

    def bind(
        self, key: ReplicaKey, standby: EngineRecord, manifest_path: str, timeout: float = 60.0
    ) -> EngineRecord: ...

    def adopt(self) -> list[EngineRecord]: ...

    def shutdown(self, stop_engines: bool = True) -> None: ...


class EngineManager:
    """Starts, tracks, stops and adopts engines; keeps ``pool_size`` shells warm.

    Thread-safe: a caller may wait in :meth:`acquire_shell` on one thread while another launches, polls or
    stops engines (the agent waits for shells and stops engines off its reconcile thread).
    """

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
        self._engines: dict[ReplicaKey, EngineRecord] = {}
        self._procs: dict[ReplicaKey, Shell] = {}
        # pre-initialised engines not yet bound, by shape; the token lets only this manager bind them
        self._standby: dict[Shape, list[tuple[EngineRecord, Shell]]] = {}
        self._claimed: dict[int, tuple[EngineRecord, Shell]] = {}  # taken for a bind, by pid
        self._releasing: set[int] = set()  # standby engines (by pid) whose release is in flight
        self._failed_standby: set[Shape] = set()  # shapes whose standby engine exited before it was ready
        self.token = secrets.token_hex(16)
        self._lock = threading.Lock()  # the shell pool
        self._records = threading.Lock()  # _engines and _procs
        self._closed = False

    # -- shell pool ------------------------------------------------------------------
    def fill_pool(self) -> None:
        with self._lock:
            if self._closed:
                return
            self.shells = [s for s in self.shells if s.alive()]
            while len(self.shells) < self.pool_size:
                log_path = os.path.join(self.dir, f"shell-{time.time_ns()}.log")
                self.shells.append(Shell(log_path, self.env, core=self.core_zygote))
                log.debug("pre-started engine shell (log %s)", log_path)

    def acquire_shell(self, timeout: float) -> Shell:
        """Take an idle shell whose imports are done, waiting up to ``timeout`` s (0: only look).

        Raises :class:`NoShellError` when none became ready in time or the manager is shut down. The caller
        owns the shell: it must :meth:`launch` it or hand it back with :meth:`release_shell`.
        """
        self.fill_pool()
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._closed:
                    raise NoShellError("the engine manager is shut down")
                ready = [s for s in self.shells if s.ready.is_set() and s.alive()]
                if ready:
                    self.shells.remove(ready[0])
                    return ready[0]
            if time.monotonic() >= deadline:
                raise NoShellError("no engine shell became ready")
            time.sleep(0.05)

    def release_shell(self, shell: Shell) -> None:
        """Give back a shell taken with :meth:`acquire_shell` and not launched (closed after a shutdown)."""
        with self._lock:
            if not self._closed and shell.alive():
                self.shells.insert(0, shell)
                return
        shell.close()

    # -- engines ---------------------------------------------------------------------
    def running(self) -> dict[ReplicaKey, EngineRecord]:
        """The engines this manager started or adopted and has not stopped (a snapshot)."""
        with self._records:
            return dict(self._engines)

    def launch(
        self,
        key: ReplicaKey,
        shell: Shell,
        model: str,
        model_dir: str,
        manifest_path: str | None,
        report_path: str | None = None,
        served_name: str | None = None,
        extra_args: list[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> EngineRecord:
        """Hand an acquired shell its arguments (and ``env`` on top of the node's); returns at once.

        Readiness is polled.

        Raises OSError when the shell died meanwhile (the shell is closed then).
        """
        with self._records:
            existing = self._engines.get(key)
        if existing is not None:
            self.release_shell(shell)
            return existing
        rec = self._start(shell, key.id, model, model_dir, manifest_path, report_path, served_name, extra_args, env)
        with self._records:
            self._engines[key] = rec
            self._procs[key] = shell
        self._save(rec)
        if self.refill:
            self.fill_pool()  # refill in the background for the next burst
        return rec

    def _start(
        self,
        shell: Shell,
        uid: str,
        model: str,
        model_dir: str,
        manifest_path: str | None,
        report_path: str | None,
        served_name: str | None,
        extra_args: list[str] | None,
        env: Mapping[str, str] | None = None,
    ) -> EngineRecord:
        served = served_name or model
        with self._records:
            taken = {rec.port for rec in self._engines.values()}
            taken |= {rec.port for engines in self._standby.values() for rec, _ in engines}
            port = free_port(self.base_port, taken)
        argv = [
            "--model",
            model_dir,
            "--served-model-name",
            served,
            "--host",
            self.bind_host,
            "--port",
            str(port),
            "--worker-extension-cls",
            EXTENSION_CLS,
            "--middleware",
            CONTROL_MIDDLEWARE,
            *self.engine_args,
            *(extra_args or []),
        ]
        if manifest_path:
            cfg = {"manifest": manifest_path, **({"report": report_path} if report_path else {})}
            argv += ["--load-format", "warmserve", "--model-loader-extra-config", json.dumps(cfg)]
        try:
            pid = shell.launch(argv, {"HF_HUB_OFFLINE": "1", **self.env, **(env or {}), TOKEN_ENV: self.token})
        except OSError:
            shell.close()
            raise
        return EngineRecord(
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

    # -- pre-initialised (standby) engines ------------------------------------------------
    def standby(self) -> list[tuple[Shape, EngineRecord]]:
        """The pre-initialised engines not yet bound (a snapshot; ``ready`` is refreshed by keep_standby)."""
        with self._records:
            return [(shape, rec) for shape, engines in self._standby.items() for rec, _ in engines]

    def keep_standby(self, wanted: dict[Shape, int], start: bool = True) -> None:
        """Hold ``wanted[shape]`` pre-initialised engines per shape and stop the others; never waits.

        A missing engine is started (unless ``start`` is false) only from an idle shell whose imports are done
        (else a later call starts it); a standby engine that died is dropped, and a shape whose standby engine
        died before it was ready gets no more (promotions of it start fresh engines, which report the error).
        """
        drop: list[tuple[EngineRecord, Shell]] = []
        with self._records:
            for shape in list(self._standby):
                engines = [(r, sh) for r, sh in self._standby[shape] if sh.alive()]
                dead = [(r, sh) for r, sh in self._standby[shape] if not sh.alive()]
                for rec, _ in dead:
                    if not rec.ready:
                        self._failed_standby.add(shape)
                        log.error("the standby engine of %s exited while starting (log: %s)", shape.model, rec.log)
                drop += dead
                keep = wanted.get(shape, 0)
                drop += engines[keep:]
                self._standby[shape] = engines[:keep]
                if not self._standby[shape]:
                    del self._standby[shape]
        for rec, shell in drop:
            self._close_standby(rec, shell)
        for shape, count in wanted.items() if start else ():
            while shape not in self._failed_standby and len(self._standby.get(shape, [])) < count:
                try:
                    shell = self.acquire_shell(0.0)
                except NoShellError:
                    break
                try:
                    self._start_standby(shape, shell)
                except OSError:
                    log.warning("a pre-started shell died before it became a standby engine of %s", shape.model)
        for _, rec in self.standby():
            if not rec.ready and rec.pid not in self._releasing and model_ready("127.0.0.1", rec.port, rec.served_name):
                self._releasing.add(rec.pid)  # the caller may hold a lock: the release runs on its own thread
                threading.Thread(target=self._release, args=(rec,), name=f"release-{rec.pid}", daemon=True).start()

    def _release(self, rec: EngineRecord) -> None:
        """An initialised standby engine drops what it built from its scratch weights, then counts as ready."""
        try:
            self._control(rec, RELEASE_PATH, {}, 60.0)
            rec.released = True
        except (OSError, ValueError) as exc:
            log.warning("standby engine of %s kept its scratch kernels: %s", rec.model, _detail(exc))
        rec.ready, rec.ready_s = True, time.time() - rec.started
        if any(rec is r for _, r in self.standby()):  # not stopped meanwhile: its record stays current
            self._save_standby(rec)
        self._releasing.discard(rec.pid)

    def _start_standby(self, shape: Shape, shell: Shell) -> None:
        manifest = os.path.join(self.dir, f"standby-{shape.id}.json")
        write_json_atomic(manifest, {"standby": True, "model": shape.model})
        rec = self._start(
            shell, "", shape.model, shape.model_dir, manifest, None, shape.model, list(shape.args), dict(shape.env)
        )
        rec.standby = shape.id
        with self._records:
            self._standby.setdefault(shape, []).append((rec, shell))
        self._save_standby(rec)
        log.info("standby engine of %s starting: pid %d, port %d", shape.model, rec.pid, rec.port)
        if self.refill:
            self.fill_pool()

    def claim_standby(self, shape: Shape) -> EngineRecord | None:
        """Take a ready standby engine of ``shape`` out of the pool for :meth:`bind` (None if there is none).

        A claimed engine is no longer the pool's: :meth:`keep_standby` neither counts nor stops it.
        """
        with self._records:
            engines = self._standby.get(shape, [])
            ready = [(r, sh) for r, sh in engines if r.ready and sh.alive()]
            if not ready:
                return None
            engines.remove(ready[0])
            self._claimed[ready[0][0].pid] = ready[0]
            return ready[0][0]

    def bind(self, key: ReplicaKey, standby: EngineRecord, manifest_path: str, timeout: float = 60.0) -> EngineRecord:
        """Bind a claimed standby engine to the warm replica ``key`` (whose manifest is given).

        On success the engine is ``key``'s and already serving. Raises :class:`LookupError` when ``standby`` is
        not claimed (or the manager shut it down), :class:`BindError` when the bind failed (it is stopped).
        """
        with self._records:
            claimed = self._claimed.pop(standby.pid, None)
            if claimed is None or key in self._engines:
                if claimed is not None:
                    self._claimed[standby.pid] = claimed
                raise LookupError(f"standby engine {standby.pid} of {standby.model} is not claimed")
            rec, shell = claimed
        t0 = time.perf_counter()
        try:
            rec.bind_report = self._control(rec, BIND_PATH, {"manifest": manifest_path}, timeout)
        except (OSError, ValueError) as exc:  # URLError/HTTPError are OSErrors
            self._close_standby(rec, shell)
            raise BindError(f"binding the standby engine of {rec.model} failed: {_detail(exc)}") from None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._standby_path(rec))
        rec.uid, rec.standby, rec.ready = key.id, "", True
        rec.bound_s = rec.ready_s = time.perf_counter() - t0
        with self._records:
            self._engines[key] = rec
            self._procs[key] = shell
        self._save(rec)
        return rec

    def _control(self, rec: EngineRecord, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        """POST to an engine's control path (loopback, with this manager's token); the engine's JSON answer."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{rec.port}{path}",
            json.dumps(body).encode(),
            {"content-type": "application/json", "x-warmserve-token": self.token},
        )
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            answer: dict[str, Any] = json.load(resp)
        return answer

    def _close_standby(self, rec: EngineRecord, shell: Shell) -> None:
        shell.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._standby_path(rec))

    def _standby_path(self, rec: EngineRecord) -> str:
        return os.path.join(self.dir, f"standby-{rec.pid}.rec")

    def _save_standby(self, rec: EngineRecord) -> None:
        write_json_atomic(self._standby_path(rec), asdict(rec))

    def promote(
        self,
        key: ReplicaKey,
        model: str,
        model_dir: str,
        manifest_path: str | None,
        report_path: str | None = None,
        served_name: str | None = None,
        extra_args: list[str] | None = None,
        shell_timeout: float = 120.0,
    ) -> EngineRecord:
        """:meth:`acquire_shell` then :meth:`launch` (blocks while no shell is ready)."""
        existing = self.running().get(key)
        if existing is not None:
            return existing
        shell = self.acquire_shell(shell_timeout)
        return self.launch(key, shell, model, model_dir, manifest_path, report_path, served_name, extra_args)

    def poll(self, key: ReplicaKey) -> EngineRecord | None:
        rec = self.running().get(key)
        if rec is None:
            return None
        if not rec.ready and model_ready("127.0.0.1", rec.port, rec.served_name):
            rec.ready = True
            rec.ready_s = time.time() - rec.started
            self._save(rec)
        return rec

    def alive(self, key: ReplicaKey) -> bool:
        with self._records:
            rec, shell = self._engines.get(key), self._procs.get(key)
        if rec is None:
            return False
        if shell is not None:
            return shell.alive()
        return is_engine_process(rec.pid) and (rec.core_pid is None or is_engine_process(rec.core_pid))

    def wait_ready(self, key: ReplicaKey, timeout: float) -> EngineRecord:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = self.poll(key)
            if rec and rec.ready:
                return rec
            if not self.alive(key):
                raise RuntimeError(f"engine {key} exited; see {rec.log if rec else '?'}")
            time.sleep(0.1)
        raise TimeoutError(f"engine {key} not ready after {timeout}s")

    def stop(self, key: ReplicaKey) -> float:
        """Stop an engine and wait for its processes to exit (up to ~15 s); returns the seconds it took."""
        t0 = time.perf_counter()
        with self._records:
            rec = self._engines.pop(key, None)
            shell = self._procs.pop(key, None)
        if rec is None:
            return time.perf_counter() - t0
        if shell is not None:
            shell.close()
        else:
            for pid in (rec.pid, rec.core_pid):
                if pid and is_engine_process(pid):
                    kill_group(pid)
        path = self._path(rec)
        if os.path.exists(path):
            os.unlink(path)
        return time.perf_counter() - t0

    def adopt(self) -> list[EngineRecord]:
        """Re-attach engines recorded by a previous agent; drop records of dead ones.

        A record is keyed by its replica id; one that is not a replica id (an older worker's) is keyed by its
        name with no GPUs, so it is reported and stopped like any engine the plan does not serve.
        """
        adopted = []
        for name in os.listdir(self.dir):
            if name.startswith("standby-") and name.endswith(".rec"):
                self._stop_orphan_standby(os.path.join(self.dir, name))
                continue
            if not name.endswith(".json") or name.startswith("standby-"):
                continue
            path = os.path.join(self.dir, name)
            try:
                with open(path) as fh:
                    rec = EngineRecord(**json.load(fh))
            except (OSError, ValueError, TypeError):
                os.unlink(path)
                continue
            if is_engine_process(rec.pid):
                key = ReplicaKey.parse(rec.uid) or ReplicaKey(rec.uid, ())
                with self._records:
                    self._engines[key] = rec
                adopted.append(rec)
            else:
                os.unlink(path)
        return adopted

    def _stop_orphan_standby(self, path: str) -> None:
        """A previous agent's standby engine: it answers that agent's token only, so it is stopped."""
        try:
            with open(path) as fh:
                rec = EngineRecord(**json.load(fh))
            for pid in (rec.pid, rec.core_pid):
                if pid and is_engine_process(pid):
                    kill_group(pid)
        except (OSError, ValueError, TypeError):
            pass
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def shutdown(self, stop_engines: bool = True) -> None:
        """Close the idle shells and the standby engines (and stop every engine when ``stop_engines``)."""
        with self._lock:
            self._closed = True
            shells, self.shells = self.shells, []
        for shell in shells:
            shell.close()
        self.keep_standby({})
        with self._records:
            claimed, self._claimed = list(self._claimed.values()), {}
        for rec, shell in claimed:
            self._close_standby(rec, shell)
        if stop_engines:
            for key in self.running():
                self.stop(key)

    def _path(self, rec: EngineRecord) -> str:
        return os.path.join(self.dir, f"{safe_name(rec.uid)}.json")

    def _save(self, rec: EngineRecord) -> None:
        write_json_atomic(self._path(rec), asdict(rec))
