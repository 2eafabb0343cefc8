"""Running an ONNX artifact: an onnxruntime session for parity, onnxruntime-genai for throughput."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from exporter.backends.base import RunTiming
from exporter.errors import require
from exporter.manifest import KVCacheShape
from exporter.runners import ChunkedRunner

EXTRA = "onnx"
MIN_OPSET = 23  # RMSNormalization entered the default domain in opset 23


def ort():
    return require("onnxruntime", EXTRA)


def newest_runtime_opset() -> int:
    """The newest default-domain opset this onnxruntime loads (probed with a one-node model)."""
    runtime = ort()
    from onnx import TensorProto, helper

    for opset in range(30, MIN_OPSET - 1, -1):
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        try:
            runtime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return opset
        except Exception:  # noqa: BLE001 - the runtime says "opset N is under development/unsupported"
            continue
    return MIN_OPSET - 1


class OrtRunner(ChunkedRunner):
    """model.onnx in an onnxruntime InferenceSession; the KV cache is one max-length buffer per
    layer, bound as both past and present input/output, so GroupQueryAttention updates it in place."""

    def __init__(self, model: Path, cache: KVCacheShape, *, max_prefill_len: int, threads: int | None = None) -> None:
        runtime = ort()
        super().__init__("onnxruntime", max_prefill_len=max_prefill_len, max_seq_len=cache.max_seq_len)
        options = runtime.SessionOptions()
        options.log_severity_level = 3
        # verify alternates this session with eager torch in one process: idle ORT workers
        # spinning for work would take the cores torch needs (a 64 s verify took > 10 min
        # on a busy 2-core machine).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self.session = runtime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self.binding = self.session.io_binding()
        self.binding.bind_output("logits")  # bound first: get_outputs() lists outputs in binding order
        self.cache = []
        for i in range(cache.layers):
            for kind in ("key", "value"):
                buffer = runtime.OrtValue.ortvalue_from_numpy(
                    np.zeros((cache.batch, cache.kv_heads, cache.max_seq_len, cache.head_dim), dtype=cache.dtype))
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
    og = require("onnxruntime_genai", EXTRA)
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
        og = require("onnxruntime_genai", EXTRA)
        self._og = og
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.threads = threads
        t0 = time.perf_counter()
        self.model = og.Model(config)
        self.encode, self.decode = _codec(og.Tokenizer(self.model))
        self._generate(self.encode("warm"), 1)
        self.load_ms = (time.perf_counter() - t0) * 1e3

    def _generate(self, ids, max_new_tokens: int) -> RunTiming:
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
        return RunTiming.of(prompt_tokens=len(ids), first_token_s=first - wall0, max_new_tokens=max_new_tokens,
                            generated=generated, decode_s=end - first, cpu_s=time.process_time() - cpu0,
                            wall_s=end - wall0)

    def run(self, text: str, *, max_new_tokens: int) -> RunTiming:
        return self._generate(self.encode(text), max_new_tokens)
