"""Stage (optional, before quantizing): move activation outliers into the weights.

Dynamic int8 activation quantization (XNNPACK's per-token "8da" schemes) spends its 256
levels on each token's largest channel; a few outlier channels make every other channel
coarse. SmoothQuant (Xiao et al., 2022) divides each input channel j of a linear layer by
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` and multiplies the weight's column j by
``s_j``: the float model computes the same function, activations get flatter and weights a
little less so. The division is folded into what produces the input, so the program gains
no operation:

- q/k/v inputs: the layer's input RMSNorm weight; gate/up inputs: the post-attention
  RMSNorm weight; lm_head input: the final RMSNorm weight (only when ``lm_head`` is set,
  because it unties a tied lm_head from the embedding);
- down_proj input: the rows of up_proj (``act(gate) * up`` is linear in up).

``max|X_j|`` comes from running the float decoder over a calibration text (built-in
behaviour-like lines, or a file of the user's own), never the prompts ``verify`` scores.
The float reference that quality is judged against stays the unsmoothed model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from exporter.quant.calibration import calibration_samples, calibration_texts, observe_linear_inputs
from exporter.spec import SmoothingSpec

_FLOOR = 1e-5  # keeps s finite for channels that never fire or whose weights are all zero


def activation_absmax(lm: nn.Module, samples: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of every Linear of our float decoder over ``samples``
    (token ids, from calibration_samples).

    Run on the decoder itself rather than the transformers model: same values (the decoder
    matches it to 1e-6), and a first transformers forward keeps about one more copy of the
    weights resident, which would raise the export's peak."""
    stats: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        x = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        stats[name] = torch.maximum(stats[name], x) if name in stats else x

    names = [name for name, m in lm.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"]
    observe_linear_inputs(lm, samples, names + ["lm_head"], record)
    return stats


def _factors(act_max: torch.Tensor, linears: Sequence[nn.Linear], alpha: float, group_size: int) -> torch.Tensor:
    weight_max = torch.stack([lin.weight.detach().abs().amax(dim=0) for lin in linears]).amax(dim=0)
    s = (act_max.clamp(min=_FLOOR) ** alpha / weight_max.clamp(min=_FLOOR) ** (1 - alpha)).clamp(min=_FLOOR)
    if group_size and s.numel() % group_size == 0:
        # One factor per group: a group of weights scaled by one number keeps its grid. (A
        # width the group does not divide cannot hold such groups; it keeps per-channel factors.)
        s = s.reshape(-1, group_size).amax(dim=-1, keepdim=True).expand(-1, group_size).reshape(-1)
    return s


def _fold_into_norm(norm: nn.Module, linears: Sequence[nn.Linear], s: torch.Tensor) -> None:
    norm.weight.div_(s)
    for lin in linears:
        lin.weight.mul_(s)


def smooth_decoder(lm: nn.Module, act_max: dict[str, torch.Tensor], *, alpha: float, lm_head: bool,
                   group_size: int = 0) -> list[str]:
    """Apply the smoothing in place to our decoder (module names mirror transformers');
    returns the names of the linear layers whose inputs were smoothed."""
    smoothed: list[str] = []
    with torch.no_grad():
        for i, layer in enumerate(lm.model.layers):
            prefix = f"model.layers.{i}"
            attn, mlp = layer.self_attn, layer.mlp
            qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
            _fold_into_norm(layer.input_layernorm, qkv,
                            _factors(act_max[f"{prefix}.self_attn.q_proj"], qkv, alpha, group_size))
            gate_up = [mlp.gate_proj, mlp.up_proj]
            _fold_into_norm(layer.post_attention_layernorm, gate_up,
                            _factors(act_max[f"{prefix}.mlp.gate_proj"], gate_up, alpha, group_size))
            s = _factors(act_max[f"{prefix}.mlp.down_proj"], [mlp.down_proj], alpha, group_size)
            mlp.up_proj.weight.div_(s[:, None])
            if mlp.up_proj.bias is not None:
                mlp.up_proj.bias.div_(s)
            mlp.down_proj.weight.mul_(s)
            smoothed += [f"{prefix}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")]
            smoothed += [f"{prefix}.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
        if lm_head:
            _fold_into_norm(lm.model.norm, [lm.lm_head], _factors(act_max["lm_head"], [lm.lm_head], alpha, group_size))
            smoothed.append("lm_head")
    return smoothed


def smooth_for_quantization(lm: nn.Module, tokenizer, spec: SmoothingSpec) -> dict:
    """Calibrate on the float decoder, smooth it in place; returns what goes in the manifest."""
    texts = calibration_texts(spec)
    samples = calibration_samples(lm, tokenizer, texts)
    act_max = activation_absmax(lm, samples)
    smoothed = smooth_decoder(lm, act_max, alpha=spec.alpha, lm_head=spec.lm_head, group_size=spec.group_size)
    return {
        "alpha": spec.alpha,
        "group_size": spec.group_size,
        "calibration": spec.calibration,
        "calibration_samples": len(texts),
        "calibration_tokens": sum(len(ids) for ids in samples),  # the tokens that ran
        "smoothed_linears": len(smoothed),
    }
