"""ONNX target: one KV-cache decoder graph (prefill and decode), run by ONNX Runtime and
ONNX Runtime GenAI.

The folder holds model.onnx + model.onnx.data (external weights), genai_config.json (so
``onnxruntime_genai.Model(folder)`` runs it as it is), the tokenizer files and the manifest.
Weights are quantized in ONNX Runtime's own block layout (quantizer.py, blocks.py), the
eager reference computes with exactly those weights dequantized, and the graph is written
from them node by node (graph.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from exporter.backends.base import (
    FUSED_IN_PLACE,
    STATIC_SCALES,
    Backend,
    Capabilities,
    LoweredProgram,
    NativeRunnerSpec,
    Quantized,
    Storage,
)
from exporter.backends.onnx.native import build as native_build
from exporter.backends.onnx.options import OnnxOptions
from exporter.backends.onnx.runtime import EXTRA, MIN_OPSET, ort
from exporter.errors import UnsupportedError, require
from exporter.manifest import IOSignature, KVCacheShape, ModelFacts

MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"
GENAI_CONFIG = "genai_config.json"

_BLOCKS = "blocks of group_size inputs, float32 scales"
_LINEAR = {
    "float": Storage("MatMul, float32"),
    "int8_weight": Storage(f"MatMulNBits 8-bit, {_BLOCKS}, float activations"),
    "int4_weight": Storage(f"MatMulNBits 4-bit, {_BLOCKS}, float activations"),
    "int8_dynact_int8_weight": Storage(f"MatMulNBits 8-bit, {_BLOCKS}, int8 activations per block"),
    "int8_dynact_int4_weight": Storage(f"MatMulNBits 4-bit, {_BLOCKS}, int8 activations per block"),
}
_EMBEDDING = {
    "float": Storage("Gather, float32"),
    "int8_weight": Storage(f"GatherBlockQuantized 8-bit, {_BLOCKS}"),
    "int4_weight": Storage(f"GatherBlockQuantized 4-bit, {_BLOCKS}"),
}


class OnnxBackend(Backend):
    name = "onnx"
    extra = EXTRA
    options_class = OnnxOptions
    storage = {"linear": _LINEAR, "embedding": _EMBEDDING}
    capabilities = Capabilities(
        scale_search=True, tuning=True,
        asymmetric=frozenset(s for s in _LINEAR if s != "float"),  # a zero point per block
        # The graph always uses GroupQueryAttention over an in-place cache.
        kv_caches=frozenset({FUSED_IN_PLACE}), int8_kv_cache=STATIC_SCALES,
        adopts_artifact_weights=True,
        partial_groups=True,  # MatMulNBits / GatherBlockQuantized take K that blocks do not divide
    )
    native_runner = NativeRunnerSpec(name=native_build.RUNNER, runtime_package="onnxruntime",
                                     companion_packages=("numpy",), interpreted=True,
                                     build=native_build.build_from_wheels, build_for_host=native_build.build_for_host)

    def validate(self, recipe) -> None:
        opset = recipe.target.options.opset
        if opset < MIN_OPSET:
            raise UnsupportedError(f"target.onnx.opset {opset}: the graph needs opset {MIN_OPSET} or newer "
                                   "(RMSNormalization)")
        from exporter.backends.onnx.runtime import newest_runtime_opset

        newest = newest_runtime_opset()
        if opset > newest:
            raise UnsupportedError(f"target.onnx.opset {opset}: onnxruntime {ort().__version__} "
                                   f"runs opsets up to {newest}; "
                                   f"set target.onnx.opset between {MIN_OPSET} and {newest}")

    def check_shape(self, shape, recipe) -> None:
        from exporter.backends.onnx.limits import check_attention

        check_attention(shape, recipe.target.options.opset, int8_cache=recipe.kv_cache.dtype == "int8")

    def eager_attention(self, recipe) -> tuple[str, str]:
        # The graph's attention is GroupQueryAttention; the reference only needs the same math.
        return "sdpa", "index_copy"

    def quantize(self, lm, quant, options, *, grams=None) -> Quantized:
        from exporter.backends.onnx.quantizer import quantize_for_onnx

        return quantize_for_onnx(lm, quant, grams=grams)

    def tunables(self, lm, quantized):
        from exporter.backends.onnx.tuning import block_scales

        return block_scales(lm, quantized)

    def prepare_reference(self, lm, quantized, artifact) -> None:
        from exporter.backends.onnx.quantizer import adopt_artifact_weights

        adopt_artifact_weights(lm, quantized, artifact)

    def lower(self, lm, quantized, *, recipe, model: ModelFacts, out_dir: Path, on_stage) -> LoweredProgram:
        onnx = require("onnx", self.extra)
        from exporter.backends.onnx.graph import build_graph

        options: OnnxOptions = recipe.target.options
        timings = {}
        t0 = time.perf_counter()
        on_stage("build ONNX graph")
        graph, facts = build_graph(lm, quantized.stored, opset=options.opset,
                                   fuse_projections=options.fuse_projections)
        timings["graph_s"] = time.perf_counter() - t0
        # The prompt prefix an app keeps in the cache, readable from the session's model metadata.
        onnx.helper.set_model_props(graph, {"recgpt.prompt_prefix_ids": ",".join(map(str, model.prompt_prefix_ids))})
        t0 = time.perf_counter()
        on_stage("save model.onnx + model.onnx.data")
        onnx.save_model(graph, str(out_dir / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=WEIGHTS_FILE, size_threshold=1024)
        del graph
        (out_dir / WEIGHTS_FILE).chmod(0o644)  # onnx writes external data owner-only; the folder is published
        timings["save_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        on_stage("onnx.checker")
        onnx.checker.check_model(str(out_dir / MODEL_FILE))  # by path: external data, any size
        timings["check_s"] = time.perf_counter() - t0
        (out_dir / GENAI_CONFIG).write_text(json.dumps(genai_config(lm, model), indent=2) + "\n", encoding="utf-8")
        return LoweredProgram(roles={"program": MODEL_FILE, "weights": WEIGHTS_FILE, "genai_config": GENAI_CONFIG},
                              timings_s=timings, io_signature=io_signature(lm),
                              target_info={"opset": options.opset, "ms_domain_opset": 1, **facts})

    def runtime_name(self) -> str:
        from importlib.metadata import version

        # verify runs onnxruntime directly; bench runs the same session under onnxruntime-genai.
        return f"onnxruntime {ort().__version__} (CPU; bench through onnxruntime-genai {version('onnxruntime-genai')})"

    def load_runner(self, artifact, *, threads: int | None = None):
        from exporter.backends.onnx.runtime import OrtRunner

        return OrtRunner(artifact.file("program"), artifact.manifest.io_signature.kv_cache,
                         max_prefill_len=artifact.manifest.model.max_prefill_len, threads=threads)

    def shipped_tokenizer(self, artifact):
        from exporter.backends.onnx.runtime import genai_tokenizer

        return genai_tokenizer(artifact.path)

    def open_bench_session(self, artifact, *, threads: int):
        from exporter.backends.onnx.runtime import GenaiSession

        return GenaiSession(artifact.path, threads=threads)


def io_signature(lm) -> IOSignature:
    from exporter.quant.kv_scales import kv_scales_of

    s = lm.shape
    cache = ["batch", s.n_kv_heads, f"buffer<= {lm.max_seq_len}", s.head_dim]
    dtype = "int8" if kv_scales_of(lm) else "float32"
    scaled = " (codes; the fixed per-channel scales are in the graph)" if dtype == "int8" else ""
    return IOSignature(
        inputs=(
            {"name": "input_ids", "dtype": "int64", "shape": ["batch", f"seq_len<= {lm.max_prefill_len} per call"]},
            {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "past + seq_len"]},
            {"name": "past_key_values.N.key / .value", "dtype": dtype, "shape": cache,
             "meaning": "BNSH cache; bind the same buffer as present.N.* to update it in place" + scaled},
        ),
        outputs=(
            {"name": "logits", "dtype": "float32", "shape": ["batch", 1, s.vocab_size], "meaning": "last token"},
            {"name": "present.N.key / .value", "dtype": dtype, "shape": cache},
        ),
        kv_cache=KVCacheShape.of(lm, dtype=dtype, scales=STATIC_SCALES if dtype == "int8" else ""),
        state_layout=f"past_key_values.N.key / .value: {dtype} [batch, kv_heads, max_seq_len, head_dim] (BNSH)",
    )


def genai_config(lm, model: ModelFacts) -> dict:
    """onnxruntime_genai's config for this folder: the decoder's I/O names and search defaults."""
    s = lm.shape
    eos = list(model.eos_ids)
    return {
        "model": {
            "bos_token_id": model.bos_id if model.bos_id >= 0 else None,
            "context_length": lm.max_seq_len,
            "decoder": {
                "session_options": {"log_id": "recgpt-export", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": s.head_dim,
                "hidden_size": s.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": s.n_heads,
                "num_hidden_layers": s.n_layers,
                "num_key_value_heads": s.n_kv_heads,
            },
            "eos_token_id": eos if len(eos) > 1 else (eos[0] if eos else -1),
            "pad_token_id": eos[0] if eos else 0,
            "type": model.architecture,
            "vocab_size": s.vocab_size,
        },
        "search": {
            "do_sample": False, "max_length": lm.max_seq_len, "min_length": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
