"""Our export-friendly decoder computes what transformers computes, for every architecture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporter.decoder import build_decoder, fuse_projections
from exporter.kv_cache import load_custom_ops
from exporter.load import load_model
from exporter.runners import EagerRunner, TransformersRunner

TOKENS = [5, 17, 33, 60, 100, 7, 9, 12, 250, 31, 2, 44]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("attention,cache_update", [("custom_sdpa", "custom"), ("sdpa", "index_copy")])
def test_decoder_matches_transformers(tiny_checkpoints, arch, attention, cache_update):
    load_custom_ops()
    loaded = load_model(tiny_checkpoints[arch])
    lm = build_decoder(loaded.model, max_seq_len=64, max_prefill_len=4, attention=attention, cache_update=cache_update)
    ours, ref = EagerRunner(lm), TransformersRunner(loaded.model)
    # Prefill of 7 tokens runs in two chunks (max_prefill_len=4), then 5 single-token decodes.
    rows = [(ours.prefill(TOKENS[:7]), ref.prefill(TOKENS[:7]))]
    rows += [(ours.decode(t, p), ref.decode(t, p)) for p, t in enumerate(TOKENS[7:], start=7)]
    for a, b in rows:
        # Same float32 math in another order: differences stay at rounding level (seen: ~1e-6).
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
        assert a.argmax() == b.argmax()


def test_tied_lm_head_is_untied_copy(tiny_checkpoints):
    loaded = load_model(tiny_checkpoints["qwen3"])
    assert loaded.config.tie_word_embeddings
    lm = build_decoder(loaded.model, max_seq_len=32, max_prefill_len=8, attention="sdpa", cache_update="index_copy")
    assert torch.equal(lm.lm_head.weight, lm.model.embed_tokens.weight)
    assert lm.lm_head.weight.data_ptr() != lm.model.embed_tokens.weight.data_ptr()


def test_static_cache_is_updated_in_place(tiny_checkpoints):
    load_custom_ops()
    loaded = load_model(tiny_checkpoints["llama"])
    lm = build_decoder(loaded.model, max_seq_len=32, max_prefill_len=8)
    cache = lm.model.layers[0].self_attn.kv_cache
    ptr = cache.k_cache.data_ptr()
    EagerRunner(lm).prefill([1, 2, 3])
    assert cache.k_cache.data_ptr() == ptr
    assert cache.k_cache[0, :3].abs().sum() > 0 and cache.k_cache[0, 3:].abs().sum() == 0


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_rope_from_positions_equals_the_tables(tiny_checkpoints, arch):
    # The ExecuTorch program computes cos/sin from the positions; it must give the very
    # values the stored tables held, at every position, so logits are bit-identical.
    load_custom_ops()
    loaded = load_model(tiny_checkpoints[arch])
    tables = build_decoder(loaded.model, max_seq_len=32, max_prefill_len=8)
    in_graph = build_decoder(loaded.model, max_seq_len=32, max_prefill_len=8)
    assert in_graph.rope_from_positions()
    assert not hasattr(in_graph, "rope_cos") and "rope_cos" not in dict(in_graph.named_buffers())
    a, b = EagerRunner(tables), EagerRunner(in_graph)
    assert np.array_equal(a.prefill(TOKENS[:7]), b.prefill(TOKENS[:7]))
    for p, t in enumerate(TOKENS[7:], start=7):
        assert np.array_equal(a.decode(t, p), b.decode(t, p))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_fused_projections_compute_the_same_logits(tiny_checkpoints, arch):
    # qwen2 has q/k/v biases, qwen3 q/k norms after the split.
    load_custom_ops()
    loaded = load_model(tiny_checkpoints[arch])
    separate = build_decoder(loaded.model, max_seq_len=32, max_prefill_len=8)
    fused = build_decoder(loaded.model, max_seq_len=32, max_prefill_len=8)
    fuse_projections(fused, lambda names: True)
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert fused.fused_parts["model.layers.0.self_attn.qkv_proj"] == tuple(
        f"model.layers.0.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj"))
    assert not hasattr(attn, "q_proj") and not hasattr(mlp, "up_proj")
    a, b = EagerRunner(separate), EagerRunner(fused)
    np.testing.assert_allclose(a.prefill(TOKENS[:7]), b.prefill(TOKENS[:7]), atol=1e-5, rtol=0)
    for p, t in enumerate(TOKENS[7:], start=7):
        np.testing.assert_allclose(a.decode(t, p), b.decode(t, p), atol=1e-5, rtol=0)
