"""Shared fixtures of the control-plane tests: repository paths, CRDs, and a stamping kmock emulator.

kmock's `KubernetesEmulator` stores objects as plain JSON and never assigns server-side metadata; kopf's
finalizer patch tests `/metadata/resourceVersion`, so `StampingEmulator` stamps `uid`, `creationTimestamp`,
`resourceVersion` (bumped on every write) and `generation` (+1 when `spec` changes), like an API server.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import functools
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import jsonpatch
import kmock
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "crds"
EXAMPLES = REPO / "manifests" / "examples"
NS = "ns1"


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader: the CRDs are large


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_LOADER) if d]


@functools.cache
def _crd(kind: str) -> dict[str, Any]:
    for path in sorted(CRD_DIR.glob("*.yaml")):
        doc = load_yaml_docs(path)[0]
        if doc["spec"]["names"]["kind"] == kind:
            return doc
    raise KeyError(kind)


def crd(kind: str) -> dict[str, Any]:
    return copy.deepcopy(_crd(kind))


def merge_patch(base: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (null deletes)."""
    if not isinstance(patch, dict) or not isinstance(base, dict):
        return patch
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


@attrs.frozen
class PatchTestFailed(kmock.KubernetesError):
    """A JSON patch whose `test` op failed: the API server answers 422, which kopf treats as "retry later"."""

    status: int = 422
    reason: str = "Invalid"
    message: str = "the JSON patch test operation failed (the object changed meanwhile)"


@attrs.frozen
class Refused(kmock.KubernetesError):
    """An injected fault: the request is answered with an error *before* the emulator stores anything."""

    status: int = 500
    reason: str = "InternalError"
    message: str = "injected fault: the request was refused and nothing was stored"


class Refusal:
    """Refuse up to `times` requests matching `predicate` (status `status`); counts what it refused."""

    def __init__(self, predicate: Callable[[Any], bool], times: float, status: int) -> None:
        self.predicate, self.remaining, self.status = predicate, times, status
        self.refused = 0

    def take(self, request: Any) -> bool:
        if self.remaining <= 0 or not self.predicate(request):
            return False
        self.remaining -= 1
        self.refused += 1
        return True

    def stop(self) -> None:
        self.remaining = 0


def writes_to(plural: str, name: str | None = None) -> Callable[[Any], bool]:
    """A request predicate: a create or update (patch) of `plural` (optionally of the object `name`)."""

    def match(request: Any) -> bool:
        if request.resource is None or request.resource.plural != plural:
            return False
        if request.action == kmock.action.CREATE:
            return name is None or ((request.data or {}).get("metadata") or {}).get("name") == name
        return request.action == kmock.action.UPDATE and (name is None or request.name == name)

    return match


class StampingEmulator(kmock.KubernetesEmulator):
    """KubernetesEmulator plus the metadata a real API server assigns, and list→watch consistency.

    kmock's watch replays every existing object as ADDED and ignores `?resourceVersion=`, and its lists
    carry no resourceVersion. kopf then processes each object twice from a stale copy, its optimistic
    finalizer patch fails (422) and it waits for an event that already came. A real API server sends
    only changes newer than the list, so this emulator gives lists a resourceVersion and drops watch
    events that are not newer than the one the client asked to watch from.
    """

    _counter = itertools.count(1)

    def _next_rv(self) -> str:
        rv = next(self._counter)
        StampingEmulator._last_rv = rv
        return str(rv)

    _last_rv = 0

    def _current(self, request: Any) -> dict[str, Any] | None:
        try:
            return self.objects[request.resource, request.namespace, request.name].raw
        except (KeyError, TypeError, ValueError):
            return None

    def refuse(self, predicate: Callable[[Any], bool], times: float = 1, status: int = 500) -> Refusal:
        """Answer the next `times` requests matching `predicate` with `status`, storing nothing (kmock's own
        `emulator[...] << 500` reactions answer with the error but store the write anyway)."""
        refusal = Refusal(predicate, times, status)
        self.__dict__.setdefault("_refusals", []).append(refusal)
        return refusal

    async def _handle(self, request: Any) -> Any:
        for refusal in self.__dict__.get("_refusals", ()):
            if refusal.take(request):
                raise Refused(status=refusal.status)
        if request.resource is not None:
            if request.action == kmock.action.CREATE and isinstance(request.data, dict):
                meta = request.data.setdefault("metadata", {})
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
                meta["resourceVersion"] = self._next_rv()
                meta.setdefault("generation", 1)
            elif request.action == kmock.action.UPDATE and request.name is not None:
                current = self._current(request) or {}
                generation = (current.get("metadata") or {}).get("generation", 1)
                if isinstance(request.data, dict):
                    meta = request.data.setdefault("metadata", {})
                    meta["resourceVersion"] = self._next_rv()
                    spec_patch = request.data.get("spec")
                    if spec_patch is not None and request.subresource != "status":
                        old_spec = current.get("spec") or {}
                        if merge_patch(old_spec, spec_patch) != old_spec:
                            meta["generation"] = generation + 1
                elif isinstance(request.data, list):
                    rv = self._next_rv()
                    request.data.append({"op": "replace", "path": "/metadata/resourceVersion", "value": rv})
            elif request.action == kmock.action.DELETE and request.name is not None:
                self._next_rv()
        try:
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as exc:
            raise PatchTestFailed() from exc

    async def _serve_list(self, request: Any) -> Any:
        result = await super()._serve_list(request)
        result["metadata"]["resourceVersion"] = str(StampingEmulator._last_rv)
        selector = str(request.params.get("labelSelector", ""))
        result["items"] = [i for i in result["items"] if selector_matches(selector, i)]
        return result

    async def _serve_watch(self, request: Any) -> Any:
        since = str(request.params.get("resourceVersion", ""))
        floor = int(since) if since.isdigit() else None
        selector = str(request.params.get("labelSelector", ""))
        async for event in super()._serve_watch(request):
            if isinstance(event, dict) and isinstance(event.get("object"), dict):
                rv = str((event["object"].get("metadata") or {}).get("resourceVersion", ""))
                if floor is not None and rv.isdigit() and int(rv) <= floor:
                    continue
                if not selector_matches(selector, event["object"]):
                    continue
            yield event


def selector_matches(selector: str, obj: dict[str, Any]) -> bool:
    """Whether `obj` matches a label selector as the API server reads `?labelSelector=` (the forms the operator
    and the router send: `k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-separated; kmock ignores selectors)."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            ok = labels.get(key.strip()) != value.strip()
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            ok = labels.get(key.strip()) == value.strip()
        elif term.startswith("!"):
            ok = term[1:].strip() not in labels
        else:
            ok = term in labels
        if not ok:
            return False
    return True


def first_n(n: int, *, counter: list[int] | None = None) -> Callable[[Any], bool]:
    """A kmock filter matching the first `n` distinct requests it sees (one-shot error injection)."""
    seen: set[int] = set()
    count = counter if counter is not None else [0]

    def match(request: Any) -> bool:
        if request.id in seen:
            return True
        if len(seen) < n:
            seen.add(request.id)
            count[0] += 1
            return True
        return False

    return match


@pytest.fixture()
def kmock_options() -> dict[str, Any]:
    return {"cls": StampingEmulator}


@pytest.fixture()
async def emulator(kmock: StampingEmulator) -> StampingEmulator:
    kmock.resources.load_bundled()
    for plural, kind in (("warmpools", "WarmPool"), ("modeldeployments", "ModelDeployment")):
        kmock.resources[f"warmserve.io/v1alpha1/{plural}"] = kmock.ResourceInfo(
            kind=kind,
            namespaced=True,
            verbs={"list", "watch", "get", "patch", "create", "delete", "update"},
            subresources={"status"},
        )
    return kmock


def get_obj(em: Any, resource: str, name: str, ns: str = NS) -> dict[str, Any] | None:
    try:
        obj = em.objects[resource, ns, name]
    except KeyError:
        return None
    if obj.deleted:
        return None
    return obj.raw


async def wait_for(predicate: Callable[[], Any], timeout: float = 8.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class FakeClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class FakeScraper:
    """The scraper interface fed by the test: {served model name: in-flight requests}."""

    def __init__(self) -> None:
        self.load: dict[str, float] = {}
        self.calls = 0

    async def sample(self, workers: Any) -> dict[str, float]:
        self.calls += 1
        return dict(self.load)


@contextlib.asynccontextmanager
async def running_operator(em: Any, runtime: Any, *, graceful: bool = False) -> AsyncIterator[Any]:
    """Run the real `kopf.operator()` with our handlers against the emulator until the block exits.

    `graceful`: stop it as SIGTERM does (kopf's stop flag: daemons see `stopped`, then cleanup runs) instead of
    cancelling its task."""
    import kopf

    from warmserve.controller.handlers import register

    registry = kopf.OperatorRegistry()
    register(registry, runtime)
    server = str(em.url).rstrip("/")

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=server, insecure=True)

    runtime.credentials = lambda settings: kopf.ConnectionInfo(server=server, insecure=True)
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True
    settings.posting.enabled = False
    settings.watching.server_timeout = 30
    settings.networking.error_backoffs = (0.1, 0.2, 0.5)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        kopf.operator(
            registry=registry, settings=settings, standalone=True, namespaces=[NS], stop_flag=stop, ready_flag=ready
        )
    )
    try:
        await asyncio.wait_for(ready.wait(), 10)
        yield task
        assert not task.done(), f"the operator exited: {task.exception() if task.done() else ''}"
    finally:
        if graceful:
            stop.set()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(task), 20)
        # Cancelling (rather than the stop flag) skips kopf's 5-second grace wait for "hung" tasks, which
        # here are only the emulator's own request handlers living on the same event loop.
        task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, 15)


def make_runtime(**overrides: Any) -> Any:
    from warmserve.controller.runtime import Runtime
    from warmserve.controller.settings import ControllerConfig

    config = ControllerConfig(namespaces=(NS,), metrics_port=0, liveness_port=0, post_events=False)
    return Runtime(config=overrides.pop("config", config), **overrides)


# ------------------------------------------------------------ test helpers
MIB = 1 << 20
GPU_BYTES_DEFAULT = int(1024 * MIB * 0.9)  # arena of one device of pool_body(): memoryMiB 1024 × 0.9


@pytest.fixture()
async def client(emulator: Any) -> AsyncIterator[Any]:
    """The operator's own API client, pointed at the emulator (the tests' kubectl)."""
    import kopf

    from warmserve.controller.k8s import Api

    api = Api(lambda: kopf.ConnectionInfo(server=str(emulator.url).rstrip("/"), insecure=True), retries=0)
    yield api
    await api.close()


def pool_body(name: str = "pool1", *, gpus: int = 2, memory_mib: int = 1024, window: int = 3600, **spec: Any) -> dict:
    body = {
        "apiVersion": "warmserve.io/v1alpha1",
        "kind": "WarmPool",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "gpu": {"count": gpus, "memoryMiB": memory_mib},
            "policy": {"intervalSeconds": 0.5},
            "forecast": {"windowSeconds": window},
            "modelCache": {"persistentVolumeClaimName": "weights", "mountPath": "/models"},
        },
    }
    body["spec"].update(spec)
    return body


def model_body(name: str, pool: str = "pool1", *, weight: int = 300_000_000, tp: int = 1, **spec: Any) -> dict:
    body = {
        "apiVersion": "warmserve.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "poolRef": {"name": pool},
            "model": {"source": f"pvc://weights/{name}", "tensorParallelSize": tp, "weightBytes": weight},
            "engine": {"maxConcurrency": 8},
        },
    }
    body["spec"].update(spec)
    return body


def worker_pod(pool: str, index: int) -> dict:
    from warmserve.controller.builders import common_labels

    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{pool}-worker-{index}", "namespace": NS, "labels": common_labels(pool)},
        "spec": {"nodeName": f"gpu-node-{index}", "containers": [{"name": "worker", "image": "w"}]},
        "status": {"phase": "Running", "podIP": f"10.0.0.{index + 1}"},
    }


class SimulatedWorkers:
    """Stands in for the sidecar workers: reads each pod's plan and reports it applied in its state.

    Warm replicas report `loading` first and `warm` on the next pass; `serve` replicas report `serving`
    and ready with an endpoint. They advertise `capabilities` (default: everything, so the operator plans them
    as the policy decides; None: an older worker that does not say). Runs as a task on the test's loop;
    bounded by `stop()`.
    """

    ALL_CAPABILITIES: dict[str, Any] = {  # noqa: RUF012
        "kvLend": True,
        "tpPromotion": True,
        "standbyEngines": False,
        "engineSettings": True,
        "deviceKind": "cuda",
        "reasons": {"standbyEngines": "simulated"},
    }

    def __init__(
        self, api: Any, pool: str, gpu_bytes: int, gpus: int = 2, capabilities: dict[str, Any] | None = ALL_CAPABILITIES
    ) -> None:
        self.api, self.pool, self.gpu_bytes, self.gpus = api, pool, gpu_bytes, gpus
        self.capabilities = capabilities
        self.passes = 0
        self.enabled = True
        self._task: asyncio.Task | None = None
        self._loading: set[tuple[str, str, tuple[int, ...]]] = set()

    def state_for(self, pod: dict[str, Any], plan: Any) -> dict[str, Any]:
        from warmserve.protocol import Phase, Role

        replicas, used = [], [0] * self.gpus
        ip = pod["status"]["podIP"]
        for group in plan.groups:
            for i, r in enumerate(group.replicas):
                key = (pod["metadata"]["name"], r.uid, group.gpus)
                if r.role == Role.SERVE:
                    phase, ready, endpoint = Phase.SERVING, True, f"{ip}:{8000 + group.gpus[0] * 10 + i}"
                elif key in self._loading:
                    phase, ready, endpoint = Phase.WARM, False, None
                else:
                    self._loading.add(key)
                    phase, ready, endpoint = Phase.LOADING, False, None
                replicas.append(
                    {
                        "model": r.model,
                        "uid": r.uid,
                        "gpus": list(group.gpus),
                        "phase": phase,
                        "progress": 1.0 if phase != Phase.LOADING else 0.5,
                        "endpoint": endpoint,
                        "ready": ready,
                    }
                )
                for g in group.gpus:
                    used[g] += 100 * MIB
        devices = [
            {"index": g, "totalBytes": self.gpu_bytes, "usedBytes": used[g], "freeBytes": self.gpu_bytes - used[g]}
            for g in range(self.gpus)
        ]
        state = {
            "observedGeneration": plan.generation,
            "devices": devices,
            "replicas": replicas,
            "errors": [],
            "timings": {},
        }
        if self.capabilities is not None:
            state["capabilities"] = self.capabilities
        return state

    async def one_pass(self) -> None:
        import json

        from warmserve.controller.builders import selector_labels
        from warmserve.controller.k8s import PODS
        from warmserve.protocol import STATE_ANNOTATION, plan_of_pod

        for pod in await self.api.list(PODS, NS, selector_labels(self.pool)):
            plan = plan_of_pod(pod)
            if plan is None:
                continue
            state = json.dumps(self.state_for(pod, plan), sort_keys=True)
            if (pod["metadata"].get("annotations") or {}).get(STATE_ANNOTATION) != state:
                await self.api.patch(
                    PODS, NS, pod["metadata"]["name"], {"metadata": {"annotations": {STATE_ANNOTATION: state}}}
                )
        self.passes += 1

    async def _run(self) -> None:
        while True:
            if self.enabled:
                with contextlib.suppress(Exception):
                    await self.one_pass()
            await asyncio.sleep(0.1)

    def start(self) -> SimulatedWorkers:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
