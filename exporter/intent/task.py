"""The task section of `verify`: the float model's next queries against the artifact's.

For each session both models get the same prompt ids (the source tokenizer's: the shipped
tokenizer is judged by the tokenizer gate, apart) and give k candidate queries by one stated
method: the k most likely first tokens after the prompt, each continued greedily to the end
of the turn or ``max_new_tokens``. The first candidate is the greedy query. The prompt is
prefilled once per session; every candidate starts again at the position after it, which a
static in-place cache allows with no copy (a position's keys are rewritten before any later
position reads them). The float checkpoint decodes its k candidates in one batch
(``batched_candidates``): the same tokens, a fifth of the steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from exporter.intent.metrics import hit_at, normalise, reciprocal_rank, rouge_l_chars
from exporter.reports import TaskReport, TaskScores
from exporter.stats import wilson

METHOD = "top-k first tokens, each continued greedily (the first is the greedy query)"
NORMALISATION = "NFKC, lower case, whitespace collapsed"

# (prompt ids, k=, max_new_tokens=, stop_ids=) -> k candidates: one model's side of the task.
CandidateFn = Callable[..., list[list[int]]]


def candidates(runner, prompt: Sequence[int], *, k: int, max_new_tokens: int, stop_ids: set[int]) -> list[list[int]]:
    """k candidate continuations of ``prompt`` (token ids, the stop token excluded)."""
    first = runner.prefill(list(prompt))
    out = []
    for token in np.argsort(-first, kind="stable")[:k]:
        seq, pos = [int(token)], len(prompt)
        while seq[-1] not in stop_ids and len(seq) < max_new_tokens:
            seq.append(int(np.argmax(runner.decode(seq[-1], pos))))
            pos += 1
        out.append([t for t in seq if t not in stop_ids])
    return out


def batched_candidates(hf_model, prompt: Sequence[int], *, k: int, max_new_tokens: int,
                       stop_ids: set[int]) -> list[list[int]]:
    """``candidates`` for a transformers model, the k continuations decoded side by side: the
    prompt is prefilled once, its cache repeated k times, and a row leaves the batch when it
    stops. The same method and tokens; about k times fewer forward passes on a CPU, where one
    step of a small model costs the same for one row as for five."""
    import torch

    with torch.no_grad():
        out = hf_model(input_ids=torch.tensor([list(prompt)], dtype=torch.long), use_cache=True, logits_to_keep=1)
        first = out.logits[0, -1].float().numpy()
        seqs = [[int(t)] for t in np.argsort(-first, kind="stable")[:k]]
        cache = out.cache
        cache.batch_repeat_interleave(len(seqs))
        alive = [i for i, seq in enumerate(seqs) if seq[-1] not in stop_ids and len(seq) < max_new_tokens]
        if len(alive) < len(seqs):
            cache.batch_select_indices(torch.tensor(alive, dtype=torch.long))
        pos = len(prompt)
        while alive:
            step = hf_model(input_ids=torch.tensor([[seqs[i][-1]] for i in alive], dtype=torch.long),
                            position_ids=torch.full((len(alive), 1), pos, dtype=torch.long),
                            cache=cache, use_cache=True)
            for row, i in enumerate(alive):
                seqs[i].append(int(np.argmax(step.logits[row, -1].float().numpy())))
            pos += 1
            keep = [row for row, i in enumerate(alive)
                    if seqs[i][-1] not in stop_ids and len(seqs[i]) < max_new_tokens]
            if len(keep) < len(alive):
                alive = [alive[row] for row in keep]
                if alive:
                    cache.batch_select_indices(torch.tensor(keep, dtype=torch.long))
    return [[t for t in seq if t not in stop_ids] for seq in seqs]


def _scores(queries: list[list[str]], sessions: list[dict], k: int) -> TaskScores:
    targets = [s["next_query"] for s in sessions]
    n = len(sessions)
    return TaskScores(
        exact_at_1=wilson(sum(hit_at(q, t, 1) for q, t in zip(queries, targets, strict=True)), n),
        hit_at_k=wilson(sum(hit_at(q, t, k) for q, t in zip(queries, targets, strict=True)), n),
        mrr_at_k=sum(reciprocal_rank(q, t, k) for q, t in zip(queries, targets, strict=True)) / n,
        rouge_l_chars=sum(rouge_l_chars(q[0], t) for q, t in zip(queries, targets, strict=True)) / n)


def task_section(sessions: list[dict], *, float_candidates: CandidateFn, artifact_candidates: CandidateFn,
                 encode: Callable[[str], list[int]],
                 decode: Callable[[list[int]], str], apply_chat_template, fmt, k: int, max_new_tokens: int,
                 stop_ids: set[int], eval_set: str, progress: Callable[[str], None] = lambda _m: None) -> TaskReport:
    from exporter.intent.prompt import build_prompt

    float_queries, artifact_queries, first_differences, overlaps, disagreements = [], [], [], [], []
    for i, session in enumerate(sessions):
        prompt, _ = build_prompt(session, fmt, encode=encode, apply_chat_template=apply_chat_template)
        ids = encode(prompt)
        ref = float_candidates(ids, k=k, max_new_tokens=max_new_tokens, stop_ids=stop_ids)
        got = artifact_candidates(ids, k=k, max_new_tokens=max_new_tokens, stop_ids=stop_ids)
        ref_text = [decode(c).strip() for c in ref]
        got_text = [decode(c).strip() for c in got]
        float_queries.append(ref_text)
        artifact_queries.append(got_text)
        differ = next((j for j, (a, b) in enumerate(zip(ref[0], got[0], strict=False)) if a != b), None)
        if differ is None:
            differ = min(len(ref[0]), len(got[0])) if len(ref[0]) != len(got[0]) else max_new_tokens + 1
        first_differences.append(differ)
        wanted = {normalise(q) for q in ref_text}
        overlaps.append(len(wanted & {normalise(q) for q in got_text}) / len(wanted))
        if normalise(ref_text[0]) != normalise(got_text[0]) and len(disagreements) < 8:
            disagreements.append({"id": session["id"], "float": ref_text[0], "artifact": got_text[0],
                                  "first_different_token": differ})
        if (i + 1) % 10 == 0 or i + 1 == len(sessions):
            agreed = sum(normalise(f[0]) == normalise(a[0]) for f, a in zip(float_queries, artifact_queries,
                                                                              strict=True))
            progress(f"task: {i + 1}/{len(sessions)} sessions, top query agreed {agreed}/{i + 1}")
    n = len(sessions)
    agreed = sum(normalise(f[0]) == normalise(a[0]) for f, a in zip(float_queries, artifact_queries, strict=True))
    return TaskReport(
        eval_set=eval_set, sessions=n, candidates=k, method=METHOD, normalisation=NORMALISATION,
        agreement_top1=wilson(agreed, n), candidate_overlap=sum(overlaps) / n,
        first_difference_mean=sum(first_differences) / n,
        float_model=_scores(float_queries, sessions, k), artifact=_scores(artifact_queries, sessions, k),
        disagreements=tuple(disagreements))


def run_task(task, sessions, loaded, candidate, facts, progress) -> TaskReport:
    """verify's task section: ``task`` (the recipe's TaskSpec) over ``sessions``, the float
    checkpoint as transformers runs it (its k candidates in one batch) against ``candidate``
    (the artifact's runner, one candidate after another: its cache has one row). The float
    side's candidates are kept per checkpoint (intent/reference_cache.py): verifying a second
    artifact of the same checkpoint decodes only the artifact's side."""
    from exporter.intent.prompt import PromptFormat, encoder

    tokenizer = loaded.tokenizer
    fmt = PromptFormat.of(task)
    stop_ids = task_stop_ids(tokenizer, facts)
    float_side = float_reference(loaded, facts, task, stop_ids)
    try:
        report = task_section(
            sessions, float_candidates=float_side,
            artifact_candidates=lambda ids, **kw: candidates(candidate, ids, **kw),
            encode=encoder(tokenizer),
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            apply_chat_template=tokenizer.apply_chat_template, fmt=fmt, k=task.candidates,
            max_new_tokens=task.max_new_tokens, stop_ids=stop_ids, eval_set=task.eval, progress=progress)
    finally:
        float_side.save()  # what was decoded is kept even when the run is interrupted
    return replace(report, float_from_cache=float_side.hits)


def task_stop_ids(tokenizer, facts) -> set[int]:
    """Where a query ends: the tokenizer's end of turn and the artifact's end tokens."""
    from exporter.intent.score import stop_ids_of

    return stop_ids_of(tokenizer) | set(facts.eos_ids)


def float_reference(loaded, facts, task, stop_ids: set[int]):
    """The float checkpoint's side of the task (its k candidates in one batch), kept per
    checkpoint and decoding method in the cache folder (intent/reference_cache.py); call
    ``save()`` on it when done."""
    from exporter.intent.reference_cache import CachedCandidates, reference_key
    from exporter.load import default_cache_dir

    return CachedCandidates.open(
        lambda ids, **kw: batched_candidates(loaded.model, ids, **kw), default_cache_dir(),
        reference_key(weights_sha256=facts.weights_sha256, k=task.candidates, max_new_tokens=task.max_new_tokens,
                      stop_ids=stop_ids))


def task_check(task_report: TaskReport, agreement_min: float):
    """The task gate: the artifact's top query equals the float model's at least this often."""
    from exporter.parity import GateCheck

    agreed = task_report.agreement_top1
    return GateCheck(name="task.agreement_top1", value=agreed.value, limit=agreement_min, at_least=True,
                     passed=agreed.value >= agreement_min,
                     message=f"task: the artifact's top query equals the float model's in {agreed}, below "
                             f"task.agreement_min {agreement_min:.2%}")


def with_task(report, task_report: TaskReport, agreement_min: float):
    """The ParityReport with its task section, and the task gate's failure when it misses."""
    check = task_check(task_report, agreement_min)
    failures = [*report.failures, *([] if check.passed else [check.message])]
    return replace(report, task=task_report, failures=tuple(failures), passed=not failures)
