"""End-to-end tuning of a quantized decoder's float parameters against the float model.

Round-to-nearest, smoothing and the scale search each fix one layer at a time against that
layer's own output error; the model feels the errors of all layers together, and the next-
token distribution is what the app reads. Here the integer codes stay as quantized and what
the artifact stores in float anyway is trained, by gradient descent on the KL divergence
from the float model's next-token distribution at every position of the calibration texts:

- each block's scale, as a factor ``exp(a)`` on the scale quantization chose (``a`` starts
  at 0, so step 0 is the quantized model as it was);
- the RMSNorm weights (the input norms' weights also carry the smoothing factors).

Same storage, same kernels, same size and speed: only the float values change. Run-time
activation quantization (``accuracy_level`` 4) is differentiated straight through (the
rounding's gradient taken as 1, ``onnx_quant.fake_quantize_activation``).

Measured on SmolLM2-135M ONNX int4 (docs/targets/onnx.md): KL to float on verify's prompts
and on text neither calibration nor the prompts contain both fall.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from exporter.decoder import RMSNorm
from exporter.smoothing import fixed_threads

# Fixed, not the machine's count: the float sums (and so the tuned bytes) depend on how the
# work is split, and a rebuild on another machine (of the same CPU kind) should give the same artifact.
TUNING_THREADS = 2
# The continuations the float model writes after each calibration text: seeded, from the
# smallest set of tokens holding 95% of the probability (as the lab measurement sampled).
SAMPLING_SEED = 0
SAMPLING_TOP_P = 0.95


def continued_samples(lm: nn.Module, samples: Sequence[Sequence[int]], tokens: int,
                      eos_ids: set[int]) -> list[list[int]]:
    """Each sample followed by up to ``tokens`` tokens sampled from the float decoder
    (temperature 1, top-p 0.95, a fixed seed; to an end-of-sequence token or the cache's end).

    The float model's own continuations are text whose next-token distributions are the
    ones the app will read, and there is as much of it as the export can pay for: on
    SmolLM2 int4, tuning on 64 tokens after each builtin text lowered KL on unseen text
    further than tuning on the texts alone (docs/targets/onnx.md)."""
    from exporter.runners import EagerRunner

    generator = torch.Generator().manual_seed(SAMPLING_SEED)
    runner = EagerRunner(lm)
    continued = []
    with torch.no_grad(), fixed_threads(TUNING_THREADS):
        for ids in samples:
            sequence = list(ids)
            logits = runner.prefill(sequence)
            budget = min(tokens, lm.max_seq_len - 1 - len(sequence))
            for step in range(budget):
                probabilities = torch.softmax(torch.from_numpy(logits).double(), dim=-1)
                # Nucleus sampling: the improbable tail is where sampled text turns to noise.
                ranked, order = torch.sort(probabilities, descending=True)
                keep = (torch.cumsum(ranked, 0) - ranked) < SAMPLING_TOP_P
                token = int(order[torch.multinomial(ranked * keep, 1, generator=generator)])
                sequence.append(token)
                if token in eos_ids or step + 1 == budget:  # no logits needed after the last token
                    break
                logits = runner.decode(token, len(sequence) - 1)
            continued.append(sequence)
    lm.reset_caches()
    return continued


def float_log_probs(lm: nn.Module, samples: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """log-softmax of the float decoder's logits at every position of each sample
    ([len, vocab] each): the targets, taken before smoothing and quantization touch ``lm``."""
    with torch.no_grad(), fixed_threads(TUNING_THREADS):
        targets = [torch.log_softmax(sequence_logits(lm, ids), dim=-1) for ids in samples]
    lm.reset_caches()
    return targets


def sequence_logits(lm: nn.Module, ids: Sequence[int]) -> torch.Tensor:
    """Logits [len, vocab] at every position of ``ids``, one prefill from position 0 (the
    decoder's forward gives the last position's only)."""
    _cut_cache_history(lm)
    lm.reset_caches()
    return lm.all_logits(torch.tensor([list(ids)]), torch.tensor([0]))[0]


def tune(lm: nn.Module, samples: Sequence[Sequence[int]], targets: Sequence[torch.Tensor], spec,
         on_step: Callable[[str], None] = lambda _message: None) -> dict:
    """Train ``lm``'s block scales and norm weights (``spec``: the recipe's TuningSpec) to
    bring its next-token distributions on ``samples`` to ``targets``; the trained values are
    written back into ``lm`` (and its stored block weights). Returns the manifest's record."""
    from exporter.onnx_graph import ONNX_WEIGHT_ATTR
    from exporter.onnx_quant import dequantize

    quantized = [(module, getattr(module, ONNX_WEIGHT_ATTR)) for module in lm.modules()
                 if getattr(module, ONNX_WEIGHT_ATTR, None) is not None]
    # A tied embedding and lm_head share one stored matrix, so one set of factors.
    blocks = {id(stored): _BlockScales(stored) for _, stored in quantized}
    norms = [module for module in lm.modules() if isinstance(module, RMSNorm)]
    norm_start = [module.weight.detach().clone() for module in norms]
    norm_factors = [torch.zeros_like(weight, requires_grad=True) for weight in norm_start]
    trained = ([b.log_factor for b in blocks.values()] if spec.scales else []) + (norm_factors if spec.norms else [])

    def install(training: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Put this step's weights into the modules as leaf tensors; return (weight computed
        from the factors, its leaf) pairs. The sequences' backward passes then sum dL/dW in
        the leaves, and one backward per step takes it to the factors: rebuilding 135M
        weights and differentiating through them per sequence took a fifth of a SmolLM2 step."""
        built: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for module, stored in quantized:
            if id(stored) not in built:  # a tied embedding and lm_head: one leaf, gradients summed
                weight = blocks[id(stored)].weight()
                built[id(stored)] = (weight, weight.detach().requires_grad_(training))
            _set_weight(module, built[id(stored)][1])
        pairs = list(built.values())
        for module, start, factor in zip(norms, norm_start, norm_factors):
            weight = start * (1 + factor)
            pairs.append((weight, weight.detach().requires_grad_(training)))
            _set_weight(module, pairs[-1][1])
        return pairs

    tokens = sum(len(ids) for ids in samples)
    optimizer = torch.optim.Adam(trained, lr=spec.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, spec.steps)
    history = []
    try:
        with fixed_threads(TUNING_THREADS):
            for step in range(spec.steps + 1):
                training = step < spec.steps  # the last pass only measures where the steps ended
                optimizer.zero_grad()
                total = 0.0
                with torch.set_grad_enabled(training):
                    pairs = install(training)
                    for ids, target in zip(samples, targets):
                        log_probs = torch.log_softmax(sequence_logits(lm, ids), dim=-1)
                        kl = (target.exp() * (target - log_probs)).sum()
                        if training:
                            (kl / tokens).backward()
                        total += kl.item()
                history.append(total / tokens)
                on_step(f"tune {step}/{spec.steps}: calibration KL {history[-1]:.4f}")
                if training:
                    used = [(weight, leaf.grad) for weight, leaf in pairs if leaf.grad is not None]
                    torch.autograd.backward([weight for weight, _ in used], [grad for _, grad in used])
                    optimizer.step()
                    schedule.step()
                    # Both hold a float32 copy of every weight and its gradient: kept into
                    # the next step, they were 1.1 GB of SmolLM2's peak.
                    del used
                del pairs
    finally:
        _cut_cache_history(lm)
        lm.reset_caches()
    with torch.no_grad():
        for module, stored in quantized:
            tuned = blocks[id(stored)].stored()
            setattr(module, ONNX_WEIGHT_ATTR, tuned)
            _set_weight(module, nn.Parameter(torch.from_numpy(dequantize(tuned)), requires_grad=False))
        for module, start, factor in zip(norms, norm_start, norm_factors):
            _set_weight(module, nn.Parameter((start * (1 + factor)).detach().contiguous(), requires_grad=False))
    return {
        "steps": spec.steps,
        "learning_rate": spec.learning_rate,
        "trained": [name for name, on in (("block scales", spec.scales), ("norm weights", spec.norms)) if on],
        "calibration": spec.calibration,
        "generated_tokens": spec.generated_tokens,
        "calibration_samples": len(samples),
        "calibration_tokens": tokens,
        "calibration_kl_before": round(history[0], 6),
        "calibration_kl_after": round(history[-1], 6),
    }


class _BlockScales:
    """One stored block-quantized matrix with its scales as trainable factors."""

    def __init__(self, stored) -> None:
        from exporter.onnx_quant import centred_codes

        self.stored_before = stored
        # int16: half of float32's memory for this copy of every quantized weight (270 MB on SmolLM2).
        self.centred = torch.from_numpy(centred_codes(stored))
        self.scales = torch.from_numpy(stored.scales.copy())
        self.log_factor = torch.zeros_like(self.scales, requires_grad=True)

    def weight(self) -> torch.Tensor:
        n, k = self.stored_before.shape
        tuned = self.centred.float() * (self.scales * torch.exp(self.log_factor))[..., None]
        return tuned.reshape(n, -1)[:, :k]

    def stored(self):
        from dataclasses import replace

        with torch.no_grad():
            scales = (self.scales * torch.exp(self.log_factor)).float().numpy()
        return replace(self.stored_before, scales=scales)


def _set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    # A computed tensor cannot take a Parameter's place through setattr: remove it first.
    if "weight" in module._parameters:
        del module._parameters["weight"]
    elif "weight" in module.__dict__:
        del module.__dict__["weight"]
    if isinstance(weight, nn.Parameter):
        module.weight = weight
    else:
        module.__dict__["weight"] = weight


def _cut_cache_history(lm: nn.Module) -> None:
    """The KV cache buffers hold the last sequence's autograd graph after a training pass
    (written in place from tensors that need gradients); detach them."""
    for module in lm.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.grad_fn is not None:
                module._buffers[name] = buffer.detach()


def refuse_tuning(recipe, target: str) -> None:
    """For targets whose stored scales are not ours to set (torchao, coremltools)."""
    from exporter.errors import UnsupportedError

    if recipe.quant.tuning.steps:
        raise UnsupportedError(f"quant.tuning: the {target} target's quantizer stores its own scales; "
                               f"remove [quant.tuning] (the onnx target tunes them)")
