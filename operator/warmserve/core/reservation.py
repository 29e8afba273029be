"""KV-cache reservation: how much of a running engine's KV space it keeps, and how much it may lend.

The paper keeps ``R = max(C·Q/B, T + C/B)`` of an engine's KV capacity ``C``: ``Q`` requests in flight,
``B`` the engine's batch capacity, ``T`` the KV space in use. The first term keeps a fair share per
in-flight request (room for them to grow), the second keeps what is in use plus one request's share as
head-room for the next arrival. Everything above ``R`` may hold prewarmed weights of other models, and is
taken back (by evicting those weights) as soon as ``R`` grows. Unlike the original code, which only ever
shrank an engine's KV space, lent space is returned.

Units are bytes per GPU throughout; the formula is scale-free, so blocks would give the same split.
"""

from __future__ import annotations

import math


def kv_reserve(capacity: int, in_flight: int, max_batch: int, in_use: int) -> int:
    """``R = max(C·Q/B, T + C/B)``, never more than ``C``."""
    if capacity < 0 or in_flight < 0 or in_use < 0 or max_batch <= 0:
        raise ValueError("capacity, in_flight and in_use must be >= 0 and max_batch > 0")
    reserve = max(math.ceil(capacity * in_flight / max_batch), in_use + math.ceil(capacity / max_batch))
    return min(capacity, reserve)


def kv_lendable(capacity: int, in_flight: int, max_batch: int, in_use: int) -> int:
    """KV bytes an engine can lend to prewarming right now: ``C − R``."""
    return capacity - kv_reserve(capacity, in_flight, max_batch, in_use)
