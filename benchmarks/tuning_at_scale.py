"""Export time and peak memory of tuned recipes at the mission's size, on a seeded checkpoint.

Writes a Qwen3 checkpoint of Qwen3-0.6B's shape (28 layers, hidden 1024, intermediate 3072,
16 heads, 8 KV heads, head_dim 128, vocabulary 151936; seeded random weights; the tokenizer of
``--tokenizer``, a folder with a real one, so the calibration has a real model's token count,
else the tests' tiny one) unless it exists, then exports each recipe with ``recgpt-export export`` in
its own process, one after another, and reads each run's peak RSS (``/usr/bin/time -v``)
and per-stage seconds (the artifact's export.json). Tuning's cost is a fixed part plus one
part per step: ``--steps`` sets the recipe's step count (small is enough to measure both),
and the table gives the seconds per step from the tune lines' timestamps.

    python benchmarks/tuning_at_scale.py --out out/tuning-at-scale executorch/int4 onnx/int4

Writes OUT/tuning-at-scale.json and prints a table. Nothing else of yours should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

QWEN3_06B_SHAPE = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=4096)


def write_checkpoint(folder: Path, tokenizer_dir: Path | None = None) -> Path:
    if (folder / "config.json").exists():
        return folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch
    from tiny_models import tiny_config, train_tokenizer
    from transformers import AutoModelForCausalLM

    shape = dict(QWEN3_06B_SHAPE)
    if tokenizer_dir is None:
        tokenizer = train_tokenizer()
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = tiny_config("qwen3", **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # a trained model's scale: unit-ish activations through 28 layers
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.copy_(1.0 + 0.1 * torch.randn_like(p))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def export_once(recipe: str, checkpoint: Path, out: Path, steps: int) -> dict:
    cli = [sys.executable, "-m", "exporter.cli", "export", recipe, "--model", str(checkpoint), "--out", str(out),
           "--force", "--set", f"quant.tuning.steps={steps}"]
    started = time.monotonic()
    run = subprocess.run(["/usr/bin/time", "-v", *cli], capture_output=True, text=True)
    wall = time.monotonic() - started
    if run.returncode:
        raise SystemExit(f"{recipe}: export failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", run.stderr).group(1))
              for kind in ("User", "System"))
    step_times = [float(m) for m in re.findall(r"\[\s*([\d.]+)s\] tune \d+/\d+", run.stdout + run.stderr)]
    per_step = (step_times[-1] - step_times[0]) / (len(step_times) - 1) if len(step_times) > 1 else None
    log = json.loads((out / "export.json").read_text())
    tuning = json.loads((out / "manifest.json").read_text())["quantization"].get("tuning") or {}
    return {"recipe": recipe, "steps": steps, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "peak_rss_gb": round(peak_kb / 1024**2, 2), "seconds_per_step": per_step and round(per_step, 1),
            "stages_s": log.get("timings_s", log), "calibration_tokens": tuning.get("calibration_tokens"),
            "calibration_kl": [tuning.get("calibration_kl_before"), tuning.get("calibration_kl_after")]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--out", type=Path, default=Path("out/tuning-at-scale"))
    parser.add_argument("--checkpoint", type=Path, help="default: OUT/qwen3-0.6b-shape (written when missing)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tokenizer", type=Path, help="a folder with tokenizer files (e.g. an exported artifact's)")
    args = parser.parse_args()
    checkpoint = write_checkpoint(args.checkpoint or args.out / "qwen3-0.6b-shape", args.tokenizer)
    rows = [export_once(recipe, checkpoint, args.out / recipe.replace("/", "-"), args.steps)
            for recipe in args.recipes]
    result = {"checkpoint": str(checkpoint), "shape": QWEN3_06B_SHAPE, "runs": rows}
    (args.out / "tuning-at-scale.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'recipe':<20} {'steps':>5} {'wall s':>8} {'cpu s':>8} {'peak GB':>8} {'s/step':>7}")
    for row in rows:
        print(f"{row['recipe']:<20} {row['steps']:>5} {row['wall_s']:>8} {row['cpu_s']:>8} {row['peak_rss_gb']:>8} "
              f"{row['seconds_per_step'] or '-':>7}")


if __name__ == "__main__":
    main()
