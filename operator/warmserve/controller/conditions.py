"""metav1.Condition bookkeeping, pure.

Conventions (Kubernetes API conventions, kubebuilder's Memcached sample, cert-manager's SetCondition):
`type` CamelCase, `status` True/False/Unknown, `reason` CamelCase and never empty, `lastTransitionTime`
changed only when `status` flips (so "how long has it been degraded?" stays answerable), and
`observedGeneration` telling which spec the condition was computed from.

Condition types:
  ModelDeployment: Valid (spec makes sense against its pool), Ready (minimum serving replicas are ready),
                   Prewarmed (every warm replica the plan asks for is loaded), Degraded (something is wrong
                   that the operator cannot fix by itself).
  WarmPool:        Ready (every expected worker reports state), Degraded (worker errors, bad annotations),
                   InferencePool (only with the operator's --inference-pool: the pool's InferencePool was
                   written, or why the API refused it).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

VALID = "Valid"
READY = "Ready"
PREWARMED = "Prewarmed"
DEGRADED = "Degraded"
INFERENCE_POOL = "InferencePool"

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"
_CAMEL = re.compile(r"^[A-Z][A-Za-z0-9]*$")


def now_rfc3339(clock: dt.datetime | None = None) -> str:
    """Kubernetes' metav1.Time format: RFC 3339 in UTC, whole seconds, `Z` suffix."""
    moment = clock or dt.datetime.now(dt.UTC)
    return moment.astimezone(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Condition:
    """A desired condition; the transition time is filled in by `merge_conditions`."""

    type: str
    status: str
    reason: str
    message: str = ""

    def __post_init__(self) -> None:
        if not _CAMEL.match(self.type):
            raise ValueError(f"condition type {self.type!r} must be CamelCase")
        if self.status not in (TRUE, FALSE, UNKNOWN):
            raise ValueError(f"condition status {self.status!r} must be True, False or Unknown")
        if not _CAMEL.match(self.reason or ""):
            raise ValueError(f"condition {self.type}: reason {self.reason!r} must be non-empty CamelCase")


def merge_conditions(
    existing: Iterable[Mapping[str, Any]] | None,
    desired: Iterable[Condition],
    *,
    now: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """Return the new condition list: desired conditions replace those of the same type.

    The transition time of a condition whose status did not change is kept; conditions of other types
    that are already present are kept as they are (another writer may own them). Sorted by type, so the
    result is stable and a no-op patch can be detected by comparison.
    """
    by_type: dict[str, dict[str, Any]] = {str(c.get("type")): dict(c) for c in existing or () if c.get("type")}
    for cond in desired:
        old = by_type.get(cond.type)
        flipped = old is None or old.get("status") != cond.status or not old.get("lastTransitionTime")
        new: dict[str, Any] = {
            "type": cond.type,
            "status": cond.status,
            "reason": cond.reason,
            "message": cond.message,
            "lastTransitionTime": now if flipped or old is None else old["lastTransitionTime"],
        }
        if generation is not None:
            new["observedGeneration"] = generation
        by_type[cond.type] = new
    return [by_type[t] for t in sorted(by_type)]
