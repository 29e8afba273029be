"""The router: one OpenAI-compatible endpoint for every model of a WarmServe installation.

It routes each request by its `model` to a ready engine (fewest requests in flight first), holds a request for
a known model that has no ready engine in a bounded per-model queue until one is ready (never refusing what it
could serve), and exports per-model demand (`warmserve_inflight_requests`, `warmserve_waiting_requests`) that
the operator's pool round reads as its load, so a held request makes the operator promote a warm replica.

- `table`: pure — which engines serve which model, from ModelDeployments and the workers' states.
- `dispatch`: the per-model queues and the least-in-flight choice (asyncio, no HTTP).
- `server`: the aiohttp application (OpenAI routes, proxying with streaming, health and metrics).
- `discovery`: where the table comes from (a Kubernetes watch, or the local runtime of `warmserve up`).
"""
