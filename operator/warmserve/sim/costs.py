"""The simulator's cost table: what each mechanism costs, with its unit and its source.

Every start a policy makes is priced by the mechanism of the system it models (`MECHANISMS`), and every
mechanism is priced only from the entries of one `CostModel`:

=====================  =====================================================================================
mechanism              time from "start an engine" (or "its weights are in place") to serving
=====================  =====================================================================================
``cold``               weights read from storage + engine initialisation in a fresh process (vLLM cold start)
``fast-cold``          weights copied from host memory + engine initialisation in a pre-started process
                       (ServerlessLLM-like: DRAM checkpoint tier, processes started ahead of need)
``prestarted-cold``    weights read from storage + engine initialisation in a pre-started process (WarmServe
                       when no warm replica of the model exists: this repository's worker keeps engine shells)
``promote``            a warm replica already in GPU memory is bound by a pre-initialised (standby) engine
``prestarted-warm``    a warm replica without a ready standby engine: an engine initialised in a pre-started
                       process maps its weights from the arena (no read)
                       (WarmServe hit; a replica still loading pays the rest of its load first)
``wake``               a sleeping engine copies its weights back from host memory and resumes (vLLM sleep
                       mode level 1, the AIBrix / llm-d approach)
=====================  =====================================================================================

Evicting a warm replica costs ``evict_s`` on the promotion that needs its space. Each value of a table
is either measured by a benchmark of this repository or a public figure copied, with its URL, into
docs/references.md. Two tables ship: ``gpu-a100`` (the default, public A100 figures) and ``cpu-measured``
(``bench/worker.py`` on the development machine, real vLLM on CPU, 1.05 GB model, 2026-12-02).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

GB = 10**9

REFERENCES = "docs/references.md"


@dataclass(frozen=True)
class Cost:
    """One entry of a cost table, as printed in the simulate JSON (``scenario.costs.{name}``)."""

    value: float
    unit: str
    source: str


@dataclass(frozen=True)
class CostModel:
    """Costs in SI units (bytes per second, seconds); `COST_TABLES` says where each value comes from."""

    # Storage → GPU (or engine memory) per GPU: cold loads and WarmServe's prewarming (the worker reads the
    # checkpoint files).
    storage_bandwidth: float = 6.4 * GB
    # Host memory → GPU per GPU: ServerlessLLM's DRAM tier and the sleep/wake copy, both directions.
    load_bandwidth: float = 21 * GB
    # Engine initialisation in a fresh process, excluding the weight transfer (imports, CUDA context,
    # allocator, KV profiling, graph capture, warm-up).
    engine_init_s: float = 37.8
    # The same in a process started ahead of need (imports and context done).
    prestarted_init_s: float = 10.0
    # A pre-initialised (standby) engine binds weights already in GPU memory: WarmServe's promotion.
    promote_s: float = 0.2
    # A sleeping engine resumes, besides copying its weights back (fixed part of a vLLM level-1 wake).
    wake_s: float = 0.2
    # Dropping a warm replica (a free of arena pages).
    evict_s: float = 0.0002
    # Slow-down of a prefill per co-located engine that is decoding meanwhile (gpu-share).
    share_contention: float = 0.5
    # Fraction of a shared GPU's memory kept free for KV cache when packing models (gpu-share).
    share_min_kv_fraction: float = 0.3


UNITS: dict[str, tuple[str, float]] = {  # field → (unit shown, SI value per unit)
    "storage_bandwidth": ("GB/s", GB),
    "load_bandwidth": ("GB/s", GB),
    "engine_init_s": ("s", 1.0),
    "prestarted_init_s": ("s", 1.0),
    "promote_s": ("s", 1.0),
    "wake_s": ("s", 1.0),
    "evict_s": ("s", 1.0),
    "share_contention": ("fraction", 1.0),
    "share_min_kv_fraction": ("fraction", 1.0),
}

_SHARE_SOURCES = {
    "share_contention": "assumption, swept by --sensitivity: 0 is perfect overlap under MPS (MuxServe's premise), 1 "
    "is time slicing. No public figure isolates a prefill slowed by another model's decode; it needs a GPU to "
    "measure.",
    "share_min_kv_fraction": "assumption: keep ≥ 30 % of each shared GPU for KV cache when packing models.",
}

GPU_SOURCES: dict[str, str] = {
    "storage_bandwidth": "derived: vLLM 0.11 on A100, cold start of Qwen3-Coder-30B (≈ 61 GB bf16) 47.33–47.47 s "
    "minus the 37.2–38.5 s (mean 38.0 s) full load of Qwen3-0.6B (engine initialisation) leaves ≈ 9.5 s for 61 GB "
    "≈ 6.4 GB/s "
    f"[{REFERENCES} #vllm-sleep-mode]. The same split of the 235B TP4 cold start (97.4–97.9 s, ≈ 59 GB per GPU) "
    "gives ≈ 1 GB/s per GPU: storage shared by 4 GPUs; the simulator gives each GPU its own 6.4 GB/s.",
    "load_bandwidth": "derived: vLLM 0.11 level-1 wake of Qwen3-Coder-30B (≈ 61 GB copied host → A100) in "
    f"2.85–2.89 s ≈ 21 GB/s [{REFERENCES} #vllm-sleep-mode]; PCIe Gen4 x16 is 32 GB/s in theory. The 235B TP4 "
    "wake ran at 10–11 GB/s per GPU: at TP > 1 this favours every policy that copies from host memory.",
    "engine_init_s": "derived: full vLLM 0.11 load of Qwen3-0.6B on A100 37.2–38.5 s (mean 38.0 s), minus its "
    f"1.2 GB at storage_bandwidth (0.2 s) [{REFERENCES} #vllm-sleep-mode].",
    "prestarted_init_s": "NVIDIA Dynamo snapshot restore (a process restored initialised instead of started): cold "
    f"≈ 1 min → ≈ 10 s [{REFERENCES} #dynamo-snapshot]. Cross-check: on this repository's CPU bench a pre-started "
    "shell cuts a cold start to 0.20 of it (5.81 / 29.28 s); 0.20 × 47.4 s (30B cold start on A100) ≈ 9.4 s.",
    "promote_s": "derived: vLLM 0.11 level-1 wake of Qwen3-0.6B on A100 0.25–0.28 s, of which 1.2 GB at load_bandwidth "
    f"is 0.06 s: 0.2 s re-activates an initialised engine [{REFERENCES} #vllm-sleep-mode]; level-1 wake ≈ 0.3 s on "
    f"H100 [{REFERENCES} #dynamo-11233]. A standby bind maps weights already in GPU memory: no copy.",
    "wake_s": "the same fixed part of a level-1 wake as promote_s (0.26 s − 0.06 s copy) "
    f"[{REFERENCES} #vllm-sleep-mode]; a wake adds its shard at load_bandwidth (30B: 0.2 + 2.9 = 3.1 s against "
    "2.85–2.89 s measured).",
    "evict_s": "measured by bench/worker.py (CPU, 2026-12-02): evicting a replica frees its arena pages in "
    "0.17–0.20 ms, flat in model size; on a GPU it is the same bookkeeping (no device work).",
    **_SHARE_SOURCES,
}

_WORKER = "measured by bench/worker.py (real vLLM 0.32 on CPU, 1.05 GB model, 2026-12-02, 3 rounds)"
CPU_SOURCES: dict[str, str] = {
    "storage_bandwidth": f"{_WORKER}: read_gbps 1.30 (page cache dropped); prewarm_gbps 1.35 (104 % of it).",
    "load_bandwidth": f"{_WORKER}: read_hot_gbps 6.46, page cache → process memory (on CPU, host memory is the "
    "device memory; vLLM sleep mode is CUDA-only, so no wake is measured here).",
    "engine_init_s": f"{_WORKER}: promote_cold_s p50 29.28 s (fresh process, weights from disk) minus 1.05 GB at "
    "1.30 GB/s (0.81 s).",
    "prestarted_init_s": f"{_WORKER}: promote_shell_disk_s p50 5.81 s (pre-started shell, weights from disk) minus "
    "0.81 s of read.",
    "promote_s": f"{_WORKER}: promote_warm_s p50 1.59 s (standby engine binds the arena replica; best round 0.84 s).",
    "wake_s": "no sleep mode on CPU: the fixed part of re-activating an initialised engine is taken as the standby "
    f"bind, 1.59 s ({_WORKER}).",
    "evict_s": f"{_WORKER}: evict 0.17–0.20 ms (0.19 ms small model, 0.17 ms large).",
    **_SHARE_SOURCES,
}

CPU_MEASURED = CostModel(
    storage_bandwidth=1.30 * GB,
    load_bandwidth=6.46 * GB,
    engine_init_s=28.47,
    prestarted_init_s=5.00,
    promote_s=1.59,
    wake_s=1.59,
    evict_s=0.00019,
)

COST_TABLES: dict[str, tuple[CostModel, dict[str, str]]] = {
    "gpu-a100": (CostModel(), GPU_SOURCES),
    "cpu-measured": (CPU_MEASURED, CPU_SOURCES),
}
DEFAULT_TABLE = "gpu-a100"
COST_SOURCES = GPU_SOURCES  # the default table's sources


def _entry(name: str, value: float, source: str) -> Cost:
    unit, scale = UNITS[name]
    return Cost(round(value / scale, 6), unit, source)


def cost_table(costs: CostModel, table: str = DEFAULT_TABLE) -> dict[str, Cost]:
    """``{name: Cost(value, unit, source)}``; a value changed from the table's own says so in its source."""
    base, sources = COST_TABLES[table]
    out = {}
    for f in fields(CostModel):
        unit, scale = UNITS[f.name]
        value = getattr(costs, f.name)
        source = sources[f.name]
        if value != getattr(base, f.name):
            source = f"set on the command line (table {table!r} has {getattr(base, f.name) / scale:g} {unit}: {source})"
        out[f.name] = _entry(f.name, value, source)
    return out


def measured_costs(table: str, measured: dict[str, tuple[float, str]]) -> tuple[CostModel, dict[str, Cost]]:
    """A cost model whose entries in ``measured`` (name → (value in SI units, its source)) replace those of
    ``table``; every other entry keeps the table's value and source. Returns the model and its printed table."""
    unknown = sorted(set(measured) - set(UNITS))
    if unknown:
        raise ValueError(f"not a cost entry: {', '.join(unknown)}")
    costs = table_costs(table, **{name: value for name, (value, _) in measured.items()})
    sources = COST_TABLES[table][1]
    return costs, {
        f.name: _entry(f.name, getattr(costs, f.name), measured[f.name][1] if f.name in measured else sources[f.name])
        for f in fields(CostModel)
    }


def table_costs(table: str, **changes: float) -> CostModel:
    if table not in COST_TABLES:
        raise ValueError(f"unknown cost table {table!r}; choose from {', '.join(COST_TABLES)}")
    return replace(COST_TABLES[table][0], **changes)


# ----------------------------------------------------------------------------------------- mechanisms
COLD, FAST_COLD, PRESTARTED_COLD, PROMOTE, WAKE = "cold", "fast-cold", "prestarted-cold", "promote", "wake"
PRESTARTED_WARM = "prestarted-warm"
ALL_MECHANISMS: tuple[str, ...] = (COLD, FAST_COLD, PRESTARTED_COLD, PROMOTE, PRESTARTED_WARM, WAKE)

_WARMSERVE = frozenset({PROMOTE, PRESTARTED_WARM, PRESTARTED_COLD})
MECHANISMS: dict[str, frozenset[str]] = {
    "warmserve": _WARMSERVE,
    "warmserve-noproactive": _WARMSERVE,
    "warmserve-noplacement": _WARMSERVE,
    "warmserve-noforecast": _WARMSERVE,
    "reactive-cold": frozenset({COLD}),
    "reactive-fast": frozenset({FAST_COLD}),
    # One sleeping engine per model; further engines start in a pre-started process (llm-d FMA's launchers
    # pre-import vLLM) from storage, as WarmServe's own starts without a replica do.
    "sleep-wake": frozenset({WAKE, PRESTARTED_COLD}),
    "gpu-share": frozenset(),  # static: every engine runs from t = 0
    "dedicated": frozenset(),
}


def start_cost(mechanism: str, shard_bytes: float, costs: CostModel) -> float:
    """Seconds a start by ``mechanism`` takes for a model of ``shard_bytes`` per GPU (TP ranks load in parallel),
    excluding any wait for a load already under way (a promotion from a replica still loading)."""
    if mechanism == COLD:
        return shard_bytes / costs.storage_bandwidth + costs.engine_init_s
    if mechanism == FAST_COLD:
        return shard_bytes / costs.load_bandwidth + costs.prestarted_init_s
    if mechanism == PRESTARTED_COLD:
        return shard_bytes / costs.storage_bandwidth + costs.prestarted_init_s
    if mechanism == PROMOTE:
        return costs.promote_s
    if mechanism == PRESTARTED_WARM:
        return costs.prestarted_init_s
    if mechanism == WAKE:
        return shard_bytes / costs.load_bandwidth + costs.wake_s
    raise ValueError(f"unknown mechanism {mechanism!r}")


def load_seconds(mechanism: str, shard_bytes: float, costs: CostModel) -> float:
    """The part of `start_cost` that occupies the GPU's load link (the rest is engine work)."""
    if mechanism in (COLD, PRESTARTED_COLD):
        return shard_bytes / costs.storage_bandwidth
    if mechanism in (FAST_COLD, WAKE):
        return shard_bytes / costs.load_bandwidth
    return 0.0
