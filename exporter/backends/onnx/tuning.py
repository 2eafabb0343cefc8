"""The onnx target's tunables: each stored block matrix with its scales as trainable factors."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from exporter.backends.onnx.blocks import BlockQuantized, centred_codes, dequantize
from exporter.quant.plan import Quantized
from exporter.quant.tuning import set_weight


class BlockScales:
    """One stored block-quantized matrix (quant/tuning.py's Tunable): codes fixed, each
    block's scale times ``exp(log_factor)`` (float32, as MatMulNBits stores it)."""

    def __init__(self, blocks: BlockQuantized, modules: list[nn.Module], quantized: Quantized) -> None:
        self.blocks_before = blocks
        self.modules = modules
        self._quantized = quantized
        self.width = blocks.shape[1]
        centred = torch.from_numpy(centred_codes(blocks))
        # 4-bit codes less their zero point fit int8: a quarter of float32's memory per weight.
        self.centred = centred.to(torch.int8) if blocks.bits == 4 else centred
        self._scales = torch.from_numpy(blocks.scales.copy())
        self.log_factor = torch.zeros_like(self._scales, requires_grad=True)
        # While tuning, the modules compute from the codes (quant/tuning.py): their float copy
        # of the weight is not read until finish() writes the tuned one (a model's worth of
        # float32 off the export's peak).
        for module in modules:
            set_weight(module, nn.Parameter(torch.empty(0), requires_grad=False))

    def scales(self) -> torch.Tensor:
        return self._scales * torch.exp(self.log_factor)

    def tuned_blocks(self) -> BlockQuantized:
        with torch.no_grad():
            scales = self.scales().float().numpy()
        return replace(self.blocks_before, scales=scales)

    def finish(self) -> None:
        tuned = self.tuned_blocks()
        weight = torch.from_numpy(dequantize(tuned))
        for module in self.modules:
            self._quantized.stored[module] = replace(self._quantized.stored[module], blocks=tuned)
            set_weight(module, nn.Parameter(weight.clone(), requires_grad=False))


def block_scales(lm: nn.Module, quantized: Quantized) -> list[BlockScales]:
    """One BlockScales per stored matrix, in module order; a tied embedding and lm_head share
    one matrix, so one set of factors."""
    users: dict[int, tuple[BlockQuantized, list[nn.Module]]] = {}
    for module in lm.modules():
        entry = quantized.stored.get(module)
        if entry is not None:
            users.setdefault(id(entry.blocks), (entry.blocks, []))[1].append(module)
    return [BlockScales(blocks, modules, quantized) for blocks, modules in users.values()]
