"""`warmserve up`'s input: WarmPool and ModelDeployment objects from YAML, checked like the API server would.

Every object is validated as the API server validates it, against the same CRD (shipped in `crds/` beside this
module, kept byte-identical to the repository's `crds/` by a test): the `openAPIV3Schema` with unknown fields
refused (`kubectl apply`'s strict field validation), then the CRD's CEL rules (`x-kubernetes-validations`) on
the object with the schema's defaults applied. So a file that `warmserve up` accepts is one `kubectl apply`
accepts too, and a bad file gets a one-line error naming the document and the field. The objects themselves
are returned without the defaults: those are applied by the operator's own spec parsers. Without a WarmPool,
one local pool is used: the CPU (host shared memory), or the machine's CUDA GPUs.
"""

from __future__ import annotations

import copy
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from warmserve.local import cel
from warmserve.protocol import GROUP, VERSION, forbidden_engine_flag

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


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever the CRD neither preserves them nor types them (as
    `kubectl apply` does with its default strict field validation); `metadata` stays a free object."""
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in out
    ):
        out["additionalProperties"] = False
    return out


def _defaulted(schema: Mapping[str, Any], obj: Any) -> Any:
    """`obj` with the schema's `default`s filled in, parents before children (the API server's defaulting)."""
    if isinstance(obj, dict) and "properties" in schema:
        obj = dict(obj)
        for key, sub in schema["properties"].items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
            if key in obj:
                obj[key] = _defaulted(sub, obj[key])
    elif isinstance(obj, list) and "items" in schema:
        return [_defaulted(schema["items"], v) for v in obj]
    return obj


def cel_rules(
    schema: Mapping[str, Any], path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    """Every `x-kubernetes-validations` entry of `schema` with the path of the node that carries it ("[]": each
    item of a list, "{}": each value of a map)."""
    for rule in schema.get("x-kubernetes-validations", ()):
        yield path, rule
    for key, sub in (schema.get("properties") or {}).items():
        yield from cel_rules(sub, (*path, key))
    if isinstance(schema.get("items"), dict):
        yield from cel_rules(schema["items"], (*path, "[]"))
    if isinstance(schema.get("additionalProperties"), dict):
        yield from cel_rules(schema["additionalProperties"], (*path, "{}"))


def _nodes(value: Any, path: tuple[str, ...], where: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    """The values at `path` in `value` (present ones only), each with its dotted field path."""
    if not path:
        yield ".".join(where), value
        return
    head, rest = path[0], path[1:]
    if head == "[]":
        if isinstance(value, list):
            for i, item in enumerate(value):
                yield from _nodes(item, rest, (*where[:-1], f"{where[-1]}[{i}]") if where else (f"[{i}]",))
    elif head == "{}":
        if isinstance(value, dict):
            for key, item in value.items():
                yield from _nodes(item, rest, (*where, str(key)))
    elif isinstance(value, dict) and value.get(head) is not None:
        yield from _nodes(value[head], rest, (*where, head))


def _check_cel(schema: Mapping[str, Any], doc: Mapping[str, Any], where: str) -> None:
    """The CRD's CEL rules on the defaulted object; the API server evaluates a rule only where its value is."""
    obj = _defaulted(schema, doc)
    for path, rule in cel_rules(schema):
        try:
            cel.compile_rule(rule["rule"])
        except cel.CelSyntaxError as exc:
            raise ConfigError(f"{where}: this warmserve cannot check the CRD rule {rule['rule']!r}: {exc}") from exc
        for field, node in _nodes(obj, path):
            if not cel.holds(rule["rule"], node):
                extra = tuple(p for p in rule.get("fieldPath", "").split(".") if p)
                name = ".".join((field, *extra)) if field else ".".join(extra) or "(the object)"
                raise ConfigError(f"{where}: {name}: {_one_line(rule.get('message') or 'failed ' + rule['rule'])}")


def _check(doc: Mapping[str, Any], where: str) -> None:
    import jsonschema

    schema = _schema(doc["kind"])
    validator = jsonschema.Draft202012Validator(_strict(schema))
    errors = sorted(validator.iter_errors(dict(doc)), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        field = ".".join(str(p) for p in e.absolute_path) or "(the object)"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(f"{where}: {field}: {_one_line(e.message)}{more}")
    _check_cel(schema, doc, where)


#: flags of `spec.engine.args` that have a field of their own
_OWN_FIELD = {"--max-model-len": "spec.engine.maxModelLen", "--dtype": "spec.model.dtype"}


def _check_engine_args(doc: Mapping[str, Any], where: str) -> None:
    """Refuse a flag the worker sets itself (`warmserve.protocol.FORBIDDEN_ENGINE_FLAGS`), as the operator does
    (a `ForbiddenEngineFlag` condition there; an error here, before anything starts)."""
    args = (doc["spec"].get("engine") or {}).get("args") or []
    flag = forbidden_engine_flag(args)
    if flag is None:
        return
    if flag in _OWN_FIELD:
        raise ConfigError(f"{where}: spec.engine.args: {flag} may not be an engine argument: set {_OWN_FIELD[flag]}")
    raise ConfigError(f"{where}: spec.engine.args: {flag} may not be an engine argument: the worker sets it")


def _one_line(text: str) -> str:
    return " ".join(text.split())


#: engines of `warmserve up` listen from this port on (the pool's `worker.enginePortBase`)
LOCAL_ENGINE_PORT = 18100


def default_pool(gpus: int = 0, memory_mib: int = 4096, cache: str = "/models") -> dict[str, Any]:
    """The pool `warmserve up` uses when the file has none: this machine's GPUs, or its CPU, with its model cache
    at `cache` (model sources must resolve inside it, as on a cluster)."""
    return {
        "apiVersion": API_VERSION,
        "kind": "WarmPool",
        "metadata": {"name": LOCAL_POOL},
        "spec": {
            "gpu": {"count": gpus, "memoryMiB": memory_mib},
            "worker": {"enginePortBase": LOCAL_ENGINE_PORT},
            "modelCache": {"mountPath": cache},
            "forecast": {"windowSeconds": 60},
            "policy": {"intervalSeconds": 1},
        },
    }


def model_cache_of(models: Iterable[Mapping[str, Any]]) -> str:
    """The local pool's cache: the deepest directory holding every `file://` model directory of the file."""
    parents = [
        os.path.dirname(os.path.normpath(source.removeprefix("file://")))
        for m in models
        if isinstance(source := (m.get("spec") or {}).get("model", {}).get("source"), str)
        and source.startswith("file:///")
    ]
    return os.path.commonpath(parents) if parents else "/models"


def _uid(doc: Mapping[str, Any]) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"warmserve-up/{doc['kind']}/{doc['metadata']['name']}"))


def parse_documents(docs: Iterable[Any], source: str, pool: Mapping[str, Any] | None = None) -> LocalConfig:
    """Validate the documents of `source`; `pool` is the default pool used when they contain none."""
    pools: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    names: set[tuple[str, str]] = set()
    served_by: dict[str, str] = {}  # served name → the ModelDeployment serving it
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
            raise ConfigError(f"{where}: metadata.name: {kind} {name!r} is defined twice")
        names.add((kind, name))
        if kind == "WarmPool" and pools:
            raise ConfigError(
                f"{where}: warmserve up runs one WarmPool, and {pools[0]['metadata']['name']} is already defined"
            )
        if kind == "ModelDeployment":
            _check_engine_args(doc, where)
            given = doc["spec"]["model"].get("servedName")
            served = given or name
            if served in served_by:
                field = "spec.model.servedName" if given else "metadata.name (the default served name)"
                raise ConfigError(
                    f"{where}: {field}: {served!r} is already served by ModelDeployment {served_by[served]}"
                )
            served_by[served] = name
        doc = {**doc, "metadata": {**doc["metadata"], "namespace": NAMESPACE}}
        doc["metadata"]["uid"] = _uid(doc)
        (pools if kind == "WarmPool" else models).append(doc)
    if not models:
        raise ConfigError(f"{source}: no ModelDeployment to serve")
    chosen = pools[0] if pools else dict(pool or default_pool(cache=model_cache_of(models)))
    chosen.setdefault("metadata", {}).setdefault("uid", _uid(chosen))
    pool_name = chosen["metadata"]["name"]
    for m in models:
        ref = (m["spec"].get("poolRef") or {}).get("name")
        if ref != pool_name and ref != LOCAL_POOL:
            defined = f"the file defines WarmPool {pool_name}" if pools else "the file defines no WarmPool"
            raise ConfigError(
                f"{source}: ModelDeployment {m['metadata']['name']}: spec.poolRef.name: no WarmPool {ref!r} "
                f"({defined}; without poolRef a model goes to the file's pool or the local one)"
            )
        m["spec"] = {**m["spec"], "poolRef": {"name": pool_name}}
    return LocalConfig(chosen, tuple(models))


def load(path: str, pool: Mapping[str, Any] | None = None) -> LocalConfig:
    """Read and validate a YAML file of WarmPool/ModelDeployment documents."""
    try:
        with open(path) as fh:
            docs = list(yaml.safe_load_all(fh))
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from exc
    return parse_documents(docs, path, pool)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: where, what, and in which construct."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return _one_line(str(exc))
    text = ""
    if exc.problem_mark is not None:
        text = f"line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}: "
    text += exc.problem or "syntax error"
    if exc.context:
        text += f" ({exc.context}"
        if exc.context_mark is not None:
            text += f" at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1}"
        text += ")"
    return _one_line(text)
