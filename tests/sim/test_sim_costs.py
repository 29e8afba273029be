"""The cost table and what each policy pays: every start costs exactly its mechanism's price in the table."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from warmserve.cli import main
from warmserve.sim.costs import (
    COST_TABLES,
    CPU_MEASURED,
    GB,
    MECHANISMS,
    UNITS,
    CostModel,
    cost_table,
    start_cost,
    table_costs,
)
from warmserve.sim.engine import ALIASES, DYNAMIC, POLICIES, Simulation
from warmserve.sim.report import compare, identical_groups
from warmserve.sim.scenarios import paper
from warmserve.workload.build import build_workload

REPO = Path(__file__).resolve().parents[2]
SHORT = dict(replay_s=900, replay_start_s=17 * 3600)


@pytest.fixture(scope="module")
def scenario():
    return paper().with_workload(**SHORT)


@pytest.fixture(scope="module")
def workload(scenario):
    return build_workload(scenario.workload)


def expected_start_s(mechanism: str, shard: float, c: CostModel) -> float:
    """Each mechanism's price written out from the table's entries (independent of `start_cost`)."""
    return {
        "cold": shard / c.storage_bandwidth + c.engine_init_s,
        "fast-cold": shard / c.load_bandwidth + c.prestarted_init_s,
        "prestarted-cold": shard / c.storage_bandwidth + c.prestarted_init_s,
        "promote": c.promote_s,
        "prestarted-warm": c.prestarted_init_s,
        "wake": shard / c.load_bandwidth + c.wake_s,
    }[mechanism]


@pytest.mark.parametrize("table", sorted(COST_TABLES))
@pytest.mark.parametrize("policy", POLICIES)
def test_every_start_pays_exactly_its_mechanism(scenario, workload, policy, table):
    """Property: for each policy and cost table, each start's duration (from when its own work can begin)
    equals the table price of a mechanism of the policy's system, plus ``evict_s`` per replica it evicted."""
    costs = table_costs(table)
    result = Simulation(scenario, workload, policy, costs=costs, check_invariants=True).run()
    assert len(result.start_log) == sum(result.starts.values())
    if policy not in DYNAMIC:
        assert result.start_log == []
        return
    assert result.start_log, policy
    for record in result.start_log:
        assert record.mechanism in MECHANISMS[policy]
        shard = scenario.models[record.model].shard_bytes
        paid = record.ready - record.begin
        price = expected_start_s(record.mechanism, shard, costs) + record.evicted * costs.evict_s
        assert paid == pytest.approx(price, rel=1e-9, abs=1e-9), (policy, record)
        assert price == pytest.approx(start_cost(record.mechanism, shard, costs) + record.evicted * costs.evict_s)


def test_the_mechanisms_of_each_policy():
    assert MECHANISMS["reactive-cold"] == {"cold"}
    assert MECHANISMS["reactive-fast"] == {"fast-cold"}
    assert MECHANISMS["sleep-wake"] == {"wake", "prestarted-cold"}
    for policy in ("warmserve", "warmserve-noproactive", "warmserve-noplacement", "warmserve-noforecast"):
        assert MECHANISMS[policy] == {"promote", "prestarted-warm", "prestarted-cold"}
    assert set(MECHANISMS) == set(POLICIES)


def test_warmserve_prewarms_from_storage(scenario, workload):
    loads = []

    class Recording(Simulation):
        def added(self, replica, score):
            super().added(replica, score)
            loading = self._loading[replica.rid]
            loads.append((replica.bytes_per_gpu, loading.end - loading.start))

    Recording(scenario, workload, "warmserve").run()
    assert loads
    costs = CostModel()
    for bytes_per_gpu, seconds in loads:
        assert seconds == pytest.approx(bytes_per_gpu / costs.storage_bandwidth)


def test_sleep_wake_wakes_the_first_engine_of_each_model(scenario, workload):
    result = Simulation(scenario, workload, "sleep-wake").run()
    first = {}
    for record in result.start_log:
        first.setdefault(record.model, record.mechanism)
    assert set(first.values()) == {"wake"}
    assert result.prewarm_loaded_bytes == 0
    total_weights = sum(m.weight_bytes for m in scenario.models)
    assert 0 < result.host_bytes_asleep_peak <= total_weights


def test_gpu_hours_count_warm_only_gpus(scenario, workload):
    warm = Simulation(scenario, workload, "warmserve").run()
    assert warm.gpu_seconds > warm.gpu_seconds_engines > 0  # GPUs holding only warm replicas count too
    for policy in ("reactive-cold", "reactive-fast", "gpu-share", "dedicated"):
        result = Simulation(scenario, workload, policy).run()
        assert result.gpu_seconds == pytest.approx(result.gpu_seconds_engines), policy
    summary = warm.summary(scenario.ttft_slo_s)
    assert summary["gpu_hours"] == pytest.approx(warm.gpu_seconds / 3600)
    assert summary["gpu_hours_engines"] == pytest.approx(warm.gpu_seconds_engines / 3600)


def test_autoscale_is_the_old_name_of_reactive_fast(scenario, workload):
    assert ALIASES == {"autoscale": "reactive-fast"}
    assert Simulation(scenario, workload, "autoscale").policy == "reactive-fast"


def test_both_tables_give_every_cost_a_value_unit_and_source():
    for table, (costs, sources) in COST_TABLES.items():
        entries = cost_table(costs, table)
        assert set(entries) == set(UNITS) == {f.name for f in dataclasses.fields(CostModel)} == set(sources)
        for name, entry in entries.items():
            assert entry.value >= 0 and entry.unit and len(entry.source) > 30, (table, name)


def test_cpu_table_holds_the_worker_bench_figures():
    assert CPU_MEASURED.storage_bandwidth == 1.30 * GB
    assert CPU_MEASURED.promote_s == 1.59
    # cold 29.28 s and pre-started shell 5.81 s, each minus 1.05 GB read at 1.30 GB/s
    assert CPU_MEASURED.engine_init_s + 1.052353536 / 1.30 == pytest.approx(29.28, abs=0.01)
    assert CPU_MEASURED.prestarted_init_s + 1.052353536 / 1.30 == pytest.approx(5.81, abs=0.01)
    assert 0.00017 <= CPU_MEASURED.evict_s <= 0.00020


def test_gpu_sources_cite_the_references_file():
    references = (REPO / "docs" / "references.md").read_text()
    anchors = set(re.findall(r'<a id="([a-z0-9-]+)"></a>', references))
    _, sources = COST_TABLES["gpu-a100"]
    cited = {a for text in sources.values() for a in re.findall(r"docs/references\.md #([a-z0-9-]+)", text)}
    assert cited and cited <= anchors


def test_a_changed_cost_says_it_was_set_on_the_command_line():
    entries = cost_table(table_costs("gpu-a100", promote_s=1.0), "gpu-a100")
    assert entries["promote_s"].value == 1.0
    assert entries["promote_s"].source.startswith("set on the command line")
    assert not entries["wake_s"].source.startswith("set on the command line")


def test_unknown_table_is_refused():
    with pytest.raises(ValueError, match="unknown cost table"):
        table_costs("tpu")


def test_cli_json_has_the_cost_table(tmp_path):
    out = tmp_path / "out.json"
    argv = ["simulate", "--hours", "0.1", "--policies", "sleep-wake,autoscale", "--costs", "cpu-measured"]
    assert main([*argv, "--json", str(out), "--quiet"]) == 0
    data = json.loads(out.read_text())
    costs = data["scenario"]["costs"]
    assert data["scenario"]["cost_table"] == "cpu-measured"
    assert costs["promote_s"] == {"value": 1.59, "unit": "s", "source": COST_TABLES["cpu-measured"][1]["promote_s"]}
    assert costs["storage_bandwidth"]["unit"] == "GB/s" and costs["storage_bandwidth"]["value"] == 1.3
    assert set(data["policies"]) == {"sleep-wake", "reactive-fast"}
    assert data["scenario"]["mechanisms"] == {"sleep-wake": ["prestarted-cold", "wake"], "reactive-fast": ["fast-cold"]}
    seven_b = data["scenario"]["start_costs_s"]["llama-2-7b-a"]
    assert seven_b["promote"] == 1.59 and seven_b["wake"] == pytest.approx(13.48 / 6.46 + 1.59, abs=1e-3)
    for summary in data["policies"].values():
        assert summary["gpu_hours"] >= summary["gpu_hours_engines"]


def test_dedicated_refuses_a_workload_without_history(scenario):
    none = scenario.with_workload(history_days=0, replay_s=300)
    with pytest.raises(ValueError, match="no history"):
        Simulation(none, build_workload(none.workload), "dedicated").run()


def test_dedicated_refuses_a_model_whose_history_is_all_missing(scenario, workload):
    history = workload.history_rate.astype(float).copy()
    history[2, :] = np.nan
    blind = dataclasses.replace(workload, history_rate=history)
    with pytest.raises(ValueError, match="llama-2-13b"):
        Simulation(scenario, blind, "dedicated").run()


def test_cli_reports_dedicated_without_history_cleanly(capsys):
    code = main(["simulate", "--hours", "0.05", "--policies", "dedicated", "--quiet", "--history-days", "0"])
    assert code == 2
    assert "no history" in capsys.readouterr().err


def test_identical_curves_are_drawn_once_with_every_name(scenario):
    comparison = compare(scenario.with_workload(replay_s=300), ["warmserve", "warmserve-noproactive", "dedicated"])
    groups = identical_groups(comparison.results)
    names = [g[0] for g in groups]
    assert sum(len(n) for n in names) == 3
    if np.array_equal(comparison.results["warmserve"].ttft, comparison.results["warmserve-noproactive"].ttft):
        assert ["warmserve", "warmserve-noproactive"] in names


def test_cli_seeds_report_median_range_and_ratio_to_the_strongest_baseline(tmp_path, capsys):
    out = tmp_path / "seeds.json"
    argv = ["simulate", "--hours", "0.05", "--seeds", "2", "--policies", "warmserve,reactive-fast,dedicated"]
    assert main([*argv, "--json", str(out), "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert data["seeds"] == [0, 1]
    assert set(data["runs"]) == {"0", "1"}
    p99 = data["aggregate"]["warmserve"]["ttft_p99_s"]
    values = [data["runs"][s]["warmserve"]["ttft_p99_s"] for s in ("0", "1")]
    assert p99["min"] == min(values) and p99["max"] == max(values)
    assert p99["median"] == pytest.approx(sum(values) / 2)
    versus = data["warmserve_vs_strongest_baseline"]["ttft_p99_s"]
    best = min(("reactive-fast", "dedicated"), key=lambda b: data["aggregate"][b]["ttft_p99_s"]["median"])
    assert versus["strongest_baseline"] == best
    assert versus["ratio_baseline_over_warmserve"] == pytest.approx(
        data["aggregate"][best]["ttft_p99_s"]["median"] / p99["median"]
    )
    frugal = data["warmserve_vs_strongest_baseline_within_its_gpu_hours"]
    budget = data["aggregate"]["warmserve"]["gpu_hours"]["median"]
    for v in frugal.values():
        assert data["aggregate"][v["strongest_baseline"]]["gpu_hours"]["median"] <= budget * (1 + 1e-9)
    assert "strongest baseline" in capsys.readouterr().out
    assert main([*argv, "--plot", str(tmp_path / "x.png"), "--quiet"]) == 2


def test_a_hit_binds_a_standby_engine_only_when_the_operator_chose_it_long_enough_before(scenario, workload):
    """WarmServe's hits pay `promote` only for replicas `core.standby` chose (as the operator flags them) at
    least `prestarted_init_s` before; other hits pay an engine start in a pre-started process."""
    chosen_at: dict[int, float] = {}
    promoted: list[tuple[int, float, str]] = []

    class Recording(Simulation):
        def _plan_standby(self):
            super()._plan_standby()
            for rid in self._standby:
                chosen_at.setdefault(rid, self.now)

        def started(self, promotion):
            rid = promotion.consumed.rid if promotion.consumed is not None else None
            super().started(promotion)
            if rid is not None:
                promoted.append((rid, self._start_log[-1].begin, self._start_log[-1].mechanism))

    costs = table_costs("gpu-a100")
    result = Recording(scenario, workload, "warmserve", costs=costs).run()
    mechanisms = {m for _, _, m in promoted}
    assert mechanisms == {"promote", "prestarted-warm"}, result.summary(1.0)["starts_by_mechanism"]
    for rid, begin, mechanism in promoted:
        if mechanism == "promote":
            assert rid in chosen_at and chosen_at[rid] + costs.prestarted_init_s <= begin + 1e-9
    none = Simulation(scenario, workload, "warmserve", costs=costs, standby_per_node=0).run()
    assert "promote" not in none.summary(1.0)["starts_by_mechanism"]
