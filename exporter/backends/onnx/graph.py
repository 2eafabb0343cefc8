"""Write the decoder as an ONNX graph directly from its weights (no tracing).

Why not torch.onnx.export: it is slow and memory-hungry for a whole decoder and emits
generic attention; the decoder is a fixed pattern, so we emit the graph ONNX Runtime runs
fastest node by node (docs/targets/onnx.md has the measurements):
- ``GroupQueryAttention`` (com.microsoft): rotary embedding, causal GQA over a KV cache in
  BNSH layout that may share one max-length buffer between past and present (the static,
  in-place cache), no repeated K/V;
- ``MatMulNBits`` / ``GatherBlockQuantized`` for block-quantized linears and embeddings,
  with a tied lm_head and embedding sharing one initializer when stored alike;
- ``SkipSimplifiedLayerNormalization`` for residual add + RMSNorm, and the standard
  ``RMSNormalization`` (opset 23) elsewhere, so ``onnx.checker`` knows every default-domain op;
- the lm_head on the last position only (the caller samples from it).

The I/O names follow onnxruntime-genai's decoder convention, so the folder runs in
``onnxruntime_genai`` as it is: input_ids, attention_mask, past_key_values.N.key/value ->
logits [batch, 1, vocab], present.N.key/value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from exporter.backends.onnx.blocks import ACCURACY_FLOAT, BlockQuantized, StoredWeight
from exporter.quant.kv_scales import kv_scales_of

MS_DOMAIN = "com.microsoft"


@dataclass
class GraphWriter:
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    _names: set = field(default_factory=set)
    _constants: dict = field(default_factory=dict)
    shared_embedding: bool = False  # the tied embedding reads the lm_head's quantized blob
    stored: dict = field(default_factory=dict)  # module -> StoredWeight (the quantizer's Quantized.stored)

    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        from onnx import helper

        outputs = [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def initializer(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        if name in self._names:
            raise ValueError(f"duplicate initializer {name}")
        self._names.add(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def weight_of(self, module):
        """The module's stored weight: BlockQuantized, or the float32 array."""
        entry: StoredWeight | None = self.stored.get(module)
        if entry is not None:
            return entry.blocks
        return module.weight.detach().to("cpu").float().numpy()

    def accuracy_of(self, module) -> int:
        entry: StoredWeight | None = self.stored.get(module)
        return ACCURACY_FLOAT if entry is None else entry.accuracy

    def ints(self, values: list[int]) -> str:
        key = tuple(values)
        if key not in self._constants:
            self._constants[key] = self.initializer(f"const/int64/{'_'.join(map(str, values))}".replace("-", "m"),
                                                    np.array(values, dtype=np.int64))
        return self._constants[key]


# A projection stored inside a fused one (one MatMulNBits over their shared input), rows in
# this order: the name of the fused initializers beside it.
FUSED_INTO = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
              "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def linear(g: GraphWriter, x: str, name: str, weight, bias: np.ndarray | None, accuracy: int) -> str:
    if isinstance(weight, BlockQuantized):
        n, k = weight.shape
        inputs = [x, g.initializer(f"{name}.weight_q{weight.bits}", weight.packed),
                  g.initializer(f"{name}.weight_scales", weight.scales.reshape(-1))]
        if weight.zero_points is not None:
            inputs.append(g.initializer(f"{name}.weight_zero_points", weight.zero_points.reshape(-1)))
        (y,) = g.node("MatMulNBits", inputs, f"/{name}/MatMulNBits", domain=MS_DOMAIN, K=k, N=n,
                      bits=weight.bits, block_size=weight.block_size, accuracy_level=accuracy)
    else:
        (y,) = g.node("MatMul", [x, g.initializer(f"{name}.weight_t", weight.T)], f"/{name}/MatMul")
    if bias is not None:
        (y,) = g.node("Add", [y, g.initializer(f"{name}.bias", bias)], f"/{name}/Add")
    return y


def project(g: GraphWriter, x: str, name: str, module) -> str:
    """One nn.Linear of the decoder, stored as the backend quantized it."""
    return linear(g, x, name, g.weight_of(module), _bias(module), g.accuracy_of(module))


def _bias(module) -> np.ndarray | None:
    return None if module.bias is None else module.bias.detach().float().numpy()


def _fusable(g: GraphWriter, modules) -> bool:
    """Projections of one input (q/k/v, gate/up) become one MatMul when stored alike (all
    float, or all quantized the same way)."""
    weights = [g.weight_of(m) for m in modules]
    if all(isinstance(w, np.ndarray) for w in weights):
        kinds = {"float"}
    elif all(isinstance(w, BlockQuantized) for w in weights):
        kinds = {(w.bits, w.block_size, w.symmetric, w.shape[1]) for w in weights}
    else:
        return False
    return (len(kinds) == 1 and len({g.accuracy_of(m) for m in modules}) == 1
            and len({m.bias is None for m in modules}) == 1)


def _stacked_bias(modules) -> np.ndarray | None:
    return None if modules[0].bias is None else np.concatenate([_bias(m) for m in modules])


def _concat_rows(weights):
    if isinstance(weights[0], np.ndarray):
        return np.concatenate(weights, axis=0)
    first = weights[0]
    return BlockQuantized(
        bits=first.bits, block_size=first.block_size, symmetric=first.symmetric,
        shape=(sum(w.shape[0] for w in weights), first.shape[1]),
        packed=np.concatenate([w.packed for w in weights]), scales=np.concatenate([w.scales for w in weights]),
        zero_points=None if first.zero_points is None else np.concatenate([w.zero_points for w in weights]),
    )


def attention_attributes(s) -> dict:
    """The GroupQueryAttention node's attributes for a DecoderShape (limits.py probes the same)."""
    return dict(num_heads=s.n_heads, kv_num_heads=s.n_kv_heads, scale=float(s.head_dim**-0.5),
                do_rotary=1, rotary_interleaved=0, local_window_size=-1)


def build_graph(lm, stored: dict | None = None, *, opset: int, fuse_projections: bool = True):
    """The ONNX ModelProto of a StaticCacheLM and facts about it for the manifest.
    ``stored``: module -> StoredWeight, as the onnx quantizer stored it (float without).
    ``fuse_projections``: q/k/v and gate/up stored alike run as one MatMul(NBits) each."""
    from onnx import TensorProto, helper

    s = lm.shape
    eps = float(s.rms_norm_eps)
    g = GraphWriter(stored=dict(stored or {}))
    batch, seq, total, past = "batch_size", "sequence_length", "total_sequence_length", "past_sequence_length"
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, seq]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [batch, total])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 1, s.vocab_size])]
    kv_scales = kv_scales_of(lm)
    cache_type = TensorProto.INT8 if kv_scales else TensorProto.FLOAT
    for i in range(s.n_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", cache_type,
                                                        [batch, s.n_kv_heads, past, s.head_dim]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", cache_type,
                                                         [batch, s.n_kv_heads, total, s.head_dim]))

    # GroupQueryAttention takes the index of the last valid position per sequence and the total length.
    (mask_sum,) = g.node("ReduceSum", ["attention_mask", g.ints([1])], "/mask/ReduceSum", keepdims=0)
    (last_index,) = g.node("Sub", [mask_sum, g.ints([1])], "/mask/Sub")
    (seqlens_k,) = g.node("Cast", [last_index], "/mask/Cast_seqlens", to=TensorProto.INT32)
    (mask_shape,) = g.node("Shape", ["attention_mask"], "/mask/Shape")
    (total_len64,) = g.node("Gather", [mask_shape, g.ints([1])], "/mask/Gather", axis=0)
    (total_len,) = g.node("Cast", [total_len64], "/mask/Cast_total", to=TensorProto.INT32)
    (total_len_scalar,) = g.node("Squeeze", [total_len, g.ints([0])], "/mask/Squeeze")
    half = s.head_dim // 2
    cos = g.initializer("cos_cache", lm.rope_cos[:, 0, :half].float().numpy())
    sin = g.initializer("sin_cache", lm.rope_sin[:, 0, :half].float().numpy())

    hidden = _embedding(g, lm)
    residual, pending = hidden, None  # pending: the branch output not yet added to the residual
    for i, layer in enumerate(lm.model.layers):
        prefix = f"model.layers.{i}"
        x, residual = _norm(g, residual, pending, layer.input_layernorm, f"{prefix}.input_layernorm", eps)
        attn = layer.self_attn
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        if fuse_projections and not s.qk_norm and _fusable(g, projections):
            qkv = linear(g, x, f"{prefix}.self_attn.qkv_proj", _concat_rows([g.weight_of(m) for m in projections]),
                         _stacked_bias(projections), g.accuracy_of(attn.q_proj))
            q, k, v = qkv, "", ""
        else:
            q, k, v = (project(g, x, f"{prefix}.self_attn.{n}_proj", m)
                       for n, m in zip("qkv", projections, strict=True))
            if s.qk_norm:
                q = _head_norm(g, q, attn.q_norm, f"{prefix}.self_attn.q_norm", eps)
                k = _head_norm(g, k, attn.k_norm, f"{prefix}.self_attn.k_norm", eps)
        attention_inputs = [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k,
                            total_len_scalar, cos, sin]
        int8_cache = {}
        if kv_scales:
            # position_ids, attention_bias and head_sink omitted; then the cache's fixed scales.
            attention_inputs += ["", "", "", *(g.initializer(f"{prefix}.self_attn.{kind}_cache_scale",
                                                              scale.float().numpy()[:, None, :])
                                               for kind, scale in zip("kv", kv_scales[i], strict=True))]
            int8_cache = dict(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
        attn_out, _, _ = g.node(
            "GroupQueryAttention", attention_inputs,
            f"/{prefix}/self_attn/GroupQueryAttention", n_out=3, domain=MS_DOMAIN, **attention_attributes(s),
            **int8_cache,
        )
        g.nodes[-1].output[1:] = [f"present.{i}.key", f"present.{i}.value"]
        o = project(g, attn_out, f"{prefix}.self_attn.o_proj", attn.o_proj)
        x, residual = _norm(g, residual, o, layer.post_attention_layernorm, f"{prefix}.post_attention_layernorm", eps)
        mlp = layer.mlp
        if fuse_projections and _fusable(g, (mlp.gate_proj, mlp.up_proj)):
            # One MatMulNBits for both: one input quantization and one kernel call instead of
            # two, split after (docs/targets/onnx.md, "Fused projections").
            gate_up = linear(g, x, f"{prefix}.mlp.gate_up_proj",
                             _concat_rows([g.weight_of(mlp.gate_proj), g.weight_of(mlp.up_proj)]),
                             _stacked_bias((mlp.gate_proj, mlp.up_proj)), g.accuracy_of(mlp.gate_proj))
            width = mlp.gate_proj.weight.shape[0]
            gate, up = g.node("Split", [gate_up, g.ints([width, width])], f"/{prefix}/mlp/Split", n_out=2, axis=-1)
        else:
            gate = project(g, x, f"{prefix}.mlp.gate_proj", mlp.gate_proj)
            up = project(g, x, f"{prefix}.mlp.up_proj", mlp.up_proj)
        (sig,) = g.node("Sigmoid", [gate], f"/{prefix}/mlp/Sigmoid")
        (silu,) = g.node("Mul", [gate, sig], f"/{prefix}/mlp/SiLU")
        (act,) = g.node("Mul", [silu, up], f"/{prefix}/mlp/Mul")
        pending = project(g, act, f"{prefix}.mlp.down_proj", mlp.down_proj)

    # Last position only, before the final norm and the lm_head (the vocabulary projection
    # over a whole prompt would cost more than the rest of a prefill step).
    last_residual, last_pending = (g.node("Slice", [t, g.ints([-1]), g.ints([np.iinfo(np.int64).max]), g.ints([1])],
                                          f"/final/Slice_{j}")[0] for j, t in enumerate((residual, pending)))
    x, _ = _norm(g, last_residual, last_pending, lm.model.norm, "model.norm", eps)
    _lm_head(g, lm, x)
    g.nodes[-1].output[0] = "logits"  # the graph output's name, as onnxruntime-genai expects

    graph = helper.make_graph(g.nodes, "recgpt_decoder", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="recgpt-export")
    return model, {"shared_embedding": g.shared_embedding}


def _norm(g: GraphWriter, residual: str, pending: str | None, module, name: str, eps: float) -> tuple[str, str]:
    """RMSNorm of residual (+ pending branch output); returns (normed, new residual)."""
    weight = g.initializer(f"{name}.weight", module.weight.detach().float().numpy())
    if pending is None:
        (y,) = g.node("RMSNormalization", [residual, weight], f"/{name}/RMSNormalization", axis=-1, epsilon=eps)
        return y, residual
    y, _, _, summed = g.node("SkipSimplifiedLayerNormalization", [residual, pending, weight],
                             f"/{name}/SkipSimplifiedLayerNormalization", n_out=4, domain=MS_DOMAIN, epsilon=eps)
    g.nodes[-1].output[1:3] = ["", ""]  # mean and inverse std: not needed
    return y, summed


def _head_norm(g: GraphWriter, x: str, module, name: str, eps: float) -> str:
    """Qwen3's per-head RMSNorm on q or k ([B, S, H*D] -> per head of D -> back)."""
    head_dim = module.weight.shape[0]
    (heads,) = g.node("Reshape", [x, g.ints([0, 0, -1, head_dim])], f"/{name}/Reshape_in")
    (normed,) = g.node("RMSNormalization",
                       [heads, g.initializer(f"{name}.weight", module.weight.detach().float().numpy())],
                       f"/{name}/RMSNormalization", axis=-1, epsilon=eps)
    (flat,) = g.node("Reshape", [normed, g.ints([0, 0, -1])], f"/{name}/Reshape_out")
    return flat


def _embedding(g: GraphWriter, lm) -> str:
    weight = g.weight_of(lm.model.embed_tokens)
    if not isinstance(weight, BlockQuantized):
        (y,) = g.node("Gather", [g.initializer("model.embed_tokens.weight", weight), "input_ids"],
                      "/model/embed_tokens/Gather")
        return y
    head = g.weight_of(lm.lm_head)
    if lm.shape.tie_word_embeddings and isinstance(head, BlockQuantized) and head.same_storage(weight):
        # One copy of the tied matrix: the lm_head's MatMulNBits blob, viewed as [vocab, bytes].
        data = g.node("Reshape", [_lm_head_blob_name(g, lm), g.ints([weight.shape[0], -1])],
                      "/model/embed_tokens/Reshape")[0]
        scales = "lm_head.weight_scales"
        zero = "lm_head.weight_zero_points" if weight.zero_points is not None else None
        g.shared_embedding = True
    else:
        data = g.initializer("model.embed_tokens.weight_q", weight.packed.reshape(weight.shape[0], -1))
        scales = g.initializer("model.embed_tokens.weight_scales", weight.scales)
        zero = None if weight.zero_points is None else g.initializer("model.embed_tokens.weight_zero_points",
                                                                     weight.zero_points)
    inputs = [data, "input_ids", scales] + ([zero] if zero else [])
    (y,) = g.node("GatherBlockQuantized", inputs, "/model/embed_tokens/GatherBlockQuantized", domain=MS_DOMAIN,
                  bits=weight.bits, block_size=weight.block_size, gather_axis=0, quantize_axis=1)
    width = weight.shape[1]
    if weight.k_blocks * weight.block_size != width:  # a padded last block: the rows come out padded
        (y,) = g.node("Slice", [y, g.ints([0]), g.ints([width]), g.ints([-1])], "/model/embed_tokens/Slice")
    return y


def _lm_head_blob_name(g: GraphWriter, lm) -> str:
    """Create the lm_head's initializers early (the embedding reads them first) and return the blob's name."""
    head = g.weight_of(lm.lm_head)
    name = f"lm_head.weight_q{head.bits}"
    g.initializer(name, head.packed)
    g.initializer("lm_head.weight_scales", head.scales)
    if head.zero_points is not None:
        g.initializer("lm_head.weight_zero_points", head.zero_points)
    return name


def _lm_head(g: GraphWriter, lm, x: str) -> str:
    head = g.weight_of(lm.lm_head)
    if g.shared_embedding:
        n, k = head.shape
        inputs = [x, f"lm_head.weight_q{head.bits}", "lm_head.weight_scales"]
        if head.zero_points is not None:
            inputs.append("lm_head.weight_zero_points")
        (y,) = g.node("MatMulNBits", inputs, "/lm_head/MatMulNBits", domain=MS_DOMAIN, K=k, N=n,
                      bits=head.bits, block_size=head.block_size, accuracy_level=g.accuracy_of(lm.lm_head))
        return y
    return project(g, x, "lm_head", lm.lm_head)
