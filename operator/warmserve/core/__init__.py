"""Pure policy core: forecaster, placement, KV reservation, autoscaler and cluster state.

Nothing in this package does I/O or reads a clock: callers pass time in. The trace-driven
simulator and the Kubernetes operator drive the very same objects.
"""
