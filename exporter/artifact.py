"""Artifact folders: atomic writes, hashes, the manifest, and the environment it records."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from exporter.errors import ArtifactError, UsageError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# Every tool whose version can change the exported bytes or the measured numbers.
TRACKED_PACKAGES = (
    "recgpt-export", "torch", "executorch", "torchao", "transformers", "tokenizers",
    "numpy", "safetensors", "pytorch-tokenizers", "coremltools", "onnx", "onnxruntime", "onnxruntime-genai",
)


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
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    previous = _raise_on_sigterm()
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        tmp.chmod(0o755)  # mkdtemp makes it 0700; an artifact is for others to read
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_on_sigterm():
    """Turn SIGTERM into KeyboardInterrupt so cleanup runs (only possible on the main thread)."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def environment() -> dict[str, Any]:
    versions = {}
    for name in TRACKED_PACKAGES:
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


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in the folder except the manifest and reports."""
    table = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST or rel in REPORT_FILES:
            continue
        table[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return table


REPORT_FILES = ("parity.json", "bench.json")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Artifact:
    """An artifact folder and its parsed manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def target(self) -> str:
        return self.manifest["target"]["name"]

    def file(self, role: str) -> Path:
        return self.path / self.manifest["roles"][role]


def read_artifact(folder: str | Path, *, check_hashes: bool = True) -> Artifact:
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"artifact folder {folder} does not exist")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST}; is it an artifact folder made by `recgpt-export export`?")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{manifest_path} is not valid JSON ({exc})") from exc
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise ArtifactError(f"{manifest_path}: manifest_version {manifest.get('manifest_version')!r} is not {MANIFEST_VERSION}")
    if check_hashes:
        for rel, entry in manifest.get("files", {}).items():
            path = folder / rel
            if not path.is_file():
                raise ArtifactError(f"{folder}: {rel} is listed in the manifest but missing")
            if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                raise ArtifactError(f"{folder}: {rel} does not match its sha256 in the manifest (modified or corrupt)")
    return Artifact(folder, manifest)
