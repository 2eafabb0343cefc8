"""The contract between the pipeline and a target, in one place.

A target is a package ``exporter/backends/<name>/`` whose ``Backend`` subclass declares:
- ``options_class``: its ``[target.<name>]`` table (a frozen dataclass; the recipe reader
  parses the table with it);
- ``storage``: the schemes it stores, per module kind, each mapped to its own handler
  (``Storage``); a rule naming another scheme is refused with the ones it takes;
- ``capabilities``: what else it can do (scale search, tuning, lm_head split, asymmetric
  schemes, the KV-cache implementations it runs, adopting an artifact's stored weights).
Refusals of undeclared features come from ``check_recipe`` with one message shape; the
backend's own ``validate`` adds what only it knows (its runtime's limits).

The pipeline calls, in order: ``eager_attention`` (the reference's KV cache), ``quantize``
(the decoder computes with exactly the weights the target stores; a ``Quantized`` record
carries the stored forms to the later stages), ``tunables`` (when tuning), ``lower`` (a
``LoweredProgram``), and for checking an artifact ``prepare_reference``, ``load_runner``,
``shipped_tokenizer`` and ``open_bench_session``. Heavy imports (executorch, coremltools,
onnxruntime) happen inside the methods, so importing a backend class stays cheap.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from exporter.errors import UnsupportedError
from exporter.quant.plan import Quantized
from exporter.quant.schemes import SCHEMES

if TYPE_CHECKING:
    from torch import nn

    from exporter.artifact import Artifact
    from exporter.decoder import DecoderShape
    from exporter.manifest import IOSignature, ModelFacts
    from exporter.quant.tuning import Tunable
    from exporter.runners import ChunkedRunner
    from exporter.spec import ExportRecipe, QuantSpec

Progress = Callable[[str], None]
Codec = tuple[Callable[[str], list[int]], Callable[[Any], str]]  # (encode, decode) of a tokenizer

# The KV-cache implementations a recipe can ask for (kv_cache.attention, kv_cache.cache_update).
FUSED_IN_PLACE = ("custom_sdpa", "custom")
PER_TOKEN_SCALES, STATIC_SCALES = "per_token", "static"


@dataclass(frozen=True, slots=True)
class Storage:
    """How a target stores one scheme (its quantizer holds the handler that does it)."""

    description: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Capabilities:
    scale_search: bool = False  # block scales searched on calibration activations
    tuning: bool = False  # stored float parameters trained end to end (quant/tuning.py)
    lm_head_split: bool = False
    asymmetric: frozenset[str] = frozenset()  # schemes that may carry zero points / offsets
    kv_caches: frozenset[tuple[str, str]] = frozenset({FUSED_IN_PLACE})  # (attention, cache_update) it runs
    # kv_cache.dtype = "int8": how the target's int8 cache is scaled ("" refuses it): PER_TOKEN_SCALES
    # (a scale and zero point written with each position) or STATIC_SCALES (calibrated at export).
    int8_kv_cache: str = ""
    # verify can give the reference the artifact's own stored weights instead of rebuilding them
    adopts_artifact_weights: bool = False
    # the storage format has a partial last group (a width the group size does not divide)
    partial_groups: bool = False


@dataclass(frozen=True, kw_only=True)
class NativeRunnerSpec:
    """A backend's device runner: a small program built per device (devices/), which speaks
    the line protocol of devices/native.py."""

    name: str  # the binary's (or script's) name
    runtime_package: str  # the pinned distribution whose platform wheel it is built against
    # build(wheels, out_dir, compiler=) -> the runner, what it loads beside it; wheels are the
    # runtime's then the companions', all for the device's platform
    build: Callable[..., Path]
    build_for_host: Callable[..., Path]  # build_for_host(out_dir) -> the same against the installed runtime
    companion_packages: tuple[str, ...] = ()  # further pinned wheels the runner loads (numpy)
    # a Python script the device's bare interpreter runs (Device.interpreter), not a binary
    interpreted: bool = False

    @property
    def packages(self) -> tuple[str, ...]:
        return (self.runtime_package, *self.companion_packages)


@dataclass(frozen=True, kw_only=True)
class LoweredProgram:
    roles: dict[str, str]  # role -> file or folder in the artifact ("program", "weights", ...)
    timings_s: dict[str, float]
    io_signature: IOSignature
    target_info: dict[str, Any] = field(default_factory=dict)  # target facts for the manifest


@dataclass(frozen=True, slots=True)
class RunTiming:
    """One timed generation of a bench session."""

    prompt_tokens: int
    prefill_tok_s: float | None  # set on a one-token run (tokenize + prefill + first sample)
    ttft_ms: float | None
    decode_tok_s: float
    generated: int
    cpu_s: float
    wall_s: float

    @classmethod
    def of(cls, *, prompt_tokens: int, first_token_s: float, max_new_tokens: int, generated: int,
           decode_s: float, cpu_s: float, wall_s: float) -> RunTiming:
        one_token = max_new_tokens == 1
        return cls(prompt_tokens=prompt_tokens,
                   prefill_tok_s=prompt_tokens / first_token_s if one_token else None,
                   ttft_ms=first_token_s * 1e3 if one_token else None,
                   decode_tok_s=generated / decode_s if generated and decode_s > 0 else 0.0,
                   generated=generated, cpu_s=cpu_s, wall_s=wall_s)


class BenchSession(Protocol):
    """The target runtime's own generation loop, as the app embeds it (bench.py times it)."""

    threads: int
    load_ms: float
    encode: Callable[[str], list[int]]  # its runtime's tokenizer
    decode: Callable[[Any], str]

    def run(self, text: str, *, max_new_tokens: int) -> RunTiming: ...


class Backend(ABC):
    name: ClassVar[str]
    extra: ClassVar[str]  # the pip extra that installs its runtime
    options_class: ClassVar[type]
    storage: ClassVar[Mapping[str, Mapping[str, Storage]]]  # kind -> scheme -> storage (float included)
    capabilities: ClassVar[Capabilities]
    # Why a scheme is refused here, when more can be said than "not stored" (scheme -> reason).
    refusal_reasons: ClassVar[Mapping[str, str]] = {}
    # The native runner devices without this tool's Python run the artifact with (None: none yet).
    native_runner: ClassVar[NativeRunnerSpec | None] = None

    # -- export ---------------------------------------------------------------------------

    def validate(self, recipe: ExportRecipe) -> None:  # noqa: B027 - an optional hook; the default does nothing
        """Refuse, with UnsupportedError, what only this target knows it cannot run."""

    def check_shape(self, shape: DecoderShape, recipe: ExportRecipe) -> None:  # noqa: B027 - optional hook
        """Refuse, with UnsupportedError, a model whose shapes this target's runtime cannot
        execute; called with the checkpoint's config, before any weight is loaded."""

    def eager_attention(self, recipe: ExportRecipe) -> tuple[str, str]:
        """(attention, cache_update) of the eager reference: the program's own, or the same math."""
        return recipe.kv_cache.attention, recipe.kv_cache.cache_update

    @abstractmethod
    def quantize(self, lm: nn.Module, quant: QuantSpec, options: Any, *,
                 grams: Mapping[str, Any] | None = None) -> Quantized:
        """Quantize ``lm`` in place as the target stores it; ``grams`` (scale search) only
        reaches backends that declare ``capabilities.scale_search``."""

    def tunables(self, lm: nn.Module, quantized: Quantized) -> list[Tunable]:
        """The stored float parameters end-to-end tuning may train (capabilities.tuning)."""
        raise NotImplementedError(f"the {self.name} target declares no tuning")

    @abstractmethod
    def lower(self, lm: nn.Module, quantized: Quantized, *, recipe: ExportRecipe, model: ModelFacts,
              out_dir: Path, on_stage: Progress) -> LoweredProgram:
        """Write the program into ``out_dir``."""

    # -- checking an artifact -------------------------------------------------------------

    # B027 (below): an optional hook; the default does nothing.
    def prepare_reference(self, lm: nn.Module, quantized: Quantized, artifact: Artifact) -> None:  # noqa: B027
        """Make the rebuilt quantized reference compute as the artifact does (in place)."""

    @abstractmethod
    def runtime_name(self) -> str: ...

    @abstractmethod
    def load_runner(self, artifact: Artifact) -> ChunkedRunner: ...

    @abstractmethod
    def shipped_tokenizer(self, artifact: Artifact) -> Codec:
        """encode/decode as the device runtime reads the shipped tokenizer."""

    @abstractmethod
    def open_bench_session(self, artifact: Artifact, *, threads: int) -> BenchSession: ...

    # -- declared facts -------------------------------------------------------------------

    @classmethod
    def stores(cls, scheme_name: str, kind: str) -> bool:
        return scheme_name in cls.storage.get(kind, {})


def refusal(field_path: str, what: str, target: str, fix: str,
            supported_by: list[str] | None = None) -> UnsupportedError:
    """The one shape of a capability refusal: field, what is refused, where it is supported, fix."""
    where = f" (supported by: {', '.join(supported_by)})" if supported_by else ""
    return UnsupportedError(f"{field_path}: {what} is not supported by the {target} target{where}; {fix}")


def check_declared(backend: type[Backend], recipe: ExportRecipe, targets_with: Callable[[str], list[str]]) -> None:
    """Refuse what ``backend`` does not declare. ``targets_with(capability)``: the registered
    targets that declare it (the registry's answer), for the message."""
    caps, quant, name = backend.capabilities, recipe.quant, backend.name
    if quant.scale_search.method != "none" and not caps.scale_search:
        raise refusal("quant.scale_search", "searching block scales", name, "remove [quant.scale_search]",
                      targets_with("scale_search"))
    if quant.tuning.steps and not caps.tuning:
        raise refusal("quant.tuning", "end-to-end tuning of stored scales", name, "remove [quant.tuning]",
                      targets_with("tuning"))
    if quant.lm_head_split and not caps.lm_head_split:
        raise refusal("quant.lm_head_split", "splitting the lm_head", name, "remove quant.lm_head_split",
                      targets_with("lm_head_split"))
    if quant.indivisible == "pad" and not caps.partial_groups:
        raise refusal("quant.indivisible", "padding a partial last group", name,
                      'use "per_channel" or "auto"', targets_with("partial_groups"))
    kv = (recipe.kv_cache.attention, recipe.kv_cache.cache_update)
    if kv not in caps.kv_caches:
        runs = " or ".join(f"attention = {a!r} with cache_update = {u!r}" for a, u in sorted(caps.kv_caches))
        raise refusal("kv_cache", f"attention = {kv[0]!r} with cache_update = {kv[1]!r}", name, f"use {runs}")
    if recipe.kv_cache.dtype == "int8" and not caps.int8_kv_cache:
        raise refusal("kv_cache.dtype", "an int8 KV cache", name, 'remove kv_cache.dtype (float32)',
                      targets_with("int8_kv_cache"))
    for i, rule in enumerate(quant.rules):
        kinds = [k for k in SCHEMES[rule.scheme].kinds if rule.kind in ("any", k)]
        for kind in kinds:
            if not backend.stores(rule.scheme, kind):
                reason = backend.refusal_reasons.get(rule.scheme)
                stored = ", ".join(backend.storage.get(kind, {}))
                what = f"{rule.scheme} for {kind} layers" + (f" ({reason})" if reason else "")
                raise refusal(f"quant.rules[{i}].scheme", what, name,
                              f"use one of {stored}")
        if not rule.symmetric and not SCHEMES[rule.scheme].is_float and rule.scheme not in caps.asymmetric:
            allowed = ", ".join(sorted(caps.asymmetric)) or "no scheme"
            raise refusal(f"quant.rules[{i}].symmetric", f"asymmetric {rule.scheme}", name,
                          f"remove symmetric = false (asymmetric here: {allowed})")


def check_recipe(recipe: ExportRecipe) -> None:
    """Refuse, before any work, what the recipe's target refuses or does not declare."""
    from exporter.backends import get_backend, targets_with

    backend = get_backend(recipe.target.name)
    backend.validate(recipe)  # first: its own lines say more than the declared refusals
    check_declared(type(backend), recipe, targets_with)
