"""Router tests import the fake vLLM server from bench/ (bench/fake_engine.py, also used by bench/e2e.py)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
