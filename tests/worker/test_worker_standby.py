"""Real vLLM (CPU): a pre-initialised ("standby") engine is bound to a warm replica at promotion.

One module-scoped scenario: a cold reference engine over alpha's files; then an agent (one standby engine)
with alpha and beta warm, both flagged, keeps a standby engine of alpha (by name); alpha is promoted by
binding it (no engine start), its greedy output is the cold engine's, and a standby of beta takes its place;
a restarted agent stops the orphaned standby (it answers the old agent's token only) and adopts the serving
engine; an empty plan stops everything.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

import pytest
from test_worker_vllm import ALPHA, ENGINE_ARGS, ENV, PROMPTS, MiB, complete  # the same engine settings

from warmserve.protocol import ReplicaKey
from warmserve.worker.agent import Agent
from warmserve.worker.arena import Arena
from warmserve.worker.engines import BIND_PATH, BindError, EngineManager, Shape, is_engine_process
from warmserve.worker.kube import LocalFiles
from warmserve.worker.runner import Runner

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]


def bind_status(port: int, token: str | None, manifest: str) -> int:
    headers = {"content-type": "application/json", **({"x-warmserve-token": token} if token is not None else {})}
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{BIND_PATH}", json.dumps({"manifest": manifest}).encode(), headers
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status
    except urllib.error.HTTPError as error:
        return error.code


def wait(runner: Runner, predicate, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = runner.run_once().to_json()
        if predicate(state):
            return state
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last state: {json.dumps(state, indent=1)}")


def standby_models(engines: EngineManager, ready: bool = True) -> list[str]:
    return sorted(shape.model for shape, rec in engines.standby() if rec.ready or not ready)


def plan(path: str, generation: int, models: dict[str, str], serve: set[str]) -> None:
    """`models` on GPU 0, those in `serve` served; every warm replica asks for a standby engine (the operator's
    flag), so the one engine kept goes to the first warm model by name."""
    replicas = [
        {"model": m, "uid": f"uid-{m}", "source": f"file://{p}", "tp": 1}
        | ({"role": "serve"} if m in serve else {"role": "warm", "standby": True})
        for m, p in models.items()
    ]
    with open(path, "w") as fh:
        json.dump({"generation": generation, "groups": [{"gpus": [0], "replicas": replicas}]}, fh)


@pytest.fixture(scope="module")
def scenario(tiny_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("standby")
    shm = f"/dev/shm/warmserve-standbytest-{os.getpid()}"
    models = {name: tiny_models[name] for name in ("alpha", "beta")}
    result: dict = {}
    cold = EngineManager(str(work / "cold"), pool_size=1, base_port=18420, engine_args=ENGINE_ARGS, env=ENV)
    try:
        ref = ReplicaKey("ref", (0,))
        rec = cold.promote(ref, "alpha", models["alpha"], manifest_path=None)
        cold.wait_ready(ref, 300)
        result["cold_texts"] = [complete(rec.port, "alpha", p) for p in PROMPTS]
    finally:
        cold.shutdown()
    state_dir = str(work / "agent")
    arena = Arena.host("0", shm, 32 * MiB, page_size=256 * 1024)
    engines = EngineManager(state_dir, pool_size=1, base_port=18520, engine_args=ENGINE_ARGS, env=ENV)
    engines.fill_pool()
    agent = Agent({"0": arena}, state_dir, engines, standby_engines=1)
    plan_path, state_path = str(work / "plan.json"), str(work / "state.json")
    runner = Runner(agent, LocalFiles(plan_path, state_path))
    engines2 = None
    try:
        plan(plan_path, 1, models, serve=set())
        wait(runner, lambda s: {r["phase"] for r in s["replicas"]} == {"warm"}, 60, "two warm replicas")
        wait(runner, lambda s: standby_models(engines) == ["alpha"], 300, "a ready standby engine of alpha")
        ((_shape, standby),) = engines.standby()
        result["standby_pid"] = standby.pid
        result["standby_released"] = standby.released
        manifest = agent._write_manifest(agent.plan.replicas[ALPHA])
        result["bind_without_token"] = bind_status(standby.port, None, manifest)
        result["bind_wrong_token"] = bind_status(standby.port, "x" * len(engines.token), manifest)
        result["standby_listed"] = [rec.port for rec in engines.running().values()]
        plan(plan_path, 2, models, serve={"alpha"})
        t0 = time.monotonic()
        result["serving"] = wait(
            runner, lambda s: any(r["phase"] == "serving" for r in s["replicas"]), 60, "alpha serving"
        )
        result["promote_wall_s"] = time.monotonic() - t0
        rec = engines.running()[ALPHA]
        result["record"] = rec
        result["warm_texts"] = [complete(rec.port, "alpha", p) for p in PROMPTS]
        result["rebind"] = bind_status(rec.port, engines.token, manifest)  # a serving engine is never rebound
        result["timings"] = wait(runner, lambda s: "promote" in s["timings"], 30, "the promote timing")["timings"]
        wait(runner, lambda s: standby_models(engines, ready=False) == ["beta"], 60, "a standby engine of beta")
        beta = engines.standby()[0][1]
        result["beta_standby_pid"] = beta.pid
        # the agent dies and restarts: the standby of beta is the old agent's (its token): stopped, not leaked
        arena.close(unlink=False)
        arena2 = Arena.host("0", shm, 32 * MiB, page_size=256 * 1024)
        engines2 = EngineManager(state_dir, pool_size=0, base_port=18620, engine_args=ENGINE_ARGS, env=ENV)
        agent2 = Agent({"0": arena2}, state_dir, engines2, standby_engines=0)
        runner2 = Runner(agent2, LocalFiles(plan_path, state_path))
        result["restart_engines"] = engines2.running()
        result["beta_standby_alive_after_restart"] = is_engine_process(beta.pid)
        result["restart_text"] = complete(engines2.running()[ALPHA].port, "alpha", PROMPTS[0])
        plan(plan_path, 3, {}, serve=set())
        wait(runner2, lambda s: not s["replicas"] and not s["engines"], 60, "everything stopped")
        result["engine_alive_after_stop"] = is_engine_process(rec.pid)
        yield result
    finally:
        engines.shutdown()
        if engines2 is not None:
            engines2.shutdown()
        for name in os.listdir("/dev/shm"):
            if name.startswith(os.path.basename(shm)):
                os.unlink(os.path.join("/dev/shm", name))


def test_only_the_agent_that_started_a_standby_engine_can_bind_it(scenario):
    assert scenario["bind_without_token"] == 403 and scenario["bind_wrong_token"] == 403
    assert scenario["standby_released"]  # it dropped the kernels built from its scratch weights when ready
    assert scenario["standby_listed"] == []  # a standby engine is not a replica's engine: never an endpoint


def test_promotion_binds_the_standby_engine_instead_of_starting_one(scenario):
    rec = scenario["record"]
    assert rec.pid == scenario["standby_pid"] and rec.bound_s is not None and rec.ready
    (report,) = rec.bind_report["ranks"]  # one rank: every parameter mapped from the arena, none copied
    assert report["mapped_params"] == report["restored_params"] > 0 and report["copied_params"] == 0
    assert scenario["timings"]["promote"]["standby"] is True
    assert scenario["timings"]["promote"]["seconds"] == pytest.approx(rec.bound_s, abs=1e-3)
    (alpha,) = [r for r in scenario["serving"]["replicas"] if r["phase"] == "serving"]
    assert alpha["uid"] == "uid-alpha" and alpha["endpoint"] == rec.endpoint


def test_a_bound_engine_answers_like_a_cold_engine_over_the_files(scenario):
    assert scenario["warm_texts"] == scenario["cold_texts"] and all(scenario["cold_texts"])


def test_a_serving_engine_is_never_bound_again(scenario):
    assert scenario["rebind"] == 500


def test_a_new_standby_engine_replaces_the_one_used(scenario):
    assert scenario["beta_standby_pid"] != scenario["standby_pid"]


def test_a_restarted_agent_stops_orphaned_standby_engines_and_adopts_serving_ones(scenario):
    assert list(scenario["restart_engines"]) == [ALPHA]
    assert scenario["restart_engines"][ALPHA].pid == scenario["standby_pid"]
    assert not scenario["beta_standby_alive_after_restart"]
    assert scenario["restart_text"] == scenario["cold_texts"][0]
    assert not scenario["engine_alive_after_stop"]


def test_nothing_to_claim_without_a_ready_standby_and_an_unclaimed_one_cannot_be_bound(tmp_path):
    from warmserve.worker.engines import EngineRecord

    engines = EngineManager(str(tmp_path), pool_size=0)
    assert engines.claim_standby(Shape("alpha", "/models/alpha")) is None
    with pytest.raises(LookupError):
        engines.bind(ALPHA, EngineRecord("", "alpha", "alpha", 18000, 999999), str(tmp_path / "m.json"))
    assert issubclass(BindError, RuntimeError)
