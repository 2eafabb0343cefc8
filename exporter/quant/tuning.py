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
gradient taken as 1). What it gains is measured in docs/targets/onnx.md and
docs/targets/executorch.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

from exporter.decoder import RMSNorm
from exporter.kv_cache import differentiable_attention
from exporter.quant.calibration import fixed_threads

# Fixed, not the machine's count: the float sums (and so the tuned bytes) depend on how the
# work is split, and a rebuild on another machine (of the same CPU kind) should give the same artifact.
TUNING_THREADS = 2
# The continuations the float model writes after each calibration text: seeded, from the
# smallest set of tokens holding 95% of the probability (as the lab measurement sampled).
SAMPLING_SEED = 0
SAMPLING_TOP_P = 0.95


def continued_samples(float_model: nn.Module, samples: Sequence[Sequence[int]], tokens: int, eos_ids: set[int],
                      max_seq_len: int, on_progress: Callable[[str], None] = lambda _message: None
                      ) -> list[list[int]]:
    """Each sample followed by up to ``tokens`` tokens sampled from the float model (the
    transformers one: temperature 1, top-p 0.95, a fixed seed; to an end-of-sequence token or
    the cache's end, ``max_seq_len``).

    The float model's own continuations are text whose next-token distributions are the
    ones the app will read, and there is as much of it as the export can pay for (tuning on
    them generalised better than on the texts alone: docs/targets/onnx.md). All samples
    decode together, one batch (left-padded): a decode step is one pass over the weights
    whatever the batch, so this costs ``tokens`` steps, not ``tokens`` per sample (and a
    second process on the same cores slows a batch of small matrix products far less than
    hundreds of single-token ones: docs/recipes.md, "End-to-end tuning")."""
    generator = torch.Generator().manual_seed(SAMPLING_SEED)
    rows = len(samples)
    width = max(len(ids) for ids in samples)
    ids = torch.zeros(rows, width, dtype=torch.long)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for row, sample in enumerate(samples):
        ids[row, width - len(sample):] = torch.tensor(list(sample))
        mask[row, width - len(sample):] = 1
    budgets = [min(tokens, max_seq_len - 1 - len(sample)) for sample in samples]
    continued = [list(sample) for sample in samples]
    open_rows = [budget > 0 for budget in budgets]
    started = time.perf_counter()
    with torch.no_grad(), fixed_threads(TUNING_THREADS):
        past, step_ids = None, ids
        for step in range(max(budgets, default=0)):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
            out = float_model(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                              cache=past, use_cache=True, logits_to_keep=1)
            past = out.cache
            probabilities = torch.softmax(out.logits[:, -1].double(), dim=-1)
            # Nucleus sampling: the improbable tail is where sampled text turns to noise.
            ranked, order = torch.sort(probabilities, dim=-1, descending=True)
            keep = (torch.cumsum(ranked, -1) - ranked) < SAMPLING_TOP_P
            drawn = order.gather(1, torch.multinomial(ranked * keep, 1, generator=generator))[:, 0]
            for row, token in enumerate(drawn.tolist()):
                if open_rows[row]:
                    continued[row].append(token)
                    open_rows[row] = token not in eos_ids and len(continued[row]) - len(samples[row]) < budgets[row]
            if not any(open_rows):
                break
            step_ids = drawn[:, None]
            mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long)], dim=1)
            if (step + 1) % 16 == 0:
                on_progress(f"tune: the float model continued {rows} texts by {step + 1} tokens "
                            f"({time.perf_counter() - started:.0f} s)")
    return continued


def float_log_probs(lm: nn.Module, samples: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """log-softmax of the float decoder's logits at every position of each sample
    ([len, vocab] each): the targets, taken before smoothing and quantization touch ``lm``."""
    with torch.no_grad(), fixed_threads(TUNING_THREADS), differentiable_attention(lm):  # the math tune() trains on
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
    modules that compute with it, several when a tied embedding and lm_head share it).

    Its weight is ``centred * scales`` per group (``dequantized``), cut to ``width`` inputs
    (a padded last group). ``centred`` is the stored integer codes less their zero points,
    [rows, groups, group_size], in the smallest integer type that holds them."""

    modules: list[nn.Module]  # nn.Linear or nn.Embedding
    centred: torch.Tensor
    width: int
    log_factor: torch.Tensor  # trained, zeros at the start

    def scales(self) -> torch.Tensor:
        """[rows, groups]: the stored scales times exp(log_factor), rounded as the target
        stores them (differentiable)."""

    def finish(self) -> None:
        """Write the trained scales into the backend's stored form, and give ``modules``
        (as they were before tuning) what they compute with from now on."""


def tune(lm: nn.Module, tunables: Sequence[Tunable], samples: Sequence[Sequence[int]],
         targets: Sequence[torch.Tensor], spec, on_step: Callable[[str], None] = lambda _message: None) -> dict:
    """Train the ``tunables``' block scales and ``lm``'s norm weights (``spec``: the recipe's
    TuningSpec) to bring its next-token distributions on ``samples`` to ``targets``; the
    trained values are written back into ``lm`` and the backend's stored weights. Returns
    the manifest's record.

    Memory: no float copy of the model's weights is held. Each quantized matrix is computed
    from its codes inside its own matmul, forward and again backward (``_DequantLinear``),
    so the float weights alive at once are one matrix's, in slices; the step's parameters are
    the scales (one per group) and the norm weights (docs/recipes.md, "End-to-end tuning")."""
    norms = [module for module in lm.modules() if isinstance(module, RMSNorm)]
    norm_start = [module.weight.detach().clone() for module in norms]
    norm_factors = [torch.zeros_like(weight, requires_grad=True) for weight in norm_start]
    trained = ([t.log_factor for t in tunables] if spec.scales else []) + (norm_factors if spec.norms else [])

    def install(training: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Put this step's scales and norm weights into the modules as leaf tensors; return
        (value computed from the factors, its leaf) pairs. The sequences' backward passes
        then sum their gradients in the leaves, and one backward per step takes them to
        the factors (docs/targets/onnx.md)."""
        pairs = []
        for tunable in tunables:  # a tied embedding and lm_head: one leaf, gradients summed
            scales = tunable.scales()
            pairs.append((scales, scales.detach().requires_grad_(training)))
            for module in tunable.modules:
                _compute_from_codes(module, tunable.centred, pairs[-1][1], tunable.width)
        for module, start, factor in zip(norms, norm_start, norm_factors, strict=True):
            weight = start * (1 + factor)
            pairs.append((weight, weight.detach().requires_grad_(training)))
            set_weight(module, pairs[-1][1])
        return pairs

    tokens = sum(len(ids) for ids in samples)
    optimizer = torch.optim.Adam(trained, lr=spec.learning_rate)
    history = []
    # The step size that suits one model overshoots on another (a 0.5B checkpoint's KL doubled
    # on its first step at a rate that suits 135M): a step that raises the calibration KL is
    # undone and the rate halved for the rest of the run, so the result is the best point
    # measured and the rate finds the model's own scale (docs/recipes.md, "End-to-end tuning").
    best_kl, best = float("inf"), [value.detach().clone() for value in trained]
    best_grads: list[torch.Tensor | None] = []
    rate_scale, undone = 1.0, 0

    def step_from_best(step: int) -> None:
        for value, grad in zip(trained, best_grads, strict=True):
            value.grad = None if grad is None else grad.clone()
        for group in optimizer.param_groups:  # cosine decay over the steps, times the halvings
            group["lr"] = spec.learning_rate * rate_scale * 0.5 * (1 + math.cos(math.pi * step / spec.steps))
        optimizer.step()
    try:
        with fixed_threads(TUNING_THREADS), differentiable_attention(lm):
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
                rejected = history[-1] > best_kl
                if rejected:
                    undone += 1
                    rate_scale /= 2
                    with torch.no_grad():
                        for value, kept in zip(trained, best, strict=True):
                            value.copy_(kept)
                else:
                    best_kl = history[-1]
                    best = [value.detach().clone() for value in trained]
                on_step(f"tune {step}/{spec.steps}: calibration KL {history[-1]:.4f}"
                        + (f" (above {best_kl:.4f}: step undone, learning rate halved)" if rejected else ""))
                if training and not rejected:
                    used = [(value, leaf.grad) for value, leaf in pairs if leaf.grad is not None]
                    torch.autograd.backward([value for value, _ in used], [grad for _, grad in used])
                    best_grads = [None if value.grad is None else value.grad.detach().clone() for value in trained]
                    del used
                if training:  # from the best point, with its gradient: a rejected pass's own is discarded
                    step_from_best(step)
                del pairs
    finally:
        _cut_cache_history(lm)
        lm.reset_caches()
        for tunable in tunables:
            for module in tunable.modules:
                module.__dict__.pop("forward", None)  # the module's own forward again
    with torch.no_grad():
        for tunable in tunables:
            tunable.finish()
        for module, start, factor in zip(norms, norm_start, norm_factors, strict=True):
            set_weight(module, nn.Parameter((start * (1 + factor)).detach().contiguous(), requires_grad=False))
    return {
        "steps": spec.steps,
        "learning_rate": spec.learning_rate,
        "trained": [name for name, on in (("block scales", spec.scales), ("norm weights", spec.norms)) if on],
        "calibration": spec.calibration,
        "generated_tokens": spec.generated_tokens,
        "calibration_samples": len(samples),
        "calibration_tokens": tokens,
        "calibration_kl_before": round(history[0], 6),
        "calibration_kl_after": round(best_kl, 6),
        "steps_undone": undone,
    }


def dequantized(centred: torch.Tensor, scales: torch.Tensor, width: int) -> torch.Tensor:
    """The float weight [rows, width] of codes ``centred`` [rows, groups, group_size] and
    ``scales`` [rows, groups]."""
    rows = centred.shape[0]
    return (centred.to(scales.dtype) * scales[..., None]).reshape(rows, -1)[:, :width]


# Rows of a matrix dequantized at once inside _DequantLinear: a slice of a large lm_head (a
# 150k vocabulary) instead of the whole float matrix and its gradient.
_SLICE_ELEMENTS = 1 << 23


class _DequantLinear(torch.autograd.Function):
    """``linear(x, dequantized(centred, scales))`` whose backward recomputes the weight from
    the codes instead of keeping it: gradients for ``x`` and ``scales`` only."""

    @staticmethod
    def forward(ctx, x, centred, scales, width, bias):
        ctx.save_for_backward(x, centred, scales)
        ctx.width = width
        out = torch.cat([nn.functional.linear(x, dequantized(centred[rows], scales[rows], width))
                         for rows in _row_slices(centred.shape[0], width)], dim=-1)
        return out if bias is None else out + bias

    @staticmethod
    def backward(ctx, grad):
        x, centred, scales = ctx.saved_tensors
        width = ctx.width
        flat_x, flat_grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        grad_x = torch.zeros_like(flat_x) if ctx.needs_input_grad[0] else None
        grad_scales = torch.zeros_like(scales)
        padded = centred.shape[1] * centred.shape[2]
        for rows in _row_slices(centred.shape[0], width):
            part = flat_grad[:, rows]
            if grad_x is not None:
                grad_x += part @ dequantized(centred[rows], scales[rows], width)
            grad_w = nn.functional.pad(part.T @ flat_x, (0, padded - width))
            grad_scales[rows] = (grad_w.reshape(centred[rows].shape) * centred[rows]).sum(-1)
        grad_x = None if grad_x is None else grad_x.reshape(x.shape)
        return grad_x, None, grad_scales, None, None


class _DequantEmbedding(torch.autograd.Function):
    """The rows ``ids`` of ``dequantized(centred, scales)``, without the whole matrix."""

    @staticmethod
    def forward(ctx, ids, centred, scales, width):
        ctx.save_for_backward(ids, centred, scales)
        ctx.width = width
        return dequantized(centred[ids.reshape(-1)], scales[ids.reshape(-1)], width).reshape(*ids.shape, width)

    @staticmethod
    def backward(ctx, grad):
        ids, centred, scales = ctx.saved_tensors
        flat = ids.reshape(-1)
        padded = centred.shape[1] * centred.shape[2]
        grad_rows = nn.functional.pad(grad.reshape(flat.shape[0], -1), (0, padded - ctx.width))
        per_group = (grad_rows.reshape(centred[flat].shape) * centred[flat]).sum(-1)
        return None, None, torch.zeros_like(scales).index_add_(0, flat, per_group), None


def _row_slices(rows: int, width: int) -> list[slice]:
    step = max(1, _SLICE_ELEMENTS // max(width, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _compute_from_codes(module: nn.Module, centred: torch.Tensor, scales: torch.Tensor, width: int) -> None:
    """Until tune() ends, ``module`` computes its weight from ``centred`` and ``scales`` inside
    its own matmul (its forward pre-hooks, such as run-time activation quantization, still run)."""
    if isinstance(module, nn.Embedding):
        module.forward = lambda ids: _DequantEmbedding.apply(ids, centred, scales, width)
    else:
        module.forward = lambda x: _DequantLinear.apply(x, centred, scales, width, module.bias)


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """``module.weight = weight``, a Parameter or a computed tensor."""
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
