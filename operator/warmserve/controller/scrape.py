"""Where per-model load samples come from: a small interface and two implementations.

`WorkerMetricsScraper` reads each worker's Prometheus `/metrics` and sums, per served model name,
`warmserve_inflight_requests{model=...}` (the worker/router's gauge) or, when a worker only relays vLLM's
own metrics, `vllm:num_requests_running + vllm:num_requests_waiting` by `model_name`.
`PrometheusScraper` asks a Prometheus HTTP API (`/api/v1/query`) with a PromQL returning one series per
`model` label. Either returns {served model name: in-flight requests now}; a failed worker is skipped (and
counted), never fatal to the round.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import aiohttp

from warmserve.controller.reconcile import WorkerView

DEFAULT_QUERY = "sum by (model) (warmserve_inflight_requests)"
_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}\s+([-+0-9.eEinfINFaN]+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class LoadScraper(Protocol):
    async def sample(self, workers: Sequence[WorkerView]) -> dict[str, float]: ...


def parse_inflight(text: str) -> dict[str, float]:
    """Per-model in-flight requests from Prometheus text exposition (pure): our gauge, else vLLM's."""
    own, vllm = parse_inflight_sources(text)
    return own or vllm


def parse_inflight_sources(text: str) -> tuple[dict[str, float], dict[str, float]]:
    """(warmserve_inflight_requests by model, vLLM running+waiting by model_name) from one exposition."""
    own: dict[str, float] = {}
    vllm: dict[str, float] = {}
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        name, labels, value = m.group(1), dict(_LABEL.findall(m.group(2))), float(m.group(3))
        if value != value:
            continue
        if name == "warmserve_inflight_requests" and "model" in labels:
            own[labels["model"]] = own.get(labels["model"], 0.0) + value
        elif name in ("vllm:num_requests_running", "vllm:num_requests_waiting") and "model_name" in labels:
            vllm[labels["model_name"]] = vllm.get(labels["model_name"], 0.0) + value
    return own, vllm


def merge(samples: Iterable[Mapping[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for s in samples:
        for k, v in s.items():
            total[k] = total.get(k, 0.0) + v
    return total


class WorkerMetricsScraper:
    """Scrapes every worker's /metrics and every serving engine's /metrics (vLLM) of the pool.

    When any worker exports `warmserve_inflight_requests`, those gauges are the load; otherwise the vLLM
    engines' running + waiting requests are summed per served model (the engines the workers report).
    """

    def __init__(self, port: int, timeout_seconds: float = 2.0, on_error: Any = None) -> None:
        self.port = port
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self.on_error = on_error

    async def _one(self, session: aiohttp.ClientSession, url: str) -> tuple[dict[str, float], dict[str, float]]:
        try:
            async with session.get(url) as resp:
                resp.raise_for_status()
                return parse_inflight_sources(await resp.text())
        except (aiohttp.ClientError, TimeoutError, ValueError):
            if self.on_error:
                self.on_error(url)
            return {}, {}

    @staticmethod
    def targets(workers: Sequence[WorkerView], port: int) -> list[str]:
        urls = []
        for w in workers:
            if not (w.ip and w.ready):
                continue
            urls.append(f"http://{w.ip}:{port}/metrics")
            if w.state is not None:
                urls.extend(f"http://{r.endpoint}/metrics" for r in w.state.replicas if r.serving and r.endpoint)
        return sorted(set(urls))

    async def sample(self, workers: Sequence[WorkerView]) -> dict[str, float]:
        urls = self.targets(workers, self.port)
        if not urls:
            return {}
        async with aiohttp.ClientSession(timeout=self.timeout) as session:
            results = await asyncio.gather(*(self._one(session, u) for u in urls))
        own = merge(o for o, _ in results)
        return own or merge(v for _, v in results)


def parse_router_demand(text: str) -> dict[str, float]:
    """{model: requests in the router} from the router's exposition (`warmserve_inflight_requests`)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            model = sample.labels.get("model")
            if sample.name == "warmserve_inflight_requests" and model and sample.value == sample.value:
                out[model] = out.get(model, 0.0) + sample.value
    return out


class RouterScraper:
    """The router's per-model demand: every request it holds or has sent to an engine (docs/operator.md)."""

    def __init__(self, url: str, timeout_seconds: float = 2.0) -> None:
        self.url = url.rstrip("/") + "/metrics"
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)

    async def sample(self, workers: Sequence[WorkerView]) -> dict[str, float]:
        async with aiohttp.ClientSession(timeout=self.timeout) as session, session.get(self.url) as resp:
            resp.raise_for_status()
            return parse_router_demand(await resp.text())


class PrometheusScraper:
    def __init__(self, url: str, query: str = "", timeout_seconds: float = 2.0) -> None:
        self.url = url.rstrip("/") + "/api/v1/query"
        self.query = query or DEFAULT_QUERY
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)

    async def sample(self, workers: Sequence[WorkerView]) -> dict[str, float]:
        async with (
            aiohttp.ClientSession(timeout=self.timeout) as session,
            session.get(self.url, params={"query": self.query}) as resp,
        ):
            resp.raise_for_status()
            data = await resp.json(content_type=None)
        return parse_prometheus_vector(data)


def parse_prometheus_vector(data: Mapping[str, Any]) -> dict[str, float]:
    """{model: value} from an instant-vector query response (pure)."""
    out: dict[str, float] = {}
    for item in ((data.get("data") or {}).get("result")) or []:
        model = (item.get("metric") or {}).get("model")
        value = item.get("value") or [None, "nan"]
        try:
            v = float(value[1])
        except (TypeError, ValueError, IndexError):
            continue
        if model and v == v:
            out[model] = out.get(model, 0.0) + v
    return out
