"""The CLI at its boundary: what each command hands the pipeline, and how it renders what
comes back (exit codes, one-line errors, --json). The pipeline is replaced by recorders here;
the pipeline itself runs for real in the end-to-end tests."""

from __future__ import annotations

import json

import pytest

from exporter import pipeline
from exporter.errors import (
    ArtifactError,
    MissingDependencyError,
    ModelError,
    RecipeError,
    StageError,
    UnsupportedError,
    UsageError,
)
from exporter.reports import (
    BenchReport,
    Compared,
    GreedyMetrics,
    LoweringMetrics,
    ParityReport,
    PrefillCase,
    QualityMetrics,
    Spread,
    TokenizerReport,
)


def parity_report(passed: bool) -> ParityReport:
    return ParityReport(
        passed=passed,
        failures=() if passed else ("quality: top-1 agreement with the float model 80.00% is below 90%",),
        lowering=LoweringMetrics(max_abs_diff=1e-4, cosine_min=0.99999, top1_agreement=1.0, positions=264),
        quality=QualityMetrics(kl_mean=0.01, kl_p99=0.1, kl_max=0.2, top1_agreement=0.8, positions=264,
                               ppl_reference=10.0, ppl_candidate=10.5, heldout_tokens=128),
        greedy=GreedyMetrics(exact_match_rate=0.5, first_divergence_min=3, token_match_rate=0.7, tokens_per_prompt=32,
                             prompts=8),
        tokenizer=TokenizerReport(texts=18, mismatches=0, examples=()),
        compared=Compared(candidate="executorch", lowering_reference="q", quality_reference="f", prompts=8,
                          decode_steps=32, runtime="executorch 1.5.1 (XNNPACK)", artifact="a"),
    )


def bench_report() -> BenchReport:
    spread = Spread.of([10.0, 12.0, 11.0])
    return BenchReport(artifact="a", device="host (x86_64, 2 cores)", runtime="rt", threads=2,
                       prefill={"64": PrefillCase(prompt_tokens=64, prefill_tok_s=spread, ttft_ms=spread)},
                       decode_tok_s=spread, decode_tokens=127, decode_cpu_s=spread, decode_wall_s=spread, load_ms=5.0,
                       peak_rss_mb=100.0, baseline_rss_mb=50.0, artifact_mb=1.0, bytes_per_decoded_token=10,
                       environment={}, prefill_tok_s=spread, ttft_ms=spread)


class Calls(list):
    """(command, args, kwargs) of each pipeline call; ``install`` replaces a command by a recorder."""

    install = None


@pytest.fixture
def calls(monkeypatch):
    """Replace the pipeline's commands by recorders; returns the list of (command, args, kwargs)."""
    seen = Calls()

    def recorder(name, result):
        def fake(*args, **kwargs):
            seen.append((name, args, kwargs))
            if isinstance(result, Exception):
                raise result
            return result(*args, **kwargs) if callable(result) else result
        return fake

    def install(name, result):
        monkeypatch.setattr(pipeline, name, recorder(name, result))

    seen.install = install
    return seen


def test_export_hands_the_resolved_recipe_to_the_pipeline(cli, calls, tmp_path):
    calls.install("export", lambda recipe, *, out_dir, model, adapter, force, progress: out_dir)
    code, out, _ = cli("export", "smollm2-135m/onnx-int4", "--out", tmp_path / "a", "--model", "m.gguf", "--force",
                       "--adapter", "lora", "--set", "target.onnx.fuse_projections=false",
                       "--set", "quant.tuning.steps=0")
    assert code == 0 and f"wrote {tmp_path / 'a'}" in out
    (name, (recipe,), kwargs), = calls
    assert name == "export" and kwargs["model"] == "m.gguf" and kwargs["force"] is True and kwargs["adapter"] == "lora"
    assert recipe.target.name == "onnx" and recipe.target.options.fuse_projections is False
    assert recipe.quant.tuning.steps == 0


def test_export_default_out_is_named_after_the_recipe(cli, calls):
    calls.install("export", lambda recipe, *, out_dir, model, adapter, force, progress: out_dir)
    cli("export", "smollm2-135m/executorch-xnnpack-int4")
    assert str(calls[0][2]["out_dir"]) == "out/smollm2-135m-executorch-xnnpack-int4"


@pytest.mark.parametrize("error,code", [
    (UsageError("bad input", hint="do this"), 2), (ArtifactError("bad folder"), 2), (RecipeError("x: bad"), 3),
    (ModelError("pickle refused"), 4), (UnsupportedError("not here"), 5), (MissingDependencyError("no runtime"), 6),
    (StageError("stage lower failed", stage="lower"), 8),
])
def test_errors_are_one_line_and_their_exit_code(cli, calls, tmp_path, error, code):
    calls.install("export", error)
    exit_code, out, err = cli("export", "smollm2-135m/onnx-int4", "--out", tmp_path / "a")
    assert exit_code == code and out == ""
    lines = err.strip().splitlines()
    assert lines[0] == f"error: {error}" and len(lines) == (2 if error.hint else 1)
    if error.hint:
        assert lines[1] == f"hint: {error.hint}"


def test_a_bad_recipe_never_reaches_the_pipeline(cli, calls):
    calls.install("export", lambda *a, **k: None)
    code, _, err = cli("export", "smollm2-135m/onnx-int4", "--set", "target.onnx.opst=23")
    assert code == 3 and "target.onnx.opst: unknown key; did you mean 'opset'?" in err and calls == []


@pytest.mark.parametrize("passed,code", [(True, 0), (False, 1)])
def test_verify_exit_code_is_the_gate(cli, calls, tmp_path, passed, code):
    calls.install("verify", parity_report(passed))
    exit_code, out, _ = cli("verify", tmp_path, "--model", "m")
    assert exit_code == code
    assert calls[0][1] == (tmp_path,) and calls[0][2]["model"] == "m"
    assert ("PASS" in out) is passed and ("FAIL: quality: top-1 agreement" in out) is not passed
    assert "noise floor" not in out and "kl_mean" in out


def test_verify_json_is_the_report_record(cli, calls, tmp_path):
    from exporter.records import from_json, to_json

    report = parity_report(True)
    calls.install("verify", report)
    code, out, _ = cli("verify", tmp_path, "--json")
    assert code == 0 and json.loads(out) == to_json(report)
    assert from_json(ParityReport, json.loads(out)) == report


def test_bench_passes_overrides_and_renders_the_table(cli, calls, tmp_path):
    calls.install("bench", bench_report())
    code, out, _ = cli("bench", tmp_path, "--runs", "3", "--threads", "1")
    assert code == 0
    kwargs = calls[0][2]
    assert (kwargs["runs"], kwargs["warmup"], kwargs["threads"]) == (3, None, 1)
    assert "decode_tok_s (127 tok)" in out and "prefill_tok_s @64 tok" in out and "11.0" in out


def test_generate_prints_the_text(cli, calls, tmp_path):
    calls.install("generate", "无线耳机 降噪")
    code, out, _ = cli("generate", tmp_path, "--prompt", "p", "--max-new-tokens", "5")
    assert code == 0 and out.strip() == "无线耳机 降噪" and calls[0][2] == {"max_new_tokens": 5, "behaviours": ()}
    code, _, _ = cli("generate", tmp_path, "-b", "search:耳机", "-b", "click:降噪耳机")
    assert code == 0 and calls[1][2]["behaviours"] == ["search:耳机", "click:降噪耳机"]


def test_recipes_list_and_show(cli):
    code, out, _ = cli("recipes", "list")
    assert code == 0 and "smollm2-135m/onnx-int4" in out
    code, out, _ = cli("recipes", "show", "smollm2-135m/onnx-int4", "--set", "target.onnx.opset=23")
    shown = json.loads(out)
    assert code == 0 and shown["target"] == {"name": "onnx", "onnx": {"opset": 23, "fuse_projections": True}}
