"""Parity: does the artifact compute what the trained model computes?

Four checks, one report (docs/parity.md explains each):
- tokenizer: the shipped tokenizer, as the device runtime reads it, against the source one;
- lowering: artifact vs the quantized eager model (same math, tight thresholds);
- quality: artifact vs the float model (KL divergence, top-1 agreement, perplexity);
- greedy: free-running greedy generation of the artifact vs the float model.
Lowering and quality are teacher-forced: every runner gets the float model's greedy
tokens, so one early divergence does not compound.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from exporter.reports import (
    Compared,
    FloorSample,
    GreedyMetrics,
    LoweringMetrics,
    NoiseFloor,
    ParityReport,
    PrefixParity,
    QualityMetrics,
    TokenizerReport,
)
from exporter.runners import ChunkedRunner, PerturbedRunner, PrefixCachedRunner, Runner, SequenceScorer, greedy
from exporter.spec import ParitySpec
from exporter.stats import prompt_bootstrap


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass(frozen=True, kw_only=True)
class GateCheck:
    """One gate: the value seen, the limit it is held to (``at_least`` or at most), the verdict,
    and the sentence verify prints when it fails."""

    name: str
    value: float
    limit: float
    at_least: bool
    passed: bool
    message: str


def _gate(name: str, value: float, limit: float, at_least: bool, message: str) -> GateCheck:
    return GateCheck(name=name, value=float(value), limit=float(limit), at_least=at_least,
                     passed=value >= limit if at_least else value <= limit, message=message)


def teacher_forced_logits(runner: Runner, prompt: Sequence[int], continuation: Sequence[int]) -> np.ndarray:
    """Logits after the prompt and after each continuation token but the last: [len(cont), vocab].

    Eager runners score the whole sequence in one pass (``sequence_logits``); an artifact is
    fed one token at a time, its prefill and decode programs as the app runs them."""
    if isinstance(runner, SequenceScorer):
        tokens = list(prompt) + [int(token) for token in continuation[:-1]]
        return runner.sequence_logits(tokens)[len(prompt) - 1:]
    rows = [runner.prefill(list(prompt))]
    for i, token in enumerate(continuation[:-1]):
        rows.append(runner.decode(int(token), len(prompt) + i))
    return np.stack(rows)


def lowering_metrics(candidate: np.ndarray, reference: np.ndarray) -> LoweringMetrics:
    diff = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))
    num = (candidate * reference).sum(-1, dtype=np.float64)
    den = np.linalg.norm(candidate.astype(np.float64), axis=-1) * np.linalg.norm(reference.astype(np.float64), axis=-1)
    cosine = num / np.maximum(den, 1e-30)
    return LoweringMetrics(max_abs_diff=float(diff.max()), cosine_min=float(cosine.min()),
                           top1_agreement=float((candidate.argmax(-1) == reference.argmax(-1)).mean()),
                           positions=int(candidate.shape[0]))


def quality_metrics(candidate: np.ndarray, reference: np.ndarray, steps: int = 0) -> QualityMetrics:
    """``steps``: rows per prompt (prompt-major), when the rows are teacher-forced decode steps:
    then KL and top-1 are also given per step (the first row of a prompt is step 0)."""
    ref_lp, cand_lp = log_softmax(reference), log_softmax(candidate)
    kl = (np.exp(ref_lp) * (ref_lp - cand_lp)).sum(-1)  # KL(float || artifact), as llama.cpp reports
    agree = candidate.argmax(-1) == reference.argmax(-1)
    by_step = {}
    if steps and kl.shape[0] % steps == 0:
        prompts = kl.shape[0] // steps
        by_step = dict(kl_by_step=_rounded(kl.reshape(-1, steps).mean(0)),
                       top1_by_step=_rounded(agree.reshape(-1, steps).mean(0)), steps_per_prompt=steps,
                       top1_interval=_rounded(np.array(prompt_bootstrap(agree, prompts))),
                       kl_mean_interval=_rounded(np.array(prompt_bootstrap(kl, prompts))))
    return QualityMetrics(kl_mean=float(kl.mean()), kl_p99=float(np.percentile(kl, 99)), kl_max=float(kl.max()),
                          top1_agreement=float(agree.mean()), positions=int(candidate.shape[0]),
                          kl_by_position=_rounded(kl), **by_step)


def _rounded(values: np.ndarray) -> tuple[float, ...]:
    """Six significant digits: enough to plot, and parity.json stays readable."""
    return tuple(float(f"{v:.6g}") for v in values.astype(np.float64))


def perplexity(runner: Runner, tokens: Sequence[int]) -> float:
    """exp(mean NLL) of tokens[1:]: fed one at a time to an artifact (the programs return
    last-token logits), in one pass to an eager runner."""
    if isinstance(runner, SequenceScorer):
        log_probs = log_softmax(runner.sequence_logits(list(tokens[:-1])))
        return float(np.exp(-np.mean(log_probs[np.arange(len(tokens) - 1), list(tokens[1:])])))
    nll = []
    logits = runner.prefill([tokens[0]])
    for pos in range(1, len(tokens)):
        nll.append(-log_softmax(logits)[tokens[pos]])
        if pos < len(tokens) - 1:
            logits = runner.decode(int(tokens[pos]), pos)
    return float(np.exp(np.mean(nll)))


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b)) if len(a) != len(b) else len(a)


def check_parity(*, candidate: Runner, quantized_reference: Runner, float_reference: Runner,
                 prompts: Sequence[Sequence[int]], heldout: Sequence[int], tokenizer_report: TokenizerReport,
                 spec: ParitySpec, eos_ids: set[int], on_step: Callable[[str], None] = lambda s: None,
                 noise_references: Sequence[PerturbedRunner] = (),
                 host_candidate: Runner | None = None) -> ParityReport:
    """``noise_references``: the quantized reference slightly perturbed, each a different way
    (runners.PerturbedRunner); when given, their median distance from the reference is
    reported as the lowering noise floor (noise_floor). ``host_candidate``: the same artifact
    on the host, when ``candidate`` runs on a device: scored on the same tokens and reported as
    ``device_vs_host``."""
    cand_rows, quant_rows, float_rows, host_rows = [], [], [], []
    noise_rows: list[list[np.ndarray]] = [[] for _ in noise_references]
    greedy_exact, greedy_first, greedy_token_match = [], [], []
    for i, prompt in enumerate(prompts):
        on_step(f"prompt {i + 1}/{len(prompts)}")
        # The float model's greedy tokens (EOS not honoured) drive every teacher-forced run.
        # Its logits along the way are its teacher-forced ones for that continuation.
        # Enough of them for the greedy check too (a budget with fewer decode steps than
        # greedy tokens would otherwise compare a full greedy run with a shorter expectation).
        steps = spec.decode_steps + 1
        seen: list[np.ndarray] = []
        continuation = greedy(float_reference, list(prompt), max(steps, spec.greedy_tokens), eos_ids=set(),
                              logits_seen=seen)
        expected = _until_eos(continuation, eos_ids)[: spec.greedy_tokens]
        continuation, seen = continuation[:steps], seen[:steps]
        float_rows.append(np.stack(seen))
        quant_rows.append(teacher_forced_logits(quantized_reference, prompt, continuation))
        cand_rows.append(teacher_forced_logits(candidate, prompt, continuation))
        if host_candidate is not None:
            host_rows.append(teacher_forced_logits(host_candidate, prompt, continuation))
        for rows, noisy in zip(noise_rows, noise_references, strict=True):
            rows.append(teacher_forced_logits(noisy, prompt, continuation))
        produced = greedy(candidate, list(prompt), spec.greedy_tokens, eos_ids)
        greedy_exact.append(produced == expected)
        greedy_first.append(first_divergence(produced, expected))
        n = max(len(expected), len(produced), 1)
        greedy_token_match.append(sum(x == y for x, y in zip(produced, expected, strict=False)) / n)
    cand, quant, flt = (np.concatenate(rows) for rows in (cand_rows, quant_rows, float_rows))

    on_step("perplexity on the held-out text")
    lowering = lowering_metrics(cand, quant)
    if noise_rows:
        lowering = replace(lowering, noise_floor=noise_floor(
            [lowering_metrics(np.concatenate(rows), quant) for rows in noise_rows],
            [noisy.relative for noisy in noise_references], spec.lowering_noise_floor_factor))
    quality = replace(quality_metrics(cand, flt, steps=spec.decode_steps + 1),
                      ppl_reference=perplexity(float_reference, heldout),
                      ppl_candidate=perplexity(candidate, heldout), heldout_tokens=len(heldout))
    greedy_report = GreedyMetrics(exact_match_rate=float(np.mean(greedy_exact)),
                                  first_divergence_min=int(min(greedy_first)),
                                  token_match_rate=float(np.mean(greedy_token_match)),
                                  tokens_per_prompt=spec.greedy_tokens, prompts=len(prompts))
    failures = gate_failures(spec, lowering, quality, greedy_report, tokenizer_report)
    return ParityReport(passed=not failures, failures=tuple(failures), lowering=lowering, quality=quality,
                        greedy=greedy_report, tokenizer=tokenizer_report,
                        compared=Compared(candidate=candidate.name, lowering_reference=quantized_reference.name,
                                          quality_reference=float_reference.name, prompts=len(prompts),
                                          decode_steps=spec.decode_steps),
                        device_vs_host=lowering_metrics(cand, np.concatenate(host_rows)) if host_rows else None)


def prefix_parity(runner: ChunkedRunner, prefix: Sequence[int], prompts: Sequence[Sequence[int]],
                  steps: int) -> PrefixParity:
    """The cached-prefix path of ``runner`` against its whole-prompt path, on the prompts that
    start with ``prefix``: after each prompt and ``steps`` - 1 greedy tokens of the whole path.

    The whole prompts run first; then the prefix is prefilled once and every prompt is served
    from it in turn, as an app serves its requests, so a request that read another's leftover
    positions would show here."""
    cached = PrefixCachedRunner(runner, prefix)
    served = [list(p) for p in prompts if cached.starts_with_prefix(p)]
    whole_rows, continuations = [], []
    for prompt in served:
        seen: list[np.ndarray] = []
        continuations.append(greedy(runner, prompt, steps, eos_ids=set(), logits_seen=seen))
        whole_rows.append(np.stack(seen))
    cached.prefill_prefix()
    cached_rows = [teacher_forced_logits(cached, prompt, continuation)
                   for prompt, continuation in zip(served, continuations, strict=True)]
    if not served:
        metrics = LoweringMetrics(max_abs_diff=0.0, cosine_min=1.0, top1_agreement=1.0, positions=0)
    else:
        metrics = lowering_metrics(np.concatenate(cached_rows), np.concatenate(whole_rows))
    return PrefixParity(prefix_tokens=len(prefix), prompts=len(prompts), served=len(served), metrics=metrics)


def prefix_checks(spec: ParitySpec, lowering: LoweringMetrics, prefix: PrefixParity) -> list[GateCheck]:
    """The lowering gates (with the noise floor ``lowering`` measured) on the prefix path, and
    that any prompt was served from the prefix at all."""
    if prefix.prompts == 0:
        return [_gate("prefix.prompts", 0, 1, True,
                      "prefix: no behaviour prompt fits the artifact's KV cache, so the prompt prefix was not "
                      "checked; lower task.budget or export with a larger kv_cache.max_seq_len")]
    max_abs, cos_min, top1_min, floor_note = lowering_limits(spec, lowering)
    m = prefix.metrics
    return [
        _gate("prefix.served", prefix.served, 1, True,
              f"prefix: none of {prefix.prompts} behaviour prompts starts with the artifact's "
              f"{prefix.prefix_tokens}-token prompt prefix (task.cached_prefix)"),
        _gate("prefix.max_abs_diff", m.max_abs_diff, max_abs, False,
              f"prefix: max abs logit difference from the whole prompt {m.max_abs_diff:.3g} "
              f"exceeds {max_abs:.3g}{floor_note}"),
        _gate("prefix.cosine_min", m.cosine_min, cos_min, True,
              f"prefix: minimum cosine with the whole prompt {m.cosine_min:.6f} is below {cos_min:.6f}{floor_note}"),
        _gate("prefix.top1_agreement", m.top1_agreement, top1_min, True,
              f"prefix: top-1 agreement with the whole prompt {m.top1_agreement:.2%} is "
              f"below {top1_min:.2%}{floor_note}"),
    ]


def prefix_failures(spec: ParitySpec, lowering: LoweringMetrics, prefix: PrefixParity) -> list[str]:
    return [check.message for check in prefix_checks(spec, lowering, prefix) if not check.passed]


FLOOR_METRICS = ("max_abs_diff", "cosine_min", "top1_agreement")


def noise_floor(samples: Sequence[LoweringMetrics], perturbations: Sequence[float], factor: float) -> NoiseFloor:
    """The lowering noise floor: each metric's median over ``samples``, the reference against
    itself perturbed in different ways (each one's lowering_metrics).

    One perturbation is one draw, and draws differ enough that a gate scaled from a single
    one passed or failed the same artifact by luck (docs/parity.md). The median of three is
    steadier and still the reference's own rounding sensitivity."""
    floor = {metric: float(np.median([getattr(sample, metric) for sample in samples])) for metric in FLOOR_METRICS}
    return NoiseFloor(**floor, perturbations=tuple(perturbations), factor=factor,
                      samples=tuple(FloorSample(**{metric: getattr(sample, metric) for metric in FLOOR_METRICS})
                                    for sample in samples))


def _until_eos(tokens: Sequence[int], eos_ids: set[int]) -> list[int]:
    out = []
    for t in tokens:
        if t in eos_ids:
            break
        out.append(int(t))
    return out


def lowering_limits(spec: ParitySpec, lowering: LoweringMetrics) -> tuple[float, float, float, str]:
    """(max abs, min cosine, min top-1) the lowering gates apply, and how they were set.

    With a measured noise floor, each limit is the recipe's threshold or ``factor`` times the
    floor's deviation from the reference, whichever allows more: an artifact cannot be asked
    to agree with the reference better than the reference agrees with itself."""
    floor = lowering.noise_floor
    factor = spec.lowering_noise_floor_factor
    if floor is None or factor <= 0:
        return spec.lowering_max_abs_diff, spec.lowering_cosine_min, spec.lowering_top1_min, ""
    return (max(spec.lowering_max_abs_diff, factor * floor.max_abs_diff),
            min(spec.lowering_cosine_min, 1 - factor * (1 - floor.cosine_min)),
            min(spec.lowering_top1_min, 1 - factor * (1 - floor.top1_agreement)),
            f" (or {factor:g}x the reference's noise floor)")


def gate_checks(spec: ParitySpec, lowering: LoweringMetrics, quality: QualityMetrics, greedy_report: GreedyMetrics,
                tokenizer: TokenizerReport) -> list[GateCheck]:
    """Every gate of the lowering, quality, greedy and tokenizer checks, passed or not."""
    max_abs, cos_min, top1_min, floor_note = lowering_limits(spec, lowering)
    return [
        _gate("lowering.max_abs_diff", lowering.max_abs_diff, max_abs, False,
              f"lowering: max abs logit difference {lowering.max_abs_diff:.3g} exceeds {max_abs:.3g}, "
              f"parity.lowering_max_abs_diff {spec.lowering_max_abs_diff:g}{floor_note}"),
        _gate("lowering.cosine_min", lowering.cosine_min, cos_min, True,
              f"lowering: minimum cosine {lowering.cosine_min:.6f} is below {cos_min:.6f}, "
              f"parity.lowering_cosine_min {spec.lowering_cosine_min:g}{floor_note}"),
        _gate("lowering.top1_agreement", lowering.top1_agreement, top1_min, True,
              f"lowering: top-1 agreement {lowering.top1_agreement:.2%} is below {top1_min:.2%}, "
              f"parity.lowering_top1_min {spec.lowering_top1_min:.2%}{floor_note}"),
        _gate("quality.top1_agreement", quality.top1_agreement, spec.quality_top1_min, True,
              f"quality: top-1 agreement with the float model {quality.top1_agreement:.2%} "
              f"is below parity.quality_top1_min {spec.quality_top1_min:.2%}"),
        _gate("quality.kl_mean", quality.kl_mean, spec.quality_kl_mean_max, False,
              f"quality: mean KL divergence from the float model {quality.kl_mean:.4g} "
              f"exceeds parity.quality_kl_mean_max {spec.quality_kl_mean_max:g}"),
        _gate("greedy.exact_match_rate", greedy_report.exact_match_rate, spec.greedy_exact_match_min, True,
              f"greedy: exact-match rate {greedy_report.exact_match_rate:.2%} "
              f"is below parity.greedy_exact_match_min {spec.greedy_exact_match_min:.2%}"),
        _gate("tokenizer.mismatches", tokenizer.mismatches, 0, False,
              f"tokenizer: {tokenizer.mismatches} of {tokenizer.texts} texts encode or decode differently "
              "with the shipped tokenizer"),
    ]


def gate_failures(spec: ParitySpec, lowering: LoweringMetrics, quality: QualityMetrics, greedy_report: GreedyMetrics,
                  tokenizer: TokenizerReport) -> list[str]:
    """One sentence per failed gate, naming the threshold and the value seen."""
    return [check.message for check in gate_checks(spec, lowering, quality, greedy_report, tokenizer)
            if not check.passed]


def tokenizer_parity(source, shipped_encode: Callable[[str], list[int]], shipped_decode: Callable[[list[int]], str],
                     corpus: Sequence[str]) -> TokenizerReport:
    """Encode and decode every text with both tokenizers; any difference is a mismatch."""
    examples = []
    mismatches = 0
    for text in corpus:
        expected_ids = source.encode(text, add_special_tokens=False)
        got_ids = list(shipped_encode(text))
        expected_text = source.decode(expected_ids)
        got_text = shipped_decode(expected_ids)
        if got_ids != expected_ids or got_text != expected_text:
            mismatches += 1
            if len(examples) < 3:
                examples.append({"text": text, "source_ids": expected_ids[:32], "shipped_ids": got_ids[:32],
                                 "source_decoded": expected_text, "shipped_decoded": got_text})
    return TokenizerReport(texts=len(corpus), mismatches=mismatches, examples=tuple(examples))


# -- what verify feeds the gates ---------------------------------------------------------------

# The lowering noise floor scales the reference's embedding output by (1 + each): one to two
# float32 ulps either way, the size of the rounding differences between two correct
# implementations. Three draws, and the floor is their median (noise_floor says why).
NOISE_FLOOR_PERTURBATIONS = (1e-7, -1e-7, 2e-7)


def parity_prompts(tokenizer, spec: ParitySpec, max_seq_len: int) -> tuple[list[list[int]], list[int]]:
    """The behaviour prompts verify scores (cycled to ``spec.prompts``, cut to leave room for
    the decode steps) and the held-out text perplexity is measured on."""
    from exporter.prompts import BEHAVIOUR_PROMPTS, HELDOUT_TEXT

    room = max_seq_len - max(spec.decode_steps + 1, spec.greedy_tokens) - 1  # the longest run still fits
    texts = [BEHAVIOUR_PROMPTS[i % len(BEHAVIOUR_PROMPTS)] for i in range(spec.prompts)]
    prompts = [tokenizer.encode(text, add_special_tokens=False)[:room] for text in texts]
    heldout = tokenizer.encode(HELDOUT_TEXT, add_special_tokens=False)[: min(128, max_seq_len)]
    return prompts, heldout


def noise_references(lm, recipe) -> list[PerturbedRunner]:
    """Run-time activation quantization makes the reference sensitive to last-bit rounding:
    perturbed copies of it measure that noise floor, so the lowering gates can be judged
    against it (none for a recipe without dynamic activations, or with the factor at 0)."""
    dynamic = any(rule.quantizes_activations for rule in recipe.quant.rules)
    if not dynamic or recipe.parity.lowering_noise_floor_factor <= 0:
        return []
    return [PerturbedRunner(lm, relative, name=f"perturbed eager x (1 {relative:+g})")
            for relative in NOISE_FLOOR_PERTURBATIONS]
