"""`warmserve up`'s YAML: valid files, an error naming the document and the field for each bad one, the CRDs it
checks against, and the command's exit on a bad file (one line, exit code 2, no traceback)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from warmserve.local.config import LOCAL_POOL, NAMESPACE, ConfigError, load

REPO = Path(__file__).resolve().parents[2]
MODEL = """\
apiVersion: warmserve.io/v1alpha1
kind: ModelDeployment
metadata:
  name: {name}
spec:
  model:
    source: file:///models/{name}
"""
POOL = """\
apiVersion: warmserve.io/v1alpha1
kind: WarmPool
metadata:
  name: {name}
spec:
  gpu:
    count: 0
    memoryMiB: 2048
"""


def write(tmp_path: Path, *docs: str) -> str:
    path = tmp_path / "models.yaml"
    path.write_text("---\n".join(textwrap.dedent(d) for d in docs))
    return str(path)


def model(name: str, **extra: str) -> str:
    """A ModelDeployment document; `extra` maps a dotted spec path to a YAML value ("model.dtype": "float32")."""
    text = MODEL.format(name=name)
    for path, value in extra.items():
        parts = path.split(".")
        if parts[0] == "model":
            text += f"    {parts[1]}: {value}\n"
        elif len(parts) == 1:
            text += f"  {parts[0]}: {value}\n"
        else:
            text += f"  {parts[0]}:\n    {parts[1]}: {value}\n"
    return text


# ------------------------------------------------------------------------------------------ valid files
def test_models_without_a_pool_go_to_the_default_local_pool(tmp_path):
    config = load(write(tmp_path, model("alpha"), model("beta", **{"model.servedName": "b"})))
    assert config.pool["metadata"]["name"] == LOCAL_POOL
    assert config.pool["spec"]["gpu"]["count"] == 0  # the CPU
    assert [m["metadata"]["name"] for m in config.models] == ["alpha", "beta"]
    assert {m["spec"]["poolRef"]["name"] for m in config.models} == {LOCAL_POOL}
    assert {m["metadata"]["namespace"] for m in config.models} == {NAMESPACE}
    uids = [m["metadata"]["uid"] for m in config.models]
    assert len(set(uids)) == 2 and all(uids)
    assert uids == [m["metadata"]["uid"] for m in load(write(tmp_path, model("alpha"), model("beta"))).models]


def test_the_files_pool_is_used_with_or_without_poolref(tmp_path):
    config = load(write(tmp_path, POOL.format(name="cpu"), model("alpha"), model("beta", **{"poolRef.name": "cpu"})))
    assert config.pool["metadata"]["name"] == "cpu" and config.pool["metadata"]["uid"]
    assert config.pool["spec"]["gpu"]["memoryMiB"] == 2048
    assert [m["spec"]["poolRef"]["name"] for m in config.models] == ["cpu", "cpu"]


def test_empty_documents_are_skipped(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("---\n" + MODEL.format(name="alpha") + "---\n---\n")
    assert [m["metadata"]["name"] for m in load(str(path)).models] == ["alpha"]


# ------------------------------------------------------------------------------------------ errors
ERRORS = [
    # (name, documents, substrings the message must contain: the document and the field)
    ("unknown kind", [MODEL.format(name="a").replace("ModelDeployment", "Deployment")], ["document 1", "kind"]),
    (
        "wrong apiVersion",
        [MODEL.format(name="a"), MODEL.format(name="b").replace("v1alpha1", "v1")],
        ["document 2", "apiVersion", "warmserve.io/v1alpha1"],
    ),
    (
        "missing metadata.name",
        [MODEL.format(name="a").replace("  name: a\n", "  labels: {}\n")],
        ["document 1", "metadata.name"],
    ),
    (
        "tensorParallelSize 3",
        [model("a", **{"model.tensorParallelSize": "3"})],
        ["ModelDeployment a", "spec.model.tensorParallelSize"],
    ),
    (
        "tensorParallelSize 0",
        [model("a", **{"model.tensorParallelSize": "0"})],
        ["ModelDeployment a", "spec.model.tensorParallelSize"],
    ),
    (
        "a string where an int is",
        [model("a", **{"engine.maxConcurrency": "many"})],
        ["ModelDeployment a", "spec.engine.maxConcurrency", "'many'"],
    ),
    (
        "bad source scheme",
        [model("a").replace("file:///models/a", "s3://bucket/a")],
        ["ModelDeployment a", "spec.model.source"],
    ),
    (
        "unknown field",
        [model("a", **{"model.quantization": "awq"})],
        ["ModelDeployment a", "spec.model", "quantization"],
    ),
    (
        "min above max replicas",
        [model("a", **{"scaling.minReplicas": "5"})],
        ["ModelDeployment a", "spec.scaling.minReplicas"],
    ),
    (
        "pool gpu count 3",
        [POOL.format(name="p").replace("count: 0", "count: 3"), model("a")],
        ["WarmPool p", "spec.gpu.count"],
    ),
    (
        "poolRef to a missing pool",
        [POOL.format(name="cpu"), model("a", **{"poolRef.name": "gpu"})],
        ["ModelDeployment a", "spec.poolRef.name", "'gpu'"],
    ),
    (
        "poolRef to a missing pool without a pool",
        [model("a", **{"poolRef.name": "gpu"})],
        ["ModelDeployment a", "spec.poolRef.name", "'gpu'"],
    ),
    ("two pools", [POOL.format(name="p"), POOL.format(name="q"), model("a")], ["WarmPool q", "one WarmPool", "p"]),
    ("duplicate names", [model("a"), model("a")], ["ModelDeployment a", "metadata.name", "twice"]),
    (
        "same served name",
        [model("a", **{"model.servedName": "llm"}), model("b", **{"model.servedName": "llm"})],
        ["ModelDeployment b", "spec.model.servedName", "'llm'", "ModelDeployment a"],
    ),
    (
        "served name equal to another's default",
        [model("a"), model("b", **{"model.servedName": "a"})],
        ["ModelDeployment b", "spec.model.servedName", "'a'"],
    ),
    (
        "a '..' in the source",
        [model("a").replace("/models/a", "/models/../etc")],
        ["ModelDeployment a", "spec.model.source", ".."],
    ),
    (
        "a toleration without a key",
        [POOL.format(name="p") + "  tolerations:\n  - operator: Exists\n", model("a")],
        ["WarmPool p", "spec.tolerations", "taint key"],
    ),
    ("not an object", ["- just\n- a list\n"], ["document 1", "object"]),
    ("no ModelDeployment", [POOL.format(name="p")], ["no ModelDeployment"]),
]


@pytest.mark.parametrize(("name", "docs", "expected"), ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_name_the_document_and_the_field(tmp_path, name, docs, expected):
    path = write(tmp_path, *docs)
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(path), message
    assert "\n" not in message, message
    for part in expected:
        assert part in message, f"{name}: {part!r} not in {message!r}"


def test_not_yaml_is_one_line_with_the_position(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(MODEL.format(name="a") + "  engine: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: not valid YAML") and "line 8" in message and "\n" not in message


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nowhere\.yaml: No such file"):
        load(str(tmp_path / "nowhere.yaml"))


def test_the_shipped_crds_are_the_repositorys():
    shipped = REPO / "operator" / "warmserve" / "local" / "crds"
    names = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    assert sorted(p.name for p in shipped.glob("*.yaml")) == names
    for name in names:
        assert (shipped / name).read_bytes() == (REPO / "crds" / name).read_bytes(), f"{name} drifted from crds/"


# ------------------------------------------------------------------------------------------ the command
def warmserve_command() -> list[str]:
    script = Path(sys.executable).parent / "warmserve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "warmserve.cli"]


def run_up(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`warmserve up ARGS`; one that keeps running past `timeout` (it accepted the file and started serving) is
    stopped with Ctrl-C, so that it stops its engines, and the test fails."""
    proc = subprocess.Popen(
        [*warmserve_command(), "up", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        pytest.fail(f"warmserve up {' '.join(args)} kept running: {err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize(
    ("docs", "expected"),
    [
        ([model("a", **{"model.tensorParallelSize": "3"})], "spec.model.tensorParallelSize"),
        ([MODEL.format(name="a") + "  engine: [unclosed\n"], "not valid YAML"),
    ],
    ids=["schema", "yaml"],
)
def test_warmserve_up_with_a_bad_file_prints_one_line_and_exits_2(tmp_path, docs, expected):
    result = run_up("-f", write(tmp_path, *docs), "--port", "19391", "--arena-mib", "8")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warmserve up: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_warmserve_up_with_a_missing_file_exits_2(tmp_path):
    result = run_up("-f", str(tmp_path / "none.yaml"), "--port", "19392", "--arena-mib", "8")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"warmserve up: {tmp_path / 'none.yaml'}: No such file or directory"]


def test_warmserve_up_help_lists_the_options():
    result = run_up("--help")
    assert result.returncode == 0
    for flag in ("--file", "--port", "--max-queue", "--max-wait-seconds", "--engine-args"):
        assert flag in result.stdout, flag
