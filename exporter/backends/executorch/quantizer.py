"""ExecuTorch's quantizer: torchao tensors in the layout XNNPACK runs.

Each scheme the target stores maps to a torchao config (``TORCHAO_CONFIGS``, its handler
table). int4 groups get their codes and scales computed here rather than by torchao's own
rule (``int4_group_levels``), and every group scale is rounded to bfloat16 as XNNPACK
stores it, so the eager model computes with exactly the weights the program holds.
"""

from __future__ import annotations

from torch import nn

from exporter.errors import require
from exporter.quant.plan import QuantSummary, fused_parts, plan
from exporter.quant.schemes import SCHEMES
from exporter.spec import QuantSpec


def apply_quantization(model: nn.Module, spec: QuantSpec, grams: dict | None = None) -> QuantSummary:
    """Quantize ``model`` in place with torchao and return what was done.

    ``grams``: input Gram matrices by Linear name (quant.calibration.calibrate); symmetric
    int4 Linears then get searched group scales. A fused Linear reads its first part's: the
    parts share their input."""
    summary = plan(model, spec)
    if summary.quantized_count() == 0:
        return summary
    require("torchao", "executorch")
    import torch
    from torchao.quantization import quantize_

    stored_as = _store_indivisible(model, summary)

    by_config: dict[tuple[str, int, bool], set[str]] = {}
    for m in summary.rules:
        if m.rule.scheme == "float":
            continue
        for name in m.modules:  # a module's own group size: the whole row where the rule's does not divide it
            group_size = m.group_size_of(name) if SCHEMES[m.rule.scheme].uses_group_size else 0
            by_config.setdefault((m.rule.scheme, group_size, m.rule.symmetric), set()).add(name)
    # Embeddings with padding_idx export to a pattern that no out-variant kernel matches
    # ("Missing out variants: torchao::dequantize_affine"); the index only matters for training.
    for _, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            module.padding_idx = None
    modules = dict(model.named_modules())
    replaced = fused_parts(model)
    with torch.no_grad():
        for (scheme, group_size, symmetric), names in by_config.items():
            if not SCHEMES[scheme].uses_group_size:
                quantize_(model, torchao_config(scheme, group_size),
                          filter_fn=lambda mod, fqn, names=names: fqn in names)
                continue
            # One module at a time: its codes come from its float weight, which torchao replaces.
            for planned in sorted(names):
                name = stored_as.get(planned, planned)
                module = modules[name]
                offsets = None
                if symmetric:
                    gram = (grams or {}).get(replaced.get(planned, (planned,))[0])
                    codes, scales = int4_group_levels(module.weight, group_size, linear=isinstance(module, nn.Linear),
                                                      gram=gram)
                else:
                    codes, scales, offsets = int4_group_offsets(module.weight, group_size)
                quantize_(model, torchao_config(scheme, group_size), filter_fn=lambda mod, fqn, name=name: fqn == name)
                _set_int4_codes(module.weight, codes, scales)
                if offsets is not None:
                    parent_name, _, child = name.rpartition(".")
                    parent = modules[parent_name] if parent_name else model
                    setattr(parent, child, GroupOffsetLinear(module, offsets, group_size))
    return summary


XNNPACK_GROUP_MULTIPLE = 32  # the delegate takes int4 groups of multiples of 32 inputs only


def _store_indivisible(model: nn.Module, summary: QuantSummary) -> dict[str, str]:
    """Make each module whose width its rule's group size does not divide storable on
    XNNPACK, and correct the summary to say how: a Linear under "pad" becomes a
    ``PaddedInputLinear`` (returned: planned name -> the name of the Linear to quantize); an
    embedding keeps its whole row as one group (the quantized embedding kernel takes any
    group that divides the row, no partial one)."""
    from exporter.errors import UnsupportedError

    modules = dict(model.named_modules())
    matches = {name: m for m in summary.rules for name in m.modules}
    stored_as = {}
    for entry in summary.indivisible:
        name, width = entry["module"], entry["width"]
        module = modules[name]
        if isinstance(module, nn.Embedding) or entry["action"] == "per_channel":
            if isinstance(module, nn.Linear) and width % XNNPACK_GROUP_MULTIPLE:
                raise UnsupportedError(
                    f'quant.indivisible = "per_channel": {name} would be one group of {width} inputs, and XNNPACK '
                    f"runs int4 groups of multiples of {XNNPACK_GROUP_MULTIPLE} only",
                    hint='use quant.indivisible = "pad" (or "auto"): the input is padded to whole groups')
            entry.update(action="per_channel", stored_group_size=width, groups_per_row=1)
            matches[name].group_sizes[name] = width
            continue
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        padded = PaddedInputLinear(module, entry["groups_per_row"] * entry["group_size"])
        setattr(parent, child, padded)
        entry["padded_width"] = padded.linear.in_features
        stored_as[name] = f"{name}.linear"
    return stored_as


class PaddedInputLinear(nn.Module):
    """A Linear whose input width no group size divides, stored as one over ``width`` inputs
    (the weight's extra columns zero) and fed its input padded with zeros: the same outputs,
    whole int4 groups XNNPACK delegates, a partial last group's worth of extra work."""

    def __init__(self, linear: nn.Linear, width: int) -> None:
        import torch

        super().__init__()
        self.pad = width - linear.in_features
        self.linear = nn.Linear(width, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.weight[:, :linear.in_features] = linear.weight
            if linear.bias is not None:
                self.linear.bias.copy_(linear.bias)

    @property
    def in_features(self) -> int:
        return self.linear.in_features - self.pad

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x):
        import torch

        return self.linear(torch.nn.functional.pad(x, (0, self.pad)))


def _set_int4_codes(weight, codes, scales) -> None:
    weight.qdata.copy_(codes)
    weight.scale.copy_(scales.reshape(weight.scale.shape))


def int4_group_levels(weight, group_size: int, *, linear: bool, gram=None):
    """Symmetric int4 codes and scales per group, with the group's extreme on a level.

    torchao's default scale, absmax / 7.5, rounds a group's largest value to 7 or 8 steps
    and clips it. Here the value of largest magnitude lands exactly on a level: on -8 when
    it is negative (one level of resolution more than absmax / 7; llama.cpp's Q4_0 and our
    ONNX quantizer do the same, and like them a positive value beyond 7 steps is clipped to
    7) and on +7 when positive (XNNPACK refuses negative scales, which would put it on -8
    too). Linear scales are rounded to bfloat16 first, as XNNPACK stores them, and the codes
    computed against the rounded scale (docs/targets/executorch.md has the measurements).

    ``gram``: the layer's block input Gram matrix (block_search.input_grams); given, each
    group's scale is searched against it instead (block_search.search_block_scales)."""
    import torch

    n, k = weight.shape
    groups = weight.detach().float().reshape(n, k // group_size, group_size)
    if gram is not None:
        from exporter.quant.block_search import search_block_scales

        found, _ = search_block_scales(groups.numpy(), gram, bits=4, symmetric=True, positive_scales=True,
                                       scale_dtype=torch.bfloat16 if linear else None)
        scales = torch.from_numpy(found)[..., None]
    else:
        from exporter.quant.grids import symmetric_scales

        scales = symmetric_scales(groups, 4, positive=True)[..., None]
    if linear:
        scales = scales.to(torch.bfloat16).float()
    codes = torch.clamp(torch.round(groups / scales), -8, 7).to(torch.int8)
    return codes.reshape(n, k), scales.reshape(n, k // group_size)


def int4_group_offsets(weight, group_size: int):
    """Asymmetric int4 groups as XNNPACK can run them: symmetric codes plus a float offset.

    XNNPACK's 4-bit weights have a scale per group but no zero point, so ``w ~ s * q`` with q
    in [-8, 7]. Here ``w ~ s * q + b``: s = (max - min) / 15 and b = min + 8 s, so the code
    -8 lands on the group's minimum and +7 on its maximum, the min-max grid of llama.cpp's
    Q4_1. A weight that already lies on such a grid (a checkpoint converted from a Q4_1 GGUF,
    as the embedded SmolLM2 is) is reproduced up to the bfloat16 rounding of s; a symmetric
    grid cannot follow it. Returns int8 codes [N, K], bf16-exact scales and float32 offsets
    [N, K / group_size]."""
    import torch

    n, k = weight.shape
    groups = weight.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    span = hi - lo
    exact = torch.where(span > 0, span / 15, torch.ones_like(span))  # a constant group: b alone carries it
    offsets = torch.where(span > 0, lo + 8 * exact, lo)
    scales = exact.to(torch.bfloat16).float()
    codes = torch.clamp(torch.round((groups - offsets[..., None]) / scales[..., None]), -8, 7).to(torch.int8)
    return codes.reshape(n, k), scales, offsets


class GroupOffsetLinear(nn.Module):
    """``main(x) + offset(group_sum(x))``: an 8da4w Linear whose groups carry float offsets.

    The offset term of output n is ``sum_g b[n, g] * sum_{k in g} x_k``; it costs two small
    Linears, both quantized so XNNPACK runs them: ``group_sum`` [K / g, K] holds ones (int4
    code 1, scale 1: exact) and ``offset`` [N, K / g] holds b as int8 per output channel
    with dynamic int8 activations (float32 when K / g is 1: one group per row). A fixed cost
    per call whatever the layer's size: a quality-for-speed trade, measured in
    docs/targets/executorch.md."""

    def __init__(self, main: nn.Linear, offsets, group_size: int) -> None:
        import torch
        from torchao.quantization import quantize_

        super().__init__()
        self.main = main
        n_groups = offsets.shape[1]
        self.group_sum = nn.Linear(main.in_features, n_groups, bias=False)
        self.offset = nn.Linear(n_groups, main.out_features, bias=False)
        with torch.no_grad():
            self.offset.weight.copy_(offsets)
        quantize_(self, torchao_config("int8_dynact_int4_weight", group_size),
                  filter_fn=lambda m, fqn: fqn == "group_sum")
        if n_groups > 1:  # torchao cannot quantize a 1-input Linear (one group per row): it stays float
            quantize_(self, torchao_config("int8_dynact_int8_weight", 0), filter_fn=lambda m, fqn: fqn == "offset")
        ones = torch.zeros(n_groups, n_groups, group_size, dtype=torch.int8)
        ones[torch.arange(n_groups), torch.arange(n_groups)] = 1
        _set_int4_codes(self.group_sum.weight, ones.reshape(n_groups, -1), torch.ones(n_groups, n_groups))

    def forward(self, x):
        return self.main(x) + self.offset(self.group_sum(x))


def torchao_config(scheme: str, group_size: int):
    """The torchao config that stores ``scheme`` (its bits, grouping and activations) for XNNPACK."""
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    described = SCHEMES[scheme]
    weight_dtype = {8: torch.int8, 4: torch.int4}[described.weight_bits]
    granularity = PerGroup(group_size) if described.uses_group_size else PerAxis(0)
    if described.dynamic_activations:
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=weight_dtype, weight_granularity=granularity)
    return IntxWeightOnlyConfig(weight_dtype=weight_dtype, granularity=granularity)


def round_group_scales(model: nn.Module, dtype) -> int:
    """Round the scales of group-wise quantized weights to ``dtype`` (returns how many weights).

    XNNPACK stores the group scales of 8da4w weights as bfloat16. Rounding them here, before
    lowering, makes the eager model compute with exactly the scales the artifact stores, so
    lowering parity compares the same math (max abs logit diff 3e-2 -> 2e-7 on a tiny Qwen3).
    """
    import torch

    rounded = 0
    for module in model.modules():
        if stores_bf16_scales(module):
            weight = module.weight
            with torch.no_grad():
                weight.scale.copy_(weight.scale.to(dtype).to(weight.scale.dtype))
            rounded += 1
    return rounded


def stores_bf16_scales(module: nn.Module) -> bool:
    """Whether XNNPACK stores ``module``'s scales as bfloat16: a group-wise quantized Linear.
    Embeddings run outside XNNPACK with float32 scales, and per-channel scales stay float32."""
    if not isinstance(module, nn.Linear):
        return False
    block_size = getattr(module.weight, "block_size", None)
    return block_size is not None and block_size[-1] != module.weight.shape[-1]


class ActQuantLinear(nn.Module):
    """Linear with a dequantized weight and (optionally) torchao's dynamic activation quant.

    torchao's quantized tensors dequantize the whole weight on every call (a large
    vocabulary's lm_head included), which makes an eager reference run take minutes per
    prompt. Dequantizing once gives the same tensor, so the math is unchanged."""

    def __init__(self, linear: nn.Linear) -> None:
        from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
            _apply_int8_act_asym_per_token_quant_dequant,
        )

        super().__init__()
        self._quant_dequant = _apply_int8_act_asym_per_token_quant_dequant  # the function torchao's tensor calls
        weight = linear.weight
        self.act_quant = getattr(weight, "activation_quantization", None) is not None
        self.weight = nn.Parameter(weight.dequantize().detach().contiguous(), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x):
        if self.act_quant:
            x = self._quant_dequant(x)
        return nn.functional.linear(x, self.weight, self.bias)


def materialize_for_eager(model: nn.Module) -> nn.Module:
    """Swap torchao-quantized modules for plain ones computing the same values, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            weight = getattr(child, "weight", None)
            if weight is None or type(weight) is nn.Parameter or not hasattr(weight, "dequantize"):
                continue  # float module
            if isinstance(child, nn.Linear):
                setattr(parent, name, ActQuantLinear(child))
            elif isinstance(child, nn.Embedding):
                child.weight = nn.Parameter(weight.dequantize().detach().contiguous(), requires_grad=False)
    return model
