"""Value types of the policy core: validation, derived figures and the buddy-group nesting guarantee."""

from __future__ import annotations

import itertools

import pytest

from warmserve.core.types import Demand, GpuGroup, ModelProfile, NodeSpec, is_power_of_two


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, True), (2, True), (8, True), (1024, True), (0, False), (-2, False), (3, False), (6, False), (12, False)],
)
def test_is_power_of_two(value: int, expected: bool) -> None:
    assert is_power_of_two(value) is expected


def test_model_profile_shard_bytes_rounds_up() -> None:
    assert ModelProfile("m", 10, tp=4).shard_bytes == 3  # ceil(10 / 4): no rank may be short of a byte
    assert ModelProfile("m", 8, tp=4).shard_bytes == 2
    assert ModelProfile("m", 7, tp=1).shard_bytes == 7


@pytest.mark.parametrize("tp", [0, 3, 6, -4])
def test_model_profile_rejects_non_power_of_two_tp(tp: int) -> None:
    with pytest.raises(ValueError, match="tensor parallel"):
        ModelProfile("m", 10, tp=tp)


@pytest.mark.parametrize(("weight_bytes", "max_batch"), [(0, 32), (-1, 32), (10, 0), (10, -1)])
def test_model_profile_rejects_bad_sizes(weight_bytes: int, max_batch: int) -> None:
    with pytest.raises(ValueError):
        ModelProfile("m", weight_bytes, max_batch=max_batch)


def test_model_profile_latency_model() -> None:
    profile = ModelProfile("m", 1, prefill_s=0.04, prefill_ref_tokens=1000, decode_s_per_token=0.01)
    assert profile.prefill_time(500) == pytest.approx(0.02)  # linear in prompt length
    assert profile.prefill_time(2000) == pytest.approx(0.08)
    assert profile.service_time(500, 10) == pytest.approx(0.02 + 0.1)
    assert profile.service_time(0, 0) == 0


def test_demand_validation() -> None:
    assert Demand(0.0, 0.0) == Demand(0, 0)
    with pytest.raises(ValueError):
        Demand(-0.1, 1.0)
    with pytest.raises(ValueError):
        Demand(1.0, -1.0)


@pytest.mark.parametrize(("start", "size"), [(1, 2), (2, 4), (4, 8), (6, 4), (-1, 1), (0, 3), (0, 0), (3, 6)])
def test_gpu_group_rejects_unaligned_or_odd_sizes(start: int, size: int) -> None:
    with pytest.raises(ValueError):
        GpuGroup(0, start, size)


@pytest.mark.parametrize(("start", "size"), [(0, 1), (5, 1), (2, 2), (6, 2), (4, 4), (0, 8), (8, 8)])
def test_gpu_group_accepts_aligned(start: int, size: int) -> None:
    group = GpuGroup(0, start, size)
    assert list(group.gpus) == list(range(start, start + size))


def test_gpu_group_contains_and_overlaps() -> None:
    big, left, right, one = GpuGroup(0, 0, 4), GpuGroup(0, 0, 2), GpuGroup(0, 2, 2), GpuGroup(0, 3, 1)
    assert big.contains(left) and big.contains(right) and big.contains(one) and big.contains(big)
    assert right.contains(one) and not left.contains(one)
    assert not left.contains(big)
    assert left.overlaps(big) and big.overlaps(left)
    assert not left.overlaps(right)
    assert not GpuGroup(1, 0, 4).overlaps(big)  # another node never overlaps
    assert not GpuGroup(1, 0, 4).contains(one)


def _all_groups(gpus: int) -> list[GpuGroup]:
    return [GpuGroup(0, start, size) for size in (1, 2, 4, 8, 16) for start in range(0, gpus - size + 1, size)]


@pytest.mark.parametrize("gpus", [1, 2, 4, 8, 16])
def test_aligned_groups_are_laminar(gpus: int) -> None:
    """Any two aligned groups are disjoint or nested: claiming one never half-breaks another."""
    groups = _all_groups(gpus)
    assert len(groups) == 2 * gpus - 1  # a full binary tree over the node's GPUs
    for a, b in itertools.combinations(groups, 2):
        shared = set(a.gpus) & set(b.gpus)
        assert (not shared) or a.contains(b) or b.contains(a), (a, b)
        assert a.overlaps(b) == bool(shared)


def test_gpu_group_order_is_node_start_size() -> None:
    groups = [GpuGroup(1, 0, 1), GpuGroup(0, 4, 4), GpuGroup(0, 0, 8), GpuGroup(0, 0, 1)]
    assert sorted(groups) == [GpuGroup(0, 0, 1), GpuGroup(0, 0, 8), GpuGroup(0, 4, 4), GpuGroup(1, 0, 1)]


def test_gpu_group_is_hashable_and_frozen() -> None:
    group = GpuGroup(0, 2, 2)
    assert {group: 1}[GpuGroup(0, 2, 2)] == 1
    with pytest.raises(AttributeError):
        group.start = 0  # type: ignore[misc]


@pytest.mark.parametrize(("gpus", "gpu_bytes"), [(0, 1), (-1, 1), (1, 0), (8, -5)])
def test_node_spec_validation(gpus: int, gpu_bytes: int) -> None:
    with pytest.raises(ValueError):
        NodeSpec("n", gpus, gpu_bytes)
