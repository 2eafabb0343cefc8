"""How often the float model's own top query moves under perturbations far smaller than any
quantization: the floor under verify's task agreement.

    .venv/bin/python benchmarks/task_noise_floor.py --model builtin:smollm2-135m-intent \
        --sessions 200 --out task-noise.json

For each session the checkpoint's greedy query (the task section's first candidate, decoded
as verify decodes it: up to ``--max-new-tokens``, stopped at the end of the turn) is compared,
after the task's normalisation, with the query of the same checkpoint changed one way:
  - ``embed x (1 +- r)``: the embedding output scaled, the perturbation family the lowering
    noise floor uses (exporter/parity.py);
  - ``fp16 weights``: every weight rounded to float16 and back (what fp16 storage alone does).
A quantized artifact cannot be expected to agree with the float model more often than these
do. With ``--int8-parts``, also each part of int8 alone, simulated in eager torch on the float
model (round to the grid and back), to find which part moves the top query:
  - ``int8 weights``: every Linear's weight symmetric int8 per output channel;
  - ``int8 activations``: every Linear's input quantized to asymmetric int8 per token, as
    XNNPACK's dynamic "8da" schemes and ONNX Runtime's dynamic MatMulInteger do;
  - ``int8 activations, lm_head float``: the same but the lm_head's input kept float;
  - ``int8 activations, lm_head only``: only the lm_head's input quantized.
Also reported: the share of sessions whose greedy query passes through a step where the two
most likely tokens are within ``--margin`` logits (a near tie any change can flip).
Writes JSON and prints a table; rates are counts with Wilson 95% intervals.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import numpy as np
import torch


def greedy_with_margin(model, prompt: list[int], *, max_new_tokens: int,
                       stop_ids: set[int]) -> tuple[list[int], float]:
    """The greedy continuation (stop token excluded) and its smallest top-1/top-2 logit gap."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(stop_ids),
                             pad_token_id=sorted(stop_ids)[0], output_scores=True, return_dict_in_generate=True)
    tokens = [t for t in out.sequences[0, len(prompt):].tolist() if t not in stop_ids]
    gaps = [float(np.diff(np.sort(s[0].float().numpy())[-2:])[0]) for s in out.scores]
    return tokens, min(gaps)


@contextlib.contextmanager
def embedding_scaled(model, relative: float):
    handle = model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out * (1 + relative))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def weights_replaced(params, change):
    """Each of ``params`` replaced by ``change(itself)`` inside the block, restored after."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.copy_(change(p))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, original in zip(params, saved, strict=True):
                p.copy_(original)


def fp16_weights(model):
    return weights_replaced(list(model.parameters()), lambda p: p.half().float())


def _int8_rows(x: torch.Tensor, *, symmetric: bool) -> torch.Tensor:
    """``x`` rounded to an int8 grid per row (last dim) and back (exporter/quant/grids.py's rules)."""
    from exporter.quant.grids import absmax_scales, asymmetric_range

    if symmetric:
        scale = absmax_scales(x, 127)[..., None].clamp(min=1e-12)
        return torch.clamp(torch.round(x / scale), -127, 127) * scale
    scale, low = asymmetric_range(x, 8)
    scale, low = scale[..., None].clamp(min=1e-12), low[..., None]
    zero = torch.round(-128 - low / scale)
    return (torch.clamp(torch.round(x / scale) + zero, -128, 127) - zero) * scale


def int8_weights(model):
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return weights_replaced([m.weight for m in linears], lambda w: _int8_rows(w, symmetric=True))


@contextlib.contextmanager
def int8_activations(model, which):
    """Inputs of the Linears ``which(name)`` accepts quantized per token."""
    handles = [m.register_forward_pre_hook(lambda _m, args: (_int8_rows(args[0], symmetric=False),))
               for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and which(name)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def main() -> None:
    from exporter.intent.evalset import read_eval_set
    from exporter.intent.metrics import normalise
    from exporter.intent.prompt import PromptFormat, build_prompt, encoder
    from exporter.intent.score import stop_ids_of
    from exporter.load import load_model
    from exporter.stats import wilson

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-intent")
    parser.add_argument("--eval", default="builtin")
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--relative", type=float, nargs="+", default=[1e-3, -1e-3, 1e-2])
    parser.add_argument("--margin", type=float, default=0.5)
    parser.add_argument("--int8-parts", action="store_true", help="also each part of int8 alone (eager)")
    parser.add_argument("--out", type=Path, default=Path("task-noise.json"))
    args = parser.parse_args()

    sessions = read_eval_set(args.eval)[: args.sessions]
    loaded = load_model(args.model)
    tokenizer, model = loaded.tokenizer, loaded.model
    encode, stop = encoder(tokenizer), stop_ids_of(tokenizer)
    template = tokenizer.apply_chat_template
    prompts = [encode(build_prompt(s, PromptFormat(), encode=encode, apply_chat_template=template)[0])
               for s in sessions]

    def queries() -> tuple[list[str], list[float]]:
        rows = [greedy_with_margin(model, p, max_new_tokens=args.max_new_tokens, stop_ids=stop) for p in prompts]
        texts = [normalise(tokenizer.decode(t, skip_special_tokens=True).strip()) for t, _ in rows]
        return texts, [m for _, m in rows]

    reference, margins = queries()
    variants = {}
    for relative in args.relative:
        with embedding_scaled(model, relative):
            variants[f"embed x (1 {relative:+g})"] = queries()[0]
    with fp16_weights(model):
        variants["fp16 weights"] = queries()[0]
    if args.int8_parts:
        with int8_weights(model):
            variants["int8 weights"] = queries()[0]
        parts = {"int8 activations": lambda name: True,
                 "int8 activations, lm_head float": lambda name: name != "lm_head",
                 "int8 activations, lm_head only": lambda name: name == "lm_head"}
        for name, which in parts.items():
            with int8_activations(model, which):
                variants[name] = queries()[0]

    n = len(sessions)
    near_ties = wilson(sum(m < args.margin for m in margins), n)
    result = {"model": args.model, "eval": args.eval, "sessions": n, "max_new_tokens": args.max_new_tokens,
              "margin": args.margin,
              "near_tie_sessions": {"hits": near_ties.hits, "n": n, "low": near_ties.low, "high": near_ties.high},
              "agreement": {}}
    print(f"{n} sessions of {args.eval}, {args.model}; greedy queries, agreement with the unperturbed float model")
    print(f"{'variant':<34} {'top query agreed':<32}")
    for name, got in variants.items():
        rate = wilson(sum(a == b for a, b in zip(reference, got, strict=True)), n)
        result["agreement"][name] = {"hits": rate.hits, "n": n, "rate": rate.value, "low": rate.low, "high": rate.high}
        print(f"{name:<34} {rate!s:<32}")
    print(f"sessions with a step whose top-2 logits are within {args.margin}: {near_ties}")
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
