"""Scoring a float checkpoint on the intent task: its greedy next query against the user's.

What `recgpt-export intent eval` runs, to show a trained intent model has learned (its
exact-match rate against its base model's). The query is decoded as the app decodes it:
greedy, stopped at the end of the turn or after ``max_new_tokens``, stripped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def greedy_query(model, tokenizer, prompt: str, *, max_new_tokens: int, stop_ids: set[int]) -> str:
    import torch

    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=sorted(stop_ids), pad_token_id=sorted(stop_ids)[0])
    new = [t for t in out[0, ids.shape[1]:].tolist() if t not in stop_ids]
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def stop_ids_of(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        ids.add(end)
    return ids


def score_checkpoint(source: str, *, adapter: Path | None = None, eval_set: str = "builtin", sessions: int = 200,
                     max_new_tokens: int = 24, progress: Callable[[str], None] = lambda _m: None) -> dict:
    from exporter.intent.evalset import read_eval_set
    from exporter.intent.metrics import normalise, rouge_l_chars
    from exporter.intent.prompt import PromptFormat, build_prompt, encoder
    from exporter.load import load_model
    from exporter.stats import wilson

    chosen = read_eval_set(eval_set)[:sessions]  # a bad line is refused before any model loads
    loaded = load_model(source, adapter=adapter, on_progress=progress)
    tokenizer, model = loaded.tokenizer, loaded.model
    stop = stop_ids_of(tokenizer)
    encode = encoder(tokenizer)
    hits, rouge, examples = 0, 0.0, []
    for i, session in enumerate(chosen):
        prompt, _ = build_prompt(session, PromptFormat(), encode=encode,
                                 apply_chat_template=tokenizer.apply_chat_template)
        query = greedy_query(model, tokenizer, prompt, max_new_tokens=max_new_tokens, stop_ids=stop)
        hit = normalise(query) == normalise(session["next_query"])
        hits += hit
        rouge += rouge_l_chars(query, session["next_query"])
        if len(examples) < 5:
            examples.append({"id": session["id"], "predicted": query, "next_query": session["next_query"]})
        if (i + 1) % 50 == 0:
            progress(f"{i + 1}/{len(chosen)} sessions: exact {hits}/{i + 1}")
    rate = wilson(hits, len(chosen))
    return {"model": source + (f" + {adapter}" if adapter else ""), "sessions": len(chosen),
            "exact_match": {"hits": rate.hits, "n": rate.n, "rate": rate.value, "low": rate.low, "high": rate.high,
                            "text": str(rate)},
            "rouge_l_chars_mean": rouge / len(chosen), "examples": examples}
