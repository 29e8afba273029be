"""kopf registrations only: every handler delegates to `pools`, `models` or `lifecycle`.

`register(registry, runtime)` puts the handlers into a given registry, so the production entry point
(`python -m warmserve.controller`) and the tests (a fresh registry per operator) share exactly this wiring.
Handlers return nothing (a return value would land in `status.<handler id>`); status is written through
`patch.status` or by the control loop, each field by one owner (docs/operator.md, "Status owners"). A pool's
handlers and its daemon share kopf's per-object `memo` (the handler tells the loop about a refused workload).
"""

from __future__ import annotations

from typing import Any

import kopf

from warmserve.controller import lifecycle, models, pools
from warmserve.controller.runtime import Runtime
from warmserve.protocol import GROUP, VERSION

POOLS = (GROUP, VERSION, "warmpools")
MODELS = (GROUP, VERSION, "modeldeployments")


def register(registry: kopf.OperatorRegistry, runtime: Runtime) -> None:
    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, logger: Any, **_: Any) -> None:
        await lifecycle.startup(runtime, settings, logger)

    @kopf.on.cleanup(registry=registry)
    async def cleanup(logger: Any, **_: Any) -> None:
        await lifecycle.cleanup(runtime, logger)

    # ----------------------------------------------------------- WarmPool
    @kopf.on.resume(*POOLS, registry=registry, id="pool-resume")
    @kopf.on.create(*POOLS, registry=registry, id="pool-create")
    @kopf.on.update(*POOLS, registry=registry, id="pool-update", field="spec")
    async def pool_reconcile(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Any, **_: Any) -> None:
        await pools.reconcile_pool(runtime, body, patch, memo, logger)

    @kopf.daemon(
        *POOLS,
        registry=registry,
        id="pool-loop",
        cancellation_backoff=5,  # time to leave the loop and save a history not saved yet (loop.run's finally)
        cancellation_timeout=10,
        when=lambda **_: runtime.config.loop_enabled,
    )
    async def pool_loop(stopped: kopf.DaemonStopped, body: kopf.Body, memo: kopf.Memo, logger: Any, **_: Any) -> None:
        await pools.run_loop(runtime, body, memo, stopped, logger)

    @kopf.on.delete(  # only with --inference-pool: otherwise pools get no finalizer for it
        *POOLS, registry=registry, id="pool-delete", when=lambda **_: runtime.config.inference_pool.enabled
    )
    async def pool_delete(body: kopf.Body, logger: Any, **_: Any) -> None:
        await pools.delete_pool(runtime, body, logger)

    # ---------------------------------------------------- ModelDeployment
    @kopf.on.resume(*MODELS, registry=registry, id="model-resume")
    @kopf.on.create(*MODELS, registry=registry, id="model-create")
    @kopf.on.update(*MODELS, registry=registry, id="model-update", field="spec")
    async def model_reconcile(body: kopf.Body, patch: kopf.Patch, logger: Any, **_: Any) -> None:
        await models.reconcile_model(runtime, body, patch, logger)

    @kopf.timer(*MODELS, registry=registry, id="model-revalidate", interval=30, initial_delay=30, idle=10)
    async def model_revalidate(body: kopf.Body, patch: kopf.Patch, logger: Any, **_: Any) -> None:
        await models.reconcile_model(runtime, body, patch, logger)

    @kopf.on.delete(*MODELS, registry=registry, id="model-delete")
    async def model_delete(body: kopf.Body, logger: Any, **_: Any) -> None:
        await models.delete_model(runtime, body, logger)
