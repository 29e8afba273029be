"""What each worker can do (`warmserve.protocol.Capabilities`), applied to the plans at the controller boundary.

Pure, like the decide stage that calls it. The policy core plans for an ideal worker; a worker states what it
supports in its `warmserve.io/state` (`capabilities`), and the plan a worker gets never asks for more:

* `kvLend > 0` only to a worker advertising `kvLend` (the planner is also told not to lend on the others, see
  `no_lend_pods`, so no warm replica is placed in KV space that will not be lent);
* a `serve` replica with `tp > 1` only to a worker advertising `tpPromotion`; on any other it is planned as a
  `warm` replica (its weights stay, no engine starts) and the ModelDeployment's `Degraded` condition says why
  (`WorkerCapabilityMissing`);
* `standby: true` only to a worker advertising `standbyEngines`.

A worker that reports no state, or a state without `capabilities` (an older worker), supports none of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from warmserve.controller.reconcile import WorkerView
from warmserve.protocol import Capabilities, Plan, PlanGroup, PlanReplica, Role

NONE = Capabilities()


def capabilities_of(worker: WorkerView) -> Capabilities:
    """What `worker` says it supports (nothing when it does not say)."""
    if worker.state is None or worker.state.capabilities is None:
        return NONE
    return worker.state.capabilities


def no_lend_pods(workers: Iterable[WorkerView]) -> frozenset[str]:
    """The pods whose engines must not lend KV space (their worker does not advertise `kvLend`)."""
    return frozenset(w.pod for w in workers if not capabilities_of(w).kv_lend)


@dataclass(frozen=True)
class HeldBack:
    """A serve replica the policy wanted and the worker cannot run, planned as a warm replica instead."""

    uid: str
    pod: str
    gpus: tuple[int, ...]
    tp: int

    @property
    def message(self) -> str:
        return (
            f"{self.pod}: a tp={self.tp} engine on GPUs {list(self.gpus)} was not planned: the worker does not "
            "advertise tpPromotion"
        )


def _restrict_group(group: PlanGroup, caps: Capabilities, pod: str, held: list[HeldBack]) -> PlanGroup:
    out: list[PlanReplica] = []
    warm = {(r.uid, r.tp) for r in group.replicas if r.role == Role.WARM}
    for r in group.replicas:
        if r.role == Role.SERVE and r.tp > 1 and not caps.tp_promotion:
            held.append(HeldBack(r.uid, pod, group.gpus[: r.tp], r.tp))
            if (r.uid, r.tp) not in warm:
                out.append(replace(r, role=Role.WARM, kv_lend=0))
            continue
        if r.kv_lend and not caps.kv_lend:
            r = replace(r, kv_lend=0)
        if r.standby and not caps.standby_engines:
            r = replace(r, standby=False)
        out.append(r)
    return PlanGroup(group.gpus, tuple(out))


def restrict_plans(
    plans: Mapping[str, Plan], capabilities: Mapping[str, Capabilities]
) -> tuple[dict[str, Plan], list[HeldBack]]:
    """`plans` (pod → plan) with what each pod's worker cannot do taken out, and the serve replicas held back.

    A pod missing from `capabilities` supports nothing. Plans that need no change are returned as they are.
    """
    out: dict[str, Plan] = {}
    held: list[HeldBack] = []
    for pod, plan in plans.items():
        caps = capabilities.get(pod, NONE)
        groups = [_restrict_group(g, caps, pod, held) for g in plan.groups]
        out[pod] = plan if tuple(groups) == plan.groups else Plan.build(plan.generation, groups)
    return out, held
