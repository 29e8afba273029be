"""Plan parsing, GPU inventory (fake NVML), CLI, plugin registration: fast, no vLLM engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from warmserve.protocol import ProtocolError, ReplicaKey, Role, parse_plan
from warmserve.worker.backends import DeviceKind
from warmserve.worker.devices import arena_bytes_for, build_arenas, gpu_inventory, node_kind
from warmserve.worker.files import SourceError, source_path
from warmserve.worker.store import ShardKey


def test_plan_parses_contract_example():
    """The worker reads plans with the protocol's parser: replicas keyed by (uid, gpus occupied)."""
    plan = parse_plan(
        {
            "generation": 3,
            "groups": [
                {
                    "gpus": [2, 3],
                    "replicas": [
                        {
                            "model": "m70",
                            "uid": "u1",
                            "source": "file:///models/m70",
                            "tp": 2,
                            "role": "serve",
                            "kvLend": 5,
                        },
                        {"model": "m8", "uid": "u2", "source": "/models/m8", "tp": 1, "role": "warm", "kvLend": 0},
                    ],
                }
            ],
        }
    )
    assert plan.generation == 3
    assert sorted(plan.replicas) == [ReplicaKey("u1", (2, 3)), ReplicaKey("u2", (2,))]
    u1, u2 = plan.replicas[ReplicaKey("u1", (2, 3))], plan.replicas[ReplicaKey("u2", (2,))]
    assert u1.device_of_rank(1) == "3" and u1.kv_lend == 5 and u1.key.id == "u1@2-3" and u1.serves
    assert u2.role == Role.WARM and source_path(u2.source) == "/models/m8"


def test_plan_accepts_two_replicas_of_one_model_on_different_gpus():
    rep = {"model": "m", "uid": "u", "source": "/m", "tp": 1, "role": "serve"}
    plan = parse_plan({"generation": 1, "groups": [{"gpus": [0], "replicas": [rep]}, {"gpus": [1], "replicas": [rep]}]})
    assert sorted(plan.replicas) == [ReplicaKey("u", (0,)), ReplicaKey("u", (1,))]
    with pytest.raises(ProtocolError, match="duplicate replica"):
        parse_plan(
            {
                "generation": 1,
                "groups": [{"gpus": [0], "replicas": [rep]}, {"gpus": [0, 1], "replicas": [{**rep, "role": "warm"}]}],
            }
        )


@pytest.mark.parametrize("key", [ReplicaKey("u", (0,)), ReplicaKey("9f1c-uid@x", (1, 2, 3))])
def test_replica_id_round_trips(key):
    """Ledger owners, meta files and engine records are named by the id; restart adoption parses it back."""
    assert ReplicaKey.parse(key.id) == key
    shard = ShardKey(key, 1)
    assert shard.owner == f"{key.id}/rank1" and ShardKey.of_owner(shard.owner, "7") == shard


@pytest.mark.parametrize("text", ["u", "u/rank0", "@0", "u@", "u@a"])
def test_parse_replica_id_rejects_other_strings(text):
    assert ReplicaKey.parse(text) is None


def test_shard_key_of_an_older_owner_name_is_keyed_on_its_device():
    """Pages an older worker named "<name>/rank<r>" are adopted under (name, (device,)), then evicted."""
    assert ShardKey.of_owner("alpha/rank0", "3") == ShardKey(ReplicaKey("alpha", (3,)), 0)
    assert ShardKey.of_owner("kv-lent", "0") is None and ShardKey.of_owner("x/rankA", "0") is None


@pytest.mark.parametrize(
    "bad, msg",
    [
        ("[]", "must be an object"),
        ({"groups": []}, "generation"),
        ({"generation": 1, "groups": [{"gpus": [], "replicas": []}]}, "non-empty"),
        ({"generation": 1, "groups": [{"gpus": [0], "replicas": [{"uid": "x"}]}]}, "model must be"),
        (
            {
                "generation": 1,
                "groups": [{"gpus": [0], "replicas": [{"model": "a", "uid": "x", "source": "/a", "tp": 2}]}],
            },
            "does not fit",
        ),
        (
            {
                "generation": 1,
                "groups": [{"gpus": [0], "replicas": [{"model": "a", "uid": "x", "source": "/a", "role": "boss"}]}],
            },
            "role",
        ),
        (
            {
                "generation": 1,
                "groups": [
                    {
                        "gpus": [0],
                        "replicas": [
                            {"model": "a", "uid": "x", "source": "/a", "role": "serve"},
                            {"model": "b", "uid": "y", "source": "/b", "role": "serve"},
                        ],
                    }
                ],
            },
            "at most one",
        ),
    ],
)
def test_plan_rejects_bad_input(bad, msg):
    with pytest.raises(ProtocolError, match=msg):
        parse_plan(bad)


def test_source_path_only_local():
    assert source_path("file:///x/y") == "/x/y" and source_path("/x") == "/x"
    with pytest.raises(SourceError, match="unsupported model source"):
        source_path("hf://org/model")


class FakeNvml:
    """The subset of pynvml the inventory uses, with two fake GPUs."""

    def __init__(self, fail_init=False):
        self.fail_init, self.shutdown = fail_init, False

    def nvmlInit(self):
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        self.shutdown = True

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=80 << 30, free=(70 + h) << 30)

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA A100-SXM4-80GB"

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-{h}"


def test_gpu_inventory_with_fake_nvml_and_clean_degradation():
    nvml = FakeNvml()
    gpus = gpu_inventory(nvml)
    assert [(g.index, g.name, g.uuid, g.free) for g in gpus] == [
        (0, "NVIDIA A100-SXM4-80GB", "GPU-0", 70 << 30),
        (1, "NVIDIA A100-SXM4-80GB", "GPU-1", 71 << 30),
    ]
    assert nvml.shutdown
    assert gpu_inventory(FakeNvml(fail_init=True)) == []
    assert gpu_inventory() == []  # this machine: no driver, NVML import or init fails cleanly


def test_arena_size_from_free_memory():
    assert arena_bytes_for(70 << 30, 0.9, 2 << 20) == (int((70 << 30) * 0.9) // (2 << 20)) * (2 << 20)
    with pytest.raises(ValueError):
        arena_bytes_for(1, 1.5, 1)


def test_build_arenas_falls_back_to_shared_memory(tmp_path):
    arenas = build_arenas(
        "auto",
        state_dir=str(tmp_path / "st"),
        shm_dir=str(tmp_path),
        cpu_devices=2,
        arena_bytes=4 << 20,
        page_size=1 << 20,
    )
    try:
        assert sorted(arenas) == ["0", "1"] and node_kind(arenas) is DeviceKind.SHM
        assert arenas["0"].kind.host_addressable and arenas["0"].kind.outlives_agent and not arenas["0"].kind.on_gpu
        assert arenas["1"].usage().total == 4 << 20
    finally:
        for a in arenas.values():
            a.close()
    with pytest.raises(RuntimeError, match="no GPU"):
        build_arenas("cuda", state_dir=str(tmp_path), nvml=FakeNvml(fail_init=True))


def _worker_once(tmp_path, plan: dict, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m warmserve.worker` in local mode, one pass (`--once`), no engine shells."""
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "warmserve.worker",
            "--plan-file",
            str(tmp_path / "plan.json"),
            "--state-file",
            str(tmp_path / "state.json"),
            "--device",
            "cpu",
            "--arena-bytes",
            str(8 << 20),
            "--page-size",
            str(1 << 20),
            "--shm-dir",
            str(tmp_path),
            "--state-dir",
            str(tmp_path / "st"),
            "--http-port",
            "0",
            "--shells",
            "0",
            "--once",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None},
    )


def _local_plan(model_dir: str) -> dict:
    replica = {"model": "a", "uid": "a", "source": f"file://{model_dir}", "role": "warm"}
    return {"generation": 4, "groups": [{"gpus": [0], "replicas": [replica]}]}


def test_cli_help_and_local_once(tmp_path, tiny_models):
    out = subprocess.run([sys.executable, "-m", "warmserve.worker", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--plan-file" in out.stdout and "--log-level" in out.stdout
    out = _worker_once(tmp_path, _local_plan(tiny_models["alpha"]), env={"WARMSERVE_LOG_LEVEL": None})
    assert out.returncode == 0, out.stderr
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["observedGeneration"] == 4 and state["replicas"][0]["uid"] == "a"
    assert state["devices"][0]["totalBytes"] == 8 << 20 and state["devices"][0]["index"] == 0
    assert json.loads(out.stdout)["observedGeneration"] == 4  # --once prints the state on stdout
    # local mode says what it does on stderr at INFO by default
    assert "local mode: plan from" in out.stderr, out.stderr
    assert "plan generation 4 applied: 1 replicas (0 served)" in out.stderr
    assert "loading a@0/rank0 (a) on GPU 0" in out.stderr


def test_cli_log_level_from_env_and_flag(tmp_path, tiny_models):
    quiet = _worker_once(tmp_path, _local_plan(tiny_models["alpha"]), env={"WARMSERVE_LOG_LEVEL": "error"})
    assert quiet.returncode == 0 and "INFO" not in quiet.stderr and "applied" not in quiet.stderr, quiet.stderr
    loud = _worker_once(
        tmp_path, _local_plan(tiny_models["alpha"]), "--log-level", "DEBUG", env={"WARMSERVE_LOG_LEVEL": "error"}
    )
    assert loud.returncode == 0 and "plan generation 4 applied" in loud.stderr  # the flag wins over the env
    bad = _worker_once(tmp_path, _local_plan(tiny_models["alpha"]), env={"WARMSERVE_LOG_LEVEL": "verbose"})
    assert bad.returncode == 2 and "must be one of debug, info, warning, error" in bad.stderr


def test_plugin_register_is_idempotent_and_safe():
    code = (
        "from warmserve.worker.vllm_plugin import register; register(); register();"
        "from vllm.model_executor.model_loader import get_model_loader;"
        "from vllm.config.load import LoadConfig;"
        "l = get_model_loader(LoadConfig(load_format='warmserve', model_loader_extra_config={'manifest': '/x'}));"
        "print(type(l).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("WarmServeModelLoader")


def _fake_rebuild(*args):
    return args


def test_cuda_ipc_handle_is_retargeted_to_the_engine_device():
    """The GPU path's only logic: the engine rebuilds the arena on *its* device index (arg 6)."""
    import pickle

    from warmserve.worker.backends import decode_cuda_ipc

    text = pickle.dumps((_fake_rebuild, tuple(range(15)))).hex()
    args = decode_cuda_ipc(text, device_index=3)
    assert args[6] == 3 and args[:6] == (0, 1, 2, 3, 4, 5) and args[7:] == tuple(range(7, 15))


def test_cuda_backend_degrades_cleanly_without_cuda():
    from warmserve.worker.backends import CudaBackend
    from warmserve.worker.binding import arena_kind

    with pytest.raises(RuntimeError, match="CUDA is not available"):
        CudaBackend(0, 1 << 20)
    assert arena_kind({"kind": "cuda"}).on_gpu and not DeviceKind.CUDA.outlives_agent
    with pytest.raises(ValueError, match="unknown arena kind"):
        arena_kind({"kind": "tpu"})


def test_cpu_engines_get_a_kv_cache_size_from_what_the_node_has_free():
    from warmserve.worker.__main__ import GiB, cpu_kv_cache_env

    # 24 GiB available, 4 GiB of arenas, 2 engines at once: a quarter of 20 GiB over 2 engines
    assert cpu_kv_cache_env({}, [], 24 * GiB, 4 * GiB, 2) == {"VLLM_CPU_KVCACHE_SPACE": "2"}
    assert cpu_kv_cache_env({}, [], 2 * GiB, 4 * GiB, 2) == {"VLLM_CPU_KVCACHE_SPACE": "1"}  # at least 1 GiB
    assert cpu_kv_cache_env({}, [], None, 0, 1) == {"VLLM_CPU_KVCACHE_SPACE": "1"}  # /proc/meminfo unreadable
    assert cpu_kv_cache_env({}, [], 1024 * GiB, 0, 1) == {"VLLM_CPU_KVCACHE_SPACE": "16"}  # at most 16 GiB
    # the node's own settings win
    assert cpu_kv_cache_env({"VLLM_CPU_KVCACHE_SPACE": "3"}, [], 24 * GiB, 0, 1) == {}
    assert cpu_kv_cache_env({}, ["--kv-cache-memory-bytes=2000000000"], 24 * GiB, 0, 1) == {}
