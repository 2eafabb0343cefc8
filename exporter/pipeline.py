"""The stage order. Only this module knows it; every stage is a function elsewhere.

export:   check recipe -> load -> quantize (quant/apply.py) -> backend.lower -> manifest
verify:   artifact runner vs rebuilt quantized eager model vs float model -> parity.json
bench:    the runtime's own loop in a worker on the device -> bench.json
generate: greedy through the artifact
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from exporter import artifact as art
from exporter.backends import get_backend
from exporter.backends.base import STATIC_SCALES, check_recipe
from exporter.devices import Device, get_device
from exporter.errors import ArtifactError, OutputError, RecgptError, StageError, UsageError
from exporter.manifest import EXPORT_LOG, MANIFEST_VERSION, ArtifactManifest, ExportLog, ModelFacts, TargetFacts
from exporter.memory import release_memory
from exporter.recipe_io import recipe_to_dict
from exporter.records import write_json_atomic
from exporter.reports import BENCH_FILE, PARITY_FILE, BenchReport, ParityReport
from exporter.spec import ExportRecipe, ScaleSearchSpec, TuningSpec

Progress = Callable[[str], None]
# verify's prefix check: logits after each behaviour prompt and this many - 1 greedy tokens.
PREFIX_DECODE_STEPS = 4


def _quiet(_: str) -> None:
    pass


@dataclass
class Stage:
    """Times a stage and re-raises unexpected failures as StageError(stage=..., target=...)."""

    name: str
    target: str
    timings: dict
    progress: Progress

    def __enter__(self):
        self.progress(self.name)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.timings[self.name] = round(time.perf_counter() - self._t0, 3)
        if exc is None or isinstance(exc, (RecgptError, KeyboardInterrupt)):
            return False
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            what = (exc.strerror or str(exc)).lower()
            raise OutputError(f"stage {self.name}: {what} (writing {exc.filename or 'the output'}); "
                              "nothing was left behind",
                              hint="free space where the output goes, or choose another --out") from exc
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StageError(f"stage {self.name} failed for target {self.target}: {type(exc).__name__}: {first_line}",
                         stage=self.name, target=self.target,
                         hint="rerun with --debug for the traceback") from exc


def export(recipe: ExportRecipe, *, out_dir: Path, model: str | None = None, adapter: str | None = None,
           force: bool = False, progress: Progress = _quiet) -> Path:
    """``adapter``: a LoRA adapter folder merged into ``model`` (the recipe's model.adapter
    goes with the recipe's model.source, not with a --model)."""
    from exporter.adapters import adapter_facts
    from exporter.decoder import DecoderShape
    from exporter.intent.prompt import cached_prefix_ids
    from exporter.load import adapter_of, base_checkpoint, load_model, read_config, weights_digest, with_adapter
    from exporter.quant.apply import float_decoder, quantize_decoder, tuning_samples
    from exporter.quant.calibration import with_absolute_calibration

    check_recipe(recipe)
    backend = get_backend(recipe.target.name)
    source = model or recipe.model.source
    if not source:
        raise UsageError(f"recipe {recipe.name!r} names no model",
                         hint="pass --model (a checkpoint folder, a .gguf file or builtin:NAME)")
    if not source.startswith("builtin:") and Path(source).exists():
        source = str(Path(source).resolve())  # verify may run from another directory
    adapter = adapter or (recipe.model.adapter if model is None else "")
    if adapter:
        from exporter.adapters import check_adapter

        adapter = str(Path(adapter).resolve())
        check_adapter(Path(adapter))  # before the out folder exists
    adapter_of(source, adapter or None)  # a builtin that carries its own refuses another, here too
    recipe = with_absolute_calibration(recipe)
    timings: dict = {}
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise UsageError(f"{out_dir} already exists", hint="choose another --out or pass --force to replace it")

    with art.atomic_dir(out_dir, overwrite=force) as tmp:
        with Stage("load", backend.name, timings, progress):
            base = base_checkpoint(source, on_progress=progress)
            backend.check_shape(DecoderShape.from_config(read_config(base)), recipe)  # before the weights
            checkpoint = with_adapter(base, source, adapter or None, on_progress=progress)
            loaded = load_model(checkpoint, on_progress=progress)
            facts = ModelFacts.of(loaded, recipe, source=source, weights_sha256=weights_digest(loaded.checkpoint_dir),
                                  adapter=adapter_facts(checkpoint),
                                  prompt_prefix_ids=cached_prefix_ids(recipe.task, loaded.tokenizer))
        with Stage("quantize", backend.name, timings, progress):
            lm = float_decoder(loaded.model, recipe, backend)
            samples = tuning_samples(lm, loaded, recipe.quant, progress)  # the float model writes their continuations
            # The float checkpoint is not needed past this point: the decoder holds its own
            # copy of the weights. Dropping it before quantizing takes one full copy of the
            # weights off the export's peak memory.
            loaded = replace(loaded, model=None)
            release_memory()
            quantized = quantize_decoder(lm, loaded, recipe, backend, progress, samples=samples)
        release_memory()  # quantization's temporaries, before lowering's peak
        with Stage("lower", backend.name, timings, progress):
            lowered = backend.lower(lm, quantized, recipe=recipe, model=facts, out_dir=tmp, on_stage=progress)
        with Stage("write", backend.name, timings, progress):
            # Saved from the loaded tokenizer, not copied: transformers may replace parts of
            # tokenizer.json by model type (Qwen2Tokenizer installs its own pre-tokenizer and
            # NFC normalizer), and the device must run what training ran.
            loaded.tokenizer.save_pretrained(tmp)
            manifest = ArtifactManifest(
                manifest_version=MANIFEST_VERSION, name=recipe.name, recipe=recipe_to_dict(recipe), model=facts,
                target=TargetFacts(name=backend.name, info=lowered.target_info),
                roles={**lowered.roles, "tokenizer": "tokenizer.json"},
                io_signature=lowered.io_signature, quantization=quantized.summary.to_dict(),
                environment=art.environment(), files=art.file_table(tmp),
            )
            write_json_atomic(tmp / art.MANIFEST, manifest)
        stage_times = {**timings, **{f"lower.{k}": round(v, 3) for k, v in lowered.timings_s.items()}}
        write_json_atomic(tmp / EXPORT_LOG, ExportLog(created=art.now_iso(), timings_s=stage_times))
    return out_dir


def recipe_of(artifact) -> ExportRecipe:
    from exporter.recipe_io import recipe_from_dict

    return recipe_from_dict(artifact.manifest.recipe)


def verify(folder: Path, *, model: str | None = None, device: str | Device = "host", prompts: int | None = None,
           decode_steps: int | None = None, greedy_tokens: int | None = None, eval_set: str | None = None,
           sessions: int | None = None, progress: Progress = _quiet, report_file: str = PARITY_FILE) -> ParityReport:
    """Run every parity check on an artifact; write DIR/parity.json and return the report.

    ``device``: where the artifact runs (exporter/devices). A device without this tool's
    Python runs it through the backend's native runner, and the report adds the same
    artifact's host run (``device_vs_host``). ``prompts`` / ``decode_steps`` / ``greedy_tokens`` override the
    recipe's parity budget (an emulator is slow); the report records what ran. ``eval_set``
    ("builtin" or a JSONL file; default the recipe's task.eval) adds the task section: the
    float model's next queries against the artifact's, on ``sessions`` sessions. ``report_file``:
    the report's name in the folder (`build` keeps one per device)."""
    from exporter.load import carries_own_adapter, load_model, weights_digest
    from exporter.parity import (
        check_parity,
        noise_references,
        parity_prompts,
        prefix_failures,
        prefix_parity,
        tokenizer_parity,
    )
    from exporter.prompts import TOKENIZER_CORPUS
    from exporter.quant.apply import build_quantized
    from exporter.runners import EagerRunner, PrefixCachedRunner, TransformersRunner

    target_device = get_device(device)
    artifact = art.read_artifact(folder)
    recipe = recipe_of(artifact)
    budget = {k: v for k, v in dict(prompts=prompts, decode_steps=decode_steps, greedy_tokens=greedy_tokens).items()
              if v is not None}
    if budget:
        recipe = replace(recipe, parity=replace(recipe.parity, **budget))
    task = replace(recipe.task, **{k: v for k, v in dict(eval=eval_set, sessions=sessions).items() if v is not None})
    task_sessions = None
    if task.eval:
        from exporter.intent.evalset import read_eval_set

        task_sessions = read_eval_set(task.eval)[:task.sessions]  # a bad line is refused before any model runs
    backend = get_backend(artifact.target)
    device_facts, host_candidate = target_device.describe(), None
    facts = artifact.manifest.model
    timings: dict = {}
    with Stage("load", backend.name, timings, progress):
        # The manifest's adapter path is where it was merged from, maybe another checkout: a
        # builtin that carries its own merges it again, and the weights digest below proves it the same.
        adapter = None if model is not None or carries_own_adapter(facts.source) else (facts.adapter or None)
        loaded = load_model(model or facts.source, adapter=adapter, on_progress=progress)
        if weights_digest(loaded.checkpoint_dir) != facts.weights_sha256:
            raise ArtifactError(
                f"the checkpoint {loaded.checkpoint_dir} is not the one {folder} was exported from "
                f"(weights sha256 differs from the manifest's)",
                hint="pass --model with the checkpoint the artifact was built from",
            )
        if target_device.python() is None:
            from exporter.devices.native import open_native_runner

            device_runner, device_facts = open_native_runner(target_device, backend, artifact,
                                                             threads=recipe.bench.threads)
            candidate = device_runner
            host_candidate = backend.load_runner(artifact)
        else:
            candidate = backend.load_runner(artifact)
    with Stage("reference", backend.name, timings, progress):
        reference_recipe = recipe
        if backend.capabilities.adopts_artifact_weights:
            # The artifact's stored weights replace every quantized one below, so searching
            # scales again would be wasted work (and need not give the same near-ties).
            reference_recipe = replace(recipe, quant=replace(recipe.quant, scale_search=ScaleSearchSpec(),
                                                             tuning=TuningSpec()))
            if backend.capabilities.int8_kv_cache == STATIC_SCALES:
                # So would calibrating a static int8 cache's scales: they are adopted too.
                reference_recipe = replace(reference_recipe, kv_cache=replace(recipe.kv_cache, dtype="float32"))
        lm, quantized = build_quantized(loaded, reference_recipe, backend, progress)  # tuning again: its steps
        backend.prepare_reference(lm, quantized, artifact)
    with Stage("tokenizer", backend.name, timings, progress):
        encode, decode = backend.shipped_tokenizer(artifact)
        tok_report = tokenizer_parity(loaded.tokenizer, encode, decode, TOKENIZER_CORPUS)
    prompts, heldout = parity_prompts(loaded.tokenizer, recipe.parity, recipe.kv_cache.max_seq_len)
    with Stage("parity", backend.name, timings, progress):
        report = check_parity(
            candidate=candidate, quantized_reference=EagerRunner(lm, name="quantized eager (torch)"),
            float_reference=TransformersRunner(loaded.model, name="float (transformers)"),
            prompts=prompts, heldout=heldout, tokenizer_report=tok_report, spec=recipe.parity,
            eos_ids=set(facts.eos_ids), on_step=progress, noise_references=noise_references(lm, recipe),
            host_candidate=host_candidate,
        )
    if facts.prompt_prefix_ids:
        with Stage("prefix", backend.name, timings, progress):
            from exporter.intent.evalset import read_eval_set
            from exporter.intent.prompt import behaviour_prompt_ids

            sessions_for_prefix = (task_sessions or read_eval_set("builtin"))[:recipe.parity.prompts]
            prefix_report = prefix_parity(candidate, facts.prompt_prefix_ids,
                                          behaviour_prompt_ids(sessions_for_prefix, task, loaded.tokenizer,
                                                               fits=facts.max_seq_len - PREFIX_DECODE_STEPS),
                                          steps=PREFIX_DECODE_STEPS)
            failures = [*report.failures, *prefix_failures(recipe.parity, report.lowering, prefix_report)]
            report = replace(report, prefix=prefix_report, failures=tuple(failures), passed=not failures)
        candidate = PrefixCachedRunner(candidate, facts.prompt_prefix_ids)  # the task is served as the app would
    if task_sessions is not None:
        with Stage("task", backend.name, timings, progress):
            from exporter.intent.task import run_task, with_task

            task_report = run_task(task, task_sessions, loaded, candidate, facts, progress)
            report = with_task(report, task_report, task.agreement_min)
    if host_candidate is not None:
        device_runner.close()
        target_device.cleanup()
    report = replace(report, timings_s=timings, device_facts=device_facts,
                     compared=replace(report.compared, device=device_facts.name,
                                      runtime=device_facts.runtime or backend.runtime_name(),
                                      environment=art.environment(), artifact=artifact.manifest.name))
    write_json_atomic(Path(folder) / report_file, report)
    return report


def bench(folder: Path, *, runs: int | None = None, warmup: int | None = None, threads: int | None = None,
          device: str | Device = "host", progress: Progress = _quiet, report_file: str = BENCH_FILE) -> BenchReport:
    from exporter.bench import run_bench

    artifact = art.read_artifact(folder)
    spec = recipe_of(artifact).bench
    overrides = {k: v for k, v in dict(runs=runs, warmup=warmup, threads=threads).items() if v is not None}
    spec = replace(spec, **overrides)
    report = run_bench(artifact, get_backend(artifact.target), spec, get_device(device), progress=progress)
    write_json_atomic(Path(folder) / report_file, report)
    return report


def generate(folder: Path, prompt: str | None = None, *, behaviours: Sequence[str] = (),
             max_new_tokens: int = 64) -> str:
    """The artifact's greedy continuation of ``prompt``; or, given ``behaviours`` ("ACTION:TEXT",
    oldest first), the next query it predicts for that session: the behaviour prompt in the
    recipe's [task] format, as verify's task section and the app build it, stopped at the end
    of the query."""
    from exporter.runners import PrefixCachedRunner, greedy

    artifact = art.read_artifact(folder)
    backend = get_backend(artifact.target)
    encode, decode = backend.shipped_tokenizer(artifact)
    facts = artifact.manifest.model
    stop_ids = set(facts.eos_ids)
    if behaviours:
        from exporter.intent.prompt import behaviour_prompt_ids
        from exporter.intent.task import task_stop_ids
        from exporter.load import load_tokenizer

        task = recipe_of(artifact).task
        tokenizer = load_tokenizer(artifact.path)  # the shipped files, with their chat template
        ids = behaviour_prompt_ids([{"behaviours": [_behaviour(b) for b in behaviours]}], task, tokenizer)[0]
        stop_ids, max_new_tokens = task_stop_ids(tokenizer, facts), task.max_new_tokens
    elif prompt:
        ids = encode(prompt)
    else:
        raise UsageError("give --prompt TEXT or --behaviour ACTION:TEXT (one per event, oldest first)")
    if not ids:
        raise UsageError("the prompt encodes to no tokens")
    budget = facts.max_seq_len - len(ids)
    if budget <= 0:
        raise UsageError(f"the prompt has {len(ids)} tokens; this artifact holds at most {facts.max_seq_len - 1}")
    runner = PrefixCachedRunner(backend.load_runner(artifact), facts.prompt_prefix_ids)
    tokens = greedy(runner, ids, min(max_new_tokens, budget), stop_ids)
    return decode([t for t in tokens if t not in stop_ids])


def _behaviour(text: str) -> dict:
    from exporter.intent.prompt import ACTION_TAGS

    action, sep, what = text.partition(":")
    if not sep or action not in ACTION_TAGS or not what.strip():
        raise UsageError(f"--behaviour {text!r}: expected ACTION:TEXT with ACTION one of {', '.join(ACTION_TAGS)}",
                         hint='e.g. --behaviour "search:无线蓝牙耳机" --behaviour "click:降噪耳机 头戴式"')
    return {"action": action, "text": what.strip()}
