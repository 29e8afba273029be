"""Fixtures of the controller tests; the helpers live in controller_support (a unique module name, so the
tests can import them whatever other conftest.py pytest has loaded first)."""

from controller_support import *  # noqa: F403 (fixtures must be attributes of this module)
