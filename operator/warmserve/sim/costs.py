"""Cost parameters of the simulator, each with its source.

Every ratio the simulator prints depends on these numbers, so each one is either a public figure or a
measurement, and the README's table repeats `COST_SOURCES`. The two that matter most (engine
start overhead and load bandwidth) are swept by ``warmserve simulate --sensitivity``.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 10**9


@dataclass(frozen=True)
class CostModel:
    # Host memory → GPU over PCIe Gen4 x16 with pinned buffers, per GPU. Both WarmServe's prewarming and
    # the autoscaling baseline load from host memory (ServerlessLLM's DRAM tier, the original's /dev/shm).
    load_bandwidth: float = 25 * GB
    # Warm replica → serving engine: a pre-started engine maps the prewarmed weights and sets up KV.
    promote_s: float = 0.5
    # Cold engine start, excluding weight loading, for the autoscaling baseline (ServerlessLLM-like).
    engine_start_s: float = 10.0
    # Slow-down of a prefill per co-located engine that is decoding meanwhile (0 = perfect overlap under
    # MPS, 1 = time slicing).
    share_contention: float = 0.5
    # Fraction of a shared GPU's memory kept free for KV cache when packing models (MuxServe-like).
    share_min_kv_fraction: float = 0.3


COST_SOURCES: dict[str, str] = {
    "load_bandwidth": "PCIe Gen4 x16 host→device with pinned memory ≈ 25 GB/s (Gen5 ≈ 50 GB/s); the original "
    "WarmServe code estimates cold loads at bytes/TP/32 GB/s from pinned host memory (docs/design.md).",
    "promote_s": "vLLM sleep mode level-1 wake on A100: 0.26–0.82 s for small models (vLLM blog, 2025-10-26); a "
    "promotion maps prewarmed weights without copying, so a wake that copies weights back bounds it from above.",
    "engine_start_s": "cold engine start excluding weight loading. A full vLLM reload of a 0.6 B model (weights "
    "< 1 s) takes 37.6 s on A100 (vLLM blog); NVIDIA Dynamo's snapshot restore brings a cold start to ≈ 10 s, "
    "the fastest public figure, used here in the baseline's favour. Swept from 1 s to 30 s.",
    "share_contention": "assumption, swept in the README: under MPS a prefill shares SMs with the decode kernels "
    "of co-located engines; 0 is perfect overlap (MuxServe's premise), 1 is time slicing. No public figure pins it; "
    "it needs a GPU to measure.",
    "share_min_kv_fraction": "assumption: keep ≥ 30 % of each shared GPU for KV cache when packing models.",
}
