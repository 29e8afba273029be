"""Trace loaders against the full trace files (``trace_root()``; figures from the traces' README)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from warmserve.workload import traces


@pytest.fixture(scope="module")
def root() -> Path:
    try:
        return traces.trace_root()
    except FileNotFoundError as exc:  # where the full traces are not available
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def azure(root: Path) -> np.ndarray:
    return traces.load_azure2024_code_per_second(root)


@pytest.fixture(scope="module")
def servegen(root: Path) -> dict[str, np.ndarray]:
    return traces.load_servegen_aggregate(root)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start index, length) of each run of True."""
    padded = np.concatenate(([False], mask, [False])).astype(int)
    starts = np.flatnonzero(np.diff(padded) == 1)
    ends = np.flatnonzero(np.diff(padded) == -1)
    return [(int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def test_trace_root_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WARMSERVE_TRACES", str(tmp_path))
    assert traces.trace_root() == tmp_path


def test_trace_root_env_pointing_nowhere_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WARMSERVE_TRACES", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="WARMSERVE_TRACES"):
        traces.trace_root()


def test_azure2024_shape_dtype_and_week_total(azure: np.ndarray) -> None:
    assert azure.shape == (7, 86_400)
    assert np.issubdtype(azure.dtype, np.integer)
    assert int(azure.sum()) == 16_803_695  # = rows of AzureLLMInferenceTrace_code_1week.csv
    assert traces.AZURE2024_DAYS == ("Fri", "Sat", "Sun", "Mon", "Tue", "Wed", "Thu")


def test_azure2024_per_day_totals_peak_and_zero_seconds(azure: np.ndarray) -> None:
    expected = [2_490_144, 969_781, 929_659, 2_937_292, 3_210_786, 3_191_468, 3_074_565]
    assert azure.sum(axis=1).tolist() == expected
    assert int(azure.max()) == 146
    assert int(np.argmax(azure.max(axis=1))) == traces.AZURE2024_DAYS.index("Tue")
    assert int((azure == 0).sum()) == 2_391


def test_azure2024_sums_to_the_5min_file(root: Path, azure: np.ndarray) -> None:
    table = np.loadtxt(root / "azure2024_code" / "counts_5min.csv", delimiter=",", skiprows=1, dtype=np.int64)
    assert table.shape == (2016, 2)
    assert np.array_equal(azure.reshape(-1, 300).sum(axis=1), table[:, 1])
    # README: 5-min peak 90.11 req/s on Wed 19:55 UTC
    five_min = azure.reshape(-1, 300).sum(axis=1) / 300
    assert five_min.max() == pytest.approx(90.11, abs=0.01)
    assert int(np.argmax(five_min)) == 5 * 288 + (19 * 60 + 55) // 5


def test_servegen_aggregate_shapes_and_gap_counts(servegen: dict[str, np.ndarray]) -> None:
    assert set(servegen) == {"m-large", "m-mid", "m-small"}
    for series in servegen.values():
        assert series.shape == (2016,)
        assert np.all(series[~np.isnan(series)] > 0)  # every zero became a mask
    assert int(np.isnan(servegen["m-large"]).sum()) == 0
    assert int(np.isnan(servegen["m-mid"]).sum()) == 84
    assert int(np.isnan(servegen["m-small"]).sum()) == 37


def test_servegen_mid_gap_runs_match_readme(servegen: dict[str, np.ndarray]) -> None:
    runs = _runs(np.isnan(servegen["m-mid"]))
    assert [(s * 600, n) for s, n in runs] == [
        (313_200, 11),
        (475_200, 5),
        (507_600, 5),
        (666_000, 17),
        (835_200, 1),
        (846_000, 23),
        (1_137_600, 11),
        (1_152_000, 11),
    ]
    assert len(_runs(np.isnan(servegen["m-small"]))) == 12


def test_servegen_totals_and_means(servegen: dict[str, np.ndarray]) -> None:
    totals_m = {m: np.nansum(s) * 600 / 1e6 for m, s in servegen.items()}
    assert totals_m["m-large"] == pytest.approx(236.9, abs=0.05)
    assert totals_m["m-mid"] == pytest.approx(2165.3, abs=0.05)
    assert totals_m["m-small"] == pytest.approx(1420.6, abs=0.05)
    assert np.nanmean(servegen["m-mid"]) == pytest.approx(1867.9, abs=0.05)  # over non-zero windows
    assert np.nanmax(servegen["m-small"]) == pytest.approx(3879.5, abs=0.05)


def test_servegen_rates_are_exact_counts_over_600(servegen: dict[str, np.ndarray]) -> None:
    for series in servegen.values():
        counts = series[~np.isnan(series)] * 600
        assert np.allclose(counts, np.rint(counts), atol=1e-6)


@pytest.mark.parametrize(("model", "clients"), [("m-large", 162), ("m-mid", 109), ("m-small", 43)])
def test_servegen_clients_sum_to_aggregate_and_share_gaps(
    root: Path, servegen: dict[str, np.ndarray], model: str, clients: int
) -> None:
    rates = traces.load_servegen_clients(root, model)
    assert rates.shape == (clients, 2016)
    gaps = np.isnan(servegen[model])
    assert np.array_equal(np.isnan(rates).any(axis=0), gaps)
    assert np.isnan(rates[:, gaps]).all()
    assert np.allclose(rates[:, ~gaps].sum(axis=0), servegen[model][~gaps], rtol=0, atol=1e-9)
    assert (rates[:, ~gaps] >= 0).all()


def test_servegen_unknown_model_rejected(root: Path) -> None:
    with pytest.raises(ValueError, match="unknown ServeGen model"):
        traces.load_servegen_clients(root, "m-huge")


@pytest.mark.parametrize(
    ("kind", "rows", "median_in", "median_out", "max_in", "max_out"),
    [("conv", 19_366, 1020, 129, 14_050, 1000), ("code", 8_819, 1469, 13, 7437, 1899)],
)
def test_azure2023_tokens_match_readme(
    root: Path, kind: str, rows: int, median_in: int, median_out: int, max_in: int, max_out: int
) -> None:
    tokens = traces.load_azure2023_tokens(root, kind)
    assert tokens.shape == (rows, 2)
    assert np.issubdtype(tokens.dtype, np.integer)
    assert np.median(tokens[:, 0]) == median_in
    assert np.median(tokens[:, 1]) == median_out
    assert tokens[:, 0].max() == max_in
    assert tokens[:, 1].max() == max_out


def test_azure2023_unknown_kind_rejected(root: Path) -> None:
    with pytest.raises(ValueError, match="unknown token kind"):
        traces.load_azure2023_tokens(root, "chat")
