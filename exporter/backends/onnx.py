"""ONNX target: one KV-cache decoder graph (prefill and decode), run by ONNX Runtime and
ONNX Runtime GenAI.

The folder holds model.onnx + model.onnx.data (external weights), genai_config.json (so
``onnxruntime_genai.Model(folder)`` runs it as it is), the tokenizer files and the manifest.
Weights are quantized here, in ONNX Runtime's own block layout (exporter/onnx_quant.py),
and the eager reference computes with exactly those weights dequantized.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from exporter.errors import RecipeError, UnsupportedError, require
from exporter.runners import ChunkedPrefillMixin

MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"
GENAI_CONFIG = "genai_config.json"
MIN_OPSET = 23  # RMSNormalization entered the default domain in opset 23

# scheme -> (bits, MatMulNBits accuracy_level); accuracy 4 = int8 activations, computed per block.
_LINEAR_STORAGE = {
    "int8_weight": (8, 0),
    "int4_weight": (4, 0),
    "int8_dynact_int8_weight": (8, 4),
    "int8_dynact_int4_weight": (4, 4),
}
_EMBEDDING_BITS = {"int8_weight": 8, "int4_weight": 4}


def _ort():
    return require("onnxruntime", OnnxBackend.extra)


class _QuantJob(NamedTuple):
    """One module to quantize: its rule and the storage the rule gives it."""

    rule: object  # spec.QuantRule
    name: str
    module: object  # nn.Linear or nn.Embedding
    bits: int
    accuracy: int

    def stored_alike(self, other: "_QuantJob") -> bool:
        """Same storage parameters and equal weights: one stored matrix serves both (a tied
        embedding and lm_head)."""
        import torch

        return (self.bits, self.rule.group_size, self.rule.symmetric) == (other.bits, other.rule.group_size, other.rule.symmetric) \
            and self.module.weight.shape == other.module.weight.shape and torch.equal(self.module.weight, other.module.weight)


class OnnxBackend:
    name = "onnx"
    extra = "onnx"

    def validate(self, recipe) -> None:
        if recipe.target.backend != "cpu":
            raise UnsupportedError(f"target.backend {recipe.target.backend!r}: the onnx target supports 'cpu' "
                                   f"(ONNX Runtime's CPU execution provider); set target.backend = \"cpu\"")
        if recipe.quant.lm_head_split:
            # The graph builder reads the lm_head as one matrix (tied storage, its own MatMulNBits).
            raise UnsupportedError("quant.lm_head_split: only the executorch target splits the lm_head; remove it")
        kv = recipe.kv_cache
        if (kv.attention, kv.cache_update) != ("custom_sdpa", "custom"):
            raise UnsupportedError("the onnx target always uses the fused GroupQueryAttention op over an in-place cache; "
                                   "leave kv_cache.attention = 'custom_sdpa' and kv_cache.cache_update = 'custom'")
        for i, rule in enumerate(recipe.quant.rules):
            if rule.scheme != "float" and rule.scheme not in _LINEAR_STORAGE:
                raise UnsupportedError(f"quant.rules[{i}].scheme: {rule.scheme} has no ONNX Runtime storage; use one of "
                                       f"float, {', '.join(_LINEAR_STORAGE)}")
        opset = recipe.target.onnx.opset
        if opset < MIN_OPSET:
            raise UnsupportedError(f"target.onnx.opset {opset}: the graph needs opset {MIN_OPSET} or newer (RMSNormalization)")
        newest = newest_runtime_opset()
        if opset > newest:
            raise UnsupportedError(f"target.onnx.opset {opset}: onnxruntime {_ort().__version__} runs opsets up to {newest}; "
                                   f"set target.onnx.opset between {MIN_OPSET} and {newest}")

    def eager_kv_cache(self, recipe) -> tuple[str, str]:
        # The graph's attention is GroupQueryAttention; the reference only needs the same math.
        return "sdpa", "index_copy"

    def quantize(self, lm, spec, target, *, grams=None):
        """Quantize matched modules in ONNX Runtime's block layout; the eager weights become the
        dequantized values, so ``lm`` computes exactly what the graph will.

        ``grams``: input Gram matrices by Linear name (scale_search.calibrate); given, each
        block's scale is searched against them instead of taken from its min/max. ``target``
        is not needed here: projections are fused when the graph is written (onnx_graph)."""
        import torch

        from exporter.onnx_graph import ACCURACY_INT8, ONNX_WEIGHT_ATTR
        from exporter.onnx_quant import dequantize, fake_quantize_activation, quantize_blockwise
        from exporter.quantize import plan

        grams = grams or {}
        summary = plan(lm, spec)
        modules = dict(lm.named_modules())
        jobs: list[_QuantJob] = []
        for index, match in enumerate(summary.rules):
            rule = match.rule
            if rule.scheme == "float":
                continue
            for name in match.modules:
                module = modules[name]
                bits, accuracy = (_EMBEDDING_BITS[rule.scheme], 0) if isinstance(module, torch.nn.Embedding) \
                    else _LINEAR_STORAGE[rule.scheme]
                if module.weight.shape[1] % rule.group_size:
                    raise RecipeError(f"quant.rules[{index}].group_size: {rule.group_size} does not divide the input width "
                                      f"{module.weight.shape[1]} of {name}; choose a block size that divides it or keep it float")
                jobs.append(_QuantJob(rule, name, module, bits, accuracy))
        # A tied embedding and lm_head (equal weights, stored alike) are quantized once, with
        # the lm_head's Gram matrix when searching, so they stay one initializer (onnx_graph).
        groups: list[list[_QuantJob]] = []
        for job in jobs:
            group = next((g for g in groups if g[0].stored_alike(job)), None)
            if group is None:
                groups.append([job])
            else:
                group.append(job)
        for group in groups:
            first = group[0]
            gram = next((grams[job.name] for job in group if job.name in grams), None)
            stored = quantize_blockwise(first.module.weight.detach().float().numpy(), bits=first.bits,
                                        block_size=first.rule.group_size, symmetric=first.rule.symmetric, gram=gram)
            for job in group:
                setattr(job.module, ONNX_WEIGHT_ATTR, stored)
        for job in jobs:
            job.module.onnx_accuracy_level = job.accuracy
            if job.accuracy == ACCURACY_INT8:
                # The kernel quantizes its input per block; the reference does the same.
                job.module.register_forward_pre_hook(
                    lambda _m, args, block=job.rule.group_size: (fake_quantize_activation(args[0], block),))
        with torch.no_grad():
            # After every module is quantized: a tied weight must keep its float value until then.
            for job in jobs:
                job.module.weight = torch.nn.Parameter(torch.from_numpy(dequantize(getattr(job.module, ONNX_WEIGHT_ATTR))),
                                                       requires_grad=False)
        return summary

    def adopt_artifact_weights(self, lm, artifact) -> None:
        """Give the quantized reference the artifact's own stored weights (codes, scales, zero
        points), dequantized, and its norm weights.

        verify's lowering parity then compares the graph with exactly the weights it holds,
        without searching scales again. A rebuild matches only while the calibration
        activations match to the last bit: a near-tie between two candidate scales can fall
        the other way (200 of 3.7M SmolLM2 blocks did, before calibration ran on one thread;
        another CPU's kernels could still do it)."""
        import torch
        from onnx import load, numpy_helper

        from exporter.decoder import RMSNorm
        from exporter.onnx_graph import FUSED_INTO, ONNX_WEIGHT_ATTR
        from exporter.onnx_quant import dequantize

        graph = load(str(artifact.path / artifact.manifest["roles"]["program"])).graph
        arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        shared = artifact.manifest["target"].get("shared_embedding", False)
        rows_done: dict[str, int] = {}  # fused projections: rows of qkv_proj / gate_up_proj already handed out
        for name, module in lm.named_modules():
            stored = getattr(module, ONNX_WEIGHT_ATTR, None)
            if stored is None:
                continue
            source, first = name, 0
            parent, _, leaf = name.rpartition(".")
            if name == "model.embed_tokens":
                source = "lm_head" if shared else name
            elif f"{name}.weight_scales" not in arrays and leaf in FUSED_INTO:
                # Stored inside its fused projection (onnx_graph), rows in module order.
                source = f"{parent}.{FUSED_INTO[leaf]}"
                first = rows_done.get(source, 0)
                rows_done[source] = first + stored.shape[0]
            n, k_blocks = stored.shape[0], stored.k_blocks
            packed_name = next(f"{source}.weight_q{suffix}" for suffix in (stored.bits, "")
                               if f"{source}.weight_q{suffix}" in arrays)
            packed = arrays[packed_name].reshape(-1, *stored.packed.shape[1:])[first:first + n]
            scales = arrays[f"{source}.weight_scales"].reshape(-1, k_blocks)[first:first + n]
            zero = None
            if stored.zero_points is not None:
                zero = arrays[f"{source}.weight_zero_points"].reshape(-1, stored.zero_points.shape[-1])[first:first + n]
            adopted = replace(stored, packed=packed, scales=scales, zero_points=zero)
            setattr(module, ONNX_WEIGHT_ATTR, adopted)
            with torch.no_grad():
                module.weight = torch.nn.Parameter(torch.from_numpy(dequantize(adopted)), requires_grad=False)
        # Norm weights too: end-to-end tuning (exporter/tuning.py) trains them after quantizing.
        for name, module in lm.named_modules():
            if isinstance(module, RMSNorm) and f"{name}.weight" in arrays:
                module.weight = torch.nn.Parameter(torch.from_numpy(arrays[f"{name}.weight"].copy()), requires_grad=False)

    def lower(self, lm, *, recipe, model: dict, metadata: dict, out_dir: Path, on_stage: Callable[[str], None]) -> dict:
        onnx = require("onnx", self.extra)
        from exporter.onnx_graph import build_graph

        opset = recipe.target.onnx.opset
        timings = {}
        t0 = time.perf_counter()
        on_stage("build ONNX graph")
        graph, facts = build_graph(lm, opset=opset, fuse_projections=recipe.target.onnx.fuse_projections)
        timings["graph_s"] = time.perf_counter() - t0
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
        return {
            "roles": {"program": MODEL_FILE, "weights": WEIGHTS_FILE, "genai_config": GENAI_CONFIG},
            "timings": timings,
            "io_signature": io_signature(lm),
            "target_info": {"opset": opset, "ms_domain_opset": 1, **facts},
        }

    def runtime_name(self) -> str:
        from importlib.metadata import version

        # verify runs onnxruntime directly; bench runs the same session under onnxruntime-genai.
        return f"onnxruntime {_ort().__version__} (CPU; bench through onnxruntime-genai {version('onnxruntime-genai')})"

    def load_runner(self, artifact, *, threads: int | None = None):
        meta = artifact.manifest["model"]
        return OrtRunner(artifact.file("program"), artifact.manifest["io_signature"],
                         max_prefill_len=meta["max_prefill_len"], max_seq_len=meta["max_seq_len"], threads=threads)

    def shipped_tokenizer(self, artifact):
        return genai_tokenizer(artifact.path)

    def open_bench_session(self, artifact, *, threads: int):
        return GenaiSession(artifact.path, threads=threads)


def newest_runtime_opset() -> int:
    """The newest default-domain opset this onnxruntime loads (probed with a one-node model)."""
    ort = _ort()
    from onnx import TensorProto, helper

    for opset in range(30, MIN_OPSET - 1, -1):
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return opset
        except Exception:  # noqa: BLE001 - the runtime says "opset N is under development/unsupported"
            continue
    return MIN_OPSET - 1


def io_signature(lm) -> dict:
    s = lm.shape
    cache = ["batch", s.n_kv_heads, f"buffer<= {lm.max_seq_len}", s.head_dim]
    return {
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": ["batch", f"seq_len<= {lm.max_prefill_len} per call"]},
            {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "past + seq_len"]},
            {"name": "past_key_values.N.key / .value", "dtype": "float32", "shape": cache,
             "meaning": "BNSH cache; bind the same buffer as present.N.* to update it in place"},
        ],
        "outputs": [
            {"name": "logits", "dtype": "float32", "shape": ["batch", 1, s.vocab_size], "meaning": "last token"},
            {"name": "present.N.key / .value", "dtype": "float32", "shape": cache},
        ],
        "state": {"kv_cache": [s.n_layers, 2, 1, lm.max_seq_len, s.n_kv_heads, s.head_dim]},
    }


def genai_config(lm, model: dict) -> dict:
    """onnxruntime_genai's config for this folder: the decoder's I/O names and search defaults."""
    s = lm.shape
    eos = model["eos_ids"]
    return {
        "model": {
            "bos_token_id": model["bos_id"] if model["bos_id"] >= 0 else None,
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
            "type": model["architecture"],
            "vocab_size": s.vocab_size,
        },
        "search": {
            "do_sample": False, "max_length": lm.max_seq_len, "min_length": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


class OrtRunner(ChunkedPrefillMixin):
    """model.onnx in an onnxruntime InferenceSession; the KV cache is one max-length buffer per
    layer, bound as both past and present input/output, so GroupQueryAttention updates it in place."""

    def __init__(self, model: Path, io_sig: dict, *, max_prefill_len: int, max_seq_len: int, threads: int | None = None) -> None:
        ort = _ort()
        self.name = "onnxruntime"
        self.max_prefill_len = max_prefill_len
        self.max_seq_len = max_seq_len
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # verify alternates this session with eager torch in one process: idle ORT workers
        # spinning for work would take the cores torch needs (a 64 s verify took > 10 min
        # on a busy 2-core machine).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        layers, _, _, seq, kv_heads, head_dim = io_sig["state"]["kv_cache"]
        self.binding = self.session.io_binding()
        self.binding.bind_output("logits")  # bound first: get_outputs() lists outputs in binding order
        self.cache = []
        for i in range(layers):
            for kind in ("key", "value"):
                buffer = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, kv_heads, seq, head_dim), dtype=np.float32))
                self.cache.append(buffer)
                self.binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buffer)
                self.binding.bind_ortvalue_output(f"present.{i}.{kind}", buffer)

    def _step(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        ids = np.asarray([list(tokens)], dtype=np.int64)
        self.binding.bind_cpu_input("input_ids", ids)
        self.binding.bind_cpu_input("attention_mask", np.ones((1, start_pos + ids.shape[1]), dtype=np.int64))
        self.session.run_with_iobinding(self.binding)
        return self.binding.get_outputs()[0].numpy()[0, -1].copy()


def genai_tokenizer(folder: Path):
    """encode/decode with onnxruntime-genai's tokenizer (onnxruntime-extensions), as an app would."""
    og = require("onnxruntime_genai", OnnxBackend.extra)
    return _codec(og.Tokenizer(og.Model(str(folder))))


def _codec(tokenizer):
    """(encode, decode) over an og.Tokenizer, in plain ints."""

    def encode(text: str) -> list[int]:
        return [int(t) for t in tokenizer.encode(text)]

    def decode(ids) -> str:
        return tokenizer.decode(np.asarray(list(ids), dtype=np.int32))

    return encode, decode


class GenaiSession:
    """onnxruntime-genai's generator (C++ search loop over the folder's genai_config.json): the
    throughput path, as the app would run it. TTFT is append_tokens (prefill) plus the first
    sampled token; decode is timed over generate_next_token calls."""

    def __init__(self, folder: Path, *, threads: int) -> None:
        og = require("onnxruntime_genai", OnnxBackend.extra)
        self._og = og
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.threads = threads
        t0 = time.perf_counter()
        self.model = og.Model(config)
        self.encode, self.decode = _codec(og.Tokenizer(self.model))
        self._generate(self.encode("warm"), 1)
        self.load_ms = (time.perf_counter() - t0) * 1e3

    def _generate(self, ids, max_new_tokens: int) -> dict:
        og = self._og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
        generator = og.Generator(self.model, params)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        generator.append_tokens(ids)
        generator.generate_next_token()
        first = time.perf_counter()
        generated = 0
        while generated < max_new_tokens - 1 and not generator.is_done():
            generator.generate_next_token()
            generated += 1
        end = time.perf_counter()
        return {"ttft_s": first - wall0, "decode_s": end - first, "generated": generated,
                "wall_s": end - wall0, "cpu_s": time.process_time() - cpu0}

    def run(self, text: str, *, max_new_tokens: int) -> dict:
        ids = self.encode(text)
        r = self._generate(ids, max_new_tokens)
        return {
            "prompt_tokens": len(ids),
            "prefill_tok_s": len(ids) / r["ttft_s"] if max_new_tokens == 1 else None,
            "ttft_ms": r["ttft_s"] * 1e3 if max_new_tokens == 1 else None,
            "decode_tok_s": r["generated"] / r["decode_s"] if r["generated"] else 0.0,
            "generated": r["generated"],
            "cpu_s": r["cpu_s"],
            "wall_s": r["wall_s"],
        }
