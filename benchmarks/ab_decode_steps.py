"""A/B of two or more .pte programs' decode step time, interleaved in short blocks in one process.

    .venv/bin/python benchmarks/ab_decode_steps.py --blocks 60 --steps 16 --out ab.json \
        before=out/int4/model.pte after=out/int4-new/model.pte

For a graph change whose effect is a few percent. ``side_by_side.py`` alternates whole
runs (tens of seconds per candidate) in fresh processes, and on this VM the machine's speed
swings between rounds by up to 2x, so a 5% change drowns in it. Here every program is loaded
once, then the programs take turns every ``--steps`` decode steps (about a tenth of a
second), so a slow phase lands on all of them alike; the per-block ratio to the first
program, median over blocks, is the figure to read. Each block decodes the same positions
(after one prefill of a fixed prompt; the cache entries there are rewritten each time), so
every block does the same work.

The steps go through ``executorch.runtime``'s Method.execute from Python, which adds a fixed
cost per step (about 0.3 ms) to every program alike: the ratio understates the change
slightly, the per-step difference in milliseconds does not. Writes JSON and prints a table;
no assertions on time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

PROMPT_LEN = 64


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("programs", nargs="+", help="NAME=PATH/model.pte (the first is the baseline)")
    parser.add_argument("--blocks", type=int, default=60)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per program per block")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="ab-decode-steps.json")
    args = parser.parse_args()

    import torch
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    from exporter.backends.executorch import import_runtime

    runtime = import_runtime()
    _unsafe_reset_threadpool(args.threads)
    names, methods = [], []
    for spec in args.programs:
        name, _, path = spec.partition("=")
        names.append(name)
        methods.append(runtime.Runtime.get().load_program(Path(path)).load_method("forward"))

    prompt = torch.arange(1, PROMPT_LEN + 1, dtype=torch.long).reshape(1, -1) % 1000 + 100
    token = torch.tensor([[42]], dtype=torch.long)
    positions = [torch.tensor([PROMPT_LEN + i], dtype=torch.long) for i in range(args.steps)]
    for method in methods:  # prefill once; also warms XNNPACK's weight packing
        method.execute([prompt, torch.tensor([0], dtype=torch.long)])

    def block(method) -> tuple[float, float]:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for pos in positions:
            method.execute([token, pos])
        return (time.perf_counter() - wall0) / args.steps * 1e3, (time.process_time() - cpu0) / args.steps * 1e3

    for method in methods:  # one warm-up block each
        block(method)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for b in range(args.blocks):
        # Rotate who goes first so no program always runs right after the same one.
        order = list(range(len(names)))[b % len(names):] + list(range(len(names)))[:b % len(names)]
        for i in order:
            w, c = block(methods[i])
            wall[names[i]].append(w)
            cpu[names[i]].append(c)

    base = names[0]
    result = {"threads": args.threads, "blocks": args.blocks, "steps_per_block": args.steps,
              "prompt_tokens": PROMPT_LEN, "baseline": base, "programs": {}}
    for n, spec in zip(names, args.programs):
        ratios = [w0 / w for w0, w in zip(wall[base], wall[n])]  # > 1: faster than the baseline
        diffs = [w - w0 for w0, w in zip(wall[base], wall[n])]
        result["programs"][n] = {
            "path": spec.partition("=")[2],
            "step_ms_median": statistics.median(wall[n]),
            "cpu_ms_median": statistics.median(cpu[n]),
            "speed_ratio_median": statistics.median(ratios),
            "speed_ratio_min": min(ratios), "speed_ratio_max": max(ratios),
            "step_ms_diff_median": statistics.median(diffs),
            "step_ms": wall[n], "cpu_ms": cpu[n],
        }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"| program | step ms (median) | CPU ms per step | speed vs {base}, per block: median (min-max) | "
          f"step ms minus {base} (median) |")
    print("|---|---|---|---|---|")
    for n in names:
        r = result["programs"][n]
        print(f"| {n} | {r['step_ms_median']:.2f} | {r['cpu_ms_median']:.2f} | {r['speed_ratio_median']:.3f} "
              f"({r['speed_ratio_min']:.2f}-{r['speed_ratio_max']:.2f}) | {r['step_ms_diff_median']:+.2f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
