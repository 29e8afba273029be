"""`warmserve.controller.crdrules`: every CEL rule of the shipped CRDs, as Python, agreeing with cel-python."""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

import pytest
import yaml
from controller_support import CRD_DIR, REPO
from test_controller_schema import apply_defaults, cel_rules, samples, schema_errors, version_schema

from warmserve.controller.crdrules import RULES

celpy = pytest.importorskip("celpy", reason="the rules are compared with cel-python")


def crd_rules() -> list[str]:
    rules = []
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            rules += [rule["rule"] for _, rule, _ in cel_rules(version["schema"]["openAPIV3Schema"])]
    return rules


def objects() -> list[dict[str, Any]]:
    """Schema-valid objects: the samples and the hostile corpus (those the schema lets through to CEL)."""
    out = list(samples())
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for path in sorted((REPO / "tests" / "hostile" / "crs").glob("*.yaml")):
        out += [d for d in yaml.load_all(path.read_text(), Loader=loader) if d]
    return [o for o in out if o.get("kind") in ("WarmPool", "ModelDeployment") and not schema_errors(o["kind"], o)]


def test_every_crd_rule_has_a_python_twin():
    assert sorted(set(crd_rules())) == sorted(RULES), "a CEL rule of crds/ is missing from crdrules.RULES"


#: Nodes for outcomes the schema makes unreachable (an hf:// source of 5 characters is shorter than minLength).
EXTRA = {"!self.source.startsWith('hf://') || size(self.source) > 5": [{"source": "hf://"}]}


def test_the_python_twins_agree_with_cel_on_samples_and_the_hostile_corpus():
    env = celpy.Environment()
    programs = {rule: env.program(env.compile(rule)) for rule in RULES}
    outcomes: dict[str, set[bool]] = defaultdict(set)
    for rule, nodes in EXTRA.items():
        for node in nodes:
            expected = bool(programs[rule].evaluate({"self": celpy.json_to_cel(node)}))
            assert RULES[rule](node) == expected
            outcomes[rule].add(expected)
    for obj in objects():
        schema = version_schema(obj["kind"])
        defaulted = apply_defaults(schema, copy.deepcopy(obj))
        for path, rule, _ in cel_rules(schema):
            node: Any = defaulted
            for part in [p for p in path.split(".") if p]:
                node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                continue
            expected = bool(programs[rule["rule"]].evaluate({"self": celpy.json_to_cel(node)}))
            assert RULES[rule["rule"]](node) == expected, (rule["rule"], obj["metadata"]["name"])
            outcomes[rule["rule"]].add(expected)
    for rule in RULES:
        assert outcomes[rule] == {True, False}, f"{rule}: the objects do not exercise both outcomes"
