"""Where per-model load samples come from: a small interface and two implementations.

`WorkerMetricsScraper` reads each worker's Prometheus `/metrics` and sums, per served model name,
`warmserve_inflight_requests{model=...}` (the worker/router's gauge) or, when a worker only relays vLLM's
own metrics, `vllm:num_requests_running + vllm:num_requests_waiting` by `model_name`.
`PrometheusScraper` asks a Prometheus HTTP API (`/api/v1/query`) with a PromQL returning one series per
`model` label. Either returns {served model name: in-flight requests now}; a failed worker is skipped (and
counted), never fatal to the round.

What workers report is not trusted: an engine endpoint is scraped only when it is on the worker pod's own IP
and within the pool's engine ports (`reconcile.endpoint_problem`, the router's rule), no scraper follows a
redirect (a worker's /metrics answering 302 to a metadata service leads nowhere), and no response body is read
beyond `MAX_BODY_BYTES`.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import aiohttp

from warmserve.controller.reconcile import DEFAULT_ENGINE_PORTS, WorkerView, endpoint_problem

DEFAULT_QUERY = "sum by (model) (warmserve_inflight_requests)"
MAX_BODY_BYTES = 8 << 20  # a metrics exposition or query answer larger than this is refused


class BodyTooLarge(ValueError):
    """A scraped response exceeded MAX_BODY_BYTES."""


async def read_text(resp: aiohttp.ClientResponse, limit: int = MAX_BODY_BYTES) -> str:
    """The response body as text, refusing one larger than `limit` bytes (read no further than that)."""
    if resp.content_length is not None and resp.content_length > limit:
        raise BodyTooLarge(f"{resp.url}: {resp.content_length} bytes")
    body = await resp.content.read(limit + 1)
    if len(body) > limit:
        raise BodyTooLarge(f"{resp.url}: more than {limit} bytes")
    return body.decode(resp.get_encoding() if resp.charset else "utf-8", errors="replace")


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
        try:
            name, labels, value = m.group(1), dict(_LABEL.findall(m.group(2))), float(m.group(3))
        except ValueError:
            continue
        if not math.isfinite(value) or value < 0:  # a worker's numbers are not trusted
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

    def __init__(
        self, port: int, timeout_seconds: float = 2.0, on_error: Any = None, engine_ports: range = DEFAULT_ENGINE_PORTS
    ) -> None:
        self.port = port
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self.on_error = on_error
        self.engine_ports = engine_ports

    async def _one(self, session: aiohttp.ClientSession, url: str) -> tuple[dict[str, float], dict[str, float]]:
        try:
            async with session.get(url, allow_redirects=False) as resp:
                resp.raise_for_status()
                if resp.status != 200:
                    raise ValueError(f"{url}: HTTP {resp.status}")
                return parse_inflight_sources(await read_text(resp))
        except (aiohttp.ClientError, TimeoutError, ValueError):
            if self.on_error:
                self.on_error(url)
            return {}, {}

    @staticmethod
    def targets(workers: Sequence[WorkerView], port: int, engine_ports: range = DEFAULT_ENGINE_PORTS) -> list[str]:
        """Each ready worker's /metrics (on its pod IP) and each serving engine's whose endpoint passes
        `reconcile.endpoint_problem`; a rejected endpoint is never a target (the pool's Degraded condition
        names it)."""
        urls = []
        for w in workers:
            if not (w.ip and w.ready):
                continue
            urls.append(f"http://{w.ip}:{port}/metrics")
            if w.state is not None:
                urls.extend(
                    f"http://{r.endpoint}/metrics"
                    for r in w.state.replicas
                    if r.serving and r.endpoint and endpoint_problem(r.endpoint, w, engine_ports) is None
                )
        return sorted(set(urls))

    async def sample(self, workers: Sequence[WorkerView]) -> dict[str, float]:
        urls = self.targets(workers, self.port, self.engine_ports)
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
        async with (
            aiohttp.ClientSession(timeout=self.timeout) as session,
            session.get(self.url, allow_redirects=False) as resp,
        ):
            resp.raise_for_status()
            return parse_router_demand(await read_text(resp))


class PrometheusScraper:
    def __init__(self, url: str, query: str = "", timeout_seconds: float = 2.0) -> None:
        self.url = url.rstrip("/") + "/api/v1/query"
        self.query = query or DEFAULT_QUERY
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)

    async def sample(self, workers: Sequence[WorkerView]) -> dict[str, float]:
        async with (
            aiohttp.ClientSession(timeout=self.timeout) as session,
            session.get(self.url, params={"query": self.query}, allow_redirects=False) as resp,
        ):
            resp.raise_for_status()
            if resp.status != 200:
                raise ValueError(f"{self.url}: HTTP {resp.status} (redirects are not followed)")
            data = json.loads(await read_text(resp))
        if not isinstance(data, Mapping):
            raise ValueError(f"{self.url}: the answer is not a JSON object")
        return parse_prometheus_vector(data)


def parse_prometheus_vector(data: Mapping[str, Any]) -> dict[str, float]:
    """{model: value} from an instant-vector query response (pure; anything off the shape is skipped)."""
    out: dict[str, float] = {}
    block = data.get("data")
    result = block.get("result") if isinstance(block, Mapping) else None
    for item in result if isinstance(result, list) else []:
        if not isinstance(item, Mapping):
            continue
        metric, value = item.get("metric"), item.get("value")
        model = metric.get("model") if isinstance(metric, Mapping) else None
        try:
            v = float(value[1])  # type: ignore[index]
        except (TypeError, ValueError, IndexError, KeyError):
            continue
        if isinstance(model, str) and model and math.isfinite(v) and v >= 0:
            out[model] = out.get(model, 0.0) + v
    return out
