"""bench flags a figure whose runs spread too far apart to compare (issue 20: the same .pte
gave 167 and 318 decode tok/s a minute apart)."""

from __future__ import annotations

from exporter.bench import UNSTABLE_RANGE, unstable_figures
from exporter.reports import Spread


def test_runs_far_apart_are_flagged_with_their_range():
    (sentence,) = unstable_figures({"decode_tok_s": Spread.of([167.0, 318.0, 300.0]),
                                    "ttft_ms": Spread.of([10.0, 10.2, 10.1])})
    assert sentence.startswith("decode_tok_s: runs 167 to 318") and "3 runs" in sentence


def test_steady_runs_and_single_runs_are_not_flagged():
    steady = Spread.of([300.0, 300.0 * (1 + UNSTABLE_RANGE * 0.9)])
    assert unstable_figures({"decode_tok_s": steady, "prefill_tok_s": Spread.of([5.0])}) == ()


def test_a_bench_json_before_the_flag_still_reads():
    from exporter.records import from_json, to_json
    from exporter.reports import BenchReport

    spread = to_json(Spread.of([1.0, 2.0]))
    old = {"artifact": "a", "device": "host", "runtime": "r", "threads": 2, "prefill": {}, "decode_tok_s": spread,
           "decode_tokens": 8, "decode_cpu_s": spread, "decode_wall_s": spread, "load_ms": 1.0, "peak_rss_mb": 1.0,
           "baseline_rss_mb": 1.0, "artifact_mb": 1.0, "bytes_per_decoded_token": 1, "environment": {},
           "prefill_tok_s": spread, "ttft_ms": spread}
    assert from_json(BenchReport, old).unstable == ()
