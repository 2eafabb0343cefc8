"""ExecuTorch target: a .pte lowered to XNNPACK, run by ExecuTorch's runtime and LLM runner."""

from __future__ import annotations

from pathlib import Path

from exporter.backends.base import (
    FUSED_IN_PLACE,
    PER_TOKEN_SCALES,
    Backend,
    Capabilities,
    LoweredProgram,
    NativeRunnerSpec,
    Quantized,
    Storage,
)
from exporter.backends.executorch.native import build as native_build
from exporter.backends.executorch.options import ExecuTorchOptions
from exporter.backends.executorch.runtime import EXTRA
from exporter.errors import UnsupportedError
from exporter.manifest import KVCacheShape, ModelFacts, decoder_signature

_LINEAR = {
    "float": Storage("float32 (XNNPACK)"),
    "int8_dynact_int8_weight": Storage("int8 per output channel, float32 scales, "
                                       "int8 activations per token (XNNPACK)"),
    "int8_dynact_int4_weight": Storage("int4 per group, bfloat16 scales, int8 activations per token (XNNPACK)"),
}
_EMBEDDING = {
    "float": Storage("float32"),
    "int8_weight": Storage("int8 per row, float32 scales (quantized embedding kernel)"),
    "int4_weight": Storage("int4 per group, float32 scales (quantized embedding kernel)"),
}


class ExecuTorchBackend(Backend):
    name = "executorch"
    extra = EXTRA
    options_class = ExecuTorchOptions
    storage = {"linear": _LINEAR, "embedding": _EMBEDDING}
    refusal_reasons = {
        # Exports cleanly, then computes garbage on XNNPACK (logits off by up to 1e4);
        # reproduced on a single Linear (docs/targets/executorch.md).
        "int8_weight": "weight-only int8 linears are not correct on XNNPACK; int8_dynact_int8_weight is",
        "int4_weight": "weight-only int4 linears are not correct on XNNPACK; int8_dynact_int4_weight is",
        "palettize_4bit": "a Core ML storage format",
    }
    capabilities = Capabilities(
        scale_search=True, lm_head_split=True, tuning=True,
        # XNNPACK has no zero points; int4 linears carry theirs as offsets (quantizer.GroupOffsetLinear).
        asymmetric=frozenset({"int8_dynact_int4_weight"}),
        kv_caches=frozenset({FUSED_IN_PLACE, ("sdpa", "custom")}), int8_kv_cache=PER_TOKEN_SCALES,
        # a partial last group as a Linear over zero-padded inputs (quantizer.PaddedInputLinear)
        partial_groups=True,
    )

    native_runner = NativeRunnerSpec(name=native_build.RUNNER, runtime_package="executorch",
                                     build=native_build.build_from_wheels, build_for_host=native_build.build_for_host)

    def validate(self, recipe) -> None:
        if recipe.kv_cache.cache_update == "index_copy":
            # Lowers and saves, then aborts the runtime on its first call ("toTensor(): EValue is
            # not a Tensor", a process abort no caller can catch; docs/targets/executorch.md).
            raise UnsupportedError(
                "kv_cache.cache_update = 'index_copy' builds a program that aborts the ExecuTorch 1.5.1 runtime; "
                "use cache_update = 'custom' (kv_cache.attention may be 'sdpa' or 'custom_sdpa')"
            )
        if recipe.quant.tuning.steps and recipe.kv_cache.dtype == "int8":
            # llama::custom_quantized_sdpa has no backward (kv_cache.differentiable_attention).
            raise UnsupportedError("quant.tuning with kv_cache.dtype = 'int8': the int8 cache's attention has no "
                                   "gradient to tune through",
                                   hint="set kv_cache.dtype = 'float32', or remove [quant.tuning]")

    def quantize(self, lm, quant, options: ExecuTorchOptions, *, grams=None) -> Quantized:
        """torchao quantization, with group scales rounded to bfloat16 as XNNPACK stores them
        (searched against ``grams`` when given).

        q/k/v and gate/up that share a rule are fused first unless ``fuse_projections`` is
        off (one XNNPACK operator each instead of three and two). The program computes RoPE
        from the positions rather than storing tables, so the reference does too."""
        import torch

        from exporter.backends.executorch.quantizer import apply_quantization, round_group_scales
        from exporter.decoder import fuse_projections
        from exporter.quant.plan import rule_index

        lm.rope_from_positions()
        if options.fuse_projections:
            fuse_projections(lm, lambda names: len({rule_index(quant.rules, n, "linear") for n in names}) == 1)
        summary = apply_quantization(lm, quant, grams)
        round_group_scales(lm, torch.bfloat16)
        return Quantized(summary=summary)

    def tunables(self, lm, quantized):
        from exporter.backends.executorch.tuning import stored_scales

        return stored_scales(lm)

    def lower(self, lm, quantized, *, recipe, model: ModelFacts, out_dir: Path, on_stage) -> LoweredProgram:
        from exporter.backends.executorch.program import PROGRAM_FILE, constant_methods, lower_to_pte

        constants = constant_methods(model, recipe)
        timings = lower_to_pte(lm, constants=constants, out_dir=out_dir, on_stage=on_stage)
        return LoweredProgram(roles={"program": PROGRAM_FILE}, timings_s=timings,
                              io_signature=decoder_signature(
                                  lm, position_dtype="int64",
                                  kv_cache=KVCacheShape.of(
                                      lm, dtype=recipe.kv_cache.dtype,
                                      scales=PER_TOKEN_SCALES if recipe.kv_cache.dtype == "int8" else "")),
                              target_info={"constant_methods": constants})

    def prepare_reference(self, lm, quantized, artifact) -> None:
        from exporter.backends.executorch.quantizer import materialize_for_eager

        materialize_for_eager(lm)  # same values, without re-dequantizing every weight per call

    def runtime_name(self) -> str:
        from importlib.metadata import version

        return f"executorch {version('executorch')} (XNNPACK)"

    def load_runner(self, artifact):
        from exporter.backends.executorch.runtime import ExecuTorchRunner

        model = artifact.manifest.model
        return ExecuTorchRunner(artifact.file("program"), model.max_prefill_len, model.max_seq_len)

    def shipped_tokenizer(self, artifact):
        from exporter.backends.executorch.runtime import device_tokenizer

        return device_tokenizer(artifact.file("tokenizer"))

    def open_bench_session(self, artifact, *, threads: int):
        from exporter.backends.executorch.runtime import LLMRunnerSession

        return LLMRunnerSession(artifact.file("program"), artifact.file("tokenizer"), threads=threads)
