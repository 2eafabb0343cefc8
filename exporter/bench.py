"""Throughput and latency, llama-bench style: warm-up runs, then N runs, median and spread.

The measurement runs in a fresh worker process (``python -m exporter.bench``) on the device
(exporter/devices: the host for now), so that peak RSS and load time belong to the artifact
and its runtime, not to whatever the calling process had loaded before. The backend supplies
the timed loop: its bench session (backends/base.BenchSession), the runtime's own generation
loop as the app embeds it.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from exporter import artifact as art
from exporter.devices import Device
from exporter.errors import StageError
from exporter.manifest import ArtifactManifest
from exporter.reports import BenchReport, PrefillCase, PrefixTTFT, Spread


def prompt_text(encode, decode, length: int) -> str:
    """A text that the shipped tokenizer encodes to about ``length`` tokens (behaviour-like)."""
    from exporter.prompts import BEHAVIOUR_PROMPTS, HELDOUT_TEXT

    pool: list[int] = []
    while len(pool) < length:
        for text in (HELDOUT_TEXT, *BEHAVIOUR_PROMPTS):
            pool.extend(encode(text + "\n"))
    return decode(pool[:length])


def prefix_prompts(artifact, count: int) -> list[list[int]]:
    """The first ``count`` intent eval prompts in the artifact's recipe's task format, as the
    source tokenizer (saved in the folder) encodes them: the ids its prompt prefix is in."""
    if count == 0 or not artifact.manifest.model.prompt_prefix_ids:
        return []
    from exporter.intent.evalset import read_eval_set
    from exporter.intent.prompt import behaviour_prompt_ids
    from exporter.load import load_tokenizer
    from exporter.recipe_io import recipe_from_dict

    task = recipe_from_dict(artifact.manifest.recipe).task
    tokenizer = load_tokenizer(artifact.path)
    return behaviour_prompt_ids(read_eval_set(task.eval or "builtin")[:count], task, tokenizer,
                                fits=artifact.manifest.model.max_seq_len - 1)


def run_bench(artifact, backend, spec, device: Device, *, progress=lambda s: None) -> BenchReport:
    """Measure on ``device``: in a fresh worker process where the device runs this tool's
    Python, else through the backend's native runner there; then build the report."""
    prompts = prefix_prompts(artifact, spec.prefix_prompts)
    if device.python() is None:
        raw, info = _native_measurements(artifact, backend, spec, device, prompts, progress)
    else:
        raw, info = _worker_measurements(artifact, backend, spec, device, prompts, progress), device.describe()
    manifest = artifact.manifest
    prefill = {str(n): PrefillCase(prompt_tokens=case["prompt_tokens"], prefill_tok_s=Spread.of(case["prefill_tok_s"]),
                                   ttft_ms=Spread.of(case["ttft_ms"])) for n, case in raw["prefill"].items()}
    longest = prefill[str(max(spec.prompt_lengths))]
    decode = Spread.of(raw["decode"]["decode_tok_s"])
    return BenchReport(
        artifact=manifest.name, device=info.label, runtime=info.runtime or backend.runtime_name(),
        threads=raw["threads"], prefill=prefill,
        decode_tok_s=decode, decode_tokens=raw["decode"]["generated"],
        decode_cpu_s=Spread.of(raw["decode"]["cpu_s"]), decode_wall_s=Spread.of(raw["decode"]["wall_s"]),
        load_ms=raw["load_ms"], peak_rss_mb=raw["peak_rss_mb"], baseline_rss_mb=raw["baseline_rss_mb"],
        artifact_mb=sum(entry.bytes for entry in manifest.files.values()) / 1e6,
        bytes_per_decoded_token=bytes_per_decoded_token(manifest),
        environment=art.environment(), prefill_tok_s=longest.prefill_tok_s, ttft_ms=longest.ttft_ms,
        device_facts=info, prefix_ttft=_prefix_report(raw.get("prefix")),
        unstable=unstable_figures({"decode_tok_s": decode, "prefill_tok_s": longest.prefill_tok_s,
                                   "ttft_ms": longest.ttft_ms}),
    )


# Runs of one figure further apart than this (max - min over the median) are flagged: the same
# .pte benched a minute apart here gave 167 and 318 decode tok/s (issue 20), while a quiet
# machine keeps runs within a few percent.
UNSTABLE_RANGE = 0.15


def unstable_figures(figures: dict[str, Spread]) -> tuple[str, ...]:
    """One sentence per figure whose runs spread wider than UNSTABLE_RANGE."""
    return tuple(f"{name}: runs {spread.min:.4g} to {spread.max:.4g} ({spread.relative_range:.0%} of the median "
                 f"{spread.median:.4g}, {spread.runs} runs)" for name, spread in figures.items()
                 if spread.runs >= 2 and spread.relative_range > UNSTABLE_RANGE)


def _prefix_report(raw: dict | None) -> PrefixTTFT | None:
    if not raw or not raw["whole_ms"]:
        return None
    import statistics

    whole, cached = Spread.of(raw["whole_ms"]), Spread.of(raw["cached_ms"])
    # Paired: each prompt's two paths ran back to back, so a machine that slows down mid-run
    # (seen here: the same prompts 230 ms, then 120 ms) moves both alike.
    ratio = statistics.median(c / w for c, w in zip(raw["cached_ms"], raw["whole_ms"], strict=True))
    suffix = statistics.median((n - raw["prefix_tokens"]) / n for n in raw["prompt_tokens"])
    return PrefixTTFT(prefix_tokens=raw["prefix_tokens"], prompt_tokens=Spread.of(raw["prompt_tokens"]),
                      whole_ttft_ms=whole, cached_ttft_ms=cached, ratio=ratio, suffix_share=suffix,
                      same_first_token=raw["same_first_token"], prefix_prefill_ms=raw["prefix_prefill_ms"])


def measure_prefix(runner, prefix: list[int], prompts: list[list[int]], progress=lambda s: None) -> dict:
    """TTFT (prefill + the first token's argmax) of each prompt whole and from the cached
    prefix, in turn, so both see the same machine state. After a whole prefill the prefix is
    prefilled again, untimed: the app's cache holds the prefix computed alone. The first
    prompt runs once untimed as a warm-up."""
    from exporter.runners import PrefixCachedRunner

    cached = PrefixCachedRunner(runner, prefix)
    served = [p for p in prompts if cached.starts_with_prefix(p)]
    progress(f"TTFT on {len(served)} behaviour prompts, whole and from the cached {len(prefix)}-token prefix")
    out = {"prefix_tokens": len(prefix), "prompt_tokens": [len(p) for p in served], "whole_ms": [], "cached_ms": [],
           "same_first_token": 0}
    t0 = time.perf_counter()
    cached.prefill_prefix()
    out["prefix_prefill_ms"] = (time.perf_counter() - t0) * 1e3
    for i, prompt in enumerate(served[:1] + served):
        t0 = time.perf_counter()
        whole = int(np.argmax(runner.prefill(prompt)))
        whole_ms = (time.perf_counter() - t0) * 1e3
        cached.prefill_prefix()
        t0 = time.perf_counter()
        first = int(np.argmax(cached.prefill(prompt)))
        cached_ms = (time.perf_counter() - t0) * 1e3
        if i > 0:
            out["whole_ms"].append(whole_ms)
            out["cached_ms"].append(cached_ms)
            out["same_first_token"] += whole == first
    return out


def _worker_measurements(artifact, backend, spec, device: Device, prompts, progress) -> dict:
    progress(f"benchmark in a worker process ({spec.warmup} warm-up + {spec.runs} runs per case, "
             f"{spec.threads} threads" + (f"; then TTFT on {len(prompts)} behaviour prompts, whole and from the "
                                          "cached prompt prefix)" if prompts else ")"))
    folder = device.push(artifact.path)
    # The runner prints generated text on stdout, so the worker reports through a file.
    scratch = Path(tempfile.mkdtemp(prefix="recgpt-bench-"))
    result_file = scratch / "result.json"
    cmd = [*device.python(), "-m", "exporter.bench", str(folder), str(result_file),
           json.dumps({**_spec_dict(spec), "prefix_prompt_ids": prompts})]
    package_root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    try:
        proc = device.run(cmd, env=env)
        if proc.returncode != 0 or not result_file.is_file():
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise StageError(f"benchmark worker failed: {tail}", stage="bench", target=backend.name)
        return json.loads(device.pull(result_file, scratch / "pulled.json").read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _native_measurements(artifact, backend, spec, device: Device, prompts, progress):
    """The device times prefill and decode inside its native runner; peak RSS and CPU time are
    the runner process's (under emulation, the emulator's: relative figures only)."""
    from exporter.devices.native import NativeBenchSession, open_native_runner

    progress(f"benchmark on {device.kind} through the {backend.name} native runner "
             f"({spec.warmup} warm-up + {spec.runs} runs per case, {spec.threads} threads)")
    runner, info = open_native_runner(device, backend, artifact, threads=spec.threads)
    try:
        encode, decode = backend.shipped_tokenizer(artifact)  # on the host: the runner takes token ids
        raw = measure(NativeBenchSession(runner, encode, decode), _spec_dict(spec), progress)
        raw.update(baseline_rss_mb=0.0, peak_rss_mb=runner.peak_rss_mb())
        if prompts:
            raw["prefix"] = measure_prefix(runner, list(artifact.manifest.model.prompt_prefix_ids), prompts, progress)
    finally:
        runner.close()
        device.cleanup()
    return raw, info


def _spec_dict(spec) -> dict:
    return {"warmup": spec.warmup, "runs": spec.runs, "prompt_lengths": list(spec.prompt_lengths),
            "decode_tokens": spec.decode_tokens, "threads": spec.threads}


def measure(session, spec: dict, progress=lambda s: None) -> dict:
    """The timed cases over a bench session: prefill at each prompt length, then decode."""
    encode, decode = session.encode, session.decode
    out = {"load_ms": session.load_ms, "threads": session.threads, "prefill": {}}
    for length in spec["prompt_lengths"]:
        progress(f"prefill {length} tokens")
        text = prompt_text(encode, decode, length)
        samples = [session.run(text, max_new_tokens=1) for _ in range(spec["warmup"] + spec["runs"])][spec["warmup"]:]
        out["prefill"][length] = {"prompt_tokens": samples[-1].prompt_tokens,
                                  "prefill_tok_s": [s.prefill_tok_s for s in samples],
                                  "ttft_ms": [s.ttft_ms for s in samples]}
    progress(f"decode {spec['decode_tokens']} tokens")
    text = prompt_text(encode, decode, 16)
    samples = [session.run(text, max_new_tokens=spec["decode_tokens"])
               for _ in range(spec["warmup"] + spec["runs"])][spec["warmup"]:]
    out["decode"] = {"decode_tok_s": [s.decode_tok_s for s in samples],
                     "cpu_s": [s.cpu_s for s in samples],
                     "wall_s": [s.wall_s for s in samples],
                     "generated": min(s.generated for s in samples)}
    return out


def bytes_per_decoded_token(manifest: ArtifactManifest) -> int:
    """Weights read per decoded token: the program and its weights (one .pte, an .onnx and its
    external data, or every file of an .mlpackage) minus the embedding table (one row is
    read), plus the KV cache read at the middle of the context. A roofline estimate, not a
    measurement."""
    from exporter.quant.schemes import SCHEMES

    program_bytes = manifest.bytes_of_role("program", "weights")
    embed_rule = manifest.rule_for("model.embed_tokens")
    bits = SCHEMES[embed_rule["scheme"]].weight_bits if embed_rule else 32
    # A tied embedding stored once is read whole by the lm_head anyway.
    shared = manifest.target.info.get("shared_embedding", False)
    model = manifest.model
    embedding_bytes = 0 if shared else model.vocab_size * model.hidden_size * bits // 8
    cache = manifest.io_signature.kv_cache
    return int(program_bytes - embedding_bytes + cache.bytes_at(cache.max_seq_len // 2))


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
    # The session's own tokenizer: a second one could load the model again (onnxruntime-genai's
    # tokenizer needs a Model) and count it in peak RSS.
    out = measure(session, spec)
    out["baseline_rss_mb"] = baseline
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    if spec["prefix_prompt_ids"]:  # after peak RSS is read: the runner is a second copy of the program
        del session
        out["prefix"] = measure_prefix(backend.load_runner(artifact), list(artifact.manifest.model.prompt_prefix_ids),
                                       spec["prefix_prompt_ids"])
    Path(result_path).write_text(json.dumps(out))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3])
