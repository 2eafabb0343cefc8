"""The intent workload's pieces on known answers: the session generator, the behaviour prompt,
the eval-set reader, the task metrics, rate intervals, and a LoRA adapter merged at export."""

from __future__ import annotations

import json

import pytest

from exporter.intent.evalset import EvalSetError, read_eval_set
from exporter.intent.metrics import hit_at, normalise, rank_of, reciprocal_rank, rouge_l_chars
from exporter.intent.prompt import PromptFormat, behaviour_line, build_prompt, recency
from exporter.intent.sessions import generate, split
from exporter.stats import wilson


def test_the_generator_is_deterministic_and_the_splits_share_nothing():
    assert list(generate(3, 40)) == list(generate(3, 40))
    assert list(generate(3, 40)) != list(generate(4, 40))
    train, eval_ = split(7, train=300, eval=300)
    key = lambda s: json.dumps(s["behaviours"], ensure_ascii=False)  # noqa: E731
    assert not {key(s) for s in train} & {key(s) for s in eval_}
    assert not {s["id"] for s in train} & {s["id"] for s in eval_}
    actions = {e["action"] for s in train for e in s["behaviours"]}
    assert actions == {"search", "click", "cart", "buy", "favorite"}
    assert any(any(ord(ch) > 0x1F000 for ch in e["text"]) for s in train for e in s["behaviours"])  # emoji
    assert all(s["behaviours"][i]["t"] > s["behaviours"][i + 1]["t"] for s in train
               for i in range(len(s["behaviours"]) - 1))  # oldest first: times count down to the query


def test_the_shipped_eval_split_is_the_generators_seed_7():
    shipped = read_eval_set("builtin")
    assert shipped == split(7, train=0, eval=len(shipped))[1] and len(shipped) == 1000


def test_behaviour_lines_and_recency():
    assert behaviour_line({"action": "search", "text": "跑步鞋 男", "t": 30}) == "[搜索] 跑步鞋 男 (30秒前)"
    assert behaviour_line({"action": "buy", "text": "Apple 手机 🔥爆款 ¥5999", "t": 7200}) == \
        "[购买] Apple 手机 🔥爆款 ¥5999 (2小时前)"
    assert behaviour_line({"action": "share", "text": "x"}) == "[share] x"  # unknown actions keep their name
    assert recency(59) == "59秒前" and recency(60) == "1分钟前" and recency(3599) == "59分钟前"


def test_the_prompt_keeps_the_newest_events_within_the_budget():
    events = [{"action": "click", "text": f"商品{i} 🔥", "t": 1000 - i} for i in range(500)]
    fmt = PromptFormat(template="行为：\n{behaviours}\n已输入：{prefix}", budget=120)
    encode = lambda text: list(text.encode("utf-8"))  # noqa: E731 - a byte per token: known lengths
    text, kept = build_prompt({"behaviours": events, "prefix": "跑"}, fmt, encode=encode)
    assert len(encode(text)) <= 120 < len(encode(build_prompt({"behaviours": events[-(kept + 1):], "prefix": "跑"},
                                                              PromptFormat(template=fmt.template, budget=10_000),
                                                              encode=encode)[0]))
    assert text.rstrip().endswith("已输入：跑") and "商品499" in text and "商品0 " not in text
    tiny = PromptFormat(template="{behaviours}", budget=1)
    assert build_prompt({"behaviours": events}, tiny, encode=encode)[1] == 1  # the newest always stays


@pytest.mark.parametrize(("line", "message"), [
    ("not json", "line 2: not JSON"),
    ('{"id": "a", "behaviours": [], "next_query": "x"}', "line 2: 'behaviours' is empty"),
    ('{"id": "a", "behaviours": [{"action": "click"}], "next_query": "x"}', "behaviours[0] needs a string 'action'"),
    ('{"id": "a", "behaviours": [{"action": "click", "text": "y", "t": -1}], "next_query": "x"}', "t must be"),
    ('{"id": "a", "behaviours": [{"action": "click", "text": "y"}], "next_query": "x", "label": 1}',
     "unknown field 'label'"),
    ('{"id": "s0", "behaviours": [{"action": "click", "text": "y"}], "next_query": "x"}', "id 's0' appears twice"),
    ('{"id": "b", "behaviours": [{"action": "click", "text": "y"}]}', "'next_query' must be a string"),
])
def test_the_eval_reader_names_the_bad_line(tmp_path, line, message):
    good = '{"id": "s0", "behaviours": [{"action": "search", "text": "跑步鞋", "t": 5}], "next_query": "跑步鞋 男"}'
    path = tmp_path / "eval.jsonl"
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(EvalSetError) as caught:
        read_eval_set(path)
    assert str(caught.value).startswith("eval.jsonl line 2: ") and message in str(caught.value)


def test_task_metrics_on_known_answers():
    candidates = ["跑步鞋 男", "跑步鞋  男 缓震", "Nike 跑步鞋"]
    assert normalise("ＮＩＫＥ  跑步鞋 ") == "nike 跑步鞋"  # full-width letters, doubled spaces
    assert rank_of(candidates, "跑步鞋 男 缓震") == 2 and rank_of(candidates, "安踏") is None
    assert hit_at(candidates, "nike 跑步鞋", 3) and not hit_at(candidates, "nike 跑步鞋", 2)
    assert reciprocal_rank(candidates, "跑步鞋 男 缓震", 5) == 0.5 and reciprocal_rank(candidates, "x", 5) == 0.0
    assert rouge_l_chars("跑步鞋 男", "跑步鞋男") == 1.0  # spaces do not count
    assert rouge_l_chars("跑步鞋", "跑步鞋 男 缓震") == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # LCS 3 of 3 and 6
    assert rouge_l_chars("手机壳", "跑步鞋") == 0.0 and rouge_l_chars("", "") == 1.0


def test_wilson_intervals():
    rate = wilson(17, 18)
    assert (round(rate.low, 3), round(rate.high, 3)) == (0.742, 0.99) and str(rate).startswith("17/18 = 94.4%")
    assert wilson(0, 0).high == 1.0 and wilson(100, 100).high == 1.0 and wilson(100, 100).low > 0.96


def test_intent_generate_writes_both_splits(cli, tmp_path):
    code, out, _ = cli("intent", "generate", "--out", tmp_path, "--seed", "3", "--train", "20", "--eval", "10")
    assert code == 0 and "(20 sessions)" in out and "(10 sessions)" in out  # rich wraps long paths
    assert read_eval_set(tmp_path / "eval.jsonl") == split(3, train=20, eval=10)[1]
    assert len(read_eval_set(tmp_path / "train.jsonl")) == 20


def test_the_task_section_end_to_end_on_a_tiny_model(cli, tiny_checkpoints, tmp_path, monkeypatch):
    """Float model vs artifact on generated sessions: an fp32 artifact must agree on every
    top query; the report carries counts and intervals; a second verify takes the float
    model's candidates from the cache and reports the same; a bad eval line stops verify first."""
    from conftest import write_recipe

    from exporter.intent.sessions import write_jsonl

    monkeypatch.setenv("RECGPT_EXPORT_CACHE", str(tmp_path / "cache"))

    write_jsonl(list(generate(5, 6)), tmp_path / "eval.jsonl")
    task = ('[task]\neval = "' + str(tmp_path / "eval.jsonl") + '"\nsessions = 4\ncandidates = 3\n'
            'max_new_tokens = 4\ntemplate = "行为：\\n{behaviours}\\n查询："\nbudget = 96\nagreement_min = 1.0\n')
    recipe = write_recipe(tmp_path / "r.toml", "tiny-task", "[parity]\nquality_top1_min = 1.0\n" + task)
    code, _, err = cli("export", recipe, "--model", tiny_checkpoints["llama"], "--out", tmp_path / "art")
    assert code == 0, err
    code, out, err = cli("verify", tmp_path / "art", "--prompts", "2", "--decode-steps", "4")
    assert code == 0, out + err
    report = json.loads((tmp_path / "art" / "parity.json").read_text())["task"]
    assert report["sessions"] == 4 and report["candidates"] == 3
    assert report["agreement_top1"]["hits"] == 4 and report["agreement_top1"]["n"] == 4
    assert report["candidate_overlap"] == 1.0 and report["artifact"] == report["float_model"]
    assert 0.0 < report["agreement_top1"]["low"] < 1.0 == report["agreement_top1"]["high"]
    assert "task: 4 sessions" in out and report["float_from_cache"] == 0
    cached = list((tmp_path / "cache" / "task-reference").glob("*.json"))
    assert len(cached) == 1 and len(json.loads(cached[0].read_text())) == 4
    code, out, err = cli("verify", tmp_path / "art", "--prompts", "2", "--decode-steps", "4")
    assert code == 0, out + err
    again = json.loads((tmp_path / "art" / "parity.json").read_text())["task"]
    assert again["float_from_cache"] == 4 and "for 4 of 4 sessions" in out
    assert {k: v for k, v in again.items() if k != "float_from_cache"} == \
        {k: v for k, v in report.items() if k != "float_from_cache"}
    (tmp_path / "bad.jsonl").write_text('{"id": "x"}\n', encoding="utf-8")
    code, _, err = cli("verify", tmp_path / "art", "--eval", tmp_path / "bad.jsonl")
    assert code == 2 and "bad.jsonl line 1" in err


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_batched_float_candidates_equal_the_one_at_a_time_decoder(tiny_checkpoints, arch):
    """The float model's k candidates decoded in one batch are the tokens our static-cache
    decoder gives one candidate at a time, rows leaving the batch at a stop token included."""
    from exporter.decoder import build_decoder
    from exporter.intent.task import batched_candidates, candidates
    from exporter.load import load_model
    from exporter.runners import EagerRunner

    loaded = load_model(tiny_checkpoints[arch])
    runner = EagerRunner(build_decoder(loaded.model, max_seq_len=64, max_prefill_len=8))
    prompt = [5, 17, 3, 99, 42, 7, 11, 64, 23, 8, 31]  # longer than one prefill chunk
    free = candidates(runner, prompt, k=4, max_new_tokens=9, stop_ids=set())
    assert len({tuple(c) for c in free}) == 4
    stop = {free[1][3], free[2][1]}  # two rows stop early, at different steps
    ours = candidates(runner, prompt, k=4, max_new_tokens=9, stop_ids=stop)
    assert ours != free
    assert batched_candidates(loaded.model, prompt, k=4, max_new_tokens=9, stop_ids=stop) == ours
    assert batched_candidates(loaded.model, prompt, k=4, max_new_tokens=9, stop_ids=set()) == free


def test_cached_float_candidates_miss_on_another_key_and_recompute_a_damaged_file(tmp_path):
    """The cache answers only what was asked before under the same key; a damaged file is
    decoded again, never read as an answer."""
    from exporter.intent.reference_cache import CachedCandidates, reference_key

    calls = []

    def decode(prompt, **kw):
        calls.append(list(prompt))
        return [[len(prompt), kw["k"]]]

    key = reference_key(weights_sha256="ab" * 32, k=2, max_new_tokens=4, stop_ids={2})
    assert key != reference_key(weights_sha256="ab" * 32, k=3, max_new_tokens=4, stop_ids={2})
    assert key != reference_key(weights_sha256="cd" * 32, k=2, max_new_tokens=4, stop_ids={2})
    first = CachedCandidates.open(decode, tmp_path, key)
    assert first([1, 2, 3], k=2) == [[3, 2]] and first([1, 2, 3], k=2) == [[3, 2]]
    first.save()
    assert (first.hits, first.misses, len(calls)) == (1, 1, 1)
    second = CachedCandidates.open(decode, tmp_path, key)
    assert second([1, 2, 3], k=2) == [[3, 2]] and second([1, 2], k=2) == [[2, 2]]
    assert (second.hits, second.misses, len(calls)) == (1, 1, 2)
    first.path.write_text("{not json", encoding="utf-8")
    third = CachedCandidates.open(decode, tmp_path, key)
    assert third([1, 2, 3], k=2) == [[3, 2]] and third.misses == 1 and len(calls) == 3
