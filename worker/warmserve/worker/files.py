"""Crash-safe small-file writes shared by the worker's ledgers, records and state files."""

from __future__ import annotations

import json
import os
import threading
from typing import Any


def write_json_atomic(path: str, data: Any, indent: int | None = None) -> None:
    """Write ``data`` as JSON to ``path`` so a reader sees the old or the new file, never half of one.

    The temporary name is unique per process and thread: two threads persisting the same file at once
    (say, two replicas finishing their loads) must not rename each other's temporary file away.
    """
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=indent)
    os.replace(tmp, path)
