"""The quantization stage: the float decoder made into what a target stores.

In order: the tuning's float targets (before anything changes the decoder), smoothing, the
lm_head split, the scale search's calibration, the backend's own quantizer (it stores the
weights its way and the decoder then computes with exactly those), and the end-to-end
tuning of the stored float parameters. Which of these a target takes is declared in its
backend's capabilities and checked before any work (backends/base.check_recipe).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from torch import nn

from exporter.quant.plan import Quantized
from exporter.spec import ExportRecipe, QuantSpec

if TYPE_CHECKING:
    from exporter.backends.base import Capabilities

Progress = Callable[[str], None]


class Quantizer(Protocol):
    """What this stage needs of a target (backends/base.Backend provides it)."""

    capabilities: Capabilities

    def eager_attention(self, recipe: ExportRecipe) -> tuple[str, str]: ...

    def quantize(self, lm: nn.Module, quant: QuantSpec, options: Any, *,
                 grams: Mapping[str, Any] | None = None) -> Quantized: ...

    def tunables(self, lm: nn.Module, quantized: Quantized) -> list: ...


def _quiet(_: str) -> None:
    pass


def resolve_indivisible(quant: QuantSpec, backend: Quantizer) -> QuantSpec:
    """quant.indivisible = "auto" made concrete for the target: a padded last group where its
    format has one (the most weights per scale), else one group per row."""
    if quant.indivisible != "auto":
        return quant
    return replace(quant, indivisible="pad" if backend.capabilities.partial_groups else "per_channel")


def float_decoder(hf_model, recipe: ExportRecipe, backend: Quantizer):
    """The float StaticCacheLM with the recipe's cache and the backend's eager attention."""
    from exporter.backends.base import PER_TOKEN_SCALES
    from exporter.decoder import build_decoder
    from exporter.kv_cache import load_custom_ops

    attention, cache_update = backend.eager_attention(recipe)
    if attention == "custom_sdpa" or cache_update == "custom":
        load_custom_ops()
    # An int8 cache with per-token scales is its own module (kv_cache.Int8KVCache); one with
    # static scales is the float cache rounding what it writes, once they are calibrated.
    per_token = recipe.kv_cache.dtype == "int8" and backend.capabilities.int8_kv_cache == PER_TOKEN_SCALES
    return build_decoder(hf_model, max_seq_len=recipe.kv_cache.max_seq_len,
                         max_prefill_len=recipe.kv_cache.max_prefill_len,
                         attention=attention, cache_update=cache_update,
                         cache_dtype="int8" if per_token else "float32")


def build_quantized(loaded, recipe: ExportRecipe, backend: Quantizer, progress: Progress = _quiet):
    """The decoder with the recipe's cache and quantization applied, as the backend will
    store it, and the ``Quantized`` record."""
    lm = float_decoder(loaded.model, recipe, backend)
    return lm, quantize_decoder(lm, loaded, recipe, backend, progress)


def tuning_samples(lm, loaded, quant: QuantSpec, progress: Progress = _quiet) -> list[list[int]] | None:
    """The token ids end-to-end tuning trains on (None when the recipe does not tune): the
    calibration texts, each continued by the float model (``loaded.model``, transformers)."""
    tuning = quant.tuning
    if not tuning.steps:
        return None
    from exporter.quant.calibration import calibration_samples, calibration_texts
    from exporter.quant.tuning import continued_samples

    samples = calibration_samples(lm, loaded.tokenizer, calibration_texts(tuning, "quant.tuning.calibration"))
    if tuning.generated_tokens:
        progress(f"tune: the float model continues {len(samples)} calibration texts")
        end = {loaded.tokenizer.eos_token_id} - {None}
        samples = continued_samples(loaded.model, samples, tuning.generated_tokens, end, lm.max_seq_len, progress)
    return samples


def quantize_decoder(lm, loaded, recipe: ExportRecipe, backend: Quantizer, progress: Progress = _quiet,
                     samples: list[list[int]] | None = None) -> Quantized:
    """Smooth, split the lm_head, quantize and tune ``lm`` in place (and calibrate a static
    int8 KV cache's scales). ``loaded``: the checkpoint (load.LoadedModel) ``lm`` was built
    from; ``samples``: what tuning trains on (tuning_samples), when the caller made them
    already (export does, while it still holds the transformers model)."""
    from exporter.backends.base import STATIC_SCALES

    tokenizer = loaded.tokenizer
    quant = resolve_indivisible(recipe.quant, backend)
    tuning = quant.tuning
    if tuning.steps:
        from exporter.quant.tuning import float_log_probs

        if samples is None:
            samples = tuning_samples(lm, loaded, quant, progress)
        progress(f"tune: the float model's targets over {sum(len(ids) for ids in samples)} tokens")
        tuning_targets = float_log_probs(lm, samples)  # from the float decoder, before anything changes it
    smoothing = None
    if quant.smoothing.alpha > 0:
        from exporter.quant.smoothing import smooth_for_quantization

        progress(f"smoothing: calibrating activation ranges (alpha {quant.smoothing.alpha})")
        smoothing = smooth_for_quantization(lm, tokenizer, quant.smoothing)
    if quant.lm_head_split:
        from exporter.decoder import split_lm_head

        split_lm_head(lm, quant.lm_head_split)  # after smoothing, which scales the whole lm_head
    grams, scale_search = None, None
    if quant.scale_search.method == "activation":
        from exporter.quant.block_search import calibrate

        # On the smoothed weights' inputs: those are what the quantized layers will see.
        progress("scale search: calibration activations of every quantized Linear")
        grams, scale_search = calibrate(lm, tokenizer, quant)
    progress("quantize: " + ("searching block scales, " if grams else "") + "storing the weights as the target does")
    quantized = backend.quantize(lm, quant, recipe.target.options, grams=grams)
    summary = quantized.summary
    for index, match in enumerate(summary.rules):
        if not match.modules:  # a typo in a glob quantizes nothing, silently, unless said
            progress(f'warning: quant.rules[{index}] (match = "{match.rule.match}", kind = "{match.rule.kind}") '
                     "matched no module and does nothing; `recgpt-export inspect` lists the module names")
    summary.scale_search = scale_search
    summary.smoothing = smoothing
    if tuning.steps:
        from exporter.quant.tuning import tune

        summary.tuning = tune(lm, backend.tunables(lm, quantized), samples, tuning_targets, tuning,
                              on_step=progress)
    if recipe.kv_cache.dtype == "int8" and backend.capabilities.int8_kv_cache == STATIC_SCALES:
        from exporter.prompts import CALIBRATION_TEXTS
        from exporter.quant.calibration import calibration_samples
        from exporter.quant.kv_scales import calibrate_kv_scales, set_kv_scales

        # Last: the ranges of what the stored, tuned model writes into its cache.
        progress("int8 KV cache: calibrating each layer's key and value scales")
        set_kv_scales(lm, calibrate_kv_scales(lm, calibration_samples(lm, tokenizer, CALIBRATION_TEXTS)))
    return quantized
