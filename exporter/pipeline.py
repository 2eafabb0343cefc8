"""The stage order. Only this module knows it; every stage is a plain function elsewhere.

export:  load_model -> build_decoder -> apply_quantization -> backend.lower -> manifest
verify:  artifact runner vs rebuilt quantized eager model vs float model -> parity.json
bench:   artifact -> bench.json
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from exporter import artifact as art
from exporter.backends import get_backend
from exporter.errors import ArtifactError, RecgptError, StageError, UsageError
from exporter.memory import release_memory
from exporter.recipe_io import recipe_to_dict
from exporter.spec import ExportRecipe, ScaleSearchSpec, TuningSpec

Progress = Callable[[str], None]


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
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StageError(f"stage {self.name} failed for target {self.target}: {type(exc).__name__}: {first_line}",
                         stage=self.name, target=self.target,
                         hint="rerun with --debug for the traceback") from exc


def model_metadata(loaded, recipe: ExportRecipe) -> dict:
    """What the on-device runner needs to know, stored as constant methods / manifest fields."""
    config, tokenizer = loaded.config, loaded.tokenizer
    eos = config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    bos = config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id
    return {
        "architecture": loaded.architecture,
        "vocab_size": config.vocab_size,
        "n_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "max_seq_len": recipe.kv_cache.max_seq_len,
        "max_prefill_len": recipe.kv_cache.max_prefill_len,
        "bos_id": -1 if bos is None else int(bos),
        "eos_ids": sorted(int(e) for e in eos_ids),
    }


def build_quantized(loaded, recipe: ExportRecipe, backend):
    """Decoder with the recipe's cache and quantization applied, as the backend will store it.

    Each backend quantizes in its own storage format (``backend.quantize``) so that the
    returned eager model computes with exactly the weights the artifact holds, and picks the
    eager attention of its reference (``backend.eager_kv_cache``)."""
    lm = float_decoder(loaded.model, recipe, backend)
    return lm, quantize_decoder(lm, loaded.tokenizer, recipe, backend)


def float_decoder(hf_model, recipe: ExportRecipe, backend):
    """The float StaticCacheLM with the recipe's cache and the backend's eager attention."""
    from exporter.decoder import build_decoder
    from exporter.kv_cache import load_custom_ops

    attention, cache_update = backend.eager_kv_cache(recipe)
    if attention == "custom_sdpa" or cache_update == "custom":
        load_custom_ops()
    return build_decoder(hf_model, max_seq_len=recipe.kv_cache.max_seq_len,
                         max_prefill_len=recipe.kv_cache.max_prefill_len,
                         attention=attention, cache_update=cache_update)


def quantize_decoder(lm, tokenizer, recipe: ExportRecipe, backend, progress: Progress = _quiet):
    """Smooth, split the lm_head, quantize and tune ``lm`` in place; return the QuantSummary."""
    tuning = recipe.quant.tuning
    if tuning.steps:
        from exporter.smoothing import calibration_samples, calibration_texts
        from exporter.tuning import continued_samples, float_log_probs

        tuning_samples = calibration_samples(lm, tokenizer, calibration_texts(tuning, "quant.tuning.calibration"))
        if tuning.generated_tokens:
            progress(f"tune: the float model continues {len(tuning_samples)} calibration texts")
            end = {tokenizer.eos_token_id} - {None}
            tuning_samples = continued_samples(lm, tuning_samples, tuning.generated_tokens, end)
        tuning_targets = float_log_probs(lm, tuning_samples)  # from the float decoder, before anything changes it
    smoothing = None
    if recipe.quant.smoothing.alpha > 0:
        from exporter.smoothing import smooth_for_quantization

        smoothing = smooth_for_quantization(lm, tokenizer, recipe.quant.smoothing)
    if recipe.quant.lm_head_split:
        from exporter.decoder import split_lm_head

        split_lm_head(lm, recipe.quant.lm_head_split)  # after smoothing, which scales the whole lm_head
    if recipe.quant.scale_search.method == "activation":
        from exporter.scale_search import calibrate

        # On the smoothed weights' inputs: those are what the quantized layers will see.
        grams, scale_search = calibrate(lm, tokenizer, recipe.quant)
        summary = backend.quantize(lm, recipe.quant, recipe.target, grams=grams)  # only backends that search accept it
        summary.scale_search = scale_search
    else:
        summary = backend.quantize(lm, recipe.quant, recipe.target)
    summary.smoothing = smoothing
    if tuning.steps:
        from exporter.tuning import tune

        summary.tuning = tune(lm, tuning_samples, tuning_targets, tuning, on_step=progress)
    return summary


def export(recipe: ExportRecipe, *, out_dir: Path, model: str | None = None, force: bool = False,
           progress: Progress = _quiet) -> Path:
    backend = get_backend(recipe.target.name)
    backend.validate(recipe)
    source = model or recipe.model.source
    if not source.startswith("builtin:") and Path(source).exists():
        source = str(Path(source).resolve())  # verify may run from another directory
    recipe = _with_absolute_calibration(recipe)
    timings: dict = {}
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise UsageError(f"{out_dir} already exists", hint="choose another --out or pass --force to replace it")
    from exporter.load import load_model, weights_digest

    with art.atomic_dir(out_dir, overwrite=force) as tmp:
        with Stage("load", backend.name, timings, progress):
            loaded = load_model(source, on_progress=progress)
        meta = model_metadata(loaded, recipe)
        with Stage("quantize", backend.name, timings, progress):
            lm = float_decoder(loaded.model, recipe, backend)
            # The float checkpoint is not needed past this point: the decoder holds its own
            # copy of the weights. Dropping it before quantizing takes one full copy of the
            # weights off the export's peak memory (SmolLM2 int4: 2.0 -> 1.7 GB).
            loaded = replace(loaded, model=None)
            release_memory()
            summary = quantize_decoder(lm, loaded.tokenizer, recipe, backend, progress)
        release_memory()  # quantization's temporaries, before lowering's peak
        with Stage("lower", backend.name, timings, progress):
            lowered = backend.lower(lm, recipe=recipe, model=meta, metadata=runtime_constants(meta, recipe), out_dir=tmp,
                                    on_stage=progress)
        with Stage("write", backend.name, timings, progress):
            # Saved from the loaded tokenizer, not copied: transformers may replace parts of
            # tokenizer.json by model type (Qwen2Tokenizer installs its own pre-tokenizer and
            # NFC normalizer), and the device must run what training ran.
            loaded.tokenizer.save_pretrained(tmp)
            from exporter.capture import io_signature

            manifest = {
                "manifest_version": art.MANIFEST_VERSION,
                "name": recipe.name,
                "created": art.now_iso(),
                "recipe": recipe_to_dict(recipe),
                "model": {"source": source, "checkpoint_dir": str(loaded.checkpoint_dir),
                          "weights_sha256": weights_digest(loaded.checkpoint_dir), **meta},
                "target": {"name": backend.name, "backend": recipe.target.backend, **lowered.get("target_info", {})},
                "roles": {**lowered["roles"], "tokenizer": "tokenizer.json"},
                # A backend whose program differs (ONNX's named tensors, Core ML's int32 inputs) returns its own.
                "io_signature": lowered.get("io_signature") or io_signature(lm),
                "quantization": summary.to_dict(),
                "runtime_constants": runtime_constants(meta, recipe),
                "environment": art.environment(),
                "timings_s": {**timings, **{f"lower.{k}": round(v, 3) for k, v in lowered["timings"].items()}},
            }
            manifest["files"] = art.file_table(tmp)
            art.write_json_atomic(tmp / art.MANIFEST, manifest)
    return out_dir


def _with_absolute_calibration(recipe: ExportRecipe) -> ExportRecipe:
    """Check calibration files before any work, and record their absolute paths: verify
    rebuilds the reference from the manifest's recipe, maybe from another directory."""
    from exporter.smoothing import calibration_texts

    quant = recipe.quant
    for table, used in (("smoothing", quant.smoothing.alpha > 0), ("scale_search", quant.scale_search.method != "none"),
                        ("tuning", quant.tuning.steps > 0)):
        spec = getattr(quant, table)
        if used and spec.calibration != "builtin":
            calibration_texts(spec, f"quant.{table}.calibration")  # a missing or empty file fails here, in one line
            quant = replace(quant, **{table: replace(spec, calibration=str(Path(spec.calibration).resolve()))})
    return replace(recipe, quant=quant)


def runtime_constants(meta: dict, recipe: ExportRecipe) -> dict:
    """Constant methods ExecuTorch's LLM runner reads from the program (names are its contract)."""
    return {
        "get_max_seq_len": meta["max_seq_len"],
        "get_max_context_len": meta["max_seq_len"],
        "get_vocab_size": meta["vocab_size"],
        "get_n_layers": meta["n_layers"],
        "get_bos_id": meta["bos_id"],
        "get_eos_ids": meta["eos_ids"],
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
        "use_sdpa_with_kv_cache": recipe.kv_cache.attention == "custom_sdpa",
    }


def recipe_of(artifact) -> ExportRecipe:
    from exporter.recipe_io import recipe_from_dict

    return recipe_from_dict(artifact.manifest["recipe"])


# The lowering noise floor scales the reference's embedding output by (1 + each): one to two
# float32 ulps either way, the size of the rounding differences between two correct
# implementations. Three draws, and the floor is their median (parity.noise_floor says why).
NOISE_FLOOR_PERTURBATIONS = (1e-7, -1e-7, 2e-7)


def verify(folder: Path, *, model: str | None = None, progress: Progress = _quiet) -> dict:
    """Run every parity check on an artifact; write DIR/parity.json and return it."""
    from exporter.load import load_model, weights_digest
    from exporter.parity import check_parity, tokenizer_parity
    from exporter.prompts import BEHAVIOUR_PROMPTS, HELDOUT_TEXT, TOKENIZER_CORPUS
    from exporter.runners import EagerRunner, PerturbedRunner, TransformersRunner

    artifact = art.read_artifact(folder)
    recipe = recipe_of(artifact)
    backend = get_backend(artifact.target)
    meta = artifact.manifest["model"]
    timings: dict = {}
    with Stage("load", backend.name, timings, progress):
        loaded = load_model(model or meta["source"], on_progress=progress)
        if weights_digest(loaded.checkpoint_dir) != meta["weights_sha256"]:
            raise ArtifactError(
                f"the checkpoint {loaded.checkpoint_dir} is not the one {folder} was exported from "
                f"(weights sha256 differs from the manifest's)",
                hint="pass --model with the checkpoint the artifact was built from",
            )
        candidate = backend.load_runner(artifact)
    with Stage("reference", backend.name, timings, progress):
        from exporter.quantize import materialize_for_eager

        adopts = hasattr(backend, "adopt_artifact_weights")
        reference_recipe = recipe
        if adopts:
            # The artifact's stored weights replace every quantized one below, so searching
            # scales again would be wasted work (and need not give the same near-ties).
            reference_recipe = replace(recipe, quant=replace(recipe.quant, scale_search=ScaleSearchSpec(), tuning=TuningSpec()))
        lm, _ = build_quantized(loaded, reference_recipe, backend)
        if adopts:
            backend.adopt_artifact_weights(lm, artifact)
        materialize_for_eager(lm)  # same values, without re-dequantizing every weight per call
    with Stage("tokenizer", backend.name, timings, progress):
        encode, decode = backend.shipped_tokenizer(artifact)
        tok_report = tokenizer_parity(loaded.tokenizer, encode, decode, TOKENIZER_CORPUS)
    tok = loaded.tokenizer
    room = recipe.kv_cache.max_seq_len - recipe.parity.decode_steps - 2
    prompts = [tok.encode(p, add_special_tokens=False)[:room] for p in _cycle(BEHAVIOUR_PROMPTS, recipe.parity.prompts)]
    heldout = tok.encode(HELDOUT_TEXT, add_special_tokens=False)[: min(128, recipe.kv_cache.max_seq_len)]
    # Run-time activation quantization makes the reference sensitive to last-bit rounding:
    # measure that noise floor so the lowering gates can be judged against it.
    dynamic = any(rule.quantizes_activations for rule in recipe.quant.rules)
    noise = [PerturbedRunner(lm, relative, name=f"perturbed eager x (1 {relative:+g})") for relative in NOISE_FLOOR_PERTURBATIONS] \
        if dynamic and recipe.parity.lowering_noise_floor_factor > 0 else []
    with Stage("parity", backend.name, timings, progress):
        report = check_parity(
            candidate=candidate, quantized_reference=EagerRunner(lm, name="quantized eager (torch)"),
            float_reference=TransformersRunner(loaded.model, name="float (transformers)"),
            prompts=prompts, heldout=heldout, tokenizer_report=tok_report, spec=recipe.parity,
            eos_ids=set(meta["eos_ids"]), on_step=progress, noise_references=noise,
        ).to_dict()
    report["compared"].update(device="host", runtime=backend.runtime_name(),
                              environment=art.environment(), artifact=artifact.manifest["name"])
    report["timings_s"] = timings
    art.write_json_atomic(Path(folder) / "parity.json", report)
    return report


def _cycle(items, n):
    return [items[i % len(items)] for i in range(n)]


def bench(folder: Path, *, runs: int | None = None, warmup: int | None = None, threads: int | None = None,
          progress: Progress = _quiet) -> dict:
    from exporter.bench import run_bench

    artifact = art.read_artifact(folder)
    spec = recipe_of(artifact).bench
    overrides = {k: v for k, v in dict(runs=runs, warmup=warmup, threads=threads).items() if v is not None}
    spec = replace(spec, **overrides)
    report = run_bench(artifact, get_backend(artifact.target), spec, progress=progress)
    art.write_json_atomic(Path(folder) / "bench.json", report)
    return report


def generate(folder: Path, prompt: str, *, max_new_tokens: int = 64) -> str:
    from exporter.runners import greedy

    artifact = art.read_artifact(folder)
    backend = get_backend(artifact.target)
    encode, decode = backend.shipped_tokenizer(artifact)
    meta = artifact.manifest["model"]
    ids = encode(prompt)
    if not ids:
        raise UsageError("the prompt encodes to no tokens")
    budget = meta["max_seq_len"] - len(ids)
    if budget <= 0:
        raise UsageError(f"the prompt has {len(ids)} tokens; this artifact holds at most {meta['max_seq_len'] - 1}")
    tokens = greedy(backend.load_runner(artifact), ids, min(max_new_tokens, budget), set(meta["eos_ids"]))
    return decode(tokens)
