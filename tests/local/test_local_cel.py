"""`warmserve up`'s CEL subset (warmserve.local.cel) against cel-python, on expressions and on every rule of the
CRDs: so a rule added to crds/ is either checked the way the API server checks it, or this test fails."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from warmserve.local import cel
from warmserve.local.config import _defaulted, _nodes, cel_rules

REPO = Path(__file__).resolve().parents[2]
celpy = pytest.importorskip("celpy", reason="compared with cel-python (the dev extra)")

SELF = {
    "a": 3,
    "b": 0,
    "f": 0.5,
    "s": "file:///models/x",
    "l": [1, 2, 4],
    "m": {"k": "v", "n": 2},
    "ts": [{"key": "a"}, {"operator": "Exists"}, {"key": ""}],
    "t": True,
}
EXPRESSIONS = [
    "self.a in [1, 2, 4]",
    "self.a in self.l",
    "'k' in self.m",
    "self.a > 0 || self.missing",  # the error on one side is absorbed
    "self.missing || self.a > 0",
    "self.b > 0 && self.missing",
    "self.missing && self.b > 0",
    "!has(self.m.x) || size(self.m.x) > 0",
    "has(self.m.k) && size(self.m.k) == 1",
    "86400 % self.a == 0",
    "7 % -3 == 1 && -7 % 3 == -1 && -7 / 2 == -3",
    "self.f < 1.0 && self.f * 2.0 == 1.0",
    "self.a + 1 == 4 && self.a - 4 == -1 && self.a * 2 == 6 && self.a / 2 == 1",
    "self.s.startsWith('file://') && self.s.endsWith('/x') && self.s.contains('models')",
    "!self.s.matches('(^|/)[.][.](/|$)')",
    "'a/../b'.matches('(^|/)[.][.](/|$)')",
    "self.ts.all(t, has(t.key) && size(t.key) > 0)",
    "self.ts.exists(t, has(t.key) && t.key == 'a')",
    "self.ts.exists_one(t, has(t.key))",
    "self.l.all(x, x > 0)",
    "self.l.map(x, x * 2) == [2, 4, 8]",
    "self.l.filter(x, x > 1) == [2, 4]",
    "size(self.l) == 3 && self.l.size() == 3 && size(self.m) == 2",
    "self.l[0] == 1 && self.m['n'] == 2",
    "self.t ? self.a == 3 : self.missing",
    "self.t == true && self.m.k != 'w' && null == null",
    "int('12') == 12 && double(1) == 1.0 && string(5) == '5'",
    "(self.a > 1) == true",
    "\"dq\" + 'sq' == 'dqsq'",
    "self.s < 'g' && 'b' >= 'a'",
]
ERRORS = [  # both evaluators fail these
    "self.missing > 0",
    "self.a / self.b == 0",
    "self.a % self.b == 0",
    "self.a + 'x' == 'x'",
    "self.ts.all(t, size(t.key) >= 0)",  # a toleration without a key: an error, and no element is false
    "self.l[7] == 1",
]


def reference(text: str, value: Any) -> Any:
    env = celpy.Environment()
    result = env.program(env.compile(text)).evaluate({"self": celpy.json_to_cel(value)})
    if isinstance(result, celpy.CELEvalError):
        raise result
    return result


def ours(text: str, value: Any) -> Any:
    return cel.compile_rule(text).evaluate({"self": value})


@pytest.mark.parametrize("text", EXPRESSIONS)
def test_expression_agrees_with_cel_python(text):
    # (cel-python refuses `1 == 1.0`, which the API server's cel-go accepts: not compared here)
    expected = reference(text, SELF)
    got = ours(text, SELF)
    assert got == expected and type(got) is type(bool(got)) is type(bool(expected)), (got, expected)


@pytest.mark.parametrize("text", ERRORS)
def test_evaluation_errors_agree_with_cel_python(text):
    with pytest.raises(celpy.CELEvalError):
        reference(text, SELF)
    with pytest.raises(cel.CelError):
        ours(text, SELF)
    assert cel.holds(text, SELF) is False  # an error fails the rule


@pytest.mark.parametrize("text", ["self.a ==", "self.a in [1,", "foo(", "self.a @ 2", "'unterminated", "1u == 1"])
def test_what_is_not_supported_cel_is_a_syntax_error(text):
    with pytest.raises(cel.CelSyntaxError):
        cel.compile_rule(text)


# ------------------------------------------------------------------------------------------ the CRDs' rules
def crd_schemas() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted((REPO / "operator" / "warmserve" / "local" / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            yield crd["spec"]["names"]["kind"], version["schema"]["openAPIV3Schema"]


def crd_rules() -> list[tuple[str, tuple[str, ...], str]]:
    return [(kind, path, rule["rule"]) for kind, schema in crd_schemas() for path, rule in cel_rules(schema)]


def test_the_crds_have_rules_and_each_compiles():
    rules = crd_rules()
    assert len(rules) >= 10
    for _, _, text in rules:
        cel.compile_rule(text)  # raises CelSyntaxError for a construct warmserve up cannot check


def _documents() -> dict[str, list[dict[str, Any]]]:
    """Valid objects (the shipped examples) and variations that break each kind of rule."""
    docs: dict[str, list[dict[str, Any]]] = {"WarmPool": [], "ModelDeployment": []}
    for path in sorted((REPO / "manifests" / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") in docs:
                docs[doc["kind"]].append(doc)
    pools, models = docs["WarmPool"], docs["ModelDeployment"]
    for change in (
        {"gpu": {"count": 3}},
        {"gpu": {"count": 0, "product": ["A100"]}},
        {"forecast": {"windowSeconds": 7000}},
        {"policy": {"scaleDownUtilization": 0.9}},
        {"loadSource": {"kind": "prometheus"}},
        {"modelCache": {"persistentVolumeClaimName": "c", "hostPath": "/m"}},
        {"modelCache": {"hostPath": "/a/../b"}},
        {"modelCache": {"mountPath": "/"}},
        {"tolerations": [{"operator": "Exists"}]},
        {"tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]},
        {"tolerations": [{"key": "x", "operator": "Exists"}]},
        {"worker": {"pageSizeBytes": 1000}},
    ):
        doc = copy.deepcopy(pools[0])
        doc["spec"].update(change)
        pools.append(doc)
    for model_change in ({"tensorParallelSize": 3}, {"source": "hf://"}, {"source": "file:///m/../etc"}):
        doc = copy.deepcopy(models[0])
        doc["spec"]["model"].update(model_change)
        models.append(doc)
    doc = copy.deepcopy(models[0])
    doc["spec"]["scaling"] = {"minReplicas": 5, "maxReplicas": 2}
    models.append(doc)
    return docs


def test_every_crd_rule_agrees_with_cel_python_on_valid_and_invalid_objects():
    docs = _documents()
    outcomes: dict[str, set[bool]] = {}
    for kind, schema in crd_schemas():
        for doc in docs[kind]:
            obj = _defaulted(schema, doc)
            for path, rule in cel_rules(schema):
                for field, node in _nodes(obj, path):
                    try:
                        expected = bool(reference(rule["rule"], node))
                    except celpy.CELEvalError:
                        expected = False
                    assert cel.holds(rule["rule"], node) == expected, (rule["rule"], field, node)
                    outcomes.setdefault(rule["rule"], set()).add(expected)
    for _, _, text in crd_rules():
        assert outcomes.get(text) == {True, False}, f"{text}: not exercised both ways; add a variation above"
