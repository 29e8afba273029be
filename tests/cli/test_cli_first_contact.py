"""First contact: what a platform engineer sees when a `warmserve` command runs where it cannot work yet.

No cluster configured: `warmserve operator`, `router` and `worker` (Kubernetes mode) print one line and exit
with status 3 within seconds, without a traceback; the worker's file mode needs no cluster. `--help` names the
program as it is typed and shows every default. The worker's state directory defaults to a per-user one when
/var/run/warmserve is not writable. The simulator's progress is a live bar on a terminal and a line per
policy elsewhere.
"""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from warmserve import cliutil
from warmserve.cli import main
from warmserve.sim.report import ProgressBar
from warmserve.worker.devices import host_arena_prefix

NO_CLUSTER = "no Kubernetes cluster configured (no in-cluster service account, no kubeconfig at"
BOUND_S = 30.0  # generous: the machine running the suite may be busy


def bare_env(home: Path, **extra: str) -> dict[str, str]:
    """A login without Kubernetes: HOME in tmp, no KUBECONFIG, no KUBERNETES_SERVICE_HOST, no POD_* vars."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LC_ALL": "C.UTF-8"}
    if "PYTHONPATH" in os.environ:  # a source checkout run without installing
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env | extra


def run(args: list[str], env: dict[str, str], timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, cwd=env["HOME"])
    return result, time.monotonic() - started


def assert_one_line(result: subprocess.CompletedProcess[str], prefix: str, code: int) -> str:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix), lines[0]
    assert result.returncode == code, (result.returncode, result.stderr)
    return lines[0]


WARMSERVE = [sys.executable, "-m", "warmserve.cli"]


# ------------------------------------------------------------------------------------------ no cluster
@pytest.mark.parametrize(
    ("args", "program"),
    [
        ([*WARMSERVE, "operator"], "warmserve operator"),
        ([sys.executable, "-m", "warmserve.controller", "--log-format", "text"], "warmserve operator"),
        ([*WARMSERVE, "router"], "warmserve router"),
        ([*WARMSERVE, "worker", "--namespace", "ns", "--pod", "p"], "warmserve worker"),
    ],
    ids=["operator", "python-m-controller", "router", "worker"],
)
def test_without_a_cluster_one_line_and_exit_3(tmp_path, args, program):
    result, elapsed = run(args, bare_env(tmp_path))
    line = assert_one_line(result, f"{program}: {NO_CLUSTER}", cliutil.EXIT_NO_CLUSTER)
    assert "~/.kube/config" in line and "set KUBECONFIG" in line
    assert result.stdout == ""
    assert elapsed < BOUND_S, f"took {elapsed:.1f} s"


def test_worker_in_a_pod_env_without_a_cluster(tmp_path):
    """The downward-API variables alone select Kubernetes mode: the same one line."""
    result, _ = run([*WARMSERVE, "worker"], bare_env(tmp_path, POD_NAMESPACE="ns", POD_NAME="p"))
    assert_one_line(result, f"warmserve worker: {NO_CLUSTER}", cliutil.EXIT_NO_CLUSTER)


def test_worker_without_a_plan_source_says_what_it_needs(tmp_path):
    result, _ = run([*WARMSERVE, "worker"], bare_env(tmp_path))
    line = assert_one_line(result, "warmserve worker: need --plan-file", cliutil.EXIT_USAGE)
    assert "--namespace" in line and "POD_NAME" in line


def test_operator_names_a_missing_kubeconfig(tmp_path):
    missing = tmp_path / "nowhere" / "config"
    result, _ = run([*WARMSERVE, "operator"], bare_env(tmp_path, KUBECONFIG=str(missing)))
    line = assert_one_line(result, f"warmserve operator: {NO_CLUSTER}", cliutil.EXIT_NO_CLUSTER)
    assert f"{missing} ($KUBECONFIG)" in line


def test_operator_names_a_broken_kubeconfig(tmp_path):
    broken = tmp_path / "config"
    broken.write_text("apiVersion: v1\nkind: Config\n")  # no current-context, no cluster
    result, _ = run([*WARMSERVE, "operator"], bare_env(tmp_path, KUBECONFIG=str(broken)))
    line = assert_one_line(result, f"warmserve operator: cannot use the kubeconfig {broken}:", cliutil.EXIT_NO_CLUSTER)
    assert "current-context" in line


def test_operator_names_a_bad_environment_setting(tmp_path):
    result, _ = run([*WARMSERVE, "operator"], bare_env(tmp_path, WARMSERVE_METRICS_PORT="ninety"))
    line = assert_one_line(
        result, "warmserve operator: invalid setting (a flag or a WARMSERVE_* variable)", cliutil.EXIT_USAGE
    )
    assert "'ninety'" in line


def test_router_refuses_an_unknown_log_level_before_anything_else(tmp_path):
    result, _ = run([*WARMSERVE, "router"], bare_env(tmp_path, WARMSERVE_LOG_LEVEL="verbose"))
    assert result.returncode == cliutil.EXIT_USAGE and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].endswith("must be one of debug, info, warning, error, got 'verbose'")


def write_kubeconfig(path: Path, server: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: here\n"
        f"clusters: [{{name: c, cluster: {{server: '{server}', insecure-skip-tls-verify: true}}}}]\n"
        "users: [{name: u, user: {token: not-a-real-token}}]\n"
        "contexts: [{name: here, context: {cluster: c, user: u}}]\n"
    )


def test_operator_with_a_kubeconfig_logs_in_through_kopf(tmp_path):
    """With ~/.kube/config the check passes and kopf's login handler (the kubernetes client's loading) logs in;
    the API server is unreachable here, so kopf retries until it is stopped."""
    write_kubeconfig(tmp_path / ".kube" / "config", "https://127.0.0.1:9")
    args = [*WARMSERVE, "operator", "--log-format", "text", "--metrics-port", "0", "--liveness-port", "0"]
    process = subprocess.Popen(
        args, env=bare_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen: list[str] = []
    try:
        deadline = time.monotonic() + BOUND_S
        assert process.stdout is not None
        while time.monotonic() < deadline and not any("Initial authentication has finished" in s for s in seen):
            ready, _, _ = select.select([process.stdout], [], [], 1.0)
            if ready:
                line = process.stdout.readline()
                if not line:
                    break
                seen.append(line)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    text = "".join(seen)
    assert "Activity 'login_via_client' succeeded" in text, text
    assert "Initial authentication has finished" in text, text
    assert "Ran out of valid credentials" not in text and NO_CLUSTER not in text


def test_router_on_a_taken_port_is_one_line(tmp_path):
    import socket

    write_kubeconfig(tmp_path / ".kube" / "config", "https://127.0.0.1:9")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result, elapsed = run([*WARMSERVE, "router", "--host", "127.0.0.1", "--port", str(port)], bare_env(tmp_path))
    line = assert_one_line(result, f"warmserve router: cannot listen on 127.0.0.1:{port}:", cliutil.EXIT_FAILED)
    assert "in use" in line and elapsed < BOUND_S


def test_operator_on_a_taken_liveness_port_is_one_line(tmp_path):
    import socket

    write_kubeconfig(tmp_path / ".kube" / "config", "https://127.0.0.1:9")
    with socket.create_server(("0.0.0.0", 0)) as taken:
        port = taken.getsockname()[1]
        args = [*WARMSERVE, "operator", "--liveness-port", str(port), "--metrics-port", "0"]
        result, elapsed = run(args, bare_env(tmp_path))
    line = assert_one_line(result, f"warmserve operator: cannot listen on --liveness-port {port}", cliutil.EXIT_FAILED)
    assert "in use" in line and result.stdout == "" and elapsed < BOUND_S


def test_cluster_problem_in_a_pod_without_its_token(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    if os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token"):
        pytest.skip("this machine is a pod with a service account token")
    problem = cliutil.cluster_problem()
    assert problem is not None and problem.startswith("in a pod, but its service account cannot be used")
    assert "automountServiceAccountToken" in problem


def test_cluster_problem_none_with_a_kubeconfig(monkeypatch, tmp_path):
    config = tmp_path / "kc"
    write_kubeconfig(config, "https://127.0.0.1:9")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'absent'}{os.pathsep}{config}")  # a path list, as kubectl
    assert cliutil.cluster_problem() is None


def test_worker_file_mode_needs_no_cluster(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text('{"generation": 1, "groups": []}')
    state_dir = tmp_path / f"state-{os.getpid()}"
    args = [*WARMSERVE, "worker", "--plan-file", str(plan), "--state-dir", str(state_dir), "--device", "cpu"]
    args += ["--arena-bytes", str(4 << 20), "--http-port", "0", "--once", "--log-level", "warning"]
    try:
        result, _ = run(args, bare_env(tmp_path))
    finally:  # host arenas outlive the worker by design: remove this one
        for leftover in Path("/dev/shm").glob(f"{host_arena_prefix(str(state_dir))}*"):
            leftover.unlink()
    assert result.returncode == 0, result.stderr
    assert '"observedGeneration": 1' in result.stdout and (state_dir / "state.json").exists()


# ------------------------------------------------------------------------------------------ the state dir
def test_state_dir_default_for_root_and_a_writable_system_dir(monkeypatch, tmp_path):
    from warmserve.worker.__main__ import SYSTEM_STATE_DIR, default_state_dir

    assert SYSTEM_STATE_DIR == "/var/run/warmserve"
    assert default_state_dir({}, euid=0) == SYSTEM_STATE_DIR
    monkeypatch.setattr("warmserve.worker.__main__.SYSTEM_STATE_DIR", str(tmp_path))  # e.g. a pod's volume
    assert default_state_dir({"XDG_RUNTIME_DIR": "/run/user/1000"}, euid=1000) == str(tmp_path)


def test_state_dir_default_without_root(monkeypatch, tmp_path):
    from warmserve.worker.__main__ import default_state_dir

    monkeypatch.setattr("warmserve.worker.__main__.SYSTEM_STATE_DIR", str(tmp_path / "absent"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir({"XDG_RUNTIME_DIR": "/run/user/1000"}, euid=1000) == "/run/user/1000/warmserve"
    assert default_state_dir({"XDG_CACHE_HOME": "/c"}, euid=1000) == "/c/warmserve"
    assert default_state_dir({}, euid=1000) == str(tmp_path / "home" / ".cache" / "warmserve")


@pytest.mark.parametrize("gpus", [0, 2])
def test_pods_still_get_the_system_state_dir(gpus):
    """The operator passes --state-dir explicitly, so what the worker pods run does not depend on the default."""
    from warmserve.controller.builders import STATE_DIR, worker_args
    from warmserve.controller.spec import parse_pool_spec
    from warmserve.worker.__main__ import SYSTEM_STATE_DIR, parse_args

    args = worker_args(parse_pool_spec({"gpu": {"count": gpus, "memoryMiB": 1024}}))
    assert STATE_DIR == SYSTEM_STATE_DIR
    assert args[args.index("--state-dir") + 1] == SYSTEM_STATE_DIR
    assert parse_args(args).state_dir == SYSTEM_STATE_DIR


def test_unusable_state_dir_is_one_line_naming_the_flag(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    plan = tmp_path / "plan.json"
    plan.write_text('{"generation": 1, "groups": []}')
    args = [*WARMSERVE, "worker", "--plan-file", str(plan), "--state-dir", str(blocker / "state"), "--once"]
    result, _ = run(args, bare_env(tmp_path))
    line = assert_one_line(result, "warmserve worker: cannot create --state-dir", cliutil.EXIT_USAGE)
    assert str(blocker / "state") in line


def test_unusable_shm_dir_is_one_line_naming_the_flag(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text('{"generation": 1, "groups": []}')
    args = [*WARMSERVE, "worker", "--plan-file", str(plan), "--state-dir", str(tmp_path / "state"), "--once"]
    args += ["--device", "cpu", "--arena-bytes", str(4 << 20), "--shm-dir", str(tmp_path / "no-such-dir")]
    result, _ = run(args, bare_env(tmp_path))
    line = assert_one_line(result, "warmserve worker: cannot create the arenas in --shm-dir", cliutil.EXIT_USAGE)
    assert str(tmp_path / "no-such-dir") in line


def test_worker_on_a_taken_http_port_is_one_line(tmp_path):
    import socket

    plan = tmp_path / "plan.json"
    plan.write_text('{"generation": 1, "groups": []}')
    state_dir = tmp_path / f"state-{os.getpid()}"
    with socket.create_server(("0.0.0.0", 0)) as taken:
        port = taken.getsockname()[1]
        args = [*WARMSERVE, "worker", "--plan-file", str(plan), "--state-dir", str(state_dir), "--device", "cpu"]
        args += ["--arena-bytes", str(4 << 20), "--http-port", str(port), "--log-level", "warning"]
        try:
            result, elapsed = run(args, bare_env(tmp_path))
        finally:
            for leftover in Path("/dev/shm").glob(f"{host_arena_prefix(str(state_dir))}*"):
                leftover.unlink()
    line = assert_one_line(result, "warmserve worker: cannot listen on --http-host 0.0.0.0", cliutil.EXIT_FAILED)
    assert f"--http-port {port}" in line and "in use" in line and elapsed < BOUND_S


# ------------------------------------------------------------------------------------------ --help
def help_text(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def option_blocks(text: str) -> dict[str, str]:
    """Each option of a help text with its help, joined onto one line."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^  (-[-\w]+)(.*)$", line)
        if match:
            current = match.group(1)
            blocks[current] = match.group(2)
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return {name: " ".join(body.split()) for name, body in blocks.items()}


# options whose value has no default: it is a choice to make (a file to read or write, a mode to select)
NO_DEFAULT = {"--plan-file", "--file", "-f", "--json", "--plot", "--help", "-h"}


@pytest.mark.parametrize("command", ["operator", "worker", "router", "up", "simulate"])
def test_help_names_the_program_and_every_default(command, capsys):
    text = help_text(command, capsys)
    assert text.startswith(f"usage: warmserve {command} "), text[:80]
    assert "python -m" not in text.split("\n", 1)[0]
    blocks = option_blocks(text)
    assert len(blocks) > 5, blocks
    for option, body in blocks.items():
        takes_value = bool(re.match(r"^[ ,]*[A-Z{]", body)) or body.startswith(" {")
        if option in NO_DEFAULT or not takes_value:
            continue
        assert "default" in body or "env " in body, f"{command} {option}: {body}"


def test_help_shows_the_worker_and_operator_defaults_and_env(capsys):
    operator = " ".join(help_text("operator", capsys).split())
    for shown in ("WARMSERVE_METRICS_PORT (default: 9090)", "WARMSERVE_LIVENESS_PORT (default: 8080)"):
        assert shown in operator
    for env in (
        "WARMSERVE_NAMESPACES",
        "WARMSERVE_PEERING",
        "WARMSERVE_PRIORITY",
        "WARMSERVE_LOG_FORMAT",
        "WARMSERVE_LOG_LEVEL",
        "WARMSERVE_LOOP",
        "WARMSERVE_PVC_ROOT",
        "WARMSERVE_SCRAPE_TIMEOUT_SECONDS",
        "WARMSERVE_POST_EVENTS",
        "WARMSERVE_ROUTER_URL",
        "WARMSERVE_WORKER_SERVICE_ACCOUNTS",
        "WARMSERVE_HOST_PATH_ROOTS",
        "WARMSERVE_ALLOW_SYSTEM_PRIORITY_CLASSES",
        "WARMSERVE_PROMETHEUS_HOSTS",
        "WARMSERVE_ENGINE_ARGS_ALLOWED",
        "WARMSERVE_HISTORY_BUDGET_BYTES",
    ):
        assert env in operator, env
    worker = " ".join(help_text("worker", capsys).split())
    for shown in ("(default: /dev/shm)", "(default: 9400)", "env POD_NAMESPACE", "$WARMSERVE_LOG_LEVEL or info"):
        assert shown in worker, shown
    router = " ".join(help_text("router", capsys).split())
    assert "(default: 1024-65535)" in router and "env WARMSERVE_LOG_LEVEL" in router


def test_help_of_python_m_controller_is_the_operators(tmp_path):
    result, _ = run([sys.executable, "-m", "warmserve.controller", "--help"], bare_env(tmp_path))
    assert result.returncode == 0 and result.stdout.startswith("usage: warmserve operator "), result.stdout[:200]
    assert "python -m warmserve.controller" in result.stdout  # the description says both ways to run it


def test_help_formatter_leaves_explicit_defaults_and_flags_alone():
    import argparse

    p = argparse.ArgumentParser(prog="x", formatter_class=cliutil.HelpFormatter)
    p.add_argument("--a", default=3, help="a number")
    p.add_argument("--b", default=None, help="worked out later (default: the table's)")
    p.add_argument("--c", action="store_true", help="a flag")
    p.add_argument("--d", default="", help="empty")
    p.add_argument("--e", default=7)
    text = " ".join(p.format_help().split())
    assert "a number (default: 3)" in text
    assert "(default: the table's)" in text and "(default: None)" not in text
    assert "a flag (default" not in text
    assert 'empty (default: "")' in text
    assert "--e E (default: 7)" in text
    assert p.parse_args([]).e == 7  # the parser's own action is not changed by formatting


def test_simulate_seeds_label_each_run_with_its_seed(capsys):
    assert main(["simulate", "--policies", "warmserve", "--hours", "0.05", "--seeds", "2"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("100%")[0].rstrip() for line in lines] == ["warmserve seed 0", "warmserve seed 1"], lines


# ------------------------------------------------------------------------------------------ progress
class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def drive(bar: ProgressBar, clock: FakeClock, seconds: float, steps: int = 1000) -> None:
    for i in range(steps + 1):
        clock.now = seconds * i / steps
        bar(i / steps)


def test_progress_off_a_terminal_is_one_line_for_a_quick_run():
    stream, clock = io.StringIO(), FakeClock()
    drive(ProgressBar("warmserve", stream, clock=clock), clock, seconds=3.0)
    assert stream.getvalue().splitlines() == [f"{'warmserve':<24} 100%  done in 3.0 s"]
    assert "\r" not in stream.getvalue()


def test_progress_off_a_terminal_is_periodic_with_an_eta():
    stream, clock = io.StringIO(), FakeClock()
    drive(ProgressBar("sleep-wake", stream, clock=clock, interval=10.0), clock, seconds=45.0)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5, lines  # at 10, 20, 30 and 40 s, and the end
    assert re.fullmatch(r"sleep-wake +22%  10\.0 s elapsed, ETA 35\.\d s", lines[0]), lines[0]
    assert lines[-1].endswith("100%  done in 45.0 s")
    assert all("[" not in line for line in lines)  # no bar in a log


def test_progress_on_a_terminal_is_a_live_bar(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    stream, clock = Terminal(), FakeClock()
    drive(ProgressBar("warmserve", stream, clock=clock), clock, seconds=20.0)
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # redrawn in place, one line left at the end
    frames = text.rstrip("\n").split("\r")[1:]
    assert 100 <= len(frames) <= 200, len(frames)  # a redraw per percent (and twice a second for the clock)
    assert all(len(frame) <= 119 for frame in frames)  # fits the terminal
    assert "[###############...............]  50%  10.0 s elapsed, ETA 10.0 s" in text
    assert frames[-1].rstrip().endswith("[##############################] 100%  done in 20.0 s")


def test_progress_on_a_narrow_terminal_drops_the_bar(monkeypatch):
    monkeypatch.setenv("COLUMNS", "70")
    stream, clock = Terminal(), FakeClock()
    drive(ProgressBar("warmserve", stream, clock=clock), clock, seconds=20.0, steps=10)
    frames = stream.getvalue().rstrip("\n").split("\r")[1:]
    assert frames and all(len(frame) <= 69 for frame in frames) and "[" not in stream.getvalue()
    assert frames[-1].rstrip() == f"{'warmserve':<24} 100%  done in 20.0 s"


SIMULATE = [*WARMSERVE, "simulate", "--policies", "warmserve,reactive-cold", "--hours", "0.1"]


def test_simulate_progress_through_a_pipe_is_a_line_per_policy(tmp_path):
    result, _ = run(SIMULATE, bare_env(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    # one line per finished policy; a policy running 10 s or more (a loaded machine) adds periodic lines first
    done = [line for line in lines if " 100%  done in " in line]
    assert [line.split()[0] for line in done] == ["warmserve", "reactive-cold"], result.stderr
    assert all(line.split()[0] in ("warmserve", "reactive-cold") for line in lines) and "\r" not in result.stderr


def test_simulate_progress_on_a_terminal_is_a_live_bar(tmp_path):
    """stderr on a pseudo-terminal of 110 columns (stdout too: the table is read from it); no $COLUMNS, so the
    bar is fitted to the terminal's own size."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: size its terminal, then exec at once
        fcntl.ioctl(2, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 110, 0, 0))
        os.chdir(tmp_path)
        os.execve(sys.executable, SIMULATE, bare_env(tmp_path))
    output = b""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    else:  # the deadline passed: do not wait forever for a stuck child
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    text = output.decode()
    assert os.waitstatus_to_exitcode(status) == 0, text[-2000:]
    assert "\rwarmserve" in text and "\rreactive-cold" in text
    assert "[##############################] 100%  done in" in text
    frames = [
        frame for line in text.split("\r\n") for frame in line.split("\r") if " elapsed" in frame or "done in" in frame
    ]
    assert frames and all(len(frame) <= 109 for frame in frames), max(frames, key=len)
    assert "TTFT p50" in text  # the table follows on stdout
