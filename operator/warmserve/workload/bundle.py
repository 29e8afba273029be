"""The compact trace bundle shipped inside the package, so ``warmserve simulate`` needs no trace download.

What it holds (all derived from the full traces by :func:`build_bundle`, nothing synthetic; docs/design.md):

* ``azure2024_code``: Azure 2024 code per-second request counts, (7, 86400), Fri..Thu, stored uint16.
* ``azure2023_conv`` / ``azure2023_code``: Azure 2023 [input, output] token pairs, stored uint16.
* ``servegen_<model>``: ServeGen aggregate request *counts* per 10-min window, stored uint32; a zero
  count is a collection gap and is turned back into NaN (masked) req/s on load.

Storing integer counts instead of floats keeps the bundle small (well under 2 MB) and exact: the
arrays :func:`load_bundle` returns equal the arrays the :mod:`warmserve.workload.traces` loaders return.
The ``.npz`` is written with fixed zip timestamps so rebuilding gives byte-identical files.

Rebuild (defaults: ``trace_root()`` and this package's ``data/``):
``python -m warmserve.workload.bundle [--traces DIR] [--out DIR]``
"""

from __future__ import annotations

import argparse
import functools
import io
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from warmserve.workload import traces

BUNDLE_FILE = "warmserve_traces.npz"
NOTICE_FILE = "NOTICE"
MAX_BUNDLE_BYTES = 2 * 1024 * 1024

NOTICE_TEXT = """\
warmserve.workload/data: derived trace bundle, attribution and licences
======================================================================

warmserve_traces.npz is derived from public, production-derived LLM traces.
Each source keeps its own licence (texts: Apache-2.0, CC BY 4.0, MIT; see the
links below). Data only, no third-party source code.

How it was derived: warmserve.workload.bundle.build_bundle() reads the trace
folder described below and stores (1) the seven Azure 2024 code day files as
per-second counts (uint16, Fri..Thu), (2) the ContextTokens/GeneratedTokens
columns of the two Azure 2023 files (uint16; timestamps dropped), and (3) the
ServeGen aggregate per-10-min request counts (= aggregate req/s x 600, uint32)
for m-large, m-mid and m-small (zero = collection gap). Nothing else is
changed, added or interpolated.

Azure 2024 code (array azure2024_code)
  Underlying data: "Azure LLM inference trace 2024"
  (AzureLLMInferenceTrace_code_1week.csv), Microsoft Azure, Azure Public
  Dataset (Azure/AzurePublicDataset), licensed CC BY 4.0
  (https://creativecommons.org/licenses/by/4.0/).
  Distributed form: per-second counts per UTC day from the repository
  tu-nv/drafas (commit b51b580e6ae21d74f9182032761cc6422c4c7865), MIT License,
  Copyright (c) 2024 Nguyen Van Tu. The calendar dates (2024-05-10 Fri ..
  2024-05-16 Thu) were inferred, not labelled at the source.
  Please cite: J. Stojkovic, C. Zhang, I. Goiri, J. Torrellas, E. Choukse.
  "DynamoLLM: Designing LLM Inference Clusters for Performance and Energy
  Efficiency." HPCA 2025. https://arxiv.org/abs/2408.00741

Azure 2023 (arrays azure2023_conv, azure2023_code)
  Source: Azure Public Dataset (Azure/AzurePublicDataset), commit
  b469a113cedca53ddc3bdea71a143dc4b7d8700c, data/AzureLLMInferenceTrace_conv.csv
  and data/AzureLLMInferenceTrace_code.csv, (c) Microsoft Corporation,
  licensed CC BY 4.0. Modification here: only the two token columns are kept.
  Please cite: P. Patel, E. Choukse, C. Zhang, A. Shah, I. Goiri, S. Maleki,
  R. Bianchini. "Splitwise: Efficient Generative LLM Inference Using Phase
  Splitting." ISCA 2024.

ServeGen (arrays servegen_m_large, servegen_m_mid, servegen_m_small)
  Source: ServeGen (alibaba/ServeGen), Alibaba Cloud Model Studio workload
  data, via the public copy azaj01/ServeGen at commit
  bdf86140c29c7fadb6317ee77b437e56d35fcf41, data/language/{m-large,m-mid,
  m-small}/chunk-*-trace.csv. Apache License 2.0. Modification here: the
  per-client rates are summed per timestamp into aggregate request counts.
  Please cite: Y. Xiang, X. Li, K. Qian, W. Yu, E. Zhai, X. Jin. "ServeGen:
  Workload Characterization and Generation of Large Language Model Serving in
  Production." arXiv:2505.09999, 2025.

No warranty: all data is provided "as is", without warranty of any kind; see
the disclaimer sections of the respective licences.
"""


@dataclass(frozen=True)
class Bundle:
    """The trace arrays the simulator needs, identical to what the ``traces`` loaders return."""

    azure2024_code: np.ndarray  # (7, 86400) int64 requests per second, Fri..Thu
    azure2023_tokens: dict[str, np.ndarray]  # "conv"/"code" -> (n, 2) int64 [input, output]
    servegen_aggregate: dict[str, np.ndarray]  # "m-large"/"m-mid"/"m-small" -> (2016,) req/s, NaN gaps

    def tokens(self, kind: str) -> np.ndarray:
        """Azure 2023 token pairs of one service ("conv" or "code")."""
        if kind not in self.azure2023_tokens:
            raise ValueError(f"unknown token kind {kind!r}; expected one of {tuple(self.azure2023_tokens)}")
        return self.azure2023_tokens[kind]


def _servegen_key(model: str) -> str:
    return "servegen_" + model.replace("-", "_")


def _bundle_arrays(root: Path | str) -> dict[str, np.ndarray]:
    """Compact, exactly-invertible arrays read from the real trace folder."""
    azure = traces.load_azure2024_code_per_second(root)
    if azure.min() < 0 or azure.max() > np.iinfo(np.uint16).max:
        raise ValueError("Azure 2024 counts do not fit uint16")
    arrays: dict[str, np.ndarray] = {"azure2024_code": azure.astype(np.uint16)}
    for kind in traces.TOKEN_KINDS:
        tokens = traces.load_azure2023_tokens(root, kind)
        if tokens.min() < 0 or tokens.max() > np.iinfo(np.uint16).max:
            raise ValueError(f"Azure 2023 {kind} tokens do not fit uint16")
        arrays[f"azure2023_{kind}"] = tokens.astype(np.uint16)
    for model, counts in traces.load_servegen_aggregate_counts(root).items():
        arrays[_servegen_key(model)] = counts.astype(np.uint32)
    return arrays


def _write_npz_deterministic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but with fixed member order and timestamps (byte-reproducible)."""
    with zipfile.ZipFile(path, "w") as archive:
        for name in sorted(arrays):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, buffer.getvalue(), compresslevel=9)


def build_bundle(root: Path | str, out_dir: Path | str) -> Path:
    """Write ``warmserve_traces.npz`` and ``NOTICE`` into ``out_dir``; return the npz path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npz_path = out / BUNDLE_FILE
    _write_npz_deterministic(npz_path, _bundle_arrays(root))
    (out / NOTICE_FILE).write_text(NOTICE_TEXT)
    return npz_path


def read_bundle(npz_path: Path | str | io.BytesIO) -> Bundle:
    """Decode a bundle file into the loaders' array types (int64 counts, NaN-masked ServeGen rates)."""
    with np.load(npz_path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    bundle = Bundle(
        azure2024_code=arrays["azure2024_code"].astype(np.int64),
        azure2023_tokens={k: arrays[f"azure2023_{k}"].astype(np.int64) for k in traces.TOKEN_KINDS},
        servegen_aggregate={m: traces.counts_to_masked_rate(arrays[_servegen_key(m)]) for m in traces.SERVEGEN_MODELS},
    )
    shared = (bundle.azure2024_code, *bundle.azure2023_tokens.values(), *bundle.servegen_aggregate.values())
    for array in shared:
        array.flags.writeable = False  # the cached bundle is shared: nobody may mutate it
    return bundle


def bundle_data_dir() -> Path:
    """Directory of the shipped bundle inside the installed package."""
    return Path(str(resources.files("warmserve.workload") / "data"))


@functools.lru_cache(maxsize=1)
def load_bundle() -> Bundle:
    """The shipped bundle (read once per process; arrays are read-only)."""
    resource = resources.files("warmserve.workload") / "data" / BUNDLE_FILE
    with resource.open("rb") as handle:
        return read_bundle(io.BytesIO(handle.read()))


def load_bundle_from_traces(root: Path | str) -> Bundle:
    """The same :class:`Bundle` straight from the trace loaders (what the shipped file must equal)."""
    return Bundle(
        azure2024_code=traces.load_azure2024_code_per_second(root),
        azure2023_tokens={k: traces.load_azure2023_tokens(root, k) for k in traces.TOKEN_KINDS},
        servegen_aggregate=traces.load_servegen_aggregate(root),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the shipped trace bundle from the full traces")
    parser.add_argument("--traces", type=Path, default=None, help="trace folder (default: trace_root())")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: package data/)")
    args = parser.parse_args(argv)
    root = args.traces if args.traces is not None else traces.trace_root()
    out = args.out if args.out is not None else Path(__file__).resolve().parent / "data"
    npz_path = build_bundle(root, out)
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {npz_path} ({npz_path.stat().st_size} bytes); data dir total {total} bytes")
    if total > MAX_BUNDLE_BYTES:
        print(f"ERROR: bundle exceeds {MAX_BUNDLE_BYTES} bytes")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
