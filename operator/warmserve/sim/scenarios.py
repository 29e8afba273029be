"""Named simulation scenarios: cluster, models and workload, each parameter with its source."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypedDict

import numpy as np

from warmserve.core.types import GB, ModelProfile, NodeSpec
from warmserve.workload.build import Workload, WorkloadSpec
from warmserve.workload.traces import SECONDS_PER_DAY


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

# The many-model scenario's load: popularity share ∝ (i+1)^-ALPHA_MANY, RPS_MANY requests/s in total.
ALPHA_MANY = 2.0
RPS_MANY = 4.0


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


# The order of sizes in the many-model scenario, repeated: 4 × 7B, 3 × 13B, 1 × 70B per 8 models, the sizes
# interleaved so that popularity (which falls with the position) is not tied to size. A stated choice.
MANY_BLOCK: tuple[tuple[str, Architecture], ...] = (
    ("7b", LLAMA2_7B),
    ("13b", LLAMA2_13B),
    ("7b", LLAMA2_7B),
    ("70b", LLAMA2_70B),
    ("7b", LLAMA2_7B),
    ("13b", LLAMA2_13B),
    ("7b", LLAMA2_7B),
    ("13b", LLAMA2_13B),
)


def many(n_models: int = 56, gpus_per_node: int = 8, nodes: int = 3, gpu_bytes: int = 80 * GB) -> Scenario:
    """Many models under memory pressure: 56 Llama-2 models of mixed sizes on 3 nodes × 8 GPUs of 80 GB.

    Sizes repeat ``MANY_BLOCK`` (28 × 7B TP1, 21 × 13B TP2, 7 × 70B TP4 for 56 models), so one replica of
    every model needs 1.09 × the cluster's arena bytes: not every model can be warm at once, and placement,
    eviction and the forecast decide which are. Workload as in ``paper`` (Azure 2024 code per-second counts,
    real burstiness kept by binomial thinning, 3 days of each model's own history), with more models: model
    i replays weekday ``(3 + i) mod 7`` (the builder's rule), so the seven days repeat and models on the same
    day draw different requests from it.
    """
    arena = int(gpu_bytes * ARENA_FRACTION)
    models = []
    for i in range(n_models):
        size, arch = MANY_BLOCK[i % len(MANY_BLOCK)]
        models.append(ModelProfile(f"llama-2-{size}-{i:02d}", **arch))
    nodes_spec = tuple(NodeSpec(f"node-{n}", gpus_per_node, arena) for n in range(nodes))
    model_bytes = sum(m.weight_bytes for m in models)
    arena_bytes = arena * gpus_per_node * nodes
    return Scenario(
        name="many",
        nodes=nodes_spec,
        models=tuple(models),
        workload=WorkloadSpec(
            n_models=n_models, rps=RPS_MANY, alpha=ALPHA_MANY, history_days=3, replay_start_s=0, replay_s=3600
        ),
        notes={
            "cluster": f"{nodes} nodes × {gpus_per_node} GPUs × {gpu_bytes / GB:g} GB, the paper's nodes (a stated "
            "choice: one node more than its testbed); arena = 0.9 × memory (original pool size)",
            "models": f"{n_models} Llama-2 models, sizes repeating 7B TP1, 13B TP2, 7B, 70B TP4, 7B, 13B, 7B, 13B "
            "(a stated choice: sizes interleaved with popularity); bytes and latencies as in paper (the original "
            "models.yaml and common.py)",
            "memory pressure": f"one replica of every model = {model_bytes / GB:.1f} GB against "
            f"{arena_bytes / GB:.1f} GB of arena: ratio {model_bytes / arena_bytes:.2f}",
            "workload": f"Azure 2024 code per-second arrivals thinned per model (real burstiness), model i ← "
            f"weekday (3 + i) mod 7 with its own 3 previous days as history; popularity ∝ (i+1)^-{ALPHA_MANY:g} "
            f"and {RPS_MANY:g} RPS in total (stated choices); Azure 2023 conv token lengths; "
            "by default the first hour of the day is replayed, from an empty system",
        },
    )


def replayed(
    name: str,
    nodes: tuple[NodeSpec, ...],
    models: tuple[ModelProfile, ...],
    arrival_s: np.ndarray,
    model_idx: np.ndarray,
    input_tokens: np.ndarray,
    output_tokens: np.ndarray,
    replay_s: int,
    window_s: int,
    history_days: int,
    notes: dict[str, str],
) -> tuple[Scenario, Workload]:
    """A scenario that replays explicit requests (e.g. the schedule a real benchmark sent) instead of building
    them from a trace, with the workload to simulate it on.

    ``arrival_s`` (seconds from the replay start, sorted), ``model_idx``, ``input_tokens`` and
    ``output_tokens`` are taken as they are, in whatever unit of prompt length the models' ``prefill_s`` /
    ``prefill_ref_tokens`` use. No request arrives before the replay: the rate history (``history_days`` days,
    so that the forecaster's windows line up with the replay start) is zero. A caller that knows the load
    history the real system was given replaces the simulation's window history (``Simulation.avg_hist`` and
    ``peak_hist``, indexed by window from the history's start) with it.
    """
    if not np.all(np.diff(arrival_s) >= 0):
        raise ValueError("arrival_s must be sorted")
    if model_idx.size and not 0 <= int(model_idx.min()) <= int(model_idx.max()) < len(models):
        raise ValueError("model_idx must index models")
    if SECONDS_PER_DAY % window_s:
        raise ValueError(f"window_s {window_s} must divide a day")
    spec = WorkloadSpec(
        n_models=len(models),
        rps=max(arrival_s.size, 1) / replay_s,
        replay_start_s=0,
        replay_s=replay_s,
        history_days=history_days,
    )
    spec.validate()
    workload = Workload(
        spec=spec,
        model_days=tuple(range(len(models))),
        history_rate=np.zeros((len(models), history_days * SECONDS_PER_DAY + replay_s)),
        arrival_s=np.asarray(arrival_s, dtype=np.float64),
        model_idx=np.asarray(model_idx, dtype=np.int64),
        input_tokens=np.asarray(input_tokens, dtype=np.int64),
        output_tokens=np.asarray(output_tokens, dtype=np.int64),
        model_series=tuple("explicit" for _ in models),
    )
    return Scenario(name=name, nodes=nodes, models=models, workload=spec, window_s=window_s, notes=notes), workload


SCENARIOS: dict[str, Callable[[], Scenario]] = {"paper": paper, "many": many}
