"""The one module that talks to the Kubernetes API (besides kopf's own watching).

A small async client over aiohttp, authenticated with a `kopf.ConnectionInfo` (kopf's own login helpers
produce one from a service account or a kubeconfig), so that handlers and the control loop never block the
event loop. Writes are merge patches (`application/merge-patch+json`) on the fields the operator owns.

Error policy: 409 on create means "already there" (ensure semantics); 404 on get is `None`; 429 and 5xx are
retried a few times with backoff here, and whatever is still failing is raised as `ApiError` for kopf (which
retries the handler) or the control loop (which counts it and tries again next round).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf

from warmserve.protocol import GROUP, VERSION

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str

    def path(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        parts = [base]
        if namespace:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name:
            parts.append(name)
        if subresource:
            parts.append(subresource)
        return "/".join(parts)


PODS = Resource("", "v1", "pods")
CONFIGMAPS = Resource("", "v1", "configmaps")
DAEMONSETS = Resource("apps", "v1", "daemonsets")
WARMPOOLS = Resource(GROUP, VERSION, "warmpools")
MODELDEPLOYMENTS = Resource(GROUP, VERSION, "modeldeployments")
#: Gateway API Inference Extension (GA v1); its CRD may not be installed: a create answers 404 then.
INFERENCEPOOLS = Resource("inference.networking.k8s.io", "v1", "inferencepools")


class ApiError(Exception):
    """A Kubernetes API call failed; `status` is the HTTP status (0 for a connection error)."""

    def __init__(self, status: int, reason: str, message: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class Api:
    """Async Kubernetes API access for the operator's own reads and writes."""

    def __init__(
        self,
        credentials: Callable[[], kopf.ConnectionInfo],
        *,
        timeout_seconds: float = 15.0,
        retries: int = 3,
        backoff_seconds: float = 0.2,
    ) -> None:
        self._credentials = credentials
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._retries = retries
        self._backoff = backoff_seconds
        self._session: aiohttp.ClientSession | None = None
        self._info: kopf.ConnectionInfo | None = None

    async def _ensure(self) -> tuple[aiohttp.ClientSession, kopf.ConnectionInfo]:
        if self._session is None or self._info is None:
            self._info = self._credentials()
            ssl: Any = None
            if self._info.server.startswith("https"):
                ssl = self._info.as_ssl_context()
            self._session = aiohttp.ClientSession(
                base_url=None,
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(ssl=ssl) if ssl is not None else None,
            )
        return self._session, self._info

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        self._session, self._info = None, None

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> Any:
        """One API call with bounded retries on throttling and server errors; returns the parsed JSON."""
        attempt = 0
        while True:
            session, info = await self._ensure()
            headers = {"Accept": "application/json", **info.as_http_headers()}
            data = None
            if body is not None:
                headers["Content-Type"] = content_type
                data = json.dumps(body)
            url = info.server.rstrip("/") + path
            try:
                async with session.request(method, url, data=data, headers=headers, params=params) as resp:
                    text = await resp.text()
                    if resp.status < 400:
                        return json.loads(text) if text else None
                    status, reason, message = resp.status, resp.reason or "", text[:500]
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, reason, message = 0, type(exc).__name__, str(exc)
            if status == 401:  # rotated service-account token: log in again once
                await self.close()
            retryable = status in RETRY_STATUSES or status in (0, 401)
            if not retryable or attempt >= self._retries:
                with contextlib.suppress(ValueError, AttributeError):
                    message = json.loads(message).get("message", message)
                raise ApiError(status, reason, message)
            attempt += 1
            await asyncio.sleep(self._backoff * (2 ** (attempt - 1)))

    # --------------------------------------------------------------- verbs
    async def get(self, res: Resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", res.path(namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(
        self, res: Resource, namespace: str | None, labels: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """List objects, those with every label of `labels` (a selector the API server applies)."""
        params = {"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())} if labels else None
        data = await self.request("GET", res.path(namespace), params=params)
        return list((data or {}).get("items") or [])

    async def create(
        self, res: Resource, namespace: str | None, body: Mapping[str, Any]
    ) -> tuple[dict[str, Any], bool]:
        """Create, or return the existing object on 409: (object, created?)."""
        try:
            return await self.request("POST", res.path(namespace), body=body), True
        except ApiError as exc:
            if exc.status != 409:
                raise
        name = body["metadata"]["name"]
        existing = await self.get(res, namespace, name)
        if existing is None:
            raise ApiError(409, "Conflict", f"{res.plural}/{name} conflicts but cannot be read")
        return existing, False

    async def patch(
        self,
        res: Resource,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        status: bool = False,
    ) -> dict[str, Any]:
        path = res.path(namespace, name, "status" if status else None)
        return await self.request("PATCH", path, body=patch, content_type=MERGE_PATCH)

    async def list_with_version(
        self, res: Resource, namespace: str | None, label_selector: str | None = None
    ) -> tuple[builtins.list[dict[str, Any]], str]:
        """List objects and the list's resourceVersion (where a watch of the same objects starts)."""
        params = {"labelSelector": label_selector} if label_selector else None
        data = await self.request("GET", res.path(namespace), params=params) or {}
        return list(data.get("items") or []), str((data.get("metadata") or {}).get("resourceVersion") or "")

    async def watch(
        self,
        res: Resource,
        namespace: str | None,
        resource_version: str,
        label_selector: str | None = None,
        timeout_seconds: int = 300,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(event type, object) from a watch stream that starts after `resource_version`; ends when the API
        server closes the stream (the caller lists and watches again). Raises `ApiError` when it fails."""
        session, info = await self._ensure()
        params = {"watch": "true", "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout_seconds)}
        if resource_version:
            params["resourceVersion"] = resource_version
        if label_selector:
            params["labelSelector"] = label_selector
        headers = {"Accept": "application/json", **info.as_http_headers()}
        url = info.server.rstrip("/") + res.path(namespace)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=timeout_seconds + 30)
        try:
            async with session.get(url, params=params, headers=headers, timeout=timeout) as resp:
                if resp.status >= 400:
                    raise ApiError(resp.status, resp.reason or "", (await resp.text())[:500])
                async for line in resp.content:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":  # e.g. 410 Gone: the version is too old; list again
                        raise ApiError(
                            int((event.get("object") or {}).get("code") or 0), "WatchError", line.decode()[:500]
                        )
                    yield str(event.get("type")), dict(event.get("object") or {})
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ApiError(0, type(exc).__name__, str(exc)) from exc

    async def delete(self, res: Resource, namespace: str | None, name: str, *, uid: str | None = None) -> bool:
        """Delete; False when it is not there. With `uid`, only that very object (a precondition: an object
        re-created under the same name answers 409, raised)."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": uid}} if uid else None
        try:
            await self.request("DELETE", res.path(namespace, name), body=body)
            return True
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise


def login(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    """In-cluster service account first, then the kubeconfig (for running the operator from a laptop)."""
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("no service account and no kubeconfig found")
    return info
