"""Prints the worker hostile corpus's table (case → how it was refused) at the end of a run that ran it."""

from __future__ import annotations

import sys
from typing import Any


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    module = sys.modules.get("test_hostile_worker")
    results = getattr(module, "RESULTS", None)
    if results:
        terminalreporter.section("hostile worker corpus")
        terminalreporter.write_line(module.table(results))  # type: ignore[union-attr]
