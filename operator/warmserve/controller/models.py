"""ModelDeployment reconcile and delete (called by handlers.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from warmserve.controller import reconcile
from warmserve.controller.conditions import now_rfc3339
from warmserve.controller.k8s import PODS, WARMPOOLS, ApiError
from warmserve.controller.planwriter import strip_model_from_pool
from warmserve.controller.runtime import Runtime
from warmserve.controller.spec import ModelSpec, parse_model_spec, parse_pool_spec
from warmserve.controller.weights import resolve_weight_bytes


async def weight_bytes_of(runtime: Runtime, model: ModelSpec) -> tuple[int | None, str, str]:
    """From the spec, else the safetensors headers (read once per source, off the event loop)."""
    if model.weight_bytes:
        return model.weight_bytes, "spec", "weightBytes given in the spec"
    cached = runtime.weight_cache.get(model.source)
    if cached is not None and cached[0] is not None:
        return cached
    result = await asyncio.to_thread(resolve_weight_bytes, None, model.source, runtime.config.pvc_root)
    runtime.weight_cache[model.source] = result
    return result


async def reconcile_model(runtime: Runtime, body: kopf.Body, patch: kopf.Patch, logger: Any) -> None:
    with runtime.metrics.timed("ModelDeployment", "reconcile"):
        api = runtime.require_api()
        meta = body.get("metadata") or {}
        name, namespace, uid = meta["name"], meta.get("namespace"), meta.get("uid", "")
        model = parse_model_spec(name, body.get("spec"))
        pool = None
        if model.pool:
            try:
                pool_obj = await api.get(WARMPOOLS, namespace, model.pool)
            except ApiError as exc:
                raise kopf.TemporaryError(f"reading WarmPool {model.pool}: {exc}", delay=5) from exc
            pool = parse_pool_spec(pool_obj.get("spec")) if pool_obj else None
        weight, origin, weight_msg = await weight_bytes_of(runtime, model)
        validation = reconcile.validate_model(model, pool, weight)
        if not validation.ok:
            logger.warning(f"ModelDeployment {name} is not valid: {validation.reason}: {validation.message}")
        elif origin == "safetensors":
            logger.info(f"{name}: {weight_msg}")
        runtime.validations[uid] = (validation, weight)
        status = reconcile.model_status(
            model,
            validation,
            runtime.observations.get(uid),
            weight_bytes=weight,
            weight_origin=origin,
            existing_conditions=(body.get("status") or {}).get("conditions"),
            generation=meta.get("generation"),
            now=now_rfc3339(),
        )
        for key in ("forecast", "observedLoad"):
            if key in runtime.model_extras.get(uid, {}):
                status[key] = runtime.model_extras[uid][key]
        if reconcile.status_changed(body.get("status"), status):
            patch.status.update(status)


async def delete_model(runtime: Runtime, body: kopf.Body, logger: Any) -> None:
    """Remove the model from every worker plan of its pool before the object goes away."""
    api = runtime.require_api()
    meta = body.get("metadata") or {}
    uid, namespace = meta.get("uid", ""), meta.get("namespace")
    model = parse_model_spec(meta["name"], body.get("spec"))
    runtime.validations.pop(uid, None)
    runtime.observations.pop(uid, None)
    runtime.model_extras.pop(uid, None)
    if not model.pool:
        return
    async with runtime.pool_lock(namespace, model.pool):
        try:
            changed = await strip_model_from_pool(api, PODS, namespace, model.pool, uid, runtime)
        except ApiError as exc:
            raise kopf.TemporaryError(f"removing {meta['name']} from plans: {exc}", delay=2) from exc
    if changed:
        logger.info(f"removed {meta['name']} from {changed} worker plan(s)")
