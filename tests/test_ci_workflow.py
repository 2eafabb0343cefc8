"""docs/ci/: the GitHub Actions workflow lints clean (actionlint, a real one from PyPI) and the
shipped release matrix it builds plans to the artifacts docs/ci.md lists."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

DOCS_CI = Path(__file__).parent.parent / "docs" / "ci"


def test_the_workflow_passes_actionlint():
    actionlint = shutil.which("actionlint") or str(Path(sys.executable).parent / "actionlint")
    result = subprocess.run([actionlint, "-no-color", str(DOCS_CI / "release.yml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_finds_a_broken_workflow(tmp_path):
    """The lint can fail: a job that needs one that does not exist."""
    broken = (DOCS_CI / "release.yml").read_text().replace("needs: build", "needs: bulid", 1)
    (tmp_path / "broken.yml").write_text(broken)
    actionlint = shutil.which("actionlint") or str(Path(sys.executable).parent / "actionlint")
    result = subprocess.run([actionlint, "-no-color", str(tmp_path / "broken.yml")], capture_output=True, text=True)
    assert result.returncode == 1 and "bulid" in result.stdout


def test_the_shipped_matrix_plans_the_release():
    from exporter.build.matrix import plan_build, read_matrix, shard

    plan = plan_build(read_matrix(DOCS_CI / "release.toml"), "release.toml")
    ids = [a.id for a in plan.artifacts]
    assert ids == sorted(ids) and len(ids) == 6
    targets = [a.recipe_ref.split("/")[1].split("-")[0] for a in plan.artifacts]
    assert sorted(targets) == ["coreml", "coreml", "executorch", "executorch", "onnx", "onnx"]
    shards = [shard(plan, f"{i}/3").artifacts for i in (1, 2, 3)]  # the workflow's three shards
    assert sorted(a.id for part in shards for a in part) == ids and all(shards)
