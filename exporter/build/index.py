"""index.json and each artifact's build.json: what a build made, proved and measured.

``dist/<artifact>/build.json`` is written last, when an artifact's stages are done: it is
the marker an incremental build trusts (its ``build_key`` against the inputs of now) and the
entry ``dist/index.json`` lists. A device farm reads index.json to check the published
artifacts again (docs/ci.md): the files and their hashes, and what every gate saw here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.manifest import FileEntry
from exporter.records import RecordError, from_json, omitted_when_none

INDEX_FILE = "index.json"
ENTRY_FILE = "build.json"
INDEX_VERSION = 1

PASSED, FAILED, ERROR = "passed", "failed", "error"


@dataclass(frozen=True, kw_only=True)
class GateValue:
    report: str  # the file it comes from: parity.json (host) or parity.<device>.json
    name: str  # lowering.max_abs_diff, quality.kl_mean, task.agreement_top1, ...
    value: float
    limit: float
    at_least: bool
    passed: bool


@dataclass(frozen=True, kw_only=True)
class ModelInput:
    name: str
    source: str
    adapter: str
    weights_sha256: str  # the checkpoint as exported (the adapter merged)
    files_sha256: str  # config and tokenizer files: they change the bytes too


@dataclass(frozen=True, kw_only=True)
class ArtifactEntry:
    id: str
    result: str  # passed, failed (a gate) or error (a stage)
    model: ModelInput
    recipe: str  # the recipe's name
    recipe_ref: str  # as the matrix names it
    overrides: tuple[str, ...]
    target: str
    build_key: str  # sha256 of everything below that went into the bytes and the checks
    files: dict[str, FileEntry]  # every file of the artifact (manifest.json included), not the reports
    bytes: int
    gates: tuple[GateValue, ...]
    failures: tuple[str, ...]  # one sentence per failed gate, as verify prints them
    figures: dict[str, float]  # the key numbers (report.html's table)
    reports: tuple[str, ...]  # parity.json, parity.<device>.json, bench.json, ...
    devices: tuple[str, ...]
    environment: dict[str, Any]
    error: str = ""  # the stage error, when result is error
    stage: str = ""  # the stage that failed
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage of the build that made it
    notes: tuple[str, ...] = ()  # what is not a gate but a reader must know: bench figures too unstable to compare


@dataclass(frozen=True, kw_only=True)
class BuildIndex:
    index_version: int = INDEX_VERSION
    result: str
    artifacts: tuple[ArtifactEntry, ...]
    matrix: str  # the matrix file the build read, or "command line"
    shard: str = omitted_when_none("")


def overall(entries: tuple[ArtifactEntry, ...] | list[ArtifactEntry]) -> str:
    results = {e.result for e in entries}
    return ERROR if ERROR in results else FAILED if FAILED in results else PASSED


def files_intact(folder: Path, entry: ArtifactEntry) -> bool:
    """Every file the entry lists is in ``folder`` with its size and sha256."""
    from exporter.artifact import file_mismatch

    return file_mismatch(folder, entry.files) is None


def read_entry(folder: Path) -> ArtifactEntry | None:
    """The artifact's build.json, or None when it has none or it does not read."""
    path = Path(folder) / ENTRY_FILE
    try:
        return from_json(ArtifactEntry, json.loads(path.read_text(encoding="utf-8")), str(path))
    except (OSError, ValueError, RecordError):
        return None


def read_index(folder: Path) -> BuildIndex:
    from exporter.errors import UsageError

    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise UsageError(f"{folder} has no {INDEX_FILE}; is it a folder written by `recgpt-export build`?")
    try:
        index = from_json(BuildIndex, json.loads(path.read_text(encoding="utf-8")), str(path))
    except (ValueError, RecordError) as exc:
        raise UsageError(f"{path} does not read as a build index ({exc})") from exc
    if index.index_version != INDEX_VERSION:
        raise UsageError(f"{path}: index_version {index.index_version} is not {INDEX_VERSION}")
    return index
