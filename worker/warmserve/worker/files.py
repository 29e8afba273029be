"""Small file helpers of the worker: crash-safe JSON writes, file-safe names, local model paths."""

from __future__ import annotations

import json
import os
import threading
from typing import Any


class SourceError(ValueError):
    """A model source the worker cannot read (anything but a local path)."""


def source_path(source: str) -> str:
    """Local path of a model source; only ``file://`` (or a bare absolute path) is local.

    ``pvc://`` and ``hf://`` are resolved by the operator into a mounted ``file://`` path before they reach a
    worker, so anything else is a per-replica error (:class:`SourceError`), as is a path with ``..`` components
    or a NUL byte.
    """
    path = source[len("file://") :] if source.startswith("file://") else source
    if path.startswith("/"):
        if "\0" in path or ".." in path.split("/"):
            raise SourceError(f"model source {source!r}: a path with '..' components or a NUL byte is refused")
        return path
    raise SourceError(
        f"unsupported model source {source!r}: the worker reads file:// paths "
        "(pvc:// and hf:// are resolved by the operator into a mounted file:// path)"
    )


def safe_name(text: str) -> str:
    """``text`` with every character but letters, digits and ``-_.`` replaced by ``_`` (for file names)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def write_json_atomic(path: str, data: Any, indent: int | None = None) -> None:
    """Write ``data`` as JSON to ``path`` so a reader sees the old or the new file, never half of one."""
    write_text_atomic(path, json.dumps(data, indent=indent))


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old or the new file, never half of one.

    The temporary name is unique per process and thread: two threads persisting the same file at once
    (say, two replicas finishing their loads) must not rename each other's temporary file away.
    """
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def read_json(path: str) -> dict[str, Any]:
    """A JSON object from ``path``; ``{}`` when it is missing, unreadable or not an object."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
