"""Activation smoothing: the float function is unchanged, and dynamic int8 activations lose less."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporter.decoder import build_decoder
from exporter.errors import RecipeError, UsageError
from exporter.kv_cache import load_custom_ops
from exporter.load import load_model
from exporter.quant.calibration import calibration_samples, calibration_texts
from exporter.quant.smoothing import activation_absmax, smooth_decoder
from exporter.recipe_io import recipe_from_dict
from exporter.runners import EagerRunner
from exporter.spec import QuantRule, QuantSpec, SmoothingSpec

TOKENS = [5, 17, 33, 60, 100, 7, 9, 12, 250, 31, 2, 44]


def _decoder(checkpoint):
    load_custom_ops()
    loaded = load_model(checkpoint)
    return loaded, build_decoder(loaded.model, max_seq_len=32, max_prefill_len=16)


def _logits(lm) -> np.ndarray:
    runner = EagerRunner(lm)
    rows = [runner.prefill(TOKENS[:6])]
    rows += [runner.decode(t, p) for p, t in enumerate(TOKENS[6:], start=6)]
    return np.stack(rows)


def _builtin_absmax(lm, tokenizer) -> dict:
    """Activation statistics over the built-in calibration text, as an export gathers them."""
    return activation_absmax(lm, calibration_samples(lm, tokenizer, calibration_texts(SmoothingSpec(alpha=0.5))))


def _plant_outliers(model) -> None:
    """Make a few input channels of every q/k/v and gate/up 30x larger in the activations and
    30x smaller in the weights: the same function, with the outliers real models have."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, linears in ((layer.input_layernorm,
                                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                                  (layer.post_attention_layernorm, ("mlp.gate_proj", "mlp.up_proj"))):
                norm.weight[:3] *= 30.0
                for name in linears:
                    layer.get_submodule(name).weight[:, :3] /= 30.0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_smoothing_keeps_the_float_function(tiny_checkpoints, arch):
    loaded, lm = _decoder(tiny_checkpoints[arch])
    before = _logits(lm)
    act_max = _builtin_absmax(lm, loaded.tokenizer)
    assert all(float(b.abs().sum()) == 0 for n, b in lm.named_buffers() if n.endswith("_cache"))  # cache cleared
    smoothed = smooth_decoder(lm, act_max, alpha=0.5, lm_head=True)
    assert len(smoothed) == 6 * len(lm.model.layers) + 1
    np.testing.assert_allclose(_logits(lm), before, atol=2e-4, rtol=0)


def test_group_smoothing_keeps_4bit_grids(tiny_checkpoints):
    """With one factor per group of 32 input channels, weights on a Q4_1-style grid per group
    stay on one (asymmetric int4 groups then reproduce them); per-channel factors scatter them."""
    from exporter.backends.executorch.quantizer import int4_group_offsets

    loaded, lm = _decoder(tiny_checkpoints["llama"])
    _plant_outliers(lm)
    with torch.no_grad():
        for module in lm.modules():
            if isinstance(module, torch.nn.Linear):
                groups = module.weight.reshape(module.weight.shape[0], -1, 32)
                lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
                step = (hi - lo) / 15
                module.weight.copy_((torch.round((groups - lo) / step) * step + lo).reshape(module.weight.shape))
    act_max = _builtin_absmax(lm, loaded.tokenizer)

    def worst_grid_error(model) -> float:
        worst = 0.0
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight
                codes, scales, offsets = int4_group_offsets(w, 32)
                deq = codes.float().reshape(w.shape[0], -1, 32) * scales[..., None] + offsets[..., None]
                worst = max(worst, float(((deq.reshape(w.shape) - w).abs() / scales.amax()).max()))
        return worst

    import copy

    per_channel = copy.deepcopy(lm)
    smooth_decoder(per_channel, act_max, alpha=0.5, lm_head=True)
    smooth_decoder(lm, act_max, alpha=0.5, lm_head=True, group_size=32)
    assert worst_grid_error(lm) < 0.05  # bf16 rounding of the scale only
    assert worst_grid_error(per_channel) > 0.2


def test_smoothing_reduces_dynamic_activation_error(tiny_checkpoints):
    from exporter.backends.executorch.quantizer import apply_quantization, materialize_for_eager

    loaded, reference = _decoder(tiny_checkpoints["llama"])
    _plant_outliers(reference)
    float_logits = _logits(reference)
    rules = QuantSpec(rules=(QuantRule(match="model.layers.*", kind="linear", scheme="int8_dynact_int8_weight"),))
    errors = {}
    for alpha in (0.0, 0.5):
        _, lm = _decoder(tiny_checkpoints["llama"])
        _plant_outliers(lm)
        if alpha:
            act_max = _builtin_absmax(lm, loaded.tokenizer)
            smooth_decoder(lm, act_max, alpha=alpha, lm_head=False)
        apply_quantization(lm, rules)
        materialize_for_eager(lm)
        errors[alpha] = float(np.abs(_logits(lm) - float_logits).mean())
    # Measured: mean abs logit error 0.070 without smoothing, 0.013 with alpha 0.5.
    assert errors[0.5] < 0.5 * errors[0.0], errors


def test_smoothing_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match=r"quant\.smoothing\.alpha"):
        recipe_from_dict({"name": "x", "quant": {"smoothing": {"alpha": 1.5}}})
    with pytest.raises(RecipeError, match=r"quant\.smoothing\.group_size: 48 is not 0"):
        recipe_from_dict({"name": "x", "quant": {"smoothing": {"alpha": 0.5, "group_size": 48}}})
    with pytest.raises(RecipeError, match=r"quant\.smoothing\.alfa: unknown key; did you mean 'alpha'"):
        recipe_from_dict({"name": "x", "quant": {"smoothing": {"alfa": 0.5}}})
    with pytest.raises(UsageError, match="is not a file"):
        calibration_texts(SmoothingSpec(alpha=0.5, calibration=str(tmp_path / "missing.txt")))
    own = tmp_path / "calib.txt"
    own.write_text("搜索 耳机\n\n点击 手机壳\n", encoding="utf-8")
    assert calibration_texts(SmoothingSpec(alpha=0.5, calibration=str(own))) == ["搜索 耳机", "点击 手机壳"]


def test_calibration_statistics_equal_the_transformers_model(tiny_checkpoints):
    # The decoder runs the lm_head on each call's last position only; the statistics must
    # still cover every position, as a transformers forward over the whole text sees them.
    loaded, lm = _decoder(tiny_checkpoints["qwen3"])
    texts = calibration_texts(SmoothingSpec(alpha=0.5))[:4]
    ours = activation_absmax(lm, calibration_samples(lm, loaded.tokenizer, texts))
    theirs: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(_m, inputs, _o):
            x = inputs[0].abs().reshape(-1, inputs[0].shape[-1]).amax(0)
            theirs[name] = torch.maximum(theirs[name], x) if name in theirs else x
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in loaded.model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for text in texts:
            ids = loaded.tokenizer.encode(text, add_special_tokens=False)[: lm.max_seq_len - 1]  # as calibration cuts
            loaded.model(input_ids=torch.tensor([ids]))
    for h in handles:
        h.remove()
    assert set(ours) == set(theirs)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-4, rtol=1e-4, msg=name)

