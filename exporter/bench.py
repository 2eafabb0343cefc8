"""Throughput and latency, llama-bench style: warm-up runs, then N runs, median and spread.

The measurement runs in a fresh worker process (``python -m exporter.bench``) so that peak
RSS and load time belong to the artifact and its runtime, not to whatever the calling
process had loaded before. The backend supplies the timed loop (``backend.measure``).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from exporter import artifact as art
from exporter.errors import StageError


def summarize(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "runs": len(samples), "samples": samples}


def prompt_text(encode, decode, length: int) -> str:
    """A text that the shipped tokenizer encodes to about ``length`` tokens (behaviour-like)."""
    from exporter.prompts import BEHAVIOUR_PROMPTS, HELDOUT_TEXT

    pool: list[int] = []
    while len(pool) < length:
        for text in (HELDOUT_TEXT, *BEHAVIOUR_PROMPTS):
            pool.extend(encode(text + "\n"))
    return decode(pool[:length])


def run_bench(artifact, backend, spec, *, progress=lambda s: None) -> dict:
    """Launch the worker, collect its samples, and build bench.json."""
    progress(f"benchmark in a worker process ({spec.warmup} warm-up + {spec.runs} runs per case, {spec.threads} threads)")
    # The runner prints generated text on stdout, so the worker reports through a file.
    result_file = Path(tempfile.mkdtemp(prefix="recgpt-bench-")) / "result.json"
    cmd = [sys.executable, "-m", "exporter.bench", str(artifact.path), str(result_file), json.dumps({
        "warmup": spec.warmup, "runs": spec.runs, "prompt_lengths": list(spec.prompt_lengths),
        "decode_tokens": spec.decode_tokens, "threads": spec.threads})]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env)
        if proc.returncode != 0 or not result_file.is_file():
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise StageError(f"benchmark worker failed: {tail}", stage="bench", target=backend.name)
        raw = json.loads(result_file.read_text())
    finally:
        shutil.rmtree(result_file.parent, ignore_errors=True)
    manifest = artifact.manifest
    artifact_bytes = sum(entry["bytes"] for entry in manifest["files"].values())
    program_bytes = program_size(manifest)
    report = {
        "artifact": manifest["name"],
        "device": raw["device"],
        "runtime": backend.runtime_name(),
        "threads": raw["threads"],
        "prefill": {str(n): {"prompt_tokens": case["prompt_tokens"],
                             "prefill_tok_s": summarize(case["prefill_tok_s"]),
                             "ttft_ms": summarize(case["ttft_ms"])} for n, case in raw["prefill"].items()},
        "decode_tok_s": summarize(raw["decode"]["decode_tok_s"]),
        "decode_tokens": raw["decode"]["generated"],
        # CPU time beside wall time: on 2 shared cores a busy neighbour shows up as cpu/wall < threads.
        "decode_cpu_s": summarize(raw["decode"]["cpu_s"]),
        "decode_wall_s": summarize(raw["decode"]["wall_s"]),
        "load_ms": raw["load_ms"],
        "peak_rss_mb": raw["peak_rss_mb"],
        "baseline_rss_mb": raw["baseline_rss_mb"],
        "artifact_mb": artifact_bytes / 1e6,
        "bytes_per_decoded_token": bytes_per_decoded_token(manifest, program_bytes),
        "environment": art.environment(),
    }
    longest = str(max(spec.prompt_lengths))
    report["prefill_tok_s"] = report["prefill"][longest]["prefill_tok_s"]
    report["ttft_ms"] = report["prefill"][longest]["ttft_ms"]
    return report


def program_size(manifest: dict) -> int:
    """Bytes of the program and its weights: one file (.pte), a file and its external data
    (.onnx + .onnx.data, the "weights" role) or every file of a folder (.mlpackage)."""
    roots = [manifest["roles"][role] for role in ("program", "weights") if role in manifest["roles"]]
    return sum(entry["bytes"] for rel, entry in manifest["files"].items()
               if any(rel == root or rel.startswith(root.rstrip("/") + "/") for root in roots))


def bytes_per_decoded_token(manifest: dict, program_bytes: int) -> int:
    """Weights read per decoded token: the weights minus the embedding table (one row is read),
    plus the KV cache read at the middle of the context. A roofline estimate, not a measurement."""
    meta, sig = manifest["model"], manifest["io_signature"]
    embed_rule = next((r for r in manifest["quantization"]["rules"] if "model.embed_tokens" in r["modules"]), None)
    bits = {"int8_weight": 8, "int4_weight": 4}.get(embed_rule["scheme"], 32) if embed_rule else 32
    # A tied embedding stored once is read whole by the lm_head anyway.
    shared = manifest["target"].get("shared_embedding", False)
    embedding_bytes = 0 if shared else meta["vocab_size"] * meta["hidden_size"] * bits // 8
    layers, _, _, seq, kv_heads, head_dim = sig["state"]["kv_cache"]
    kv_bytes_mid_context = layers * 2 * (seq // 2) * kv_heads * head_dim * 4
    return int(program_bytes - embedding_bytes + kv_bytes_mid_context)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _worker(folder: str, result_path: str, spec_json: str) -> None:
    from exporter.backends import get_backend

    spec = json.loads(spec_json)
    artifact = art.read_artifact(folder, check_hashes=False)
    backend = get_backend(artifact.target)
    baseline = _rss_mb()
    session = backend.open_bench_session(artifact, threads=spec["threads"])
    load_ms = session.load_ms
    # The session's own tokenizer: a second one could load the model again (onnxruntime-genai's
    # tokenizer needs a Model) and count it in peak RSS.
    encode, decode = session.encode, session.decode
    out = {"load_ms": load_ms, "baseline_rss_mb": baseline, "threads": session.threads,
           "device": f"host ({os.uname().machine}, {os.cpu_count()} cores)", "prefill": {}}
    for length in spec["prompt_lengths"]:
        text = prompt_text(encode, decode, length)
        samples = [session.run(text, max_new_tokens=1) for _ in range(spec["warmup"] + spec["runs"])][spec["warmup"]:]
        out["prefill"][length] = {"prompt_tokens": samples[-1]["prompt_tokens"],
                                  "prefill_tok_s": [s["prefill_tok_s"] for s in samples],
                                  "ttft_ms": [s["ttft_ms"] for s in samples]}
    text = prompt_text(encode, decode, 16)
    samples = [session.run(text, max_new_tokens=spec["decode_tokens"]) for _ in range(spec["warmup"] + spec["runs"])][spec["warmup"]:]
    out["decode"] = {"decode_tok_s": [s["decode_tok_s"] for s in samples],
                     "cpu_s": [s["cpu_s"] for s in samples],
                     "wall_s": [s["wall_s"] for s in samples],
                     "generated": min(s["generated"] for s in samples)}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    Path(result_path).write_text(json.dumps(out))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3])
