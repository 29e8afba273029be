"""`warmserve up`'s input: WarmPool and ModelDeployment objects from YAML, checked like the API server would.

Every object is validated against the same CRD `openAPIV3Schema` the cluster uses (shipped in `crds/` beside
this module, kept byte-identical to the repository's `crds/` by a test), so a file that `warmserve up`
accepts is one `kubectl apply` accepts too, and a bad file gets an error naming the document and the field.
Defaults are applied by the operator's own spec parsers. Without a WarmPool, one local pool is used: the
CPU (host shared memory), or the machine's CUDA GPUs.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from warmserve.protocol import GROUP, VERSION

API_VERSION = f"{GROUP}/{VERSION}"
KINDS = {"WarmPool": "warmserve.io_warmpools.yaml", "ModelDeployment": "warmserve.io_modeldeployments.yaml"}
LOCAL_POOL = "local"
NAMESPACE = "local"


class ConfigError(ValueError):
    """The file cannot be served as it is; the message names the document and the field."""


@dataclass(frozen=True)
class LocalConfig:
    pool: dict[str, Any]  # one WarmPool object (metadata.uid set)
    models: tuple[dict[str, Any], ...]  # its ModelDeployments (metadata.uid set, poolRef filled in)


def _schema(kind: str) -> Mapping[str, Any]:
    text = resources.files("warmserve.local").joinpath("crds").joinpath(KINDS[kind]).read_text()
    crd = yaml.safe_load(text)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == VERSION)
    return version["schema"]["openAPIV3Schema"]


def _check(doc: Mapping[str, Any], where: str) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(_schema(doc["kind"]))
    errors = sorted(validator.iter_errors(dict(doc)), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        field = ".".join(str(p) for p in e.absolute_path) or "(the object)"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(f"{where}: {field}: {e.message}{more}")


def default_pool(gpus: int = 0, memory_mib: int = 4096) -> dict[str, Any]:
    """The pool `warmserve up` uses when the file has none: this machine's GPUs, or its CPU."""
    return {
        "apiVersion": API_VERSION,
        "kind": "WarmPool",
        "metadata": {"name": LOCAL_POOL},
        "spec": {
            "gpu": {"count": gpus, "memoryMiB": memory_mib},
            "forecast": {"windowSeconds": 60},
            "policy": {"intervalSeconds": 1},
        },
    }


def _uid(doc: Mapping[str, Any]) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"warmserve-up/{doc['kind']}/{doc['metadata']['name']}"))


def parse_documents(docs: Iterable[Any], source: str, pool: Mapping[str, Any] | None = None) -> LocalConfig:
    """Validate the documents of `source`; `pool` is the default pool used when they contain none."""
    pools: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    names: set[tuple[str, str]] = set()
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        where = f"{source}, document {i + 1}"
        if not isinstance(doc, dict):
            raise ConfigError(f"{where}: expected an object with apiVersion, kind, metadata and spec")
        kind = doc.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"{where}: kind must be one of {sorted(KINDS)}, got {kind!r}")
        if doc.get("apiVersion") != API_VERSION:
            raise ConfigError(f"{where}: apiVersion must be {API_VERSION}, got {doc.get('apiVersion')!r}")
        name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: metadata.name is required")
        where = f"{source}: {kind} {name}"
        if kind == "ModelDeployment" and isinstance(doc.get("spec"), dict) and "poolRef" not in doc["spec"]:
            doc = {**doc, "spec": {**doc["spec"], "poolRef": {"name": LOCAL_POOL}}}  # the file's pool, below
        _check(doc, where)
        if (kind, name) in names:
            raise ConfigError(f"{where}: defined twice")
        names.add((kind, name))
        doc = {**doc, "metadata": {**doc["metadata"], "namespace": NAMESPACE}}
        doc["metadata"]["uid"] = _uid(doc)
        (pools if kind == "WarmPool" else models).append(doc)
    if len(pools) > 1:
        raise ConfigError(f"{source}: warmserve up runs one WarmPool, found {len(pools)}")
    if not models:
        raise ConfigError(f"{source}: no ModelDeployment to serve")
    chosen = pools[0] if pools else dict(pool or default_pool())
    chosen.setdefault("metadata", {}).setdefault("uid", _uid(chosen))
    pool_name = chosen["metadata"]["name"]
    for m in models:
        ref = (m["spec"].get("poolRef") or {}).get("name")
        if ref != pool_name and ref != LOCAL_POOL:
            raise ConfigError(
                f"{source}: ModelDeployment {m['metadata']['name']}: spec.poolRef.name: no WarmPool {ref!r}"
            )
        m["spec"] = {**m["spec"], "poolRef": {"name": pool_name}}
    served = [m["spec"].get("model", {}).get("servedName") or m["metadata"]["name"] for m in models]
    if len(set(served)) != len(served):
        raise ConfigError(f"{source}: two ModelDeployments serve the same name: {sorted(served)}")
    return LocalConfig(chosen, tuple(models))


def load(path: str, pool: Mapping[str, Any] | None = None) -> LocalConfig:
    """Read and validate a YAML file of WarmPool/ModelDeployment documents."""
    try:
        with open(path) as fh:
            docs = list(yaml.safe_load_all(fh))
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_documents(docs, path, pool)
