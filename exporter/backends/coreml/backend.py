"""Core ML target: a stateful ML program (.mlpackage, iOS 18 / macOS 15), verified on Linux.

Export: compress.py rounds and compresses the decoder's weights as the package stores them,
program.py converts and saves the package. Verification: Core ML cannot execute on Linux, so
``load_runner`` runs the package with our interpreter (interp/) there, and with coremltools'
MLModel.predict on macOS 15+. ``runtime_name()`` says which one ran.
"""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path

from exporter.backends.base import FUSED_IN_PLACE, Backend, Capabilities, LoweredProgram, Quantized, Storage
from exporter.backends.coreml.options import CoreMLOptions
from exporter.backends.coreml.runtime import EXTRA
from exporter.manifest import KVCacheShape, ModelFacts, decoder_signature
from exporter.quant.plan import QuantSummary

_WEIGHT_ONLY = "weight-only, computed in fp16"
_STORAGE = {
    "float": Storage("fp16"),
    "int8_weight": Storage("int8 per output channel, fp16 scales (constexpr_blockwise_shift_scale)"),
    "int4_weight": Storage("int4 per block of group_size inputs, fp16 scales (constexpr_blockwise_shift_scale)"),
    "palettize_4bit": Storage("4-bit palette: 16 fp16 entries per group of group_size output channels "
                              "(constexpr_lut_to_dense)"),
}


class CoreMLQuantSummary(QuantSummary):
    """The shared summary plus how Core ML stores each rule's weights."""

    def to_dict(self) -> dict:
        d = super().to_dict()
        for entry, match in zip(d["rules"], self.rules, strict=True):
            entry["coreml_storage"] = _STORAGE[entry["scheme"]].description
            if entry["scheme"] == "palettize_4bit":  # output channels per palette
                entry["group_size"] = match.rule.group_size
        d["coreml"] = {
            "compute_precision": "fp16",
            "unlisted_weights": "fp16 (norms, biases, RoPE tables, modules kept float)",
            # A block size that does not divide a layer's input width gives that layer one block
            # per row (plan(); listed under "indivisible"), so no layer is ever silently left
            # uncompressed (coremltools' own per-block quantizer skips them).
            "fallbacks": [],
        }
        return d


class CoreMLBackend(Backend):
    name = "coreml"
    extra = EXTRA
    options_class = CoreMLOptions
    storage = {"linear": _STORAGE, "embedding": _STORAGE}
    refusal_reasons = {
        "int8_dynact_int8_weight": f"Core ML does not quantize activations at run time; int8_weight is {_WEIGHT_ONLY}",
        "int8_dynact_int4_weight": f"Core ML does not quantize activations at run time; int4_weight is {_WEIGHT_ONLY}",
    }
    # The program always uses Core ML's fused scaled_dot_product_attention over an in-place
    # state, and stores symmetric integers only.
    capabilities = Capabilities(kv_caches=frozenset({FUSED_IN_PLACE}))

    def eager_attention(self, recipe) -> tuple[str, str]:
        """Plain torch attention over the whole cache, with the mask the program computes."""
        return "sdpa", "index_copy"

    def quantize(self, lm, quant, options, *, grams=None) -> Quantized:
        """fp16-round every weight and compress matched modules exactly as the package stores them."""
        from exporter.backends.coreml.compress import quantize_for_coreml

        summary, compressed = quantize_for_coreml(lm, quant)
        fields = {f.name: getattr(summary, f.name) for f in dataclasses.fields(summary)}
        return Quantized(summary=CoreMLQuantSummary(**fields), stored=compressed)

    def lower(self, lm, quantized, *, recipe, model: ModelFacts, out_dir: Path, on_stage) -> LoweredProgram:
        from exporter.backends.coreml.program import PACKAGE_DIR, build_package

        # In module order: compress_program matches weights by value, and keeps the first of equals.
        compressed = {name: quantized.stored[module] for name, module in lm.named_modules()
                      if module in quantized.stored}
        timings = build_package(lm, compressed, recipe=recipe, model=model, out_dir=out_dir, on_stage=on_stage)
        signature = decoder_signature(
            lm, position_dtype="int32", kv_cache=KVCacheShape.of(lm, dtype="float16"),
            state_layout="k_cache_<layer>, v_cache_<layer>: fp16 [n_kv_heads, max_seq_len, head_dim]")
        return LoweredProgram(roles={"program": PACKAGE_DIR}, timings_s=timings, io_signature=signature)

    def runtime_name(self) -> str:
        from exporter.backends.coreml.runtime import coremltools_version, native_predict_available

        if native_predict_available():
            return f"Core ML (coremltools {coremltools_version()} MLModel.predict, macOS {platform.mac_ver()[0]})"
        return f"recgpt-export Core ML interpreter (NumPy), coremltools {coremltools_version()}"

    def load_runner(self, artifact):
        from exporter.backends.coreml.runtime import CoreMLPredictRunner, InterpreterRunner, native_predict_available

        model = artifact.manifest.model
        if native_predict_available():
            from exporter.recipe_io import recipe_from_dict

            options: CoreMLOptions = recipe_from_dict(artifact.manifest.recipe).target.options
            return CoreMLPredictRunner(artifact.file("program"), model.max_prefill_len, model.max_seq_len,
                                       compute_units=options.compute_units)
        return InterpreterRunner(artifact.file("program"), model.max_prefill_len, model.max_seq_len)

    def shipped_tokenizer(self, artifact):
        """The shipped tokenizer.json through Hugging Face `tokenizers` (Rust).

        The app reads the same file with swift-transformers, which cannot run here; this
        checks the file itself, not the Swift implementation."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(artifact.file("tokenizer")))
        return (lambda text: tok.encode(text, add_special_tokens=False).ids,
                lambda ids: tok.decode(list(ids), skip_special_tokens=False))

    def open_bench_session(self, artifact, *, threads: int):
        from exporter.backends.coreml.runtime import InterpreterSession

        return InterpreterSession(self, artifact, threads=threads)
