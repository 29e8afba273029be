"""KV reservation ``R = max(C·Q/B, T + C/B)`` (capped at C) and the lendable rest ``C − R``, by hand."""

from __future__ import annotations

import pytest

from warmserve.core.reservation import kv_lendable, kv_reserve


@pytest.mark.parametrize(
    ("capacity", "in_flight", "max_batch", "in_use", "reserve"),
    [
        (1000, 4, 8, 100, 500),  # C·Q/B = 500 beats T + C/B = 225
        (1000, 1, 8, 600, 725),  # T + C/B = 725 beats C·Q/B = 125
        (1000, 0, 8, 0, 125),  # an idle engine keeps one request's share as head-room
        (1000, 2, 8, 125, 250),  # both terms equal
        (1000, 8, 8, 0, 1000),  # a full batch keeps everything
        (1000, 20, 8, 0, 1000),  # over-full: capped at C
        (1000, 0, 8, 950, 1000),  # T + C/B = 1075: capped at C
        (1000, 0, 8, 1200, 1000),  # a usage report above C cannot push R above C
        (10, 1, 3, 0, 4),  # fractions round up: ceil(10/3) = 4 (never lend a partial share)
        (10, 2, 3, 1, 7),  # ceil(20/3) = 7 beats 1 + 4 = 5
        (0, 5, 8, 0, 0),  # no KV space, nothing to keep
        (1, 0, 1, 0, 1),
    ],
)
def test_kv_reserve_hand_examples(capacity: int, in_flight: int, max_batch: int, in_use: int, reserve: int) -> None:
    assert kv_reserve(capacity, in_flight, max_batch, in_use) == reserve
    assert kv_lendable(capacity, in_flight, max_batch, in_use) == capacity - reserve


def test_kv_reserve_in_bytes_of_a_real_gpu() -> None:
    capacity = 72 * 10**9 - 14 * 10**9  # 80 GB × 0.9 arena minus a 7B fp16 shard
    assert kv_lendable(capacity, 0, 256, 0) == capacity - capacity // 256 - (capacity % 256 > 0)
    assert kv_lendable(capacity, 128, 256, 10**9) == capacity // 2


@pytest.mark.parametrize("args", [(-1, 0, 8, 0), (100, -1, 8, 0), (100, 0, 8, -1), (100, 0, 0, 0), (100, 0, -8, 0)])
def test_kv_reserve_rejects_bad_inputs(args: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError):
        kv_reserve(*args)
    with pytest.raises(ValueError):
        kv_lendable(*args)


def test_reserve_grows_with_load_so_lent_space_is_taken_back() -> None:
    lendable = [kv_lendable(800, q, 8, 50 * q) for q in range(0, 10)]
    assert lendable == sorted(lendable, reverse=True)  # more requests → less to lend
    assert lendable[0] == 700 and lendable[8] == 0


def test_formula_is_scale_free_up_to_rounding() -> None:
    """Blocks or bytes give the same split when the unit divides everything."""
    for scale in (1, 16, 2 << 20):
        assert kv_reserve(1024 * scale, 3, 16, 100 * scale) == scale * kv_reserve(1024, 3, 16, 100)
