"""A/B of two or more programs' decode step time, interleaved in short blocks in one process.

    .venv/bin/python benchmarks/ab_decode_steps.py --blocks 60 --steps 16 --out ab.json \
        before=out/int4/model.pte after=out/int4-new/model.pte
    .venv/bin/python benchmarks/ab_decode_steps.py --blocks 60 --out ab-onnx.json \
        builder=/path/to/onnxruntime-genai-builder/int4 ours=out/onnx-int4

A ``.pte`` runs through ``executorch.runtime``; a folder with a genai_config.json through
onnxruntime-genai's generator (the path ``bench`` times for the ONNX target).

For a graph change whose effect is a few percent. ``side_by_side.py`` alternates whole
runs (tens of seconds per candidate) in fresh processes, and on this VM the machine's speed
swings between rounds by up to 2x, so a 5% change drowns in it. Here every program is loaded
(twice, see main), then the programs take turns every ``--steps`` decode steps (about a tenth of a
second), so a slow phase lands on all of them alike; the per-block ratio to the first
program, median over blocks, is the figure to read. Each block decodes the same positions
(after one prefill of a fixed prompt; the cache entries there are rewritten each time), so
every block does the same work.

The steps go through ``executorch.runtime``'s Method.execute (or the genai generator's
generate_next_token) from Python, which adds a fixed cost per step (about 0.3 ms) to every
program alike: the ratio understates the change slightly, the per-step difference in
milliseconds does not. A genai generator cannot rewind its cache, so each of its blocks
starts a fresh generator and prefills the prompt untimed, then times the same positions.
Writes JSON and prints a table; no assertions on time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

PROMPT_LEN = 64
# The fixed prompt every program is prefilled with (token ids inside any test vocabulary).
PROMPT_IDS = [100 + i % 1000 for i in range(1, PROMPT_LEN + 1)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("programs", nargs="+",
                        help="NAME=PATH/model.pte or NAME=ONNX_FOLDER (the first is the baseline)")
    parser.add_argument("--blocks", type=int, default=60)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per program per block")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="ab-decode-steps.json")
    args = parser.parse_args()

    names, paths = zip(*(spec.partition("=")[::2] for spec in args.programs), strict=True)
    # Each program is loaded twice, in mirrored order (A B ... B A), and a block's figure for
    # it is the mean of its two copies: with one copy each, the same program listed twice
    # (A/A) measured the second copy 2-4% faster, for .pte and ONNX alike; the mirrored
    # order cancels a drift with load order.
    slots = list(range(len(names))) + list(reversed(range(len(names))))
    steppers = [make_stepper(Path(paths[i]), args) for i in slots]

    for stepper in steppers:  # one warm-up block each
        stepper.block()
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for b in range(args.blocks):
        # Rotate who goes first so no copy always runs right after the same one.
        order = list(range(len(slots)))[b % len(slots):] + list(range(len(slots)))[:b % len(slots)]
        times = {i: steppers[i].block() for i in order}
        for program, name in enumerate(names):
            copies = [times[i] for i, p in enumerate(slots) if p == program]
            wall[name].append(statistics.fmean(w for w, _ in copies))
            cpu[name].append(statistics.fmean(c for _, c in copies))

    base = names[0]
    result = {"threads": args.threads, "blocks": args.blocks, "steps_per_block": args.steps,
              "prompt_tokens": PROMPT_LEN, "baseline": base, "programs": {}}
    for n, path in zip(names, paths, strict=True):
        ratios = [w0 / w for w0, w in zip(wall[base], wall[n], strict=True)]  # > 1: faster than the baseline
        diffs = [w - w0 for w0, w in zip(wall[base], wall[n], strict=True)]
        result["programs"][n] = {
            "path": path,
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


def per_step_ms(decode_block, steps: int) -> tuple[float, float]:
    """Wall and CPU milliseconds per decode step of ``decode_block()``, which runs ``steps`` steps."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    decode_block()
    return (time.perf_counter() - wall0) / steps * 1e3, (time.process_time() - cpu0) / steps * 1e3


def make_stepper(path: Path, args):
    return GenaiStepper(path, args) if path.is_dir() else PteStepper(path, args)


class PteStepper:
    """An ExecuTorch program: prefilled once; every block rewrites the same cache positions."""

    def __init__(self, program: Path, args) -> None:
        import torch
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        from exporter.backends.executorch.runtime import import_runtime

        _unsafe_reset_threadpool(args.threads)
        self.steps = args.steps
        self.method = import_runtime().Runtime.get().load_program(program).load_method("forward")
        prompt = torch.tensor([PROMPT_IDS], dtype=torch.long)
        self.token = torch.tensor([[42]], dtype=torch.long)
        self.positions = [torch.tensor([PROMPT_LEN + i], dtype=torch.long) for i in range(args.steps)]
        self.method.execute([prompt, torch.tensor([0], dtype=torch.long)])  # also warms XNNPACK's weight packing

    def block(self) -> tuple[float, float]:
        return per_step_ms(lambda: [self.method.execute([self.token, pos]) for pos in self.positions], self.steps)


class GenaiStepper:
    """An ONNX artifact folder through onnxruntime-genai: a fresh generator per block, its
    prompt prefilled untimed, then ``steps`` greedy decode steps timed (EOS not honoured)."""

    def __init__(self, folder: Path, args) -> None:
        import onnxruntime_genai

        from exporter.backends.onnx.runtime import GenaiSession

        self.og, self.model, self.steps = (onnxruntime_genai, GenaiSession(folder, threads=args.threads).model,
                                           args.steps)

    def block(self) -> tuple[float, float]:
        params = self.og.GeneratorParams(self.model)
        length = PROMPT_LEN + self.steps + 1
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(PROMPT_IDS)
        generator.generate_next_token()  # the first token comes from the prefill's logits
        return per_step_ms(lambda: [generator.generate_next_token() for _ in range(self.steps)], self.steps)


if __name__ == "__main__":
    main()
