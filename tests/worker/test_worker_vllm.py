"""Real vLLM (CPU) end to end: three models prewarmed in one arena, one promoted zero-copy.

One module-scoped scenario keeps the number of engine starts at two (a cold
reference engine reading the files, and the promoted one) because each start
costs ~40 s on this 2-core machine.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request

import pytest

from warmserve.protocol import ReplicaKey, parse_state
from warmserve.worker.agent import Agent
from warmserve.worker.arena import Arena
from warmserve.worker.engines import EngineManager, is_engine_process
from warmserve.worker.kube import LocalFiles
from warmserve.worker.runner import Runner

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

ENGINE_ARGS = ["--dtype", "bfloat16", "--max-model-len", "256", "--enforce-eager", "--max-num-seqs", "4"]
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
PROMPTS = ["the quick brown fox", "warm replicas are", "hello world, this"]
MiB = 1 << 20
ALPHA = ReplicaKey("uid-alpha", (0,))


def complete(port: int, model: str, prompt: str) -> str:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.load(resp)["choices"][0]["text"]


def step_until(runner: Runner, predicate, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = runner.run_once().to_json()
        if predicate(state):
            return state
        time.sleep(0.2)
    raise AssertionError(f"condition not reached; last state: {json.dumps(state, indent=1)}")


def phases(state: dict) -> dict[str, str]:
    return {r["uid"]: r["phase"] for r in state["replicas"]}


def used_pages(arena: Arena) -> int:
    return arena.usage().used // arena.page_size


@pytest.fixture(scope="module")
def scenario(tiny_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm-scenario")
    shm = f"/dev/shm/warmserve-vllmtest-{os.getpid()}"
    result: dict = {"work": work, "shm": shm}
    # 1. cold reference engine over the files (vLLM's default loader)
    cold = EngineManager(
        str(work / "cold"), pool_size=1, base_port=18400, engine_args=ENGINE_ARGS, env=ENV, refill=False
    )
    try:
        ref = ReplicaKey("ref", (0,))
        rec = cold.promote(ref, "alpha", tiny_models["alpha"], manifest_path=None)
        cold.wait_ready(ref, 300)
        result["cold_texts"] = [complete(rec.port, "alpha", p) for p in PROMPTS]
    finally:
        cold.shutdown()
    # 2. agent in local mode: prewarm all three into one 32 MiB arena
    state_dir = str(work / "agent")
    arena = Arena.host("0", shm, 32 * MiB, page_size=256 * 1024)
    engines = EngineManager(state_dir, pool_size=1, base_port=18500, engine_args=ENGINE_ARGS, env=ENV, refill=False)
    engines.fill_pool()  # the pre-started shell imports vLLM while we prewarm
    agent = Agent({"0": arena}, state_dir, engines)
    plan_path, state_path = str(work / "plan.json"), str(work / "state.json")
    files = LocalFiles(plan_path, state_path)
    runner = Runner(agent, files)
    group = {
        "gpus": [0],
        "replicas": [
            {"model": name, "uid": f"uid-{name}", "source": f"file://{path}", "tp": 1, "role": "warm", "kvLend": 0}
            for name, path in tiny_models.items()
        ],
    }
    with open(plan_path, "w") as fh:
        json.dump({"generation": 1, "groups": [group]}, fh)
    result["warm_state"] = step_until(runner, lambda s: set(phases(s).values()) == {"warm"}, 60)
    result["pages_all_warm"] = used_pages(arena)
    result["pages_alpha"] = arena.extent("uid-alpha@0/rank0").count
    # 3. make every weight file unreadable (root ignores chmod, so move them away)
    hidden = []
    for path in tiny_models.values():
        os.rename(os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.hidden"))
        hidden.append(path)
    try:
        alpha = dict(group["replicas"][0], role="serve")
        with open(plan_path, "w") as fh:
            json.dump({"generation": 2, "groups": [{"gpus": [0], "replicas": [alpha]}]}, fh)
        t0 = time.monotonic()
        result["serving_state"] = step_until(runner, lambda s: phases(s) == {"uid-alpha": "serving"}, 300)
        result["promote_s"] = time.monotonic() - t0
        rec = engines.running()[ALPHA]
        result["warm_texts"] = [complete(rec.port, "alpha", p) for p in PROMPTS]
        result["pages_after_evict"] = used_pages(arena)
        result["free_extents"] = arena.free_extents()
        result["page_count"] = arena.usage().total // arena.page_size
        with open(os.path.join(state_dir, "load-report-uid-alpha_0.json")) as fh:
            result["report"] = json.load(fh)
        result["engine_pid"] = rec.pid
        # 4. the agent dies and restarts: same arena file, same engine, no duplicates
        arena.close(unlink=False)
        arena2 = Arena.host("0", shm, 32 * MiB, page_size=256 * 1024)
        engines2 = EngineManager(state_dir, pool_size=0, base_port=18600, engine_args=ENGINE_ARGS, env=ENV)
        agent2 = Agent({"0": arena2}, state_dir, engines2)
        runner2 = Runner(agent2, LocalFiles(plan_path, state_path))
        result["restart_state"] = step_until(runner2, lambda s: phases(s) == {"uid-alpha": "serving"}, 30)
        result["restart_engines"] = engines2.running()
        result["restart_pages"] = used_pages(arena2)
        result["restart_text"] = complete(engines2.running()[ALPHA].port, "alpha", PROMPTS[0])
        # 5. plan drops everything: engine stopped, pages freed
        with open(plan_path, "w") as fh:
            json.dump({"generation": 3, "groups": []}, fh)
        result["empty_state"] = step_until(runner2, lambda s: not s["replicas"] and not s["engines"], 60)
        result["empty_pages"] = used_pages(arena2)
        result["engine_alive_after_stop"] = is_engine_process(rec.pid)
        yield result
    finally:
        for path in hidden:
            os.rename(os.path.join(path, "model.safetensors.hidden"), os.path.join(path, "model.safetensors"))
        engines.shutdown()
        for name in os.listdir("/dev/shm"):
            if name.startswith(os.path.basename(shm)):
                os.unlink(os.path.join("/dev/shm", name))


def test_worker_three_models_prewarmed_in_one_arena(scenario):
    state = scenario["warm_state"]
    assert sorted(r["uid"] for r in state["replicas"]) == ["uid-alpha", "uid-beta", "uid-gamma"]
    assert all(r["progress"] == 1.0 for r in state["replicas"])
    dev = state["devices"][0]
    assert dev["usedBytes"] == scenario["pages_all_warm"] * dev["pageSize"] > 0 and dev["index"] == 0
    assert state["observedGeneration"] == 1


def test_worker_promoted_engine_matches_cold_engine_greedy(scenario):
    assert scenario["warm_texts"] == scenario["cold_texts"]
    assert all(scenario["cold_texts"])


def test_worker_promotion_mapped_all_weights_without_files(scenario):
    report = scenario["report"]
    # every parameter is a view into the arena; nothing was read or copied into the engine
    assert report["copied_params"] == 0 and report["mapped_params"] > 0
    assert report["arena_views_before_postprocess"] == report["mapped_params"]
    # vLLM's own post-load processing (CPU GEMM dispatch) is measured on every promotion
    assert report["arena_views_after_postprocess"] <= report["arena_views_before_postprocess"]
    assert isinstance(report["postprocess_rss_anon_growth_bytes"], int) and report["postprocess_s"] >= 0
    state = scenario["serving_state"]
    (alpha,) = state["replicas"]
    assert alpha["ready"] is True and alpha["endpoint"] == state["engines"][0]["endpoint"]
    assert state["engines"][0]["model"] == "alpha"


def test_worker_state_of_a_real_engine_parses_with_the_operators_parser(scenario):
    parsed = parse_state(json.dumps(scenario["serving_state"]))
    (alpha,) = parsed.replicas
    assert (alpha.uid, alpha.gpus, alpha.phase, alpha.ready) == ("uid-alpha", (0,), "serving", True)
    assert alpha.endpoint == scenario["serving_state"]["engines"][0]["endpoint"]
    assert parsed.observed_generation == 2 and parsed.errors == ()


def test_worker_other_replicas_evicted_pages_back_in_free_list(scenario):
    assert scenario["pages_after_evict"] == scenario["pages_alpha"]
    free = sum(e.count for e in scenario["free_extents"])
    assert free == scenario["page_count"] - scenario["pages_alpha"]
    assert scenario["empty_pages"] == 0


def test_worker_restart_adopts_engine_and_arena(scenario):
    engines = scenario["restart_engines"]
    assert list(engines) == [ALPHA] and engines[ALPHA].pid == scenario["engine_pid"]
    assert scenario["restart_pages"] == scenario["pages_alpha"]
    assert scenario["restart_text"] == scenario["cold_texts"][0]
    assert not scenario["engine_alive_after_stop"]
