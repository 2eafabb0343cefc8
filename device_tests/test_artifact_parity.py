"""Parity and throughput of an exported artifact on the device this runs on.

Run only when named: RECGPT_ARTIFACT=out/demo-smollm2-int4 python -m pytest device_tests -q
Results go to the artifact folder as parity.json and bench.json (JSON, not assertions on time).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ARTIFACT = os.environ.get("RECGPT_ARTIFACT")
pytestmark = pytest.mark.skipif(not ARTIFACT, reason="set RECGPT_ARTIFACT to an artifact folder")


def test_parity_gates_pass_here():
    from exporter.pipeline import verify

    report = verify(Path(ARTIFACT), model=os.environ.get("RECGPT_MODEL"))
    assert report.passed, report.failures


def test_bench_report_written():
    from exporter.pipeline import bench

    report = bench(Path(ARTIFACT))
    assert (Path(ARTIFACT) / "bench.json").is_file()
    assert report.decode_tok_s.runs >= 1
