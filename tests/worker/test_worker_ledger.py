"""Ledger: pure page bookkeeping (first fit, merge on free, clear errors, persistence)."""

from __future__ import annotations

import random

import pytest

from warmserve.worker.ledger import ArenaFullError, Ledger, pages_for


def test_allocate_free_returns_pages_and_merges():
    ledger = Ledger(page_count=10, page_size=100)
    a = ledger.allocate("a", 250)  # 3 pages
    b = ledger.allocate("b", 100)  # 1 page
    c = ledger.allocate("c", 401)  # 5 pages
    assert (a.extent.start, a.extent.count) == (0, 3)
    assert (b.extent.start, b.extent.count) == (3, 1)
    assert (c.extent.start, c.extent.count) == (4, 5)
    assert ledger.free_pages == 1
    ledger.free("b")
    ledger.free("a")
    assert [(e.start, e.count) for e in ledger.free_extents()] == [(0, 4), (9, 1)]
    ledger.free("c")
    assert [(e.start, e.count) for e in ledger.free_extents()] == [(0, 10)]
    assert ledger.used_pages == 0


def test_plan_that_does_not_fit_raises_clear_error():
    ledger = Ledger(page_count=4, page_size=1000)
    ledger.allocate("a", 1000)
    ledger.allocate("b", 1000)
    ledger.allocate("c", 1000)
    ledger.free("b")  # free pages 1 and 3: two pages but no run of two
    with pytest.raises(ArenaFullError) as err:
        ledger.allocate("big", 2000)
    assert err.value.need_pages == 2 and err.value.free_pages == 2 and err.value.largest_run == 1
    assert "big" in str(err.value) and "largest free run 1" in str(err.value)
    assert ledger.get("big") is None  # nothing was taken


def test_place_tensors_keeps_order_and_bounds():
    ledger = Ledger(page_count=4, page_size=1024)
    ledger.allocate("m", 2048)
    slots = ledger.place_tensors(
        "m", [("q", "BF16", (4, 64), 512), ("k", "BF16", (4, 64), 512), ("n", "F32", (3,), 12)]
    )
    assert slots["q"].offset == 0 and slots["k"].offset == 512 and slots["n"].offset == 1024
    with pytest.raises(ValueError):
        ledger.place_tensors("m", [("x", "U8", (3000,), 3000)])


def test_json_roundtrip_and_rejects_overlap():
    ledger = Ledger(page_count=8, page_size=64)
    ledger.allocate("x/rank0", 100)
    ledger.place_tensors("x/rank0", [("w", "U8", (100,), 100)])
    ledger.allocate("y/rank0", 64)
    clone = Ledger.from_json(ledger.to_json())
    assert clone.free_pages == ledger.free_pages
    assert clone.get("x/rank0").tensors["w"].nbytes == 100
    data = ledger.to_json()
    data["allocations"][1]["start"] = 1  # overlaps x
    with pytest.raises(ValueError):
        Ledger.from_json(data)


def test_random_churn_never_double_books():
    rng = random.Random(7)
    ledger = Ledger(page_count=64, page_size=1)
    live: dict[str, int] = {}
    for step in range(2000):
        if live and rng.random() < 0.45:
            owner = rng.choice(sorted(live))
            ledger.free(owner)
            del live[owner]
        else:
            size = rng.randint(1, 12)
            try:
                ledger.allocate(f"o{step}", size)
                live[f"o{step}"] = size
            except ArenaFullError:
                assert ledger.largest_free_run < size
        owners = [ledger.owner_of_page(p) for p in range(64)]
        assert sum(o is not None for o in owners) == sum(live.values()) == ledger.used_pages
    for owner in list(live):
        ledger.free(owner)
    assert [(e.start, e.count) for e in ledger.free_extents()] == [(0, 64)]


def test_pages_for():
    assert pages_for(0, 10) == 1 and pages_for(10, 10) == 1 and pages_for(11, 10) == 2
