"""The agent's engine decisions with a recording engine fake: a replica's engine settings reach the engine's
arguments (and its standby shape), a forbidden flag is a per-replica error and starts nothing, a ready standby
engine is bound instead of starting one, a failed bind falls back to a fresh engine, on GPUs every engine gets
the memory its arena leaves and a standby engine yields its GPU to a fresh engine, and the state says what the
worker can do."""

from __future__ import annotations

import json
import time

import pytest
from test_worker_agent_kmock import FakeRecord
from test_worker_tpshard import llama_checkpoint

from warmserve.protocol import ReplicaKey, parse_state
from warmserve.worker.agent import Agent
from warmserve.worker.arena import Arena
from warmserve.worker.backends import DeviceKind, MemoryBackend
from warmserve.worker.engines import ENGINE_RESERVE_BYTES, BindError, Shape, gpu_memory_utilization
from warmserve.worker.tpshard import shard_checkpoint

MiB = 1 << 20


class Record(FakeRecord):
    """An engine record (ready at once), as the agent sees it."""

    def __init__(self, uid: str, served_name: str, port: int, ready: bool = True):
        super().__init__(uid, served_name, port, ready=ready, ready_s=0.1)


class Engines:
    """`warmserve.worker.engines.Engines` recording launches, binds and the standby shapes asked for."""

    def __init__(self, standby_ready: bool = True, bind_fails: bool = False):
        self.launches: list[tuple[str, list[str]]] = []
        self.launch_env: dict[str, dict[str, str]] = {}
        self.standby_at_launch: dict[str, list[tuple[int, ...]]] = {}
        self.manifests: dict[str, dict] = {}
        self.binds: list[tuple[str, Shape]] = []
        self.wanted: list[dict[Shape, int]] = []
        self.standby_ready, self.bind_fails = standby_ready, bind_fails
        self.env = {"VLLM_CPU_KVCACHE_SPACE": "2"}
        self._engines: dict[ReplicaKey, Record] = {}
        self._standby: dict[Shape, Record] = {}

    def running(self):
        return dict(self._engines)

    def poll(self, key):
        return self._engines.get(key)

    def alive(self, key):
        return key in self._engines

    def acquire_shell(self, timeout):
        return "shell"

    def release_shell(self, shell):
        pass

    def launch(
        self, key, shell, model, model_dir, manifest_path, report_path=None, served_name=None, extra_args=None, env=None
    ):
        self.launches.append((key.uid, list(extra_args or [])))
        self.standby_at_launch[key.uid] = sorted(s.gpus for s in self._standby)
        self.launch_env[key.uid] = dict(env or {})
        with open(manifest_path) as fh:
            self.manifests[key.uid] = json.load(fh)
        self._engines[key] = Record(key.uid, served_name or model, 18000 + len(self.launches))
        return self._engines[key]

    def stop(self, key):
        self._engines.pop(key, None)
        return 0.0

    def standby(self):
        return [(shape, rec) for shape, rec in self._standby.items()]

    def standby_shapes(self):
        return list(self._standby)

    def keep_standby(self, wanted, start=True):
        self.wanted.append(dict(wanted))
        self._standby = {
            s: self._standby.get(s) or Record("", s.model, 19000, ready=self.standby_ready)
            for s in wanted
            if start or s in self._standby
        }

    def claim_standby(self, shape):
        rec = self._standby.get(shape)
        if rec is None or not rec.ready:
            return None
        del self._standby[shape]  # claimed: keep_standby neither counts nor stops it
        return rec

    def bind(self, key, rec, manifest_path, timeout=60.0):
        with open(manifest_path) as fh:
            assert json.load(fh)["model"] == rec.served_name
        time.sleep(0.05)  # a bind takes a while: the agent's passes go on meanwhile
        self.binds.append((key.uid, rec.served_name))
        if self.bind_fails:
            raise BindError(f"binding the standby engine of {rec.served_name} failed: 500")
        rec.uid, rec.bound_s, rec.ready_s = key.uid, 0.05, 0.05
        self._engines[key] = rec
        return rec

    def adopt(self):
        return []

    def shutdown(self, stop_engines=True):
        pass


def replica(name: str, path: str, role: str, engine: dict | None = None, standby: bool = True) -> dict:
    """A plan replica; a warm one asks for a standby engine unless `standby` is false."""
    rep = {"model": name, "uid": f"uid-{name}", "source": f"file://{path}", "tp": 1, "role": role}
    if role == "warm" and standby:
        rep["standby"] = True
    return {**rep, "engine": engine} if engine else rep


def run(agent: Agent, predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = agent.step()
        if predicate(state):
            return state
        time.sleep(0.05)
    raise AssertionError(f"not reached; last state {json.dumps(state.to_json(), indent=1)}")


@pytest.fixture
def arena(shm_path):
    arena = Arena.host("0", shm_path, 32 * MiB, page_size=256 * 1024)
    yield arena
    arena.close()


def serving(state, uid: str) -> bool:
    return any(r.uid == uid and r.phase == "serving" for r in state.replicas)


def test_engine_settings_reach_the_engine_arguments(tiny_models, arena, tmp_path):
    engines = Engines()
    agent = Agent({"0": arena}, str(tmp_path), engines)
    settings = {"args": ["--max-num-seqs", "2"], "maxModelLen": 128, "dtype": "bfloat16"}
    agent.apply(
        {
            "generation": 1,
            "groups": [{"gpus": [0], "replicas": [replica("alpha", tiny_models["alpha"], "serve", settings)]}],
        }
    )
    run(agent, lambda s: serving(s, "uid-alpha"))
    assert engines.launches == [("uid-alpha", ["--dtype", "bfloat16", "--max-model-len", "128", "--max-num-seqs", "2"])]


@pytest.mark.parametrize("args", [["--port", "1"], ["--load-format=auto"], ["--gpu_memory_utilization", "0.99"]])
def test_a_forbidden_flag_is_a_replica_error_and_starts_nothing(tiny_models, arena, tmp_path, args):
    engines = Engines()
    agent = Agent({"0": arena}, str(tmp_path), engines)
    agent.apply(
        {
            "generation": 1,
            "groups": [{"gpus": [0], "replicas": [replica("alpha", tiny_models["alpha"], "serve", {"args": args})]}],
        }
    )
    state = run(agent, lambda s: bool(s.errors))
    assert engines.launches == []
    (error,) = state.errors
    assert error.uid == "uid-alpha" and "is not allowed" in error.reason


def test_a_ready_standby_engine_is_bound_instead_of_starting_one(tiny_models, arena, tmp_path):
    engines = Engines()
    agent = Agent({"0": arena}, str(tmp_path), engines, standby_engines=1)
    models = {m: tiny_models[m] for m in ("alpha", "beta")}
    agent.apply(
        {"generation": 1, "groups": [{"gpus": [0], "replicas": [replica(m, p, "warm") for m, p in models.items()]}]}
    )
    state = run(
        agent, lambda s: bool(s.standby) and all(r.phase == "warm" for r in s.replicas) and len(s.replicas) == 2
    )
    assert [(s.model, s.ready, s.bytes) for s in state.standby] == [("alpha", True, 2 << 30)]  # warm-only, by name
    agent.apply(
        {
            "generation": 2,
            "groups": [
                {
                    "gpus": [0],
                    "replicas": [replica("alpha", models["alpha"], "serve"), replica("beta", models["beta"], "warm")],
                }
            ],
        }
    )
    state = run(agent, lambda s: serving(s, "uid-alpha") and "promote" in s.timings)
    assert engines.launches == [] and [uid for uid, _ in engines.binds] == ["uid-alpha"]
    assert state.timings["promote"]["standby"] is True
    assert engines.wanted[-1] == {Shape("beta", models["beta"]): 1}  # the flagged warm replica left gets it


def test_a_failed_bind_falls_back_to_a_fresh_engine_and_that_shape_gets_no_more_standby(tiny_models, arena, tmp_path):
    engines = Engines(bind_fails=True)
    agent = Agent({"0": arena}, str(tmp_path), engines, standby_engines=1)
    alpha = tiny_models["alpha"]
    agent.apply({"generation": 1, "groups": [{"gpus": [0], "replicas": [replica("alpha", alpha, "warm")]}]})
    run(agent, lambda s: bool(s.standby) and bool(s.replicas) and s.replicas[0].phase == "warm")
    agent.apply({"generation": 2, "groups": [{"gpus": [0], "replicas": [replica("alpha", alpha, "serve")]}]})
    run(agent, lambda s: serving(s, "uid-alpha"))
    assert [uid for uid, _ in engines.binds] == ["uid-alpha"] and [uid for uid, _ in engines.launches] == ["uid-alpha"]
    assert engines.wanted[-1] == {}


def test_the_state_says_what_the_worker_can_do(tiny_models, arena, tmp_path):
    agent = Agent({"0": arena}, str(tmp_path), Engines(), standby_engines=1)
    caps = parse_state(json.dumps(agent.step().to_json())).capabilities
    assert caps is not None
    assert (caps.kv_lend, caps.tp_promotion, caps.standby_engines, caps.engine_settings) == (False, True, True, True)
    assert caps.device_kind == "cpu" and set(caps.reasons) == {"kvLend"}
    caps = Agent({"0": arena}, str(tmp_path / "b"), Engines()).step().capabilities
    assert caps is not None and caps.standby_engines is False


def test_a_tp_replica_is_launched_as_one_engine_with_a_manifest_per_rank(tmp_path, shm_path):
    """A TP-2 replica warm on GPUs 0 and 1 becomes one engine with tensor_parallel_size=2, each rank given its
    CPUs, and a manifest whose rank r names GPU r's arena (the real-vLLM run is test_worker_vllm_tp.py)."""
    model = str(tmp_path / "m")
    llama_checkpoint(model)  # a Llama-layout checkpoint of numpy arrays: no torch needed
    shard_checkpoint(model, 2)
    arenas = {str(i): Arena.host(str(i), f"{shm_path}-{i}", 8 * MiB, page_size=256 * 1024) for i in range(2)}
    try:
        engines = Engines()
        agent = Agent(arenas, str(tmp_path / "state"), engines, standby_engines=1)
        rep = {**replica("m", model, "serve"), "tp": 2}
        agent.apply({"generation": 1, "groups": [{"gpus": [0, 1], "replicas": [rep]}]})
        state = run(agent, lambda s: [r.phase for r in s.replicas] == ["serving"])
        assert state.errors == () and engines.binds == []  # no standby engine for a TP shape: a fresh engine
        ((uid, args),) = engines.launches
        assert args[-4:] == ["--tensor-parallel-size", "2", "--distributed-executor-backend", "mp"]
        assert engines.launch_env[uid]["VLLM_CPU_OMP_THREADS_BIND"].count("|") == 1
        ranks = engines.manifests[uid]["ranks"]
        assert [r["arena"]["path"] for r in ranks] == [arenas["0"].handle()["path"], arenas["1"].handle()["path"]]
        assert [r["owner"] for r in ranks] == ["uid-m@0-1/rank0", "uid-m@0-1/rank1"]
        assert set(ranks[0]["tensors"]) == set(ranks[1]["tensors"])
        assert all(w == {} for w in engines.wanted)  # TP replicas get no standby engine
    finally:
        for arena in arenas.values():
            arena.close()


class FakeGpuBackend(MemoryBackend):
    """A CUDA-kind arena in host memory on a GPU of `device_bytes` (the agent's GPU logic without a GPU)."""

    kind = DeviceKind.CUDA

    def __init__(self, index: int, size: int, device_bytes: int):
        self.index, self.device_bytes, self._data = index, device_bytes, bytearray(size)

    @property
    def size(self) -> int:
        return len(self._data)

    def write(self, offset, data):
        self._data[offset : offset + len(data)] = data

    def handle(self):
        return {"kind": "cuda", "device": self.index, "ipc": ""}

    def close(self, unlink=True):
        pass


GiB = 1 << 30


def utilization_arg(args: list[str]) -> float:
    return float(args[args.index("--gpu-memory-utilization") + 1])


def test_gpu_memory_utilization_gives_an_engine_what_its_arena_leaves():
    reserve = ENGINE_RESERVE_BYTES
    # 80 GiB GPU, 72 GiB arena: a standby engine may use 8 GiB - reserve
    standby = gpu_memory_utilization([(80 * GiB, 72 * GiB)], [0])
    assert standby == int((8 * GiB - reserve) / (80 * GiB) * 1e4) / 1e4
    # an engine mapping 14 GiB of weights from the arena: vLLM subtracts them, so its budget is the same
    fresh = gpu_memory_utilization([(80 * GiB, 72 * GiB)], [14 * GiB])
    assert abs((fresh * 80 * GiB - 14 * GiB) - standby * 80 * GiB) < 80 * GiB * 2e-4
    # ranks on different GPUs: the value that fits the tightest one
    assert gpu_memory_utilization([(80 * GiB, 72 * GiB), (80 * GiB, 70 * GiB)], [GiB, GiB]) == (
        gpu_memory_utilization([(80 * GiB, 72 * GiB)], [GiB])
    )
    with pytest.raises(ValueError, match=r"rank 1 .* lower the worker's --memory-fraction"):
        gpu_memory_utilization([(80 * GiB, 72 * GiB), (24 * GiB, 22 * GiB + reserve)], [0, 0])


@pytest.fixture
def gpu_arenas():
    arenas = {str(i): Arena(str(i), FakeGpuBackend(i, 32 * MiB, 10 * GiB), page_size=256 * 1024) for i in (0, 1)}
    yield arenas
    for a in arenas.values():
        a.close()


def test_gpu_engines_get_the_budget_their_arena_leaves_and_a_standby_engine_yields_its_gpu(
    tiny_models, gpu_arenas, tmp_path
):
    engines = Engines(standby_ready=False)  # never ready: promotions start fresh engines
    agent = Agent(gpu_arenas, str(tmp_path), engines, standby_engines=2)
    alpha, beta = tiny_models["alpha"], tiny_models["beta"]
    agent.apply(
        {
            "generation": 1,
            "groups": [
                {"gpus": [0], "replicas": [replica("alpha", alpha, "warm")]},
                {"gpus": [1], "replicas": [replica("beta", beta, "warm")]},
            ],
        }
    )
    state = run(agent, lambda s: len(s.standby) == 2 and all(r.phase == "warm" for r in s.replicas))
    standby_budget = gpu_memory_utilization([(10 * GiB, 32 * MiB)], [0])
    for shape in engines.wanted[-1]:
        assert shape.gpus in ((0,), (1,)) and utilization_arg(list(shape.args)) == standby_budget
    assert {s.bytes for s in state.standby} == {int(standby_budget * 10 * GiB)}
    # beta is promoted on GPU 1 with no ready standby engine: the standby engine there is stopped first
    agent.apply(
        {
            "generation": 2,
            "groups": [
                {"gpus": [0], "replicas": [replica("alpha", alpha, "warm")]},
                {"gpus": [1], "replicas": [replica("beta", beta, "serve")]},
            ],
        }
    )
    run(agent, lambda s: serving(s, "uid-beta"))
    ((uid, args),) = engines.launches
    held = agent.store.get(next(k for k in agent.store.shards() if k.replica.uid == "uid-beta")).bytes_total
    assert uid == "uid-beta" and utilization_arg(args) == gpu_memory_utilization([(10 * GiB, 32 * MiB)], [held])
    assert engines.standby_at_launch["uid-beta"] == [(0,)]  # GPU 1's standby engine stopped before the launch
    assert [s.gpus for s in engines.standby_shapes()] == [(0,)]  # and not restarted while the engine runs
    agent.step()
    assert [s.gpus for s in engines.wanted[-1]] == [(0,)]
    assert engines.launch_env["uid-beta"]["CUDA_VISIBLE_DEVICES"] == "1"


def test_the_plans_standby_flags_choose_the_standby_engines(tiny_models, arena, tmp_path):
    """Only the flagged replica gets a standby engine (alpha would come first by name)."""
    engines = Engines()
    agent = Agent({"0": arena}, str(tmp_path), engines, standby_engines=1)
    models = {m: tiny_models[m] for m in ("alpha", "beta")}
    reps = [replica("alpha", models["alpha"], "warm", standby=False), replica("beta", models["beta"], "warm")]
    agent.apply({"generation": 1, "groups": [{"gpus": [0], "replicas": reps}]})
    state = run(agent, lambda s: bool(s.standby) and all(r.phase == "warm" for r in s.replicas))
    assert [s.model for s in state.standby] == ["beta"] and engines.wanted[-1] == {Shape("beta", models["beta"]): 1}


def test_one_standby_engine_per_gpu(tiny_models, gpu_arenas, tmp_path):
    engines = Engines(standby_ready=False)
    agent = Agent(gpu_arenas, str(tmp_path), engines, standby_engines=4)
    reps = [replica(m, tiny_models[m], "warm") for m in ("alpha", "beta")]
    agent.apply({"generation": 1, "groups": [{"gpus": [0], "replicas": reps}]})
    run(agent, lambda s: len(s.replicas) == 2 and all(r.phase == "warm" for r in s.replicas))
    assert [(s.model, s.gpus) for s in engines.wanted[-1]] == [("alpha", (0,))]
