"""Value types shared by the whole policy core.

They are frozen dataclasses so that a decision computed from them can be replayed: the simulator and the
operator hand the same values to the same functions and must get the same answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GB = 10**9


def is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclass(frozen=True)
class ModelProfile:
    """What the policy needs to know about one served model.

    Latencies follow the original WarmServe code (`common.py`): a request costs ``prefill_s`` at the
    reference prompt length plus ``decode_s_per_token`` per generated token. Prefill scales linearly with
    the prompt length (compute-bound), so a 512-token prompt costs half the reference prefill.
    """

    name: str
    weight_bytes: int
    tp: int = 1
    max_batch: int = 32
    prefill_s: float = 0.035
    prefill_ref_tokens: int = 1024
    decode_s_per_token: float = 0.015
    kv_bytes_per_token: int = 0
    priority: float = 1.0
    min_warm: int = 0

    def __post_init__(self) -> None:
        if not is_power_of_two(self.tp):
            raise ValueError(f"model {self.name}: tensor parallel size {self.tp} is not a power of two")
        if self.weight_bytes <= 0:
            raise ValueError(f"model {self.name}: weight_bytes must be positive")
        if self.max_batch <= 0:
            raise ValueError(f"model {self.name}: max_batch must be positive")

    @property
    def shard_bytes(self) -> int:
        """Bytes one TP rank holds (the weights are split evenly over the group)."""
        return math.ceil(self.weight_bytes / self.tp)

    def prefill_time(self, input_tokens: int) -> float:
        return self.prefill_s * input_tokens / self.prefill_ref_tokens

    def service_time(self, input_tokens: int, output_tokens: int) -> float:
        """Time a request keeps its batch slot: prefill plus one decode step per output token."""
        return self.prefill_time(input_tokens) + output_tokens * self.decode_s_per_token


@dataclass(frozen=True)
class Demand:
    """Forecast load of one model for the next window, in concurrent in-flight requests."""

    avg: float
    peak: float

    def __post_init__(self) -> None:
        if self.avg < 0 or self.peak < 0:
            raise ValueError("demand must be non-negative")


@dataclass(frozen=True, order=True)
class GpuGroup:
    """An aligned ("buddy") group of GPUs on one node: ``size`` GPUs starting at ``start``.

    ``start`` is a multiple of ``size`` and ``size`` a power of two, so any two groups on a node are
    either disjoint or one contains the other. That makes tensor-parallel groups nested by construction:
    claiming one group can never half-break another.
    """

    node: int
    start: int
    size: int

    def __post_init__(self) -> None:
        if not is_power_of_two(self.size):
            raise ValueError(f"group size {self.size} is not a power of two")
        if self.start < 0 or self.start % self.size:
            raise ValueError(f"group start {self.start} is not aligned to size {self.size}")

    @property
    def gpus(self) -> range:
        return range(self.start, self.start + self.size)

    def contains(self, other: GpuGroup) -> bool:
        return (
            self.node == other.node and self.start <= other.start and other.start + other.size <= self.start + self.size
        )

    def overlaps(self, other: GpuGroup) -> bool:
        return self.contains(other) or other.contains(self)


@dataclass(frozen=True)
class NodeSpec:
    """One worker node: how many GPUs it has and how many bytes of each the arena may use."""

    name: str
    gpus: int
    gpu_bytes: int

    def __post_init__(self) -> None:
        if self.gpus <= 0 or self.gpu_bytes <= 0:
            raise ValueError(f"node {self.name}: gpus and gpu_bytes must be positive")
