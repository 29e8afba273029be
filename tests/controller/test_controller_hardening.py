"""The operator half of the hardening issue, pure parts: what a WarmPool or ModelDeployment author can make the
operator do, what a worker's state can make it do, and that no spec shape makes it raise.

Items (docs/design.md, "Trust model"): 2 pool privileges, 3 model sources, 4 worker-reported endpoints and the
Prometheus URL, 5 the worker pod's hardening, 6 plan generations, 7 affinity shapes, 8 values that do not fit
together, 9 the load history's size and saving. The admission policy (item 1) is in test_controller_admission.py,
the chart's NetworkPolicies in test_controller_chart.py, the emulator-level tests in test_controller_operator.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math

import numpy as np
import pytest
from aiohttp import web
from controller_support import FakeScraper, make_runtime, model_body, pool_body, worker_pod
from test_controller_runtime import free_port
from test_controller_schema import cel_violations, schema_errors
from test_controller_stages import NOW, FakeApi, _md, _pool_body

from warmserve.controller import builders, reconcile
from warmserve.controller.act import KubeActuator, act
from warmserve.controller.decide import Observation, ObservedModel, ObservedPool, PlannerState, decide, number_plans
from warmserve.controller.forecasts import Forecasts, ForecastUpdate, ForecastView
from warmserve.controller.history import LoadHistory
from warmserve.controller.k8s import PODS, ApiError
from warmserve.controller.observe import KubeObserver
from warmserve.controller.planwriter import strip_model_from_pool
from warmserve.controller.scrape import PrometheusScraper, WorkerMetricsScraper
from warmserve.controller.settings import ControllerConfig, SpecRules
from warmserve.controller.spec import parse_model_spec, parse_pool_spec
from warmserve.controller.weights import WeightInfo
from warmserve.core.types import Demand
from warmserve.protocol import (
    PLAN_ANNOTATION,
    STATE_ANNOTATION,
    Plan,
    PlanGroup,
    PlanReplica,
    Role,
    forbidden_engine_flag,
    plan_of_pod,
)

LOG = logging.getLogger("test")
GIB = 1 << 30


def pool(**spec):
    """A valid GPU pool (the test fixtures' pool_body) with `spec` merged in."""
    return parse_pool_spec({**pool_body()["spec"], **spec})


def reason(p) -> str:
    return reconcile.validate_pool(p).reason


# -------------------------------------------------------------- item 2: what a pool may ask for
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, "Validated"),
        ({"worker": {"serviceAccountName": "warmserve-operator"}}, "ServiceAccountNotAllowed"),
        ({"worker": {"serviceAccountName": "default"}}, "ServiceAccountNotAllowed"),
        ({"modelCache": {"hostPath": "/", "mountPath": "/models"}}, "HostPathNotAllowed"),
        ({"modelCache": {"hostPath": "/var/lib/kubelet", "mountPath": "/models"}}, "HostPathNotAllowed"),
        ({"modelCache": {"hostPath": "/var/lib/warmserve/../../etc", "mountPath": "/models"}}, "HostPathNotAllowed"),
        ({"modelCache": {"hostPath": "/var/lib/warmserve-evil", "mountPath": "/models"}}, "HostPathNotAllowed"),
        ({"modelCache": {"hostPath": "/var/lib/warmserve/models", "mountPath": "/models"}}, "Validated"),
        ({"modelCache": {"hostPath": "/mnt/models", "mountPath": "/models"}}, "Validated"),
        ({"priorityClassName": "system-node-critical"}, "PriorityClassNotAllowed"),
        ({"priorityClassName": "system-cluster-critical"}, "PriorityClassNotAllowed"),
        ({"priorityClassName": "gpu-high"}, "Validated"),
        ({"tolerations": [{"operator": "Exists"}]}, "TolerationNotAllowed"),
        ({"tolerations": [{"operator": "Exists", "effect": "NoExecute"}]}, "TolerationNotAllowed"),
        (
            {"tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]},
            "TolerationNotAllowed",
        ),
        ({"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}, "Validated"),
    ],
)
def test_a_pool_cannot_borrow_the_operators_privileges(spec, expected):
    validation = reconcile.validate_pool(pool(**spec))
    assert validation.reason == expected and validation.ok == (expected == "Validated")
    assert validation.message


def test_the_operators_settings_widen_what_pools_may_ask_for():
    rules = SpecRules(
        worker_service_accounts=("warmserve-worker", "gpu-worker"),
        host_path_roots=("/data",),
        allow_system_priority_classes=True,
    )
    assert reconcile.validate_pool(pool(worker={"serviceAccountName": "gpu-worker"}), rules).ok
    assert reconcile.validate_pool(pool(priorityClassName="system-node-critical"), rules).ok
    assert reconcile.validate_pool(pool(modelCache={"hostPath": "/data/m", "mountPath": "/models"}), rules).ok
    assert not reconcile.validate_pool(pool(modelCache={"hostPath": "/mnt/models", "mountPath": "/models"}), rules).ok
    env = {
        "WARMSERVE_WORKER_SERVICE_ACCOUNTS": "warmserve-worker, gpu-worker",
        "WARMSERVE_HOST_PATH_ROOTS": "/data",
        "WARMSERVE_ALLOW_SYSTEM_PRIORITY_CLASSES": "true",
    }
    assert ControllerConfig.from_env(env).rules == rules
    flags = ControllerConfig.from_args(["--worker-service-account", "x", "--host-path-root", "/y"], env={})
    assert flags.rules.worker_service_accounts == ("x",) and flags.rules.host_path_roots == ("/y",)
    assert ControllerConfig.from_env({}).rules == SpecRules()


@pytest.mark.parametrize(
    "spec",
    [
        {"worker": {"serviceAccountName": "warmserve-operator"}},
        {"modelCache": {"hostPath": "/"}},
        {"priorityClassName": "system-node-critical"},
        {"affinity": {"nodeAffinity": "yes"}},
    ],
)
async def test_an_invalid_pool_gets_no_daemonset_and_a_condition(spec):
    import kopf

    from warmserve.controller import pools

    runtime = make_runtime()
    runtime.api = api = FakeApi()
    body = _pool_body()
    body["spec"].update(spec)
    memo, patch = kopf.Memo(), kopf.Patch()
    await pools.reconcile_pool(runtime, kopf.Body(body), patch, memo, LOG)  # no exception, no retry
    assert api.writes == [], "no DaemonSet is created or patched for an invalid pool"
    obs = Observation(
        NOW, "T", ObservedPool("pool1", "ns1", "pool-uid", 3, parse_pool_spec(body["spec"]), {}, body), (), (), {}
    )
    status = decide(obs, ForecastView(None, 3600, {}, {}, {}, {}), PlannerState()).pool_status.status
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["Valid"]["status"] == "False" and conds["Ready"]["status"] == "False"
    assert conds["Ready"]["reason"] == conds["Valid"]["reason"] != "NoWorkers"


# -------------------------------------------------------------- item 3: model sources stay in the cache
CACHE = parse_pool_spec(
    {"modelCache": {"persistentVolumeClaimName": "weights", "mountPath": "/models"}, "gpu": {"count": 8}}
)


@pytest.mark.parametrize(
    ("source", "path", "why"),
    [
        ("file:///models/llama", "file:///models/llama", ""),
        ("file:///models/a/./b/", "file:///models/a/b", ""),
        ("file://../../etc/passwd", None, "SourceOutsideCache"),
        ("file:///etc", None, "SourceOutsideCache"),
        ("file:///etc/passwd", None, "SourceOutsideCache"),
        ("file:///models/../../../etc", None, "SourceOutsideCache"),
        ("file:///models/..", None, "SourceOutsideCache"),
        ("file:///modelsX/llama", None, "SourceOutsideCache"),
        ("file:///var/run/secrets/kubernetes.io/serviceaccount", None, "SourceOutsideCache"),
        ("file:///models/a\x00b", None, "SourceOutsideCache"),
        ("pvc://weights/meta/llama", "file:///models/meta/llama", ""),
        ("pvc://weights/../x", None, "SourceOutsideCache"),
        ("pvc://weights/a/../../x", None, "SourceOutsideCache"),
        ("pvc://other/llama", None, "SourceNotOnPool"),
        ("hf://meta-llama/Llama-2-7b-hf", "file:///models/meta-llama/Llama-2-7b-hf", ""),
        ("hf://../x", None, "SourceOutsideCache"),
        ("hf://org/..", None, "SourceOutsideCache"),
        ("hf://org/repo/../../etc", None, "SourceOutsideCache"),
        ("hf:///etc/passwd", None, "SourceOutsideCache"),
        ("s3://bucket/x", None, "SourceNotOnPool"),
    ],
)
def test_every_source_resolves_inside_the_cache_or_is_refused(source, path, why):
    resolved = reconcile.resolve_source(source, CACHE)
    assert resolved.path == path and resolved.reason == why
    validation = reconcile.validate_model(
        parse_model_spec("m", {"poolRef": {"name": "p"}, "model": {"source": source}}), CACHE, GIB
    )
    assert validation.reason == (why or "Validated")
    if why == "SourceOutsideCache":
        assert repr(source) in validation.message, "the condition names the source"


def test_an_outside_source_never_reaches_a_plan_nor_the_operators_filesystem(tmp_path):
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"\x10" + b"\x00" * 7 + b"{}")
    spec = parse_model_spec("m", {"poolRef": {"name": "pool1"}, "model": {"source": f"file://{secret}"}})
    runtime = make_runtime()
    reads = []
    runtime.weights.resolve = lambda *a, **k: reads.append(a)  # type: ignore[method-assign]
    from warmserve.controller.observe import model_weight

    info = asyncio.run(model_weight(runtime, spec, pool(), {}))
    assert info.bytes is None and reads == [], "the operator does not open a path outside the cache"
    observed = ObservedModel("m", "um", 1, spec, WeightInfo(GIB, "spec", ""), {})
    obs = Observation(NOW, "T", ObservedPool("pool1", "ns1", "u", 1, pool(), {}), (), (observed,), {})
    assert obs.catalog.entries == () and obs.catalog.validations["um"].reason == "SourceOutsideCache"


# -------------------------------------------------------------- item 4: what a worker reports is checked
def _serving_pod(endpoint: str, ip: str = "10.0.0.1", name: str = "pool1-worker-0"):
    plan = Plan.build(3, [PlanGroup((0,), (PlanReplica("a", "ua", "file:///models/a", 1, Role.SERVE),))])
    state = {
        "observedGeneration": 3,
        "devices": [{"index": 0, "totalBytes": GIB, "usedBytes": 0, "freeBytes": GIB}],
        "replicas": [
            {
                "model": "a",
                "uid": "ua",
                "gpus": [0],
                "phase": "serving",
                "progress": 1,
                "endpoint": endpoint,
                "ready": True,
            }
        ],
        "errors": [],
    }
    pod = worker_pod("pool1", 0)
    pod["metadata"]["name"] = name
    pod["status"]["podIP"] = ip
    pod["metadata"]["annotations"] = {PLAN_ANNOTATION: plan.dumps(), STATE_ANNOTATION: json.dumps(state)}
    return reconcile.view_worker(pod, 2)


@pytest.mark.parametrize(
    ("endpoint", "published"),
    [
        ("10.0.0.1:8000", True),
        ("10.0.0.1:8063", True),
        ("169.254.169.254:80/latest/meta-data", False),
        ("169.254.169.254:8000", False),
        ("10.0.0.1:8064", False),
        ("10.0.0.1:22", False),
        ("10.0.0.2:8000", False),  # another pod's IP
        ("127.0.0.1:8000", False),  # the operator's own loopback
        ("kubernetes.default.svc:443", False),
        ("10.0.0.1", False),
    ],
)
def test_a_reported_endpoint_is_used_only_on_the_pods_ip_and_engine_ports(endpoint, published):
    worker = _serving_pod(endpoint)
    ports = range(8000, 8064)
    observed = reconcile.observe_models([worker], ports)["ua"]
    assert (observed.endpoints == [endpoint]) == published
    targets = WorkerMetricsScraper.targets([worker], 9400, ports)
    assert (f"http://{endpoint}/metrics" in targets) == published
    assert "http://10.0.0.1:9400/metrics" in targets
    conds = {
        c.type: c
        for c in reconcile.model_conditions(
            parse_model_spec("a", {}), reconcile.Validation(True, "Validated", ""), observed
        )
    }
    status = reconcile.pool_status(
        [worker], expected_workers=1, plan_generation=3, existing_conditions=None, generation=1, now="T", ports=ports
    )
    pool_degraded = {c["type"]: c for c in status["conditions"]}["Degraded"]
    if published:
        assert conds["Degraded"].status == "False" and pool_degraded["status"] == "False"
    else:
        assert conds["Degraded"].reason == "EndpointsRejected" and endpoint[:20] in conds["Degraded"].message
        assert pool_degraded["reason"] == "EndpointsRejected" and "rejected" in pool_degraded["message"]


def test_a_pod_without_an_ip_has_no_usable_endpoint():
    worker = _serving_pod("10.0.0.1:8000", ip="")
    assert reconcile.observe_models([worker])["ua"].endpoints == []


def test_worker_strings_in_status_are_bounded():
    worker = _serving_pod("10.0.0.1:8000")
    huge = {
        "observedGeneration": 1,
        "errors": [{"reason": "x" * 100_000} for _ in range(500)],
        "replicas": [],
        "devices": [],
    }
    pod = worker_pod("pool1", 0)
    pod["metadata"]["annotations"] = {STATE_ANNOTATION: json.dumps(huge)}
    worker = reconcile.view_worker(pod, 2)
    status = reconcile.pool_status(
        [worker], expected_workers=1, plan_generation=0, existing_conditions=None, generation=1, now="T"
    )
    assert len(json.dumps(status)) < 20_000


@pytest.mark.parametrize(
    ("url", "allowed", "ok"),
    [
        ("http://prometheus.monitoring:9090", (), True),
        ("https://prometheus.monitoring.svc/prefix", (), True),
        ("http://10.96.0.10:9090", (), True),
        ("http://169.254.169.254/latest/meta-data", (), False),
        ("http://169.254.169.254:80/", (), False),
        ("http://[fd00:ec2::254]/", (), False),
        ("http://[::ffff:169.254.169.254]/", (), False),
        ("http://metadata.google.internal/computeMetadata/v1/", (), False),
        ("http://127.0.0.1:9090", (), False),
        ("http://localhost:9090", (), False),
        ("http://0.0.0.0:9090", (), False),
        ("http://2852039166/", (), False),  # 169.254.169.254 in decimal
        ("http://0xa9.0xfe.0xa9.0xfe/", (), False),
        ("http://0251.0376.0251.0376/", (), False),
        ("http://user:pass@prometheus:9090", (), False),
        ("file:///etc/passwd", (), False),
        ("gopher://prometheus:70/", (), False),
        ("ftp://prometheus/", (), False),
        ("http://prometheus.monitoring:9090", ("prometheus.monitoring",), True),
        ("http://evil.example.com:9090", ("prometheus.monitoring",), False),
        ("http://prometheus:99999", (), False),
        ("http://prom etheus:9090", (), False),
    ],
)
def test_the_prometheus_url_is_checked_before_any_fetch(url, allowed, ok):
    problem = reconcile.prometheus_url_problem(url, allowed)
    assert (problem is None) == ok, problem
    validation = reconcile.validate_pool(
        pool(loadSource={"kind": "prometheus", "prometheusUrl": url}), SpecRules(prometheus_hosts=allowed)
    )
    assert validation.ok == ok and (ok or validation.reason == "PrometheusUrlNotAllowed")
    if not ok:
        assert "spec.loadSource.prometheusUrl" in validation.message


async def test_an_invalid_pool_is_not_scraped():
    scraper = FakeScraper()
    runtime = make_runtime(scraper_factory=lambda rt, pool: scraper)
    runtime.api = FakeApi()
    body = _pool_body()
    body["spec"]["loadSource"] = {"kind": "prometheus", "prometheusUrl": "http://169.254.169.254/"}
    obs = await KubeObserver(runtime, "ns1", "pool1").observe(body, NOW, LOG)
    assert scraper.calls == 0 and obs.pool.validation.reason == "PrometheusUrlNotAllowed"


async def test_scrapers_follow_no_redirect():
    """A worker's /metrics (or a Prometheus) answering 302 towards another address does not lead the operator
    there."""
    hits: list[str] = []

    async def target(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(text='warmserve_inflight_requests{model="a"} 9\n')

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://127.0.0.1:{tport}/stolen")

    runners = []
    for handler in (target, redirect):
        app = web.Application()
        app.router.add_get("/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
    tport, rport = free_port(), free_port()
    await web.TCPSite(runners[0], "127.0.0.1", tport).start()
    await web.TCPSite(runners[1], "127.0.0.1", rport).start()
    try:
        view = reconcile.WorkerView("w0", "n0", "127.0.0.1", 1, True, None, None)
        assert await WorkerMetricsScraper(rport, timeout_seconds=2).sample([view]) == {}
        with pytest.raises(ValueError):
            await PrometheusScraper(f"http://127.0.0.1:{rport}").sample([])
        assert hits == [], "no redirect was followed"
    finally:
        for runner in runners:
            await runner.cleanup()


# -------------------------------------------------------------- item 5: the worker pod is hardened
def test_the_worker_pod_runs_unprivileged_with_a_read_only_root():
    for spec in ({}, {"gpu": {"count": 0, "memoryMiB": 4096}, "worker": {"shmSize": "8Gi"}}):
        ds = builders.build_worker_daemonset("pool1", "ns1", parse_pool_spec(spec))
        pod = ds["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert pod["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True and sc["privileged"] is False
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace"))
        assert pod["enableServiceLinks"] is False


def test_everything_the_worker_and_its_engines_write_has_a_writable_mount():
    ds = builders.build_worker_daemonset("pool1", "ns1", parse_pool_spec({"modelCache": {"hostPath": "/mnt/models"}}))
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = [
        m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly") and "emptyDir" in volumes[m["name"]]
    ]

    def is_writable(path: str) -> bool:
        return any(path == w or path.startswith(w.rstrip("/") + "/") for w in writable)

    args = container["args"]
    for flag in ("--state-dir", "--shm-dir"):
        assert is_writable(args[args.index(flag) + 1]), flag
    env = {e["name"]: e.get("value") for e in container["env"]}
    for key in (
        "HOME",
        "XDG_CACHE_HOME",
        "VLLM_CACHE_ROOT",
        "HF_HOME",
        "TRITON_CACHE_DIR",
        "TORCHINDUCTOR_CACHE_DIR",
        "CUDA_CACHE_PATH",
        "NUMBA_CACHE_DIR",
        "TMPDIR",
    ):
        assert is_writable(env[key]), (key, env[key])
    assert is_writable("/tmp") and env["HF_HUB_OFFLINE"] == "1"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True and volumes["model-cache"]["hostPath"]["path"] == "/mnt/models"
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    # the model cache can never be mounted over one of these (validate_pool: InvalidMountPath)
    for path in [*writable, "/etc/podinfo"]:
        assert reason(pool(modelCache={"mountPath": path})) == "InvalidMountPath", path


# -------------------------------------------------------------- item 6: plan generations only grow
def _pod_view(plan_text: str | None, observed: int | None, name: str = "pool1-worker-0"):
    pod = worker_pod("pool1", 0)
    pod["metadata"]["name"] = name
    ann = {}
    if plan_text is not None:
        ann[PLAN_ANNOTATION] = plan_text
    if observed is not None:
        ann[STATE_ANNOTATION] = json.dumps({"observedGeneration": observed, "devices": [], "replicas": []})
    pod["metadata"]["annotations"] = ann
    return reconcile.view_worker(pod, 2)


DESIRED = Plan.build(0, [PlanGroup((0,), (PlanReplica("a", "ua", "file:///models/a", 1),))])


@pytest.mark.parametrize(
    ("plan_text", "observed", "expected"),
    [
        ("{not json", 5, 6),  # unreadable plan, worker at 5: the next plan is 6, not 1
        (None, 5, 6),  # the annotation was removed
        (Plan(3, DESIRED.groups).dumps(), 5, 6),  # same contents but behind the worker: rewritten above it
        (Plan(7, ()).dumps(), 5, 8),  # changed contents: previous + 1
        (None, None, 1),
        (None, 2**60, 1),  # an unbelievable observedGeneration is ignored
    ],
)
def test_plan_generations_never_go_back(plan_text, observed, expected):
    worker = _pod_view(plan_text, observed)
    writes, generation = number_plans([worker], {worker.pod: DESIRED})
    (write,) = writes
    assert write.plan.generation == expected and write.plan.groups == DESIRED.groups
    assert generation >= expected


def test_an_unchanged_plan_the_worker_has_applied_is_not_rewritten():
    worker = _pod_view(Plan(5, DESIRED.groups).dumps(), 5)
    assert number_plans([worker], {worker.pod: DESIRED}) == ((), 5)


async def test_deleting_a_model_numbers_the_stripped_plan_above_the_worker():
    api = FakeApi()
    pod = worker_pod("pool1", 0)
    pod["metadata"]["annotations"] = {
        PLAN_ANNOTATION: Plan(3, DESIRED.groups).dumps(),
        STATE_ANNOTATION: json.dumps({"observedGeneration": 9, "devices": [], "replicas": []}),
    }
    api.add(PODS, "ns1", pod)
    assert await strip_model_from_pool(api, PODS, "ns1", "pool1", "ua") == 1
    (_, _, _, patch) = api.writes[0]
    written = plan_of_pod(patch)
    assert written is not None and written.generation == 10 and written.groups == ()


# -------------------------------------------------------------- item 7: no affinity shape raises
def _nested(depth: int) -> dict:
    node: dict = {}
    root = node
    for _ in range(depth):
        node["nodeAffinity"] = {}
        node = node["nodeAffinity"]
    return root


_DEEP = _nested(5000)  # deeper than Python's recursion limit: nothing may walk it recursively


@pytest.mark.parametrize(
    "affinity",
    [
        {"nodeAffinity": "yes"},
        {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": "gpu"}}},
        {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": ["x"]}}},
        {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": "x"}},
        {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": 5}]}},
        {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": "1"}]}},
        {"unknownAffinity": {}},
        _nested(500),
        _DEEP,
        "yes",
        ["a"],
    ],
)
def test_no_affinity_shape_makes_the_operator_raise(affinity):
    spec = {**pool_body()["spec"], "affinity": affinity}
    parsed = parse_pool_spec(spec)  # never raises
    validation = reconcile.validate_pool(parsed)
    assert validation.reason == "InvalidAffinity" and "spec.affinity" in validation.message
    builders.build_worker_daemonset("pool1", "ns1", parsed)  # never raises either (the affinity was dropped)
    if isinstance(affinity, dict) and affinity is not _DEEP:
        assert schema_errors("WarmPool", {**pool_body(), "spec": spec}), "the typed CRD schema refuses it"


def test_a_valid_affinity_is_kept_and_merged_with_the_gpu_selector():
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]
            },
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 10, "preference": {"matchExpressions": [{"key": "ssd", "operator": "Exists"}]}}
            ],
        },
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 5, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {}}}
            ]
        },
    }
    body = {**pool_body(), "spec": {**pool_body()["spec"], "affinity": affinity}}
    assert schema_errors("WarmPool", body) == [] and cel_violations("WarmPool", body) == []
    parsed = parse_pool_spec(body["spec"])
    assert reconcile.validate_pool(parsed).ok and parsed.affinity == affinity
    terms = builders.build_worker_daemonset("p", "ns", parsed)["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    assert [e["key"] for e in terms[0]["matchExpressions"]][:2] == ["zone", "nvidia.com/gpu.present"]


@pytest.mark.parametrize(
    "spec",
    [
        {"gpu": {"count": "eight"}},
        {"gpu": {"memoryMiB": 1.5}},
        {"worker": "big"},
        {"worker": {"arenaFraction": float("nan")}},
        {"forecast": {"windowSeconds": 0}},
        {"policy": {"intervalSeconds": 0}},
        {"tolerations": "all"},
        {"tolerations": [{"key": 1}]},
        {"nodeSelector": {"a": 1}},
        {"gpu": {"count": 3}},
        {"forecast": {"kind": "arima"}},
    ],
)
def test_wrong_types_and_values_are_conditions_not_exceptions(spec):
    validation = reconcile.validate_pool(parse_pool_spec({**pool_body()["spec"], **spec}))
    assert not validation.ok and validation.reason == "InvalidSpec" and "spec." in validation.message


# -------------------------------------------------------------- item 8: values that must fit together
def test_the_cpu_pool_defaults_do_not_fit_their_shm():
    cpu = parse_pool_spec({"gpu": {"count": 0}})  # memoryMiB 81920 × 0.9 = 77 GB arena vs 16Gi of /dev/shm
    validation = reconcile.validate_pool(cpu)
    assert validation.reason == "ArenaExceedsShm" and "spec.worker.shmSize" in validation.message
    assert reason(parse_pool_spec({"gpu": {"count": 0, "memoryMiB": 4096}})) == "Validated"
    assert reason(parse_pool_spec({"gpu": {"count": 0, "memoryMiB": 4096}, "worker": {"memory": "2Gi"}})) == (
        "ArenaExceedsMemory"
    )


@pytest.mark.parametrize(
    ("worker", "gpu", "layer", "expected"),
    [
        ({"pageSizeBytes": 65537}, {}, "cel", "PageSizeInvalid"),
        ({"pageSizeBytes": 3 * 65536}, {}, "cel", "PageSizeInvalid"),
        ({"pageSizeBytes": 1 << 30}, {"memoryMiB": 1024}, "none", "PageSizeExceedsArena"),
        ({}, {"memoryMiB": 10**13}, "schema", "MemoryTooLarge"),
        ({"shmSize": "lots"}, {}, "schema", "InvalidQuantity"),
        ({"memory": "-1Gi"}, {}, "schema", "InvalidQuantity"),
        ({"enginePortBase": 9380}, {}, "none", "PortConflict"),
    ],
)
def test_values_nobody_checked(worker, gpu, layer, expected):
    spec = {**pool_body()["spec"], "worker": worker, "gpu": {**pool_body()["spec"]["gpu"], **gpu}}
    body = {**pool_body(), "spec": spec}
    errors, violations = schema_errors("WarmPool", body), cel_violations("WarmPool", body)
    assert bool(errors) == (layer == "schema") and bool(violations) == (layer == "cel"), (errors, violations)
    assert reason(parse_pool_spec(spec)) == expected


def test_a_huge_memory_pool_is_frozen_not_crashing_every_round():
    body = _pool_body()
    body["spec"]["gpu"]["memoryMiB"] = 10**13
    spec = parse_pool_spec(body["spec"])
    model = _md("a", "ua", prewarm={"minWarmReplicas": 1})
    observed = ObservedModel("a", "ua", 1, parse_model_spec("a", model["spec"]), WeightInfo(GIB, "spec", ""), {})
    workers = tuple(reconcile.view_worker(worker_pod("pool1", i), 2) for i in range(2))
    obs = Observation(NOW, "T", ObservedPool("pool1", "ns1", "u", 1, spec, {}, body), workers, (observed,), {})
    decision = decide(obs, ForecastView(1, 3600, {"ua": Demand(1.0, 2.0)}, {}, {}, {}), PlannerState())
    assert decision.plans == ()
    (md,) = decision.model_statuses
    assert {c["type"]: c["reason"] for c in md.status["conditions"]}["Valid"] == "PoolNotValid"


# -------------------------------------------------------------- item 9: the load history fits and is saved
def _long_history(models: int, days: int, window: int = 10) -> LoadHistory:
    per_day = 86400 // window
    h = LoadHistory(window, capacity=days * per_day)
    rng = np.random.default_rng(0)
    base = 20000 * per_day
    values = rng.gamma(2, 3, size=days * per_day)
    for m in range(models):
        series = h.series.setdefault(f"{m:08d}-0000-0000-0000-000000000000", {"avg": {}, "peak": {}})
        for i, v in enumerate(values):
            series["avg"][base + i] = float(v)
            series["peak"][base + i] = float(v) * 1.5
    return h


def test_a_35_day_history_of_10_s_windows_fits_a_configmap_dropping_the_oldest_days():
    history = _long_history(models=1, days=35)
    assert len(history.encode()) > 1_000_000, "the full history would not fit a ConfigMap"
    text, dropped = history.encode_within(900_000)
    assert len(text) <= 900_000 and dropped > 0 and dropped % (86400 // 10) == 0, "whole days, oldest first"
    back = LoadHistory.decode(text, 10, history.capacity)
    (uid,) = history.series
    kept = back.series[uid]["avg"]
    newest = max(history.series[uid]["avg"])
    assert max(kept) == newest and min(kept) == min(history.series[uid]["avg"]) + dropped
    assert history.encode_within(10**9) == (history.encode(), 0)


async def test_a_failed_save_is_retried_every_round_counted_and_shown():
    runtime = make_runtime()
    runtime.api = api = FakeApi()
    api.fail[("create", "configmaps")] = ApiError(500, "Internal", "etcd is unhappy")
    p = parse_pool_spec({**pool_body()["spec"], "forecast": {"windowSeconds": 60}})
    obs_model = ObservedModel(
        "a", "ua", 1, parse_model_spec("a", model_body("a")["spec"]), WeightInfo(1, "spec", ""), {}
    )
    workers = tuple(reconcile.view_worker(worker_pod("pool1", i), 2) for i in range(2))
    body = _pool_body()
    obs = Observation(NOW, "T", ObservedPool("pool1", "ns1", "pool-uid", 3, p, {}, body), workers, (obs_model,), {})
    forecasts = Forecasts(LoadHistory(60, 100))
    actuator = KubeActuator(runtime, "ns1", "pool1")
    saves = []
    t = 6000.0
    for _ in range(4):  # window 100 opens, then closes; three more rounds inside window 101
        update = forecasts.advance(t, p, obs.catalog.entries, {"ua": 2.0})
        saves.append(update.history is not None)
        result = await act(
            obs, update, decide(obs, forecasts.view(p), PlannerState()), actuator, runtime.metrics, LOG, 0
        )
        if result.history_attempted:
            forecasts.saved(result.history_error, update.history_note)
        t += 60 if len(saves) == 1 else 1
    assert saves == [False, True, True, True], "retried at every round after the failure, not only the next window"
    assert runtime.metrics.history_save_failures.labels("pool1")._value.get() == 3
    view = forecasts.view(p)
    status = decide(obs, view, PlannerState()).pool_status.status
    saved = {c["type"]: c for c in status["conditions"]}["HistorySaved"]
    assert saved["status"] == "False" and saved["reason"] == "SaveFailed" and "etcd is unhappy" in saved["message"]
    del api.fail[("create", "configmaps")]
    update = forecasts.advance(t, p, obs.catalog.entries, {"ua": 2.0})
    result = await act(obs, update, decide(obs, forecasts.view(p), PlannerState()), actuator, runtime.metrics, LOG, 0)
    forecasts.saved(result.history_error, update.history_note)
    assert result.history_error is None and not forecasts.unsaved
    assert forecasts.advance(t + 1, p, obs.catalog.entries, {"ua": 2.0}).history is None, "saved: no more writes"
    saved_view = forecasts.view(p).history_save
    assert saved_view is not None and saved_view[:2] == (True, "Saved")


async def test_an_actuator_that_raises_does_not_stop_the_plans():
    class Raising(KubeActuator):
        async def save_history(self, encoded, owner, logger):  # type: ignore[override]
            raise OSError("disk full")

    runtime = make_runtime()
    runtime.api = api = FakeApi()
    obs = Observation(
        NOW,
        "T",
        ObservedPool("pool1", "ns1", "pool-uid", 3, parse_pool_spec(_pool_body()["spec"]), {}, _pool_body()),
        tuple(reconcile.view_worker(worker_pod("pool1", i), 2) for i in range(2)),
        (
            ObservedModel(
                "a",
                "ua",
                1,
                parse_model_spec("a", _md("a", "ua", prewarm={"minWarmReplicas": 1})["spec"]),
                WeightInfo(GIB // 4, "spec", ""),
                {},
            ),
        ),
        {},
    )
    decision = decide(obs, ForecastView(1, 3600, {}, {}, {}, {}), PlannerState())
    result = await act(
        obs, ForecastUpdate(history="x"), decision, Raising(runtime, "ns1", "pool1"), runtime.metrics, LOG, 0
    )
    assert result.history_error is not None and "disk full" in result.history_error
    assert [w[1] for w in api.writes if w[0] == "patch"] == ["pods", "pods"], "the plans were written anyway"


def test_model_statuses_use_the_pool_rules_for_engine_args():
    model = parse_model_spec(
        "m", {"poolRef": {"name": "p"}, "model": {"source": "pvc://weights/m"}, "engine": {"args": ["--my-flag", "1"]}}
    )
    assert reconcile.validate_model(model, CACHE, GIB).reason == "EngineArgNotAllowed"
    assert reconcile.validate_model(model, CACHE, GIB, SpecRules(engine_args_allowed=("--my-flag",))).ok
    switch = parse_model_spec(
        "m", {"poolRef": {"name": "p"}, "model": {"source": "pvc://weights/m"}, "engine": {"args": ["--sw", "x"]}}
    )
    assert not reconcile.validate_model(switch, CACHE, GIB, SpecRules(engine_args_allowed=("--sw=bool",))).ok


@pytest.mark.parametrize(
    "args",
    [
        ["--trust-remote-code"],
        ["--chat-template", "/var/run/secrets/kubernetes.io/serviceaccount/token"],
        ["--chat-template=/etc/passwd"],
        ["--host", "0.0.0.0"],
        ["--port=80"],
        ["--middleware", "os.system"],
        ["--enable-prefix-caching", "; rm -rf /"],
        ["$(curl evil)"],
        ["-tp", "8"],
        ["--max-num-seqs", "$(id)"],
        ["--served-model-name", "gpt-4"],
        ["--load-format", "dummy"],
    ],
)
def test_engine_args_that_widen_access_are_refused(args):
    model = parse_model_spec(
        "m", {"poolRef": {"name": "p"}, "model": {"source": "pvc://weights/m"}, "engine": {"args": args}}
    )
    validation = reconcile.validate_model(model, CACHE, GIB)
    # flags the worker sets itself are refused as such (protocol.FORBIDDEN_ENGINE_FLAGS), any other by the allow-list
    reason = "ForbiddenEngineFlag" if forbidden_engine_flag(args) else "EngineArgNotAllowed"
    assert validation.reason == reason and "spec.engine.args[" in validation.message


def test_allowed_engine_args_pass():
    args = [
        "--enable-prefix-caching",
        "--max-num-seqs",
        "128",
        "--kv-cache-dtype=fp8",
        "--block-size",
        "16",
    ]
    model = parse_model_spec(
        "m", {"poolRef": {"name": "p"}, "model": {"source": "pvc://weights/m"}, "engine": {"args": args}}
    )
    assert reconcile.validate_model(model, CACHE, GIB).ok


def test_quantities():
    assert reconcile.parse_quantity("16Gi") == 16 * GIB and reconcile.parse_quantity("500m") * 1000 == 500
    assert reconcile.parse_quantity("1e9") == 10**9 and reconcile.parse_quantity(".5Ki") == 512
    for bad in ("", "lots", "-1Gi", "1GiB", "1 Gi", "1" * 40):
        assert reconcile.parse_quantity(bad) is None, bad
    assert math.isclose(float(reconcile.parse_quantity("1.5G") or 0), 1.5e9)
