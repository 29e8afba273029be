"""Prints the hostile corpus's table (refused by schema / CEL / condition) at the end of a run that ran it."""

from __future__ import annotations

import sys
from typing import Any


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    module = sys.modules.get("test_hostile_crs")
    results = getattr(module, "RESULTS", None)
    if results:
        terminalreporter.section("hostile corpus")
        terminalreporter.write_line(module.table(results))  # type: ignore[union-attr]
