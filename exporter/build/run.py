"""The build: every planned artifact exported, verified (the host, then each device) and benched.

Three phases, so the numbers stay honest and one failure loses nothing else:
1. inputs: each artifact's build key (model digest, resolved recipe, tool versions, checks);
   an artifact whose build.json has the same key is kept as it is (unless ``force``);
2. prove: export + verify, in ``jobs`` worker processes when asked (memory checked first);
   a stage error in one artifact is recorded in its entry and the others go on;
3. bench: one artifact at a time with nothing else of ours running (two exports beside a
   benchmark would halve its figures). With one job, each artifact is proved and benched
   before the next starts.
Each artifact's build.json is written last; index.json is rewritten after every artifact, so
an interrupted build leaves a valid index of what finished, and the next run resumes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

from exporter.build.index import (
    ENTRY_FILE,
    ERROR,
    FAILED,
    INDEX_FILE,
    PASSED,
    ArtifactEntry,
    BuildIndex,
    GateValue,
    ModelInput,
    files_intact,
    overall,
    read_entry,
)
from exporter.build.matrix import BuildPlan, MatrixFile, PlannedArtifact, slug
from exporter.build.resources import ExportNeed, available_bytes, export_need, most_jobs, parameters_of
from exporter.errors import RecgptError, StageError, UsageError
from exporter.records import write_json_atomic

# (artifact id, message): one line per artifact and stage.
StageLine = Callable[[str, str], None]
# (entry, artifacts done, artifacts in the build): after each artifact.
ArtifactDone = Callable[[ArtifactEntry, int, int], None]


@dataclass(frozen=True, kw_only=True)
class Inputs:
    """What goes into one artifact's bytes and checks, and its digest (the build key)."""

    model: ModelInput
    recipe: dict
    key: str
    parameters: int
    tuned: bool


def build(plan: BuildPlan, out: Path, *, jobs: int = 1, force: bool = False, shard: str = "",
          stage_line: StageLine, artifact_done: ArtifactDone) -> BuildIndex:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _checkpoint_digests.cache_clear()  # a checkpoint may have changed since an earlier build in this process
    inputs = {a.id: artifact_inputs(a, plan.matrix, stage_line) for a in plan.artifacts}
    entries: dict[str, ArtifactEntry] = {}
    todo = []
    for artifact in plan.artifacts:
        kept = None if force else read_entry(out / artifact.id)
        if kept is not None and kept.build_key == inputs[artifact.id].key and kept.result != ERROR \
                and files_intact(out / artifact.id, kept):
            entries[artifact.id] = kept
            stage_line(artifact.id, "up to date (same build key); kept")
        else:
            todo.append(artifact)
    check_jobs(jobs, [export_need(a.id, inputs[a.id].parameters, inputs[a.id].tuned) for a in todo])

    def finish(entry: ArtifactEntry) -> None:
        if (out / entry.id).is_dir():  # an export that failed left no folder, and nothing to mark
            write_json_atomic(out / entry.id / ENTRY_FILE, entry)
        entries[entry.id] = entry
        write_index(out, plan, entries, shard)
        artifact_done(entry, len(entries), len(plan.artifacts))

    for artifact_id in entries:
        artifact_done(entries[artifact_id], list(entries).index(artifact_id) + 1, len(plan.artifacts))
    def benched(entry: ArtifactEntry) -> ArtifactEntry:
        if plan.matrix.bench and entry.result != ERROR:
            return bench_artifact(entry, out / entry.id, plan.matrix, stage_line)
        return entry

    if jobs == 1 or len(todo) <= 1:  # each artifact done before the next: an interrupt loses one at most
        for artifact in todo:
            finish(benched(prove_artifact(artifact, plan.matrix, out, inputs[artifact.id], stage_line)))
    else:
        proven = prove_all(todo, plan.matrix, out, inputs, jobs, stage_line)
        for artifact in todo:  # phase 3, one at a time, in id order, with no worker alive
            finish(benched(proven[artifact.id]))
    return write_index(out, plan, entries, shard)


def write_index(out: Path, plan: BuildPlan, entries: dict[str, ArtifactEntry], shard: str) -> BuildIndex:
    ordered = tuple(entries[a.id] for a in plan.artifacts if a.id in entries)
    index = BuildIndex(result=overall(ordered), artifacts=ordered, matrix=plan.source, shard=shard)
    write_json_atomic(out / INDEX_FILE, index)
    return index


# -- phase 1: inputs ----------------------------------------------------------------------------


def artifact_inputs(artifact: PlannedArtifact, matrix: MatrixFile, stage_line: StageLine) -> Inputs:
    """The build key: sha256 over the checkpoint (weights, config, tokenizer), the resolved
    recipe, the tracked tool versions, and what the build checks (devices, budgets, eval set)."""
    from exporter.artifact import environment
    from exporter.load import read_config, resolve_checkpoint
    from exporter.quant.calibration import with_absolute_calibration
    from exporter.recipe_io import load_recipe, recipe_to_dict

    recipe = with_absolute_calibration(load_recipe(artifact.recipe_path, list(artifact.overrides)))
    source = artifact.model.source or recipe.model.source
    adapter = artifact.model.adapter or (recipe.model.adapter if not artifact.model.source else "")
    stage_line(artifact.id, "hashing the inputs")
    checkpoint = resolve_checkpoint(source, adapter=adapter or None,
                                    on_progress=lambda message: stage_line(artifact.id, message))
    weights, side_files = _checkpoint_digests(checkpoint)
    model = ModelInput(name=artifact.model.name, source=source, adapter=adapter, weights_sha256=weights,
                       files_sha256=side_files)
    resolved = recipe_to_dict(recipe)
    checks = {"devices": list(matrix.devices), "verify": matrix.verify.__dict__,
              "device_verify": matrix.device_verify.__dict__, "bench": matrix.bench, "sessions": matrix.sessions,
              "eval": _eval_digest(matrix.eval or recipe.task.eval)}
    material = {"model": model.__dict__ | {"name": ""}, "recipe": resolved,
                "packages": environment()["packages"], "checks": checks}
    key = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()
    return Inputs(model=model, recipe=resolved, key=key, parameters=parameters_of(read_config(checkpoint)),
                  tuned=recipe.quant.tuning.steps > 0)


@functools.cache
def _checkpoint_digests(checkpoint: Path) -> tuple[str, str]:
    """(weights, config and tokenizer files): hashed once per build for a model's recipes."""
    from exporter.load import weights_digest

    return weights_digest(checkpoint), _side_files_digest(checkpoint)


def _side_files_digest(checkpoint: Path) -> str:
    from exporter.load import files_digest

    return files_digest(p for p in checkpoint.iterdir() if p.is_file() and p.suffix in (".json", ".txt", ".model")
                        and p.name != "SOURCE.json")


def _eval_digest(eval_set: str) -> str:
    if not eval_set:
        return ""
    from exporter.artifact import sha256_file
    from exporter.intent.evalset import BUILTIN, BUILTIN_PATH

    return sha256_file(BUILTIN_PATH if eval_set == BUILTIN else Path(eval_set))


def check_jobs(jobs: int, needs: list[ExportNeed]) -> None:
    """Refuse a --jobs whose exports would not fit in the memory available now."""
    if jobs < 1:
        raise UsageError(f"--jobs {jobs} must be at least 1")
    if jobs == 1 or len(needs) <= 1:
        return
    available = available_bytes()
    fit = most_jobs(needs[:], available)
    if jobs > fit:
        largest = max(needs, key=lambda n: n.bytes)
        raise UsageError(
            f"--jobs {jobs} will not fit: one export of {largest.artifact} ({largest.parameters / 1e6:.0f}M "
            f"parameters{', tuned' if largest.tuned else ''}) needs about {largest.bytes / 2**30:.1f} GiB and "
            f"{available / 2**30:.1f} GiB is available",
            hint=f"use --jobs {fit} or fewer (docs/ci.md: what one export needs)")


# -- phase 2: prove -----------------------------------------------------------------------------


def prove_all(todo: list[PlannedArtifact], matrix: MatrixFile, out: Path, inputs: dict[str, Inputs], jobs: int,
              stage_line: StageLine) -> dict[str, ArtifactEntry]:
    """Export and verify in ``jobs`` worker processes."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    proven = {}
    # spawn: a fresh interpreter per worker (torch's threads do not survive fork)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=_worker_init,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(prove_artifact, a, matrix, out, inputs[a.id], stage_line): a for a in todo}
        for future in as_completed(futures):
            entry = future.result()
            proven[entry.id] = entry
    return proven


def _worker_init(threads: int) -> None:
    import torch

    from exporter.quiet import quiet_libraries

    torch.set_num_threads(threads)
    quiet_libraries()


def prove_artifact(artifact: PlannedArtifact, matrix: MatrixFile, out: Path, inputs: Inputs,
                   stage_line: StageLine) -> ArtifactEntry:
    """Export, then verify on the host and on each device; a stage error becomes the entry's."""
    import time

    from exporter import pipeline
    from exporter.recipe_io import recipe_from_dict

    folder = out / artifact.id
    recipe = recipe_from_dict(inputs.recipe)  # the manifest records this same resolved recipe
    seconds: dict[str, float] = {}
    reports: list[str] = []
    gates: list[GateValue] = []
    failures: list[str] = []
    figures: dict[str, float] = {}
    stage = "export"
    try:
        t0 = time.perf_counter()
        pipeline.export(recipe, out_dir=folder, model=inputs.model.source,
                        adapter=inputs.model.adapter or None, force=True,
                        progress=lambda message: stage_line(artifact.id, f"export: {message}"))
        seconds["export"] = round(time.perf_counter() - t0, 1)
        for device in ("host", *matrix.devices):
            stage = f"verify {device}"
            budget = matrix.verify if device == "host" else matrix.device_verify
            name = report_name("parity", device)
            t0 = time.perf_counter()
            report = pipeline.verify(folder, device=device, prompts=budget.prompts or None,
                                     decode_steps=budget.decode_steps or None,
                                     greedy_tokens=budget.greedy_tokens or None,
                                     eval_set=(matrix.eval or None) if device == "host" else None,
                                     sessions=(matrix.sessions or None) if device == "host" else None,
                                     progress=lambda message, s=stage: stage_line(artifact.id, f"{s}: {message}"),
                                     report_file=name)
            seconds[stage] = round(time.perf_counter() - t0, 1)
            reports.append(name)
            gates.extend(gates_of(report, recipe, name))
            failures.extend(f"{name}: {failure}" for failure in report.failures)
            figures.update(parity_figures(report, device))
    except Exception as exc:  # noqa: BLE001 - one artifact's failure, of any kind, must not lose the others
        if not isinstance(exc, RecgptError):
            exc = unexpected(exc, stage)
        if stage == "export" and folder.exists() and read_entry(folder) is not None:
            shutil.rmtree(folder)  # an older build of it; the index now says it did not build
        return _entry(artifact, inputs, folder, result=ERROR, gates=gates, failures=failures, figures=figures,
                      reports=reports, matrix=matrix, seconds=seconds, error=str(exc), stage=stage)
    return _entry(artifact, inputs, folder, result=FAILED if failures else PASSED, gates=gates, failures=failures,
                  figures=figures, reports=reports, matrix=matrix, seconds=seconds)


def unexpected(exc: Exception, stage: str) -> StageError:
    """A failure we did not foresee (a bug): recorded like a StageError, so the build goes on
    and exits 8; `recgpt-export --debug` on that artifact's command shows the traceback."""
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return StageError(f"stage {stage} failed: {type(exc).__name__}: {first_line}", stage=stage)


def report_name(kind: str, device: str) -> str:
    """parity.json / bench.json on the host; parity.<device>.json on a device."""
    return f"{kind}.json" if device == "host" else f"{kind}.{slug(device)}.json"


def _entry(artifact: PlannedArtifact, inputs: Inputs, folder: Path, *, result: str, gates, failures, figures,
           reports, matrix: MatrixFile, seconds, error: str = "", stage: str = "") -> ArtifactEntry:
    from exporter.artifact import MANIFEST, content_files, environment

    target, name = inputs.recipe["target"]["name"], inputs.recipe["name"]
    files = content_files(folder) if (folder / MANIFEST).is_file() else {}
    return ArtifactEntry(id=artifact.id, result=result, model=inputs.model, recipe=name,
                         recipe_ref=artifact.recipe_ref, overrides=artifact.overrides, target=target,
                         build_key=inputs.key, files=files,
                         bytes=sum(f.bytes for f in files.values()), gates=tuple(gates), failures=tuple(failures),
                         figures=figures, reports=tuple(reports), devices=matrix.devices,
                         environment=environment(), error=error, stage=stage, seconds=seconds)


def gates_of(report, recipe, report_file: str) -> list[GateValue]:
    """Every gate ``report`` was judged on, with the limit the recipe set."""
    from exporter.intent.task import task_check
    from exporter.parity import gate_checks, prefix_checks

    spec = recipe.parity
    checks = gate_checks(spec, report.lowering, report.quality, report.greedy, report.tokenizer)
    if report.prefix is not None:
        checks += prefix_checks(spec, report.lowering, report.prefix)
    if report.task is not None:
        checks.append(task_check(report.task, recipe.task.agreement_min))
    return [GateValue(report=report_file, name=c.name, value=c.value, limit=c.limit, at_least=c.at_least,
                      passed=c.passed) for c in checks]


def parity_figures(report, device: str) -> dict[str, float]:
    at = "" if device == "host" else f"@{slug(device)}"
    figures = {f"kl_mean{at}": report.quality.kl_mean, f"top1{at}": report.quality.top1_agreement,
               f"lowering_max_abs{at}": report.lowering.max_abs_diff,
               f"greedy_exact{at}": report.greedy.exact_match_rate}
    if report.quality.ppl_candidate is not None:
        figures[f"ppl{at}"] = report.quality.ppl_candidate
    if report.task is not None:
        figures[f"task_agreement{at}"] = report.task.agreement_top1.value
        figures[f"task_sessions{at}"] = float(report.task.sessions)
    return figures


# -- phase 3: bench -----------------------------------------------------------------------------


def bench_artifact(entry: ArtifactEntry, folder: Path, matrix: MatrixFile, stage_line: StageLine) -> ArtifactEntry:
    import time

    from exporter import pipeline

    t0 = time.perf_counter()
    try:
        report = pipeline.bench(folder, progress=lambda message: stage_line(entry.id, f"bench: {message}"))
    except Exception as exc:  # noqa: BLE001 - as in prove_artifact
        error = exc if isinstance(exc, RecgptError) else unexpected(exc, "bench")
        return replace(entry, result=ERROR, error=str(error), stage="bench")
    figures = {**entry.figures, "decode_tok_s": report.decode_tok_s.median,
               "prefill_tok_s": report.prefill_tok_s.median, "ttft_ms": report.ttft_ms.median,
               "peak_rss_mb": report.peak_rss_mb, "artifact_mb": report.artifact_mb}
    if report.prefix_ttft is not None:
        figures["prefix_ttft_ms"] = report.prefix_ttft.cached_ttft_ms.median
    return replace(entry, figures=figures, reports=(*entry.reports, "bench.json"),
                   notes=(*entry.notes, *(f"bench.json: unstable {sentence}" for sentence in report.unstable)),
                   seconds={**entry.seconds, "bench": round(time.perf_counter() - t0, 1)})
