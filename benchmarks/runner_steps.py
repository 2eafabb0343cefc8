"""Prefill and decode time of artifacts side by side, at fixed positions, through each
backend's runner (the runtime's Module / session API), rounds interleaved.

    .venv/bin/python benchmarks/runner_steps.py out/intent-et-int8 out/intent-et-int8-kv8 \
        --context 128 --steps 64 --rounds 5 --out runner-steps.json

``bench`` decodes until the model ends its answer, so two artifacts of one model that part
at some token decode different numbers of steps at different positions; here every artifact
prefills the same ``--context`` token ids (the built-in held-out text) and then decodes
``--steps`` tokens fed by its own argmax, with no end token honoured. Each round runs every
artifact once, in turn, so a machine that changes speed moves all alike. Reported per
artifact: the median over rounds of the prefill wall time and of the mean decode step, and
the process CPU time beside wall. Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runner-steps.json"))
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from exporter import artifact as art
    from exporter.backends import get_backend
    from exporter.prompts import HELDOUT_TEXT

    runners = {}
    for folder in args.artifacts:
        artifact = art.read_artifact(folder)
        runners[str(folder)] = get_backend(artifact.target).load_runner(artifact)
    ids = AutoTokenizer.from_pretrained(args.artifacts[0])(HELDOUT_TEXT * 8, add_special_tokens=False)["input_ids"]
    prompt = ids[:args.context]
    times = {name: {"prefill_ms": [], "decode_step_ms": [], "cpu_over_wall": []} for name in runners}
    for round_ in range(args.rounds + 1):  # round 0 warms every runner up, untimed
        for name, runner in runners.items():
            cpu0, t0 = time.process_time(), time.perf_counter()
            logits = runner.prefill(prompt)
            t1 = time.perf_counter()
            pos = len(prompt)
            for _ in range(args.steps):
                logits = runner.decode(int(np.argmax(logits)), pos)
                pos += 1
            t2 = time.perf_counter()
            if round_:
                times[name]["prefill_ms"].append((t1 - t0) * 1e3)
                times[name]["decode_step_ms"].append((t2 - t1) * 1e3 / args.steps)
                times[name]["cpu_over_wall"].append((time.process_time() - cpu0) / (t2 - t0))
    result = {"context": args.context, "steps": args.steps, "rounds": args.rounds,
              "artifacts": {name: {**samples, **{f"{k}_median": statistics.median(v) for k, v in samples.items()}}
                            for name, samples in times.items()}}
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"{'artifact':40} {'prefill ms':>11} {'decode ms/step':>15} {'cpu/wall':>9}   "
          f"({args.context}-token prefill, {args.steps} steps, median of {args.rounds} rounds)")
    for name, r in result["artifacts"].items():
        print(f"{name:40} {r['prefill_ms_median']:11.1f} {r['decode_step_ms_median']:15.2f} "
              f"{r['cpu_over_wall_median']:9.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
