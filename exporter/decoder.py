"""An export-friendly decoder for Llama, Qwen2 and Qwen3 checkpoints.

Why our own module rather than the transformers one: we need a static KV cache written in
place, ExecuTorch's custom SDPA, a dynamic prefill length, and last-token-only logits
(the lm_head over a 49k vocabulary on every prompt position costs more than the rest of a
prefill step). The three architectures differ only in small ways, read from the config:
q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3), explicit head_dim, tied embeddings.
Module names mirror transformers' (``model.layers.3.self_attn.q_proj``) so quantization
rules read the same as for the source checkpoint, and weights load by name.

Contract (the .pte's ``forward``): tokens int64 [1, seq] (1 <= seq <= max_prefill_len),
input_pos int64 [1] holding the position of tokens[0]; returns float32 logits [1, vocab]
for the last token. The cache lives inside the module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from exporter.errors import UnsupportedError
from exporter.kv_cache import CachedAttention, Int8KVCache, StaticKVCache


@dataclass(frozen=True, kw_only=True)
class DecoderShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config) -> DecoderShape:
        if getattr(config, "use_sliding_window", False):
            raise UnsupportedError(f"{config.model_type} with use_sliding_window=true is not supported yet")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedError(f"hidden_act={config.hidden_act!r} is not supported (only silu)")
        arch = config.model_type
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            n_layers=config.num_hidden_layers,
            n_heads=config.num_attention_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            # Qwen2 always has q/k/v bias and no o bias; Llama and Qwen3 follow attention_bias.
            qkv_bias=True if arch == "qwen2" else attention_bias,
            o_bias=False if arch == "qwen2" else attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=arch == "qwen3",
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )


class RMSNorm(nn.Module):
    """Same arithmetic as transformers' LlamaRMSNorm (normalise in float32, then scale)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, shape: DecoderShape, max_seq_len: int, *, attention: str, cache_update: str,
                 cache_dtype: str = "float32") -> None:
        super().__init__()
        s = shape
        self.n_heads, self.n_kv_heads, self.head_dim = s.n_heads, s.n_kv_heads, s.head_dim
        self.q_proj = nn.Linear(s.hidden_size, s.n_heads * s.head_dim, bias=s.qkv_bias)
        self.k_proj = nn.Linear(s.hidden_size, s.n_kv_heads * s.head_dim, bias=s.qkv_bias)
        self.v_proj = nn.Linear(s.hidden_size, s.n_kv_heads * s.head_dim, bias=s.qkv_bias)
        self.o_proj = nn.Linear(s.n_heads * s.head_dim, s.hidden_size, bias=s.o_bias)
        if s.qk_norm:
            self.q_norm = RMSNorm(s.head_dim, s.rms_norm_eps)
            self.k_norm = RMSNorm(s.head_dim, s.rms_norm_eps)
        self.qk_norm = s.qk_norm
        self.kv_cache = (Int8KVCache(max_seq_len, s.n_kv_heads, s.head_dim) if cache_dtype == "int8" else
                         StaticKVCache(max_seq_len, s.n_kv_heads, s.head_dim, cache_update=cache_update))
        self.attn = CachedAttention(max_seq_len, s.n_heads, s.n_kv_heads, s.head_dim, attention=attention)
        self.qkv_proj = None  # set by fuse_projections

    def forward(self, x, start_pos, cos, sin):
        bsz, seq_len, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(bsz, seq_len, self.n_heads, self.head_dim)
        k = k.view(bsz, seq_len, self.n_kv_heads, self.head_dim)
        v = v.view(bsz, seq_len, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_cache, v_cache = self.kv_cache.update(start_pos, k, v)
        quantized = self.kv_cache if isinstance(self.kv_cache, Int8KVCache) else None
        return self.o_proj(self.attn(q, k_cache, v_cache, start_pos, quantized))


class MLP(nn.Module):
    def __init__(self, shape: DecoderShape) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=shape.mlp_bias)
        self.up_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=shape.mlp_bias)
        self.down_proj = nn.Linear(shape.intermediate_size, shape.hidden_size, bias=shape.mlp_bias)
        self.gate_up_proj = None  # set by fuse_projections

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(nn.functional.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, shape: DecoderShape, max_seq_len: int, **attn_kwargs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.self_attn = SelfAttention(shape, max_seq_len, **attn_kwargs)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.mlp = MLP(shape)

    def forward(self, x, start_pos, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), start_pos, cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderBody(nn.Module):
    def __init__(self, shape: DecoderShape, max_seq_len: int, **attn_kwargs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(shape, max_seq_len, **attn_kwargs) for _ in range(shape.n_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)


class StaticCacheLM(nn.Module):
    def __init__(self, shape: DecoderShape, *, max_seq_len: int, max_prefill_len: int,
                 attention: str = "custom_sdpa", cache_update: str = "custom", cache_dtype: str = "float32") -> None:
        super().__init__()
        self.shape = shape
        self.max_seq_len = max_seq_len
        self.max_prefill_len = max_prefill_len
        self.model = DecoderBody(shape, max_seq_len, attention=attention, cache_update=cache_update,
                                 cache_dtype=cache_dtype)
        self.lm_head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.zeros(max_seq_len, 1, shape.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.zeros(max_seq_len, 1, shape.head_dim), persistent=False)
        # The rotary frequencies, when the tables are a plain function of them (see rope_from_positions).
        self.register_buffer("rope_inv_freq", torch.zeros(shape.head_dim // 2), persistent=False)
        self.rope_attention_scaling: float | None = None
        self.rope_in_graph = False
        # Fused Linear name -> the modules it replaced (fuse_projections); rules match those names.
        self.fused_parts: dict[str, tuple[str, ...]] = {}

    def reset_caches(self) -> None:
        """Zero every layer's KV cache and refill the aten-SDPA causal mask, in place."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (StaticKVCache, Int8KVCache, CachedAttention)):
                    module.reset_buffers()

    def rope_from_positions(self) -> bool:
        """Compute cos/sin in the graph from the positions instead of reading stored tables.

        Saves 2 x max_seq_len x head_dim floats in the program, which is what the
        transformers rotary module does too. Only taken when
        the frequencies alone give the tables (checked on every position: not so for
        dynamic rope scaling); returns whether it was."""
        if self.rope_attention_scaling is None:
            return False
        cos, sin = self._rope_at(torch.arange(self.max_seq_len))
        if not (torch.equal(cos, self.rope_cos) and torch.equal(sin, self.rope_sin)):
            return False
        self.rope_in_graph = True
        del self.rope_cos, self.rope_sin
        return True

    def _rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The same float32 arithmetic as transformers' rotary embedding (product, then cos/sin).
        freqs = positions.to(torch.float32)[:, None] * self.rope_inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos() * self.rope_attention_scaling, emb.sin() * self.rope_attention_scaling

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        # Only the last position's logits: the runner samples from it, parity compares it.
        x = self.hidden_states(tokens, input_pos)
        return self.lm_head(self.model.norm(x[:, -1, :]))

    def all_logits(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Logits [1, seq, vocab] at every position of ``tokens`` (``forward`` gives the last
        one's only): for teacher-forced scoring and tuning in eager torch, never exported."""
        return self.lm_head(self.model.norm(self.hidden_states(tokens, input_pos)))

    def hidden_states(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """The last layer's output at every position of ``tokens`` (before the final norm),
        written into the KV cache from ``input_pos``."""
        seq_len = tokens.shape[1]
        start_pos = input_pos[0].item()
        # Tell torch.export the bounds it cannot infer from a data-dependent position.
        torch._check(start_pos >= 0)
        torch._check(start_pos + seq_len <= self.max_seq_len)
        if self.rope_in_graph:
            # From the input tensor, not the unpacked start_pos: the runtime takes no SymInt operand here.
            cos, sin = self._rope_at(torch.arange(seq_len) + input_pos)
        else:
            cos = self.rope_cos.narrow(0, start_pos, seq_len)
            sin = self.rope_sin.narrow(0, start_pos, seq_len)
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x, start_pos, cos, sin)
        return x


class SplitLMHead(nn.Module):
    """The lm_head as two Linears over consecutive vocabulary rows, logits concatenated."""

    def __init__(self, lm_head: nn.Linear, rows: int) -> None:
        super().__init__()
        self.head = nn.Linear(lm_head.in_features, rows, bias=lm_head.bias is not None)
        self.tail = nn.Linear(lm_head.in_features, lm_head.out_features - rows, bias=lm_head.bias is not None)
        with torch.no_grad():
            self.head.weight = nn.Parameter(lm_head.weight[:rows].clone(), requires_grad=False)
            self.tail.weight = nn.Parameter(lm_head.weight[rows:].clone(), requires_grad=False)
            if lm_head.bias is not None:
                self.head.bias = nn.Parameter(lm_head.bias[:rows].clone(), requires_grad=False)
                self.tail.bias = nn.Parameter(lm_head.bias[rows:].clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.head(x), self.tail(x)), dim=-1)


def split_lm_head(lm: StaticCacheLM, rows: int) -> None:
    """Replace ``lm.lm_head`` by a SplitLMHead at vocabulary row ``rows`` (quant.lm_head_split)."""
    from exporter.errors import RecipeError

    vocab = lm.lm_head.out_features
    if not 0 < rows < vocab:
        raise RecipeError(f"quant.lm_head_split: {rows} must lie between 1 and the vocabulary size - 1 ({vocab - 1})")
    lm.lm_head = SplitLMHead(lm.lm_head, rows)


def _concat_linears(parts: list[nn.Linear]) -> nn.Linear:
    bias = parts[0].bias is not None
    # On the meta device: no random init of a weight that is replaced at once.
    fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=bias, device="meta")
    with torch.no_grad():
        fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
        if bias:
            fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return fused


def fuse_projections(lm: StaticCacheLM, can_fuse: Callable[[list[str]], bool]) -> None:
    """Make q/k/v one Linear (``self_attn.qkv_proj``) and gate/up one (``mlp.gate_up_proj``).

    Each group reads the same input, so one Linear over the concatenated rows computes the
    same outputs; the caller fuses only groups whose parts get the same quantization
    (``can_fuse(names)``), and every scheme quantizes per output row, so the quantized
    weights are the same too. Fewer, larger matmuls: on XNNPACK each Linear is an operator
    with its own dynamic activation quantization and thread-pool synchronisation."""
    for i, layer in enumerate(lm.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        names = [f"model.layers.{i}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")]
        if attn.qkv_proj is None and can_fuse(names):
            parts = [attn.q_proj, attn.k_proj, attn.v_proj]
            attn.qkv_sizes = [p.out_features for p in parts]
            attn.qkv_proj = _concat_linears(parts)
            lm.fused_parts[f"model.layers.{i}.self_attn.qkv_proj"] = tuple(names)
            del attn.q_proj, attn.k_proj, attn.v_proj
        names = [f"model.layers.{i}.mlp.{n}" for n in ("gate_proj", "up_proj")]
        if mlp.gate_up_proj is None and can_fuse(names):
            mlp.gate_up_proj = _concat_linears([mlp.gate_proj, mlp.up_proj])
            lm.fused_parts[f"model.layers.{i}.mlp.gate_up_proj"] = tuple(names)
            del mlp.gate_proj, mlp.up_proj


def build_decoder(hf_model, *, max_seq_len: int, max_prefill_len: int,
                  attention: str = "custom_sdpa", cache_update: str = "custom",
                  cache_dtype: str = "float32") -> StaticCacheLM:
    """Copy a transformers Llama/Qwen2/Qwen3 model's weights into a StaticCacheLM (float32, eval)."""
    config = hf_model.config
    shape = DecoderShape.from_config(config)
    # Built on the meta device, then given the checkpoint's tensors: no random init of a
    # second full copy of the weights. Buffers are then filled explicitly.
    with torch.device("meta"):
        lm = StaticCacheLM(shape, max_seq_len=max_seq_len, max_prefill_len=max_prefill_len,
                           attention=attention, cache_update=cache_update, cache_dtype=cache_dtype)
    source = dict(hf_model.state_dict())
    if "lm_head.weight" not in source:  # tied and not serialised twice
        source["lm_head.weight"] = source["model.embed_tokens.weight"]
    wanted = lm.state_dict()
    missing = [k for k in wanted if k not in source]
    if missing:
        raise UnsupportedError(f"{config.model_type} checkpoint lacks weights the decoder needs: "
                               f"{', '.join(missing[:3])}")
    lm = lm.to_empty(device="cpu")
    with torch.no_grad():
        # clone: a tied lm_head becomes its own tensor so it can be quantized on its own.
        lm.load_state_dict({k: source[k].detach().to(torch.float32).clone() for k in wanted}, strict=True, assign=True)
        lm.reset_caches()
        cos, sin = _rope_tables(hf_model, max_seq_len)
        lm.rope_cos.copy_(cos[:, None, :])
        lm.rope_sin.copy_(sin[:, None, :])
        rotary = hf_model.model.rotary_emb
        lm.rope_inv_freq.copy_(rotary.inv_freq.to(torch.float32))
        lm.rope_attention_scaling = float(rotary.attention_scaling)
    return lm.eval()


def _rope_tables(hf_model, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for positions 0..max_seq_len-1 from the model's own rotary module (any rope scaling)."""
    rotary = hf_model.model.rotary_emb
    positions = torch.arange(max_seq_len)[None, :]
    probe = torch.zeros(1, dtype=torch.float32)
    cos, sin = rotary(probe, positions)
    return cos[0].to(torch.float32), sin[0].to(torch.float32)
