"""ModelDeployment reconcile and delete (called by handlers.py).

Who writes a ModelDeployment's status (docs/operator.md, "Status owners"): the round of its pool's loop, as
long as the pool exists and loops run; this handler only for a model no round covers — `poolRef` empty or
naming no WarmPool, or the operator started with `--no-loop`. Both compute it with `decide.model_status`
from the same facts (weight bytes from `Runtime.weights`, validation from `reconcile.validate_model`), so an
object moving from one writer to the other does not flap.
"""

from __future__ import annotations

from typing import Any

import kopf

from warmserve.controller import reconcile
from warmserve.controller.conditions import now_rfc3339
from warmserve.controller.decide import ObservedModel, model_status
from warmserve.controller.k8s import PODS, WARMPOOLS, ApiError
from warmserve.controller.observe import model_weight
from warmserve.controller.planwriter import strip_model_from_pool
from warmserve.controller.runtime import Runtime
from warmserve.controller.spec import parse_model_spec, parse_pool_spec


async def reconcile_model(runtime: Runtime, body: kopf.Body, patch: kopf.Patch, logger: Any) -> None:
    with runtime.metrics.timed("ModelDeployment", "reconcile"):
        api = runtime.require_api()
        meta = body.get("metadata") or {}
        name, status = meta["name"], body.get("status") or {}
        model = parse_model_spec(name, body.get("spec"))
        pool_obj = None
        if model.pool:
            try:
                pool_obj = await api.get(WARMPOOLS, meta.get("namespace"), model.pool)
            except ApiError as exc:
                raise kopf.TemporaryError(f"reading WarmPool {model.pool}: {exc}", delay=5) from exc
        pool = parse_pool_spec(pool_obj.get("spec")) if pool_obj else None
        rules = runtime.config.rules
        weight = await model_weight(runtime, model, pool, status)
        pool_validation = reconcile.validate_pool(pool, rules) if pool is not None else None
        validation = reconcile.validate_model(model, pool, weight.bytes, rules, pool_validation)
        if not validation.ok:
            logger.warning(f"ModelDeployment {name} is not valid: {validation.reason}: {validation.message}")
        elif weight.origin == "safetensors":
            logger.info(f"{name}: {weight.message}")
        if pool_obj is not None and runtime.config.loop_enabled:
            return  # the round of the pool's loop owns this status and writes it within one interval
        observed = ObservedModel(name, str(meta.get("uid", "")), meta.get("generation"), model, weight, status)
        new = model_status(observed, validation, None, None, now_rfc3339())
        if reconcile.status_changed(status, new):
            patch.status.update(new)


async def delete_model(runtime: Runtime, body: kopf.Body, logger: Any) -> None:
    """Remove the model from every worker plan of its pool before the object goes away."""
    api = runtime.require_api()
    meta = body.get("metadata") or {}
    uid, namespace = meta.get("uid", ""), meta.get("namespace")
    model = parse_model_spec(meta["name"], body.get("spec"))
    if not model.pool:
        return
    async with runtime.pool_lock(namespace, model.pool):
        try:
            changed = await strip_model_from_pool(api, PODS, namespace, model.pool, uid, runtime.metrics)
        except ApiError as exc:
            raise kopf.TemporaryError(f"removing {meta['name']} from plans: {exc}", delay=2) from exc
    if changed:
        logger.info(f"removed {meta['name']} from {changed} worker plan(s)")
