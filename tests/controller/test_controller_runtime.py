"""Operational pieces: kopf settings, metrics over HTTP, structured logs, the load scrapers over HTTP."""

from __future__ import annotations

import json
import logging
import socket
import urllib.request

import kopf
from aiohttp import web

from warmserve.controller import lifecycle
from warmserve.controller.__main__ import JsonFormatter
from warmserve.controller.metrics import OperatorMetrics
from warmserve.controller.reconcile import WorkerView
from warmserve.controller.runtime import Runtime
from warmserve.controller.scrape import PrometheusScraper, WorkerMetricsScraper
from warmserve.controller.settings import ControllerConfig
from warmserve.protocol import Phase, ReplicaState, WorkerState


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kopf_settings_use_our_finalizer_prefix_and_peering():
    settings = kopf.OperatorSettings()
    lifecycle.configure(settings, Runtime(config=ControllerConfig(peering="warmserve", priority=7)))
    assert settings.persistence.finalizer == "operator.warmserve.io/finalizer"
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert settings.persistence.progress_storage.prefix == "operator.warmserve.io"
    assert settings.persistence.diffbase_storage.prefix == "operator.warmserve.io"
    assert settings.peering.name == "warmserve" and settings.peering.priority == 7 and settings.peering.mandatory
    standalone = kopf.OperatorSettings()
    lifecycle.configure(standalone, Runtime(config=ControllerConfig()))
    assert standalone.peering.standalone


def test_metrics_are_served_over_http():
    metrics = OperatorMetrics()
    metrics.forecast.labels("pool", "llama", "peak").set(12.5)
    metrics.observed.labels("pool", "llama", "peak").set(10.0)
    metrics.plan_changes.labels("pool").inc()
    metrics.promotions.labels("pool", "uid", "hit").inc()
    metrics.reconcile_seconds.labels("WarmPool", "plan").observe(0.02)
    metrics.reconcile_errors.labels("WarmPool", "round").inc()
    port = free_port()
    metrics.serve(port)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'warmserve_forecast_concurrency{model="llama",pool="pool",stat="peak"} 12.5' in text
    assert 'warmserve_observed_concurrency{model="llama",pool="pool",stat="peak"} 10.0' in text
    assert 'warmserve_plan_changes_total{pool="pool"} 1.0' in text
    assert 'warmserve_promotions_total{model="uid",pool="pool",source="hit"} 1.0' in text
    assert "warmserve_reconcile_duration_seconds_bucket" in text and "warmserve_reconcile_errors_total" in text


def test_json_logs_carry_extras():
    record = logging.LogRecord("kopf.objects", logging.WARNING, __file__, 1, "plan %s written", (3,), None)
    record.pool = "a100x8"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "plan 3 written" and entry["level"] == "warning" and entry["pool"] == "a100x8"


async def _serve(routes: dict[str, str]) -> tuple[web.AppRunner, int]:
    app = web.Application()
    for path, body in routes.items():
        app.router.add_get(path, lambda request, body=body: web.Response(text=body))
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


async def test_worker_scraper_reads_engines_when_workers_have_no_gauge():
    worker, wport = await _serve({"/metrics": 'warmserve_worker_replicas{phase="warm"} 2\n'})
    engine, eport = await _serve(
        {
            "/metrics": 'vllm:num_requests_running{model_name="llama"} 3\n'
            'vllm:num_requests_waiting{model_name="llama"} 1\n'
        }
    )
    try:
        state = WorkerState(1, (), (ReplicaState("llama", "u", (0,), Phase.SERVING, 1.0, f"127.0.0.1:{eport}", True),))
        view = WorkerView("w0", "n0", "127.0.0.1", 8, True, None, state)
        scraper = WorkerMetricsScraper(wport, timeout_seconds=2, engine_ports=range(eport, eport + 1))
        assert await scraper.sample([view]) == {"llama": 4.0}
        # the same endpoint outside the pool's engine ports is not scraped
        assert await WorkerMetricsScraper(wport, timeout_seconds=2).sample([view]) == {}
        down = WorkerView("w1", "n1", "127.0.0.1", 8, True, None, None)
        errors = []
        broken = WorkerMetricsScraper(free_port(), timeout_seconds=1, on_error=errors.append)
        assert await broken.sample([down]) == {} and errors
    finally:
        await worker.cleanup()
        await engine.cleanup()


async def test_prometheus_scraper():
    body = json.dumps(
        {
            "status": "success",
            "data": {"resultType": "vector", "result": [{"metric": {"model": "llama"}, "value": [1, "7"]}]},
        }
    )
    server, port = await _serve({"/api/v1/query": body})
    try:
        assert await PrometheusScraper(f"http://127.0.0.1:{port}").sample([]) == {"llama": 7.0}
    finally:
        await server.cleanup()
