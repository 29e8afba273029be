"""Discrete-event, trace-driven simulation of one serving policy on one scenario.

The dynamic policies drive the very objects the operator uses (`WarmServePolicy`, `ClusterState`, the
forecasters): the simulator only adds time, a router and a cost model.

Model of the serving path (kept deliberately simple and written down):

* **Router.** One FIFO queue per model; requests are held, never rejected, while no engine has a free
  batch slot (no 503). A request goes to the least-loaded serving engine with fewer than its batch limit.
* **Engine.** Continuous batching up to ``max_batch`` requests. Prefills are compute-bound, so a GPU
  runs them one after another: a request's first token comes when its prefill finishes, after the
  prefills dispatched before it to any engine on the same GPUs. It then holds its slot for output ×
  decode. Decode steps do not slow prefills down (no further batch interference is modelled).
* **Co-located engines** (``gpu-share`` only) follow from the same two facts, with no extra parameter:
  their prefills queue on the shared GPUs' compute like any others, and decoding, bound by memory
  bandwidth because every step reads all the weights, shares each GPU's bandwidth among the busy engines
  in proportion to the weight bytes each reads per step.
* **Loads.** Each GPU has one load link; loads to a GPU queue on it and a TP replica loads its shards in
  parallel. WarmServe prewarms from storage (``storage_bandwidth``: this repository's worker reads the
  checkpoint files); a start pays what its mechanism costs (`warmserve.sim.costs.MECHANISMS`), evictions
  included (``evict_s`` each).
* **Cost.** ``gpu_hours`` counts every GPU that holds anything (an engine, a warm replica or one loading);
  ``gpu_hours_engines`` only the GPUs running engines.
* **Control.** Every ``tick_s`` the autoscaler sees each model's concurrency (in flight + queued) averaged
  over the last ``scale_window_s`` and engines lend idle KV space (proactive prewarming); every
  ``placement_s`` the placement runs on the forecast of the current and the next window; at each window
  boundary the window's offered load is appended to the forecaster's history.
* **Start.** Every policy starts as a running system would be: engines for the load of the window just
  before the replay are serving at t = 0 and WarmServe's first placement is already loaded.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from warmserve.core.autoscaler import EngineView
from warmserve.core.cluster import ClusterState, EnginePhase, Gpu, Instance, Promotion, StartSource, WarmReplica
from warmserve.core.forecast import make_forecaster
from warmserve.core.load import offered_concurrency, window_load
from warmserve.core.placement import engines_needed
from warmserve.core.policy import EngineLoad, PolicyParams, StepInput, WarmServePolicy
from warmserve.core.standby import standby_replicas
from warmserve.core.types import Demand, ModelProfile
from warmserve.sim.costs import (
    COLD,
    FAST_COLD,
    MECHANISMS,
    PRESTARTED_COLD,
    PRESTARTED_WARM,
    PROMOTE,
    WAKE,
    CostModel,
    load_seconds,
    start_cost,
)
from warmserve.sim.scenarios import Scenario
from warmserve.workload.build import Workload

POLICIES: tuple[str, ...] = (
    "warmserve",
    "warmserve-noproactive",
    "warmserve-noplacement",
    "warmserve-noforecast",  # placement from the last window's load instead of the forecast
    "reactive-cold",  # vLLM autoscaled from zero: weights from storage, full engine initialisation
    "reactive-fast",  # ServerlessLLM-like: weights from a host-memory tier, pre-started processes
    "sleep-wake",  # vLLM sleep mode (AIBrix, llm-d): one sleeping engine per model, woken on demand
    "gpu-share",  # MuxServe-like static co-location
    "dedicated",  # static peak provisioning
)
ALIASES: dict[str, str] = {"autoscale": "reactive-fast"}  # the old name of the ServerlessLLM-like baseline
REACTIVE: frozenset[str] = frozenset({"reactive-cold", "reactive-fast", "sleep-wake"})
DYNAMIC: frozenset[str] = REACTIVE | {
    "warmserve",
    "warmserve-noproactive",
    "warmserve-noplacement",
    "warmserve-noforecast",
}

INITIAL_STATES: tuple[str, ...] = ("empty", "steady")

_READY, _DONE, _LOADED, _TICK = range(4)  # event kinds (arrivals are merged in from the sorted trace)


def policy_params(name: str) -> PolicyParams:
    """`PolicyParams` of a dynamic policy (the static baselines have none)."""
    if name in ("warmserve", "warmserve-noforecast"):  # noforecast differs in its forecaster only (`run`)
        return PolicyParams()
    if name == "warmserve-noproactive":
        return PolicyParams(proactive=False)
    if name == "warmserve-noplacement":
        return PolicyParams(evict_aware=False)
    if name in REACTIVE:
        return PolicyParams(prewarm=False, proactive=False)
    raise ValueError(f"{name!r} is not a dynamic policy")


@dataclass
class _Engine:
    iid: int
    model: int
    ready_at: float
    gpus: tuple[Gpu, ...]
    batch_limit: int
    phase: EnginePhase = EnginePhase.STARTING
    in_flight: int = 0
    kv_in_use: int = 0  # bytes per GPU
    recent_in_flight: deque = field(default_factory=lambda: deque(maxlen=10))  # per tick, the last 10
    recent_kv: deque = field(default_factory=lambda: deque(maxlen=10))  # KV bytes in use, per tick
    load: EngineLoad | None = None  # the last one handed to the core (frozen: reused while it is unchanged)
    neighbours: tuple[int, ...] = ()  # co-located engines (GPU sharing)


@dataclass(frozen=True)
class StartRecord:
    """One engine start: the mechanism it used and when its own work began (after any load it waited for)."""

    model: int
    mechanism: str
    begin: float
    ready: float
    evicted: int = 0  # warm replicas evicted to make room (each pays ``evict_s``)


@dataclass
class SimResult:
    policy: str
    ttft: np.ndarray  # per request, seconds (unserved requests: time until the simulation ended)
    model_idx: np.ndarray
    unserved: int
    gpu_seconds: float
    starts: dict[StartSource, int]
    prewarm_loaded_bytes: float
    wasted_prewarm_bytes: float
    evictions: dict[str, int]
    lent_replicas: int = 0  # replicas prewarmed into KV space a running engine lent
    lent_hits: int = 0  # engines promoted from such a replica
    gpu_seconds_engines: float = 0.0  # GPU time of engines only (``gpu_seconds`` adds warm-only GPUs)
    start_log: list[StartRecord] = field(default_factory=list)
    host_bytes_asleep_peak: float = 0.0  # sleep-wake: most host memory held by sleeping engines at once

    def summary(self, slo_s: float) -> dict:
        ttft = self.ttft
        promotions = sum(self.starts.values())
        return {
            "requests": int(ttft.size),
            "unserved": self.unserved,
            "ttft_p50_s": float(np.percentile(ttft, 50)),
            "ttft_p95_s": float(np.percentile(ttft, 95)),
            "ttft_p99_s": float(np.percentile(ttft, 99)),
            "ttft_p999_s": float(np.percentile(ttft, 99.9)),
            "ttft_mean_s": float(ttft.mean()),
            "ttft_under_100ms": float(np.mean(ttft < 0.1)),
            "slo_attainment": float(np.mean(ttft <= slo_s)),
            "gpu_hours": self.gpu_seconds / 3600.0,
            "gpu_hours_engines": self.gpu_seconds_engines / 3600.0,
            "engine_starts": {str(source): n for source, n in self.starts.items()},
            "starts_by_mechanism": {
                mechanism: sum(1 for r in self.start_log if r.mechanism == mechanism)
                for mechanism in sorted({r.mechanism for r in self.start_log})
            },
            "start_s_mean": float(np.mean([r.ready - r.begin for r in self.start_log])) if self.start_log else 0.0,
            "host_gb_asleep_peak": self.host_bytes_asleep_peak / 1e9,
            "prewarm_hit_rate": (self.starts.get(StartSource.HIT, 0) / promotions) if promotions else 0.0,
            "prewarm_loaded_gb": self.prewarm_loaded_bytes / 1e9,
            "wasted_prewarm_gb": self.wasted_prewarm_bytes / 1e9,
            "evictions": dict(self.evictions),
            "lent_kv_replicas": self.lent_replicas,
            "lent_kv_promotions": self.lent_hits,
        }


@dataclass
class _Loading:
    start: float
    end: float


@dataclass
class Simulation:
    scenario: Scenario
    workload: Workload
    policy: str
    costs: CostModel = field(default_factory=CostModel)
    forecaster: str = "csp"
    tick_s: float = 0.5
    placement_s: float = 5.0
    scale_window_s: float = 5.0
    drain_s: float = 600.0
    check_invariants: bool = False  # re-verify the cluster ledger on every control tick (tests)
    initial: str = "empty"  # "empty": no engine at t = 0 (the paper's protocol); "steady": a running system
    # WarmServe's standby engines per node (`core.standby`, as the operator plans them; each is ready
    # `prestarted_init_s` after it is chosen); None: one per GPU, what a GPU pool runs at no arena cost
    standby_per_node: int | None = None

    def __post_init__(self) -> None:
        if self.initial not in INITIAL_STATES:
            raise ValueError(f"unknown initial state {self.initial!r}; choose from {', '.join(INITIAL_STATES)}")
        self.policy = ALIASES.get(self.policy, self.policy)
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose from {', '.join(POLICIES)}")
        self.profiles: list[ModelProfile] = list(self.scenario.models)
        if len(self.profiles) != self.workload.spec.n_models:
            raise ValueError("the workload and the scenario disagree on the number of models")
        self.names = [p.name for p in self.profiles]
        self._prepare_load_history()

    # ------------------------------------------------------------------ inputs
    def _prepare_load_history(self) -> None:
        """Per model, (avg, peak) offered concurrency per window over the history and the replay."""
        wl = self.workload
        mean_in = float(wl.input_tokens.mean()) if wl.input_tokens.size else 0.0
        mean_out = float(wl.output_tokens.mean()) if wl.output_tokens.size else 0.0
        replay_s = wl.spec.replay_s
        offset = wl.history_offset_s
        counts = np.zeros((len(self.profiles), replay_s))
        seconds = np.minimum(wl.arrival_s.astype(np.int64), replay_s - 1)
        np.add.at(counts, (wl.model_idx, seconds), 1.0)
        self.window_s = self.scenario.window_s
        self.first_window = offset // self.window_s
        self.avg_hist, self.peak_hist = [], []
        for m, profile in enumerate(self.profiles):
            rate = np.concatenate([wl.history_rate[m, :offset], counts[m]])
            conc = offered_concurrency(rate, profile.service_time(round(mean_in), round(mean_out)))
            avg, peak = window_load(conc, self.window_s)
            self.avg_hist.append(avg)
            self.peak_hist.append(peak)
        self.period = 86400 // self.window_s

    def _forecast(self, model: int, window: int, known: int) -> Demand:
        """Forecast of ``window`` using only windows before ``known``."""
        avg = self.avg_hist[model][:known].copy()
        peak = self.peak_hist[model][:known].copy()
        pad = window + 1 - known
        if pad > 0:
            avg = np.concatenate([avg, np.full(pad, np.nan)])
            peak = np.concatenate([peak, np.full(pad, np.nan)])
        return Demand(
            max(self._predictor.predict(avg, window, self.period), 0.0),
            max(self._predictor.predict(peak, window, self.period), 0.0),
        )

    # --------------------------------------------------------------------- run
    def run(self, progress: Callable[[float], None] | None = None) -> SimResult:
        # the noforecast ablation places for the load of the last closed window (the `last` forecaster)
        self._predictor = make_forecaster("last" if self.policy == "warmserve-noforecast" else self.forecaster)
        wl = self.workload
        self.now = 0.0
        self._seq = 0
        self._events: list = []
        self._queues: list[deque[int]] = [deque() for _ in self.profiles]
        self._engines: dict[int, _Engine] = {}
        self._ttft = np.full(wl.arrival_s.size, np.nan)
        self._samples: list[deque[float]] = [
            deque(maxlen=max(1, round(self.scale_window_s / self.tick_s))) for _ in self.profiles
        ]
        self._starts: dict[StartSource, int] = dict.fromkeys(StartSource, 0)
        self._gpu_seconds = 0.0
        self._gpu_seconds_engines = 0.0
        self._held = (0, 0)  # (GPUs holding anything, GPUs running engines), recomputed when ``_dirty``
        self._dirty = True
        self._start_log: list[StartRecord] = []
        self._promotion_evictions = 0  # replicas evicted for the promotion being booked
        # sleep-wake: model → when its sleeping engine can be woken (absent: no sleeping engine)
        self._asleep: dict[int, float] = dict.fromkeys(range(len(self.profiles)), 0.0)
        self._host_asleep_peak = 0.0
        self._last_account = 0.0
        self._loaded_bytes = 0.0
        self._wasted_bytes = 0.0
        self._loading: dict[int, _Loading] = {}
        self._evictions: dict[str, int] = {}
        self._prewarmed: set[int] = set()  # replicas that prewarming loaded (not left by stopped engines)
        self._lent: set[int] = set()  # replicas placed in space a running engine lent
        self._lent_hits = 0
        self._standby: dict[int, float] = {}  # replica id → when its standby engine is ready
        self._standby_n = (
            max(n.gpus for n in self.scenario.nodes) if self.standby_per_node is None else self.standby_per_node
        )
        self._link_free: dict[Gpu, float] = {}
        self._compute_free: dict[Gpu, float] = {}  # when each GPU's compute has run the prefills queued on it
        self._end_of_replay = float(wl.spec.replay_s)
        self._demand_cache: dict[int, dict[str, Demand]] = {}
        self._serving: list[list[_Engine]] | None = None  # per model, its serving engines (None: rebuild)
        self._precompute_requests()

        dynamic = self.policy in DYNAMIC
        if self.policy == "sleep-wake":
            self._note_host_asleep()
        if dynamic:
            self.state = ClusterState(self.scenario.nodes)
            self.core = WarmServePolicy({p.name: p for p in self.profiles}, policy_params(self.policy))
            self._start_running_system()
            self._push(self.tick_s, _TICK, None)
        elif self.policy == "dedicated":
            self._start_dedicated()
        else:
            self._start_gpu_share()

        arrivals = wl.arrival_s
        times: list[float] = self._arrival
        owners: list[int] = self._model
        queues = self._queues
        events = self._events
        heappop = heapq.heappop
        advance, dispatch, handle = self._advance, self._dispatch, self._handle
        n = len(times)
        i = 0
        next_progress = 0.0 if progress is not None else math.inf
        step = self._end_of_replay / 100
        horizon = self._end_of_replay + self.drain_s
        inf = math.inf
        while True:
            t_event = events[0][0] if events else inf
            t_arrival = times[i] if i < n else inf
            if t_arrival <= t_event:
                if t_arrival == inf:
                    break
                advance(t_arrival)
                m = owners[i]
                queues[m].append(i)
                i += 1
                dispatch(m)
            else:
                if t_event > horizon:
                    break
                event = heappop(events)
                advance(t_event)
                handle(event, dynamic, i >= n)
            if self.now >= next_progress:
                assert progress is not None
                progress(min(self.now / self._end_of_replay, 1.0))
                next_progress += step
        if progress is not None:
            progress(1.0)
        unserved = np.isnan(self._ttft)
        self._ttft[unserved] = horizon - arrivals[unserved]
        return SimResult(
            policy=self.policy,
            ttft=self._ttft,
            model_idx=wl.model_idx.copy(),
            unserved=int(unserved.sum()),
            gpu_seconds=self._gpu_seconds,
            starts=self._starts,
            prewarm_loaded_bytes=self._loaded_bytes,
            wasted_prewarm_bytes=self._wasted_bytes,
            evictions=dict(self._evictions),
            lent_replicas=len(self._lent),
            lent_hits=self._lent_hits,
            gpu_seconds_engines=self._gpu_seconds_engines,
            start_log=self._start_log,
            host_bytes_asleep_peak=self._host_asleep_peak,
        )

    def _precompute_requests(self) -> None:
        """Per request, as Python scalars: arrival, model, prefill time alone on its GPUs, decode time alone,
        and KV bytes per GPU. Computed once with numpy, element by element the same IEEE operations as
        `ModelProfile.prefill_time` and the decode and KV formulas, so the results are bit-identical."""
        wl = self.workload
        m = wl.model_idx
        tokens_in, tokens_out = wl.input_tokens.astype(np.int64), wl.output_tokens.astype(np.int64)
        prefill_s = np.array([p.prefill_s for p in self.profiles], dtype=np.float64)
        ref = np.array([p.prefill_ref_tokens for p in self.profiles], dtype=np.float64)
        decode = np.array([p.decode_s_per_token for p in self.profiles], dtype=np.float64)
        kv_token = np.array([p.kv_bytes_per_token for p in self.profiles], dtype=np.int64)
        tp = np.array([p.tp for p in self.profiles], dtype=np.int64)
        self._arrival: list[float] = wl.arrival_s.astype(np.float64).tolist()
        self._model: list[int] = m.astype(np.int64).tolist()
        self._prefill: list[float] = (prefill_s[m] * tokens_in.astype(np.float64) / ref[m]).tolist()
        self._decode: list[float] = (tokens_out.astype(np.float64) * decode[m]).tolist()
        self._kv: list[int] = ((tokens_in + tokens_out) * kv_token[m] // tp[m]).tolist()

    def _push(self, when: float, kind: int, payload) -> None:
        self._seq += 1
        heapq.heappush(self._events, (when, self._seq, kind, payload))

    def _advance(self, when: float) -> None:
        """Move the clock, charging GPU time during the replay span: every GPU holding anything, and apart
        the GPUs running engines (co-located engines share GPUs, counted once)."""
        start, end = self._last_account, min(when, self._end_of_replay)
        if end > start:
            if self._dirty:
                engines = {g for e in self._engines.values() for g in e.gpus}
                held = engines
                if hasattr(self, "state"):
                    held = engines | {g for g, used in self.state.used_by_gpu().items() if used > 0}
                self._held = (len(held), len(engines))
                self._dirty = False
            self._gpu_seconds += self._held[0] * (end - start)
            self._gpu_seconds_engines += self._held[1] * (end - start)
            self._last_account = end
        self.now = when

    def _handle(self, event: tuple, dynamic: bool, arrivals_done: bool) -> None:
        kind = event[2]
        if kind == _DONE:  # (time, seq, _DONE, engine id, KV bytes): no payload tuple per request
            engine = self._engines.get(event[3])
            if engine is None:
                return
            kv = event[4]
            engine.in_flight -= 1
            engine.kv_in_use -= kv
            if engine.phase == EnginePhase.DRAINING and engine.in_flight == 0:
                self._stop(engine)
            else:
                self._dispatch(engine.model)
            return
        payload = event[3]
        if kind == _READY:
            engine = self._engines.get(payload)
            if engine is not None and engine.phase == EnginePhase.STARTING:
                engine.phase = EnginePhase.SERVING
                self._serving = None
                if dynamic:
                    self.state.instances[engine.iid].phase = EnginePhase.SERVING
                self._dispatch(engine.model)
        elif kind == _LOADED:
            loading = self._loading.pop(payload, None)
            if loading is not None and payload in self.state.replicas:
                self.state.mark_warm(payload)
        elif kind == _TICK:
            self._control()
            idle = arrivals_done and not any(self._queues) and not any(e.in_flight for e in self._engines.values())
            if not idle:
                self._push(self.now + self.tick_s, _TICK, None)

    # ----------------------------------------------------------------- routing
    def _serving_engines(self) -> list[list[_Engine]]:
        """Per model, its serving engines (rebuilt after any engine changes phase, starts or stops)."""
        serving: list[list[_Engine]] = [[] for _ in self.profiles]
        for e in self._engines.values():
            if e.phase == EnginePhase.SERVING:
                serving[e.model].append(e)
        self._serving = serving
        return serving

    def _dispatch(self, m: int) -> None:
        queue = self._queues[m]
        if not queue:
            return
        serving = (self._serving or self._serving_engines())[m]
        if not serving:
            return
        compute_free = self._compute_free
        ttft, arrival, prefill, decode, kvs = self._ttft, self._arrival, self._prefill, self._decode, self._kv
        events = self._events
        now = self.now
        while queue:
            # the least-loaded engine, ties to the lowest id (a unique key: the list's order does not matter)
            engine = serving[0]
            for e in serving:
                if e.in_flight < engine.in_flight or (e.in_flight == engine.in_flight and e.iid < engine.iid):
                    engine = e
            if engine.in_flight >= engine.batch_limit:
                return
            r = queue.popleft()
            gpus = engine.gpus
            start = now
            for g in gpus:
                free = compute_free.get(g, 0.0)
                if free > start:
                    start = free
            if engine.neighbours:
                first_token = start + prefill[r] * self._prefill_slowdown(engine)
            else:  # alone on its GPUs: the slowdown is exactly 1.0
                first_token = start + prefill[r]
            for g in gpus:
                compute_free[g] = first_token
            ttft[r] = first_token - arrival[r]
            kv = kvs[r]
            engine.in_flight += 1
            engine.kv_in_use += kv
            if engine.neighbours:
                done = first_token + decode[r] * self._decode_slowdown(engine)
            else:
                done = first_token + decode[r]
            self._seq += 1
            heapq.heappush(events, (done, self._seq, _DONE, engine.iid, kv))

    def _prefill_slowdown(self, engine: _Engine) -> float:
        """How much slower a prefill runs while co-located engines decode (their kernels take SMs)."""
        busy = sum(1 for n in engine.neighbours if self._engines[n].in_flight > 0)
        return 1.0 + self.costs.share_contention * busy

    def _decode_slowdown(self, engine: _Engine) -> float:
        """How much slower ``engine`` decodes while co-located engines decode too (1 when alone).

        A decode step reads the engine's weights; on a GPU whose memory bandwidth is shared, it takes as
        long as reading the weights of every busy engine there. The busiest GPU of the group sets the pace.
        """
        if not engine.neighbours:
            return 1.0
        shard = self.profiles[engine.model].shard_bytes
        busy = [self._engines[n] for n in engine.neighbours if self._engines[n].in_flight > 0]
        return max(
            (shard + sum(self.profiles[other.model].shard_bytes for other in busy if g in other.gpus)) / shard
            for g in engine.gpus
        )

    # ----------------------------------------------------------- control loop
    def _control(self) -> None:
        """One control tick: the core's step, with this simulator as its `StepEffects`."""
        if self.check_invariants:
            self.state.check_invariants()
        in_flight = [0] * len(self.profiles)
        for e in self._engines.values():
            in_flight[e.model] += e.in_flight
        for m, samples in enumerate(self._samples):
            samples.append(in_flight[m] + len(self._queues[m]))
        window = self.first_window + int(self.now // self.window_s)
        place = self.core.params.prewarm and self.now % self.placement_s < self.tick_s / 2
        self.core.standby_ready = frozenset(rid for rid, ready in self._standby.items() if ready <= self.now)
        self.core.step(self.state, self._step_input(self._demand(window) if place else None), self)
        if place:
            self._plan_standby()

    def _plan_standby(self) -> None:
        """The standby engines the operator plans after a placement round (`core.standby`, keeping the ones
        chosen before): a newly chosen replica's engine is ready `prestarted_init_s` later (initialised in a
        pre-started process, no weights); one no longer chosen is stopped."""
        chosen = standby_replicas(self.state, self.core.scores, self._standby_n, self._standby)
        ready = self.now + self.costs.prestarted_init_s
        self._standby = {rid: self._standby.get(rid, ready) for rid in chosen}

    def _step_input(self, demand: dict[str, Demand] | None, scale: bool = True) -> StepInput:
        """What the control step sees; KV lending is sized on each engine's peak over the autoscaler window,
        so lent space does not flap."""
        engine_loads = {}
        engines: dict[str, list[EngineView]] = {name: [] for name in self.names}
        names = self.names
        for e in self._engines.values():
            e.recent_in_flight.append(e.in_flight)
            e.recent_kv.append(e.kv_in_use)
            in_flight, kv = max(e.recent_in_flight), max(e.recent_kv)
            last = e.load
            if last is None or last.in_flight != in_flight or last.kv_in_use != kv:
                last = e.load = EngineLoad(in_flight, kv)
            engine_loads[e.iid] = last
            if e.phase != EnginePhase.DRAINING:
                engines[names[e.model]].append(EngineView(e.iid, e.ready_at, e.in_flight))
        load = {name: sum(self._samples[m]) / max(len(self._samples[m]), 1) for m, name in enumerate(self.names)}
        return StepInput(self.now, load, engines, engine_loads, demand, scale=scale)

    def _demand(self, window: int) -> dict[str, Demand]:
        """Forecast of the current window and the next (prewarming must be ready before a burst).

        It depends on the window only (the forecasters are pure and the load history is fixed before the
        run), so it is computed once per window, not at every placement."""
        cached = self._demand_cache.get(window)
        if cached is not None:
            return cached
        demand = {}
        for m, name in enumerate(self.names):
            now = self._forecast(m, window, window)
            ahead = self._forecast(m, window + 1, window)
            demand[name] = Demand(max(now.avg, ahead.avg), max(now.peak, ahead.peak))
        self._demand_cache[window] = demand
        return demand

    # ------------------------------------------------------ loads and engines

    # StepEffects: what the simulator adds to the core's bookkeeping
    def evicting(self, replica: WarmReplica, reason: str) -> None:
        """A replica is dropped before promotion: the bytes prewarming had loaded into it were wasted.

        Weights left behind by a stopped engine cost no prewarm load, so dropping them wastes nothing; an
        unfinished load is cancelled and frees its link.
        """
        rid = replica.rid
        self._dirty = True
        self._standby.pop(rid, None)
        if reason == "promotion":
            self._promotion_evictions += 1
        prewarmed = rid in self._prewarmed
        self._prewarmed.discard(rid)
        total = replica.bytes_per_gpu * replica.group.size
        loaded = float(total)
        loading = self._loading.pop(rid, None)
        if loading is not None:
            span = max(loading.end - loading.start, 1e-12)
            loaded = total * min(max((self.now - loading.start) / span, 0.0), 1.0)
            self._loaded_bytes -= total - loaded
            for g in self.state.gpus_of(replica.group):
                if self._link_free.get(g) == loading.end:
                    self._link_free[g] = self.now
        if prewarmed:
            self._wasted_bytes += loaded
        self._evictions[reason] = self._evictions.get(reason, 0) + 1

    def added(self, replica: WarmReplica, score: float) -> None:
        """A new replica starts loading from storage: its shards queue on their GPUs' links, in parallel across
        the group."""
        self._dirty = True
        gpus = self.state.gpus_of(replica.group)
        start = max([self.now] + [self._link_free.get(g, 0.0) for g in gpus])
        end = start + replica.bytes_per_gpu / self.costs.storage_bandwidth
        for g in gpus:
            self._link_free[g] = end
        self._loading[replica.rid] = _Loading(start, end)
        self._prewarmed.add(replica.rid)
        if any(self.state.engine_on(g) is not None for g in gpus):
            self._lent.add(replica.rid)
        self._loaded_bytes += replica.bytes_per_gpu * replica.group.size
        self._push(end, _LOADED, replica.rid)

    def draining(self, instance: Instance) -> None:
        engine = self._engines[instance.iid]
        engine.phase = EnginePhase.DRAINING
        self._serving = None
        if engine.in_flight == 0:
            self._stop(engine)

    def started(self, promotion: Promotion) -> None:
        """Time the new engine by the mechanism of the policy's system (`warmserve.sim.costs.MECHANISMS`).

        WarmServe: a hit binds the replica's standby engine when one is ready (``promote``), else an engine is
        initialised in a pre-started process on the replica's weights (``prestarted-warm``); a replica still
        loading does so when its load ends; without a replica the weights are read from storage into a
        pre-started engine. The reactive
        baselines start cold (from storage, fresh process; or from host memory, pre-started process);
        sleep-wake wakes the model's sleeping engine when it has one, else starts like WarmServe without a
        replica (storage, pre-started process). Every replica the promotion evicted adds ``evict_s``.
        """
        self._dirty = True
        instance = promotion.instance
        m = self.names.index(instance.model)
        profile = self.profiles[m]
        gpus = self.state.gpus_of(instance.group)
        begin = self.now
        if promotion.consumed is not None:
            rid = promotion.consumed.rid
            self._prewarmed.discard(rid)
            if rid in self._lent:
                self._lent_hits += 1
            loading = self._loading.pop(rid, None)
            begin = max(self.now, loading.end if loading else self.now)
            # the worker binds a standby engine that is ready when the replica is warm, else starts one
            mechanism = PROMOTE if self._standby.pop(rid, math.inf) <= begin else PRESTARTED_WARM
        elif self.policy == "reactive-cold":
            mechanism = COLD
        elif self.policy == "reactive-fast":
            mechanism = FAST_COLD
        elif self.policy == "sleep-wake":
            mechanism = PRESTARTED_COLD
            if m in self._asleep:
                mechanism = WAKE
                begin = max(self.now, self._asleep.pop(m))  # a sleep still copying out finishes first
        else:
            mechanism = PRESTARTED_COLD
        assert mechanism in MECHANISMS[self.policy], (self.policy, mechanism)
        link = load_seconds(mechanism, profile.shard_bytes, self.costs)
        if link:
            for g in gpus:
                self._link_free[g] = max(self._link_free.get(g, 0.0), begin + link)
        evicted, self._promotion_evictions = self._promotion_evictions, 0
        ready = begin + start_cost(mechanism, profile.shard_bytes, self.costs) + evicted * self.costs.evict_s
        self._start_log.append(StartRecord(m, mechanism, begin, ready, evicted))
        self._starts[promotion.source] += 1
        engine = _Engine(instance.iid, m, ready, tuple(gpus), profile.max_batch)
        self._engines[engine.iid] = engine
        self._push(ready, _READY, engine.iid)

    def _stop(self, engine: _Engine) -> None:
        self._dirty = True
        self._serving = None
        del self._engines[engine.iid]
        if self.policy in ("dedicated", "gpu-share"):
            return
        replica = self.state.stop_instance(engine.iid)
        if self.policy in REACTIVE:  # no warm replicas: the GPUs are released
            self.state.evict(replica.rid)
        if self.policy == "sleep-wake" and engine.model not in self._asleep:
            # The model's last sleeping engine: its weights are copied out to host memory at load_bandwidth,
            # holding the GPUs meanwhile (charged here; the group is booked free at once).
            shard = self.profiles[engine.model].shard_bytes
            sleep_s = shard / self.costs.load_bandwidth
            self._asleep[engine.model] = self.now + sleep_s
            held = max(min(self.now + sleep_s, self._end_of_replay) - self.now, 0.0)  # within the replay only
            self._gpu_seconds += held * len(engine.gpus)
            self._gpu_seconds_engines += held * len(engine.gpus)
            self._note_host_asleep()

    def _note_host_asleep(self) -> None:
        """Track the host memory sleeping engines hold (their whole weights)."""
        held = sum(self.profiles[m].weight_bytes for m in self._asleep)
        self._host_asleep_peak = max(self._host_asleep_peak, float(held))

    def _start_running_system(self) -> None:
        """The dynamic policies' state at t = 0.

        ``empty`` (the paper's protocol): no engine runs; WarmServe's placement for the first window is
        already loaded, since the forecast is known ahead of time. ``steady``: engines for the load of the
        window before the replay are serving too, as in a system that has been running for a while.
        """
        if self.initial == "steady":
            before = self.first_window - 1
            for m, profile in enumerate(self.profiles):
                load = float(np.nan_to_num(self.avg_hist[m][before]))
                for _ in range(engines_needed(load, profile, self.core.params.autoscaler.upper)):
                    if self.core.start_engine(self.state, profile.name, self.now, self) is None:
                        break
            self._serving = None
            for engine in self._engines.values():
                engine.phase = EnginePhase.SERVING
                engine.ready_at = -self.core.params.autoscaler.protection_s
                self.state.instances[engine.iid].phase = EnginePhase.SERVING
        self._starts = dict.fromkeys(StartSource, 0)
        self._start_log.clear()
        self._link_free.clear()
        if self.core.params.prewarm:
            self.core.step(self.state, self._step_input(self._demand(self.first_window), scale=False), self)
            for rid in list(self._loading):
                self.state.mark_warm(rid)
            self._loading.clear()
            self._link_free.clear()
        self._events.clear()

    # -------------------------------------------------------- static policies
    def _peak_engines(self) -> list[int]:
        """Engines per model for the highest peak seen in the history (static peak provisioning).

        Peak provisioning needs a history: without one (``history_days=0``) or for a model whose history
        holds no valid window, it refuses with a ValueError rather than guess a size.
        """
        upper = 0.8
        history_windows = self.first_window
        if history_windows == 0:
            raise ValueError("dedicated provisions each model for its history's peak: the workload has no history")
        wanted = []
        for m, profile in enumerate(self.profiles):
            history = self.peak_hist[m][:history_windows]
            if np.isnan(history).all():
                raise ValueError(f"dedicated: model {profile.name!r} has no valid window in its history to size for")
            wanted.append(max(1, engines_needed(float(np.nanmax(history)), profile, upper)))
        return wanted

    def _start_dedicated(self) -> None:
        """Peak provisioning: engines for each model's history peak; when the cluster is too small, models
        take turns (largest need first) so each gets as close to its share as the GPUs allow."""
        wanted = self._peak_engines()
        free = {n: list(range(node.gpus)) for n, node in enumerate(self.scenario.nodes)}
        granted = [0] * len(self.profiles)
        progress = True
        while progress:
            progress = False
            for m in sorted(range(len(self.profiles)), key=lambda k: (granted[k] - wanted[k], -self.profiles[k].tp)):
                if granted[m] >= wanted[m]:
                    continue
                group = self._first_free_group(free, self.profiles[m].tp)
                if group is not None:
                    self._add_static_engine(m, group, self.profiles[m].max_batch)
                    granted[m] += 1
                    progress = True
                    break

    @staticmethod
    def _first_free_group(free: dict[int, list[int]], size: int) -> tuple[Gpu, ...] | None:
        for node, gpus in free.items():
            for start in range(0, max(gpus, default=-1) + 1, size):
                block = list(range(start, start + size))
                if all(g in gpus for g in block):
                    for g in block:
                        gpus.remove(g)
                    return tuple((node, g) for g in block)
        return None

    def _add_static_engine(self, m: int, gpus: tuple[Gpu, ...], batch_limit: int) -> _Engine:
        engine = _Engine(len(self._engines) + 1, m, 0.0, gpus, batch_limit, phase=EnginePhase.SERVING)
        self._engines[engine.iid] = engine
        self._serving = None
        return engine

    def _start_gpu_share(self) -> None:
        """MuxServe-like static co-location over the whole cluster.

        One engine of every model is packed onto the smallest aligned mesh of GPUs that holds all their
        weights while leaving ``share_min_kv_fraction`` of each GPU for KV cache (largest models first,
        each on its least-loaded group), and the cluster is tiled with copies of that mesh, so the baseline
        gets the same GPUs as the others. Each GPU's KV space is split between the engines sharing it in
        proportion to their model's popularity, which caps their batch; co-located engines contend as the
        module docstring describes.
        """
        nodes = self.scenario.nodes
        per_node = nodes[0].gpus
        capacity = nodes[0].gpu_bytes
        order = sorted(range(len(self.profiles)), key=lambda k: (-self.profiles[k].weight_bytes, k))
        gpus_total = per_node * len(nodes)
        mesh = max(p.tp for p in self.profiles)
        while True:
            weights = [0] * mesh
            layout: dict[int, range] = {}
            for m in order:
                tp = self.profiles[m].tp
                best = min((max(weights[s : s + tp]), s) for s in range(0, mesh, tp))[1]  # least loaded, then first
                layout[m] = range(best, best + tp)
                for g in layout[m]:
                    weights[g] += self.profiles[m].shard_bytes
            if max(weights) <= (1 - self.costs.share_min_kv_fraction) * capacity or mesh >= gpus_total:
                break
            mesh *= 2
        shares = self.workload.shares
        mean_tokens = float(self.workload.input_tokens.mean() + self.workload.output_tokens.mean())
        batch = {}
        for m, gpus in layout.items():
            profile = self.profiles[m]
            kv = min(
                max(capacity - weights[g], 0) * shares[m] / sum(shares[k] for k, r in layout.items() if g in r)
                for g in gpus
            )
            per_request = mean_tokens * profile.kv_bytes_per_token / profile.tp
            batch[m] = max(1, int(min(profile.max_batch, kv // max(per_request, 1))))
        for tile in range(gpus_total // mesh):
            engines = {
                m: self._add_static_engine(m, tuple(divmod(tile * mesh + g, per_node) for g in gpus), batch[m])
                for m, gpus in layout.items()
            }
            for m, engine in engines.items():
                engine.neighbours = tuple(
                    other.iid for k, other in engines.items() if k != m and set(other.gpus) & set(engine.gpus)
                )
