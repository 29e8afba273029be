"""The shipped trace bundle: size, attribution, exact round trip, byte-reproducible rebuild."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from warmserve.workload import bundle as bundle_mod
from warmserve.workload import traces


@pytest.fixture(scope="module")
def root() -> Path:
    try:
        return traces.trace_root()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _assert_bundles_equal(a: bundle_mod.Bundle, b: bundle_mod.Bundle) -> None:
    assert a.azure2024_code.dtype == b.azure2024_code.dtype
    assert np.array_equal(a.azure2024_code, b.azure2024_code)
    assert set(a.azure2023_tokens) == set(b.azure2023_tokens) == {"conv", "code"}
    for kind in a.azure2023_tokens:
        assert np.array_equal(a.azure2023_tokens[kind], b.azure2023_tokens[kind])
    assert set(a.servegen_aggregate) == set(b.servegen_aggregate) == {"m-large", "m-mid", "m-small"}
    for model in a.servegen_aggregate:
        assert np.array_equal(a.servegen_aggregate[model], b.servegen_aggregate[model], equal_nan=True)


def test_shipped_bundle_is_small_and_attributed() -> None:
    data_dir = bundle_mod.bundle_data_dir()
    files = [p for p in data_dir.iterdir() if p.is_file()]
    assert {p.name for p in files} >= {bundle_mod.BUNDLE_FILE, bundle_mod.NOTICE_FILE}
    assert sum(p.stat().st_size for p in files) <= 2 * 1024 * 1024
    notice = (data_dir / bundle_mod.NOTICE_FILE).read_text()
    for needle in (
        "CC BY 4.0",
        "Apache License 2.0",
        "MIT License",
        "Nguyen Van Tu",
        "DynamoLLM",
        "Splitwise",
        "ServeGen",
        "How it was derived",
    ):
        assert needle in notice


def test_shipped_bundle_has_the_loader_shapes_without_traces() -> None:
    data = bundle_mod.load_bundle()
    assert data.azure2024_code.shape == (7, 86_400)
    assert int(data.azure2024_code.sum()) == 16_803_695
    assert data.tokens("conv").shape == (19_366, 2)
    assert data.tokens("code").shape == (8_819, 2)
    assert int(np.isnan(data.servegen_aggregate["m-mid"]).sum()) == 84
    with pytest.raises(ValueError):
        data.tokens("chat")


def test_shipped_bundle_arrays_are_read_only() -> None:
    data = bundle_mod.load_bundle()
    with pytest.raises(ValueError):
        data.azure2024_code[0, 0] = 1
    with pytest.raises(ValueError):
        data.servegen_aggregate["m-small"][0] = 1.0


def test_shipped_bundle_equals_the_loaders(root: Path) -> None:
    _assert_bundles_equal(bundle_mod.load_bundle(), bundle_mod.load_bundle_from_traces(root))


def _members(path: Path) -> dict[str, bytes]:
    """Uncompressed zip members (compressed bytes may differ across zlib builds; content may not)."""
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def test_rebuild_from_traces_is_identical(root: Path, tmp_path: Path) -> None:
    npz = bundle_mod.build_bundle(root, tmp_path)
    shipped = bundle_mod.bundle_data_dir()
    assert _members(npz) == _members(shipped / bundle_mod.BUNDLE_FILE)
    assert (tmp_path / "NOTICE").read_text() == (shipped / "NOTICE").read_text()
    _assert_bundles_equal(bundle_mod.read_bundle(npz), bundle_mod.load_bundle())


def test_bundle_cli_writes_into_out_dir(root: Path, tmp_path: Path) -> None:
    assert bundle_mod.main(["--traces", str(root), "--out", str(tmp_path)]) == 0
    assert (tmp_path / bundle_mod.BUNDLE_FILE).is_file()
