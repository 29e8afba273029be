"""Atomic JSON writes from several threads at once (two replicas finishing their loads together)."""

from __future__ import annotations

import json
import threading

from warmserve.worker.files import write_json_atomic


def test_concurrent_writers_never_lose_a_rename(tmp_path):
    path = str(tmp_path / "ledger.json")
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(200):
                write_json_atomic(path, {"writer": n, "i": i})
        except BaseException as error:  # any failure of a writer is the bug
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert json.loads((tmp_path / "ledger.json").read_text())["i"] == 199
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]  # no temporary file left behind
