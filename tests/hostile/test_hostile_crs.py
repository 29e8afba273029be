"""The hostile corpus: every WarmPool and ModelDeployment under tests/hostile/crs/ is refused, none crashes.

Each object carries `hostile.warmserve.io/expect` (which layer must refuse it) and `hostile.warmserve.io/field`
(the field the refusal must name). It goes through the layers a real cluster applies, in order:

1. `schema`: the CRD's `openAPIV3Schema` with unknown fields refused (kubectl's strict field validation), with
   Go's regular-expression semantics for `pattern` (`$` is the end of the text, as in RE2);
2. `cel`: the CRD's `x-kubernetes-validations`, evaluated with cel-python on the object with the schema's
   defaults applied (only where the rule's node is present, as the API server does);
3. `condition:<Reason>`: the operator's own validation (`reconcile.validate_pool` against the default operator
   settings; `reconcile.validate_model` against a reference pool `gpu-pool`), which must give that reason.

The first layer that refuses is the one the object must name; an object that passes all three is "silently
accepted" and fails the run. Independently of the layers, the operator's parsers and validators run on every
object (as they would on an object the API server never checked: stored before the CRD was tightened, an
emulator, a local file) and must never raise; a valid pool's DaemonSet is built too. The table of outcomes is
printed at the end of the run (conftest.py) and by `python tests/hostile/test_hostile_crs.py`.
"""

from __future__ import annotations

import copy
import functools
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from warmserve.controller import builders, reconcile
from warmserve.controller.settings import SpecRules
from warmserve.controller.spec import parse_model_spec, parse_pool_spec

REPO = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "crs"
EXPECT, FIELD = "hostile.warmserve.io/expect", "hostile.warmserve.io/field"
MIN_CORPUS = 60
#: The pool ModelDeployments of the corpus name (`spec.poolRef.name: gpu-pool`): 8 × 80 GB, a claim as cache.
REFERENCE_POOL = parse_pool_spec(
    {
        "gpu": {"count": 8, "memoryMiB": 81920},
        "modelCache": {"persistentVolumeClaimName": "weights", "mountPath": "/models"},
    }
)
DEFAULT_WEIGHT = 13_476_839_424  # what the operator would read from the headers when the spec omits it


# ------------------------------------------------------------------------------------------------ loading
def load_corpus() -> list[tuple[str, dict[str, Any]]]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader does not recurse in Python
    cases = []
    for path in sorted(CORPUS.glob("*.yaml")):
        for doc in yaml.load_all(path.read_text(), Loader=loader):
            if doc:
                cases.append((f"{path.name}:{doc['metadata']['name']}", doc))
    return cases


@functools.cache
def crd_schema(kind: str) -> dict[str, Any]:
    """The CRD's openAPIV3Schema (cached: treat it as read-only)."""
    for path in sorted((REPO / "crds").glob("*.yaml")):
        doc = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if doc["spec"]["names"]["kind"] == kind:
            return doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    raise KeyError(kind)


# ------------------------------------------------------------------------------------------------ layer 1
def _strict(schema: Any) -> Any:
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


def _go_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    """`pattern` as the API server (Go RE2) applies it: `$` matches only at the end of the text (Python's `$`
    also matches before a final newline, so "name\\n" would pass `^[a-z]+$`)."""
    if not isinstance(instance, str):
        return
    match = re.search(pattern, instance)
    if match is None or (pattern.endswith("$") and match.end() != len(instance)):
        yield jsonschema.ValidationError(f"{instance[:60]!r} does not match {pattern!r}")


GoValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"pattern": _go_pattern})


def _where(path: Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(the object)"


@functools.cache
def _validator(kind: str) -> Any:
    return GoValidator(_strict(crd_schema(kind)))


def schema_refusal(kind: str, doc: dict[str, Any]) -> str | None:
    """The first schema error, as `<field>: <message>`, or None."""
    validator = _validator(kind)
    errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    if not errors:
        return None
    first = errors[0]
    return f"{_where(first.absolute_path)}: {first.message}"


# ------------------------------------------------------------------------------------------------ layer 2
def _defaulted(schema: dict[str, Any], obj: Any) -> Any:
    if isinstance(obj, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
            if key in obj:
                obj[key] = _defaulted(sub, obj[key])
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [_defaulted(schema["items"], v) for v in obj]
    return obj


def _rules(schema: dict[str, Any], path: tuple[str, ...] = ()) -> Any:
    for rule in schema.get("x-kubernetes-validations", ()):
        yield path, rule
    for key, sub in (schema.get("properties") or {}).items():
        yield from _rules(sub, (*path, key))


@functools.cache
def _program(rule: str) -> Any:
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_refusal(kind: str, doc: dict[str, Any]) -> str | None:
    """The first CEL rule the defaulted object breaks, as `<field>: <message>`, or None."""
    import celpy

    schema = crd_schema(kind)
    obj = _defaulted(schema, copy.deepcopy(doc))
    for path, rule in _rules(schema):
        node: Any = obj
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            continue
        program = _program(rule["rule"])
        try:
            ok = bool(program.evaluate({"self": celpy.json_to_cel(node)}))
        except celpy.CELEvalError:
            ok = False  # an evaluation error refuses the object, as on the API server
        if not ok:
            return f"{'.'.join(path)}{rule.get('fieldPath', '')}: {rule['message']}"
    return None


# ------------------------------------------------------------------------------------------------ layer 3
def operator_validation(kind: str, doc: dict[str, Any]) -> reconcile.Validation:
    """What the operator concludes about the object (never raises: a raise fails the test)."""
    rules = SpecRules()
    spec = doc.get("spec")
    if kind == "WarmPool":
        pool = parse_pool_spec(spec)  # type: ignore[arg-type]
        validation = reconcile.validate_pool(pool, rules)
        if validation.ok:
            builders.build_worker_daemonset(doc["metadata"]["name"], "ns", pool)
        return validation
    model = parse_model_spec(doc["metadata"]["name"], spec)  # type: ignore[arg-type]
    pool = REFERENCE_POOL if model.pool == "gpu-pool" else None
    pool_validation = reconcile.validate_pool(REFERENCE_POOL, rules)
    return reconcile.validate_model(model, pool, model.weight_bytes or DEFAULT_WEIGHT, rules, pool_validation)


@dataclass(frozen=True)
class Outcome:
    case: str
    kind: str
    expected: str
    refused_by: str  # schema | cel | condition:<Reason> | accepted
    message: str
    operator: str  # the operator's own verdict on the raw object (its reason)


def judge(case: str, doc: dict[str, Any]) -> Outcome:
    kind = doc["kind"]
    operator = operator_validation(kind, doc)  # always, and before the layers: it must never raise
    expected = doc["metadata"]["annotations"][EXPECT]
    message = schema_refusal(kind, doc)
    if message is not None:
        return Outcome(case, kind, expected, "schema", message, operator.reason)
    message = cel_refusal(kind, doc)
    if message is not None:
        return Outcome(case, kind, expected, "cel", message, operator.reason)
    if not operator.ok:
        return Outcome(case, kind, expected, f"condition:{operator.reason}", operator.message, operator.reason)
    return Outcome(case, kind, expected, "accepted", "", operator.reason)


RESULTS: list[Outcome] = []  # filled by the tests, printed by conftest.py
CASES = load_corpus()


def test_the_corpus_is_big_enough_and_covers_both_kinds():
    kinds = Counter(doc["kind"] for _, doc in CASES)
    assert len(CASES) >= MIN_CORPUS and kinds["WarmPool"] >= 20 and kinds["ModelDeployment"] >= 20, kinds
    names = [case for case, _ in CASES]
    assert len(set(names)) == len(names), "object names are unique per file"
    for _, doc in CASES:
        annotations = doc["metadata"].get("annotations") or {}
        assert annotations.get(FIELD) and re.fullmatch(r"schema|cel|condition:[A-Z][A-Za-z]+", annotations[EXPECT])


@pytest.mark.parametrize(("case", "doc"), CASES, ids=[c for c, _ in CASES])
def test_hostile_object_is_refused_where_expected_and_names_the_field(case, doc):
    outcome = judge(case, doc)
    RESULTS.append(outcome)
    assert outcome.refused_by != "accepted", f"{case}: silently accepted (the operator says {outcome.operator})"
    assert outcome.refused_by == outcome.expected, f"{case}: refused by {outcome.refused_by}: {outcome.message}"
    field = doc["metadata"]["annotations"][FIELD]
    name = [part for part in re.split(r"[.\[\]]", field) if part and not part.isdigit()][-1]
    assert name in outcome.message, f"{case}: the refusal does not name {field}: {outcome.message}"


def table(outcomes: list[Outcome]) -> str:
    counts = Counter(o.refused_by.split(":")[0] for o in outcomes)
    by_kind = Counter((o.kind, o.refused_by.split(":")[0]) for o in outcomes)
    lines = [f"{'object':<58} {'refused by':<42} message"]
    for o in outcomes:
        lines.append(f"{o.case[:58]:<58} {o.refused_by[:42]:<42} {o.message[:90]}")
    lines.append("")
    lines.append(
        f"{len(outcomes)} hostile objects: refused by schema {counts['schema']}, by CEL {counts['cel']}, "
        f"by condition {counts['condition']}; silently accepted {counts['accepted']}; crashes 0"
    )
    for kind in ("WarmPool", "ModelDeployment"):
        lines.append(
            f"  {kind}: schema {by_kind[kind, 'schema']}, CEL {by_kind[kind, 'cel']}, "
            f"condition {by_kind[kind, 'condition']}, accepted {by_kind[kind, 'accepted']}"
        )
    also = sum(1 for o in outcomes if o.refused_by in ("schema", "cel") and o.operator != "Validated")
    lines.append(f"  refused by the API server and also by the operator's own validation: {also}")
    return "\n".join(lines)


if __name__ == "__main__":  # python tests/hostile/test_hostile_crs.py
    outcomes = [judge(case, doc) for case, doc in CASES]
    print(table(outcomes))
    sys.exit(0 if all(o.refused_by == o.expected for o in outcomes) else 1)
