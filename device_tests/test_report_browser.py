"""report.html in a real browser: headless Chromium (Debian's package) opens the report of a
tiny build, takes a screenshot, and the rendered page has the table and every plot, with no
error on the console. `make device-test` installs chromium when root."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
PLOTS = ("kl-per-step", "top1-per-step", "kl-distribution", "throughput", "size-quality")


def chromium(page: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--enable-logging=stderr", "--v=0", "--window-size=1400,2400", *flags, page.as_uri()],
                          capture_output=True, text=True, timeout=120)


def console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]


@pytest.fixture(scope="module")
def report(tiny_checkpoints, tmp_path_factory) -> Path:
    from test_build import write_matrix
    from typer.testing import CliRunner

    from exporter.cli import app

    root = tmp_path_factory.mktemp("report")
    matrix = write_matrix(root / "m.toml", tiny_checkpoints["qwen3"], recipes=('"onnx/fp32"', '"onnx/int8"'))
    result = CliRunner().invoke(app, ["build", str(matrix), "--out", str(root / "dist")], catch_exceptions=False)
    assert result.exit_code in (0, 1), result.stderr
    return root / "dist" / "report.html"


def test_the_report_renders_in_chromium(report, tmp_path):
    shot = tmp_path / "report.png"
    taken = chromium(report, f"--screenshot={shot}")
    assert shot.is_file() and shot.stat().st_size > 10_000, taken.stderr[-2000:]
    dom = chromium(report, "--dump-dom")
    assert dom.returncode == 0
    assert '<table id="artifacts">' in dom.stdout and dom.stdout.count("<tr>") == 3
    for plot in PLOTS:
        assert f'id="plot-{plot}"' in dom.stdout and "<svg" in dom.stdout
    assert console_errors(dom.stderr + taken.stderr) == []


def test_a_console_error_would_be_seen(tmp_path):
    """The check above can fail: a page whose script throws shows on the console."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><script>throw new Error("broken page")</script></body></html>')
    assert console_errors(chromium(page, "--dump-dom").stderr)
