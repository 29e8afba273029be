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
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

OPERATOR_NAME = "warmserve-operator"
FINALIZER = "operator.warmserve.io/finalizer"
ANNOTATION_PREFIX = "operator.warmserve.io"


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
        )

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ControllerConfig:
        base = cls.from_env(env)
        p = argparse.ArgumentParser(prog="python -m warmserve.controller", description="WarmServe operator")
        p.add_argument("--namespace", action="append", dest="namespaces", help="watch only this namespace")
        p.add_argument("--peering", default=base.peering, help="KopfPeering name for HA; empty = standalone")
        p.add_argument("--priority", type=int, default=base.priority, help="peering priority of this replica")
        p.add_argument("--metrics-port", type=int, default=base.metrics_port)
        p.add_argument("--liveness-port", type=int, default=base.liveness_port)
        p.add_argument("--log-format", choices=["json", "text"], default=base.log_format)
        p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=base.log_level)
        p.add_argument("--no-loop", action="store_true", help="reconcile objects but do not plan")
        p.add_argument("--pvc-root", default=base.pvc_root, help="where pvc:// claims are mounted")
        p.add_argument("--scrape-timeout", type=float, default=base.scrape_timeout_seconds)
        p.add_argument("--no-events", action="store_true", help="do not post Kubernetes events")
        p.add_argument(
            "--router-url",
            default=base.router_url,
            help="the router (e.g. http://warmserve-router.warmserve-system:8080): load from its demand, and a "
            "request held for a model without engines starts a round at once",
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
        )
