"""The controller boundary between the policy and the workers: engine settings travel in the plan, a forbidden
engine flag is a condition (and the model is not planned), and no worker is planned what it does not advertise
(`kvLend`, `tp > 1` engines)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from controller_support import model_body, pool_body, worker_pod

from warmserve.controller import reconcile
from warmserve.controller.capabilities import restrict_plans
from warmserve.controller.decide import Observation, ObservedModel, ObservedPool, PlannerState, decide
from warmserve.controller.forecasts import ForecastView
from warmserve.controller.reconcile import view_worker
from warmserve.controller.spec import parse_model_spec, parse_pool_spec
from warmserve.controller.weights import WeightInfo
from warmserve.core.types import Demand
from warmserve.protocol import (
    PLAN_ANNOTATION,
    STATE_ANNOTATION,
    Capabilities,
    EngineSettings,
    Phase,
    Plan,
    PlanGroup,
    PlanReplica,
    ProtocolError,
    Role,
    WorkerState,
    parse_plan,
)
from warmserve.protocol import ReplicaState as RS

NOW = 86400.0 * 20000 + 3600 * 12
CAN_LEND = Capabilities(kv_lend=True, tp_promotion=True, engine_settings=True, device_kind="cuda")


def _md(name: str, uid: str, **spec) -> dict:
    body = model_body(name, "pool1", **spec)
    body["metadata"].update(uid=uid, generation=1)
    return body


def _worker(index: int, plan: Plan | None, capabilities: Capabilities | None, gpus: int = 2):
    """A running worker pod holding `plan` and reporting it applied (engines serving, replicas warm)."""
    pod = worker_pod("pool1", index)
    annotations, replicas = {}, ()
    if plan is not None:
        annotations[PLAN_ANNOTATION] = plan.dumps()
        replicas = tuple(
            RS(
                r.model,
                r.uid,
                r.gpus,
                Phase.SERVING if r.serves else Phase.WARM,
                1.0,
                f"10.0.0.{index + 1}:{8000 + r.gpus[0]}" if r.serves else None,
                r.serves,
            )
            for r in plan.replicas.values()
        )
    state = WorkerState(plan.generation if plan else 0, replicas=replicas, capabilities=capabilities)
    annotations[STATE_ANNOTATION] = state.dumps()
    pod["metadata"]["annotations"] = annotations
    return view_worker(pod, gpus)


def _observation(workers, models: list[dict], gpus: int = 2) -> Observation:
    body = pool_body(gpus=gpus)
    body["metadata"].update(uid="pool-uid", generation=1)
    pool = parse_pool_spec(body["spec"])
    observed = []
    for md in models:
        spec = parse_model_spec(md["metadata"]["name"], md["spec"])
        weight = WeightInfo(spec.weight_bytes, "spec", "weightBytes given in the spec")
        observed.append(ObservedModel(md["metadata"]["name"], md["metadata"]["uid"], 1, spec, weight, {}))
    return Observation(
        NOW,
        "2026-01-01T00:00:00Z",
        ObservedPool("pool1", "ns1", "pool-uid", 1, pool, {}, body=body),
        tuple(workers),
        tuple(observed),
        {},
    )


def _view(load: dict[str, float], demand: dict[str, Demand] | None = None) -> ForecastView:
    return ForecastView(100, 3600, demand or {}, {}, load, load)


def _serving(uid: str, name: str, gpus: tuple[int, ...] = (0,), tp: int = 1) -> Plan:
    source = f"file:///models/{name}"
    return Plan.build(1, [PlanGroup(gpus, (PlanReplica(name, uid, source, tp, Role.SERVE, 0),))])


def _written(decision) -> dict[str, Plan]:
    return {w.pod: w.plan for w in decision.plans}


# ------------------------------------------------------------------------------------------- kvLend
def test_only_a_worker_advertising_kv_lend_gets_kv_lend_in_its_plan():
    """Both workers serve model a lightly (it may lend KV space); only worker 0 advertises kvLend."""
    models = [_md("a", "ua", scaling={"minReplicas": 2, "maxReplicas": 2})]
    workers = [
        _worker(0, _serving("ua", "a"), CAN_LEND),
        _worker(1, _serving("ua", "a"), Capabilities(kv_lend=False, tp_promotion=True, reasons={"kvLend": "no"})),
    ]
    decision = decide(_observation(workers, models), _view({"ua": 1.0}), PlannerState())
    plans = {**{w.pod: w.plan for w in workers}, **_written(decision)}
    lend = {
        pod: [r.kv_lend for r in plan.replicas.values() if r.serves] for pod, plan in plans.items() if plan is not None
    }
    assert lend["pool1-worker-0"] and lend["pool1-worker-0"][0] > 0, "the capable worker lends as the policy says"
    assert lend["pool1-worker-1"] == [0], "the worker that does not advertise kvLend is planned no lending"


def test_a_worker_that_does_not_say_gets_no_kv_lend():
    """An older worker (no `capabilities` in its state) counts as not supporting kvLend."""
    models = [_md("a", "ua", scaling={"minReplicas": 1, "maxReplicas": 1})]
    workers = [_worker(0, _serving("ua", "a"), None), _worker(1, None, None)]
    decision = decide(_observation(workers, models), _view({"ua": 1.0}), PlannerState())
    plans = {**{w.pod: w.plan for w in workers if w.plan}, **_written(decision)}
    assert all(r.kv_lend == 0 for plan in plans.values() for r in plan.replicas.values())
    # and the same round with a capable worker lends (the test would pass vacuously otherwise)
    capable = [_worker(0, _serving("ua", "a"), CAN_LEND), _worker(1, None, None)]
    lent = decide(_observation(capable, models), _view({"ua": 1.0}), PlannerState())
    assert any(r.kv_lend > 0 for w in lent.plans for r in w.plan.replicas.values())


def test_restrict_plans_zeroes_kv_lend_and_demotes_tp_engines_per_worker():
    serve2 = PlanReplica("big", "ub", "s", 2, Role.SERVE, 99)
    serve1 = PlanReplica("small", "us", "s", 1, Role.SERVE, 77)
    plans = {
        "p0": Plan.build(0, [PlanGroup((0, 1), (serve2,)), PlanGroup((2,), (serve1,))]),
        "p1": Plan.build(0, [PlanGroup((0, 1), (serve2,)), PlanGroup((2,), (serve1,))]),
        "p2": Plan.build(0, [PlanGroup((0, 1), (serve2,))]),
    }
    out, held = restrict_plans(plans, {"p0": CAN_LEND, "p1": Capabilities(kv_lend=True)})
    assert out["p0"] is plans["p0"], "a capable worker's plan is untouched"
    p1 = {r.uid: (r.role, r.kv_lend) for r in out["p1"].replicas.values()}
    assert p1 == {"ub": (Role.WARM, 0), "us": (Role.SERVE, 77)}
    p2 = {r.uid: (r.role, r.kv_lend) for r in out["p2"].replicas.values()}
    assert p2 == {"ub": (Role.WARM, 0)}, "no capabilities: no lending, no tp>1 engine"
    assert sorted((h.pod, h.uid, h.tp) for h in held) == [("p1", "ub", 2), ("p2", "ub", 2)]


def test_a_tp_engine_is_not_planned_on_a_worker_without_tp_promotion_and_the_model_says_why():
    models = [_md("big", "ub", tp=2, scaling={"minReplicas": 1, "maxReplicas": 1})]
    no_tp = Capabilities(kv_lend=True, reasons={"tpPromotion": "not built"})
    workers = [_worker(0, None, no_tp), _worker(1, None, no_tp)]
    decision = decide(_observation(workers, models), _view({"ub": 4.0}), PlannerState())
    replicas = [r for w in decision.plans for r in w.plan.replicas.values()]
    assert replicas and all(not r.serves for r in replicas), replicas
    (status,) = decision.model_statuses
    conds = {c["type"]: c for c in status.status["conditions"]}
    assert conds["Degraded"]["status"] == "True" and conds["Degraded"]["reason"] == "WorkerCapabilityMissing"
    assert "tpPromotion" in conds["Degraded"]["message"]
    # the same observation with workers that can promote a tp=2 engine plans it
    capable = [_worker(0, None, CAN_LEND), _worker(1, None, CAN_LEND)]
    served = decide(_observation(capable, models), _view({"ub": 4.0}), PlannerState())
    assert any(r.serves and r.tp == 2 for w in served.plans for r in w.plan.replicas.values())


# ---------------------------------------------------------------------------------- engine settings
def test_engine_settings_travel_in_every_replica_of_the_model():
    spec = {
        "model": {"source": "pvc://weights/a", "tensorParallelSize": 1, "weightBytes": 300_000_000, "dtype": "float16"},
        "engine": {"maxConcurrency": 8, "maxModelLen": 2048, "args": ["--enable-prefix-caching"]},
        "scaling": {"minReplicas": 1, "maxReplicas": 1},
        "prewarm": {"minWarmReplicas": 1},
    }
    models = [_md("a", "ua", **spec), _md("b", "ub", prewarm={"minWarmReplicas": 1})]
    workers = [_worker(0, None, CAN_LEND), _worker(1, None, CAN_LEND)]
    decision = decide(_observation(workers, models), _view({"ua": 2.0}), PlannerState())
    replicas = [r for w in decision.plans for r in w.plan.replicas.values()]
    a = [r for r in replicas if r.uid == "ua"]
    assert a and any(r.serves for r in a)
    want = EngineSettings(("--enable-prefix-caching",), 2048, "float16")
    assert all(r.engine == want for r in a)
    assert want.argv() == ["--dtype", "float16", "--max-model-len", "2048", "--enable-prefix-caching"]
    b = [r for r in replicas if r.uid == "ub"]
    assert b and all(r.engine == EngineSettings() for r in b)
    for w in decision.plans:  # b's replicas carry no `engine` key: plans without settings are as before
        for group in json.loads(w.plan.dumps())["groups"]:
            for rep in group["replicas"]:
                assert ("engine" in rep) == (rep["uid"] == "ua")


def test_default_engine_settings_are_not_sent():
    spec = parse_model_spec("a", {"poolRef": {"name": "p"}, "model": {"source": "pvc://w/a", "dtype": "auto"}})
    assert reconcile.engine_settings(spec) == EngineSettings()


# -------------------------------------------------------------------------------- forbidden flags
def test_a_forbidden_engine_flag_is_a_condition_and_the_model_is_not_planned():
    bad = _md(
        "bad", "ubad", engine={"args": ["--enable-prefix-caching", "--port=9999"]}, prewarm={"minWarmReplicas": 2}
    )
    good = _md("good", "ugood", prewarm={"minWarmReplicas": 1})
    workers = [_worker(0, None, CAN_LEND), _worker(1, None, CAN_LEND)]
    decision = decide(_observation(workers, [bad, good]), _view({}), PlannerState())
    uids = {r.uid for w in decision.plans for r in w.plan.replicas.values()}
    assert uids == {"ugood"}, "the model with a forbidden flag is not planned; the other one is"
    statuses = {s.name: s.status for s in decision.model_statuses}
    conds = {c["type"]: c for c in statuses["bad"]["conditions"]}
    for kind in ("Valid", "Ready"):
        assert conds[kind]["status"] == "False" and conds[kind]["reason"] == "ForbiddenEngineFlag"
    assert "--port" in conds["Ready"]["message"] and "spec.engine.args[1]" in conds["Ready"]["message"]
    good_conds = {c["type"]: c["reason"] for c in statuses["good"]["conditions"]}
    assert good_conds["Valid"] == "Validated"


def test_forbidden_flags_win_over_the_operators_allow_list_and_name_their_own_field():
    from warmserve.controller.settings import SpecRules

    pool = parse_pool_spec(pool_body()["spec"])
    for args, reason, text in [
        (["--max-model-len", "4096"], "ForbiddenEngineFlag", "spec.engine.maxModelLen"),
        (["--dtype=half"], "ForbiddenEngineFlag", "spec.model.dtype"),
        (["--port", "80"], "ForbiddenEngineFlag", "--port"),
        (["--gpu-memory-utilization", "0.95"], "ForbiddenEngineFlag", "--gpu-memory-utilization"),
    ]:
        spec = parse_model_spec("m", model_body("m", engine={"args": args})["spec"])
        rules = SpecRules(engine_args_allowed=(args[0].split("=")[0],))
        validation = reconcile.validate_model(spec, pool, 300_000_000, rules)
        assert (validation.reason, text in validation.message) == (reason, True), validation


def test_engine_settings_outside_the_crd_are_invalid_not_a_crash():
    pool = parse_pool_spec(pool_body()["spec"])
    for spec in (
        {"model": {"source": "pvc://weights/m", "dtype": "float8"}},
        {"model": {"source": "pvc://weights/m"}, "engine": {"maxModelLen": -1}},
        {"model": {"source": "pvc://weights/m"}, "engine": {"args": ["--seed"] * 65}},
    ):
        model = parse_model_spec("m", {"poolRef": {"name": "pool1"}} | spec)
        validation = reconcile.validate_model(model, pool, 300_000_000)
        assert validation.reason == "InvalidSpec", validation


# ------------------------------------------------------------------------------------------- standby
def test_standby_engines_are_planned_per_worker_and_only_for_workers_that_keep_them():
    """Idle pool, three models forecast: each worker gets warm replicas, and the one advertising standby engines
    gets `spec.worker.standbyEngines` (default 1) of them flagged; the other none."""
    models = [_md(n, f"u{n}") for n in ("a", "b", "c")]
    keeps = replace(CAN_LEND, standby_engines=True)
    workers = [_worker(0, None, keeps), _worker(1, None, CAN_LEND)]
    demand = {f"u{n}": Demand(2.0, 4.0) for n in ("a", "b", "c")}
    plans = _written(decide(_observation(workers, models), _view({}, demand), PlannerState()))
    warm = {pod: [r for r in p.replicas.values() if not r.serves] for pod, p in plans.items()}
    assert warm["pool1-worker-0"] and warm["pool1-worker-1"], "both workers hold warm replicas"
    assert sum(r.spec.standby for r in warm["pool1-worker-0"]) == 1
    assert not any(r.spec.standby for r in warm["pool1-worker-1"])
    assert parse_plan(plans["pool1-worker-0"].dumps()) == plans["pool1-worker-0"]  # the flag survives the wire


def test_a_standby_flag_on_a_serve_replica_is_refused():
    plan = {"generation": 1, "groups": [{"gpus": [0], "replicas": [{"model": "a", "uid": "u", "source": "s"}]}]}
    plan["groups"][0]["replicas"][0].update(role="serve", standby=True)
    with pytest.raises(ProtocolError, match="only a warm replica"):
        parse_plan(plan)
    plan["groups"][0]["replicas"][0].update(role="warm", standby="yes")
    with pytest.raises(ProtocolError, match="standby must be true or false"):
        parse_plan(plan)


def test_a_planned_standby_engine_is_kept_while_its_replica_stays():
    """Round 2 sees the flagged plan on the worker and other demand: the choice does not move (a standby engine
    costs an engine initialisation to start)."""
    models = [_md(n, f"u{n}") for n in ("a", "b", "c")]
    keeps = replace(CAN_LEND, standby_engines=True)

    def flagged(plan):
        return {r.uid for r in plan.replicas.values() if r.spec.standby}

    first = _written(
        decide(
            _observation([_worker(0, None, keeps)], models),
            _view({}, {"ua": Demand(2.0, 4.0), "ub": Demand(1.0, 2.0), "uc": Demand(1.0, 2.0)}),
            PlannerState(),
        )
    )["pool1-worker-0"]
    assert flagged(first) == {"ua"}  # the most demanded model's replica
    shifted = {"ua": Demand(0.5, 1.0), "ub": Demand(1.0, 2.0), "uc": Demand(4.0, 8.0)}
    second = decide(_observation([_worker(0, first, keeps)], models), _view({}, shifted), PlannerState())
    plans = _written(second)
    plan = plans.get("pool1-worker-0", first)
    assert "ua" in {r.uid for r in plan.replicas.values()} and flagged(plan) == {"ua"}
    fresh = _written(decide(_observation([_worker(0, None, keeps)], models), _view({}, shifted), PlannerState()))
    assert flagged(fresh["pool1-worker-0"]) == {"uc"}  # without the earlier choice the scores decide
