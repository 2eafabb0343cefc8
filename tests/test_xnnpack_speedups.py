"""fast_lowering() patches ExecuTorch internals; it must not change a single byte of the .pte."""

from __future__ import annotations

import hashlib

import pytest

from exporter.backends.executorch.program import lower_to_pte
from exporter.backends.executorch.quantizer import apply_quantization, round_group_scales
from exporter.decoder import build_decoder
from exporter.kv_cache import load_custom_ops
from exporter.load import load_model
from exporter.spec import QuantRule, QuantSpec

RULES = QuantSpec(rules=(
    QuantRule(match="model.embed_tokens", kind="embedding", scheme="int8_weight"),
    QuantRule(match="*", kind="linear", scheme="int8_dynact_int4_weight", group_size=32),
))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])  # q/k/v bias; per-head q/k norm
def test_fast_lowering_is_byte_identical(tiny_checkpoints, tmp_path, arch):
    import torch

    load_custom_ops()
    loaded = load_model(tiny_checkpoints[arch])
    digests = {}
    for fast in (False, True):
        lm = build_decoder(loaded.model, max_seq_len=64, max_prefill_len=16)
        apply_quantization(lm, RULES)
        round_group_scales(lm, torch.bfloat16)
        out = tmp_path / f"fast-{fast}"
        out.mkdir()
        lower_to_pte(lm, constants={"get_max_seq_len": 64}, out_dir=out, on_stage=lambda s: None, fast=fast)
        digests[fast] = hashlib.sha256((out / "model.pte").read_bytes()).hexdigest()
    assert digests[True] == digests[False]
