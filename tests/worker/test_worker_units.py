"""Plan parsing, GPU inventory (fake NVML), CLI, plugin registration: fast, no vLLM engine."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from warmserve.worker.devices import arena_bytes_for, build_arenas, gpu_inventory
from warmserve.worker.plan import PlanError, parse_plan, parse_replica_id, replica_id, source_path


def test_plan_parses_contract_example():
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
    assert sorted(plan.replicas) == [("u1", (2, 3)), ("u2", (2,))]  # keyed by (uid, gpus occupied)
    u1, u2 = plan.replicas[("u1", (2, 3))], plan.replicas[("u2", (2,))]
    assert u1.device_of_rank(1) == "3" and u1.kv_lend == 5 and u1.id == "u1@2-3"
    assert u2.path == "/models/m8"


def test_plan_accepts_two_replicas_of_one_model_on_different_gpus():
    rep = {"model": "m", "uid": "u", "source": "/m", "tp": 1, "role": "serve"}
    plan = parse_plan({"generation": 1, "groups": [{"gpus": [0], "replicas": [rep]}, {"gpus": [1], "replicas": [rep]}]})
    assert sorted(plan.replicas) == [("u", (0,)), ("u", (1,))]
    with pytest.raises(PlanError, match="duplicate replica"):
        parse_plan(
            {
                "generation": 1,
                "groups": [{"gpus": [0], "replicas": [rep]}, {"gpus": [0, 1], "replicas": [{**rep, "role": "warm"}]}],
            }
        )


@pytest.mark.parametrize("key", [("u", (0,)), ("9f1c-uid@x", (1, 2, 3))])
def test_replica_id_round_trips(key):
    assert parse_replica_id(replica_id(key)) == key


@pytest.mark.parametrize("text", ["u", "u/rank0", "@0", "u@", "u@a"])
def test_parse_replica_id_rejects_other_strings(text):
    assert parse_replica_id(text) is None


@pytest.mark.parametrize(
    "bad, msg",
    [
        ([], "JSON object"),
        ({"groups": []}, "generation"),
        ({"generation": 1, "groups": [{"gpus": [], "replicas": []}]}, "non-empty"),
        ({"generation": 1, "groups": [{"gpus": [0], "replicas": [{"uid": "x"}]}]}, "required"),
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
    with pytest.raises(PlanError, match=msg):
        parse_plan(bad)


def test_source_path_only_local():
    assert source_path("file:///x/y") == "/x/y"
    with pytest.raises(PlanError):
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
        assert sorted(arenas) == ["0", "1"] and arenas["0"].backend.kind == "shm"
        assert arenas["1"].usage().total == 4 << 20
    finally:
        for a in arenas.values():
            a.close()
    with pytest.raises(RuntimeError, match="no GPU"):
        build_arenas("cuda", state_dir=str(tmp_path), nvml=FakeNvml(fail_init=True))


def test_cli_help_and_local_once(tmp_path, tiny_models):
    out = subprocess.run([sys.executable, "-m", "warmserve.worker", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--plan-file" in out.stdout
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps(
            {
                "generation": 4,
                "groups": [
                    {
                        "gpus": [0],
                        "replicas": [
                            {"model": "a", "uid": "a", "source": f"file://{tiny_models['alpha']}", "role": "warm"}
                        ],
                    }
                ],
            }
        )
    )
    state_file = tmp_path / "state.json"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "warmserve.worker",
            "--plan-file",
            str(plan),
            "--state-file",
            str(state_file),
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
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    state = json.loads(state_file.read_text())
    assert state["observedGeneration"] == 4 and state["replicas"][0]["uid"] == "a"
    assert state["devices"][0]["totalBytes"] == 8 << 20 and state["devices"][0]["index"] == 0


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
    from warmserve.worker.backends import CudaBackend, open_backend

    with pytest.raises(RuntimeError, match="CUDA is not available"):
        CudaBackend(0, 1 << 20)
    with pytest.raises(ValueError, match="unknown memory backend"):
        open_backend({"kind": "tpu"})
