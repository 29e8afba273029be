"""Operator settings: environment variables, overridable by command-line flags.

Every setting has a documented default (docs/operator.md lists them); the Helm chart and the plain
manifests set them through env on the operator Deployment.

| env                              | flag                | default                         |
|----------------------------------|---------------------|---------------------------------|
| WARMSERVE_NAMESPACES             | --namespace (repeat)| "" = every namespace            |
| WARMSERVE_PEERING                | --peering           | "" = standalone (no HA)         |
| WARMSERVE_PRIORITY               | --priority          | 0 ("random": distinct per pod)  |
| WARMSERVE_METRICS_PORT           | --metrics-port      | 9090 (0 disables)               |
| WARMSERVE_LIVENESS_PORT          | --liveness-port     | 8080 (0 disables)               |
| WARMSERVE_LOG_FORMAT             | --log-format        | json                            |
| WARMSERVE_LOG_LEVEL              | --log-level         | info                            |
| WARMSERVE_LOOP                   | --no-loop           | true (run the control loop)     |
| WARMSERVE_PVC_ROOT               | --pvc-root          | "" (pvc:// sources not read)    |
| WARMSERVE_SCRAPE_TIMEOUT_SECONDS | --scrape-timeout    | 2.0                             |
| WARMSERVE_POST_EVENTS            | --no-events         | true                            |
| WARMSERVE_ROUTER_URL             | --router-url        | "" (load from the workers)      |

One Gateway API Inference Extension `InferencePool` per WarmPool (off by default; docs/gateway.md):

| env                                   | flag                           | default                        |
|---------------------------------------|--------------------------------|--------------------------------|
| WARMSERVE_INFERENCE_POOL              | --inference-pool               | false                          |
| WARMSERVE_INFERENCE_POOL_EPP          | --inference-pool-epp           | "" (no endpointPickerRef)      |
| WARMSERVE_INFERENCE_POOL_EPP_PORT     | --inference-pool-epp-port      | 9002                           |
| WARMSERVE_INFERENCE_POOL_FAILURE_MODE | --inference-pool-failure-mode  | FailClose                      |

What a WarmPool or ModelDeployment author may ask for (docs/design.md, "Trust model"; `SpecRules`):

| env                                     | flag                             | default                           |
|-----------------------------------------|----------------------------------|-----------------------------------|
| WARMSERVE_WORKER_SERVICE_ACCOUNTS       | --worker-service-account (repeat)| warmserve-worker                  |
| WARMSERVE_HOST_PATH_ROOTS               | --host-path-root (repeat)        | /var/lib/warmserve,/mnt/models    |
| WARMSERVE_ALLOW_SYSTEM_PRIORITY_CLASSES | --allow-system-priority-classes  | false                             |
| WARMSERVE_PROMETHEUS_HOSTS              | --prometheus-host (repeat)       | "" (any non-local host)           |
| WARMSERVE_ENGINE_ARGS_ALLOWED           | --allow-engine-arg (repeat)      | "" (only the built-in allow-list) |
| WARMSERVE_HISTORY_BUDGET_BYTES          | --history-budget-bytes           | 900000                            |
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from warmserve.cliutil import HelpFormatter

OPERATOR_NAME = "warmserve-operator"
FINALIZER = "operator.warmserve.io/finalizer"
ANNOTATION_PREFIX = "operator.warmserve.io"
DEFAULT_WORKER_SERVICE_ACCOUNTS = ("warmserve-worker",)
DEFAULT_HOST_PATH_ROOTS = ("/var/lib/warmserve", "/mnt/models")
HISTORY_BUDGET_BYTES = 900_000  # encoded load history per pool: a ConfigMap holds 1 MiB, metadata included
EPP_FAILURE_MODES = ("FailClose", "FailOpen")  # InferencePool spec.endpointPickerRef.failureMode (v1)
EPP_DEFAULT_PORT = 9002  # the endpoint picker's ext-proc gRPC port in the Gateway API Inference Extension


@dataclass(frozen=True)
class InferencePoolSettings:
    """Whether each WarmPool gets an `InferencePool` (inference.networking.k8s.io/v1), and the endpoint picker
    (EPP) it names (pure data; `builders.build_inference_pool` reads it).

    `epp` is the name of an existing EPP Service in the pool's namespace (WarmServe ships none); `{pool}` in it
    is replaced by the WarmPool's name, since an EPP serves one InferencePool (a result above 63 characters is
    shortened to a prefix and a hash: `builders.epp_service_name`). Empty: no `endpointPickerRef` (optional from the
    v1.6.0 CRD; whether a gateway supports that is up to its implementation).
    """

    enabled: bool = False
    epp: str = ""
    epp_port: int = EPP_DEFAULT_PORT
    failure_mode: str = "FailClose"

    def __post_init__(self) -> None:
        if self.failure_mode not in EPP_FAILURE_MODES:
            raise ValueError(f"inference pool failure mode must be one of {', '.join(EPP_FAILURE_MODES)}")
        if not 1 <= self.epp_port <= 65535:
            raise ValueError(f"inference pool EPP port {self.epp_port} is not in 1..65535")


@dataclass(frozen=True)
class SpecRules:
    """What the operator's settings allow a WarmPool or ModelDeployment author to ask for (pure data).

    `reconcile.validate_pool` and `reconcile.validate_model` check specs against it; anything outside is a
    `Valid=False` condition with a reason, and for a pool no worker workload is written.
    """

    worker_service_accounts: tuple[str, ...] = DEFAULT_WORKER_SERVICE_ACCOUNTS
    host_path_roots: tuple[str, ...] = DEFAULT_HOST_PATH_ROOTS
    allow_system_priority_classes: bool = False
    prometheus_hosts: tuple[str, ...] = ()  # empty: any host that is not link-local, loopback or metadata
    engine_args_allowed: tuple[str, ...] = ()  # engine flags allowed beyond the built-in list


def _list(text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if text is None:
        return default
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _priority(text: str) -> int:
    """An integer, or "random": HA replicas need distinct priorities (equal ones all pause)."""
    if text.strip().lower() == "random":
        return random.SystemRandom().randint(1, 2**31 - 1)
    return int(text)


def _bool(text: str | None, default: bool) -> bool:
    if text is None or text == "":
        return default
    return text.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class ControllerConfig:
    namespaces: tuple[str, ...] = ()
    peering: str = ""
    priority: int = 0
    metrics_port: int = 9090
    liveness_port: int = 8080
    log_format: str = "json"
    log_level: str = "info"
    loop_enabled: bool = True
    pvc_root: str = ""
    scrape_timeout_seconds: float = 2.0
    post_events: bool = True
    router_url: str = ""  # the router's base URL: its demand is every pool's load, and it wakes a round at once
    worker_service_accounts: tuple[str, ...] = DEFAULT_WORKER_SERVICE_ACCOUNTS
    host_path_roots: tuple[str, ...] = DEFAULT_HOST_PATH_ROOTS
    allow_system_priority_classes: bool = False
    prometheus_hosts: tuple[str, ...] = ()
    engine_args_allowed: tuple[str, ...] = ()
    history_budget_bytes: int = HISTORY_BUDGET_BYTES
    inference_pool: InferencePoolSettings = InferencePoolSettings()

    @property
    def rules(self) -> SpecRules:
        """What pool and model authors may ask for (see `SpecRules`)."""
        return SpecRules(
            worker_service_accounts=self.worker_service_accounts,
            host_path_roots=self.host_path_roots,
            allow_system_priority_classes=self.allow_system_priority_classes,
            prometheus_hosts=self.prometheus_hosts,
            engine_args_allowed=self.engine_args_allowed,
        )

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @property
    def standalone(self) -> bool:
        return not self.peering

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ControllerConfig:
        env = os.environ if env is None else env
        d = cls()
        namespaces = tuple(n.strip() for n in env.get("WARMSERVE_NAMESPACES", "").split(",") if n.strip())
        return cls(
            namespaces=namespaces,
            peering=env.get("WARMSERVE_PEERING", d.peering),
            priority=_priority(env.get("WARMSERVE_PRIORITY", str(d.priority))),
            metrics_port=int(env.get("WARMSERVE_METRICS_PORT", d.metrics_port)),
            liveness_port=int(env.get("WARMSERVE_LIVENESS_PORT", d.liveness_port)),
            log_format=env.get("WARMSERVE_LOG_FORMAT", d.log_format),
            log_level=env.get("WARMSERVE_LOG_LEVEL", d.log_level),
            loop_enabled=_bool(env.get("WARMSERVE_LOOP"), d.loop_enabled),
            pvc_root=env.get("WARMSERVE_PVC_ROOT", d.pvc_root),
            scrape_timeout_seconds=float(env.get("WARMSERVE_SCRAPE_TIMEOUT_SECONDS", d.scrape_timeout_seconds)),
            post_events=_bool(env.get("WARMSERVE_POST_EVENTS"), d.post_events),
            router_url=env.get("WARMSERVE_ROUTER_URL", d.router_url),
            worker_service_accounts=_list(env.get("WARMSERVE_WORKER_SERVICE_ACCOUNTS"), d.worker_service_accounts),
            host_path_roots=_list(env.get("WARMSERVE_HOST_PATH_ROOTS"), d.host_path_roots),
            allow_system_priority_classes=_bool(
                env.get("WARMSERVE_ALLOW_SYSTEM_PRIORITY_CLASSES"), d.allow_system_priority_classes
            ),
            prometheus_hosts=_list(env.get("WARMSERVE_PROMETHEUS_HOSTS"), d.prometheus_hosts),
            engine_args_allowed=_list(env.get("WARMSERVE_ENGINE_ARGS_ALLOWED"), d.engine_args_allowed),
            history_budget_bytes=int(env.get("WARMSERVE_HISTORY_BUDGET_BYTES", d.history_budget_bytes)),
            inference_pool=InferencePoolSettings(
                enabled=_bool(env.get("WARMSERVE_INFERENCE_POOL"), d.inference_pool.enabled),
                epp=env.get("WARMSERVE_INFERENCE_POOL_EPP", d.inference_pool.epp).strip(),
                epp_port=int(env.get("WARMSERVE_INFERENCE_POOL_EPP_PORT") or d.inference_pool.epp_port),
                failure_mode=env.get("WARMSERVE_INFERENCE_POOL_FAILURE_MODE") or d.inference_pool.failure_mode,
            ),
        )

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ControllerConfig:
        base = cls.from_env(env)
        p = argparse.ArgumentParser(
            prog="warmserve operator",
            description="The WarmServe Kubernetes operator (also: python -m warmserve.controller).\n\n"
            "Every setting is read from an environment variable (named with each option; docs/operator.md)\n"
            "and a flag overrides it; the defaults shown include the environment. It needs a cluster: the\n"
            "pod's service account, or the kubeconfig at $KUBECONFIG or ~/.kube/config; without one it\n"
            "exits with status 3.",
            formatter_class=HelpFormatter,
        )
        p.add_argument(
            "--namespace",
            action="append",
            dest="namespaces",
            help="watch only this namespace (repeatable; env WARMSERVE_NAMESPACES, comma-separated; default: "
            f"{','.join(base.namespaces) or 'every namespace'})",
        )
        p.add_argument(
            "--peering", default=base.peering, help="KopfPeering name for HA, empty = standalone; env WARMSERVE_PEERING"
        )
        p.add_argument(
            "--priority",
            type=int,
            default=base.priority,
            help='peering priority of this replica; env WARMSERVE_PRIORITY (an integer, or "random")',
        )
        p.add_argument(
            "--metrics-port",
            type=int,
            default=base.metrics_port,
            help="port of the Prometheus /metrics endpoint, 0 disables; env WARMSERVE_METRICS_PORT",
        )
        p.add_argument(
            "--liveness-port",
            type=int,
            default=base.liveness_port,
            help="port of the /healthz liveness endpoint, 0 disables; env WARMSERVE_LIVENESS_PORT",
        )
        p.add_argument(
            "--log-format",
            choices=["json", "text"],
            default=base.log_format,
            help="log lines on stdout; env WARMSERVE_LOG_FORMAT",
        )
        p.add_argument(
            "--log-level",
            choices=["debug", "info", "warning", "error"],
            default=base.log_level,
            help="env WARMSERVE_LOG_LEVEL",
        )
        p.add_argument(
            "--no-loop",
            action="store_true",
            help="reconcile objects but do not plan (env WARMSERVE_LOOP=false does the same)",
        )
        p.add_argument(
            "--pvc-root",
            default=base.pvc_root,
            help="where pvc:// claims are mounted, empty = pvc:// sources are not read; env WARMSERVE_PVC_ROOT",
        )
        p.add_argument(
            "--scrape-timeout",
            type=float,
            default=base.scrape_timeout_seconds,
            help="seconds to wait for a worker's /state; env WARMSERVE_SCRAPE_TIMEOUT_SECONDS",
        )
        p.add_argument(
            "--no-events",
            action="store_true",
            help="do not post Kubernetes events (env WARMSERVE_POST_EVENTS=false does the same)",
        )
        p.add_argument(
            "--router-url",
            default=base.router_url,
            help="the router (e.g. http://warmserve-router.warmserve-system:8080): load from its demand, and a "
            "request held for a model without engines starts a round at once; empty = load from the workers; "
            "env WARMSERVE_ROUTER_URL",
        )
        p.add_argument(
            "--worker-service-account",
            action="append",
            dest="worker_service_accounts",
            help="a service account WarmPools may give their workers (repeatable; env "
            "WARMSERVE_WORKER_SERVICE_ACCOUNTS, comma-separated; default: "
            f"{','.join(base.worker_service_accounts)})",
        )
        p.add_argument(
            "--host-path-root",
            action="append",
            dest="host_path_roots",
            help="a directory under which a WarmPool's modelCache.hostPath may lie (repeatable; env "
            f"WARMSERVE_HOST_PATH_ROOTS, comma-separated; default: {','.join(base.host_path_roots)})",
        )
        p.add_argument(
            "--allow-system-priority-classes",
            action="store_true",
            help="let WarmPools use system-* priority classes for their workers (env "
            "WARMSERVE_ALLOW_SYSTEM_PRIORITY_CLASSES=true does the same)",
        )
        p.add_argument(
            "--prometheus-host",
            action="append",
            dest="prometheus_hosts",
            help="a host a WarmPool's loadSource.prometheusUrl may name (repeatable; env WARMSERVE_PROMETHEUS_HOSTS, "
            f"comma-separated; default: {','.join(base.prometheus_hosts) or 'any public host'})",
        )
        p.add_argument(
            "--allow-engine-arg",
            action="append",
            dest="engine_args_allowed",
            help="an engine flag ModelDeployments may pass beyond the built-in allow-list (repeatable; env "
            f"WARMSERVE_ENGINE_ARGS_ALLOWED, comma-separated; default: {','.join(base.engine_args_allowed) or 'none'})",
        )
        p.add_argument(
            "--history-budget-bytes",
            type=int,
            default=base.history_budget_bytes,
            help="bytes of encoded load history kept per pool (a ConfigMap holds 1 MiB); "
            "env WARMSERVE_HISTORY_BUDGET_BYTES",
        )
        p.add_argument(
            "--inference-pool",
            action="store_true",
            help="manage one Gateway API Inference Extension InferencePool per WarmPool, selecting its worker "
            "pods on their first engine ports (docs/gateway.md; env WARMSERVE_INFERENCE_POOL=true does the same)",
        )
        p.add_argument(
            "--inference-pool-epp",
            default=base.inference_pool.epp,
            help="the endpoint picker Service an InferencePool names ({pool} = the WarmPool's name), empty = no "
            "endpointPickerRef; env WARMSERVE_INFERENCE_POOL_EPP",
        )
        p.add_argument(
            "--inference-pool-epp-port",
            type=int,
            default=base.inference_pool.epp_port,
            help="the endpoint picker Service's port; env WARMSERVE_INFERENCE_POOL_EPP_PORT",
        )
        p.add_argument(
            "--inference-pool-failure-mode",
            choices=EPP_FAILURE_MODES,
            default=base.inference_pool.failure_mode,
            help="what the gateway does when the endpoint picker does not answer; "
            "env WARMSERVE_INFERENCE_POOL_FAILURE_MODE",
        )
        a = p.parse_args(argv)
        return cls(
            namespaces=tuple(a.namespaces) if a.namespaces else base.namespaces,
            peering=a.peering,
            priority=a.priority,
            metrics_port=a.metrics_port,
            liveness_port=a.liveness_port,
            log_format=a.log_format,
            log_level=a.log_level,
            loop_enabled=base.loop_enabled and not a.no_loop,
            pvc_root=a.pvc_root,
            scrape_timeout_seconds=a.scrape_timeout,
            post_events=base.post_events and not a.no_events,
            router_url=a.router_url,
            worker_service_accounts=tuple(a.worker_service_accounts or base.worker_service_accounts),
            host_path_roots=tuple(a.host_path_roots or base.host_path_roots),
            allow_system_priority_classes=base.allow_system_priority_classes or a.allow_system_priority_classes,
            prometheus_hosts=tuple(a.prometheus_hosts or base.prometheus_hosts),
            engine_args_allowed=tuple(a.engine_args_allowed or base.engine_args_allowed),
            history_budget_bytes=a.history_budget_bytes,
            inference_pool=InferencePoolSettings(
                enabled=base.inference_pool.enabled or a.inference_pool,
                epp=a.inference_pool_epp.strip(),
                epp_port=a.inference_pool_epp_port,
                failure_mode=a.inference_pool_failure_mode,
            ),
        )
