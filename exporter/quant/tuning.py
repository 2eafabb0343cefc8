"""End-to-end tuning of a quantized decoder's stored float parameters against the float model.

Round-to-nearest, smoothing and the scale search each fix one layer at a time against that
layer's own output error; the model feels the errors of all layers together, and the next-
token distribution is what the app reads. Here the integer codes stay as quantized and what
the artifact stores in float anyway is trained, by gradient descent on the KL divergence
from the float model's next-token distribution at every position of the calibration texts:

- each stored block's scale, as a factor ``exp(a)`` on the scale quantization chose (``a``
  starts at 0, so step 0 is the quantized model as it was): the backend hands these over as
  ``Tunable`` objects (``Backend.tunables``), since only it knows its storage;
- the RMSNorm weights (the input norms' weights also carry the smoothing factors).

Same storage, same kernels, same size and speed: only the float values change. A backend's
run-time activation quantization is differentiated straight through (the rounding's
gradient taken as 1). What it gains is measured in docs/targets/onnx.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

from exporter.decoder import RMSNorm
from exporter.quant.calibration import fixed_threads

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
    ones the app will read, and there is as much of it as the export can pay for (tuning on
    them generalised better than on the texts alone: docs/targets/onnx.md)."""
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


class Tunable(Protocol):
    """One stored matrix whose float scales tuning may train (a backend's storage; the
    modules that compute with it, several when a tied embedding and lm_head share it)."""

    modules: list[nn.Module]
    log_factor: torch.Tensor  # trained, zeros at the start

    def weight(self) -> torch.Tensor:
        """The float weight the stored codes and the scaled scales give (differentiable)."""

    def finish(self) -> torch.Tensor:
        """Write the trained scales into the backend's stored form; the weight it now holds."""


def tune(lm: nn.Module, tunables: Sequence[Tunable], samples: Sequence[Sequence[int]],
         targets: Sequence[torch.Tensor], spec, on_step: Callable[[str], None] = lambda _message: None) -> dict:
    """Train the ``tunables``' block scales and ``lm``'s norm weights (``spec``: the recipe's
    TuningSpec) to bring its next-token distributions on ``samples`` to ``targets``; the
    trained values are written back into ``lm`` and the backend's stored weights. Returns
    the manifest's record."""
    norms = [module for module in lm.modules() if isinstance(module, RMSNorm)]
    norm_start = [module.weight.detach().clone() for module in norms]
    norm_factors = [torch.zeros_like(weight, requires_grad=True) for weight in norm_start]
    trained = ([t.log_factor for t in tunables] if spec.scales else []) + (norm_factors if spec.norms else [])

    def install(training: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Put this step's weights into the modules as leaf tensors; return (weight computed
        from the factors, its leaf) pairs. The sequences' backward passes then sum dL/dW in
        the leaves, and one backward per step takes it to the factors, instead of rebuilding
        every weight and differentiating through it per sequence (docs/targets/onnx.md)."""
        pairs = []
        for tunable in tunables:  # a tied embedding and lm_head: one leaf, gradients summed
            weight = tunable.weight()
            pairs.append((weight, weight.detach().requires_grad_(training)))
            for module in tunable.modules:
                _set_weight(module, pairs[-1][1])
        for module, start, factor in zip(norms, norm_start, norm_factors, strict=True):
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
                    for ids, target in zip(samples, targets, strict=True):
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
                    # Both hold a float32 copy of every weight and its gradient: freed before
                    # the next step builds its own.
                    del used
                del pairs
    finally:
        _cut_cache_history(lm)
        lm.reset_caches()
    with torch.no_grad():
        for tunable in tunables:
            tuned = tunable.finish()
            for module in tunable.modules:
                _set_weight(module, nn.Parameter(tuned.clone(), requires_grad=False))
        for module, start, factor in zip(norms, norm_start, norm_factors, strict=True):
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
