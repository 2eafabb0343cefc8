"""The recipe as typed, frozen data.

Every field a recipe may set lives here with its default. Cross-field checks run in
``__post_init__`` and raise ``RecipeError`` naming the dotted path, so a recipe is either
valid as a whole or refused before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from exporter.errors import invalid_field as _fail
from exporter.quant.schemes import GROUP_SIZES, MODULE_KINDS, SCHEMES, schemes_for

SCHEMA_VERSION = 1
DTYPES = ("float32",)
RULE_KINDS = (*MODULE_KINDS, "any")
INDIVISIBLE_POLICIES = ("auto", "pad", "per_channel", "refuse")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Which checkpoint to export when the command line gives no --model."""

    source: str = "builtin:smollm2-135m-instruct"  # "": none (a recipe for any model; --model gives it)
    adapter: str = ""  # a PEFT LoRA adapter folder merged into the source ("" : none)
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            _fail("model.dtype", f"{self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")


@dataclass(frozen=True, kw_only=True)
class KVCacheSpec:
    """Static KV cache: allocated once with max_seq_len slots, updated in place."""

    max_seq_len: int = 512
    max_prefill_len: int = 256
    # ExecuTorch's llama::custom_sdpa (GQA without repeating K/V) and llama::update_cache
    # (in-place write). "sdpa"/"index_copy" are the portable fallbacks kept for comparison.
    attention: str = "custom_sdpa"
    cache_update: str = "custom"
    # "int8": codes with a scale and zero point per position and head (executorch only, with
    # custom_sdpa / custom: llama::custom_quantized_sdpa reads it); docs/recipes.md.
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.max_seq_len < 2:
            _fail("kv_cache.max_seq_len", f"must be at least 2, got {self.max_seq_len}")
        if not 1 <= self.max_prefill_len < self.max_seq_len:
            _fail(
                "kv_cache.max_prefill_len",
                f"must be between 1 and kv_cache.max_seq_len - 1 ({self.max_seq_len - 1}), "
                f"got {self.max_prefill_len}",
            )
        if self.attention not in ("custom_sdpa", "sdpa"):
            _fail("kv_cache.attention", f"{self.attention!r} is not one of 'custom_sdpa', 'sdpa'")
        if self.cache_update not in ("custom", "index_copy"):
            _fail("kv_cache.cache_update", f"{self.cache_update!r} is not one of 'custom', 'index_copy'")
        if self.dtype not in ("float32", "int8"):
            _fail("kv_cache.dtype", f"{self.dtype!r} is not one of 'float32', 'int8'")
        if self.dtype == "int8" and (self.attention, self.cache_update) != ("custom_sdpa", "custom"):
            _fail("kv_cache.dtype", 'an int8 cache is read by the quantized custom SDPA: use attention = '
                                    '"custom_sdpa" with cache_update = "custom"')


@dataclass(frozen=True, kw_only=True)
class QuantRule:
    """One rule: modules whose name matches ``match`` (a glob) and whose kind matches get ``scheme``."""

    match: str
    scheme: str
    kind: str = "any"
    group_size: int = 32
    # Symmetric integers (zero point fixed at the middle of the range) or a zero point per
    # group. Not every target stores zero points; validate() refuses what a target lacks.
    symmetric: bool = True

    @property
    def quantizes_activations(self) -> bool:
        """The int8_dynact_* schemes quantize a layer's input to int8 at run time."""
        return SCHEMES[self.scheme].dynamic_activations

    def validate(self, path: str) -> None:
        if self.kind not in RULE_KINDS:
            _fail(f"{path}.kind", f"{self.kind!r} is not one of {', '.join(RULE_KINDS)}")
        allowed = schemes_for(self.kind)
        if self.scheme not in allowed:
            _fail(f"{path}.scheme", f"{self.scheme!r} is not a {self.kind} scheme; use one of {', '.join(allowed)}")
        if self.group_size not in GROUP_SIZES:
            _fail(f"{path}.group_size", f"{self.group_size} is not one of {', '.join(map(str, GROUP_SIZES))}")


@dataclass(frozen=True, kw_only=True)
class SmoothingSpec:
    """Activation smoothing before quantizing (exporter/quant/smoothing.py); alpha 0 turns it off.

    It helps schemes that quantize activations at run time (``int8_dynact_*``): it moves
    activation outliers into the weights, with alpha the share moved."""

    alpha: float = 0.0
    # Smooth the lm_head's input too. That unties a tied lm_head from the embedding, which
    # costs a second copy on a target that stores them once (ONNX).
    lm_head: bool = True
    # "builtin" (exporter/prompts.py) or a UTF-8 text file, one sample per line.
    calibration: str = "builtin"
    # 0: a factor per input channel. N: one factor per N input channels (the largest of
    # theirs), so weights that lie on a 4-bit grid per group of N (a checkpoint converted
    # from GGUF Q4_0/Q4_1, or trained with int4 QAT) stay on it, scaled.
    group_size: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha < 1.0:
            _fail("quant.smoothing.alpha", f"must be at least 0 (off) and below 1, got {self.alpha}")
        if not self.calibration:
            _fail("quant.smoothing.calibration", 'give "builtin" or the path of a text file')
        if self.group_size and self.group_size not in GROUP_SIZES:
            _fail("quant.smoothing.group_size",
                  f"{self.group_size} is not 0 (per channel) or one of {', '.join(map(str, GROUP_SIZES))}")


SCALE_SEARCH_METHODS = ("none", "activation")


@dataclass(frozen=True, kw_only=True)
class ScaleSearchSpec:
    """How block scales are chosen (exporter/quant/block_search.py). "none": from each block's
    min/max. "activation": searched per block to minimise the layer's output error on the
    calibration texts' activations; same storage, same kernels."""

    method: str = "none"
    # "builtin" (exporter/prompts.py) or a UTF-8 text file, one sample per line.
    calibration: str = "builtin"

    def __post_init__(self) -> None:
        if self.method not in SCALE_SEARCH_METHODS:
            _fail("quant.scale_search.method", f"{self.method!r} is not one of {', '.join(SCALE_SEARCH_METHODS)}")
        if not self.calibration:
            _fail("quant.scale_search.calibration", 'give "builtin" or the path of a text file')


@dataclass(frozen=True, kw_only=True)
class TuningSpec:
    """End-to-end tuning after quantizing (exporter/quant/tuning.py): the float parameters the
    artifact stores (block scales, norm weights) trained on the KL divergence from the float
    model over the calibration texts; the integer codes stay. 0 steps (default) is off."""

    steps: int = 0
    learning_rate: float = 2e-3
    scales: bool = True  # each block's scale, as a factor on the one quantization chose
    norms: bool = True  # the RMSNorm weights
    # "builtin" (exporter/prompts.py) or a UTF-8 text file, one sample per line.
    calibration: str = "builtin"
    # Tokens the float model writes after each calibration text (sampled, seeded); the
    # tuning trains on text + continuation. 0: on the texts alone.
    generated_tokens: int = 64

    def __post_init__(self) -> None:
        if self.generated_tokens < 0:
            _fail("quant.tuning.generated_tokens", f"must be 0 or more, got {self.generated_tokens}")
        if self.steps < 0:
            _fail("quant.tuning.steps", f"must be 0 (off) or a number of steps, got {self.steps}")
        if not 0.0 < self.learning_rate < 1.0:
            _fail("quant.tuning.learning_rate", f"must be above 0 and below 1, got {self.learning_rate}")
        if self.steps and not (self.scales or self.norms):
            _fail("quant.tuning",
                  "scales and norms are both false: nothing to train; set steps = 0 to turn tuning off")
        if not self.calibration:
            _fail("quant.tuning.calibration", 'give "builtin" or the path of a text file')


@dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """Ordered rules, first match wins; modules no rule matches stay float and are counted."""

    rules: tuple[QuantRule, ...] = ()
    smoothing: SmoothingSpec = field(default_factory=SmoothingSpec)
    scale_search: ScaleSearchSpec = field(default_factory=ScaleSearchSpec)
    tuning: TuningSpec = field(default_factory=TuningSpec)
    # N > 0: the lm_head becomes two Linears, lm_head.head (vocabulary rows 0..N-1) and
    # lm_head.tail (the rest), so rules can give them different schemes. BPE vocabularies
    # number tokens roughly by merge order, so the first rows are the frequent tokens the
    # model predicts most (docs/recipes.md, "Splitting the lm_head").
    lm_head_split: int = 0
    # A layer whose input width the rule's group_size does not divide (docs/recipes.md,
    # "Widths a group size does not divide"): "pad" its last group (where the target's format
    # has partial groups), "per_channel" (one group per row), "refuse"; "auto": pad where
    # the target can, else per_channel. The quant summary lists every such layer.
    indivisible: str = "auto"

    def __post_init__(self) -> None:
        for i, rule in enumerate(self.rules):
            rule.validate(f"quant.rules[{i}]")
        if self.indivisible not in INDIVISIBLE_POLICIES:
            _fail("quant.indivisible", f"{self.indivisible!r} is not one of {', '.join(INDIVISIBLE_POLICIES)}")
        if self.lm_head_split < 0:
            _fail("quant.lm_head_split",
                  f"must be 0 (no split) or a number of vocabulary rows, got {self.lm_head_split}")


@dataclass(frozen=True, kw_only=True)
class TargetSpec:
    """[target]: the target's name and, in [target.<name>], that target's own options.

    The options class belongs to the backend (exporter/backends/<name>/options.py); the
    recipe reader parses the table with it, and ``options`` defaults to its defaults."""

    name: str = "executorch"
    options: Any = None

    def __post_init__(self) -> None:
        from exporter.backends import backend_class

        options_class = backend_class(self.name).options_class
        if self.options is None:
            object.__setattr__(self, "options", options_class())
        elif not isinstance(self.options, options_class):
            _fail(f"target.{self.name}", f"expected {options_class.__name__}, got {type(self.options).__name__}")


@dataclass(frozen=True, kw_only=True)
class ParitySpec:
    """What `verify` compares and the gates it applies (see docs/parity.md)."""

    prompts: int = 8
    decode_steps: int = 32
    greedy_tokens: int = 32
    # Lowering parity: artifact vs the quantized eager model (same math, tight).
    lowering_max_abs_diff: float = 1e-3
    lowering_cosine_min: float = 0.9999
    lowering_top1_min: float = 1.0
    # With run-time activation quantization (int8_dynact_*), verify also measures how far the
    # reference moves from itself when its embedding output is scaled by (1 + 1e-7), and by
    # two more such nudges: the median is its noise floor. The lowering gates then allow this
    # many times that floor's deviation when it is larger than the thresholds above
    # (docs/parity.md). 0 turns it off.
    lowering_noise_floor_factor: float = 2.0
    # Quantization quality: artifact vs the float model.
    quality_top1_min: float = 0.98
    quality_kl_mean_max: float = 0.05
    greedy_exact_match_min: float = 0.0

    def __post_init__(self) -> None:
        if self.prompts < 1:
            _fail("parity.prompts", f"must be at least 1, got {self.prompts}")
        if self.decode_steps < 1:
            _fail("parity.decode_steps", f"must be at least 1, got {self.decode_steps}")
        for name in ("lowering_top1_min", "quality_top1_min", "greedy_exact_match_min"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                _fail(f"parity.{name}", f"must be a fraction between 0 and 1, got {value}")
        if not -1.0 <= self.lowering_cosine_min <= 1.0:
            _fail("parity.lowering_cosine_min", f"must be between -1 and 1, got {self.lowering_cosine_min}")


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """[task]: the intent task section of `verify` (docs/intent.md): next queries of the float
    model and of the artifact on an eval set of behaviour sessions. Off while ``eval`` is ""."""

    eval: str = ""  # "builtin" (the shipped split), a JSONL path, or "" (no task section)
    sessions: int = 100  # the first N sessions of the eval set
    candidates: int = 5  # k queries per session: the top-k first tokens, each continued greedily
    max_new_tokens: int = 16
    template: str = "chat"  # the prompt: "chat" (the model's chat template), or a text with {behaviours}
    instruction: str = ""  # the system instruction ("": exporter/intent/prompt.py's)
    budget: int = 192  # prompt tokens at most; the oldest events are dropped first
    agreement_min: float = 0.0  # gate: the artifact's top query equals the float model's, this often
    # The prompt prefix the artifact keeps in its KV cache, prefilled once (docs/intent.md):
    # "auto" (the template and instruction before the first behaviour line), "off", or a text.
    cached_prefix: str = "auto"

    def __post_init__(self) -> None:
        for name in ("sessions", "candidates", "max_new_tokens", "budget"):
            if getattr(self, name) < 1:
                _fail(f"task.{name}", f"must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.agreement_min <= 1.0:
            _fail("task.agreement_min", f"must be a fraction between 0 and 1, got {self.agreement_min}")
        if not self.cached_prefix:
            _fail("task.cached_prefix", 'give "auto", "off" or the text every prompt starts with')
        if self.template != "chat" and "{behaviours}" not in self.template:
            _fail("task.template", 'give "chat" or a text with {behaviours} (and optionally {prefix})')


@dataclass(frozen=True, kw_only=True)
class BenchSpec:
    warmup: int = 1
    runs: int = 5
    prompt_lengths: tuple[int, ...] = (64, 256)
    decode_tokens: int = 128
    threads: int = 2
    # TTFT with and without the cached prompt prefix on this many intent eval prompts (0: off).
    prefix_prompts: int = 16

    def __post_init__(self) -> None:
        if self.runs < 1:
            _fail("bench.runs", f"must be at least 1, got {self.runs}")
        if self.warmup < 0:
            _fail("bench.warmup", f"must be 0 or more, got {self.warmup}")
        if not self.prompt_lengths or min(self.prompt_lengths) < 1:
            _fail("bench.prompt_lengths", "must list at least one positive length")
        if self.prefix_prompts < 0:
            _fail("bench.prefix_prompts", f"must be 0 or more, got {self.prefix_prompts}")


@dataclass(frozen=True, kw_only=True)
class ExportRecipe:
    schema_version: int = SCHEMA_VERSION
    name: str
    description: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    kv_cache: KVCacheSpec = field(default_factory=KVCacheSpec)
    quant: QuantSpec = field(default_factory=QuantSpec)
    target: TargetSpec = field(default_factory=TargetSpec)
    parity: ParitySpec = field(default_factory=ParitySpec)
    bench: BenchSpec = field(default_factory=BenchSpec)
    task: TaskSpec = field(default_factory=TaskSpec)

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            _fail("schema_version", f"this tool reads schema_version {SCHEMA_VERSION}, got {self.schema_version}")
        longest_needed = max(self.bench.prompt_lengths) + self.bench.decode_tokens
        if longest_needed > self.kv_cache.max_seq_len:
            _fail(
                "bench.decode_tokens",
                f"max(bench.prompt_lengths) + bench.decode_tokens = {longest_needed} exceeds "
                f"kv_cache.max_seq_len = {self.kv_cache.max_seq_len}",
            )
