"""The protocol's engine settings (plan), capabilities and standby engines (state), and the forbidden engine
flags: round trips, refusals naming the field, and byte-identical documents when none of them is set."""

from __future__ import annotations

import json

import pytest

from warmserve.protocol import (
    FORBIDDEN_ENGINE_FLAGS,
    Capabilities,
    EngineSettings,
    Plan,
    PlanGroup,
    PlanReplica,
    ProtocolError,
    Role,
    StandbyState,
    WorkerState,
    forbidden_engine_flag,
    parse_plan,
    parse_state,
    unknown_plan_fields,
)

REP = {"model": "m", "uid": "u", "source": "file:///models/m", "tp": 1, "role": "serve", "kvLend": 0}


def _plan(**replica: object) -> dict:
    return {"generation": 1, "groups": [{"gpus": [0, 1], "replicas": [REP | replica]}]}


# ---------------------------------------------------------------------------------------- engine settings
def test_engine_settings_render_camel_case_and_argv_in_order():
    engine = EngineSettings(("--enable-prefix-caching", "--max-num-seqs", "8"), 4096, "bfloat16")
    assert engine.to_json() == {
        "args": ["--enable-prefix-caching", "--max-num-seqs", "8"],
        "maxModelLen": 4096,
        "dtype": "bfloat16",
    }
    assert engine.argv() == [
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "4096",
        "--enable-prefix-caching",
        "--max-num-seqs",
        "8",
    ]
    assert EngineSettings().to_json() == {} and EngineSettings().argv() == [] and EngineSettings().empty
    assert EngineSettings(max_model_len=7).to_json() == {"maxModelLen": 7}
    assert EngineSettings(["--seed", "1"]).args == ("--seed", "1")  # type: ignore[arg-type]


def test_a_plan_with_engine_settings_round_trips_and_the_worker_sees_them():
    engine = EngineSettings(("--enforce-eager",), 2048, "float16")
    plan = Plan.build(3, [PlanGroup((0, 1), (PlanReplica("m", "u", "file:///m", 2, Role.SERVE, 5, engine),))])
    again = parse_plan(plan.dumps())
    assert again == plan and again.dumps() == plan.dumps()
    (planned,) = again.replicas.values()
    assert planned.engine == engine and planned.engine.argv()[:2] == ["--dtype", "float16"]
    assert json.loads(plan.dumps())["groups"][0]["replicas"][0]["engine"] == {
        "args": ["--enforce-eager"],
        "dtype": "float16",
        "maxModelLen": 2048,
    }
    assert unknown_plan_fields(plan.dumps()) == []
    assert unknown_plan_fields(_plan(engine={"args": [], "future": 1})) == ["plan.groups[0].replicas[0].engine.future"]


def test_a_plan_without_engine_settings_is_byte_identical_to_before():
    plan = Plan.build(1, [PlanGroup((0,), (PlanReplica("m", "u", "s", 1, Role.WARM, 0),))])
    assert plan.dumps() == (
        '{"generation":1,"groups":[{"gpus":[0],"replicas":'
        '[{"kvLend":0,"model":"m","role":"warm","source":"s","tp":1,"uid":"u"}]}]}'
    )
    (planned,) = parse_plan(plan.dumps()).replicas.values()
    assert planned.engine == EngineSettings()
    # an empty engine object reads as no settings, and is not written back
    assert parse_plan(_plan(engine={})).dumps() == parse_plan(_plan()).dumps()


def test_replicas_that_differ_only_in_engine_settings_sort_and_compare():
    a = PlanReplica("m", "u", "s", 1, engine=EngineSettings(max_model_len=5))
    b = PlanReplica("m", "u", "s", 1, engine=EngineSettings(dtype="float16"))
    assert a != b and sorted([a, b]) == sorted([b, a])


@pytest.mark.parametrize(
    ("engine", "field"),
    [
        ([], "engine must be an object"),
        ({"args": "--enforce-eager"}, "engine.args must be a list"),
        ({"args": [1]}, "engine.args[0] must be a string"),
        ({"args": ["x" * 513]}, "engine.args[0] is 513 characters"),
        ({"args": ["--seed"] * 65}, "engine.args has 65 entries"),
        ({"maxModelLen": 0}, "engine.maxModelLen must be an integer of at least 1"),
        ({"maxModelLen": True}, "engine.maxModelLen"),
        ({"maxModelLen": 1.5}, "engine.maxModelLen"),
        ({"maxModelLen": "4096"}, "engine.maxModelLen"),
        ({"dtype": "float8"}, "engine.dtype must be one of"),
        ({"dtype": 16}, "engine.dtype"),
    ],
)
def test_malformed_engine_settings_are_refused_naming_the_field(engine, field):
    with pytest.raises(ProtocolError) as info:
        parse_plan(_plan(engine=engine))
    assert "plan.groups[0].replicas[0]." in str(info.value) and field in str(info.value), str(info.value)


def test_engine_settings_refuse_bad_values_when_constructed():
    for bad in ({"max_model_len": 0}, {"dtype": "int4"}, {"args": ("x" * 600,)}):
        with pytest.raises(ProtocolError):
            EngineSettings(**bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- forbidden flags
@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--port", "80"], "--port"),
        (["--port=80"], "--port"),
        (["--host", "0.0.0.0"], "--host"),
        (["--uds=/tmp/s"], "--uds"),
        (["--load-format", "dummy"], "--load-format"),
        (["--load_format", "dummy"], "--load-format"),
        (["--load_format=dummy"], "--load-format"),
        (["--model-loader-extra-config", "{}"], "--model-loader-extra-config"),
        (["--device=cpu"], "--device"),
        (["--model", "/etc"], "--model"),
        (["--served-model-name", "gpt-4"], "--served-model-name"),
        (["--served_model_name=gpt-4"], "--served-model-name"),
        (["--tensor-parallel-size", "8"], "--tensor-parallel-size"),
        (["-tp", "8"], "-tp"),
        (["-tp=8"], "-tp"),
        (["-tp8"], "-tp"),
        (["-pp", "2"], "-pp"),
        (["--pipeline_parallel_size=2"], "--pipeline-parallel-size"),
        (["-dp", "2"], "-dp"),
        (["--data-parallel-size", "2"], "--data-parallel-size"),
        (["--gpu-memory-utilization", "0.99"], "--gpu-memory-utilization"),
        (["--gpu_memory_utilization=0.99"], "--gpu-memory-utilization"),
        (["--kv-cache-memory-bytes", "1"], "--kv-cache-memory-bytes"),
        (["--cpu-offload-gb", "4"], "--cpu-offload-gb"),
        (["--swap-space=4"], "--swap-space"),
        (["--worker-extension-cls", "x.Y"], "--worker-extension-cls"),
        (["--middleware", "os.system"], "--middleware"),
        (["--api-key", "k"], "--api-key"),
        (["--ssl-keyfile", "/k"], "--ssl-keyfile"),
        (["--ssl-certfile=/c"], "--ssl-certfile"),
        (["--allowed-local-media-path", "/"], "--allowed-local-media-path"),
        (["--trust-remote-code"], "--trust-remote-code"),
        (["--no-trust-remote-code"], "--trust-remote-code"),
        (["--download-dir", "/tmp"], "--download-dir"),
        (["--distributed-executor-backend", "ray"], "--distributed-executor-backend"),
        (["--enable-sleep-mode"], "--enable-sleep-mode"),
        (["--max-model-len", "4096"], "--max-model-len"),
        (["--max_model_len=4096"], "--max-model-len"),
        (["--dtype", "half"], "--dtype"),
        (["--PORT", "80"], "--port"),
        (["--port 80"], "--port"),  # one argument with a space: still the flag
        (["--tensor-parallel", "8"], "--tensor-parallel-size"),  # an abbreviation argparse expands
        (["--enable-prefix-caching", "--max-num-seqs", "--port"], "--port"),  # a flag where a value may go
        (["--config", "/etc/x.yaml"], "--config"),
    ],
)
def test_forbidden_flags_are_found_in_every_spelling(args, flag):
    assert forbidden_engine_flag(args) == flag
    assert flag in FORBIDDEN_ENGINE_FLAGS


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--enable-prefix-caching"],
        ["--max-num-seqs", "128", "--kv-cache-dtype=fp8"],
        ["--seed", "-1"],  # a negative number is a value, not a flag
        ["--no-enable-prefix-caching"],
        ["--model-impl", "vllm"],  # starts like --model, is another flag
        ["positional", "value"],
        ["--"],
    ],
)
def test_harmless_arguments_pass(args):
    assert forbidden_engine_flag(args) is None


@pytest.mark.parametrize("arg", ["--seed\n1", "x\x00y", "--enforce-eager\r"])
def test_arguments_with_nul_or_line_breaks_are_refused(arg):
    found = forbidden_engine_flag(["--enforce-eager", arg])
    assert found is not None and found == repr(arg[:64])


# ---------------------------------------------------------------------------------- capabilities, standby
def test_capabilities_and_standby_round_trip():
    state = WorkerState(
        4,
        capabilities=Capabilities(
            kv_lend=True,
            tp_promotion=False,
            standby_engines=True,
            engine_settings=True,
            device_kind="cuda",
            reasons={"tpPromotion": "one GPU per engine on this build"},
        ),
        standby=(StandbyState("m", True, 1 << 30), StandbyState("n", False)),
    )
    doc = json.loads(state.dumps())
    assert doc["capabilities"] == {
        "kvLend": True,
        "tpPromotion": False,
        "standbyEngines": True,
        "engineSettings": True,
        "deviceKind": "cuda",
        "reasons": {"tpPromotion": "one GPU per engine on this build"},
    }
    assert doc["standby"] == [
        {"model": "m", "ready": True, "bytes": 1 << 30},
        {"model": "n", "ready": False, "bytes": 0},
    ]
    again = parse_state(state.dumps())
    assert again == state and again.dumps() == state.dumps()


def test_a_state_without_capabilities_is_an_older_worker_and_renders_as_before():
    state = parse_state({"observedGeneration": 1})
    assert state.capabilities is None and state.standby == ()
    assert set(json.loads(state.dumps())) == {
        "observedGeneration",
        "devices",
        "replicas",
        "engines",
        "errors",
        "timings",
    }


def test_capabilities_are_parsed_tolerantly():
    state = parse_state({"observedGeneration": 1, "capabilities": {"kvLend": True, "someday": [1, 2]}})
    assert state.capabilities == Capabilities(kv_lend=True)
    assert parse_state({"observedGeneration": 1, "capabilities": {}}).capabilities == Capabilities()


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"capabilities": []}, "state.capabilities must be an object"),
        ({"capabilities": {"kvLend": "yes"}}, "state.capabilities.kvLend must be true or false"),
        ({"capabilities": {"tpPromotion": 1}}, "state.capabilities.tpPromotion"),
        ({"capabilities": {"standbyEngines": "true"}}, "state.capabilities.standbyEngines"),
        ({"capabilities": {"engineSettings": 0}}, "state.capabilities.engineSettings"),
        ({"capabilities": {"deviceKind": 3}}, "state.capabilities.deviceKind"),
        ({"capabilities": {"reasons": ["no"]}}, "state.capabilities.reasons"),
        ({"capabilities": {"reasons": {"kvLend": 1}}}, "state.capabilities.reasons"),
        ({"standby": {}}, "state.standby must be a list"),
        ({"standby": [1]}, "state.standby[0] must be an object"),
        ({"standby": [{"ready": True}]}, "state.standby[0].model"),
        ({"standby": [{"model": "m", "ready": "yes"}]}, "state.standby[0].ready"),
        ({"standby": [{"model": "m", "ready": True, "bytes": -1}]}, "state.standby[0].bytes"),
        ({"standby": [{"model": "m", "ready": True, "bytes": 1.5}]}, "state.standby[0].bytes"),
    ],
)
def test_malformed_capabilities_and_standby_are_refused_naming_the_field(doc, field):
    with pytest.raises(ProtocolError) as info:
        parse_state({"observedGeneration": 1} | doc)
    assert field in str(info.value), str(info.value)
