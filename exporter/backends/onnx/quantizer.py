"""The onnx target's quantizer: ONNX Runtime's block layout, and the eager weights it implies.

Each scheme the target stores maps to MatMulNBits' bits and accuracy level for linears and
GatherBlockQuantized's bits for embeddings (``LINEAR_STORAGE``, ``EMBEDDING_BITS``). The
eager modules get the dequantized values, so the reference computes exactly what the graph
will; the stored blocks travel to the graph writer in ``Quantized.stored``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
from torch import nn

from exporter.backends.onnx.blocks import (
    ACCURACY_FLOAT,
    ACCURACY_INT8,
    StoredWeight,
    dequantize,
    fake_quantize_activation,
    quantize_blockwise,
)
from exporter.quant.plan import Quantized, plan
from exporter.quant.schemes import SCHEMES


def linear_storage(scheme: str) -> tuple[int, int]:
    """(bits, MatMulNBits accuracy_level) of a linear stored as ``scheme``: int8 activations
    per block (accuracy 4) for the dynamic-activation schemes."""
    described = SCHEMES[scheme]
    return described.weight_bits, ACCURACY_INT8 if described.dynamic_activations else ACCURACY_FLOAT


def onnx_block_size(group_size: int) -> int:
    """MatMulNBits and GatherBlockQuantized take power-of-two blocks of 16 or more: a group
    of a whole row (quant.indivisible = "per_channel") becomes one padded block."""
    return max(16, 1 << (group_size - 1).bit_length())


class _QuantJob(NamedTuple):
    """One module to quantize: its rule and the storage the rule gives it."""

    rule: object  # spec.QuantRule
    name: str
    module: nn.Module
    bits: int
    accuracy: int
    group_size: int  # the rule's, or the row's width (quant.indivisible = "per_channel")

    def stored_alike(self, other: _QuantJob) -> bool:
        """Same storage parameters and equal weights: one stored matrix serves both (a tied
        embedding and lm_head)."""
        return (self.bits, self.group_size, self.rule.symmetric) == \
            (other.bits, other.group_size, other.rule.symmetric) \
            and self.module.weight.shape == other.module.weight.shape \
            and torch.equal(self.module.weight, other.module.weight)


def quantize_for_onnx(lm: nn.Module, spec, *, grams=None) -> Quantized:
    """Quantize matched modules in ONNX Runtime's block layout; the eager weights become the
    dequantized values. ``grams``: input Gram matrices by Linear name (scale search); given,
    each block's scale is searched against them instead of taken from its min/max.
    Projections are fused when the graph is written (graph.py), not here."""
    grams = grams or {}
    summary = plan(lm, spec)
    modules = dict(lm.named_modules())
    jobs: list[_QuantJob] = []
    for match in summary.rules:
        rule = match.rule
        if rule.scheme == "float":
            continue
        for name in match.modules:
            module = modules[name]
            bits, accuracy = (SCHEMES[rule.scheme].weight_bits, ACCURACY_FLOAT) if isinstance(module, nn.Embedding) \
                else linear_storage(rule.scheme)
            jobs.append(_QuantJob(rule, name, module, bits, accuracy, onnx_block_size(match.group_size_of(name))))
    # A tied embedding and lm_head (equal weights, stored alike) are quantized once, with
    # the lm_head's Gram matrix when searching, so they stay one initializer (graph.py).
    groups: list[list[_QuantJob]] = []
    for job in jobs:
        group = next((g for g in groups if g[0].stored_alike(job)), None)
        if group is None:
            groups.append([job])
        else:
            group.append(job)
    stored: dict[nn.Module, StoredWeight] = {}
    for group in groups:
        first = group[0]
        gram = next((grams[job.name] for job in group if job.name in grams), None)
        blocks = quantize_blockwise(first.module.weight.detach().float().numpy(), bits=first.bits,
                                    block_size=first.group_size, symmetric=first.rule.symmetric, gram=gram)
        for job in group:
            stored[job.module] = StoredWeight(blocks=blocks, accuracy=job.accuracy)
    for job in jobs:
        if job.accuracy == ACCURACY_INT8:
            # The kernel quantizes its input per block; the reference does the same.
            job.module.register_forward_pre_hook(
                lambda _m, args, block=job.group_size: (fake_quantize_activation(args[0], block),))
    with torch.no_grad():
        # After every module is quantized: a tied weight must keep its float value until then.
        for job in jobs:
            job.module.weight = nn.Parameter(torch.from_numpy(dequantize(stored[job.module].blocks)),
                                             requires_grad=False)
    return Quantized(summary=summary, stored=stored)


def adopt_artifact_weights(lm: nn.Module, quantized: Quantized, artifact) -> None:
    """Give the quantized reference the artifact's own stored weights (codes, scales, zero
    points), dequantized, and its norm weights.

    verify's lowering parity then compares the graph with exactly the weights it holds,
    without searching scales again. A rebuild matches only while the calibration
    activations match to the last bit: a near-tie between two candidate scales can fall
    the other way (another CPU's kernels could make it)."""
    from onnx import load, numpy_helper

    from exporter.backends.onnx.graph import FUSED_INTO
    from exporter.decoder import RMSNorm

    graph = load(str(artifact.file("program"))).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    shared = artifact.manifest.target.info.get("shared_embedding", False)
    rows_done: dict[str, int] = {}  # fused projections: rows of qkv_proj / gate_up_proj already handed out
    for name, module in lm.named_modules():
        entry = quantized.stored.get(module)
        if entry is None:
            continue
        stored = entry.blocks
        source, first = name, 0
        parent, _, leaf = name.rpartition(".")
        if name == "model.embed_tokens":
            source = "lm_head" if shared else name
        elif f"{name}.weight_scales" not in arrays and leaf in FUSED_INTO:
            # Stored inside its fused projection (graph.py), rows in module order.
            source = f"{parent}.{FUSED_INTO[leaf]}"
            first = rows_done.get(source, 0)
            rows_done[source] = first + stored.shape[0]
        n, k_blocks = stored.shape[0], stored.k_blocks
        packed_name = next(f"{source}.weight_q{suffix}" for suffix in (stored.bits, "")
                           if f"{source}.weight_q{suffix}" in arrays)
        packed = arrays[packed_name].reshape(-1, *stored.packed.shape[1:])[first:first + n]
        scales = arrays[f"{source}.weight_scales"].reshape(-1, k_blocks)[first:first + n]
        zero = None
        if stored.zero_points is not None:
            zero = arrays[f"{source}.weight_zero_points"].reshape(-1, stored.zero_points.shape[-1])[first:first + n]
        adopted = replace(stored, packed=packed, scales=scales, zero_points=zero)
        quantized.stored[module] = replace(entry, blocks=adopted)
        with torch.no_grad():
            module.weight = nn.Parameter(torch.from_numpy(dequantize(adopted)), requires_grad=False)
    # Norm weights too: end-to-end tuning trains them after quantizing.
    for name, module in lm.named_modules():
        if isinstance(module, RMSNorm) and f"{name}.weight" in arrays:
            module.weight = nn.Parameter(torch.from_numpy(arrays[f"{name}.weight"].copy()), requires_grad=False)
    # And an int8 cache's fixed scales: calibrated on the artifact's weights at export.
    if "model.layers.0.self_attn.k_cache_scale" in arrays:
        from exporter.quant.kv_scales import set_kv_scales

        def scale(i: int, kind: str) -> torch.Tensor:
            return torch.from_numpy(arrays[f"model.layers.{i}.self_attn.{kind}_cache_scale"][:, 0, :].copy())

        set_kv_scales(lm, [(scale(i, "k"), scale(i, "v")) for i in range(len(lm.model.layers))])
