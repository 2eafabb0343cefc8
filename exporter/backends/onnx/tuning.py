"""The onnx target's tunables: each stored block matrix with its scales as trainable factors."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from exporter.backends.onnx.blocks import BlockQuantized, centred_codes, dequantize
from exporter.quant.plan import Quantized


class BlockScales:
    """One stored block-quantized matrix (quant/tuning.py's Tunable): codes fixed, each
    block's scale times ``exp(log_factor)``."""

    def __init__(self, blocks: BlockQuantized, modules: list[nn.Module], quantized: Quantized) -> None:
        self.blocks_before = blocks
        self.modules = modules
        self._quantized = quantized
        # int16: half of float32's memory for this copy of every quantized weight.
        self.centred = torch.from_numpy(centred_codes(blocks))
        self.scales = torch.from_numpy(blocks.scales.copy())
        self.log_factor = torch.zeros_like(self.scales, requires_grad=True)

    def weight(self) -> torch.Tensor:
        n, k = self.blocks_before.shape
        tuned = self.centred.float() * (self.scales * torch.exp(self.log_factor))[..., None]
        return tuned.reshape(n, -1)[:, :k]

    def tuned_blocks(self) -> BlockQuantized:
        with torch.no_grad():
            scales = (self.scales * torch.exp(self.log_factor)).float().numpy()
        return replace(self.blocks_before, scales=scales)

    def finish(self) -> torch.Tensor:
        tuned = self.tuned_blocks()
        for module in self.modules:
            self._quantized.stored[module] = replace(self._quantized.stored[module], blocks=tuned)
        return torch.from_numpy(dequantize(tuned))


def block_scales(lm: nn.Module, quantized: Quantized) -> list[BlockScales]:
    """One BlockScales per stored matrix, in module order; a tied embedding and lm_head share
    one matrix, so one set of factors."""
    users: dict[int, tuple[BlockQuantized, list[nn.Module]]] = {}
    for module in lm.modules():
        entry = quantized.stored.get(module)
        if entry is not None:
            users.setdefault(id(entry.blocks), (entry.blocks, []))[1].append(module)
    return [BlockScales(blocks, modules, quantized) for blocks, modules in users.values()]
