"""The cached prompt prefix: what it is for a prompt format, how each target records it, and
the cached path against the whole prompt on every target's real runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_recipe

from exporter.intent.evalset import read_eval_set
from exporter.intent.prompt import PromptFormat, behaviour_prompt_ids, build_prompt, encoder, fixed_prefix_ids
from exporter.intent.sessions import generate
from exporter.spec import TaskSpec

TEMPLATE = "你是购物助手。根据行为预测搜索。\\n行为：\\n{behaviours}\\n查询："
TASK = f'[task]\ntemplate = "{TEMPLATE}"\nbudget = 96\n'
TOLERANCE = {"coreml": 5e-2}  # fp16 compute


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoints):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoints["qwen3"])


def test_the_auto_prefix_is_what_every_prompt_starts_with(tokenizer):
    task = TaskSpec(template=TEMPLATE.replace("\\n", "\n"), budget=96)
    prefix = fixed_prefix_ids("auto", PromptFormat.of(task), encode=encoder(tokenizer), apply_chat_template=None)
    instruction = encoder(tokenizer)("你是购物助手。根据行为预测搜索。\n行为：")
    assert prefix[:len(instruction)] == instruction and len(prefix) <= len(instruction) + 2
    prompts = behaviour_prompt_ids(list(generate(3, 40)), task, tokenizer)
    assert all(p[:len(prefix)] == prefix and len(p) > len(prefix) for p in prompts)
    assert fixed_prefix_ids("off", PromptFormat.of(task), encode=encoder(tokenizer), apply_chat_template=None) == []
    literal = fixed_prefix_ids("你是购物助手。", PromptFormat.of(task), encode=encoder(tokenizer),
                               apply_chat_template=None)
    assert literal == encoder(tokenizer)("你是购物助手。")
    # The chat format of a tokenizer without a chat template has no prefix to keep.
    assert fixed_prefix_ids("auto", PromptFormat(), encode=encoder(tokenizer), apply_chat_template=None) == []


def test_the_chat_prefix_ends_before_the_first_behaviour_line():
    """On a real chat template (SmolLM2's, stored with the builtin intent eval's format)."""
    from exporter.intent.prompt import CHAT, render

    def template(messages, tokenize, add_generation_prompt):
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
            "<|im_start|>assistant\n"

    encode = list  # one id per character: the boundary is exact
    ids = fixed_prefix_ids("auto", PromptFormat(template=CHAT), encode=lambda t: [ord(c) for c in encode(t)],
                           apply_chat_template=template)
    text = "".join(chr(i) for i in ids)
    assert text.startswith("<|im_start|>system\n你是购物助手") and text.endswith("（从旧到新）：\n[")
    session = read_eval_set("builtin")[0]
    prompt, _ = build_prompt(session, PromptFormat(), encode=lambda t: list(t), apply_chat_template=template)
    assert render([], "", PromptFormat(), template) != prompt and prompt.startswith(text)


def test_a_prompt_without_the_prefix_is_prefilled_whole(tiny_checkpoints, tmp_path):
    from exporter.backends import get_backend
    from exporter.load import load_model
    from exporter.quant.apply import float_decoder
    from exporter.recipe_io import load_recipe
    from exporter.runners import EagerRunner, PrefixCachedRunner

    recipe = load_recipe(write_recipe(tmp_path / "r.toml", "prefix-eager"))
    lm = float_decoder(load_model(tiny_checkpoints["llama"]).model, recipe, get_backend(recipe.target.name))
    whole, cached = EagerRunner(lm), PrefixCachedRunner(EagerRunner(lm), [5, 6, 7])
    for prompt in ([5, 6, 7, 20, 21], [9, 6, 7, 20], [5, 6, 7, 30, 31, 32], [5, 6, 7]):
        np.testing.assert_allclose(cached.prefill(prompt), whole.prefill(prompt), rtol=0, atol=1e-4)
        np.testing.assert_allclose(cached.decode(40, len(prompt)), whole.decode(40, len(prompt)), rtol=0, atol=1e-4)
    # served: the two prompts longer than the prefix that start with it; the others whole.
    assert (cached.served, cached.whole) == (2, 2)


@pytest.fixture(scope="module", params=["executorch", "onnx", "coreml"])
def prefixed_artifact(request, tiny_checkpoints, tmp_path_factory):
    from exporter.pipeline import export
    from exporter.recipe_io import load_recipe

    target = request.param
    root = tmp_path_factory.mktemp(f"prefix-{target}")
    recipe = load_recipe(write_recipe(root / "r.toml", f"prefix-{target}", f'[target]\nname = "{target}"\n' + TASK))
    return target, export(recipe, out_dir=root / "art", model=str(tiny_checkpoints["qwen3"]))


def recorded_prefix(target: str, folder) -> list[int]:
    """The prefix as the target's own program metadata carries it."""
    if target == "executorch":
        from exporter.backends.executorch.runtime import ExecuTorchRunner

        method = ExecuTorchRunner(folder / "model.pte", 32, 128).program.load_method("get_prompt_prefix")
        return [int(v) for v in method.execute([])]
    if target == "onnx":
        import onnx

        model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}
    else:
        import coremltools as ct

        props = dict(ct.utils.load_spec(str(folder / "model.mlpackage")).description.metadata.userDefined)
    return [int(t) for t in props["recgpt.prompt_prefix_ids"].split(",")]


def test_every_target_records_the_prefix_and_serves_prompts_from_it(prefixed_artifact, tokenizer):
    """The manifest and the program's own metadata name the same prefix; the artifact's
    runner fed from the cached prefix gives the whole prompt's logits on its real runtime."""
    from exporter.artifact import read_artifact
    from exporter.backends import get_backend
    from exporter.parity import prefix_parity

    target, folder = prefixed_artifact
    artifact = read_artifact(folder)
    prefix = list(artifact.manifest.model.prompt_prefix_ids)
    assert prefix and recorded_prefix(target, folder) == prefix
    prompts = behaviour_prompt_ids(read_eval_set("builtin")[:3], TaskSpec(template=TEMPLATE.replace("\\n", "\n"),
                                                                          budget=96), tokenizer, fits=120)
    report = prefix_parity(get_backend(target).load_runner(artifact), prefix, prompts, steps=3)
    assert report.served == 3 and report.metrics.positions == 9
    assert report.metrics.max_abs_diff <= TOLERANCE.get(target, 1e-4) and report.metrics.top1_agreement == 1.0


@pytest.mark.parametrize("prefixed_artifact", ["executorch"], indirect=True)  # the commands: one target is enough
def test_verify_and_bench_report_the_prefix(prefixed_artifact, cli):
    _, folder = prefixed_artifact
    code, out, err = cli("verify", folder, "--prompts", "2", "--decode-steps", "4")
    assert code == 0, out + err
    prefix = json.loads((folder / "parity.json").read_text())["prefix"]
    assert prefix["served"] == prefix["prompts"] == 2 and prefix["metrics"]["max_abs_diff"] < 1e-4
    assert "prompts served from it" in out
    code, out, err = cli("bench", folder, "--runs", "1", "--warmup", "0")
    assert code == 0, out + err
    ttft = json.loads((folder / "bench.json").read_text())["prefix_ttft"]
    assert 0 < ttft["whole_ttft_ms"]["runs"] == ttft["same_first_token"] <= 16
    assert ttft["prefix_tokens"] == prefix["prefix_tokens"] and 0 < ttft["ratio"]
    assert "cached prefix: TTFT x" in out


def test_an_artifact_with_the_prefix_off_records_none(tiny_checkpoints, tmp_path, cli):
    recipe = write_recipe(tmp_path / "r.toml", "no-prefix", TASK + 'cached_prefix = "off"\n')
    code, _, err = cli("export", recipe, "--model", tiny_checkpoints["qwen3"], "--out", tmp_path / "art")
    assert code == 0, err
    assert json.loads((tmp_path / "art" / "manifest.json").read_text())["model"]["prompt_prefix_ids"] == []
    code, out, err = cli("verify", tmp_path / "art", "--prompts", "1", "--decode-steps", "2")
    assert code == 0, out + err
    assert "prefix" not in json.loads((tmp_path / "art" / "parity.json").read_text())


def test_no_prompt_that_fits_the_cache_is_a_clear_failure():
    from exporter.parity import prefix_failures
    from exporter.reports import LoweringMetrics, PrefixParity
    from exporter.spec import ParitySpec

    nothing = LoweringMetrics(max_abs_diff=0.0, cosine_min=1.0, top1_agreement=1.0, positions=0)
    (failure,) = prefix_failures(ParitySpec(), nothing, PrefixParity(prefix_tokens=9, prompts=0, served=0,
                                                                       metrics=nothing))
    assert "no behaviour prompt fits" in failure and "kv_cache.max_seq_len" in failure
    (failure,) = prefix_failures(ParitySpec(), nothing, PrefixParity(prefix_tokens=9, prompts=3, served=0,
                                                                       metrics=nothing))
    assert "none of 3 behaviour prompts starts with" in failure
