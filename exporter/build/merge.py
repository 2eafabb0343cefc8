"""`build merge`: the shards of a CI matrix joined into one folder and one index.json.

Each shard built a disjoint slice (`build --shard i/n`); an artifact found in two shards is
accepted only when both built the same thing (same build key and file hashes), otherwise the
merge stops before writing anything: two different artifacts under one id is a broken matrix.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from exporter.build.index import INDEX_FILE, ArtifactEntry, BuildIndex, files_intact, overall, read_entry, read_index
from exporter.errors import ArtifactError, UsageError
from exporter.records import write_json_atomic


def merge(shards: list[Path], out: Path, progress: Callable[[str], None]) -> BuildIndex:
    if not shards:
        raise UsageError("build merge needs at least one shard folder", hint="recgpt-export build merge dist/shard-*/ "
                                                                            "--out dist/")
    found: dict[str, tuple[ArtifactEntry, Path]] = {}
    matrices = set()
    for shard in shards:
        index = read_index(shard)
        matrices.add(index.matrix)
        for entry in index.artifacts:
            if entry.id in found:
                other, where = found[entry.id]
                if other.build_key != entry.build_key or other.files != entry.files:
                    raise UsageError(f"artifact {entry.id} is in {where} and {shard} with different contents "
                                     f"(build keys {other.build_key[:12]} and {entry.build_key[:12]})",
                                     hint="rebuild the shards from one matrix and one tool version")
                continue
            if entry.files and not files_intact(shard / entry.id, entry):
                raise ArtifactError(f"{shard / entry.id}: its files do not match the shard's {INDEX_FILE}",
                                    hint="rebuild that shard")
            found[entry.id] = (entry, shard)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for artifact_id, (entry, shard) in sorted(found.items()):
        source, target = shard / artifact_id, out / artifact_id
        if not source.is_dir() or (target.exists() and source.resolve() == target.resolve()):
            continue
        present = read_entry(target)
        if present is not None and present.build_key == entry.build_key and files_intact(target, present):
            progress(f"{artifact_id}: already in {out}")
            continue
        progress(f"{artifact_id}: from {shard}")
        from exporter.artifact import atomic_dir

        with atomic_dir(target, overwrite=True) as tmp:
            shutil.rmtree(tmp)
            shutil.copytree(source, tmp)
    entries = tuple(entry for _, (entry, _) in sorted(found.items()))
    index = BuildIndex(result=overall(entries), artifacts=entries, matrix=" + ".join(sorted(matrices)))
    write_json_atomic(out / INDEX_FILE, index)
    return index
