"""The Core ML package: trace, convert with coremltools, write our compressed weights, save.

Our decoder's weights, rounded/compressed as the package stores them (compress.py), wrapped
in a forward that keeps the position a tensor (decoder.py), traced with torch.jit.trace and
converted by coremltools to a MIL program with fp16 compute and the KV cache as fp16 Core
ML states. Compressed weights are then written into the program as iOS 18 ``constexpr_*``
ops from the codes computed in torch, and the package is saved with the model's metadata.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from exporter.backends.coreml.compress import Compressed
from exporter.backends.coreml.options import COMPUTE_UNITS, CoreMLOptions
from exporter.backends.coreml.reproducible import normalise_package
from exporter.errors import RecipeError, require
from exporter.manifest import ModelFacts
from exporter.runners import quiet_native_stderr

PACKAGE_DIR = "model.mlpackage"


def build_package(lm, compressed: dict[str, Compressed], *, recipe, model: ModelFacts, out_dir: Path,
                  on_stage: Callable[[str], None]) -> dict:
    """Write model.mlpackage into ``out_dir``; returns the sub-stage times."""
    ct = require("coremltools", "coreml")
    import torch

    from exporter.backends.coreml.decoder import CoreMLDecoder, state_names

    options: CoreMLOptions = recipe.target.options
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
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=(s.n_kv_heads, lm.max_seq_len, s.head_dim),
                                                      dtype=np.float16),
                           name=name) for name in state_names(s.n_layers)]
    inputs = [
        # The flexible length is capped at max_prefill_len (< max_seq_len; docs/targets/coreml.md).
        ct.TensorType(name="tokens", shape=(1, ct.RangeDim(1, lm.max_prefill_len, default=1)), dtype=np.int32),
        ct.TensorType(name="input_pos", shape=(1,), dtype=np.int32),
    ]
    with quiet_native_stderr():  # coremltools' progress bars; the CLI prints our stages
        prog = ct.convert(traced, inputs=inputs, states=states,
                          outputs=[ct.TensorType(name="logits", dtype=np.float32)],
                          minimum_deployment_target=deployment, compute_precision=ct.precision.FLOAT16,
                          convert_to="milinternal")
    timings["convert_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    on_stage("write compressed weights")
    written = compress_program(prog, compressed)
    # The program is already fp16: FLOAT32 here only means "insert no further casts".
    with quiet_native_stderr():
        package = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=deployment,
                             compute_precision=ct.precision.FLOAT32, compute_units=compute_units, skip_model_load=True)
    for key, value in package_metadata(model, recipe, written).items():
        package.user_defined_metadata[key] = value
    package.short_description = "recgpt-export stateful decoder: tokens, input_pos -> last-token logits"
    package.save(str(out_dir / PACKAGE_DIR))
    normalise_package(out_dir / PACKAGE_DIR)  # the same model gives the same bytes
    for path in (out_dir / PACKAGE_DIR).rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # coremltools writes the spec 0600
    timings["compress_save_s"] = time.perf_counter() - t0
    return timings


def package_metadata(model: ModelFacts, recipe, written: int) -> dict[str, str]:
    """User-defined metadata of the .mlpackage (strings): what an app needs without the manifest."""
    options: CoreMLOptions = recipe.target.options
    return {
        "recgpt.recipe": recipe.name,
        "recgpt.max_seq_len": str(model.max_seq_len),
        "recgpt.max_prefill_len": str(recipe.kv_cache.max_prefill_len),
        "recgpt.vocab_size": str(model.vocab_size),
        "recgpt.n_layers": str(model.n_layers),
        "recgpt.bos_id": str(model.bos_id),
        "recgpt.eos_ids": ",".join(str(e) for e in model.eos_ids),
        "recgpt.compressed_weights": str(written),
        "recgpt.compute_units": options.compute_units,
        "recgpt.deployment_target": options.deployment_target,
        "recgpt.prompt_prefix_ids": ",".join(str(t) for t in model.prompt_prefix_ids),
    }


def compress_program(prog, compressed: dict[str, Compressed]) -> int:
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
