"""The observe stage of a pool round: read what the decide stage needs into one immutable `Observation`.

`Observer` is the interface the round uses; `KubeObserver` is the operator's implementation: the pool's worker
pods (plan and state annotations), its ModelDeployments and their weight bytes (`WeightResolver`), the
workload's desired pod count, and a load sample from the pool's load source. A failed load source is counted
and skipped (the round plans on no load rather than not at all); API failures raise `ApiError`. Annotations
that did not change since the last round are not parsed again (`reconcile.ParseMemo`).

Nothing a spec names is touched before it is validated: a pool that fails `reconcile.validate_pool` is not
scraped (its Prometheus URL may be the metadata service), and a model's safetensors headers are read only when
its source resolves inside the pool's model cache (`reconcile.resolve_source`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from warmserve.controller import builders, reconcile
from warmserve.controller.conditions import Condition, now_rfc3339
from warmserve.controller.decide import Observation, ObservedModel, ObservedPool
from warmserve.controller.history import LoadHistory, OpenWindow
from warmserve.controller.k8s import CONFIGMAPS, DAEMONSETS, MODELDEPLOYMENTS, PODS
from warmserve.controller.runtime import Runtime
from warmserve.controller.scrape import LoadScraper, PrometheusScraper, RouterScraper, WorkerMetricsScraper
from warmserve.controller.spec import ModelSpec, PoolSpec, parse_model_spec, parse_pool_spec
from warmserve.controller.weights import WeightInfo
from warmserve.protocol import engine_ports

WorkloadProblem = Callable[[], tuple[str, str] | None]
InferencePoolOutcome = Callable[[], Condition | None]  # the WarmPool handler's outcome (pools.record_inference_pool)


class Observer(Protocol):
    """Reads one pool's world; a single-machine driver implements the same two calls."""

    async def load_history(self, pool: PoolSpec) -> LoadHistory:
        """The persisted load history of the pool (empty when there is none)."""
        ...

    async def load_open_window(self, pool: PoolSpec) -> OpenWindow | None:
        """The persisted checkpoint of the pool's open load window (None when there is none or it is unreadable)."""
        ...

    async def observe(self, body: Mapping[str, Any], now: float, logger: Any) -> Observation:
        """Everything one round decides on, read at `now` for the pool object `body`."""
        ...


def default_scraper(runtime: Runtime, pool: PoolSpec) -> LoadScraper:
    if pool.load_source.kind == "prometheus":
        return PrometheusScraper(
            pool.load_source.prometheus_url, pool.load_source.query, runtime.config.scrape_timeout_seconds
        )
    if runtime.config.router_url:
        return RouterScraper(runtime.config.router_url, runtime.config.scrape_timeout_seconds)
    return WorkerMetricsScraper(
        pool.worker.port, runtime.config.scrape_timeout_seconds, engine_ports=engine_ports(pool.worker.engine_port_base)
    )


async def model_weight(
    runtime: Runtime, spec: ModelSpec, pool: PoolSpec | None, status: Mapping[str, Any] | None
) -> WeightInfo:
    """A model's weight bytes (`Runtime.weights`), reading safetensors headers only for a source inside the
    pool's model cache: the operator never opens a path a ModelDeployment names outside it."""
    if not spec.weight_bytes and (pool is None or reconcile.resolve_source(spec.source, pool).path is None):
        recorded = (status or {}).get("weightBytes")
        if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0:
            return WeightInfo(recorded, "safetensors", "weightBytes recorded in status by an earlier header read")
        return WeightInfo(None, "unknown", "weightBytes not given and the source is not inside a pool's model cache")
    return await runtime.weights.resolve(spec.weight_bytes, spec.source, status)


def _deleting(obj: Mapping[str, Any]) -> bool:
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


class KubeObserver:
    """Observes a WarmPool through the Kubernetes API (`k8s.Api`) and its load source."""

    def __init__(
        self,
        runtime: Runtime,
        namespace: str | None,
        name: str,
        workload_problem: WorkloadProblem | None = None,
        inference_pool: InferencePoolOutcome | None = None,
    ) -> None:
        self.runtime = runtime
        self.namespace = namespace
        self.name = name
        self.workload_problem = workload_problem or (lambda: None)
        self.inference_pool = inference_pool or (lambda: None)
        self.memo = reconcile.ParseMemo()  # the pods' annotations parsed in the last round

    async def load_history(self, pool: PoolSpec) -> LoadHistory:
        api = self.runtime.require_api()
        capacity = pool.forecast.history_days * pool.forecast.period
        cm = await api.get(CONFIGMAPS, self.namespace, builders.history_configmap_name(self.name))
        text = ((cm or {}).get("binaryData") or {}).get(builders.HISTORY_KEY, "")
        history = LoadHistory.decode(text, pool.forecast.window_seconds, capacity) if text else None
        return history or LoadHistory(pool.forecast.window_seconds, capacity)

    async def load_open_window(self, pool: PoolSpec) -> OpenWindow | None:
        api = self.runtime.require_api()
        cm = await api.get(CONFIGMAPS, self.namespace, builders.open_window_configmap_name(self.name))
        text = ((cm or {}).get("data") or {}).get(builders.OPEN_WINDOW_KEY)
        return OpenWindow.decode(text, pool.forecast.window_seconds) if isinstance(text, str) else None

    async def observe(self, body: Mapping[str, Any], now: float, logger: Any) -> Observation:
        runtime, api = self.runtime, self.runtime.require_api()
        pool = parse_pool_spec(body.get("spec"))
        pods = await api.list(PODS, self.namespace, builders.selector_labels(self.name))
        workers = tuple(reconcile.view_worker(p, pool.gpu.count, self.memo) for p in pods)
        self.memo.next_round()
        models = []
        for md in await api.list(MODELDEPLOYMENTS, self.namespace):
            if ((md.get("spec") or {}).get("poolRef") or {}).get("name") != self.name or _deleting(md):
                continue
            meta, status = md["metadata"], md.get("status") or {}
            spec = parse_model_spec(meta["name"], md.get("spec"))
            weight = await model_weight(runtime, spec, pool, status)
            models.append(ObservedModel(meta["name"], meta["uid"], meta.get("generation"), spec, weight, status))

        rules = runtime.config.rules
        load: Mapping[str, float] = {}
        if reconcile.validate_pool(pool, rules).ok:  # an invalid pool is not scraped
            try:
                factory = runtime.scraper_factory or default_scraper
                live = sorted((w for w in workers if not w.deleting), key=lambda w: w.pod)
                load = await factory(runtime, pool).sample(live)
            except Exception as exc:  # a broken metrics source must not stop planning
                runtime.metrics.scrape_errors.labels(self.name).inc()
                logger.warning(f"load scrape failed: {exc}")
                load = {}

        workload = await api.get(DAEMONSETS, self.namespace, builders.worker_workload_name(self.name))
        desired = ((workload or {}).get("status") or {}).get("desiredNumberScheduled")
        meta = body.get("metadata") or {}
        return Observation(
            now=now,
            stamp=now_rfc3339(),
            pool=ObservedPool(
                name=self.name,
                namespace=self.namespace,
                uid=str(meta.get("uid", "")),
                generation=meta.get("generation"),
                spec=pool,
                status=body.get("status") or {},
                body=body,
                desired_workers=int(desired) if isinstance(desired, int) and desired > 0 else None,
                workload_problem=self.workload_problem(),
                inference_pool_enabled=runtime.config.inference_pool.enabled,
                inference_pool=self.inference_pool(),
                rules=rules,
            ),
            workers=workers,
            models=tuple(models),
            load=dict(load),
        )
