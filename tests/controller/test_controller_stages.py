"""The stages of a pool round, each alone: observe (over a fake API), forecasts, decide (pure), act (over a fake
API); and who writes which status (docs/operator.md, "Status owners")."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import replace
from typing import Any

import kopf
import pytest
from controller_support import FakeScraper, make_runtime, model_body, pool_body, worker_pod

from warmserve.controller import models, pools
from warmserve.controller.act import KubeActuator, act
from warmserve.controller.decide import (
    Observation,
    ObservedModel,
    ObservedPool,
    PlannerState,
    catalog,
    decide,
)
from warmserve.controller.forecasts import Forecasts, ForecastUpdate, ForecastView
from warmserve.controller.history import LoadHistory, OpenWindow
from warmserve.controller.k8s import CONFIGMAPS, DAEMONSETS, MODELDEPLOYMENTS, PODS, WARMPOOLS, ApiError, Resource
from warmserve.controller.observe import KubeObserver
from warmserve.controller.reconcile import view_worker
from warmserve.controller.settings import ControllerConfig
from warmserve.controller.spec import parse_model_spec, parse_pool_spec
from warmserve.controller.weights import WeightInfo
from warmserve.core.types import Demand
from warmserve.protocol import PLAN_ANNOTATION, Plan, Role, plan_of_pod

LOG = logging.getLogger("test")
NOW = 86400.0 * 20000 + 3600 * 12


class FakeApi:
    """The `k8s.Api` verbs the controller uses, over in-memory objects; records every write in order."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str | None, str], dict] = {}
        self.writes: list[tuple[str, str, str, dict]] = []  # (verb, plural, name, body)
        self.fail: dict[tuple[str, str], ApiError] = {}  # (verb, plural) → error to raise

    def add(self, res: Resource, namespace: str | None, obj: dict) -> dict:
        self.objects[res.plural, namespace, obj["metadata"]["name"]] = obj
        return obj

    def _check(self, verb: str, res: Resource) -> None:
        if (verb, res.plural) in self.fail:
            raise self.fail[verb, res.plural]

    async def get(self, res: Resource, namespace: str | None, name: str) -> dict | None:
        self._check("get", res)
        return self.objects.get((res.plural, namespace, name))

    async def list(self, res: Resource, namespace: str | None, labels: dict | None = None) -> list[dict]:
        self._check("list", res)
        items = [o for (plural, ns, _), o in self.objects.items() if plural == res.plural and ns == namespace]
        return [
            i for i in items if all((i["metadata"].get("labels") or {}).get(k) == v for k, v in (labels or {}).items())
        ]

    async def create(self, res: Resource, namespace: str | None, body: dict) -> tuple[dict, bool]:
        self._check("create", res)
        self.writes.append(("create", res.plural, body["metadata"]["name"], body))
        key = (res.plural, namespace, body["metadata"]["name"])
        if key in self.objects:
            return self.objects[key], False
        self.objects[key] = body
        return body, True

    async def patch(
        self, res: Resource, namespace: str | None, name: str, patch: dict, *, status: bool = False
    ) -> dict:
        self._check("patch", res)
        self.writes.append(("patch/status" if status else "patch", res.plural, name, patch))
        return self.objects.get((res.plural, namespace, name)) or {}


def _md(name: str, uid: str, pool: str = "pool1", **spec) -> dict:
    body = model_body(name, pool, **spec)
    body["metadata"].update(uid=uid, generation=1)
    return body


def _pool_body() -> dict:
    body = pool_body(gpus=2)
    body["metadata"].update(uid="pool-uid", generation=3)
    return body


# ---------------------------------------------------------------- observe
async def test_observe_reads_pods_models_weights_workload_and_load():
    api, scraper = FakeApi(), FakeScraper()
    scraper.load = {"a": 3.0, "unknown": 1.0}
    runtime = make_runtime(scraper_factory=lambda rt, pool: scraper)
    runtime.api = api
    for i in (1, 0, 2):
        api.add(PODS, "ns1", worker_pod("pool1", i))
    api.objects["pods", "ns1", "pool1-worker-2"]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    api.add(PODS, "ns1", worker_pod("other", 0))
    api.add(MODELDEPLOYMENTS, "ns1", _md("a", "ua"))
    recorded = _md("b", "ub", weight=0)
    recorded["spec"]["model"].pop("weightBytes")
    recorded["status"] = {"weightBytes": 1234, "conditions": []}
    api.add(MODELDEPLOYMENTS, "ns1", recorded)
    api.add(MODELDEPLOYMENTS, "ns1", _md("elsewhere", "ue", pool="pool2"))
    going = api.add(MODELDEPLOYMENTS, "ns1", _md("going", "ug"))
    going["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    api.add(DAEMONSETS, "ns1", {"metadata": {"name": "pool1-worker"}, "status": {"desiredNumberScheduled": 3}})

    observer = KubeObserver(runtime, "ns1", "pool1", workload_problem=lambda: ("WorkloadRejected", "no"))
    obs = await observer.observe(_pool_body(), NOW, LOG)

    assert obs.now == NOW and obs.stamp.endswith("Z")
    assert [w.pod for w in obs.workers] == ["pool1-worker-1", "pool1-worker-0", "pool1-worker-2"]  # as listed
    assert [w.pod for w in obs.live_workers] == ["pool1-worker-0", "pool1-worker-1"]  # not deleting, by name
    assert [w.deleting for w in obs.workers] == [False, False, True]
    assert [(m.name, m.uid) for m in obs.models] == [("a", "ua"), ("b", "ub")]
    assert obs.models[0].weight == WeightInfo(300_000_000, "spec", "weightBytes given in the spec")
    assert (obs.models[1].weight.bytes, obs.models[1].weight.origin) == (1234, "safetensors")  # from status
    assert obs.load == {"a": 3.0, "unknown": 1.0} and scraper.calls == 1
    assert obs.pool.desired_workers == 3 and obs.pool.workload_problem == ("WorkloadRejected", "no")
    assert (obs.pool.uid, obs.pool.generation, obs.pool.spec.gpu.count) == ("pool-uid", 3, 2)
    assert [e.uid for e in obs.catalog.entries] == ["ua", "ub"]
    assert obs.catalog.load_by_uid(obs.load) == {"ua": 3.0}
    assert api.writes == [], "observing writes nothing"


async def test_observe_counts_a_failed_load_source_and_carries_on():
    class Broken:
        async def sample(self, workers):
            raise RuntimeError("prometheus down")

    runtime = make_runtime(scraper_factory=lambda rt, pool: Broken())
    runtime.api = FakeApi()
    obs = await KubeObserver(runtime, "ns1", "pool1").observe(_pool_body(), NOW, LOG)
    assert obs.load == {} and obs.workers == () and obs.pool.desired_workers is None
    assert runtime.metrics.scrape_errors.labels("pool1")._value.get() == 1


async def test_observe_loads_the_persisted_history():
    runtime = make_runtime()
    runtime.api = api = FakeApi()
    pool = parse_pool_spec(_pool_body()["spec"])
    observer = KubeObserver(runtime, "ns1", "pool1")
    assert (await observer.load_history(pool)).series == {}
    saved = LoadHistory(3600, 24 * 5)
    saved.record("ua", 100, 2.0, 3.0)
    api.add(
        CONFIGMAPS,
        "ns1",
        {"metadata": {"name": "pool1-load-history"}, "binaryData": {"history.json.z": saved.encode()}},
    )
    assert (await observer.load_history(pool)).series == saved.series


# -------------------------------------------------------------- forecasts
def test_forecasts_close_windows_into_the_history_and_forecast():
    pool = parse_pool_spec({**pool_body()["spec"], "forecast": {"windowSeconds": 60, "kind": "last"}})
    pool = replace(pool, interval_seconds=1.0)
    obs_model = ObservedModel(
        "a", "ua", 1, parse_model_spec("a", model_body("a")["spec"]), WeightInfo(1, "spec", ""), {}
    )
    entries = catalog(pool, [obs_model]).entries
    assert [e.uid for e in entries] == ["ua"]
    forecasts = Forecasts(LoadHistory(60, 100))
    first = forecasts.advance(600.0, pool, entries, {"ua": 2.0})
    assert (
        first.closed == ()
        and first.history is None
        and [g[:2] for g in first.forecast] == [("a", "avg"), ("a", "peak")]
    )
    forecasts.advance(630.0, pool, entries, {"ua": 6.0})
    closing = forecasts.advance(660.0, pool, entries, {"ua": 1.0})  # window 11 begins: window 10 closes
    (closed,) = closing.closed
    assert (closed.served_name, closed.avg, closed.peak, closed.predicted) == ("a", 4.0, 6.0, Demand(0.0, 0.0))
    assert closing.history is not None and LoadHistory.decode(closing.history, 60, 100).series["ua"]["avg"] == {10: 4.0}
    view = forecasts.view(pool)
    assert view.window == 11 and view.last_observed == {"ua": (4.0, 6.0)}
    assert view.mean_load == {"ua": 3.0} and view.peak_load == {"ua": 6.0}  # the last 5 s / 10 rounds
    assert view.demand == {"ua": Demand(4.0, 6.0)}  # the `last` forecaster: the window that just closed


def _forecast_setup() -> tuple[Any, Any]:
    pool = parse_pool_spec({**pool_body()["spec"], "forecast": {"windowSeconds": 60, "kind": "last"}})
    pool = replace(pool, interval_seconds=1.0)
    obs_model = ObservedModel(
        "a", "ua", 1, parse_model_spec("a", model_body("a")["spec"]), WeightInfo(1, "spec", ""), {}
    )
    return pool, catalog(pool, [obs_model]).entries


def test_the_open_window_is_checkpointed_at_its_first_round_and_four_times_per_window():
    pool, entries = _forecast_setup()
    forecasts = Forecasts(LoadHistory(60, 100))
    times = [600.0 + 5 * i for i in range(25)]  # windows 10, 11 and the first round of 12
    emitted = [t for t in times if forecasts.advance(t, pool, entries, {"ua": 1.0}).open_window is not None]
    assert emitted == [600.0, 615.0, 630.0, 645.0, 660.0, 675.0, 690.0, 705.0, 720.0]
    forecasts.checkpoint_failed()  # a failed save: handed out again at the next round
    assert forecasts.advance(725.0, pool, entries, {"ua": 1.0}).open_window is not None


def test_a_checkpoint_restores_closed_unsaved_windows_and_the_open_windows_samples():
    pool, entries = _forecast_setup()
    first = Forecasts(LoadHistory(60, 100))
    first.advance(600.0, pool, entries, {"ua": 2.0})
    first.advance(630.0, pool, entries, {"ua": 6.0})
    first.advance(660.0, pool, entries, {"ua": 1.0})  # window 10 closes; its history save never lands
    first.advance(670.0, pool, entries, {"ua": 3.0})
    text = first.open_window()
    assert text is not None
    checkpoint = OpenWindow.decode(text, 60)
    assert checkpoint is not None and checkpoint.window == 11 and checkpoint.closed == {10: {"ua": (4.0, 6.0)}}

    # restarted in the same window: window 10 joins the history (unsaved: the next round saves it) and the
    # samples of window 11 go on
    same = Forecasts(LoadHistory(60, 100))
    same.restore(checkpoint)
    update = same.advance(680.0, pool, entries, {"ua": 5.0})
    assert update.history is not None and LoadHistory.decode(update.history, 60, 100).series["ua"]["avg"] == {10: 4.0}
    closing = same.advance(720.0, pool, entries, {"ua": 0.0})
    assert [(c.avg, c.peak) for c in closing.closed] == [(3.0, 5.0)], "window 11: 1, 3 and 5 (0 is window 12's)"

    # restarted two windows later: both closed windows are restored, what the history has is not overwritten
    later = Forecasts(LoadHistory(60, 100))
    later.history.record("ua", 10, 9.0, 9.0)
    later.restore(checkpoint)
    later.advance(790.0, pool, entries, {"ua": 0.0})
    assert later.history.series["ua"]["avg"] == {10: 9.0, 11: 2.0} and later.unsaved

    # once a history save succeeded, the next checkpoint holds no closed window
    same.saved(None)
    again = OpenWindow.decode(same.open_window() or "", 60)
    assert again is not None and again.closed == {}


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        '{"version":2}',
        '{"version":1,"windowSeconds":30,"window":1,"models":{}}',
        '{"version":1,"windowSeconds":60,"window":"x","models":{}}',
        '{"version":1,"windowSeconds":60,"window":1,"models":{"a":[1]}}',
        '{"version":1,"windowSeconds":60,"window":1,"models":{},"closed":{"x":{}}}',
        '{"version":1,"windowSeconds":60,"window":1,"models":{},"closed":{"1":{"a":"bc"}}}',
    ],
)
def test_an_unreadable_checkpoint_is_ignored(text):
    assert OpenWindow.decode(text, 60) is None


def test_a_checkpoint_drops_non_finite_values():
    text = (
        '{"version":1,"windowSeconds":60,"window":1,"models":{"a":[1e999,1,1],"b":[2,1,2]},'
        '"closed":{"0":{"a":[1e999,1]}}}'
    )
    checkpoint = OpenWindow.decode(text, 60)
    assert checkpoint is not None and set(checkpoint.samples) == {"b"} and checkpoint.closed == {0: {}}


# ----------------------------------------------------------------- decide
def _observation(plans: dict[str, Plan] | None = None, *, models: list[dict] | None = None) -> Observation:
    """Two running workers (optionally holding `plans`) and the given ModelDeployments, read at NOW."""
    pool = parse_pool_spec(_pool_body()["spec"])
    workers = []
    for i in range(2):
        pod = worker_pod("pool1", i)
        plan = (plans or {}).get(pod["metadata"]["name"])
        if plan is not None:
            pod["metadata"]["annotations"] = {PLAN_ANNOTATION: plan.dumps()}
        workers.append(view_worker(pod, pool.gpu.count))
    observed = []
    for body in models if models is not None else [_md("a", "ua", prewarm={"minWarmReplicas": 2})]:
        spec = parse_model_spec(body["metadata"]["name"], body["spec"])
        weight = WeightInfo(spec.weight_bytes, "spec", "weightBytes given in the spec")
        observed.append(ObservedModel(body["metadata"]["name"], body["metadata"]["uid"], 1, spec, weight, {}))
    return Observation(
        now=NOW,
        stamp="2026-01-01T00:00:00Z",
        pool=ObservedPool("pool1", "ns1", "pool-uid", 3, pool, {}, body=_pool_body()),
        workers=tuple(workers),
        models=tuple(observed),
        load={},
    )


def _view(window: int | None = 100) -> ForecastView:
    return ForecastView(window, 3600, {"ua": Demand(1.0, 2.0)}, {"ua": (0.5, 1.5)}, {}, {})


def test_decide_is_pure_and_plans_the_min_warm_replicas():
    first, again = decide(_observation(), _view(), PlannerState()), decide(_observation(), _view(), PlannerState())
    assert first.plans == again.plans and first.pool_status == again.pool_status
    assert first.model_statuses == again.model_statuses, "the same observation gives the same decision"
    written = {w.pod: w.plan for w in first.plans}
    replicas = [r for plan in written.values() for r in plan.replicas.values()]
    assert len(replicas) >= 2 and all(r.uid == "ua" and r.role == Role.WARM for r in replicas)
    assert {p.generation for p in written.values()} == {1} and first.generation == 1
    # status describes the workers as they are once the plans are written
    pool = first.pool_status
    assert pool.changed and pool.status["planGeneration"] == 1 and pool.status["expectedWorkers"] == 2
    assert "observedGeneration" not in pool.status and "workload" not in pool.status  # the handler's fields
    assert pool.status["lastForecastWindow"] == "1970-01-05T04:00:00Z"
    (model,) = first.model_statuses
    assert model.name == "a" and model.changed
    assert model.status["warmReplicas"] == {"desired": len(replicas), "prewarmed": 0, "prewarming": 0}
    assert model.status["forecast"]["avg"] == 1.0 and model.status["observedLoad"]["peak"] == 1.5
    assert {c["type"]: c["reason"] for c in model.status["conditions"]}["Valid"] == "Validated"


def test_decide_places_no_warm_replica_for_a_model_with_prewarming_off():
    """`spec.prewarm.enabled: false`: the forecast (avg 1, peak 2 here) must not place warm replicas for it."""
    on = decide(_observation(models=[_md("a", "ua")]), _view(), PlannerState())
    assert any(plan.replicas for w in on.plans for plan in [w.plan]), "prewarming on: the forecast places"
    off = decide(_observation(models=[_md("a", "ua", prewarm={"enabled": False})]), _view(), PlannerState())
    assert all(not w.plan.replicas for w in off.plans), [w.plan for w in off.plans]


def test_decide_writes_nothing_when_the_pods_hold_the_plans_already():
    planner = PlannerState()
    first = decide(_observation(), _view(), planner)
    planner.memory = first.memory
    second = decide(_observation({w.pod: w.plan for w in first.plans}), _view(), planner)
    assert second.plans == () and second.generation == first.generation


def test_decide_validates_and_does_not_plan_an_invalid_model():
    bad = _md("big", "ub", weight=10**12)  # does not fit a 1 GiB arena
    decision = decide(_observation(models=[bad]), _view(None), PlannerState())
    assert all(not w.plan.groups for w in decision.plans), "nothing placed"
    (status,) = decision.model_statuses
    conds = {c["type"]: (c["status"], c["reason"]) for c in status.status["conditions"]}
    assert conds["Valid"] == ("False", "DoesNotFitPool") and conds["Ready"] == ("False", "DoesNotFitPool")
    assert "forecast" not in status.status and "lastForecastWindow" not in decision.pool_status.status


def test_decide_and_forecasts_import_neither_kopf_nor_a_kubernetes_client():
    code = (
        "import sys, warmserve.controller.decide, warmserve.controller.forecasts; "
        "bad = [m for m in ('kopf', 'kubernetes', 'aiohttp') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -------------------------------------------------------------------- act
async def test_act_saves_history_writes_plans_then_patches_changed_status():
    runtime = make_runtime()
    runtime.api = api = FakeApi()
    obs = _observation(models=[_md("a", "ua", prewarm={"minWarmReplicas": 2}), _md("b", "ub")])
    decision = decide(obs, _view(), PlannerState())
    update = ForecastUpdate(history=LoadHistory(3600, 10).encode(), forecast=(("a", "avg", 1.5),))
    await act(obs, update, decision, KubeActuator(runtime, "ns1", "pool1"), runtime.metrics, LOG, 0.01)

    verbs = [(verb, plural) for verb, plural, _, _ in api.writes]
    assert verbs == [
        ("create", "configmaps"),
        ("patch", "pods"),
        ("patch", "pods"),
        ("patch/status", "warmpools"),
        ("patch/status", "modeldeployments"),
        ("patch/status", "modeldeployments"),
    ]
    configmap = api.writes[0][3]
    assert configmap["metadata"]["ownerReferences"][0]["uid"] == "pool-uid"
    for _, _, pod, patch in api.writes[1:3]:
        written = plan_of_pod(patch)
        assert written is not None and written == next(w.plan for w in decision.plans if w.pod == pod)
    assert runtime.metrics.plan_changes.labels("pool1")._value.get() == 2
    assert runtime.metrics.plan_generation.labels("pool1")._value.get() == 1
    assert runtime.metrics.forecast.labels("pool1", "a", "avg")._value.get() == 1.5


async def test_act_skips_unchanged_status_a_deleted_model_and_a_failed_history_save(caplog):
    runtime = make_runtime()
    runtime.api = api = FakeApi()
    obs = _observation()
    decision = decide(obs, _view(), PlannerState())
    # the next round: nothing changed for the pool; the model was deleted meanwhile (404 on its status)
    settled_pool = ObservedPool(
        "pool1", "ns1", "pool-uid", 3, obs.pool.spec, decision.pool_status.status, obs.pool.body
    )
    obs2 = _observation({w.pod: w.plan for w in decision.plans})
    obs2 = Observation(obs2.now, obs2.stamp, settled_pool, obs2.workers, obs2.models, obs2.load)
    second = decide(obs2, _view(), PlannerState(memory=decision.memory))
    assert second.plans == () and not second.pool_status.changed
    api.fail[("patch", "modeldeployments")] = ApiError(404, "NotFound")
    api.fail[("create", "configmaps")] = ApiError(500, "Internal")
    update = ForecastUpdate(history=LoadHistory(3600, 10).encode())
    with caplog.at_level(logging.WARNING):
        await act(obs2, update, second, KubeActuator(runtime, "ns1", "pool1"), runtime.metrics, LOG, 0.01)
    assert api.writes == [] and "load history not saved" in caplog.text
    api.fail[("patch", "modeldeployments")] = ApiError(409, "Conflict")
    with pytest.raises(ApiError):
        await act(obs2, ForecastUpdate(), second, KubeActuator(runtime, "ns1", "pool1"), runtime.metrics, LOG, 0.0)


# --------------------------------------------------------- status owners
async def _reconcile_model(runtime, body) -> dict:
    patch = kopf.Patch()
    await models.reconcile_model(runtime, kopf.Body(body), patch, LOG)
    return dict(patch)


async def test_model_handler_writes_status_only_for_a_model_no_round_covers():
    runtime = make_runtime()
    runtime.api = api = FakeApi()
    orphan = await _reconcile_model(runtime, _md("a", "ua", pool="missing"))
    conds = {c["type"]: c["reason"] for c in orphan["status"]["conditions"]}
    assert conds["Valid"] == "PoolNotFound" and orphan["status"]["observedGeneration"] == 1
    api.add(WARMPOOLS, "ns1", _pool_body())
    assert await _reconcile_model(runtime, _md("a", "ua")) == {}, "the pool's round owns it"
    no_loop = make_runtime(config=ControllerConfig(namespaces=("ns1",), loop_enabled=False))
    no_loop.api = api
    status = (await _reconcile_model(no_loop, _md("a", "ua")))["status"]
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Valid"] == "Validated"
    assert status["weightBytes"] == 300_000_000 and status["weightBytesSource"] == "spec"


@pytest.mark.parametrize("loop_enabled", [True, False])
async def test_pool_handler_tells_the_round_about_a_refused_workload(loop_enabled):
    runtime = make_runtime(config=ControllerConfig(namespaces=("ns1",), loop_enabled=loop_enabled))
    runtime.api = api = FakeApi()
    api.fail[("create", "daemonsets")] = ApiError(422, "Invalid", "spec.template: bad")
    memo, patch = kopf.Memo(), kopf.Patch()
    body = _pool_body()
    body["metadata"]["namespace"] = "ns1"
    with pytest.raises(kopf.TemporaryError):
        await pools.reconcile_pool(runtime, kopf.Body(body), patch, memo, LOG)
    assert pools.workload_problem(memo) == ("WorkloadRejected", "422 Invalid: spec.template: bad")
    assert ("conditions" in dict(patch).get("status", {})) == (not loop_enabled)  # the round owns them
    del api.fail[("create", "daemonsets")]
    patch = kopf.Patch()
    await pools.reconcile_pool(runtime, kopf.Body(body), patch, memo, LOG)
    assert pools.workload_problem(memo) is None
    status = dict(patch)["status"]
    assert status["observedGeneration"] == 3 and status["workload"] == "DaemonSet/pool1-worker"
    assert ("conditions" in status) == (not loop_enabled)
