"""Pure manifest builders: (CR, spec) → Kubernetes objects as plain dicts.

No API calls here: `k8s.py` sends what these return, `pools.py` adopts it with `kopf.adopt`, and the tests
validate every output with kubernetes-validate (strict) or, for the InferencePool, against the published
CRD's schema (tests/data/gateway-api-inference-extension/). Names, labels and selectors are derived only from
the owning WarmPool's name, so a restarted operator rebuilds byte-identical children and never duplicates.

The worker pod is hardened (docs/design.md, "Trust model"): it runs as uid/gid 65532 with a read-only root
filesystem, no capabilities, no privilege escalation and the RuntimeDefault seccomp profile; everything it and
its engines write goes to an explicit emptyDir (`WRITABLE_DIRS`: the state dir, /tmp, HOME with the caches
vLLM, Triton, torch and Hugging Face use) or to the memory-backed /dev/shm. Callers build it only for a pool
that passed `reconcile.validate_pool`.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from typing import Any

from warmserve.controller.settings import OPERATOR_NAME, InferencePoolSettings
from warmserve.controller.spec import PoolSpec
from warmserve.protocol import POOL_LABEL, engine_ports

APP_NAME = "warmserve"
WORKER_COMPONENT = "worker"
WORKER_CONTAINER = "worker"
HISTORY_KEY = "history.json.z"
OPEN_WINDOW_KEY = "window.json"
STATE_DIR = "/var/run/warmserve"
SHM_DIR = "/dev/shm"
TMP_DIR = "/tmp"
HOME_DIR = "/home/warmserve"
WORKER_UID = 65532  # the conventional "nonroot" user of distroless images
#: Every directory the worker container may write: volume name → (mount path, emptyDir). The root filesystem
#: is read-only, so anything else the agent, vLLM, Triton or torch writes must be below one of these.
WRITABLE_DIRS: dict[str, tuple[str, dict[str, Any]]] = {
    "dshm": (SHM_DIR, {"medium": "Memory"}),  # sizeLimit: the pool's worker.shmSize
    "state": (STATE_DIR, {}),  # ledger and engine records: survive a container restart (re-adoption)
    "tmp": (TMP_DIR, {"sizeLimit": "10Gi"}),
    "home": (HOME_DIR, {"sizeLimit": "20Gi"}),  # HOME and the caches below it
}
#: Where the engines' libraries keep their caches: all below HOME or /tmp (writable emptyDirs).
CACHE_ENV = {
    "HOME": HOME_DIR,
    "XDG_CACHE_HOME": f"{HOME_DIR}/.cache",
    "XDG_CONFIG_HOME": f"{HOME_DIR}/.config",
    "VLLM_CACHE_ROOT": f"{HOME_DIR}/.cache/vllm",
    "VLLM_CONFIG_ROOT": f"{HOME_DIR}/.config/vllm",
    "HF_HOME": f"{HOME_DIR}/.cache/huggingface",
    "TRITON_HOME": HOME_DIR,
    "TRITON_CACHE_DIR": f"{HOME_DIR}/.triton/cache",
    "TORCHINDUCTOR_CACHE_DIR": f"{TMP_DIR}/torchinductor",
    "CUDA_CACHE_PATH": f"{HOME_DIR}/.nv/ComputeCache",
    "NUMBA_CACHE_DIR": f"{TMP_DIR}/numba",
    "MPLCONFIGDIR": f"{TMP_DIR}/matplotlib",
    "TMPDIR": TMP_DIR,
}
#: Engines read weights from the arena and model files from the cache: never from the network.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
INFERENCE_POOL_API_VERSION = "inference.networking.k8s.io/v1"
INFERENCE_POOL_COMPONENT = "inference-pool"
#: An InferencePool lists at most 8 target ports (v1 CRD: spec.targetPorts maxItems 8).
INFERENCE_POOL_MAX_PORTS = 8


def _short(text: str, limit: int) -> str:
    """`text` if it fits, else a prefix plus a hash suffix (distinct long names stay distinct)."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    return f"{text[: limit - 9].rstrip('-.')}-{digest}"


def pool_label_value(pool_name: str) -> str:
    """Label values are limited to 63 characters; pool names may have 253."""
    return _short(pool_name, 63)


def worker_workload_name(pool_name: str) -> str:
    """DaemonSet name; pod names add a 6-character suffix, so stay within 57 characters."""
    return _short(f"{pool_name}-worker", 57)


def history_configmap_name(pool_name: str) -> str:
    return _short(f"{pool_name}-load-history", 253)


def open_window_configmap_name(pool_name: str) -> str:
    return _short(f"{pool_name}-load-window", 253)


def selector_labels(pool_name: str) -> dict[str, str]:
    """Labels that select a pool's worker pods (immutable in a DaemonSet: never add to them)."""
    return {
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/component": WORKER_COMPONENT,
        POOL_LABEL: pool_label_value(pool_name),
    }


def common_labels(pool_name: str) -> dict[str, str]:
    return {
        **selector_labels(pool_name),
        "app.kubernetes.io/instance": pool_label_value(pool_name),
        "app.kubernetes.io/part-of": APP_NAME,
        "app.kubernetes.io/managed-by": OPERATOR_NAME,
    }


def _tolerations(pool: PoolSpec) -> list[dict[str, Any]]:
    result = [dict(t) for t in pool.tolerations]
    if pool.gpu.count > 0 and not any(t.get("key") == GPU_TOLERATION["key"] for t in result):
        result.append(dict(GPU_TOLERATION))
    return result


def _gpu_match_expressions(pool: PoolSpec) -> list[dict[str, Any]]:
    """Node affinity on GPU feature discovery labels (NVIDIA/k8s-device-plugin GFD)."""
    if pool.gpu.count == 0:
        return []
    exprs: list[dict[str, Any]] = [
        {"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]},
        {"key": "nvidia.com/gpu.count", "operator": "Gt", "values": [str(pool.gpu.count - 1)]},
        {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": [str(pool.gpu.memory_mib - 1)]},
    ]
    if pool.gpu.product:
        exprs.append({"key": "nvidia.com/gpu.product", "operator": "In", "values": list(pool.gpu.product)})
    return exprs


def _affinity(pool: PoolSpec) -> dict[str, Any] | None:
    """The user's affinity with our GPU expressions ANDed into every required node selector term."""
    affinity: dict[str, Any] = copy.deepcopy(dict(pool.affinity))
    exprs = _gpu_match_expressions(pool)
    if not exprs:
        return affinity or None
    node = affinity.setdefault("nodeAffinity", {})
    required = node.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = required.setdefault("nodeSelectorTerms", [])
    if not terms:
        terms.append({})
    for term in terms:
        term["matchExpressions"] = list(term.get("matchExpressions") or []) + copy.deepcopy(exprs)
    return affinity


def _model_cache_volume(pool: PoolSpec) -> dict[str, Any]:
    cache = pool.model_cache
    if cache.persistent_volume_claim_name:
        return {
            "name": "model-cache",
            "persistentVolumeClaim": {"claimName": cache.persistent_volume_claim_name, "readOnly": True},
        }
    if cache.host_path:
        return {"name": "model-cache", "hostPath": {"path": cache.host_path, "type": "Directory"}}
    return {"name": "model-cache", "emptyDir": {"sizeLimit": cache.size_limit}}


def _env(pool_name: str) -> list[dict[str, Any]]:
    """Downward API: the agent finds its own pod (POD_NAMESPACE/POD_NAME) to watch its plan."""

    def field_ref(name: str, path: str) -> dict[str, Any]:
        return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}

    return [
        field_ref("POD_NAME", "metadata.name"),
        field_ref("POD_NAMESPACE", "metadata.namespace"),
        field_ref("NODE_NAME", "spec.nodeName"),
        field_ref("POD_IP", "status.podIP"),
        {"name": "WARMSERVE_POOL", "value": pool_name},
        {"name": "WARMSERVE_LOG_LEVEL", "value": "info"},
    ]


def worker_args(pool: PoolSpec, *, standby_engines: bool = True) -> list[str]:
    """Command-line of `python -m warmserve.worker` (worker/warmserve/worker/__main__.py) for this pool.

    `--standby-engines` is the pool's `spec.worker.standbyEngines`, or 0 with `standby_engines=False` (the
    operator manages InferencePools): an unbound standby engine listens on an engine port under its model's
    served name with scratch weights until a promotion binds it; the router never uses it (it is never an
    endpoint), but a gateway that routes by port would.
    """
    w = pool.worker
    args = [
        "--page-size",
        str(w.page_size_bytes),
        "--http-port",
        str(w.port),
        "--engine-port",
        str(w.engine_port_base),
        "--state-dir",
        STATE_DIR,
        "--shm-dir",
        SHM_DIR,
    ]
    if pool.gpu.count > 0:
        args += ["--device", "cuda", "--memory-fraction", repr(w.arena_fraction)]
    else:
        arena = int(pool.gpu.memory_mib * (1 << 20) * w.arena_fraction)
        args += ["--device", "cpu", "--cpu-devices", "1", "--arena-bytes", str(arena)]
    return [*args, "--standby-engines", str(w.standby_engines if standby_engines else 0)]


def build_worker_container(pool_name: str, pool: PoolSpec, *, standby_engines: bool = True) -> dict[str, Any]:
    """The sidecar worker: holds the GPUs, the arena, and launches the engines of promoted replicas."""
    w = pool.worker
    limits: dict[str, str] = {"cpu": w.cpu, "memory": w.memory}
    if pool.gpu.count > 0:
        limits[pool.gpu.resource_name] = str(pool.gpu.count)  # quantities are strings
    probe = {"httpGet": {"path": "/healthz", "port": "metrics"}}
    return {
        "name": WORKER_CONTAINER,
        "image": w.image,
        "imagePullPolicy": w.image_pull_policy,
        "command": ["python", "-m", "warmserve.worker"],
        "args": worker_args(pool, standby_engines=standby_engines),
        "env": [
            *_env(pool_name)[:5],
            {"name": "WARMSERVE_LOG_LEVEL", "value": w.log_level},
            *({"name": k, "value": v} for k, v in {**CACHE_ENV, **OFFLINE_ENV}.items()),
        ],
        "ports": [{"name": "metrics", "containerPort": w.port, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": w.cpu, "memory": w.memory}, "limits": limits},
        "startupProbe": {**probe, "periodSeconds": 5, "failureThreshold": 60},
        "livenessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 3},
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 2},
        "volumeMounts": [
            *({"name": name, "mountPath": path} for name, (path, _) in WRITABLE_DIRS.items()),
            {"name": "model-cache", "mountPath": pool.model_cache.mount_path, "readOnly": True},
            {"name": "podinfo", "mountPath": "/etc/podinfo", "readOnly": True},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }


def build_worker_daemonset(
    pool_name: str, namespace: str, pool: PoolSpec, *, standby_engines: bool = True
) -> dict[str, Any]:
    """One worker pod per matching GPU node (a DaemonSet), holding all of that node's GPUs.

    Rolling updates replace one worker at a time: a worker that restarts loses its warm replicas, so the
    pool should never lose more than one node's prewarmed weights at once. `standby_engines`: see `worker_args`.
    """
    labels = common_labels(pool_name)
    writable: list[dict[str, Any]] = []
    for name, (_, empty) in WRITABLE_DIRS.items():
        size = {"sizeLimit": pool.worker.shm_size} if name == "dshm" else {}
        writable.append({"name": name, "emptyDir": {**empty, **size}})
    pod_spec: dict[str, Any] = {
        "serviceAccountName": pool.worker.service_account_name,
        "automountServiceAccountToken": True,  # the agent patches its own pod's state (and nothing else: RBAC + VAP)
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 60,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": WORKER_UID,
            "runAsGroup": WORKER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [build_worker_container(pool_name, pool, standby_engines=standby_engines)],
        "volumes": [
            *writable,
            _model_cache_volume(pool),
            {
                "name": "podinfo",
                "downwardAPI": {
                    "items": [
                        {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                        {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
                    ]
                },
            },
        ],
        "nodeSelector": {"kubernetes.io/os": "linux", **dict(pool.node_selector)},
    }
    tolerations = _tolerations(pool)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    affinity = _affinity(pool)
    if affinity:
        pod_spec["affinity"] = affinity
    if pool.gpu.runtime_class_name:
        pod_spec["runtimeClassName"] = pool.gpu.runtime_class_name
    if pool.priority_class_name:
        pod_spec["priorityClassName"] = pool.priority_class_name
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": worker_workload_name(pool_name), "namespace": namespace, "labels": labels},
        "spec": {
            "selector": {"matchLabels": selector_labels(pool_name)},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {"kubectl.kubernetes.io/default-container": WORKER_CONTAINER},
                },
                "spec": pod_spec,
            },
        },
    }


def build_history_configmap(pool_name: str, namespace: str | None, payload_b64: str) -> dict[str, Any]:
    """The ConfigMap that keeps a pool's per-window load history across operator restarts."""
    return _load_configmap(
        history_configmap_name(pool_name), pool_name, namespace, "binaryData", HISTORY_KEY, payload_b64
    )


def build_open_window_configmap(pool_name: str, namespace: str | None, encoded: str) -> dict[str, Any]:
    """The ConfigMap that keeps the checkpoint of a pool's open load window (`history.OpenWindow`): small and
    written a few times per window, apart from the history, which is written once per window."""
    return _load_configmap(
        open_window_configmap_name(pool_name), pool_name, namespace, "data", OPEN_WINDOW_KEY, encoded
    )


def _load_configmap(
    name: str, pool_name: str, namespace: str | None, field: str, key: str, value: str
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": common_labels(pool_name) | {"app.kubernetes.io/component": "load-history"},
        },
        field: {key: value},
    }


def inference_pool_name(pool_name: str) -> str:
    """The pool's InferencePool is named like the WarmPool (what an HTTPRoute's backendRef names)."""
    return _short(pool_name, 253)


def inference_pool_ports(pool: PoolSpec) -> range:
    """The engine ports an InferencePool targets: the first min(8, engine slots) of the pool's engine range.

    A worker gives each engine it starts the lowest port of `enginePortBase` .. +63 that no engine of its own holds
    and that binds (worker `engines.free_port`), and with standby engines off (`worker_args`) it runs at most one
    engine per GPU (one on a CPU pool's single device). So a worker's engines sit on the first `max(1, gpu.count)`
    ports, except an engine started while a lower port did not bind (a just-stopped engine's port), which lands
    higher. Ports past the slots would be endpoints where no engine can listen; an InferencePool lists at most 8
    ports, so on a 16-GPU pool the engines on ports 9..16 are not targeted (the condition says so).
    """
    slots = max(1, pool.gpu.count)
    ports = engine_ports(pool.worker.engine_port_base)
    return range(ports.start, ports.start + min(slots, INFERENCE_POOL_MAX_PORTS, len(ports)))


def epp_service_name(pool_name: str, settings: InferencePoolSettings) -> str:
    """The endpoint picker Service a pool's InferencePool names: `{pool}` replaced by the pool's name, and shortened
    like the other derived names (a prefix and a hash) beyond the 63 characters a Service name may have."""
    return _short(settings.epp.replace("{pool}", pool_name), 63)


def build_inference_pool(
    pool_name: str, namespace: str | None, pool: PoolSpec, settings: InferencePoolSettings
) -> dict[str, Any]:
    """The Gateway API Inference Extension InferencePool (v1) of a WarmPool: its worker pods (the labels the
    DaemonSet selects them by) on `inference_pool_ports`, and the endpoint picker the operator's settings name."""
    spec: dict[str, Any] = {
        "selector": {"matchLabels": selector_labels(pool_name)},
        "targetPorts": [{"number": port} for port in inference_pool_ports(pool)],
        "appProtocol": "http",  # vLLM's OpenAI server: HTTP/1.1
    }
    if settings.epp:
        spec["endpointPickerRef"] = {
            "group": "",
            "kind": "Service",
            "name": epp_service_name(pool_name, settings),
            "port": {"number": settings.epp_port},
            "failureMode": settings.failure_mode,
        }
    return {
        "apiVersion": INFERENCE_POOL_API_VERSION,
        "kind": "InferencePool",
        "metadata": {
            "name": inference_pool_name(pool_name),
            "namespace": namespace,
            "labels": common_labels(pool_name) | {"app.kubernetes.io/component": INFERENCE_POOL_COMPONENT},
        },
        "spec": spec,
    }


def inference_pool_drift(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any] | None:
    """`drift_patch` for an InferencePool, plus removing an `endpointPickerRef` the settings no longer name (a
    merge patch keeps keys it does not mention)."""
    patch = drift_patch(current, desired)
    stale_ref = "endpointPickerRef" in (current.get("spec") or {}) and "endpointPickerRef" not in desired["spec"]
    if stale_ref:
        patch = patch or {}
        patch["spec"] = {**patch.get("spec", {}), "endpointPickerRef": None}
    return patch


def drift_patch(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any] | None:
    """A merge patch bringing `current`'s labels and spec to `desired`, or None when nothing drifted.

    Only fields the operator owns are compared (metadata.labels, spec); the API server's defaults inside
    spec make a deep comparison noisy, so the spec is compared on the keys we set.
    """
    patch: dict[str, Any] = {}
    labels = (current.get("metadata") or {}).get("labels") or {}
    want_labels = (desired.get("metadata") or {}).get("labels") or {}
    if any(labels.get(k) != v for k, v in want_labels.items()):
        patch["metadata"] = {"labels": dict(want_labels)}
    if not _subset(desired.get("spec") or {}, current.get("spec") or {}):
        patch["spec"] = copy.deepcopy(dict(desired.get("spec") or {}))
    return patch or None


def _subset(want: Any, have: Any) -> bool:
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and all(_subset(v, have.get(k)) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(want) == len(have) and all(map(_subset, want, have))
    return want == have
