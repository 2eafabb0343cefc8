"""`build --check DIR`: rebuild a published artifact from what its manifest records and
confirm every file has the sha256 the index published (docs/ci.md: byte-identical builds)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from exporter.build.index import ArtifactEntry, read_index
from exporter.errors import UsageError


@dataclass(frozen=True, kw_only=True)
class CheckResult:
    artifact: str
    files: int
    differing: tuple[str, ...]  # files whose sha256 differs, or that one side lacks

    @property
    def identical(self) -> bool:
        return not self.differing


def check(dist: Path, artifact_id: str | None, progress: Callable[[str], None]) -> CheckResult:
    from exporter import pipeline
    from exporter.artifact import content_files, read_artifact
    from exporter.recipe_io import recipe_from_dict

    index = read_index(dist)
    entry = _pick(index.artifacts, artifact_id, dist)
    manifest = read_artifact(dist / entry.id).manifest
    scratch = Path(tempfile.mkdtemp(prefix=f".check-{entry.id}-", dir=dist))
    try:
        rebuilt = pipeline.export(recipe_from_dict(manifest.recipe), out_dir=scratch / entry.id,
                                  model=entry.model.source, adapter=entry.model.adapter or None, progress=progress)
        table = {rel: e.sha256 for rel, e in content_files(rebuilt).items()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    published = {rel: e.sha256 for rel, e in entry.files.items()}
    differing = tuple(sorted(rel for rel in published.keys() | table.keys() if published.get(rel) != table.get(rel)))
    return CheckResult(artifact=entry.id, files=len(published), differing=differing)


def _pick(entries: tuple[ArtifactEntry, ...], artifact_id: str | None, dist: Path) -> ArtifactEntry:
    built = [e for e in entries if e.files]
    if artifact_id is None:
        if not built:
            raise UsageError(f"{dist}/index.json lists no artifact that built")
        return built[0]
    for entry in built:
        if entry.id == artifact_id:
            return entry
    raise UsageError(f"{dist}/index.json has no built artifact {artifact_id!r}",
                     hint="the built ones: " + ", ".join(e.id for e in built))
