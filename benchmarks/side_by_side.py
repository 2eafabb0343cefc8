"""Side-by-side ExecuTorch throughput of several .pte files, interleaved, on this machine.

    .venv/bin/python benchmarks/side_by_side.py --rounds 5 --out bench-side-by-side.json \
        ours-int4=out/int4/model.pte:out/int4/tokenizer.json \
        optimum-8da4w=/path/model.pte:/path/tokenizer.json

Every candidate runs through the same ExecuTorch TextLLMRunner session code as
`recgpt-export bench` (exporter.backends.executorch.LLMRunnerSession), in a fresh worker
process per round, and the candidates take turns within each round, so a slow phase of the
machine hits all of them. Writes JSON (every sample and the medians) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(program: str, tokenizer: str, threads: int, out: str) -> None:
    sys.path.insert(0, str(ROOT))
    import resource

    from exporter.backends.executorch import LLMRunnerSession, device_tokenizer
    from exporter.bench import prompt_text

    encode, decode = device_tokenizer(Path(tokenizer))
    session = LLMRunnerSession(Path(program), Path(tokenizer), threads=threads)
    result = {}
    for length in (64, 256):
        text = prompt_text(encode, decode, length)
        session.run(text, max_new_tokens=1)  # warm-up
        result[f"prefill_{length}"] = session.run(text, max_new_tokens=1)
    text = prompt_text(encode, decode, 16)
    session.run(text, max_new_tokens=128)
    result["decode_128"] = session.run(text, max_new_tokens=128)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    Path(out).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("candidates", nargs="+", help="NAME=PROGRAM.pte:TOKENIZER.json")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench-side-by-side.json")
    args = parser.parse_args()
    candidates = {}
    for item in args.candidates:
        name, _, paths = item.partition("=")
        program, _, tokenizer = paths.partition(":")
        candidates[name] = (program, tokenizer)
    samples = {name: [] for name in candidates}
    for r in range(args.rounds):
        for name, (program, tokenizer) in candidates.items():
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "r.json")
                subprocess.run([sys.executable, __file__, "--worker", program, tokenizer, str(args.threads), out],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                samples[name].append(json.loads(Path(out).read_text()))
            print(f"round {r + 1}/{args.rounds} {name} done", file=sys.stderr)
    summary = {}
    for name, runs in samples.items():
        med = lambda f: statistics.median(f(x) for x in runs)  # noqa: E731
        summary[name] = {
            "size_mb": os.path.getsize(candidates[name][0]) / 1e6,
            "prefill_64_tok_s": med(lambda x: x["prefill_64"]["prefill_tok_s"]),
            "ttft_64_ms": med(lambda x: x["prefill_64"]["ttft_ms"]),
            "prefill_256_tok_s": med(lambda x: x["prefill_256"]["prefill_tok_s"]),
            "ttft_256_ms": med(lambda x: x["prefill_256"]["ttft_ms"]),
            "decode_tok_s": med(lambda x: x["decode_128"]["decode_tok_s"]),
            "decode_cpu_over_wall": med(lambda x: x["decode_128"]["cpu_s"] / x["decode_128"]["wall_s"]),
            "peak_rss_mb": med(lambda x: x["peak_rss_mb"]),
            "rounds": len(runs),
        }
    Path(args.out).write_text(json.dumps({"threads": args.threads, "summary": summary, "samples": samples}, indent=2))
    cols = list(next(iter(summary.values())))
    print("| candidate | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, row in summary.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in cols) + " |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:4], int(sys.argv[4]), sys.argv[5])
    else:
        main()
