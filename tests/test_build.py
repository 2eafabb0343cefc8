"""`recgpt-export build`: a tiny release matrix on every target, on the real runtimes.

One build of three artifacts (ExecuTorch, ONNX, Core ML) is shared by the module; the other
tests rebuild, shard, merge, check and break it."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

TINY = ['"kv_cache.max_seq_len=128"', '"kv_cache.max_prefill_len=32"', '"bench.prompt_lengths=[16, 32]"',
        '"bench.decode_tokens=24"', '"bench.runs=2"', '"bench.warmup=1"']
RECIPES = ('"executorch/int8"', '"onnx/fp32"', '"coreml/int8"')


def write_matrix(path: Path, checkpoint: Path, *, recipes=RECIPES, extra_set=(), extra: str = "") -> Path:
    path.write_text(f"""
schema_version = 1
recipes = [{", ".join(recipes)}]
set = [{", ".join([*TINY, *extra_set])}]
{extra}
[verify]
prompts = 2
decode_steps = 6
greedy_tokens = 6
[[models]]
name = "tiny"
source = "{checkpoint}"
""", encoding="utf-8")
    return path


def artifact_files(dist: Path) -> dict[str, dict]:
    return {e["id"]: e["files"] for e in json.loads((dist / "index.json").read_text())["artifacts"]}


@pytest.fixture(scope="module")
def release(tiny_checkpoints, tmp_path_factory):
    from typer.testing import CliRunner

    from exporter.cli import app

    root = tmp_path_factory.mktemp("release")
    matrix = write_matrix(root / "release.toml", tiny_checkpoints["qwen3"])
    result = CliRunner().invoke(app, ["build", str(matrix), "--out", str(root / "dist")], catch_exceptions=False)
    assert result.exit_code == 0, result.stdout + result.stderr
    return root, matrix, result


def test_build_writes_every_artifact_and_the_index(release):
    root, _, result = release
    dist = root / "dist"
    index = json.loads((dist / "index.json").read_text())
    assert index["result"] == "passed"
    ids = [e["id"] for e in index["artifacts"]]
    assert ids == ["tiny--coreml-int8", "tiny--executorch-int8", "tiny--onnx-fp32"]
    for entry in index["artifacts"]:
        folder = dist / entry["id"]
        assert {"manifest.json", "parity.json", "bench.json", "build.json", "export.json"} <= \
            {p.name for p in folder.iterdir()}
        assert "manifest.json" in entry["files"] and entry["bytes"] == sum(f["bytes"] for f in entry["files"].values())
        names = {g["name"] for g in entry["gates"]}
        assert {"lowering.max_abs_diff", "quality.kl_mean", "greedy.exact_match_rate", "tokenizer.mismatches"} <= names
        assert all(g["passed"] for g in entry["gates"])
        assert entry["figures"]["decode_tok_s"] > 0 and entry["figures"]["kl_mean"] >= 0
        assert entry["environment"]["packages"]["recgpt-export"]
    # one line per artifact and stage, a bar, and the summary table
    assert "tiny--onnx-fp32 export: lower" in result.stderr
    assert "[##############################] 3/3" in result.stderr
    assert "build: 3 artifacts, passed" in result.stdout


def test_report_html_is_one_page_with_the_table_and_every_plot(release):
    page = (release[0] / "dist" / "report.html").read_text()
    assert '<table id="artifacts">' in page and page.count("<tr>") == 4
    for plot in ("kl-per-step", "top1-per-step", "kl-distribution", "throughput", "size-quality"):
        assert f'id="plot-{plot}"><svg' in page
    assert "<script" not in page and not re.search(r'(src|href)="https?:', page)  # nothing fetched at view time


def test_a_second_build_keeps_what_is_up_to_date(release, cli):
    root, matrix, _ = release
    before = {p: p.stat().st_mtime_ns for p in (root / "dist").rglob("manifest.json")}
    t0 = time.perf_counter()
    code, _, err = cli("build", matrix, "--out", root / "dist")
    assert code == 0 and err.count("up to date") == 3
    assert time.perf_counter() - t0 < 30
    assert before == {p: p.stat().st_mtime_ns for p in (root / "dist").rglob("manifest.json")}


def test_an_interrupted_build_resumes_with_what_did_not_finish(release, cli, tmp_path):
    """An artifact without build.json (the build stopped before its end) is built again; the
    finished ones are kept."""
    import shutil

    root, matrix, _ = release
    dist = tmp_path / "dist"
    shutil.copytree(root / "dist", dist)
    (dist / "tiny--onnx-fp32" / "build.json").unlink()
    code, _, err = cli("build", matrix, "--out", dist)
    assert code == 0 and err.count("up to date") == 2 and "tiny--onnx-fp32 export: lower" in err
    assert artifact_files(dist) == artifact_files(root / "dist")


def test_the_same_matrix_built_again_elsewhere_has_the_same_bytes(release, cli, tmp_path):
    """Every file of every artifact, on each target, in another folder and at another time."""
    root, matrix, _ = release
    code, _, _ = cli("build", matrix, "--out", tmp_path / "again")
    assert code == 0
    first, second = artifact_files(root / "dist"), artifact_files(tmp_path / "again")
    assert first == second
    assert any(name.startswith("model.mlpackage/") for name in first["tiny--coreml-int8"])


def test_check_rebuilds_an_artifact_and_finds_the_published_hashes(release, cli):
    root = release[0]
    code, out, _ = cli("build", "--check", root / "dist", "--artifact", "tiny--coreml-int8")
    assert code == 0 and "identical" in out
    assert not list((root / "dist").glob(".check-*"))  # the rebuild is not left behind


def test_check_names_the_file_that_differs(release, cli, tmp_path):
    import shutil

    dist = tmp_path / "dist"
    shutil.copytree(release[0] / "dist", dist)
    index = json.loads((dist / "index.json").read_text())
    index["artifacts"][1]["files"]["tokenizer.json"]["sha256"] = "0" * 64
    (dist / "index.json").write_text(json.dumps(index))
    code, out, _ = cli("build", "--check", dist, "--artifact", "tiny--executorch-int8")
    assert code == 1 and "tokenizer.json" in out


def test_shards_cover_the_matrix_and_merge_to_the_whole(release, cli, tmp_path):
    root, matrix, _ = release
    for i in (1, 2):
        code, _, _ = cli("build", matrix, "--out", tmp_path / f"shard-{i}", "--shard", f"{i}/2")
        assert code == 0
    one, two = artifact_files(tmp_path / "shard-1"), artifact_files(tmp_path / "shard-2")
    assert set(one).isdisjoint(two) and len(one) + len(two) == 3
    code, _, _ = cli("build", "merge", tmp_path / "shard-1", tmp_path / "shard-2", "--out", tmp_path / "merged")
    assert code == 0
    assert artifact_files(tmp_path / "merged") == artifact_files(root / "dist")
    assert (tmp_path / "merged" / "report.html").is_file()


def test_merge_refuses_one_id_with_two_contents(release, cli, tmp_path):
    import shutil

    for name in ("a", "b"):
        shutil.copytree(release[0] / "dist", tmp_path / name)
    index = json.loads((tmp_path / "b" / "index.json").read_text())
    index["artifacts"][0]["build_key"] = "f" * 64
    (tmp_path / "b" / "index.json").write_text(json.dumps(index))
    code, _, err = cli("build", "merge", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "merged")
    assert code == 2 and "different contents" in err
    assert not (tmp_path / "merged").exists()


def test_a_failed_gate_fails_the_build_and_the_others_are_reported(tiny_checkpoints, cli, tmp_path):
    strict = (Path(__file__).parent.parent / "recipes/onnx/fp32.toml").read_text(encoding="utf-8")
    strict = strict.replace('name = "onnx-fp32"', 'name = "onnx-fp32-strict"')
    (tmp_path / "strict.toml").write_text(strict.replace("quality_kl_mean_max = 1e-4", "quality_kl_mean_max = 0.0"))
    matrix = write_matrix(tmp_path / "m.toml", tiny_checkpoints["qwen3"], recipes=('"onnx/fp32"', '"strict.toml"'),
                          extra="bench = false")
    code, out, _ = cli("build", matrix, "--out", tmp_path / "dist")
    assert code == 1
    entries = {e["id"]: e for e in json.loads((tmp_path / "dist/index.json").read_text())["artifacts"]}
    assert entries["tiny--onnx-fp32"]["result"] == "passed"
    assert entries["tiny--onnx-fp32-strict"]["result"] == "failed"
    failed = [g["name"] for g in entries["tiny--onnx-fp32-strict"]["gates"] if not g["passed"]]
    assert failed == ["quality.kl_mean"]
    assert "FAIL tiny--onnx-fp32-strict: parity.json: quality: mean KL divergence" in out


def test_a_stage_error_in_one_artifact_keeps_the_others(tiny_checkpoints, cli, tmp_path):
    """A device that cannot be reached (nothing listens on port 1) fails each artifact's device
    stage: exit 8, and the host's reports and the other artifacts are kept."""
    matrix = write_matrix(tmp_path / "m.toml", tiny_checkpoints["qwen3"], recipes=('"onnx/fp32"', '"onnx/int8"'),
                          extra='bench = false\ndevices = ["ssh://nobody@127.0.0.1:1"]')
    code, out, _ = cli("build", matrix, "--out", tmp_path / "dist")
    assert code == 8
    entries = json.loads((tmp_path / "dist/index.json").read_text())["artifacts"]
    assert len(entries) == 2
    for entry in entries:
        assert entry["result"] == "error" and entry["stage"] == "verify ssh://nobody@127.0.0.1:1"
        assert entry["reports"] == ["parity.json"] and (tmp_path / "dist" / entry["id"] / "parity.json").is_file()
    assert "ERROR tiny--onnx-fp32 at verify ssh://nobody@127.0.0.1:1" in out


def test_a_device_not_set_up_is_refused_before_any_work(tiny_checkpoints, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("RECGPT_DEVICES_DIR", str(tmp_path / "no-devices"))
    matrix = write_matrix(tmp_path / "m.toml", tiny_checkpoints["qwen3"], recipes=('"onnx/fp32"',),
                          extra='devices = ["arm64-emu"]')
    code, _, err = cli("build", matrix, "--out", tmp_path / "dist")
    assert code == 2 and "arm64-emu" in err and not (tmp_path / "dist").exists()


@pytest.mark.parametrize("body, code, message", [
    ('schema_version = 1\nrecipes = ["onnx/fp32"]\nrecipe = []\n[[models]]\nname = "m"\nsource = "{ckpt}"\n',
     3, "recipe: unknown key; did you mean 'recipes'?"),
    ('schema_version = 1\nrecipes = ["onnx/fp3"]\n[[models]]\nname = "m"\nsource = "{ckpt}"\n',
     2, "recipe 'onnx/fp3' not found"),
    ('schema_version = 1\nrecipes = ["onnx/fp32"]\n[[models]]\nname = "m"\nsource = "/nowhere"\n',
     2, "model '/nowhere' does not exist"),
    ('schema_version = 1\nrecipes = ["onnx/fp32"]\n[[models]]\nname = "Big Model"\nsource = "{ckpt}"\n',
     3, "must be lowercase"),
    ('schema_version = 1\nrecipes = ["onnx/fp32"]\nset = ["kv_cache.dtype=int8"]\n[[models]]\nname = "m"\n'
     'source = "{ckpt}"\n[[models]]\nname = "m"\nsource = "{ckpt}"\n', 3, "used twice"),
    ('schema_version = 1\nrecipes = ["coreml/int8"]\nset = ["kv_cache.dtype=int8"]\n[[models]]\nname = "m"\n'
     'source = "{ckpt}"\n', 5, "kv_cache.dtype"),
    ('schema_version = 1\nrecipes = ["onnx/fp32"]\ndevices = ["phone"]\n[[models]]\nname = "m"\nsource = "{ckpt}"\n',
     2, "unknown device 'phone'"),
])
def test_a_bad_matrix_is_refused_before_any_work(tiny_checkpoints, cli, tmp_path, body, code, message):
    matrix = tmp_path / "m.toml"
    matrix.write_text(body.replace("{ckpt}", str(tiny_checkpoints["qwen3"])), encoding="utf-8")
    got, _, err = cli("build", matrix, "--out", tmp_path / "dist")
    assert got == code and message in err, err
    assert not (tmp_path / "dist").exists()


def test_jobs_that_would_not_fit_are_refused(tiny_checkpoints, cli, tmp_path):
    matrix = write_matrix(tmp_path / "m.toml", tiny_checkpoints["qwen3"], recipes=('"onnx/fp32"', '"onnx/int8"'))
    code, _, err = cli("build", matrix, "--out", tmp_path / "dist", "--jobs", "100")
    assert code == 2 and "--jobs 100 will not fit" in err and "GiB" in err


def test_most_jobs_counts_the_largest_exports_first():
    from exporter.build.resources import GIB, export_need, most_jobs, parameters_of

    small, large = export_need("s", 10**6, tuned=False), export_need("l", 600 * 10**6, tuned=True)
    assert most_jobs([small, large], large.bytes + small.bytes) == 2
    assert most_jobs([small, large], large.bytes) == 1
    assert most_jobs([large], GIB) == 1  # one always runs

    class Qwen3Shape:  # Qwen3-0.6B's config
        hidden_size, num_hidden_layers, vocab_size, num_attention_heads = 1024, 28, 151936, 16
        num_key_value_heads, head_dim, intermediate_size, tie_word_embeddings = 8, 128, 3072, True

    assert 590e6 < parameters_of(Qwen3Shape) < 610e6  # 596M as the checkpoint counts it


def test_jobs_two_builds_the_same_bytes_in_workers(release, cli, tmp_path):
    root, matrix, _ = release
    code, _, err = cli("build", matrix, "--out", tmp_path / "parallel", "--jobs", "2")
    assert code == 0, err
    assert artifact_files(tmp_path / "parallel") == artifact_files(root / "dist")
