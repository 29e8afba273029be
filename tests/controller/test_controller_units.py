"""Pure units of the control plane: protocol, conditions, weights, validation, status, history, scraping."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from warmserve.controller import conditions as c
from warmserve.controller import reconcile
from warmserve.controller.history import LoadHistory, WindowAccumulator
from warmserve.controller.planwriter import without_model
from warmserve.controller.scrape import parse_inflight, parse_prometheus_vector
from warmserve.controller.settings import ControllerConfig
from warmserve.controller.spec import parse_model_spec, parse_pool_spec
from warmserve.controller.weights import (
    WeightsError,
    header_tensor_bytes,
    local_path_of,
    resolve_weight_bytes,
    safetensors_weight_bytes,
)
from warmserve.protocol import (
    PLAN_ANNOTATION,
    STATE_ANNOTATION,
    Plan,
    PlanGroup,
    PlanReplica,
    ProtocolError,
    Role,
    next_generation,
    parse_plan,
    parse_state,
    plan_of_pod,
)

GIB = 1 << 30


# ---------------------------------------------------------------- protocol
def _replica(model="m", uid="u1", role=Role.WARM, tp=1, lend=0):
    return PlanReplica(model, uid, f"pvc://w/{model}", tp, role, lend)


def test_plan_round_trips_through_the_documented_json_shape():
    plan = Plan.build(
        7,
        [
            PlanGroup((2, 3), (_replica("b", "u2", tp=2),)),
            PlanGroup((0,), (_replica("a", "u1", role=Role.SERVE, lend=123), _replica("c", "u3"))),
        ],
    )
    doc = json.loads(plan.dumps())
    assert doc["generation"] == 7
    assert doc["groups"][0] == {
        "gpus": [0],
        "replicas": [
            {"model": "a", "uid": "u1", "source": "pvc://w/a", "tp": 1, "role": "serve", "kvLend": 123},
            {"model": "c", "uid": "u3", "source": "pvc://w/c", "tp": 1, "role": "warm", "kvLend": 0},
        ],
    }
    assert set(doc["groups"][1]["replicas"][0]) == {"model", "uid", "source", "tp", "role", "kvLend"}
    assert parse_plan(plan.dumps()) == plan


def test_plan_is_canonical_so_equal_contents_compare_equal():
    a = Plan.build(1, [PlanGroup((1, 0), (_replica("x", "2"), _replica("y", "1"))), PlanGroup((4,), ())])
    b = Plan.build(9, [PlanGroup((0, 1), (_replica("y", "1"), _replica("x", "2")))])
    assert a.same_contents(b) and a.dumps() != b.dumps()


_REP = {"model": "m", "uid": "u", "source": "s", "tp": 1, "role": "warm", "kvLend": 0}


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        json.dumps({"groups": []}),  # no generation
        json.dumps({"generation": "1", "groups": []}),
        json.dumps({"generation": 1, "groups": [{"gpus": [0], "replicas": [{"model": "m"}]}]}),
        json.dumps(
            {
                "generation": 1,
                "groups": [{"gpus": [0], "replicas": [{"model": "m", "uid": "u", "source": "s", "role": "hot"}]}],
            }
        ),
        # stricter than the operator's old parser: what a plan the operator renders never contains
        json.dumps({"generation": True, "groups": []}),
        json.dumps({"generation": 1, "groups": [{"gpus": [], "replicas": [_REP]}]}),
        json.dumps({"generation": 1, "groups": [{"gpus": [0, 0], "replicas": [_REP]}]}),
        json.dumps({"generation": 1, "groups": [{"gpus": [0], "replicas": [{**_REP, "tp": 1.0}]}]}),
        json.dumps({"generation": 1, "groups": [{"gpus": [0], "replicas": [{**_REP, "uid": ""}]}]}),
        json.dumps({"generation": 1, "groups": [{"gpus": [0], "replicas": [_REP, _REP]}]}),
    ],
)
def test_malformed_plan_is_a_protocol_error(text):
    with pytest.raises(ProtocolError):
        parse_plan(text)


def test_state_parses_and_rejects_unknown_phase():
    state = parse_state(
        {
            "observedGeneration": 3,
            "devices": [{"index": 0, "totalBytes": 100, "usedBytes": 40, "freeBytes": 60}],
            "replicas": [
                {
                    "model": "m",
                    "uid": "u",
                    "gpus": [0],
                    "phase": "serving",
                    "progress": 1.0,
                    "endpoint": "10.0.0.1:8000",
                    "ready": True,
                },
                {"model": "n", "uid": "v", "gpus": [0], "phase": "loading", "progress": 0.5, "endpoint": None},
            ],
            "errors": [{"reason": "plan rejected: x"}, {"uid": "v", "gpus": [0], "reason": "disk full"}],
            "timings": {"lastPrewarmSeconds": 1.5},
        }
    )
    assert state.observed_generation == 3 and state.free_bytes == 60
    assert state.replicas[0].serving and state.replicas[0].dedicated and not state.replicas[1].dedicated
    assert [str(e) for e in state.errors] == ["plan rejected: x", "v on GPUs [0]: disk full"]
    assert (state.errors[1].uid, state.errors[1].gpus) == ("v", (0,))
    with pytest.raises(ProtocolError):
        parse_state({"observedGeneration": 1, "replicas": [{"model": "m", "uid": "u", "gpus": [0], "phase": "zombie"}]})


def test_next_generation_is_monotonic_and_idempotent():
    first = next_generation(None, Plan.build(0, [PlanGroup((0,), (_replica(),))]))
    assert first.generation == 1
    assert next_generation(first, Plan.build(0, [PlanGroup((0,), (_replica(),))])) is first
    second = next_generation(first, Plan.build(0, []))
    assert second.generation == 2 and second.groups == ()


def test_plan_of_pod_tolerates_garbage():
    assert plan_of_pod({"metadata": {"annotations": {PLAN_ANNOTATION: "{"}}}) is None
    assert plan_of_pod({"metadata": {}}) is None


def test_without_model_removes_every_replica_of_that_uid():
    plan = Plan.build(
        4,
        [
            PlanGroup((0,), (_replica("a", "u1"), _replica("b", "u2"))),
            PlanGroup((1,), (_replica("a", "u1", Role.SERVE),)),
        ],
    )
    stripped = without_model(plan, "u1")
    assert stripped.uids() == {"u2"} and [g.gpus for g in stripped.groups] == [(0,)]


# -------------------------------------------------------------- conditions
def test_transition_time_changes_only_on_flips():
    first = c.merge_conditions(None, [c.Condition("Ready", "False", "Starting")], now="T1", generation=1)
    same = c.merge_conditions(first, [c.Condition("Ready", "False", "StillStarting", "x")], now="T2", generation=2)
    flipped = c.merge_conditions(same, [c.Condition("Ready", "True", "ReplicasReady")], now="T3", generation=2)
    assert first[0]["lastTransitionTime"] == "T1"
    assert same[0]["lastTransitionTime"] == "T1" and same[0]["reason"] == "StillStarting"
    assert same[0]["observedGeneration"] == 2
    assert flipped[0]["lastTransitionTime"] == "T3"


def test_conditions_keep_other_types_and_sort():
    existing = [{"type": "Zeta", "status": "True", "reason": "Other", "lastTransitionTime": "T0"}]
    merged = c.merge_conditions(existing, [c.Condition("Alpha", "True", "Fine")], now="T1", generation=None)
    assert [m["type"] for m in merged] == ["Alpha", "Zeta"] and "observedGeneration" not in merged[0]


@pytest.mark.parametrize(
    "args", [("ready", "True", "X"), ("Ready", "Yes", "X"), ("Ready", "True", ""), ("Ready", "True", "not camel")]
)
def test_condition_rejects_bad_shapes(args):
    with pytest.raises(ValueError):
        c.Condition(*args)


def test_now_rfc3339_format():
    import datetime as dt

    assert c.now_rfc3339(dt.datetime(2026, 1, 2, 3, 4, 5, 999, tzinfo=dt.UTC)) == "2026-01-02T03:04:05Z"


# ----------------------------------------------------------------- weights
def write_safetensors(path, tensors: dict[str, int], corrupt: bool = False) -> int:
    """A real safetensors layout (8-byte length, JSON header, data) with `tensors` = {name: bytes}."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, nbytes in tensors.items():
        header[name] = {"dtype": "U8", "shape": [nbytes], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw) + (1000 if corrupt else 0)))
        fh.write(raw)
        fh.write(b"\0" * offset)
    return offset


def test_weight_bytes_from_sharded_safetensors_headers(tmp_path):
    a = write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"w1": 1000, "w2": 24})
    b = write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {"w3": 4096})
    (tmp_path / "config.json").write_text("{}")
    assert safetensors_weight_bytes(tmp_path) == a + b == 5120
    assert header_tensor_bytes(tmp_path / "model-00002-of-00002.safetensors") == 4096
    assert resolve_weight_bytes(None, f"file://{tmp_path}") == (
        5120,
        "safetensors",
        f"read from safetensors headers under {tmp_path}",
    )


def test_weight_bytes_reads_only_the_header(tmp_path, monkeypatch):
    path = tmp_path / "big.safetensors"
    write_safetensors(path, {"w": 10_000_000})
    reads = []
    real_open = open

    class Spy:
        def __init__(self, fh):
            self.fh = fh

        def read(self, n=-1):
            reads.append(n)
            return self.fh.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr("builtins.open", lambda p, mode="r", *a, **k: Spy(real_open(p, mode, *a, **k)))
    assert header_tensor_bytes(path) == 10_000_000
    assert all(n >= 0 for n in reads) and sum(reads) < 1000, reads


def test_weight_errors_are_reported_not_raised(tmp_path):
    write_safetensors(tmp_path / "bad.safetensors", {"w": 10}, corrupt=True)
    with pytest.raises(WeightsError):
        safetensors_weight_bytes(tmp_path)
    weight, origin, message = resolve_weight_bytes(None, f"file://{tmp_path}")
    assert weight is None and origin == "unknown" and "truncated" in message
    assert resolve_weight_bytes(None, "hf://org/model")[:2] == (None, "unknown")
    assert resolve_weight_bytes(7, "hf://org/model")[:2] == (7, "spec")
    assert local_path_of("pvc://claim/dir", "/mnt") is not None and local_path_of("pvc://claim/dir") is None


# -------------------------------------------------------------- validation
POOL8 = parse_pool_spec(
    {"gpu": {"count": 8, "memoryMiB": 81920}, "modelCache": {"persistentVolumeClaimName": "weights"}}
)
CPU = parse_pool_spec({"gpu": {"count": 0, "memoryMiB": 4096}})


def _model(tp=1, source="file:///models/y", **spec):
    return parse_model_spec(
        "m", {"poolRef": {"name": "p"}, "model": {"source": source, "tensorParallelSize": tp}, **spec}
    )


@pytest.mark.parametrize(
    ("model", "pool", "weight", "reason"),
    [
        (_model(1), POOL8, 13 * GIB, "Validated"),
        (_model(4), POOL8, 138 * GIB, "Validated"),
        (_model(1), POOL8, 138 * GIB, "DoesNotFitPool"),
        (_model(16), POOL8, 10 * GIB, "TensorParallelDoesNotDividePool"),
        (_model(3), POOL8, 10 * GIB, "InvalidTensorParallelSize"),
        (_model(2), CPU, 1 * GIB, "TensorParallelNeedsGPUs"),
        (_model(1), CPU, 5 * GIB, "DoesNotFitPool"),
        (_model(1), None, 1 * GIB, "PoolNotFound"),
        (_model(1), POOL8, None, "WeightBytesUnknown"),
        (_model(1, scaling={"minReplicas": 3, "maxReplicas": 1}), POOL8, GIB, "InvalidScaling"),
        (_model(1, source="pvc://other/llama"), POOL8, GIB, "SourceNotOnPool"),
        (_model(1, source="pvc://weights/llama"), POOL8, GIB, "Validated"),
    ],
)
def test_validate_model(model, pool, weight, reason):
    result = reconcile.validate_model(model, pool, weight)
    assert result.reason == reason and result.ok == (reason == "Validated") and result.message


def test_invalid_model_conditions_carry_the_reason_everywhere():
    bad = reconcile.Validation(False, "DoesNotFitPool", "too big")
    status = reconcile.model_status(
        _model(), bad, None, weight_bytes=5, weight_origin="spec", existing_conditions=None, generation=4, now="T"
    )
    conds = {x["type"]: x for x in status["conditions"]}
    assert set(conds) == {"Valid", "Ready", "Prewarmed", "Degraded"}
    assert conds["Valid"]["status"] == "False" and conds["Degraded"]["status"] == "True"
    assert all(x["reason"] for x in status["conditions"]) and status["observedGeneration"] == 4


def _pod(name, plan=None, state=None, phase="Running", ip="10.0.0.1"):
    ann = {}
    if plan is not None:
        ann[PLAN_ANNOTATION] = plan.dumps()
    if state is not None:
        ann[STATE_ANNOTATION] = json.dumps(state)
    return {
        "metadata": {"name": name, "annotations": ann},
        "spec": {"nodeName": f"node-{name}"},
        "status": {"phase": phase, "podIP": ip},
    }


def test_status_from_worker_states():
    plan = Plan.build(5, [PlanGroup((0,), (_replica("a", "ua", Role.SERVE),)), PlanGroup((1,), (_replica("b", "ub"),))])
    state = {
        "observedGeneration": 5,
        "devices": [
            {"index": 0, "totalBytes": 80, "usedBytes": 70, "freeBytes": 10},
            {"index": 1, "totalBytes": 80, "usedBytes": 20, "freeBytes": 60},
        ],
        "replicas": [
            {
                "model": "a",
                "uid": "ua",
                "gpus": [0],
                "phase": "serving",
                "progress": 1,
                "endpoint": "10.0.0.1:8000",
                "ready": True,
            },
            {"model": "b", "uid": "ub", "gpus": [1], "phase": "warm", "progress": 1, "endpoint": None, "ready": False},
        ],
        "errors": [],
    }
    workers = [reconcile.view_worker(_pod("w0", plan, state), 2), reconcile.view_worker(_pod("w1"), 2)]
    pool = reconcile.pool_status(
        workers,
        expected_workers=2,
        plan_generation=5,
        existing_conditions=None,
        generation=1,
        now="T",
    )
    assert pool["readyWorkers"] == 1 and pool["totalFreeBytes"] == 70
    assert [d["state"] for d in pool["workers"][0]["devices"]] == ["dedicated", "universal"]
    assert {x["type"]: x["reason"] for x in pool["conditions"]}["Ready"] == "WorkersNotReporting"
    obs = reconcile.observe_models(workers)
    assert (obs["ua"].desired_serve, obs["ua"].ready, obs["ua"].endpoints) == (1, 1, ["10.0.0.1:8000"])
    assert (obs["ub"].desired_warm, obs["ub"].prewarmed) == (1, 1)
    ok = reconcile.Validation(True, "Validated", "ok")
    a = {x.type: x for x in reconcile.model_conditions(_model(), ok, obs["ua"])}
    b = {x.type: x for x in reconcile.model_conditions(_model(), ok, obs["ub"])}
    assert a["Ready"].status == "True" and b["Prewarmed"].status == "True"


def test_garbled_state_degrades_the_pool_instead_of_crashing():
    pod = _pod("w0")
    pod["metadata"]["annotations"][STATE_ANNOTATION] = "{nope"
    worker = reconcile.view_worker(pod, 8)
    status = reconcile.pool_status(
        [worker], expected_workers=1, plan_generation=0, existing_conditions=None, generation=1, now="T"
    )
    assert {x["type"]: x["status"] for x in status["conditions"]}["Degraded"] == "True"


# ----------------------------------------------------------------- history
def test_window_accumulator():
    acc = WindowAccumulator()
    for v in (1, 5, 3):
        acc.add(v)
    assert acc.avg == 3 and acc.peak == 5


def test_history_encodes_compactly_and_round_trips():
    h = LoadHistory(300, capacity=5 * 288)
    rng = np.random.default_rng(0)
    base = 5_000_000
    for w in range(base, base + 5 * 288):
        for m in range(100):
            h.record(f"{m:08d}-0000-0000-0000-000000000000", w, float(rng.gamma(2, 3)), float(rng.gamma(4, 3)))
    text = h.encode()
    assert len(text) < 1_000_000, f"{len(text)} bytes would not fit a ConfigMap"
    back = LoadHistory.decode(text, 300, 5 * 288)
    series, t = back.array("00000003-0000-0000-0000-000000000000", "avg", base + 5 * 288)
    original, _ = h.array("00000003-0000-0000-0000-000000000000", "avg", base + 5 * 288)
    assert t == 5 * 288 and np.allclose(series, original, rtol=5e-3)
    assert LoadHistory.decode(text, 60, 100).series == {}, "a different window length is not comparable"


def test_history_trims_to_capacity_and_marks_gaps_nan():
    h = LoadHistory(60, capacity=10)
    for w in range(100, 130, 2):
        h.record("m", w, 1.0, 2.0)
    series, t = h.array("m", "avg", 130)
    assert h.windows("m") <= 10 and t == 10  # memory bounded by the capacity
    assert math.isnan(series[1]) and series[8] == 1.0


# ---------------------------------------------------------------- scraping
def test_parse_inflight_prefers_our_gauge_and_falls_back_to_vllm():
    text = """
# HELP warmserve_inflight_requests In-flight requests
warmserve_inflight_requests{model="llama"} 3
warmserve_inflight_requests{model="llama",engine="1"} 2
warmserve_inflight_requests{model="qwen"} 0
vllm:num_requests_running{model_name="llama"} 100
"""
    assert parse_inflight(text) == {"llama": 5.0, "qwen": 0.0}
    vllm_only = 'vllm:num_requests_running{model_name="m"} 4\nvllm:num_requests_waiting{model_name="m"} 2\n'
    assert parse_inflight(vllm_only) == {"m": 6.0}


def test_parse_prometheus_vector():
    data = {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [
                {"metric": {"model": "a"}, "value": [1, "2.5"]},
                {"metric": {"model": "b"}, "value": [1, "NaN"]},
                {"metric": {}, "value": [1, "1"]},
            ],
        },
    }
    assert parse_prometheus_vector(data) == {"a": 2.5}


# ---------------------------------------------------------------- settings
def test_settings_from_env_and_flags():
    env = {
        "WARMSERVE_NAMESPACES": "a, b",
        "WARMSERVE_PEERING": "warmserve",
        "WARMSERVE_METRICS_PORT": "0",
        "WARMSERVE_LOOP": "false",
    }
    config = ControllerConfig.from_env(env)
    assert config.namespaces == ("a", "b") and not config.standalone and not config.loop_enabled
    flags = ControllerConfig.from_args(["--namespace", "c", "--priority", "7", "--log-format", "text"], env={})
    assert flags.namespaces == ("c",) and flags.priority == 7 and flags.standalone and flags.metrics_port == 9090
    assert ControllerConfig.from_env({}).clusterwide


def test_worker_source_maps_sources_to_the_pool_cache():
    from warmserve.controller.reconcile import worker_source

    pool = parse_pool_spec({"modelCache": {"persistentVolumeClaimName": "weights", "mountPath": "/cache/"}})
    assert worker_source("pvc://weights/meta/llama", pool) == "file:///cache/meta/llama"
    assert worker_source("pvc://other/llama", pool) is None
    assert worker_source("hf://meta-llama/Llama-2-7b-hf", pool) == "file:///cache/meta-llama/Llama-2-7b-hf"
    assert worker_source("file:///cache/m", pool) == "file:///cache/m"
    assert worker_source("file:///opt/m", pool) is None, "file:// sources must lie inside the cache mount"
