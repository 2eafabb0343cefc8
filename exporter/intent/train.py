"""Fine-tune an intent model: a LoRA adapter on the behaviour prompts of generated sessions.

    python -m exporter.intent.train --out DIR [--model builtin:smollm2-135m-instruct]
        [--data-seed 7] [--train 1200] [--steps 150] [--batch 8] [--seed 0]

The loss is the next query's tokens (and the end of the turn) after the behaviour prompt,
the prompt's own tokens masked out, so the model learns to answer, not to echo. LoRA (PEFT)
on every linear of the decoder, rank 8, saved in fp16 with the data seed and the command in
``training.json``; the adapter is what `--adapter` and ``builtin:smollm2-135m-intent`` merge.
Deterministic for a seed on one machine (torch's CPU kernels); timings and the exact-match
rates it reached are in docs/intent.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def examples(sessions, tokenizer, fmt):
    """(input ids, number of prompt tokens) per session: the prompt, the query, the turn's end."""
    from exporter.intent.prompt import build_prompt, encoder

    encode = encoder(tokenizer)
    end = tokenizer.eos_token or "<|im_end|>"
    for session in sessions:
        prompt, _ = build_prompt(session, fmt, encode=encode, apply_chat_template=tokenizer.apply_chat_template)
        prompt_ids = encode(prompt)
        yield prompt_ids + encode(session["next_query"] + end), len(prompt_ids)


def batches(items, batch: int, pad_id: int, rng):
    import torch

    order = list(range(len(items)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch + 1, batch):
            chosen = [items[i] for i in order[start:start + batch]]
            width = max(len(ids) for ids, _ in chosen)
            input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
            labels = torch.full((batch, width), -100, dtype=torch.long)
            mask = torch.zeros((batch, width), dtype=torch.long)
            for row, (ids, prompt_len) in enumerate(chosen):
                input_ids[row, :len(ids)] = torch.tensor(ids)
                labels[row, prompt_len:len(ids)] = torch.tensor(ids[prompt_len:])
                mask[row, :len(ids)] = 1
            yield input_ids, mask, labels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exporter.intent.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--data-seed", type=int, default=7)
    parser.add_argument("--train", type=int, default=1200, help="training sessions")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--budget", type=int, default=192, help="prompt tokens at most")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exporter.intent.prompt import PromptFormat
    from exporter.intent.sessions import split
    from exporter.load import resolve_checkpoint

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    checkpoint = resolve_checkpoint(args.model, on_progress=print)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, local_files_only=True)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGET_MODULES,
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    train, _ = split(args.data_seed, train=args.train, eval=0)
    fmt = PromptFormat(budget=args.budget)
    items = list(examples(train, tokenizer, fmt))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stream = batches(items, args.batch, pad, random.Random(args.seed))
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, (s + 1) / 10) * max(
        0.05, 1 - s / args.steps))
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        input_ids, mask, labels = next(stream)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimiser.step()
        schedule.step()
        optimiser.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == 1:
            recent = sum(losses[-10:]) / len(losses[-10:])
            print(f"step {step}/{args.steps}  loss {recent:.3f}  {time.perf_counter() - t0:.0f}s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.float16)
    model.save_pretrained(args.out, safe_serialization=True)
    config_file = args.out / "adapter_config.json"
    adapter_config = json.loads(config_file.read_text())
    adapter_config["base_model_name_or_path"] = args.model
    config_file.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    command = "python -m exporter.intent.train " + " ".join(argv or sys.argv[1:])
    record = {"command": command, "data_seed": args.data_seed, "train_sessions": args.train, "steps": args.steps,
              "batch": args.batch, "lr": args.lr, "rank": args.rank, "prompt_budget": args.budget, "seed": args.seed,
              "examples_tokens_mean": sum(len(i) for i, _ in items) / len(items),
              "seconds": round(time.perf_counter() - t0, 1), "loss_first10": sum(losses[:10]) / min(10, len(losses)),
              "loss_last10": sum(losses[-10:]) / min(10, len(losses))}
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
