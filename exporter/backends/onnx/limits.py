"""What the pinned ONNX Runtime can execute for a model's shapes, asked of the runtime itself.

The graph's attention is one GroupQueryAttention node per layer; its CPU kernel refuses some
shapes only when it first runs (onnxruntime 1.32: "head_size shall be a multiple of 16"), so
an export that does not ask would write an artifact that cannot run. The check builds that
node alone, with the graph's own attributes (graph.attention_attributes) and the model's
head counts and head_dim, and runs it once on a few positions: milliseconds, before any
weight is loaded. It follows the runtime: a version that lifts a limit passes without a
change here.
"""

from __future__ import annotations

import numpy as np

from exporter.backends.onnx.graph import MS_DOMAIN, attention_attributes
from exporter.backends.onnx.runtime import ort
from exporter.errors import UnsupportedError

SEQ, PAST = 2, 4  # positions the probe feeds, and its cache length


def attention_problem(shape, opset: int, *, int8_cache: bool = False) -> str | None:
    """The runtime's own words when it cannot run the graph's attention for ``shape`` (with
    an int8 cache of fixed per-channel scales: ``int8_cache``), or None."""
    from onnx import TensorProto, helper

    h, kv, d = shape.n_heads, shape.n_kv_heads, shape.head_dim
    if d % 2:
        return f"rotary embeddings need an even head_dim, not {d}"
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    cache = TensorProto.INT8 if int8_cache else f32
    inputs = [("query", f32, [1, SEQ, h * d]), ("key", f32, [1, SEQ, kv * d]), ("value", f32, [1, SEQ, kv * d]),
              ("past_key", cache, [1, kv, PAST, d]), ("past_value", cache, [1, kv, PAST, d]),
              ("seqlens_k", i32, [1]), ("total_sequence_length", i32, []),
              ("cos_cache", f32, [PAST, d // 2]), ("sin_cache", f32, [PAST, d // 2])]
    names, attributes = [name for name, _, _ in inputs], attention_attributes(shape)
    if int8_cache:  # as graph.py writes it
        inputs += [("k_scale", f32, [kv, 1, d]), ("v_scale", f32, [kv, 1, d])]
        names += ["", "", "", "k_scale", "v_scale"]
        attributes.update(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
    node = helper.make_node("GroupQueryAttention", names, ["output", "present_key", "present_value"],
                            domain=MS_DOMAIN, **attributes)
    graph = helper.make_graph([node], "attention_probe", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info("output", f32, [1, SEQ, h * d]),
                               helper.make_tensor_value_info("present_key", cache, [1, kv, PAST, d]),
                               helper.make_tensor_value_info("present_value", cache, [1, kv, PAST, d])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)])
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal(dims).astype(np.float32) for name, kind, dims in inputs if kind == f32}
    if int8_cache:
        feeds.update(past_key=np.zeros([1, kv, PAST, d], np.int8), past_value=np.zeros([1, kv, PAST, d], np.int8),
                     k_scale=np.full([kv, 1, d], 0.05, np.float32), v_scale=np.full([kv, 1, d], 0.05, np.float32))
    feeds["seqlens_k"] = np.array([SEQ - 1], dtype=np.int32)
    feeds["total_sequence_length"] = np.array(SEQ, dtype=np.int32)
    runtime = ort()
    options = runtime.SessionOptions()
    options.log_severity_level = 4
    try:
        session = runtime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - the runtime's message is what the user needs
        text = str(exc).strip()
        return (text.rsplit("Status Message:", 1)[-1].strip().splitlines() or [type(exc).__name__])[0]
    return None


def check_attention(shape, opset: int, *, int8_cache: bool = False) -> None:
    problem = attention_problem(shape, opset, int8_cache=int8_cache)
    if problem:
        raise UnsupportedError(
            f"the onnx target cannot run this model's attention (head_dim {shape.head_dim}, {shape.n_heads} heads, "
            f"{shape.n_kv_heads} KV heads) on onnxruntime {ort().__version__}: {problem}",
            hint="export this model for another target (executorch, coreml)")
