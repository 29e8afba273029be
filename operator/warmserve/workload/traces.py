"""Loaders for the full production traces (not in the repository: :func:`trace_root`, docs/design.md).

Every loader returns plain numpy arrays and reads only the files it needs. The shipped bundle
(:mod:`warmserve.workload.bundle`) is built from these loaders, so both paths give identical arrays.

Conventions (all from the traces' README):

* Azure 2024 code: one file per UTC day, line *i* = ``1 <count>`` = requests in second *i*; the seven
  days run Friday 2024-05-10 .. Thursday 2024-05-16 (:data:`AZURE2024_DAYS`).
* ServeGen: 2016 ten-minute windows (14 days). A window where *every* client of a model is zero is a
  gap in data collection, not idle time, so it is returned as NaN (= masked) and must be skipped for
  training and scoring. Rates are recomputed as the exact integer count / 600 (the README states
  rate × 600 is an integer in every row), which removes the CSV's 6-decimal rounding.
* Azure 2023: one row per request with ``ContextTokens`` (input) and ``GeneratedTokens`` (output).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

AZURE2024_DAYS: tuple[str, ...] = ("Fri", "Sat", "Sun", "Mon", "Tue", "Wed", "Thu")
AZURE2024_FILES: tuple[str, ...] = (
    "2024-05-10_Fri.txt",
    "2024-05-11_Sat.txt",
    "2024-05-12_Sun.txt",
    "2024-05-13_Mon.txt",
    "2024-05-14_Tue.txt",
    "2024-05-15_Wed.txt",
    "2024-05-16_Thu.txt",
)
SECONDS_PER_DAY = 86_400
SERVEGEN_MODELS: tuple[str, ...] = ("m-large", "m-mid", "m-small")
SERVEGEN_WINDOW_S = 600
SERVEGEN_WINDOWS = 2016
TOKEN_KINDS: tuple[str, ...] = ("conv", "code")

_AGGREGATE_COLUMNS = {"m-large": 1, "m-mid": 2, "m-small": 3}


def trace_root() -> Path:
    """Directory holding the real traces.

    ``$WARMSERVE_TRACES`` wins when set; otherwise ``shared/data/traces`` in the directory that holds a
    source checkout (the checkout = the directory above ``operator/``). Raises FileNotFoundError when
    neither exists, so callers (tests, benches) can skip or fall back to the shipped bundle.
    """
    env = os.environ.get("WARMSERVE_TRACES")
    if env:
        path = Path(env)
        if not path.is_dir():
            raise FileNotFoundError(f"WARMSERVE_TRACES={env!r} is not a directory")
        return path
    repo = Path(__file__).resolve().parents[3]
    path = repo.parent / "shared" / "data" / "traces"
    if path.is_dir():
        return path
    raise FileNotFoundError(
        f"trace directory not found: set WARMSERVE_TRACES or provide {path} "
        "(the packaged bundle, warmserve.workload.bundle.load_bundle(), needs no traces)"
    )


def load_azure2024_code_per_second(root: Path | str) -> np.ndarray:
    """Per-second request counts of the Azure 2024 code service, shape (7, 86400), int64, Fri..Thu."""
    folder = Path(root) / "azure2024_code"
    days = []
    for name in AZURE2024_FILES:
        fields = (folder / name).read_text().split()
        counts = np.array(fields[1::2], dtype=np.int64)
        if counts.shape != (SECONDS_PER_DAY,) or len(fields) != 2 * SECONDS_PER_DAY:
            raise ValueError(f"{name}: expected {SECONDS_PER_DAY} lines of '1 <count>'")
        days.append(counts)
    return np.stack(days)


def _read_servegen_counts(path: Path, column: int) -> np.ndarray:
    """Integer request counts per 10-min window from a ServeGen CSV column holding req/s."""
    lines = path.read_text().splitlines()
    if lines and not lines[0][:1].isdigit():
        lines = lines[1:]  # aggregate_10min.csv has a header; the per-client files do not
    rows = [line.split(",") for line in lines]
    table = np.array([(row[0], row[column]) for row in rows], dtype=np.float64)
    t_sec, rate = table[:, 0], table[:, 1]
    expected_t = np.arange(SERVEGEN_WINDOWS) * SERVEGEN_WINDOW_S
    if not np.array_equal(t_sec, expected_t):
        raise ValueError(f"{path}: unexpected t_sec column")
    return np.rint(rate * SERVEGEN_WINDOW_S).astype(np.int64)


def load_servegen_aggregate_counts(root: Path | str) -> dict[str, np.ndarray]:
    """Aggregate request *counts* per 10-min window (2016,), int64; zeros are collection gaps."""
    path = Path(root) / "servegen" / "aggregate_10min.csv"
    return {m: _read_servegen_counts(path, col) for m, col in _AGGREGATE_COLUMNS.items()}


def counts_to_masked_rate(counts: np.ndarray) -> np.ndarray:
    """Turn ServeGen aggregate counts into req/s with gap windows (count == 0) set to NaN."""
    rate = counts.astype(np.float64) / SERVEGEN_WINDOW_S
    rate[counts == 0] = np.nan
    return rate


def load_servegen_aggregate(root: Path | str) -> dict[str, np.ndarray]:
    """ServeGen aggregate req/s per 10-min window for m-large, m-mid, m-small; gaps are NaN."""
    return {m: counts_to_masked_rate(c) for m, c in load_servegen_aggregate_counts(root).items()}


def servegen_client_files(root: Path | str, model: str) -> list[Path]:
    """The model's per-client files, ordered by numeric client id (chunk-<id>-trace.csv)."""
    if model not in SERVEGEN_MODELS:
        raise ValueError(f"unknown ServeGen model {model!r}; expected one of {SERVEGEN_MODELS}")
    files = list((Path(root) / "servegen" / model).glob("chunk-*-trace.csv"))
    return sorted(files, key=lambda p: int(p.name.split("-")[1]))


def load_servegen_clients(root: Path | str, model: str) -> np.ndarray:
    """Per-client req/s, shape (clients, 2016), clients ordered by id; the model's gaps are NaN.

    Only the model-wide gap windows are masked (all clients zero at once); a single client's zero
    row elsewhere is a real zero (or fewer than 10 requests, see the README) and stays 0.
    """
    counts = np.stack([_read_servegen_counts(p, 1) for p in servegen_client_files(root, model)])
    rates = counts.astype(np.float64) / SERVEGEN_WINDOW_S
    gaps = counts.sum(axis=0) == 0
    rates[:, gaps] = np.nan
    return rates


def load_azure2023_tokens(root: Path | str, kind: str = "conv") -> np.ndarray:
    """Azure 2023 token lengths, shape (n, 2) int64, columns [input (context), output (generated)]."""
    if kind not in TOKEN_KINDS:
        raise ValueError(f"unknown token kind {kind!r}; expected one of {TOKEN_KINDS}")
    path = Path(root) / "azure2023" / f"AzureLLMInferenceTrace_{kind}.csv"
    lines = path.read_text().splitlines()
    if not lines or lines[0].strip() != "TIMESTAMP,ContextTokens,GeneratedTokens":
        raise ValueError(f"{path}: unexpected header")
    rows = [line.rsplit(",", 2)[1:] for line in lines[1:] if line.strip()]
    return np.array(rows, dtype=np.int64).reshape(-1, 2)
