"""Core ML target: a stateful ML program (.mlpackage, iOS 18 / macOS 15), verified on Linux.

Export: our decoder's weights, rounded/compressed as the package stores them
(coreml_compress.py), wrapped in a forward that keeps the position a tensor
(coreml_program.py), traced with torch.jit.trace and converted by coremltools to a MIL
program with fp16 compute and the KV cache as fp16 Core ML states. Compressed weights are
then written into the program as iOS 18 ``constexpr_*`` ops from the codes computed in
torch, and the package is saved with the model's metadata.

Verification: Core ML cannot execute on Linux, so ``load_runner`` runs the package with our
interpreter (exporter/coreml_interp) there, and with coremltools' MLModel.predict on macOS
15+. ``runtime_name()`` says which one ran.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from exporter.errors import RecipeError, UnsupportedError, require
from exporter.quantize import QuantSummary
from exporter.runners import ChunkedPrefillMixin, quiet_native_stderr

PACKAGE_DIR = "model.mlpackage"
# Set to "interpreter" to use the NumPy interpreter even on macOS (e.g. to compare the two).
EXECUTOR_ENV = "RECGPT_COREML_EXECUTOR"
COMPUTE_UNITS = {"cpu_only": "CPU_ONLY", "cpu_and_gpu": "CPU_AND_GPU", "cpu_and_ne": "CPU_AND_NE", "all": "ALL"}
STORAGE = {
    "float": "fp16",
    "int8_weight": "int8 per output channel, fp16 scales (constexpr_blockwise_shift_scale)",
    "int4_weight": "int4 per block of group_size inputs, fp16 scales (constexpr_blockwise_shift_scale)",
    "palettize_4bit": "4-bit palette: 16 fp16 entries per group of group_size output channels (constexpr_lut_to_dense)",
}


def native_predict_available() -> bool:
    """coremltools' MLModel.predict with states needs macOS 15+ and the compiled coremltools library."""
    if os.environ.get(EXECUTOR_ENV) == "interpreter" or sys.platform != "darwin":
        return False
    try:
        major = int(platform.mac_ver()[0].split(".")[0])
    except ValueError:
        return False
    return major >= 15


def coremltools_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("coremltools")
    except PackageNotFoundError:
        return "not installed"


class CoreMLQuantSummary(QuantSummary):
    """The shared summary plus how Core ML stores each rule's weights."""

    def to_dict(self) -> dict:
        d = super().to_dict()
        for entry, match in zip(d["rules"], self.rules):
            entry["coreml_storage"] = STORAGE.get(entry["scheme"], entry["scheme"])
            if entry["scheme"] == "palettize_4bit":  # output channels per palette
                entry["group_size"] = match.rule.group_size
        d["coreml"] = {
            "compute_precision": "fp16",
            "unlisted_weights": "fp16 (norms, biases, RoPE tables, modules kept float)",
            # plan() refuses a block size that does not divide a layer's input width, so no
            # layer is ever silently left uncompressed (coremltools' own per-block quantizer skips them).
            "fallbacks": [],
        }
        return d


class CoreMLBackend:
    name = "coreml"
    extra = "coreml"

    def validate(self, recipe) -> None:
        """Refuse what the package cannot store or compute."""
        if recipe.target.backend != "mlprogram":
            raise UnsupportedError(f"target.backend {recipe.target.backend!r}: the coreml target builds an ML program; "
                                   f"set target.backend = \"mlprogram\"")
        from exporter.scale_search import refuse_scale_search
        from exporter.tuning import refuse_tuning

        refuse_scale_search(recipe, "coreml")
        refuse_tuning(recipe, "coreml")
        if recipe.quant.lm_head_split:
            # The program builder reads the lm_head as one matrix.
            raise UnsupportedError("quant.lm_head_split: only the executorch target splits the lm_head; remove it")
        kv = recipe.kv_cache
        if (kv.attention, kv.cache_update) != ("custom_sdpa", "custom"):
            # As for the onnx target: the program always uses the target's fused attention
            # (Core ML's scaled_dot_product_attention) and an in-place state update.
            raise UnsupportedError(
                "the coreml target always uses Core ML's fused attention over an in-place state; "
                "leave kv_cache.attention = 'custom_sdpa' and kv_cache.cache_update = 'custom'")
        for i, rule in enumerate(recipe.quant.rules):
            if rule.quantizes_activations:
                raise UnsupportedError(
                    f"quant.rules[{i}].scheme: {rule.scheme} quantizes activations at run time, which Core ML does not do; "
                    f"use int8_weight or int4_weight (weight-only, computed in fp16) or palettize_4bit")
            if not rule.symmetric and rule.scheme != "float":
                raise UnsupportedError(f"quant.rules[{i}].symmetric: the coreml target stores symmetric integers only; "
                                       f"remove symmetric = false")

    def eager_kv_cache(self, recipe) -> tuple[str, str]:
        """Plain torch attention over the whole cache, with the mask the program computes."""
        return "sdpa", "index_copy"

    def quantize(self, lm, spec, target) -> QuantSummary:
        """fp16-round every weight and compress matched modules exactly as the package stores
        them (``target``: nothing here depends on it)."""
        from exporter.backends.coreml_compress import quantize_for_coreml

        summary = quantize_for_coreml(lm, spec)
        return CoreMLQuantSummary(rules=summary.rules, unmatched=summary.unmatched)

    # -- export --------------------------------------------------------------------------

    def lower(self, lm, *, recipe, model=None, metadata: dict, out_dir: Path,
              on_stage: Callable[[str], None]) -> dict:
        ct = require("coremltools", self.extra)
        import torch

        from exporter.backends.coreml_program import CoreMLDecoder, state_names

        options = recipe.target.coreml
        deployment = getattr(ct.target, options.deployment_target)
        compute_units = getattr(ct.ComputeUnit, COMPUTE_UNITS[options.compute_units])
        timings = {}
        t0 = time.perf_counter()
        on_stage("trace (torch.jit.trace)")
        wrapper = CoreMLDecoder(lm).eval()
        example = (torch.zeros((1, 2), dtype=torch.int32), torch.tensor([0], dtype=torch.int32))
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, example, check_trace=False)
        timings["trace_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        on_stage("convert to a Core ML program (coremltools)")
        s = lm.shape
        states = [ct.StateType(wrapped_type=ct.TensorType(shape=(s.n_kv_heads, lm.max_seq_len, s.head_dim), dtype=np.float16),
                               name=name) for name in state_names(s.n_layers)]
        inputs = [
            # The flexible length is capped at max_prefill_len (< max_seq_len): see ../shared/STACK.md.
            ct.TensorType(name="tokens", shape=(1, ct.RangeDim(1, lm.max_prefill_len, default=1)), dtype=np.int32),
            ct.TensorType(name="input_pos", shape=(1,), dtype=np.int32),
        ]
        with quiet_native_stderr():  # coremltools' progress bars; the CLI prints our stages
            prog = ct.convert(traced, inputs=inputs, states=states, outputs=[ct.TensorType(name="logits", dtype=np.float32)],
                              minimum_deployment_target=deployment, compute_precision=ct.precision.FLOAT16,
                              convert_to="milinternal")
        timings["convert_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        on_stage("write compressed weights")
        from exporter.backends.coreml_compress import compressed_weights

        written = compress_program(prog, compressed_weights(lm))
        # The program is already fp16: FLOAT32 here only means "insert no further casts".
        with quiet_native_stderr():
            model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=deployment,
                               compute_precision=ct.precision.FLOAT32, compute_units=compute_units, skip_model_load=True)
        for key, value in package_metadata(metadata, recipe, written).items():
            model.user_defined_metadata[key] = value
        model.short_description = "recgpt-export stateful decoder: tokens, input_pos -> last-token logits"
        model.save(str(out_dir / PACKAGE_DIR))
        for path in (out_dir / PACKAGE_DIR).rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)  # coremltools writes the spec 0600
        timings["compress_save_s"] = time.perf_counter() - t0
        return {"roles": {"program": PACKAGE_DIR}, "timings": timings, "io_signature": io_signature(lm)}

    # -- running -------------------------------------------------------------------------

    def runtime_name(self) -> str:
        if native_predict_available():
            return f"Core ML (coremltools {coremltools_version()} MLModel.predict, macOS {platform.mac_ver()[0]})"
        return f"recgpt-export Core ML interpreter (NumPy), coremltools {coremltools_version()}"

    def load_runner(self, artifact):
        meta = artifact.manifest["model"]
        if native_predict_available():
            options = artifact.manifest["recipe"]["target"].get("coreml", {})
            return CoreMLPredictRunner(artifact.file("program"), meta["max_prefill_len"], meta["max_seq_len"],
                                       compute_units=options.get("compute_units", "cpu_only"))
        return InterpreterRunner(artifact.file("program"), meta["max_prefill_len"], meta["max_seq_len"])

    def shipped_tokenizer(self, artifact):
        """The shipped tokenizer.json through Hugging Face `tokenizers` (Rust).

        The app reads the same file with swift-transformers, which cannot run here; this
        checks the file itself, not the Swift implementation."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(artifact.file("tokenizer")))
        return (lambda text: tok.encode(text, add_special_tokens=False).ids,
                lambda ids: tok.decode(list(ids), skip_special_tokens=False))

    def open_bench_session(self, artifact, *, threads: int):
        return InterpreterSession(self, artifact, threads=threads)


def io_signature(lm) -> dict:
    s = lm.shape
    return {
        "inputs": [
            {"name": "tokens", "dtype": "int32", "shape": [1, f"seq_len<= {lm.max_prefill_len}"]},
            {"name": "input_pos", "dtype": "int32", "shape": [1], "meaning": "position of tokens[0]"},
        ],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, s.vocab_size], "meaning": "last token"}],
        # The same key as the other targets (bench.py reads it); Core ML holds it as one
        # fp16 state per layer and kind: k_cache_<i>, v_cache_<i> of [n_kv_heads, max_seq_len, head_dim].
        "state": {"kv_cache": [s.n_layers, 2, 1, lm.max_seq_len, s.n_kv_heads, s.head_dim],
                  "coreml_states": "k_cache_<layer>, v_cache_<layer>: fp16 [n_kv_heads, max_seq_len, head_dim]"},
    }


def package_metadata(constants: dict, recipe, written: int) -> dict[str, str]:
    """User-defined metadata of the .mlpackage (strings): what an app needs without the manifest."""
    meta = {
        "recgpt.recipe": recipe.name,
        "recgpt.max_seq_len": str(constants["get_max_seq_len"]),
        "recgpt.max_prefill_len": str(recipe.kv_cache.max_prefill_len),
        "recgpt.vocab_size": str(constants["get_vocab_size"]),
        "recgpt.n_layers": str(constants["get_n_layers"]),
        "recgpt.bos_id": str(constants["get_bos_id"]),
        "recgpt.eos_ids": ",".join(str(e) for e in constants["get_eos_ids"]),
        "recgpt.compressed_weights": str(written),
        "recgpt.compute_units": recipe.target.coreml.compute_units,
        "recgpt.deployment_target": recipe.target.coreml.deployment_target,
    }
    return meta


def compress_program(prog, compressed: dict) -> int:
    """Replace each fp16 weight const whose values are a compressed module's dequantized weight
    by the iOS 18 constexpr op holding that module's codes. Returns how many modules were written.

    Matching is by value (sha256 of the fp16 bytes), not by name: the converter names consts
    after the traced module path, which is not a contract. A compressed module whose weight is
    not found is an error: silently shipping it as fp16 would make the manifest lie."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.scope import ScopeInfo, ScopeSource
    from coremltools.converters.mil.mil.types.type_mapping import np_int4_dtype, np_uint4_dtype

    if not compressed:
        return 0
    by_value = {}
    for name, comp in compressed.items():
        key = hashlib.sha256(comp.dequantize().astype(np.float16).tobytes()).hexdigest()
        by_value.setdefault(key, []).append((name, comp))
    main = prog.functions["main"]
    found: set[str] = set()
    # Scopes are required on every op (coremltools validates them); name ours.
    scopes = (ScopeInfo(source=ScopeSource.TORCHSCRIPT_MODULE_TYPE, data=["recgpt_compress"]),
              ScopeInfo(source=ScopeSource.TORCHSCRIPT_MODULE_NAME, data=["recgpt_compress"]))
    with main, mb.scope(*scopes):
        for op in list(main.operations):
            if op.op_type != "const":
                continue
            val = op.outputs[0].val
            if not isinstance(val, np.ndarray) or val.dtype != np.float16 or val.ndim != 2:
                continue
            matches = by_value.get(hashlib.sha256(val.tobytes()).hexdigest())
            if not matches:
                continue
            name, comp = matches[0]
            if comp.scheme == "palettize_4bit":
                new = mb.constexpr_lut_to_dense(indices=comp.data.astype(np_uint4_dtype), lut=comp.lut,
                                                before_op=op, name=op.name + "_palettized")
            else:
                data = comp.data.astype(np_int4_dtype) if comp.scheme == "int4_weight" else comp.data
                new = mb.constexpr_blockwise_shift_scale(data=data, scale=comp.scale, before_op=op,
                                                         name=op.name + "_quantized")
            main.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new)
            main.remove_ops([op])
            found.update(n for n, _ in matches)
    missing = sorted(set(compressed) - found)
    if missing:
        raise RecipeError(f"{len(missing)} compressed weight(s) were not found in the converted program "
                          f"(first: {missing[0]}); refusing to ship them uncompressed")
    return len(found)


class InterpreterRunner(ChunkedPrefillMixin):
    """The .mlpackage run by our NumPy interpreter (Linux, or anywhere)."""

    def __init__(self, package: Path, max_prefill_len: int, max_seq_len: int) -> None:
        from exporter.coreml_interp import CoreMLProgram

        self.name = "coreml (interpreter)"
        self.max_prefill_len = max_prefill_len
        self.max_seq_len = max_seq_len
        self.program = CoreMLProgram(package)
        self.state = self.program.new_state()

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        self.state = self.program.new_state()
        return super().prefill(tokens)

    def _step(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        out = self.program.predict({"tokens": np.array([list(tokens)], dtype=np.int32),
                                    "input_pos": np.array([start_pos], dtype=np.int32)}, self.state)
        return out["logits"][0].astype(np.float32)


class CoreMLPredictRunner(ChunkedPrefillMixin):  # pragma: no cover - needs macOS 15
    """The .mlpackage run by Core ML itself through coremltools (macOS 15+)."""

    def __init__(self, package: Path, max_prefill_len: int, max_seq_len: int, *, compute_units: str) -> None:
        ct = require("coremltools", CoreMLBackend.extra)
        self.name = "coreml (MLModel.predict)"
        self.max_prefill_len = max_prefill_len
        self.max_seq_len = max_seq_len
        self.model = ct.models.MLModel(str(package), compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[compute_units]))
        self.state = self.model.make_state()

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        self.state = self.model.make_state()
        return super().prefill(tokens)

    def _step(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        out = self.model.predict({"tokens": np.array([list(tokens)], dtype=np.int32),
                                  "input_pos": np.array([start_pos], dtype=np.int32)}, state=self.state)
        return np.asarray(out["logits"], dtype=np.float32)[0]


class InterpreterSession:
    """bench.py's timed loop over the load_runner() runner (interpreter timing on Linux: it
    measures our NumPy interpreter, not Core ML on a device)."""

    def __init__(self, backend: CoreMLBackend, artifact, *, threads: int) -> None:
        # The interpreter runs NumPy's BLAS on one thread whatever bench.threads says (see
        # coreml_interp/executor.py); bench.json reports the thread count that ran.
        self.threads = 1
        t0 = time.perf_counter()
        self.runner = backend.load_runner(artifact)
        self.load_ms = (time.perf_counter() - t0) * 1e3
        self.encode, self.decode = backend.shipped_tokenizer(artifact)
        self.eos = set(artifact.manifest["model"]["eos_ids"])

    def run(self, text: str, *, max_new_tokens: int) -> dict:
        ids = self.encode(text)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        logits = self.runner.prefill(ids)
        prefill_wall = time.perf_counter() - wall0
        generated, pos = 0, len(ids)
        t_decode = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            token = int(np.argmax(logits))
            if token in self.eos or pos >= self.runner.max_seq_len:
                break
            logits = self.runner.decode(token, pos)
            pos += 1
            generated += 1
        decode_wall = time.perf_counter() - t_decode
        wall = time.perf_counter() - wall0
        return {
            "prompt_tokens": len(ids),
            "prefill_tok_s": len(ids) / prefill_wall if max_new_tokens == 1 else None,
            "ttft_ms": prefill_wall * 1e3 if max_new_tokens == 1 else None,
            "decode_tok_s": generated / decode_wall if generated else 0.0,
            "generated": generated,
            "cpu_s": time.process_time() - cpu0,
            "wall_s": wall,
        }
