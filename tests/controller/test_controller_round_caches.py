"""What a pool round keeps from the round before changes nothing it decides: the parsed annotations
(`reconcile.ParseMemo`), the workers' parts of the pool status (`reconcile.WorkerEntries`), and the garbage
collector's set-up of the operator's process (`runtime.configure_gc`)."""

from __future__ import annotations

import subprocess
import sys

from warmserve.controller import reconcile
from warmserve.protocol import (
    PLAN_ANNOTATION,
    STATE_ANNOTATION,
    DeviceState,
    Phase,
    Plan,
    PlanGroup,
    PlanReplica,
    ReplicaState,
    Role,
    WorkerError,
    WorkerState,
)


def _plan(generation: int, role: Role = Role.WARM) -> Plan:
    return Plan.build(generation, [PlanGroup((0, 1), (PlanReplica("a", "ua", "file:///m/a", 2, role),))])


def _state(generation: int, phase: Phase = Phase.WARM, errors: tuple[WorkerError, ...] = ()) -> WorkerState:
    devices = tuple(DeviceState(i, 100, 30, 70) for i in range(2))
    replicas = (ReplicaState("a", "ua", (0, 1), phase, 1.0, None, False),)
    return WorkerState(generation, devices, replicas, errors)


def _pod(name: str, plan: Plan | str | None, state: WorkerState | str | None) -> dict:
    annotations = {}
    if plan is not None:
        annotations[PLAN_ANNOTATION] = plan if isinstance(plan, str) else plan.dumps()
    if state is not None:
        annotations[STATE_ANNOTATION] = state if isinstance(state, str) else state.dumps()
    return {
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"nodeName": f"node-{name}"},
        "status": {"phase": "Running", "podIP": "10.0.0.1"},
    }


def test_a_memo_gives_the_views_view_worker_gives_and_parses_an_unchanged_annotation_once():
    memo = reconcile.ParseMemo()
    first = [_pod("w0", _plan(1), _state(1)), _pod("w1", "not json", "{garbled"), _pod("w2", None, None)]
    views = [reconcile.view_worker(p, 2, memo) for p in first]
    assert views == [reconcile.view_worker(p, 2) for p in first]
    assert views[1].plan is None and views[1].state_error, "unreadable annotations read as without the memo"
    memo.next_round()

    second = [_pod("w0", _plan(1), _state(2)), first[1], first[2]]
    again = [reconcile.view_worker(p, 2, memo) for p in second]
    assert again == [reconcile.view_worker(p, 2) for p in second]
    assert again[0].plan is views[0].plan, "the same plan text: not parsed again"
    assert again[0].state is not views[0].state and again[0].state.observed_generation == 2
    assert again[1].state_error == views[1].state_error, "a text that fails is parsed (and fails) again"
    memo.next_round()
    memo.next_round()  # two rounds without that plan: forgotten
    assert reconcile.view_worker(first[0], 2, memo).plan is not views[0].plan


def test_kept_worker_entries_give_the_pool_status_and_are_remade_when_the_state_changes():
    def status(workers, entry_of=reconcile.worker_entry):
        return reconcile.pool_status(
            workers,
            expected_workers=3,
            plan_generation=4,
            existing_conditions=None,
            generation=1,
            now="T",
            entry_of=entry_of,
        )

    memo, entries = reconcile.ParseMemo(), reconcile.WorkerEntries()
    broken = _state(1, errors=(WorkerError("no space", "ua", (0, 1)),))
    rounds = [
        [_pod("w0", _plan(1), _state(1)), _pod("w1", _plan(1), broken), _pod("w2", None, "{garbled")],
        [
            _pod("w0", _plan(1), _state(1)),
            _pod("w1", _plan(2, Role.SERVE), _state(2, Phase.SERVING)),
            _pod("w2", None, None),
        ],
        [_pod("w0", _plan(1), _state(1)), _pod("w1", _plan(2, Role.SERVE), _state(2, Phase.SERVING))],
    ]
    made = []
    for pods in rounds:
        workers = [reconcile.view_worker(p, 2, memo) for p in pods]
        memo.next_round()
        kept = status(workers, entries)
        entries.next_round()
        assert kept == status(workers), "the same status as entries made afresh"
        made.append(kept["workers"])
    assert made[1][0] is made[0][0] and made[2][0] is made[0][0], "w0's state did not change: its entry is kept"
    assert made[1][1] is not made[0][1] and made[1][1]["devices"][0]["state"] == "dedicated"
    assert made[1][2] is not made[0][2], "w2's state error went away"


def test_configure_gc_freezes_the_startup_heap_and_raises_the_young_threshold():
    code = (
        "import gc; from warmserve.controller.runtime import GC_YOUNG_THRESHOLD, configure_gc; configure_gc(); "
        "assert gc.get_freeze_count() > 1000, gc.get_freeze_count(); "
        "assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD and gc.isenabled()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
