"""Deterministic, trace-driven discrete-event simulator of a WarmServe cluster and its baselines."""
