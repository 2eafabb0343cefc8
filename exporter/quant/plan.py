"""Which quantization rule each module falls under, and the summary that goes in the manifest.

Each Linear and Embedding module gets the scheme of the first rule whose glob matches its
name and whose kind matches its type; "float" keeps it float explicitly, and a module no
rule matches stays float too but is listed as unmatched. Deciding is target-free; each
backend's quantizer then stores the plan its own way.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from exporter.errors import RecipeError
from exporter.quant.schemes import SCHEMES
from exporter.spec import QuantRule, QuantSpec


@dataclass(kw_only=True)
class RuleMatch:
    rule: QuantRule
    modules: list[str] = field(default_factory=list)
    # modules whose input width the rule's group_size does not divide -> the group size
    # they are stored with (quant.indivisible = "per_channel": the width; "pad": the rule's)
    group_sizes: dict[str, int] = field(default_factory=dict)

    def group_size_of(self, name: str) -> int:
        return self.group_sizes.get(name, self.rule.group_size)


@dataclass(kw_only=True)
class QuantSummary:
    """Built up by the quantization stages (smoothing, scale search, tuning add their records)."""

    rules: list[RuleMatch]
    unmatched: list[str]  # Linear/Embedding modules no rule matched (they stay float)
    fused: dict[str, list[str]] = field(default_factory=dict)  # fused Linear -> the modules it replaced
    smoothing: dict | None = None  # what quant/smoothing.py did before quantizing, if anything
    scale_search: dict | None = None  # quant/calibration.py's record, when scales were searched
    tuning: dict | None = None  # quant/tuning.py's record, when the float parameters were tuned
    # every module whose width the rule's group size does not divide, and what was done
    indivisible: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "rules": [
                {
                    "match": m.rule.match, "kind": m.rule.kind, "scheme": m.rule.scheme,
                    "group_size": m.rule.group_size if SCHEMES[m.rule.scheme].uses_group_size else None,
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
            "indivisible": self.indivisible,
        }

    def float_modules(self) -> list[str]:
        kept = [name for m in self.rules if m.rule.scheme == "float" for name in m.modules]
        return kept + self.unmatched

    def quantized_count(self) -> int:
        return sum(len(m.modules) for m in self.rules if m.rule.scheme != "float")


@dataclass(frozen=True, kw_only=True)
class Quantized:
    """What a backend's quantizer did: the rule summary, and each module's stored form (the
    backend's own type: ONNX Runtime blocks, Core ML codes; none where the weights hold it)."""

    summary: QuantSummary
    stored: dict[nn.Module, Any] = field(default_factory=dict)


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


def fused_parts(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Fused Linear name -> the modules it replaced (decoder.fuse_projections), if any."""
    from exporter.decoder import StaticCacheLM

    return model.fused_parts if isinstance(model, StaticCacheLM) else {}


def plan(model: nn.Module, spec: QuantSpec) -> QuantSummary:
    """Decide, without changing the model, which rule each quantizable module falls under,
    and the group size of each module whose width its rule's does not divide
    (``spec.indivisible``, resolved for the target: apply.resolve_indivisible).

    A fused Linear falls under the rule of the modules it replaced, which were fused only
    because they share one."""
    matches = [RuleMatch(rule=r) for r in spec.rules]
    unmatched, fused, indivisible = [], {}, []
    replaced = fused_parts(model)
    for name, module in model.named_modules():
        kind = module_kind(module)
        if kind is None:
            continue
        parts = replaced.get(name)
        if parts:
            fused[name] = list(parts)
        i = rule_index(spec.rules, parts[0] if parts else name, kind)
        if i is None:
            unmatched.append(name)
            continue
        _check_applicable(spec.rules[i], name, module, kind, i)
        matches[i].modules.append(name)
        adjusted = _indivisible(spec, spec.rules[i], name, module, kind, i)
        if adjusted:
            matches[i].group_sizes[name] = adjusted["stored_group_size"]
            indivisible.append(adjusted)
    return QuantSummary(rules=matches, unmatched=unmatched, fused=fused, indivisible=indivisible)


def _indivisible(spec: QuantSpec, rule: QuantRule, name: str, module: nn.Module, kind: str, index: int) -> dict | None:
    """What happens to a module whose input width ``rule.group_size`` does not divide (None: it divides)."""
    if not SCHEMES[rule.scheme].uses_group_size:
        return None
    width = module.in_features if kind == "linear" else module.embedding_dim
    if width % rule.group_size == 0:
        return None
    policy = spec.indivisible
    if policy in ("refuse", "auto"):  # "auto" reaches here only unresolved (plan() called without a target)
        raise RecipeError(f"quant.rules[{index}].group_size: {rule.group_size} does not divide the input width "
                          f"{width} of {name}",
                          hint='set quant.indivisible = "per_channel" (or "pad" where the target has partial groups), '
                               "choose a group size that divides it, or keep that module float")
    stored = rule.group_size if policy == "pad" else width
    groups = -(-width // rule.group_size) if policy == "pad" else 1
    return {"module": name, "width": width, "group_size": rule.group_size, "action": policy,
            "stored_group_size": stored, "groups_per_row": groups}


def _check_applicable(rule: QuantRule, name: str, module: nn.Module, kind: str, index: int) -> None:
    path = f"quant.rules[{index}]"
    scheme = SCHEMES[rule.scheme]
    if kind not in scheme.kinds:
        raise RecipeError(f"{path}.scheme: {rule.scheme} applies to {' and '.join(scheme.kinds)} layers, "
                          f"but it matched {kind} {name}; add kind = \"{scheme.kinds[0]}\" "
                          f"to the rule or put a {kind} rule before it")

