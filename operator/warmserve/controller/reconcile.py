"""Pure reconcile logic: (spec, observed children, worker states) → status and conditions.

Nothing here calls the API or reads a clock (the caller passes `now`). Semantic errors that the CRD schema
cannot catch — the pool does not exist, the TP size does not divide the pool's GPUs per worker, a shard does
not fit one GPU's arena, the weight size is unknown — become a `Valid=False` condition with a CamelCase reason
and a message, never an exception that would put the handler into a retry loop.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any
from urllib.parse import urlsplit

from warmserve.controller import conditions as c
from warmserve.controller.settings import SpecRules
from warmserve.controller.spec import ModelSpec, PoolSpec
from warmserve.protocol import (
    DTYPES,
    MAX_ENGINE_ARG_CHARS,
    MAX_ENGINE_ARGS,
    PLAN_ANNOTATION,
    STATE_ANNOTATION,
    EngineSettings,
    Phase,
    Plan,
    ProtocolError,
    ReplicaState,
    Role,
    WorkerState,
    annotations_of,
    engine_ports,
    forbidden_engine_flag,
    parse_plan,
    parse_state,
    plan_of_pod,
    state_of_pod,
)
from warmserve.router.table import check_endpoint


@dataclass(frozen=True)
class Validation:
    ok: bool
    reason: str
    message: str


VALIDATED = Validation(True, "Validated", "the spec is valid")


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# ------------------------------------------------------------------ model sources
#: Directories of the worker container the model cache must not be mounted over (the worker's own mounts and
#: the system's): a mountPath at or below one of these, or above one, is refused.
RESERVED_MOUNTS = (
    "/dev",
    "/proc",
    "/sys",
    "/etc",
    "/tmp",
    "/var/run",
    "/run",
    "/usr",
    "/bin",
    "/lib",
    "/home/warmserve",
)
_HF_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class SourceResolution:
    """Where a pool's workers read a model source (`path`: a `file://` URL inside the cache), or why not."""

    path: str | None
    reason: str = ""
    message: str = ""


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _clean_path(path: str) -> str | None:
    """`path` normalised, or None when it is not absolute, has a `..` segment or a control character."""
    if not path.startswith("/") or _CONTROL.search(path) or ".." in path.split("/"):
        return None
    return posixpath.normpath(path)


def resolve_source(source: str, pool: PoolSpec) -> SourceResolution:
    """The `file://` path the pool's workers read `source` from: always inside the pool's model cache.

    The cache is mounted at `modelCache.mountPath`. `file://<path>` is accepted when the normalised absolute
    path lies below it; `pvc://<claim>/<path>` when `<claim>` is the pool's cache claim (then
    `<mountPath>/<path>`); `hf://<org>/<repo>` is expected pre-downloaded at `<mountPath>/<org>/<repo>`. Any
    `..` segment, relative path or control character is refused (`SourceOutsideCache`), so no source can
    name a file outside the cache.
    """
    mount = _clean_path(pool.model_cache.mount_path)

    def outside(why: str) -> SourceResolution:
        return SourceResolution(
            None, "SourceOutsideCache", f"spec.model.source {source!r} {why} (modelCache.mountPath {mount or '?'})"
        )

    if mount is None or mount == "/":
        return outside("cannot be placed: the pool's modelCache.mountPath is not a valid directory")
    if source.startswith("file://"):
        path = _clean_path(source[len("file://") :])
        if path is None:
            return outside("is not an absolute path without '..' segments")
        if not _inside(path, mount):
            return outside("is not inside the pool's model cache")
        return SourceResolution(f"file://{path}")
    if source.startswith("pvc://"):
        claim, _, rest = source[len("pvc://") :].partition("/")
        if not claim or claim != pool.model_cache.persistent_volume_claim_name:
            return SourceResolution(
                None,
                "SourceNotOnPool",
                f"spec.model.source {source!r} is not reachable from the pool: a pvc:// source must name the "
                f"pool's modelCache.persistentVolumeClaimName "
                f"({pool.model_cache.persistent_volume_claim_name or 'none'})",
            )
        path = _clean_path(f"{mount}/{rest}")
        if path is None or not _inside(path, mount):
            return outside("has a path that leaves the claim")
        return SourceResolution(f"file://{path}")
    if source.startswith("hf://"):
        parts = source[len("hf://") :].split("/")
        if len(parts) != 2 or not all(_HF_SEGMENT.fullmatch(s) and ".." not in s for s in parts):
            return outside("is not hf://<org>/<repo>")
        return SourceResolution(f"file://{mount}/{parts[0]}/{parts[1]}")
    return SourceResolution(
        None, "SourceNotOnPool", f"spec.model.source {source!r}: the scheme must be pvc://, file:// or hf://"
    )


def worker_source(source: str, pool: PoolSpec) -> str | None:
    """The `file://` path the pool's workers read `source` from, or None when it is not inside the cache."""
    return resolve_source(source, pool).path


# ------------------------------------------------------------------ engine arguments
#: vLLM flags a ModelDeployment may pass (engine tuning only): True when the flag takes a value. Nothing that
#: names a file, a directory, a host, a port, a URL, a model or Python code to import, and nothing the worker
#: sets itself (model, served name, tensor parallelism, load format, dtype, max model length, memory budget:
#: `warmserve.protocol.FORBIDDEN_ENGINE_FLAGS`, refused first and even when the operator's settings allow them).
ENGINE_FLAGS: dict[str, bool] = {
    "--enable-prefix-caching": False,
    "--no-enable-prefix-caching": False,
    "--enable-chunked-prefill": False,
    "--no-enable-chunked-prefill": False,
    "--enforce-eager": False,
    "--disable-sliding-window": False,
    "--disable-cascade-attn": False,
    "--disable-log-stats": False,
    "--disable-log-requests": False,
    "--enable-log-requests": False,
    "--enable-auto-tool-choice": False,
    "--async-scheduling": False,
    "--enable-expert-parallel": False,
    "--calculate-kv-scales": False,
    "--disable-custom-all-reduce": False,
    "--return-tokens-as-token-ids": False,
    "--enable-prompt-tokens-details": False,
    "--enable-force-include-usage": False,
    "--disable-uvicorn-access-log": False,
    "--disable-fastapi-docs": False,
    "--max-num-seqs": True,
    "--max-num-batched-tokens": True,
    "--kv-cache-dtype": True,
    "--block-size": True,
    "--seed": True,
    "--max-logprobs": True,
    "--quantization": True,
    "--tokenizer-mode": True,
    "--tool-call-parser": True,
    "--reasoning-parser": True,
    "--guided-decoding-backend": True,
    "--max-seq-len-to-capture": True,
    "--max-cudagraph-capture-size": True,
    "--long-prefill-token-threshold": True,
    "--max-num-partial-prefills": True,
    "--max-long-partial-prefills": True,
    "--scheduling-policy": True,
    "--num-lookahead-slots": True,
    "--limit-mm-per-prompt": True,
    "--override-generation-config": True,
    "--response-role": True,
    "--uvicorn-log-level": True,
    "--max-parallel-loading-workers": True,
}
_FLAG = re.compile(r"--[a-z0-9][a-z0-9-]*")
_VALUE = re.compile(r"[A-Za-z0-9._:,+={}\[\]\"' -]*")  # no '/', '\', '@', '$', '`', ';', '|', '&', '<', '>'


def engine_args_problem(args: Sequence[str], allowed_extra: Sequence[str] = ()) -> str | None:
    """Why `args` (spec.engine.args) are refused, naming the argument, or None when every one is allowed."""
    allowed = dict(ENGINE_FLAGS)
    for extra in allowed_extra:
        flag, _, kind = extra.partition("=")
        allowed[flag] = kind != "bool"
    expects_value = False
    for i, arg in enumerate(args):
        where = f"spec.engine.args[{i}] {arg[:64]!r}"
        if expects_value:
            expects_value = False
            if not arg.startswith("-"):
                if not _VALUE.fullmatch(arg):
                    return f"{where}: a flag's value may not contain paths, URLs or shell characters"
                continue
        flag, eq, value = arg.partition("=")
        if not _FLAG.fullmatch(flag):
            return f"{where} is neither a --flag nor the value of one"
        flag = flag.replace("_", "-")
        if flag not in allowed:
            return f"{where}: {flag} is not an allowed engine flag (the operator's allow-list)"
        if eq:
            if not allowed[flag]:
                return f"{where}: {flag} takes no value"
            if not _VALUE.fullmatch(value):
                return f"{where}: a flag's value may not contain paths, URLs or shell characters"
        else:
            expects_value = allowed[flag]
    return None


_OWN_FIELD = {"--max-model-len": "spec.engine.maxModelLen", "--dtype": "spec.model.dtype"}


def forbidden_engine_arg_problem(args: Sequence[str]) -> str | None:
    """Why `args` (spec.engine.args) break the worker's contract (`warmserve.protocol.forbidden_engine_flag`),
    naming the argument and the flag, or None."""
    for i, arg in enumerate(args):
        flag = forbidden_engine_flag([arg])
        if flag is None:
            continue
        where = f"spec.engine.args[{i}] {arg[:64]!r}"
        if flag not in _OWN_FIELD and not flag.startswith("-"):
            return f"{where} contains a NUL or line-break character"
        if flag in _OWN_FIELD:
            return f"{where}: {flag} may not be passed as an engine argument: set {_OWN_FIELD[flag]} instead"
        return f"{where}: {flag} may not be passed as an engine argument: the worker sets it (forbidden engine flag)"
    return None


def engine_settings_problem(model: ModelSpec) -> str | None:
    """The CRD's limits on the engine settings, checked again for objects the API server never validated."""
    if len(model.engine_args) > MAX_ENGINE_ARGS:
        return f"spec.engine.args has {len(model.engine_args)} entries; at most {MAX_ENGINE_ARGS} are allowed"
    for i, arg in enumerate(model.engine_args):
        if len(arg) > MAX_ENGINE_ARG_CHARS:
            return f"spec.engine.args[{i}] is longer than {MAX_ENGINE_ARG_CHARS} characters"
    if not 0 <= model.max_model_len <= 16777216:
        return f"spec.engine.maxModelLen {model.max_model_len} must be within 0..16777216"
    if model.dtype not in DTYPES:
        return f"spec.model.dtype {model.dtype[:40]!r} must be one of {', '.join(DTYPES)}"
    return None


def engine_settings(model: ModelSpec) -> EngineSettings:
    """What the plan tells the worker about the model's engine: nothing for the defaults (`dtype: auto`,
    `maxModelLen: 0` and no args), so the plan of a model without engine settings is what it always was.
    Call it on a model `validate_model` accepted."""
    return EngineSettings(
        tuple(model.engine_args),
        model.max_model_len or None,
        None if model.dtype == "auto" else model.dtype,
    )


# ------------------------------------------------------------------ models
def validate_model(
    model: ModelSpec,
    pool: PoolSpec | None,
    weight_bytes: int | None,
    rules: SpecRules | None = None,
    pool_validation: Validation | None = None,
) -> Validation:
    """Does this ModelDeployment make sense against its pool? First failing check wins; never raises."""
    rules = rules or SpecRules()
    if model.problems:
        reason, message = model.problems[0]
        return Validation(False, reason, message)
    if not model.pool:
        return Validation(False, "PoolNotSet", "spec.poolRef.name is empty")
    if pool is None:
        return Validation(
            False, "PoolNotFound", f"spec.poolRef.name: WarmPool {model.pool!r} does not exist in this namespace"
        )
    if pool_validation is not None and not pool_validation.ok:
        return Validation(
            False,
            "PoolNotValid",
            f"WarmPool {model.pool!r} is not valid ({pool_validation.reason}: {pool_validation.message})",
        )
    if not _is_pow2(model.tp):
        return Validation(
            False, "InvalidTensorParallelSize", f"spec.model.tensorParallelSize {model.tp} is not a power of two"
        )
    devices = pool.devices_per_worker
    if pool.gpu.count == 0 and model.tp > 1:
        return Validation(
            False,
            "TensorParallelNeedsGPUs",
            f"pool {model.pool!r} is CPU-only; spec.model.tensorParallelSize must be 1",
        )
    if model.tp > devices or devices % model.tp:
        return Validation(
            False,
            "TensorParallelDoesNotDividePool",
            f"spec.model.tensorParallelSize {model.tp} does not divide the {devices} GPUs per worker of pool "
            f"{model.pool!r}",
        )
    source = resolve_source(model.source, pool)
    if source.path is None:
        return Validation(False, source.reason, source.message)
    problem = engine_settings_problem(model)
    if problem is not None:
        return Validation(False, "InvalidSpec", problem)
    problem = forbidden_engine_arg_problem(model.engine_args)
    if problem is not None:
        return Validation(False, "ForbiddenEngineFlag", problem)
    problem = engine_args_problem(model.engine_args, rules.engine_args_allowed)
    if problem is not None:
        return Validation(False, "EngineArgNotAllowed", problem)
    if model.min_replicas > model.max_replicas or model.min_replicas < 0:
        return Validation(False, "InvalidScaling", "spec.scaling.minReplicas exceeds spec.scaling.maxReplicas")
    if model.max_concurrency < 1 or model.min_warm_replicas < 0 or model.priority < 0:
        return Validation(
            False,
            "InvalidSpec",
            "spec.engine.maxConcurrency must be at least 1; spec.prewarm.minWarmReplicas and priority must not "
            "be negative",
        )
    if weight_bytes is None:
        return Validation(
            False,
            "WeightBytesUnknown",
            "set spec.model.weightBytes or make the source readable to the operator",
        )
    if weight_bytes < 1 or weight_bytes > MAX_WEIGHT_BYTES:
        return Validation(
            False, "InvalidSpec", f"spec.model.weightBytes {weight_bytes} is outside 1..{MAX_WEIGHT_BYTES}"
        )
    shard = -(-weight_bytes // model.tp)
    arena = pool.device_arena_bytes
    if shard > arena:
        return Validation(
            False,
            "DoesNotFitPool",
            f"one shard needs {shard} bytes but a GPU arena of pool {model.pool!r} holds {arena} bytes "
            f"(memoryMiB × arenaFraction); raise spec.model.tensorParallelSize",
        )
    return Validation(True, "Validated", f"fits pool {model.pool!r}: {model.tp} GPU(s), {shard} bytes per GPU")


# ------------------------------------------------------------------ pools
MAX_MEMORY_MIB = 16 * 1024 * 1024  # 16 TiB per device: the CRD's maximum
MAX_WEIGHT_BYTES = 1 << 50  # 1 PiB: the CRD's maximum
_QUANTITY = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][0-9]+)?")
_SUFFIX: dict[str, int | Fraction] = {
    "": 1,
    "m": Fraction(1, 1000),
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def parse_quantity(text: str) -> Fraction | None:
    """A Kubernetes resource quantity ("16Gi", "500m", "1e9") as an exact number, or None when it is not one
    (signs are refused: no size in a WarmPool may be negative)."""
    m = _QUANTITY.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None or len(text) > 32:
        return None
    suffix = m.group("suffix") or ""
    if suffix[:1] in ("e", "E") and int(suffix[1:]) > 18:
        return None  # beyond exa: not a size any node has (and 1e999999 must not cost a bignum)
    scale = 10 ** int(suffix[1:]) if suffix[:1] in ("e", "E") else _SUFFIX[suffix]
    return Fraction(m.group("num")) * scale


_LEGACY_IPV4 = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}")


def prometheus_url_problem(url: str, allowed_hosts: Sequence[str] = ()) -> str | None:
    """Why the operator must not fetch `url` (spec.loadSource.prometheusUrl), or None.

    Only http and https; no user info; the host must be on the allow-list when one is set; otherwise it must
    not be a link-local, loopback, unspecified, multicast or reserved address (cloud metadata services live at
    169.254.169.254 and fd00:ec2::254), nor a metadata or localhost name, nor an IPv4 address written in one of
    the legacy forms (decimal, octal, hex) that resolvers accept. A DNS name is not resolved here: set an
    allow-list to pin the hosts.
    """
    where = f"spec.loadSource.prometheusUrl {url[:200]!r}"
    if _CONTROL.search(url) or any(c.isspace() for c in url):
        return f"{where} contains whitespace or control characters"
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".").lower()
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError as exc:
        return f"{where} is not a URL: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"{where}: the scheme must be http or https"
    if parts.username is not None or parts.password is not None:
        return f"{where}: user info in the URL is not allowed"
    if not host:
        return f"{where} has no host"
    if allowed_hosts:
        if host not in {h.rstrip(".").lower() for h in allowed_hosts}:
            return f"{where}: host {host} is not on the operator's allow-list ({', '.join(allowed_hosts)})"
        return None
    if host in ("localhost", "metadata", "metadata.google.internal", "instance-data") or host.endswith(
        (".localhost", ".internal")
    ):
        return f"{where}: host {host} is a local or metadata name"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if _LEGACY_IPV4.fullmatch(host):
            return f"{where}: host {host} is an IP address in a legacy form"
        return None  # a DNS name: only an allow-list can pin what it resolves to
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if (
        address.is_link_local
        or address.is_loopback
        or address.is_unspecified
        or address.is_multicast
        or address.is_reserved
        or address in ipaddress.ip_network("fd00:ec2::/32")
        or address in ipaddress.ip_network("100.100.100.200/32")  # Alibaba Cloud metadata
    ):
        return f"{where}: host {host} is a link-local, loopback, metadata or reserved address"
    return None


def validate_pool(pool: PoolSpec, rules: SpecRules | None = None) -> Validation:
    """Is this WarmPool safe and sensible to run? First failing check wins; never raises.

    What the CRD's schema and CEL rules refuse is checked again here (the API server does not re-validate
    objects stored before the CRD was tightened), and so is what they cannot know: the operator's settings
    (`SpecRules`: worker service accounts, host-path roots, system priority classes, Prometheus hosts), the
    worker's own mounts, and values that only make sense together (arena, page size, /dev/shm).
    """
    rules = rules or SpecRules()
    if pool.problems:
        reason, message = pool.problems[0]
        return Validation(False, reason, message)
    invalid = _range_problem(pool)
    if invalid is not None:
        return Validation(False, "InvalidSpec", invalid)
    w = pool.worker
    if w.service_account_name not in rules.worker_service_accounts:
        return Validation(
            False,
            "ServiceAccountNotAllowed",
            f"spec.worker.serviceAccountName {w.service_account_name[:253]!r} is not one the operator allows for "
            f"workers ({', '.join(rules.worker_service_accounts) or 'none'})",
        )
    if pool.priority_class_name.startswith("system-") and not rules.allow_system_priority_classes:
        return Validation(
            False,
            "PriorityClassNotAllowed",
            f"spec.priorityClassName {pool.priority_class_name!r}: system-* priority classes are reserved (the "
            "operator's settings do not allow them)",
        )
    for i, toleration in enumerate(pool.tolerations):
        key = toleration.get("key") or ""
        if not key:
            return Validation(
                False,
                "TolerationNotAllowed",
                f"spec.tolerations[{i}] has no key: it would tolerate every taint",
            )
        if key in ("node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master"):
            return Validation(False, "TolerationNotAllowed", f"spec.tolerations[{i}]: workers may not tolerate {key}")
    cache = pool.model_cache
    if cache.host_path:
        path = _clean_path(cache.host_path)
        roots = [r for r in (_clean_path(r) for r in rules.host_path_roots) if r and r != "/"]
        if path is None or not any(_inside(path, r) for r in roots):
            return Validation(
                False,
                "HostPathNotAllowed",
                f"spec.modelCache.hostPath {cache.host_path[:200]!r} is not below a host-path root the operator "
                f"allows ({', '.join(rules.host_path_roots) or 'none'})",
            )
    mount = _clean_path(cache.mount_path)
    if mount is None or mount == "/" or any(_inside(mount, r) or _inside(r, mount) for r in RESERVED_MOUNTS):
        return Validation(
            False,
            "InvalidMountPath",
            f"spec.modelCache.mountPath {cache.mount_path[:200]!r} must be an absolute directory without '..' "
            f"that neither holds nor lies in a directory the worker needs ({', '.join(RESERVED_MOUNTS)})",
        )
    sizes = {}
    for field_name, text in (
        ("spec.worker.cpu", w.cpu),
        ("spec.worker.memory", w.memory),
        ("spec.worker.shmSize", w.shm_size),
        ("spec.modelCache.sizeLimit", cache.size_limit),
    ):
        value = parse_quantity(text)
        if value is None or value <= 0:
            return Validation(False, "InvalidQuantity", f"{field_name} {text[:40]!r} is not a positive quantity")
        sizes[field_name] = value
    if pool.gpu.memory_mib > MAX_MEMORY_MIB:
        return Validation(
            False,
            "MemoryTooLarge",
            f"spec.gpu.memoryMiB {pool.gpu.memory_mib} exceeds {MAX_MEMORY_MIB} (16 TiB per device)",
        )
    if not _is_pow2(w.page_size_bytes) or not 65536 <= w.page_size_bytes <= 1 << 30:
        return Validation(
            False,
            "PageSizeInvalid",
            f"spec.worker.pageSizeBytes {w.page_size_bytes} must be a power of two from 65536 to 1 GiB",
        )
    arena = pool.device_arena_bytes
    if w.page_size_bytes >= arena:
        return Validation(
            False,
            "PageSizeExceedsArena",
            f"spec.worker.pageSizeBytes {w.page_size_bytes} is not below one device's arena of {arena} bytes "
            "(gpu.memoryMiB × worker.arenaFraction): the worker could not hold a single page",
        )
    if pool.gpu.count == 0:
        if arena > sizes["spec.worker.shmSize"]:
            return Validation(
                False,
                "ArenaExceedsShm",
                f"the CPU arena of {arena} bytes (spec.gpu.memoryMiB × spec.worker.arenaFraction) does not fit "
                f"spec.worker.shmSize {w.shm_size} ({int(sizes['spec.worker.shmSize'])} bytes of /dev/shm)",
            )
        if arena > sizes["spec.worker.memory"]:
            return Validation(
                False,
                "ArenaExceedsMemory",
                f"the CPU arena of {arena} bytes (spec.gpu.memoryMiB × spec.worker.arenaFraction) does not fit "
                f"spec.worker.memory {w.memory} (shared memory counts against the container's memory limit)",
            )
    engine = engine_ports(w.engine_port_base)
    if engine.stop > 65536 or w.engine_port_base < 1024 or w.port in engine or not 1 <= w.port <= 65535:
        return Validation(
            False,
            "PortConflict",
            f"spec.worker.port {w.port} must lie outside the engine ports {engine.start}-{engine.stop - 1} "
            "(spec.worker.enginePortBase + 0..63), all within 1024-65535",
        )
    if pool.load_source.kind == "prometheus":
        problem = prometheus_url_problem(pool.load_source.prometheus_url, rules.prometheus_hosts)
        if problem is not None:
            return Validation(False, "PrometheusUrlNotAllowed", problem)
    return Validation(True, "Validated", "the spec is valid and within what the operator allows")


def _range_problem(pool: PoolSpec) -> str | None:
    """The CRD's enums and ranges, checked again for objects the API server never validated."""
    f, w = pool.forecast, pool.worker
    checks = (
        (pool.gpu.count in (0, 1, 2, 4, 8, 16), f"spec.gpu.count {pool.gpu.count} must be 0, 1, 2, 4, 8 or 16"),
        (pool.gpu.memory_mib >= 1, f"spec.gpu.memoryMiB {pool.gpu.memory_mib} must be at least 1"),
        (0.05 <= w.arena_fraction <= 1, f"spec.worker.arenaFraction {w.arena_fraction} must be within 0.05..1"),
        (w.host_memory_tier_bytes >= 0, "spec.worker.hostMemoryTierBytes must not be negative"),
        (0 <= w.standby_engines <= 16, f"spec.worker.standbyEngines {w.standby_engines} must be within 0..16"),
        (w.image_pull_policy in ("Always", "IfNotPresent", "Never"), "spec.worker.imagePullPolicy is not valid"),
        (w.log_level in ("debug", "info", "warning", "error"), "spec.worker.logLevel is not valid"),
        (
            bool(w.image) and not any(c.isspace() for c in w.image) and not _CONTROL.search(w.image),
            "spec.worker.image must be an image reference without whitespace",
        ),
        (
            10 <= f.window_seconds <= 86400 and 86400 % f.window_seconds == 0,
            f"spec.forecast.windowSeconds {f.window_seconds} must divide a day (86400 s) and be at least 10",
        ),
        (f.kind in ("csp", "smooth-csp", "seasonal-naive", "last"), "spec.forecast.kind is not a forecaster"),
        (1 <= f.season_days <= 28, "spec.forecast.seasonDays must be within 1..28"),
        (0 <= f.correction_windows <= 288, "spec.forecast.correctionWindows must be within 0..288"),
        (1 <= f.history_days <= 35, "spec.forecast.historyDays must be within 1..35"),
        (0.5 <= pool.interval_seconds <= 3600, "spec.policy.intervalSeconds must be within 0.5..3600"),
        (
            0.01 <= pool.scale_down_utilization < pool.scale_up_utilization <= 1,
            "spec.policy.scaleDownUtilization must be below spec.policy.scaleUpUtilization, both within 0.01..1",
        ),
        (0 <= pool.protection_seconds <= 86400, "spec.policy.protectionSeconds must be within 0..86400"),
        (0.01 <= pool.load_bandwidth_gbps <= 100000, "spec.policy.loadBandwidthGBps must be within 0.01..100000"),
        (pool.load_source.kind in ("workers", "prometheus"), "spec.loadSource.kind must be workers or prometheus"),
        (
            pool.load_source.kind != "prometheus" or bool(pool.load_source.prometheus_url),
            "spec.loadSource.prometheusUrl is required when spec.loadSource.kind is prometheus",
        ),
        (
            not (pool.model_cache.persistent_volume_claim_name and pool.model_cache.host_path),
            "set at most one of spec.modelCache.persistentVolumeClaimName and spec.modelCache.hostPath",
        ),
    )
    return next((message for ok, message in checks if not ok), None)


# ------------------------------------------------------------------ workers
@dataclass(frozen=True)
class WorkerView:
    """One worker pod as the operator sees it: identity, the plan on it, and the state it reports."""

    pod: str
    node: str
    ip: str
    gpus: int
    ready: bool  # Running and not being deleted: the planner places replicas on it
    plan: Plan | None
    state: WorkerState | None
    state_error: str = ""
    deleting: bool = False  # being deleted: still reported in status, no longer planned or scraped


class ParseMemo:
    """The plans and states parsed from worker pods' annotations, by annotation text, kept for one round more.

    A pool round parses the annotations of every worker pod; most are the text parsed in the round before (a
    plan that did not change, a worker that reports the same). Parsing is pure and nothing mutates what it
    returns (frozen dataclasses; their few dicts must not be changed either: they are shared across rounds
    now), so a text parsed once stands for its result: `view_worker` with a memo gives the same views.
    `next_round` keeps what the round read and forgets the rest. Texts that fail to parse are not kept: they are
    parsed, and fail, again.
    """

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], Any] = {}  # (annotation, text) → Plan or WorkerState, last round
        self._this: dict[tuple[str, str], Any] = {}  # the same, this round

    def next_round(self) -> None:
        self._last, self._this = self._this, {}

    def parse(self, annotation: str, text: Any, parse: Callable[[Any], Any]) -> Any:
        if not isinstance(text, str):  # not as an API server stores annotations: nothing to key it by
            return parse(text)
        key = (annotation, text)
        found = self._this.get(key)
        if found is None:
            found = self._last.get(key)
            if found is None:
                found = parse(text)
            self._this[key] = found
        return found

    def plan(self, pod: Mapping[str, Any]) -> Plan | None:
        """`protocol.plan_of_pod`: the plan on the pod, None when absent or unreadable."""
        text = annotations_of(pod).get(PLAN_ANNOTATION)
        if not text:
            return None
        try:
            return self.parse(PLAN_ANNOTATION, text, parse_plan)
        except ProtocolError:
            return None

    def state(self, pod: Mapping[str, Any]) -> WorkerState | None:
        """`protocol.state_of_pod`: the state the worker reports, None before it does; raises ProtocolError."""
        text = annotations_of(pod).get(STATE_ANNOTATION)
        if not text:
            return None
        return self.parse(STATE_ANNOTATION, text, parse_state)


def view_worker(pod: Mapping[str, Any], gpus: int, memo: ParseMemo | None = None) -> WorkerView:
    """The pod as the operator sees it; `memo`: annotations parsed in an earlier round (see `ParseMemo`)."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    state, error = None, ""
    try:
        state = memo.state(pod) if memo is not None else state_of_pod(pod)
    except ProtocolError as exc:
        error = str(exc)
    running = status.get("phase", "Running") == "Running" and not meta.get("deletionTimestamp")
    return WorkerView(
        pod=str(meta.get("name", "")),
        node=str((pod.get("spec") or {}).get("nodeName") or ""),
        ip=str(status.get("podIP") or ""),
        gpus=gpus,
        ready=running,
        plan=memo.plan(pod) if memo is not None else plan_of_pod(pod),
        state=state,
        state_error=error,
        deleting=bool(meta.get("deletionTimestamp")),
    )


DEFAULT_ENGINE_PORTS = engine_ports(8000)  # the CRD's default worker.enginePortBase
MAX_ERRORS_PER_WORKER = 20
MAX_TEXT = 300  # characters of one worker-reported string kept in status (a worker's state is not trusted)


def _short(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def endpoint_problem(endpoint: str, worker: WorkerView, ports: range) -> str | None:
    """Why an engine endpoint a worker reports must not be used (scraped, published), or None.

    The same rule as the router's (`warmserve.router.table.check_endpoint`): the host must be the reporting
    pod's own IP and the port within the pool's engine ports. A pod without an IP has no usable endpoint.
    """
    return check_endpoint(endpoint, worker.ip, ports)


def rejected_endpoints(workers: Sequence[WorkerView], ports: range) -> list[str]:
    """One message per reported endpoint that fails `endpoint_problem` (serving, ready replicas only)."""
    out = []
    for w in workers:
        for r in w.state.replicas if w.state is not None else ():
            if r.serving and r.ready and r.endpoint:
                why = endpoint_problem(r.endpoint, w, ports)
                if why is not None:
                    out.append(f"{w.pod}: endpoint {_short(r.endpoint, 80)!r} of {_short(r.uid, 64)} rejected: {why}")
    return out


def _device_role(replicas: Sequence[ReplicaState]) -> str:
    if any(r.dedicated for r in replicas):
        return "dedicated"
    return "universal" if replicas else "idle"


@dataclass(frozen=True)
class WorkerEntry:
    """One worker's part of the pool status: its `status.workers[]` entry, the messages it adds to `Degraded`,
    the free bytes of its devices, and whether it reports a state."""

    entry: dict[str, Any]
    errors: tuple[str, ...]
    free_bytes: int
    reporting: bool


def worker_entry(w: WorkerView) -> WorkerEntry:
    """`w`'s part of the pool status (its pod, node, GPU count, state and state error; not its plan)."""
    entry: dict[str, Any] = {"pod": w.pod, "node": w.node, "gpus": w.gpus}
    errors, free = [], 0
    if w.state_error:
        errors.append(f"{w.pod}: unreadable state: {_short(w.state_error)}")
    if w.state is not None:
        entry["observedGeneration"] = w.state.observed_generation
        entry["errors"] = [_short(str(e)) for e in w.state.errors[:MAX_ERRORS_PER_WORKER]]
        errors.extend(f"{w.pod}: {_short(str(e))}" for e in w.state.errors[:MAX_ERRORS_PER_WORKER])
        on_device: dict[int, list[ReplicaState]] = {}  # device index → the replicas on it, in report order
        for r in w.state.replicas:
            for index in dict.fromkeys(r.gpus):
                on_device.setdefault(index, []).append(r)
        devices = []
        for d in w.state.devices[:64]:
            on = on_device.get(d.index, [])
            devices.append(
                {
                    "index": d.index,
                    "state": _device_role(on),
                    "totalBytes": d.total_bytes,
                    "freeBytes": d.free_bytes,
                    "replicas": [_short(f"{r.model}/{r.phase}", 160) for r in on[:64]],
                }
            )
            free += d.free_bytes
        entry["devices"] = devices
    return WorkerEntry(entry, tuple(errors), free, w.state is not None)


class WorkerEntries:
    """`worker_entry` per pod, kept for one round more: a worker with the same node, GPU count, state error and
    the very same `WorkerState` object as in the last round (the observer's `ParseMemo` hands out the same object
    for a state annotation that did not change) gets the entry made then, not a new one. Entries are not
    changed once made (the status they go into is only compared and sent), so the status is the same either way.
    `next_round` keeps what the round used and forgets the rest."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[WorkerState | None, tuple[str, int, str], WorkerEntry]] = {}
        self._this: dict[str, tuple[WorkerState | None, tuple[str, int, str], WorkerEntry]] = {}

    def __call__(self, w: WorkerView) -> WorkerEntry:
        same = (w.node, w.gpus, w.state_error)
        kept = self._last.get(w.pod)
        if kept is None or kept[0] is not w.state or kept[1] != same:
            kept = (w.state, same, worker_entry(w))
        self._this[w.pod] = kept
        return kept[2]

    def next_round(self) -> None:
        self._last, self._this = self._this, {}


def pool_status(
    workers: Sequence[WorkerView],
    *,
    expected_workers: int,
    plan_generation: int,
    existing_conditions: Iterable[Mapping[str, Any]] | None,
    generation: int | None,
    now: str,
    workload_problem: tuple[str, str] | None = None,
    validation: Validation | None = None,
    ports: range = DEFAULT_ENGINE_PORTS,
    history: c.Condition | None = None,
    inference_pool: c.Condition | None = None,
    drop: Sequence[str] = (),
    entry_of: Callable[[WorkerView], WorkerEntry] = worker_entry,
) -> dict[str, Any]:
    """The status fields the pool round owns, from the worker pods. `drop`: condition types the round owns that no
    longer apply (`InferencePool` with the setting off) and are removed. An invalid spec (`validation`) wins over a
    workload the API refused, which wins over worker counts. `observedGeneration` and `workload` belong to the
    WarmPool handler (`pools.reconcile_pool`). Worker-reported strings are truncated: a worker's state is not
    trusted to keep the status small. `entry_of`: `worker_entry`, or a `WorkerEntries` memo of it."""
    entries, reporting, free_total = [], 0, 0
    errors: list[str] = []
    for w in sorted(workers, key=lambda w: w.pod):
        part = entry_of(w)
        entries.append(part.entry)
        errors.extend(part.errors)
        free_total += part.free_bytes
        reporting += part.reporting
    rejected = rejected_endpoints(workers, ports)
    valid = None
    if validation is not None:
        valid = c.Condition(c.VALID, c.TRUE if validation.ok else c.FALSE, validation.reason, validation.message)
    if validation is not None and not validation.ok:
        ready = c.Condition(c.READY, c.FALSE, validation.reason, validation.message)
    elif workload_problem is not None:
        ready = c.Condition(c.READY, c.FALSE, *workload_problem)
    elif expected_workers == 0:
        ready = c.Condition(c.READY, c.FALSE, "NoWorkers", "no node matches the pool's GPU selector yet")
    elif reporting < expected_workers:
        ready = c.Condition(
            c.READY, c.FALSE, "WorkersNotReporting", f"{reporting} of {expected_workers} workers report state"
        )
    else:
        ready = c.Condition(c.READY, c.TRUE, "WorkersReporting", f"{reporting} workers report state")
    if errors or rejected:
        degraded = c.Condition(
            c.DEGRADED, c.TRUE, "WorkerErrors" if errors else "EndpointsRejected", "; ".join(errors + rejected)[:2000]
        )
    else:
        degraded = c.Condition(c.DEGRADED, c.FALSE, "NoErrors", "")
    conditions = [ready, degraded] + [x for x in (valid, history, inference_pool) if x is not None]
    kept = [x for x in existing_conditions or () if x.get("type") not in drop]
    return {
        "expectedWorkers": expected_workers,
        "readyWorkers": reporting,
        "planGeneration": plan_generation,
        "totalFreeBytes": free_total,
        "workers": entries,
        "conditions": c.merge_conditions(kept, conditions, now=now, generation=generation),
    }


# ------------------------------------------------------------------ model status
@dataclass
class ModelObservation:
    """What the workers hold of one model (by ModelDeployment uid) and what the plans ask for."""

    desired_serve: int = 0
    desired_warm: int = 0
    dedicated: int = 0
    ready: int = 0
    prewarmed: int = 0
    prewarming: int = 0
    endpoints: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # endpoints reported but refused (endpoint_problem)
    held_back: list[str] = field(default_factory=list)  # engines not planned: a worker lacks a capability


def observe_models(workers: Sequence[WorkerView], ports: range = DEFAULT_ENGINE_PORTS) -> dict[str, ModelObservation]:
    """Per ModelDeployment uid: counts from plans (desired) and states (actual). An endpoint is published only
    when it passes `endpoint_problem` (on the worker pod's IP, within the pool's engine `ports`)."""
    obs: dict[str, ModelObservation] = {}
    for w in workers:
        if w.plan is not None:
            for g in w.plan.groups:
                for planned in g.replicas:
                    o = obs.setdefault(planned.uid, ModelObservation())
                    if planned.role == Role.SERVE:
                        o.desired_serve += 1
                    else:
                        o.desired_warm += 1
        if w.state is None:
            continue
        for r in w.state.replicas:
            o = obs.setdefault(r.uid, ModelObservation())
            if r.dedicated:
                o.dedicated += 1
                if r.serving and r.ready:
                    o.ready += 1
                    if r.endpoint:
                        why = endpoint_problem(r.endpoint, w, ports)
                        if why is None:
                            o.endpoints.append(r.endpoint)
                        else:
                            o.rejected.append(f"{w.pod}: endpoint {_short(r.endpoint, 80)!r} rejected: {why}")
            elif r.phase == Phase.WARM:
                o.prewarmed += 1
            elif r.phase == Phase.LOADING:
                o.prewarming += 1
        for e in w.state.errors[:MAX_ERRORS_PER_WORKER]:
            if e.uid in obs:
                obs[e.uid].errors.append(f"{w.pod}: {_short(str(e))}")
    for o in obs.values():
        o.endpoints.sort()
    return obs


def model_conditions(model: ModelSpec, validation: Validation, observed: ModelObservation | None) -> list[c.Condition]:
    """Valid, Ready, Prewarmed and Degraded for one ModelDeployment."""
    valid = c.Condition(c.VALID, c.TRUE if validation.ok else c.FALSE, validation.reason, validation.message)
    if not validation.ok:
        return [
            valid,
            c.Condition(c.READY, c.FALSE, validation.reason, validation.message),
            c.Condition(c.PREWARMED, c.FALSE, validation.reason, validation.message),
            c.Condition(c.DEGRADED, c.TRUE, validation.reason, validation.message),
        ]
    if observed is None:
        return [
            valid,
            c.Condition(
                c.READY,
                c.UNKNOWN if model.min_replicas else c.TRUE,
                "NotObservedYet" if model.min_replicas else "ScaledToZero",
                "no worker has reported this model yet",
            ),
            c.Condition(c.PREWARMED, c.UNKNOWN, "NotObservedYet", "no worker has reported this model yet"),
            c.Condition(c.DEGRADED, c.FALSE, "NoErrors", ""),
        ]
    need = max(model.min_replicas, observed.desired_serve)
    if observed.ready >= need:
        ready = c.Condition(
            c.READY,
            c.TRUE,
            "ReplicasReady" if need else "ScaledToZero",
            f"{observed.ready} of {need} replicas ready",
        )
    else:
        ready = c.Condition(c.READY, c.FALSE, "ReplicasStarting", f"{observed.ready} of {need} replicas ready")
    if observed.desired_warm == 0:
        prewarmed = c.Condition(c.PREWARMED, c.FALSE, "NoWarmReplicasPlanned", "the plan holds no warm replica")
    elif observed.prewarmed >= observed.desired_warm:
        prewarmed = c.Condition(c.PREWARMED, c.TRUE, "WarmReplicasLoaded", f"{observed.prewarmed} warm replicas loaded")
    else:
        prewarmed = c.Condition(
            c.PREWARMED,
            c.FALSE,
            "WarmReplicasLoading",
            f"{observed.prewarmed} of {observed.desired_warm} warm replicas loaded",
        )
    if observed.errors or observed.rejected or observed.held_back:
        reason = (
            "WorkerErrors"
            if observed.errors
            else "EndpointsRejected"
            if observed.rejected
            else "WorkerCapabilityMissing"
        )
        problems = observed.errors + observed.rejected + observed.held_back
        degraded = c.Condition(c.DEGRADED, c.TRUE, reason, "; ".join(problems)[:2000])
    else:
        degraded = c.Condition(c.DEGRADED, c.FALSE, "NoErrors", "")
    return [valid, ready, prewarmed, degraded]


def model_status(
    model: ModelSpec,
    validation: Validation,
    observed: ModelObservation | None,
    *,
    weight_bytes: int | None,
    weight_origin: str,
    existing_conditions: Iterable[Mapping[str, Any]] | None,
    generation: int | None,
    now: str,
) -> dict[str, Any]:
    """Every ModelDeployment status field but `forecast` and `observedLoad` (which `decide.load_status` adds)."""
    o = observed or ModelObservation()
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "weightBytesSource": weight_origin,
        "replicas": {"desired": o.desired_serve, "dedicated": o.dedicated, "ready": o.ready},
        "warmReplicas": {"desired": o.desired_warm, "prewarmed": o.prewarmed, "prewarming": o.prewarming},
        "endpoints": o.endpoints,
        "conditions": c.merge_conditions(
            existing_conditions, model_conditions(model, validation, observed), now=now, generation=generation
        ),
    }
    if weight_bytes is not None:
        status["weightBytes"] = weight_bytes
    return status


def status_changed(current: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether writing `new` would change anything (avoids a status write, and a watch event, per tick)."""
    current = current or {}
    return any(current.get(k) != v for k, v in new.items())
