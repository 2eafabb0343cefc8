"""parity.json and bench.json as typed records (written and read through exporter/records.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from exporter.devices.base import DeviceInfo
from exporter.records import omitted_when_none
from exporter.stats import Rate

PARITY_FILE = "parity.json"
BENCH_FILE = "bench.json"


# -- parity -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FloorSample:
    max_abs_diff: float
    cosine_min: float
    top1_agreement: float


@dataclass(frozen=True, kw_only=True)
class NoiseFloor(FloorSample):
    """The reference against itself, slightly perturbed: each metric's median over draws."""

    perturbations: tuple[float, ...]
    factor: float
    samples: tuple[FloorSample, ...]


@dataclass(frozen=True, kw_only=True)
class LoweringMetrics:
    """Artifact vs the quantized eager model, teacher-forced."""

    max_abs_diff: float
    cosine_min: float
    top1_agreement: float
    positions: int
    noise_floor: NoiseFloor | None = omitted_when_none()


@dataclass(frozen=True, kw_only=True)
class PrefixParity:
    """The artifact with its prompt prefix cached (prefilled once, each prompt fed from the
    position after it) against the same artifact fed each whole prompt, teacher-forced on the
    whole prompt's greedy tokens; gated like lowering."""

    prefix_tokens: int
    prompts: int  # behaviour prompts tried
    served: int  # of them, those that start with the prefix (the others are prefilled whole)
    metrics: LoweringMetrics


@dataclass(frozen=True, kw_only=True)
class QualityMetrics:
    """Artifact vs the float model: KL(float || artifact), top-1, perplexity on held-out text."""

    kl_mean: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    positions: int
    ppl_reference: float | None = None
    ppl_candidate: float | None = None
    heldout_tokens: int | None = None
    # For plots (report.html): KL at every position scored (prompt-major), and KL and top-1
    # agreement per teacher-forced decode step, averaged over the prompts.
    kl_by_position: tuple[float, ...] = ()
    kl_by_step: tuple[float, ...] = ()
    top1_by_step: tuple[float, ...] = ()
    steps_per_prompt: int = 0
    # 95% intervals of top1_agreement and kl_mean, resampling whole prompts (stats.prompt_bootstrap):
    # the positions of one prompt share its context, so they are not independent draws.
    top1_interval: tuple[float, float] | None = omitted_when_none()
    kl_mean_interval: tuple[float, float] | None = omitted_when_none()


@dataclass(frozen=True, kw_only=True)
class GreedyMetrics:
    exact_match_rate: float
    first_divergence_min: int
    token_match_rate: float
    tokens_per_prompt: int
    prompts: int


@dataclass(frozen=True, kw_only=True)
class TokenizerReport:
    texts: int
    mismatches: int
    examples: tuple[dict[str, Any], ...]


@dataclass(frozen=True, kw_only=True)
class Compared:
    candidate: str
    lowering_reference: str
    quality_reference: str
    prompts: int
    decode_steps: int
    device: str = "host"
    runtime: str = ""
    environment: dict[str, Any] = field(default_factory=dict)
    artifact: str = ""


@dataclass(frozen=True, kw_only=True)
class TaskScores:
    """One model's candidate queries against the queries the users typed."""

    exact_at_1: Rate
    hit_at_k: Rate
    mrr_at_k: float
    rouge_l_chars: float  # mean over sessions, of the top query


@dataclass(frozen=True, kw_only=True)
class TaskReport:
    """The intent task (exporter/intent/task.py): does the artifact predict the float model's
    next query? Every rate with its count and Wilson 95% interval."""

    eval_set: str
    sessions: int
    candidates: int  # k
    method: str
    normalisation: str
    agreement_top1: Rate  # the artifact's top query equals the float model's
    candidate_overlap: float  # mean share of the float model's k queries the artifact also gives
    first_difference_mean: float  # mean token index where the top queries part (k+1 when equal)
    float_model: TaskScores
    artifact: TaskScores
    disagreements: tuple[dict, ...] = ()  # the first few: session id, both top queries
    float_from_cache: int = 0  # sessions whose float candidates an earlier verify of this checkpoint decoded


@dataclass(frozen=True, kw_only=True)
class ParityReport:
    passed: bool
    failures: tuple[str, ...]
    lowering: LoweringMetrics
    quality: QualityMetrics
    greedy: GreedyMetrics
    tokenizer: TokenizerReport
    compared: Compared
    timings_s: dict[str, float] = field(default_factory=dict)
    # On a device: the same artifact run there against its run on the host (same tokens), so a
    # difference shows as the kernels' (device_vs_host) or the lowering's (lowering).
    device_vs_host: LoweringMetrics | None = omitted_when_none()
    device_facts: DeviceInfo | None = omitted_when_none()
    task: TaskReport | None = omitted_when_none()  # with [task] eval (or verify --eval)
    prefix: PrefixParity | None = omitted_when_none()  # when the artifact records a prompt prefix


# -- bench ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Spread:
    median: float
    min: float
    max: float
    runs: int
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: list[float]) -> Spread:
        import statistics

        return cls(median=statistics.median(samples), min=min(samples), max=max(samples), runs=len(samples),
                   samples=tuple(samples))

    @property
    def relative_range(self) -> float:
        """(max - min) / median: how far apart the runs were."""
        return (self.max - self.min) / self.median if self.median else 0.0


@dataclass(frozen=True, kw_only=True)
class PrefillCase:
    prompt_tokens: int
    prefill_tok_s: Spread
    ttft_ms: Spread


@dataclass(frozen=True, kw_only=True)
class PrefixTTFT:
    """Time to first token on behaviour prompts (the intent eval's), each prompt prefilled whole
    and from the cached prompt prefix, one after the other; measured through the backend's
    runner (the runtime's Module / session API with positions, as an app serving requests
    from a kept prefix calls it), so both figures share one path."""

    prefix_tokens: int
    prompt_tokens: Spread  # the prompts' token lengths
    whole_ttft_ms: Spread
    cached_ttft_ms: Spread
    ratio: float  # the median over prompts of cached / whole TTFT (each pair measured back to back)
    suffix_share: float  # the median over prompts of the tokens after the prefix / all: the ratio's floor
    same_first_token: int  # prompts whose first token is the same on both paths
    prefix_prefill_ms: float  # the prefix itself, once (an app pays it at start)


@dataclass(frozen=True, kw_only=True)
class BenchReport:
    artifact: str
    device: str
    runtime: str
    threads: int
    prefill: dict[str, PrefillCase]  # by requested prompt length
    decode_tok_s: Spread
    decode_tokens: int
    decode_cpu_s: Spread  # CPU time beside wall time: a busy neighbour shows as cpu/wall < threads
    decode_wall_s: Spread
    load_ms: float
    peak_rss_mb: float
    baseline_rss_mb: float
    artifact_mb: float
    bytes_per_decoded_token: int
    environment: dict[str, Any]
    prefill_tok_s: Spread  # at the longest prompt length
    ttft_ms: Spread
    device_facts: DeviceInfo | None = omitted_when_none()
    prefix_ttft: PrefixTTFT | None = omitted_when_none()  # when the artifact records a prompt prefix
    # The figures whose runs spread more than bench.UNSTABLE_RANGE apart, one sentence each: a
    # perf check must not compare such a median (bench.json before 2026-12-04 has none).
    unstable: tuple[str, ...] = ()
