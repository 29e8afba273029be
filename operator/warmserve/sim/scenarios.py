"""Named simulation scenarios: cluster, models and workload, each parameter with its source."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TypedDict

from warmserve.core.types import GB, ModelProfile, NodeSpec
from warmserve.workload.build import WorkloadSpec


class Architecture(TypedDict):
    """The ``ModelProfile`` fields one architecture fixes (``ModelProfile(name, **LLAMA2_7B)``)."""

    weight_bytes: int
    tp: int
    prefill_s: float
    decode_s_per_token: float
    kv_bytes_per_token: int


# Llama-2 in fp16, the byte sizes of the original's models.yaml (13.48, 26.03 and 137.96 GB). Latencies
# (prefill at a 1,024-token prompt, decode per token) from the original code's common.py. KV bytes per
# token from the architectures: 2 (K, V) × layers × KV heads × head dim × 2 bytes.
LLAMA2_7B = Architecture(
    weight_bytes=int(13.48 * GB), tp=1, prefill_s=0.035, decode_s_per_token=0.015, kv_bytes_per_token=2 * 32 * 4096 * 2
)
LLAMA2_13B = Architecture(
    weight_bytes=int(26.03 * GB), tp=2, prefill_s=0.070, decode_s_per_token=0.020, kv_bytes_per_token=2 * 40 * 5120 * 2
)
LLAMA2_70B = Architecture(
    weight_bytes=int(137.96 * GB), tp=4, prefill_s=0.100, decode_s_per_token=0.030, kv_bytes_per_token=2 * 80 * 1024 * 2
)

# The original allocates 0.9 of free GPU memory to its page pool.
ARENA_FRACTION = 0.9


@dataclass(frozen=True)
class Scenario:
    name: str
    nodes: tuple[NodeSpec, ...]
    models: tuple[ModelProfile, ...]  # in popularity order: model i gets share ∝ (i+1)^-alpha
    workload: WorkloadSpec
    window_s: int = 300
    ttft_slo_s: float = 1.0
    notes: dict[str, str] = field(default_factory=dict)

    def with_workload(self, **changes) -> Scenario:
        return replace(self, workload=replace(self.workload, **changes))


def paper(gpus_per_node: int = 8, nodes: int = 2, gpu_bytes: int = 80 * GB) -> Scenario:
    """The paper's testbed: 2 nodes × 8 GPUs of 80 GB; Llama-2 7B ×2 (TP1), 13B (TP2), 70B (TP4).

    Workload as in the original trace generator and replayer: model i replays a different day of a real
    trace with popularity ∝ (i+1)^-0.5 at 15 RPS in total, three days of its own history before; the first
    20 minutes of the day are replayed (the original replays the first 20 minutes of each model's first
    hour) on a system that starts with no engine.
    """
    arena = int(gpu_bytes * ARENA_FRACTION)
    models = (
        ModelProfile("llama-2-7b-a", **LLAMA2_7B),
        ModelProfile("llama-2-7b-b", **LLAMA2_7B),
        ModelProfile("llama-2-13b", **LLAMA2_13B),
        ModelProfile("llama-2-70b", **LLAMA2_70B),
    )
    return Scenario(
        name="paper",
        nodes=tuple(NodeSpec(f"node-{n}", gpus_per_node, arena) for n in range(nodes)),
        models=models,
        workload=WorkloadSpec(
            n_models=len(models), rps=15.0, alpha=0.5, history_days=3, replay_start_s=0, replay_s=20 * 60
        ),
        notes={
            "cluster": "2 nodes × 8 GPUs × 80 GB (paper testbed); arena = 0.9 × memory (original pool size)",
            "models": "Llama-2 7B ×2 TP1, 13B TP2, 70B TP4; fp16 bytes from the original models.yaml",
            "latency": "prefill/decode per model from the original common.py; prefill linear in prompt tokens",
            "workload": "Azure 2024 code per-second arrivals, model i ← a different weekday (Mon–Thu), α = 0.5, "
            "15 RPS, 3 history days, Azure 2023 conv token lengths; like the original, the first 20 minutes of "
            "the day are replayed on a system with no engine running at t = 0",
        },
    )


SCENARIOS = {"paper": paper}
