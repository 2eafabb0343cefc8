"""Device tests reuse the offline suite's tiny seeded checkpoints, CLI runner and recipe helpers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(_TESTS))
_spec = importlib.util.spec_from_file_location("suite_conftest", _TESTS / "conftest.py")
suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(suite)

cli = suite.cli
tiny_checkpoints = suite.tiny_checkpoints
quant_rules = suite.quant_rules
write_recipe = suite.write_recipe
