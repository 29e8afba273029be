"""`warmserve up` refuses a ModelDeployment whose `spec.engine.args` carry a flag the worker sets itself, with one
line naming the file, the model and the flag (as the operator refuses it with a `ForbiddenEngineFlag` condition)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from warmserve.local.config import ConfigError, load

MODEL = """\
apiVersion: warmserve.io/v1alpha1
kind: ModelDeployment
metadata:
  name: {name}
spec:
  model:
    source: file:///models/{name}
  engine:
    args: {args}
"""


def _write(tmp_path: Path, name: str, args: list[str]) -> str:
    path = tmp_path / "models.yaml"
    path.write_text(textwrap.dedent(MODEL.format(name=name, args=str(args).replace("'", '"'))))
    return str(path)


@pytest.mark.parametrize(
    ("args", "flag", "hint"),
    [
        (["--port", "9000"], "--port", "the worker sets it"),
        (["--enable-prefix-caching", "--load_format=dummy"], "--load-format", "the worker sets it"),
        (["-tp", "2"], "-tp", "the worker sets it"),
        (["--gpu-memory-utilization=0.5"], "--gpu-memory-utilization", "the worker sets it"),
        (["--max-model-len", "2048"], "--max-model-len", "spec.engine.maxModelLen"),
        (["--dtype", "half"], "--dtype", "spec.model.dtype"),
    ],
)
def test_a_forbidden_engine_flag_is_one_line_naming_the_model_and_the_flag(tmp_path, args, flag, hint):
    path = _write(tmp_path, "chat", args)
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: ModelDeployment chat: spec.engine.args: {flag} "), message
    assert hint in message, message


def test_allowed_engine_args_are_accepted(tmp_path):
    config = load(_write(tmp_path, "chat", ["--enable-prefix-caching", "--max-num-seqs", "8"]))
    (model,) = config.models
    assert model["spec"]["engine"]["args"] == ["--enable-prefix-caching", "--max-num-seqs", "8"]
