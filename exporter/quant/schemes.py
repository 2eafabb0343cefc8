"""The quantization schemes a recipe rule may name, as one typed set.

A scheme says what is stored, independent of any target: weight bits, how weights share a
scale (per output channel, per group of ``group_size`` inputs, or a lookup table per group
of output channels) and whether the layer's input is quantized to int8 at run time. Each
backend maps the schemes it supports to a handler of its own (its storage table); a scheme
no handler takes is refused for that target, naming the ones it takes.

Adding a scheme: one entry in ``SCHEMES``, one handler per backend that stores it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Grouping = Literal["none", "channel", "group", "palette"]
MODULE_KINDS = ("linear", "embedding")
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True, slots=True)
class Scheme:
    name: str
    weight_bits: int  # 32 for float
    grouping: Grouping
    dynamic_activations: bool  # the layer's input quantized to int8 per token or block at run time
    kinds: tuple[str, ...]  # module kinds it applies to

    @property
    def is_float(self) -> bool:
        return self.grouping == "none"

    @property
    def uses_group_size(self) -> bool:
        """A rule's group_size means something for this scheme (blocks of inputs)."""
        return self.grouping == "group"


FLOAT = Scheme("float", 32, "none", False, MODULE_KINDS)
SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    FLOAT,
    Scheme("int8_weight", 8, "channel", False, MODULE_KINDS),
    Scheme("int4_weight", 4, "group", False, MODULE_KINDS),
    Scheme("int8_dynact_int8_weight", 8, "channel", True, ("linear",)),
    Scheme("int8_dynact_int4_weight", 4, "group", True, ("linear",)),
    # A 16-entry lookup table per group of group_size output channels (k-means).
    Scheme("palettize_4bit", 4, "palette", False, MODULE_KINDS),
)}


def scheme(name: str) -> Scheme:
    return SCHEMES[name]


def schemes_for(kind: str) -> tuple[str, ...]:
    """Scheme names valid for a rule of ``kind`` ("linear", "embedding" or "any")."""
    return tuple(name for name, s in SCHEMES.items() if kind == "any" or kind in s.kinds)
