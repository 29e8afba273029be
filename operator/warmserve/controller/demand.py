"""Demand reaches the operator fast: the router's held requests wake every pool round at once.

With `--router-url`, the operator long-polls the router's `GET /v1/warmserve/demand?after=N`, which answers as
soon as a request had to wait for an engine (or after 30 s with nothing new). Each new hold sets the wake-up
event of every pool loop, which then runs its round immediately instead of at its next interval: the round
reads the router's demand (`scrape.RouterScraper`), the autoscaler sees load on a model without engines and
the plan promotes one (a warm replica when there is one). So a request for a model at zero engines gets a
serve role planned within a round's latency, not an interval's.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

log = logging.getLogger(__name__)


class Wakeups:
    """Wake-up events of the running pool loops; `notify` sets them all."""

    def __init__(self) -> None:
        self._events: set[asyncio.Event] = set()

    def register(self) -> asyncio.Event:
        event = asyncio.Event()
        self._events.add(event)
        return event

    def unregister(self, event: asyncio.Event) -> None:
        self._events.discard(event)

    def notify(self) -> None:
        for event in self._events:
            event.set()


async def watch_router(url: str, wakeups: Wakeups, poll_seconds: float = 30.0, retry_seconds: float = 2.0) -> None:
    """Run until cancelled: wake the pool loops whenever the router held a request it had not reported yet."""
    endpoint = url.rstrip("/") + "/v1/warmserve/demand"
    timeout = aiohttp.ClientTimeout(total=poll_seconds + 10)
    seen, boot = -1, ""  # holds already reported, by the router process `boot` ("" = none yet)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            try:
                params = {"after": str(seen), "boot": boot, "timeout": str(poll_seconds if boot else 0)}
                async with session.get(endpoint, params=params) as resp:
                    resp.raise_for_status()
                    data = await resp.json()
                holds, new_boot = int(data["holds"]), str(data["boot"])
                if boot and (holds > seen or new_boot != boot):  # a new hold, or a restarted router's holds
                    wakeups.notify()
                seen, boot = holds, new_boot
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
                log.warning("router demand at %s not reachable (%s); retrying in %.0f s", endpoint, exc, retry_seconds)
                await asyncio.sleep(retry_seconds)
