"""Lowering gates against the reference's own noise floor (dynamic-activation recipes)."""

from __future__ import annotations

import numpy as np

from exporter.backends.executorch.quantizer import apply_quantization, materialize_for_eager
from exporter.decoder import build_decoder
from exporter.kv_cache import load_custom_ops
from exporter.load import load_model
from exporter.parity import gate_failures, log_softmax, lowering_limits, noise_floor, perplexity, teacher_forced_logits
from exporter.reports import GreedyMetrics, LoweringMetrics, NoiseFloor, QualityMetrics, TokenizerReport
from exporter.runners import EagerRunner, PerturbedRunner, TransformersRunner, greedy
from exporter.spec import ParitySpec, QuantRule, QuantSpec

QUALITY = QualityMetrics(top1_agreement=1.0, kl_mean=0.0, kl_p99=0.0, kl_max=0.0, positions=264)
GREEDY = GreedyMetrics(exact_match_rate=1.0, first_divergence_min=32, token_match_rate=1.0, tokens_per_prompt=32,
                       prompts=8)
TOKENIZER = TokenizerReport(mismatches=0, texts=1, examples=())


def _lowering(max_abs, cos, top1, floor=None):
    noise = None
    if floor:
        noise = NoiseFloor(max_abs_diff=floor[0], cosine_min=floor[1], top1_agreement=floor[2],
                           perturbations=(1e-7,), factor=2.0, samples=())
    return LoweringMetrics(max_abs_diff=max_abs, cosine_min=cos, top1_agreement=top1, positions=264, noise_floor=noise)


def test_without_a_floor_the_recipe_thresholds_apply():
    failures = gate_failures(ParitySpec(), _lowering(2.1, 0.98, 0.96), QUALITY, GREEDY, TOKENIZER)
    assert len(failures) == 3 and all(f.startswith("lowering:") for f in failures)


def test_the_floor_allows_twice_its_deviation_and_no_more():
    # SmolLM2 int4 (measured): artifact vs reference 2.15 / 0.9818 / 96.2%; the reference
    # against itself with its embedding output scaled by (1 + 1e-7): 1.92 / 0.9726 / 96.6%.
    floor = (1.92, 0.9726, 0.966)
    assert gate_failures(ParitySpec(), _lowering(2.15, 0.9818, 0.962, floor), QUALITY, GREEDY, TOKENIZER) == []
    assert np.allclose(lowering_limits(ParitySpec(), _lowering(0, 1, 1, floor))[:3], (3.84, 0.9452, 0.932))
    failures = gate_failures(ParitySpec(), _lowering(4.0, 0.94, 0.92, floor), QUALITY, GREEDY, TOKENIZER)
    assert len(failures) == 3 and "noise floor" in failures[0]
    # The floor never tightens a recipe's own threshold, and factor 0 turns it off.
    assert lowering_limits(ParitySpec(), _lowering(0, 1, 1, (1e-6, 1.0, 1.0)))[:3] == (1e-3, 0.9999, 1.0)
    off = ParitySpec(lowering_noise_floor_factor=0)
    assert len(gate_failures(off, _lowering(2.15, 0.9818, 0.962, floor), QUALITY, GREEDY, TOKENIZER)) == 3


def test_perturbation_moves_float_models_by_rounding_only(tiny_checkpoints):
    # The floor is real only for run-time activation quantization: a float decoder moves at
    # rounding level, the same decoder with dynamic int8 activations moves more.
    load_custom_ops()
    loaded = load_model(tiny_checkpoints["llama"])
    prompt, continuation = [5, 17, 33, 60, 100, 7], [9, 12, 250, 31, 2, 44, 8, 3, 90]
    moved = {}
    for name, rules in (("float", ()), ("8da8w", (QuantRule(match="model.layers.*", kind="linear",
                                                          scheme="int8_dynact_int8_weight"),))):
        lm = build_decoder(loaded.model, max_seq_len=32, max_prefill_len=16)
        apply_quantization(lm, QuantSpec(rules=rules))
        materialize_for_eager(lm)
        base = teacher_forced_logits(EagerRunner(lm), prompt, continuation)
        # 1e-4 rather than verify's 1e-7: the tiny model has too few activations for a
        # 1e-7 nudge to cross a rounding boundary in a handful of steps.
        nudged = teacher_forced_logits(PerturbedRunner(lm, 1e-4), prompt, continuation)
        moved[name] = float(np.abs(nudged - base).max())
    # Measured: float 1.9e-4 (the nudge itself, passed through), 8da8w 3.0e-2.
    assert moved["8da8w"] > 10 * moved["float"], moved


def test_the_floor_is_each_metrics_median_over_its_draws():
    # One draw far from the others (a perturbation that happened to flip many codes) moves
    # the floor no more than the middle draw allows.
    draws = [LoweringMetrics(max_abs_diff=1.1, cosine_min=0.9975, top1_agreement=0.992, positions=264),
             LoweringMetrics(max_abs_diff=2.9, cosine_min=0.9929, top1_agreement=0.970, positions=264),
             LoweringMetrics(max_abs_diff=1.4, cosine_min=0.9951, top1_agreement=0.985, positions=264)]
    floor = noise_floor(draws, [1e-7, -1e-7, 2e-7], 2.0)
    assert (floor.max_abs_diff, floor.cosine_min, floor.top1_agreement) == (1.4, 0.9951, 0.985)
    assert [(s.max_abs_diff, s.cosine_min, s.top1_agreement) for s in floor.samples] == \
        [(d.max_abs_diff, d.cosine_min, d.top1_agreement) for d in draws]
    assert floor.perturbations == (1e-7, -1e-7, 2e-7)
    limits = lowering_limits(ParitySpec(), _lowering(0, 1, 1, (floor.max_abs_diff, floor.cosine_min,
                                                                floor.top1_agreement)))[:3]
    assert np.allclose(limits, (2.8, 0.9902, 0.97))


def _token_by_token(runner, tokens):
    """Logits after each token, one decode step at a time (how an artifact is scored)."""
    rows = [runner.prefill(tokens[:1])]
    rows += [runner.decode(token, pos) for pos, token in enumerate(tokens[1:], start=1)]
    return np.stack(rows)


def test_eager_runners_score_a_sequence_in_one_pass_as_they_decode_it(tiny_checkpoints):
    # parity scores the eager references with sequence_logits (one pass) and the artifact
    # token by token: the two must be the same math. 21 tokens over a prefill of 8 also
    # crosses two chunk boundaries.
    load_custom_ops()
    loaded = load_model(tiny_checkpoints["qwen3"])
    tokens = [5, 17, 33, 60, 100, 7, 9, 12, 250, 31, 2, 44, 8, 3, 90, 61, 18, 200, 4, 77, 15]
    lm = build_decoder(loaded.model, max_seq_len=32, max_prefill_len=8)
    for runner in (EagerRunner(lm), PerturbedRunner(lm, 1e-4), TransformersRunner(loaded.model)):
        one_pass = runner.sequence_logits(tokens)
        stepped = _token_by_token(runner, tokens)
        assert one_pass.shape == stepped.shape == (len(tokens), loaded.model.config.vocab_size)
        np.testing.assert_allclose(one_pass, stepped, rtol=0, atol=2e-5, err_msg=runner.name)
        # perplexity takes the one-pass route for these runners: the same value.
        nll = -log_softmax(stepped[:-1])[np.arange(len(tokens) - 1), tokens[1:]]
        assert abs(perplexity(runner, tokens) - float(np.exp(nll.mean()))) < 1e-4
    # The perturbation reaches the one-pass route too.
    assert np.abs(PerturbedRunner(lm, 1e-4).sequence_logits(tokens)
                  - EagerRunner(lm).sequence_logits(tokens)).max() > 0


def test_greedy_logits_are_the_teacher_forced_logits_of_its_tokens(tiny_checkpoints):
    # parity takes the float model's teacher-forced rows from its own greedy run.
    loaded = load_model(tiny_checkpoints["llama"])
    runner, prompt, seen = TransformersRunner(loaded.model), [5, 17, 33, 60], []
    continuation = greedy(runner, prompt, 9, eos_ids=set(), logits_seen=seen)
    assert len(continuation) == len(seen) == 9
    np.testing.assert_allclose(np.stack(seen), teacher_forced_logits(runner, prompt, continuation), rtol=0, atol=2e-5)


def test_quality_intervals_resample_whole_prompts():
    """A rate over positions that move together per prompt: the interval comes from the
    prompts, not from the count of positions (a binomial interval would be far too narrow)."""
    import numpy as np

    from exporter.parity import quality_metrics
    from exporter.stats import prompt_bootstrap

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(8 * 33, 16))
    candidate = reference.copy()
    candidate[:33] = rng.normal(size=(33, 16))  # the first prompt disagrees everywhere, the other 7 agree
    metrics = quality_metrics(candidate, reference, steps=33)
    low, high = metrics.top1_interval
    assert low <= metrics.top1_agreement <= high
    assert high - low > 0.2  # 1 prompt of 8 decides it; a Wilson interval on 264 positions would be ~0.08 wide
    assert metrics.kl_mean_interval[0] <= metrics.kl_mean <= metrics.kl_mean_interval[1]
    assert prompt_bootstrap(np.ones(40), 4) == (1.0, 1.0)  # every prompt alike: no spread to report
    assert prompt_bootstrap(np.arange(40.0), 4) == prompt_bootstrap(np.arange(40.0), 4)  # seeded
