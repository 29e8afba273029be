"""The CRDs' CEL rules as Python, for callers without a CEL evaluator (`warmserve up` checks its YAML with them).

`RULES` maps the exact text of every `x-kubernetes-validations` rule of `crds/` to a function of the rule's node
(after the schema's defaults are applied, which the API server does before CEL runs) that returns what the rule
returns. `tests/controller/test_controller_crdrules.py` checks that every rule of the shipped CRDs is here and
that each function agrees with cel-python on the sample objects and the hostile corpus.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

_CONTROL_PLANE = ("node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master")
_PAGE_SIZES = tuple(1 << n for n in range(16, 31))  # 65536 .. 1 GiB
_DOTDOT = re.compile(r"(^|/)[.][.](/|$)")


def _path_ok(path: str) -> bool:
    return path != "/" and "/../" not in path and not path.endswith("/..")


RULES: dict[str, Callable[[Any], bool]] = {
    # ModelDeployment
    "self.tensorParallelSize in [1, 2, 4, 8, 16, 32, 64]": lambda s: (
        s["tensorParallelSize"] in (1, 2, 4, 8, 16, 32, 64)
    ),
    "!self.source.startsWith('hf://') || size(self.source) > 5": lambda s: (
        not s["source"].startswith("hf://") or len(s["source"]) > 5
    ),
    "!self.source.matches('(^|/)[.][.](/|$)')": lambda s: _DOTDOT.search(s["source"]) is None,
    "self.minReplicas <= self.maxReplicas": lambda s: s["minReplicas"] <= s["maxReplicas"],
    # WarmPool
    "self.gpu.count > 0 || !has(self.gpu.product) || size(self.gpu.product) == 0": lambda s: (
        s["gpu"]["count"] > 0 or "product" not in s["gpu"] or len(s["gpu"]["product"]) == 0
    ),
    "self.count in [0, 1, 2, 4, 8, 16]": lambda s: s["count"] in (0, 1, 2, 4, 8, 16),
    "self.all(t, has(t.key) && size(t.key) > 0)": lambda s: all(bool(t.get("key")) for t in s),
    "self.all(t, !has(t.key) || !(t.key in ['node-role.kubernetes.io/control-plane', "
    "'node-role.kubernetes.io/master']))": lambda s: all(t.get("key") not in _CONTROL_PLANE for t in s),
    "self.pageSizeBytes in [65536, 131072, 262144, 524288, 1048576, 2097152, 4194304, 8388608, 16777216, 33554432, "
    "67108864, 134217728, 268435456, 536870912, 1073741824]": lambda s: s["pageSizeBytes"] in _PAGE_SIZES,
    "!(has(self.persistentVolumeClaimName) && has(self.hostPath))": lambda s: (
        not ("persistentVolumeClaimName" in s and "hostPath" in s)
    ),
    "!has(self.hostPath) || (self.hostPath != '/' && !self.hostPath.contains('/../') && "
    "!self.hostPath.endsWith('/..'))": lambda s: "hostPath" not in s or _path_ok(s["hostPath"]),
    "self.mountPath != '/' && !self.mountPath.contains('/../') && !self.mountPath.endsWith('/..')": lambda s: _path_ok(
        s["mountPath"]
    ),
    "86400 % self.windowSeconds == 0": lambda s: 86400 % s["windowSeconds"] == 0,
    "self.scaleDownUtilization < self.scaleUpUtilization": lambda s: (
        s["scaleDownUtilization"] < s["scaleUpUtilization"]
    ),
    "self.kind != 'prometheus' || has(self.prometheusUrl)": lambda s: s["kind"] != "prometheus" or "prometheusUrl" in s,
}
