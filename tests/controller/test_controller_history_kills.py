"""The operator killed at random points of its history and checkpoint saves, 20 times: no window of load
history is lost (issue: "a kill at a random point of prewarm or history save, 20 times").

A kill is what SIGKILL leaves: the API server's objects as they were at that instant and nothing of the
process's memory. The test runs `PoolLoop.tick` against kmock's emulator over HTTP with a scripted clock
and load; an armed actuator raises `Killed` (not an `Exception`: nothing in the operator may catch it) just
before or just after one of the two saves, the loop object is dropped and a new one (a restarted operator)
goes on from what is persisted. After the last kill, one orderly stop saves what is pending.

The invariant: every window in which at least one round completed is in the saved history.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

from controller_support import NS, FakeClock, FakeScraper, make_runtime, model_body, pool_body, worker_pod

from warmserve.controller.act import KubeActuator
from warmserve.controller.builders import HISTORY_KEY, history_configmap_name
from warmserve.controller.history import LoadHistory
from warmserve.controller.k8s import CONFIGMAPS, MODELDEPLOYMENTS, PODS, WARMPOOLS
from warmserve.controller.loop import PoolLoop

LOG = logging.getLogger("test")
WINDOW = 60
KILL_POINTS = ("before-history", "after-history", "before-checkpoint", "after-checkpoint")


class Killed(BaseException):
    """The process died here."""


class MortalActuator(KubeActuator):
    """KubeActuator that dies at `kill_at` (one of KILL_POINTS), once, if the round gets there."""

    kill_at: str | None = None
    fired: str | None = None

    def _maybe_die(self, point: str) -> None:
        if self.kill_at == point:
            self.fired, self.kill_at = point, None
            raise Killed(point)

    async def save_history(self, encoded: str, owner: Mapping[str, Any], logger: Any) -> str | None:
        self._maybe_die("before-history")
        error = await super().save_history(encoded, owner, logger)
        self._maybe_die("after-history")
        return error

    async def save_open_window(self, encoded: str, owner: Mapping[str, Any], logger: Any) -> str | None:
        self._maybe_die("before-checkpoint")
        error = await super().save_open_window(encoded, owner, logger)
        self._maybe_die("after-checkpoint")
        return error


async def test_twenty_kills_during_history_saves_lose_no_window(emulator, client):
    rng = random.Random(20261202)
    clock, scraper = FakeClock(), FakeScraper()
    clock.now = 86400 * 20000 + 3600 * 9 + 1
    runtime = make_runtime(clock=clock, scraper_factory=lambda rt, pool: scraper)
    runtime.api = client
    for i in range(2):
        await client.create(PODS, NS, worker_pod("pool1", i))
    pool, _ = await client.create(WARMPOOLS, NS, pool_body(window=WINDOW))
    md, _ = await client.create(MODELDEPLOYMENTS, NS, model_body("m1", prewarm={"minWarmReplicas": 1}))
    uid = md["metadata"]["uid"]

    def start() -> tuple[PoolLoop, MortalActuator]:
        actuator = MortalActuator(runtime, NS, "pool1")
        return PoolLoop(runtime, NS, "pool1", actuator=actuator), actuator

    loop, actuator = start()
    completed: dict[int, list[float]] = {}  # window → the load of its rounds that completed
    sampled: dict[int, list[float]] = {}  # window → the load of all its rounds, killed ones included
    kills: list[str] = []
    rounds = 0
    while len(kills) < 20:
        rounds += 1
        assert rounds < 2000, f"only {len(kills)} kills in {rounds} rounds"
        clock.now += rng.uniform(4.0, 25.0)  # a window closes every ~4 rounds; some windows get one round
        load = float(rng.randint(1, 9))
        scraper.load = {"m1": load}
        sampled.setdefault(int(clock.now // WINDOW), []).append(load)
        # armed about every other round: rounds that close a window save the history, others only checkpoint
        actuator.kill_at = rng.choice(KILL_POINTS) if rng.random() < 0.5 else None
        try:
            await loop.tick(pool, LOG)
        except Killed:
            kills.append(actuator.fired or "")
            loop, actuator = start()  # a new operator process: only the API server's objects are left
            continue
        completed.setdefault(int(clock.now // WINDOW), []).append(load)
    await loop.flush_history(LOG)  # the last operator stops in order

    cm = await client.get(CONFIGMAPS, NS, history_configmap_name("pool1"))
    assert cm is not None
    history = LoadHistory.decode(cm["binaryData"][HISTORY_KEY], WINDOW, 10_000)
    saved = history.series[uid]["avg"]
    closed = {w: loads for w, loads in completed.items() if w < int(clock.now // WINDOW)}
    missing = sorted(set(closed) - set(saved))
    print(f"{len(kills)} kills ({', '.join(f'{p} x{kills.count(p)}' for p in KILL_POINTS)}) in {rounds} rounds")
    print(f"{len(closed)} closed windows with a completed round; saved {len(saved)}; missing {missing}")
    assert {p for p in kills} >= {"before-history", "after-history", "before-checkpoint"}, kills
    assert not missing, f"windows lost: {missing}"
    for w in closed:
        # a window's average is over its own rounds (the completed ones, and maybe some killed ones)
        assert min(sampled[w]) <= saved[w] <= max(sampled[w]), (w, sampled[w], saved[w])
    configmaps = sorted(k[2] for k in emulator.objects if "configmaps" in str(k[0]))
    assert configmaps == ["pool1-load-history", "pool1-load-window"]
