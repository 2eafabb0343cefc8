"""Stage: apply the recipe's ordered quantization rules to the decoder, in place.

Each Linear and Embedding module gets the scheme of the first rule whose glob matches its
name and whose kind matches its type; "float" keeps it float explicitly, and a module no
rule matches stays float too but is listed as unmatched. The summary says what each rule
matched, and it goes into the manifest.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import nn

from exporter.errors import RecipeError, require
from exporter.spec import QuantRule, QuantSpec


@dataclass(kw_only=True)
class RuleMatch:
    rule: QuantRule
    modules: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class QuantSummary:
    rules: list[RuleMatch]
    unmatched: list[str]  # Linear/Embedding modules no rule matched (they stay float)
    fused: dict[str, list[str]] = field(default_factory=dict)  # fused Linear -> the modules it replaced
    smoothing: dict | None = None  # what exporter/smoothing.py did before quantizing, if anything
    scale_search: dict | None = None  # exporter/scale_search.py's calibration, when scales were searched
    tuning: dict | None = None  # exporter/tuning.py's record, when the float parameters were tuned

    def to_dict(self) -> dict:
        return {
            "rules": [
                {
                    "match": m.rule.match, "kind": m.rule.kind, "scheme": m.rule.scheme,
                    "group_size": m.rule.group_size if _uses_group(m.rule.scheme) else None,
                    "symmetric": m.rule.symmetric,
                    "matched": len(m.modules), "modules": m.modules,
                }
                for m in self.rules
            ],
            "float": sorted(self.float_modules()),
            "unmatched": self.unmatched,
            "fused": self.fused,
            "smoothing": self.smoothing,
            "scale_search": self.scale_search,
            "tuning": self.tuning,
        }

    def float_modules(self) -> list[str]:
        kept = [name for m in self.rules if m.rule.scheme == "float" for name in m.modules]
        return kept + self.unmatched

    def quantized_count(self) -> int:
        return sum(len(m.modules) for m in self.rules if m.rule.scheme != "float")


def _uses_group(scheme: str) -> bool:
    return scheme in INT4_GROUP_SCHEMES


def module_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def rule_index(rules: list[QuantRule], name: str, kind: str) -> int | None:
    """The index of the first rule that applies to module ``name`` of ``kind``, or None."""
    for i, rule in enumerate(rules):
        if rule.kind in ("any", kind) and fnmatch.fnmatchcase(name, rule.match):
            return i
    return None


def plan(model: nn.Module, spec: QuantSpec) -> QuantSummary:
    """Decide, without changing the model, which rule each quantizable module falls under.

    A fused Linear (exporter/decoder.py, fuse_projections) falls under the rule of the
    modules it replaced, which were fused only because they share one."""
    matches = [RuleMatch(rule=r) for r in spec.rules]
    unmatched, fused = [], {}
    for name, module in model.named_modules():
        kind = module_kind(module)
        if kind is None:
            continue
        parts = getattr(module, "fused_from", None)
        if parts:
            fused[name] = list(parts)
        i = rule_index(spec.rules, parts[0] if parts else name, kind)
        if i is None:
            unmatched.append(name)
            continue
        _check_applicable(spec.rules[i], name, module, kind, i)
        matches[i].modules.append(name)
    return QuantSummary(rules=matches, unmatched=unmatched, fused=fused)


def _check_applicable(rule: QuantRule, name: str, module: nn.Module, kind: str, index: int) -> None:
    path = f"quant.rules[{index}]"
    linear_only = rule.scheme.startswith("int8_dynact")
    if kind == "embedding" and linear_only:
        raise RecipeError(f"{path}.scheme: {rule.scheme} applies to linear layers, but it matched embedding {name}; "
                          f"add kind = \"linear\" to the rule or put an embedding rule before it")
    if _uses_group(rule.scheme):
        width = module.in_features if kind == "linear" else module.embedding_dim
        if width % rule.group_size:
            raise RecipeError(f"{path}.group_size: {rule.group_size} does not divide the input width {width} of {name}; "
                              f"choose a group size that divides it or keep that module float")


def apply_quantization(model: nn.Module, spec: QuantSpec, grams: dict | None = None) -> QuantSummary:
    """Quantize ``model`` in place with torchao and return what was done.

    ``grams``: input Gram matrices by Linear name (scale_search.calibrate); symmetric int4
    Linears then get searched group scales. A fused Linear reads its first part's: the
    parts share their input."""
    summary = plan(model, spec)
    if summary.quantized_count() == 0:
        return summary
    require("torchao", "executorch")
    import torch
    from torchao.quantization import quantize_

    by_config: dict[tuple[str, int, bool], set[str]] = {}
    for m in summary.rules:
        if m.rule.scheme != "float" and m.modules:
            key = (m.rule.scheme, m.rule.group_size if _uses_group(m.rule.scheme) else 0, m.rule.symmetric)
            by_config.setdefault(key, set()).update(m.modules)
    # Embeddings with padding_idx export to a pattern that no out-variant kernel matches
    # ("Missing out variants: torchao::dequantize_affine"); the index only matters for training.
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            module.padding_idx = None
    modules = dict(model.named_modules())
    with torch.no_grad():
        for (scheme, group_size, symmetric), names in by_config.items():
            if scheme not in INT4_GROUP_SCHEMES:
                quantize_(model, torchao_config(scheme, group_size), filter_fn=lambda mod, fqn, names=names: fqn in names)
                continue
            # One module at a time: its codes come from its float weight, which torchao replaces.
            for name in sorted(names):
                module = modules[name]
                offsets = None
                if symmetric:
                    gram = (grams or {}).get(getattr(module, "fused_from", (name,))[0])
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


def _set_int4_codes(weight, codes, scales) -> None:
    weight.qdata.copy_(codes)
    weight.scale.copy_(scales.reshape(weight.scale.shape))


INT4_GROUP_SCHEMES = ("int8_dynact_int4_weight", "int4_weight")


def int4_group_levels(weight, group_size: int, *, linear: bool, gram=None):
    """Symmetric int4 codes and scales per group, with the group's extreme on a level.

    torchao's default scale, absmax / 7.5, rounds a group's largest value to 7 or 8 steps
    and clips it. Here the value of largest magnitude lands exactly on a level: on -8 when
    it is negative (one level of resolution more than absmax / 7; llama.cpp's Q4_0 and our
    ONNX quantizer do the same, and like them a positive value beyond 7 steps is clipped to
    7) and on +7 when positive (XNNPACK refuses negative scales, which would put it on -8
    too). Linear scales are rounded to bfloat16 first, as XNNPACK stores them, and the codes
    computed against the rounded scale. Measured on SmolLM2-135M in docs/benchmarks.md.

    ``gram``: the layer's block input Gram matrix (scale_search.input_grams); given, each
    group's scale is searched against it instead (scale_search.search_block_scales)."""
    import torch

    n, k = weight.shape
    groups = weight.detach().float().reshape(n, k // group_size, group_size)
    if gram is not None:
        from exporter.scale_search import search_block_scales

        found, _ = search_block_scales(groups.numpy(), gram, bits=4, symmetric=True, positive_scales=True,
                                       scale_dtype=torch.bfloat16 if linear else None)
        scales = torch.from_numpy(found)[..., None]
    else:
        from exporter.int_grids import symmetric_scales

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
    with dynamic int8 activations. They add about 12 us per call on this machine whatever the
    layer's size (a chain of 576 x 576 layers, docs/targets/executorch.md): a quality-for-
    speed trade (SmolLM2: decode 0.74-0.87x the anchor's across runs, docs/benchmarks.md)."""

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
        quantize_(self, torchao_config("int8_dynact_int4_weight", group_size), filter_fn=lambda m, fqn: fqn == "group_sum")
        quantize_(self, torchao_config("int8_dynact_int8_weight", 0), filter_fn=lambda m, fqn: fqn == "offset")
        ones = torch.zeros(n_groups, n_groups, group_size, dtype=torch.int8)
        ones[torch.arange(n_groups), torch.arange(n_groups)] = 1
        _set_int4_codes(self.group_sum.weight, ones.reshape(n_groups, -1), torch.ones(n_groups, n_groups))

    def forward(self, x):
        return self.main(x) + self.offset(self.group_sum(x))


def torchao_config(scheme: str, group_size: int):
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    if scheme == "int8_dynact_int4_weight":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))
    if scheme == "int8_dynact_int8_weight":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    if scheme == "int8_weight":
        return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    if scheme == "int4_weight":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    raise ValueError(f"no torchao config for scheme {scheme!r}")  # spec validation prevents this


def round_group_scales(model: nn.Module, dtype) -> int:
    """Round the scales of group-wise quantized weights to ``dtype`` (returns how many weights).

    XNNPACK stores the group scales of 8da4w weights as bfloat16. Rounding them here, before
    lowering, makes the eager model compute with exactly the scales the artifact stores, so
    lowering parity compares the same math (max abs logit diff 3e-2 -> 2e-7 on a tiny Qwen3).
    """
    import torch

    rounded = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear):  # embeddings run outside XNNPACK with float32 scales
            continue
        weight = module.weight
        block_size = getattr(weight, "block_size", None)
        if block_size is None or block_size[-1] == weight.shape[-1]:
            continue  # not quantized, or per-channel (XNNPACK keeps per-channel scales in float32)
        with torch.no_grad():
            weight.scale.copy_(weight.scale.to(dtype).to(weight.scale.dtype))
        rounded += 1
    return rounded


class ActQuantLinear(nn.Module):
    """Linear with a dequantized weight and (optionally) torchao's dynamic activation quant.

    torchao's quantized tensors dequantize the whole weight on every call (the 49k x 576
    lm_head of SmolLM2 included), which makes an eager reference run take minutes per
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
