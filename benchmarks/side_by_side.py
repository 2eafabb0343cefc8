"""Side-by-side throughput of several artifacts, interleaved, on this machine.

    .venv/bin/python benchmarks/side_by_side.py --rounds 5 --out bench-side-by-side.json \
        ours-int4=executorch:out/int4/model.pte:out/int4/tokenizer.json \
        optimum-8da4w=executorch:/path/model.pte:/path/tokenizer.json \
        ours-onnx-int4=genai:out/onnx-int4 \
        builder-int4=genai:/path/to/onnxruntime-genai-builder-output \
        llama.cpp-q4_1=llamacpp:/path/SmolLM2-135M-Instruct.Q4_1.gguf --llamacpp-python /path/venv/bin/python

Each candidate is KIND:PATH. ``executorch`` runs a .pte through the same TextLLMRunner
session code as `recgpt-export bench` (exporter.backends.executorch.runtime.LLMRunnerSession);
``genai`` runs a folder with a genai_config.json through onnxruntime-genai's generator
(exporter.backends.onnx.runtime.GenaiSession), as `recgpt-export bench` does for the onnx target.
``llamacpp`` runs a GGUF file through llama-cpp-python (a reference point, not a target):
its worker runs under ``--llamacpp-python``, a venv with llama-cpp-python installed (it
builds from source, see docs/benchmarks.md), and times prefill and each decode step the
way the other two report them (greedy, the first token sampled from the prefill logits).
Each candidate runs in a fresh worker process per round, and the candidates take turns
within each round, so a slow phase of the machine hits all of them. Writes JSON (every
sample, the medians, and each candidate's per-round throughput ratio to ``--baseline``)
and prints two tables. Compare candidates by the ratios: on this VM whole rounds run up to
2x faster or slower than others, and per-candidate medians over 5 rounds do not cancel that.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def open_session(kind: str, paths: list[str], threads: int):
    """The bench session for one candidate (it carries the runtime's own encode/decode)."""
    if kind == "executorch":
        from exporter.backends.executorch.runtime import LLMRunnerSession

        program, tokenizer = map(Path, paths)
        return LLMRunnerSession(program, tokenizer, threads=threads)
    if kind == "genai":
        from exporter.backends.onnx.runtime import GenaiSession

        return GenaiSession(Path(paths[0]), threads=threads)
    if kind == "llamacpp":
        return LlamaCppSession(Path(paths[0]), threads=threads)
    raise SystemExit(f"unknown candidate kind {kind!r}: use executorch:PROGRAM.pte:TOKENIZER.json, genai:FOLDER "
                     f"or llamacpp:MODEL.gguf")


class LlamaCppSession:
    """llama-cpp-python over a GGUF file, with the bench session's interface (run/encode/decode)."""

    def __init__(self, gguf: Path, *, threads: int) -> None:
        import llama_cpp.llama_cpp as low_level
        from llama_cpp import Llama

        # The default build's extra (AMX) buffer type dies with SIGILL in this VM. The model
        # parameter that turns it off, use_extra_bufts, is not a Llama() argument in 0.3.36,
        # so it is set on the default parameters Llama() starts from.
        defaults = low_level.llama_model_default_params

        def without_extra_bufts():
            params = defaults()
            params.use_extra_bufts = False
            return params

        low_level.llama_model_default_params = without_extra_bufts
        t0 = time.perf_counter()
        self.llm = Llama(model_path=str(gguf), n_ctx=512, n_batch=256, n_threads=threads, n_threads_batch=threads,
                         verbose=False)
        self.load_ms = (time.perf_counter() - t0) * 1e3

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="ignore")

    def run(self, text: str, *, max_new_tokens: int):
        import numpy as np

        from exporter.backends.base import RunTiming

        llm = self.llm
        prompt = self.encode(text)
        llm.reset()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        llm.eval(prompt)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        first = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        end = time.perf_counter()
        cpu = time.process_time() - cpu0
        wall = end - wall0
        return RunTiming.of(prompt_tokens=len(prompt), first_token_s=first - wall0, max_new_tokens=max_new_tokens,
                            generated=max_new_tokens - 1, decode_s=end - first, cpu_s=cpu, wall_s=wall)


def candidate_size_mb(kind: str, paths: list[str]) -> float:
    if kind in ("executorch", "llamacpp"):
        return os.path.getsize(paths[0]) / 1e6
    folder = Path(paths[0])
    return sum(p.stat().st_size for p in folder.glob("*.onnx*")) / 1e6


def worker(spec: str, threads: int, out: str) -> None:
    sys.path.insert(0, str(ROOT))
    import resource
    from dataclasses import asdict

    from exporter.bench import prompt_text

    kind, *paths = spec.split(":")
    session = open_session(kind, paths, threads)
    encode, decode = session.encode, session.decode
    result = {"load_ms": session.load_ms}
    for length in (64, 256):
        text = prompt_text(encode, decode, length)
        session.run(text, max_new_tokens=1)  # warm-up
        result[f"prefill_{length}"] = asdict(session.run(text, max_new_tokens=1))
    text = prompt_text(encode, decode, 16)
    session.run(text, max_new_tokens=128)
    result["decode_128"] = asdict(session.run(text, max_new_tokens=128))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    Path(out).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("candidates", nargs="+",
                        help="NAME=executorch:PROGRAM.pte:TOKENIZER.json or NAME=genai:FOLDER")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench-side-by-side.json")
    parser.add_argument("--baseline", help="candidate the per-round ratios are taken against (default: the first)")
    parser.add_argument("--llamacpp-python", default=sys.executable,
                        help="python of a venv with llama-cpp-python, for llamacpp: candidates")
    args = parser.parse_args()
    candidates = dict(item.partition("=")[::2] for item in args.candidates)
    baseline = args.baseline or next(iter(candidates))
    if baseline not in candidates:
        raise SystemExit(f"--baseline {baseline}: not one of the candidates ({', '.join(candidates)})")
    samples = {name: [] for name in candidates}
    for r in range(args.rounds):
        for name, spec in candidates.items():
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "r.json")
                python = args.llamacpp_python if spec.startswith("llamacpp:") else sys.executable
                proc = subprocess.run([python, __file__, "--worker", spec, str(args.threads), out],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{name}: worker failed: "
                                     f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
                samples[name].append(json.loads(Path(out).read_text()))
            print(f"round {r + 1}/{args.rounds} {name} done", file=sys.stderr)
    summary = {}
    for name, runs in samples.items():
        med = lambda f, runs=runs: statistics.median(f(x) for x in runs)  # noqa: E731
        summary[name] = {
            "size_mb": candidate_size_mb(candidates[name].split(":")[0], candidates[name].split(":")[1:]),
            "prefill_64_tok_s": med(lambda x: x["prefill_64"]["prefill_tok_s"]),
            "ttft_64_ms": med(lambda x: x["prefill_64"]["ttft_ms"]),
            "prefill_256_tok_s": med(lambda x: x["prefill_256"]["prefill_tok_s"]),
            "ttft_256_ms": med(lambda x: x["prefill_256"]["ttft_ms"]),
            "decode_tok_s": med(lambda x: x["decode_128"]["decode_tok_s"]),
            "decode_cpu_over_wall": med(lambda x: x["decode_128"]["cpu_s"] / x["decode_128"]["wall_s"]),
            "peak_rss_mb": med(lambda x: x["peak_rss_mb"]),
            "load_ms": med(lambda x: x["load_ms"]),
            "rounds": len(runs),
        }
    ratios = {name: paired_ratios(samples[name], samples[baseline]) for name in candidates if name != baseline}
    Path(args.out).write_text(json.dumps({"threads": args.threads, "summary": summary, "baseline": baseline,
                                          "ratios_to_baseline": ratios, "samples": samples}, indent=2))
    cols = list(next(iter(summary.values())))
    print("| candidate | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, row in summary.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c])
                                          for c in cols) + " |")
    print(f"\nper-round ratio to {baseline}, median (min-max):")
    print("| candidate | decode | prefill 64 | prefill 256 |\n|---|---|---|---|")
    for name, r in ratios.items():
        print(f"| {name} | " + " | ".join(f"{r[m]['median']:.3f} ({r[m]['min']:.2f}-{r[m]['max']:.2f})"
                                          for m in ("decode", "prefill_64", "prefill_256")) + " |")


METRICS = {"decode": ("decode_128", "decode_tok_s"), "prefill_64": ("prefill_64", "prefill_tok_s"),
           "prefill_256": ("prefill_256", "prefill_tok_s")}


def paired_ratios(runs: list[dict], baseline_runs: list[dict]) -> dict:
    """Candidate / baseline throughput within each round, then the median over rounds.

    The candidates of one round run back to back, so a slow phase of the machine (rounds on
    this VM differ by up to 2x) hits both sides of a ratio; medians of each side taken apart
    do not cancel it."""
    out = {}
    for metric, (phase, key) in METRICS.items():
        values = [r[phase][key] / b[phase][key] for r, b in zip(runs, baseline_runs, strict=True)]
        out[metric] = {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
