"""GPU-pod sidecar worker: weight arena, prewarming, eviction and promotion into vLLM."""
