"""The executorch target's tunables: each torchao-stored weight with its scales as trainable factors.

The codes stay as quantized; a scale is trained as ``scale * exp(log_factor)`` and stored as
XNNPACK stores it: a Linear's group scales rounded to bfloat16 (the rounding taken straight
through while training, so every step computes with the scales the artifact would hold),
per-channel and embedding scales in float32. The modules stay torchao's: tuning computes
their weights from the same codes (quant/tuning.py), and ``finish`` writes the trained
scales into the torchao tensors, so lowering sees what it saw before, with other values.
"""

from __future__ import annotations

import torch
from torch import nn


def _straight_through_activations(_module, args):
    """XNNPACK's per-token int8 activations, as torchao's tensor computes them, with the
    rounding's gradient taken as 1 (a forward pre-hook while tuning)."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        _apply_int8_act_asym_per_token_quant_dequant,
    )

    x = args[0]
    quantized = _apply_int8_act_asym_per_token_quant_dequant(x.detach())
    return (x + (quantized - x).detach() if x.requires_grad and torch.is_grad_enabled() else quantized,)


class StoredScales:
    """One torchao-quantized weight (quant/tuning.py's Tunable): codes fixed, each scale times
    ``exp(log_factor)``, rounded as XNNPACK stores it."""

    def __init__(self, module: nn.Module, *, bf16_scales: bool) -> None:
        stored = module.weight
        self.modules = [module]
        self._stored = stored
        self._bf16 = bf16_scales
        rows, self.width = stored.shape
        self._scales = stored.scale.detach().float().reshape(rows, -1).clone()
        groups = self._scales.shape[1]
        codes = stored.qdata.detach().reshape(rows, groups, self.width // groups)
        zero = stored.zero_point.detach().reshape(rows, groups, 1)
        # Symmetric (zero points 0): the stored int8 codes themselves, no copy.
        self.centred = codes if not zero.any() else codes.to(torch.int16) - zero.to(torch.int16)
        self.log_factor = torch.zeros_like(self._scales, requires_grad=True)
        self._hook = None
        if isinstance(module, nn.Linear) and getattr(stored, "activation_quantization", None) is not None:
            self._hook = module.register_forward_pre_hook(_straight_through_activations)

    def _stored_form(self, scales: torch.Tensor) -> torch.Tensor:
        return scales.to(torch.bfloat16).float() if self._bf16 else scales

    def scales(self) -> torch.Tensor:
        scales = self._scales * torch.exp(self.log_factor)
        # What XNNPACK will store; the gradient passes the rounding as if it were not there.
        return scales + (self._stored_form(scales) - scales).detach()

    def finish(self) -> None:
        with torch.no_grad():
            scales = self._stored_form(self._scales * torch.exp(self.log_factor))
            self._stored.scale.copy_(scales.reshape(self._stored.scale.shape).to(self._stored.scale.dtype))
        if self._hook is not None:
            self._hook.remove()


def stored_scales(lm: nn.Module) -> list[StoredScales]:
    """One StoredScales per torchao-quantized Linear or embedding, in module order. The
    helper Linears of an asymmetric layer's offsets (quantizer.GroupOffsetLinear) hold exact
    constants and stay as they are; its main Linear is tuned."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    from exporter.backends.executorch.quantizer import GroupOffsetLinear, stores_bf16_scales

    helpers = {id(m) for owner in lm.modules() if isinstance(owner, GroupOffsetLinear)
               for m in (owner.group_sum, owner.offset)}
    return [StoredScales(module, bf16_scales=stores_bf16_scales(module)) for module in lm.modules()
            if isinstance(module, (nn.Linear, nn.Embedding)) and id(module) not in helpers
            and isinstance(module.weight, IntxUnpackedToInt8Tensor)]
