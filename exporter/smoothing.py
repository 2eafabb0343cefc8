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

import contextlib
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from exporter.errors import UsageError
from exporter.spec import SmoothingSpec

_FLOOR = 1e-5  # keeps s finite for channels that never fire or whose weights are all zero


def calibration_texts(spec, field: str = "quant.smoothing.calibration") -> list[str]:
    """The built-in calibration lines, or the non-blank lines of the user's UTF-8 file named
    by ``spec.calibration`` (``field``: where the recipe sets it, for the error line)."""
    if spec.calibration == "builtin":
        from exporter.prompts import CALIBRATION_TEXTS

        return list(CALIBRATION_TEXTS)
    path = Path(spec.calibration)
    if not path.is_file():
        raise UsageError(f"{field}: {path} is not a file",
                         hint='give a UTF-8 text file with one sample per line, or "builtin"')
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise UsageError(f"{field}: {path} has no text", hint="put one sample per line")
    return lines


def calibration_samples(lm: nn.Module, tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """The token ids of each text, cut to what one prefill of the decoder's cache holds;
    texts that encode to nothing are dropped. Tokenized once: these are what calibration
    runs and what the manifest counts."""
    samples = [tokenizer.encode(text, add_special_tokens=False)[: lm.max_seq_len - 1] for text in texts]
    return [ids for ids in samples if ids]


@contextlib.contextmanager
def fixed_threads(count: int):
    """torch on ``count`` threads inside the block, whatever the machine has: float sums then
    split the same way on every machine, so calibration and tuning give the same bits."""
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def observe_linear_inputs(lm: nn.Module, samples: Sequence[Sequence[int]], names: Sequence[str],
                          record: Callable[[str, torch.Tensor], None]) -> None:
    """One prefill of each sample (token ids, from calibration_samples) through our decoder,
    passing the input of every Linear in ``names`` to ``record(name, x)``; the KV cache the
    calibration wrote is cleared afterwards.

    On one thread: the activations' last bits then do not depend on how the work was split,
    so verify, which rebuilds the reference from the recipe, calibrates to the same values
    as the export did (searched scales turn a last-bit difference into another scale where
    two candidates nearly tie: scale_search.py)."""
    from exporter.runners import EagerRunner

    modules = dict(lm.named_modules())
    handles = []
    for name in names:
        if name == "lm_head":
            # The decoder runs the lm_head on a call's last position only; its input at every
            # position is the final norm of the last layer's output.
            handles.append(lm.model.layers[-1].register_forward_hook(
                lambda _m, _i, output: record("lm_head", lm.model.norm(output).detach())))
        else:
            handles.append(modules[name].register_forward_hook(
                lambda _m, inputs, _o, name=name: record(name, inputs[0].detach())))
    runner = EagerRunner(lm)
    try:
        with torch.no_grad(), fixed_threads(1):
            for ids in samples:
                runner.prefill(list(ids))
    finally:
        for handle in handles:
            handle.remove()
        lm.reset_caches()


def activation_absmax(lm: nn.Module, samples: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of every Linear of our float decoder over ``samples``
    (token ids, from calibration_samples).

    Run on the decoder itself rather than the transformers model: same values (the decoder
    matches it to 1e-6), and a first transformers forward keeps about one more copy of the
    weights resident (measured +545 MB on SmolLM2), which would raise the export's peak."""
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
            _fold_into_norm(layer.input_layernorm, qkv, _factors(act_max[f"{prefix}.self_attn.q_proj"], qkv, alpha, group_size))
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
