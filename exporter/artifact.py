"""Artifact folders: atomic writes, hashes, reading the manifest, and the environment it records."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from exporter.errors import ArtifactError, UsageError
from exporter.manifest import EXPORT_LOG, MANIFEST, ArtifactManifest, FileEntry, manifest_from_json
from exporter.records import RecordError, write_json_atomic

__all__ = ["MANIFEST", "Artifact", "atomic_dir", "environment", "file_table", "read_artifact", "write_json_atomic"]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_dir(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to ``final`` only if the block succeeds.

    On any exception, KeyboardInterrupt and SIGTERM included, the temporary folder is removed,
    so a failed or interrupted export leaves neither ``final`` nor a partial file behind.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise UsageError(f"{final} already exists", hint="choose another --out or pass --force")
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(final)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
        previous = _raise_on_sigterm()
        try:
            yield tmp
            if final.exists():
                if not overwrite:  # not ours: something else wrote it meanwhile
                    raise UsageError(f"{final} appeared while this export ran; it was left as it is",
                                     hint="choose another --out or pass --force")
                shutil.rmtree(final)
            tmp.chmod(0o755)  # mkdtemp makes it 0700; an artifact is for others to read
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    finally:
        lock.unlink(missing_ok=True)


def _lock(final: Path) -> Path:
    """``.NAME.lock`` beside ``final``, created exclusively: a second export into the same
    folder refuses at once instead of racing the first to the rename."""
    lock = final.parent / f".{final.name}.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise UsageError(f"another recgpt-export process is writing {final} (its lock {lock} exists)",
                         hint=f"wait for it to finish, or delete {lock} if none is running") from None
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{os.getpid()}\n")
    return lock


def _raise_on_sigterm():
    """Turn SIGTERM into KeyboardInterrupt so cleanup runs (only possible on the main thread)."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def tracked_packages() -> list[str]:
    """Every distribution whose version can change the exported bytes or the measured
    numbers: this tool's own pinned dependencies, every extra's included (pyproject.toml is
    the one list; a new target's extra is tracked by being declared there)."""
    try:
        requirements = metadata.requires("recgpt-export") or []
    except metadata.PackageNotFoundError:
        requirements = []
    pinned = [re.split(r"[=<>!~ ;\[]", req, maxsplit=1)[0] for req in requirements if "==" in req]
    return ["recgpt-export", *dict.fromkeys(name for name in pinned)]


def environment() -> dict[str, Any]:
    versions = {}
    for name in tracked_packages():
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "packages": versions,
    }


def file_table(folder: Path) -> dict[str, FileEntry]:
    """sha256 and size of every file in the folder except the manifest and the run records."""
    table = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST or rel in REPORT_FILES:
            continue
        table[rel] = FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)
    return table


# Records of runs over the artifact (when, how long, what was measured), not its content:
# outside the file table, so they never make two builds of the same bytes differ.
REPORT_FILES = ("parity.json", "bench.json", EXPORT_LOG)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Artifact:
    """An artifact folder and its parsed manifest."""

    path: Path
    manifest: ArtifactManifest

    @property
    def target(self) -> str:
        return self.manifest.target.name

    def file(self, role: str) -> Path:
        return self.path / self.manifest.roles[role]


def read_artifact(folder: str | Path, *, check_hashes: bool = True) -> Artifact:
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"artifact folder {folder} does not exist")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST}; is it an artifact folder made by `recgpt-export export`?")
    try:
        manifest = manifest_from_json(json.loads(manifest_path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{manifest_path} is not valid JSON ({exc})") from exc
    except (RecordError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{manifest_path}: {exc}", hint="export the artifact again with this version") from exc
    if check_hashes:
        problem = file_mismatch(folder, manifest.files)
        if problem is not None:
            raise ArtifactError(f"{folder}: {problem}")
    return Artifact(folder, manifest)


def file_mismatch(folder: Path, files: dict[str, FileEntry]) -> str | None:
    """The first listed file that is missing or differs from its size and sha256, as a clause."""
    for rel, entry in files.items():
        path = Path(folder) / rel
        if not path.is_file():
            return f"{rel} is listed in the manifest but missing"
        if path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
            return f"{rel} does not match its sha256 in the manifest (modified or corrupt)"
    return None


def content_files(folder: Path) -> dict[str, FileEntry]:
    """Every file of an artifact's content with its sha256 and size: the manifest's table and
    manifest.json itself (the run records beside them are not content)."""
    folder = Path(folder)
    manifest = read_artifact(folder, check_hashes=False).manifest
    table = {**manifest.files, MANIFEST: FileEntry(sha256=sha256_file(folder / MANIFEST),
                                                   bytes=(folder / MANIFEST).stat().st_size)}
    return dict(sorted(table.items()))
