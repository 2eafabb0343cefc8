"""ExecuTorch target: a .pte lowered to XNNPACK, run by ExecuTorch's runtime and LLM runner."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from exporter.errors import UnsupportedError, require
from exporter.runners import ChunkedPrefillMixin

PROGRAM_FILE = "model.pte"


def import_runtime():
    """The ExecuTorch Python runtime plus the kernels our programs call outside XNNPACK."""
    runtime = require("executorch.runtime", "executorch")
    # Registers llama::custom_sdpa / update_cache and the quantized embedding kernels with
    # the runtime; without them loading fails with "Missing operator".
    require("executorch.extension.llm.custom_ops.custom_ops", "executorch")
    require("executorch.kernels.quantized", "executorch")
    return runtime


class ExecuTorchBackend:
    name = "executorch"
    extra = "executorch"

    def validate(self, recipe) -> None:
        if recipe.target.backend != "xnnpack":
            raise UnsupportedError(f"target.backend {recipe.target.backend!r}: the executorch target supports 'xnnpack' only")
        from exporter.tuning import refuse_tuning

        refuse_tuning(recipe, "executorch")
        if recipe.kv_cache.cache_update == "index_copy":
            # A program whose cache is written with index_copy_ lowers and saves, then aborts the
            # ExecuTorch 1.5.1 runtime on its first call ("toTensor(): EValue is not a Tensor", a
            # process abort no caller can catch). Bisected on a tiny fp32 Llama: index_copy_ alone
            # does it; aten SDPA with llama::update_cache runs and matches eager to 1e-6.
            raise UnsupportedError(
                "kv_cache.cache_update = 'index_copy' builds a program that aborts the ExecuTorch 1.5.1 runtime; "
                "use cache_update = 'custom' (kv_cache.attention may be 'sdpa' or 'custom_sdpa')"
            )
        for i, rule in enumerate(recipe.quant.rules):
            if not rule.symmetric and rule.scheme not in ("float", "int8_dynact_int4_weight"):
                # XNNPACK has no zero points; int4 linears carry theirs as offsets (GroupOffsetLinear).
                raise UnsupportedError(f"quant.rules[{i}].symmetric: on the executorch target only int8_dynact_int4_weight "
                                       f"can be asymmetric (group offsets); remove symmetric = false from this rule")
            if rule.scheme == "palettize_4bit":
                raise UnsupportedError(f"quant.rules[{i}]: palettize_4bit is a Core ML storage format; "
                                       f"use int8_dynact_int4_weight on the executorch target")
            if rule.scheme == "int4_weight" and rule.kind != "embedding":
                raise UnsupportedError(
                    f"quant.rules[{i}]: weight-only int4 linear is not correct on ExecuTorch/XNNPACK; "
                    f"use scheme int8_dynact_int4_weight (or kind = \"embedding\" for an int4 embedding)"
                )
            if rule.scheme == "int8_weight" and rule.kind != "embedding":
                # Exports cleanly, then computes garbage on XNNPACK (logits off by up to 1e4);
                # reproduced on a single Linear, see ../shared/STACK.md and docs/targets/executorch.md.
                raise UnsupportedError(
                    f"quant.rules[{i}]: weight-only int8 linear is not correct on ExecuTorch/XNNPACK; "
                    f"use scheme int8_dynact_int8_weight (dynamic int8 activations, int8 per-channel weights) "
                    f"and kind = \"linear\" (int8_weight is fine for kind = \"embedding\")"
                )

    def lower(self, lm, *, recipe=None, model=None, metadata: dict, out_dir: Path, on_stage: Callable[[str], None],
              fast: bool = True) -> dict:
        """Capture, lower to XNNPACK and write model.pte; return {role: filename} and sub-stage times."""
        require("executorch", self.extra)
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
        from executorch.exir.passes import MemoryPlanningPass
        from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

        from exporter.backends.xnnpack_speedups import fast_lowering
        from exporter.capture import capture
        from exporter.kv_cache import load_custom_ops
        from exporter.memory import release_memory

        load_custom_ops()
        timings = {}
        t0 = time.perf_counter()
        on_stage("capture (torch.export)")
        exported = capture(lm)
        timings["capture_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        on_stage("lower to XNNPACK")
        speedups = fast_lowering() if fast else contextlib.nullcontext()
        with speedups:
            edge = to_edge_transform_and_lower(
                exported,
                partitioner=[XnnpackPartitioner()],
                # The custom llama:: ops are not core ATen; IR validity checks would reject them.
                compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True),
                constant_methods=metadata,
            )
            timings["lower_s"] = time.perf_counter() - t0
            # The captured graph (with its fake-tensor metadata) is not needed to emit: drop it
            # before the emit stage's peak.
            del exported
            release_memory()

            t0 = time.perf_counter()
            on_stage("emit ExecuTorch program")
            program = edge.to_executorch(
                ExecutorchBackendConfig(
                    extract_delegate_segments=True,
                    # Fuses dequantize->embedding into quantized embedding kernels.
                    do_quant_fusion_and_const_prop=True,
                    memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
                    sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
                )
            )
        with open(out_dir / PROGRAM_FILE, "wb") as fh:
            program.write_to_file(fh)
        timings["emit_s"] = time.perf_counter() - t0
        return {"roles": {"program": PROGRAM_FILE}, "timings": timings}

    def eager_kv_cache(self, recipe) -> tuple[str, str]:
        """The program's own cache ops run in eager torch too: the reference is the same math."""
        return recipe.kv_cache.attention, recipe.kv_cache.cache_update

    def quantize(self, lm, spec, target, *, grams=None):
        """torchao quantization, with group scales rounded to bfloat16 as XNNPACK stores them
        (searched against ``grams`` when given: scale_search.calibrate).

        q/k/v and gate/up that share a rule are fused first unless
        ``target.executorch.fuse_projections`` is off (one XNNPACK operator each instead of
        three and two; docs/targets/executorch.md). The program computes RoPE from the
        positions rather than storing tables, so the reference does too."""
        import torch

        from exporter.decoder import fuse_projections
        from exporter.quantize import apply_quantization, round_group_scales, rule_index

        lm.rope_from_positions()
        if target.executorch.fuse_projections:
            fuse_projections(lm, lambda names: len({rule_index(spec.rules, n, "linear") for n in names}) == 1)
        summary = apply_quantization(lm, spec, grams)
        round_group_scales(lm, torch.bfloat16)
        return summary

    def runtime_name(self) -> str:
        from importlib.metadata import version

        return f"executorch {version('executorch')} (XNNPACK)"

    def load_runner(self, artifact):
        meta = artifact.manifest["model"]
        return ExecuTorchRunner(artifact.file("program"), meta["max_prefill_len"], meta["max_seq_len"])

    def shipped_tokenizer(self, artifact):
        return device_tokenizer(artifact.file("tokenizer"))

    def open_bench_session(self, artifact, *, threads: int):
        return LLMRunnerSession(artifact.file("program"), artifact.file("tokenizer"), threads=threads)


def device_tokenizer(path: Path):
    """encode/decode with the C++ HF tokenizer that ExecuTorch's LLM runner uses on device."""
    tokenizers = require("pytorch_tokenizers", ExecuTorchBackend.extra)
    tok = tokenizers.CppHFTokenizer()
    tok.load(str(path))
    fallback = []

    def decode(ids) -> str:
        try:
            return tok.decode_batch(list(ids))
        except UnicodeDecodeError:
            # A cut multi-byte character (the C++ binding cannot return invalid UTF-8):
            # decode with the same tokenizer.json through `tokenizers`, which writes U+FFFD.
            if not fallback:
                from tokenizers import Tokenizer

                fallback.append(Tokenizer.from_file(str(path)))
            return fallback[0].decode(list(ids), skip_special_tokens=False)

    return (lambda text: list(tok.encode(text, 0, 0))), decode


class LLMRunnerSession:
    """ExecuTorch's TextLLMRunner (C++ prefill/decode loop): the throughput path.

    A Python loop over Method.execute adds 0.3-1 ms per token, so throughput is measured
    through the runner the app would embed: decode from its own timers (whole ms, fine over
    127 steps), TTFT and prefill with perf_counter around a one-token call."""

    def __init__(self, program: Path, tokenizer: Path, *, threads: int) -> None:
        import_runtime()
        from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
        from executorch.extension.pybindings.portable_lib import (
            _threadpool_get_thread_count,
            _unsafe_reset_threadpool,
        )

        _unsafe_reset_threadpool(threads)
        self.threads = _threadpool_get_thread_count()
        self._config = GenerationConfig
        self.encode, self.decode = device_tokenizer(tokenizer)  # what the runner tokenizes with
        # Load time: the runner maps the program and tokenizer, then its first call loads the
        # method (XNNPACK weight packing happens here); Python imports are not counted.
        t0 = time.perf_counter()
        self.runner = TextLLMRunner(str(program), str(tokenizer))
        self.runner.generate("warm", GenerationConfig(max_new_tokens=1, temperature=0.0, echo=False))
        self.load_ms = (time.perf_counter() - t0) * 1e3

    def run(self, text: str, *, max_new_tokens: int) -> dict:
        stats = {}
        self.runner.reset()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        self.runner.generate(text, self._config(max_new_tokens=max_new_tokens, temperature=0.0, echo=False),
                             stats_callback=lambda s: stats.setdefault("s", s))
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        s = stats["s"]
        # The runner's own timers tick in whole milliseconds: too coarse for a small model's
        # prefill. With max_new_tokens=1 the call is tokenize + prefill + first sample, which is
        # the time to first token; timed here with perf_counter.
        # ExecuTorch 1.5.1 samples the first token from the prefill logits and counts only
        # decode steps in num_generated_tokens.
        decode_ms = max(s.inference_end_ms - s.first_token_ms, 1)
        generated = s.num_generated_tokens
        return {
            "prompt_tokens": s.num_prompt_tokens,
            "prefill_tok_s": s.num_prompt_tokens / wall if max_new_tokens == 1 else None,
            "ttft_ms": wall * 1e3 if max_new_tokens == 1 else None,
            "decode_tok_s": generated / decode_ms * 1e3,
            "generated": generated,
            "cpu_s": cpu,
            "wall_s": wall,
        }


class ExecuTorchRunner(ChunkedPrefillMixin):
    """Logits-level access to a .pte through executorch.runtime (for parity, not throughput)."""

    def __init__(self, pte: Path, max_prefill_len: int, max_seq_len: int) -> None:
        runtime = import_runtime()
        import torch

        self._torch = torch
        self.name = "executorch"
        self.max_prefill_len = max_prefill_len
        self.max_seq_len = max_seq_len
        self.program = runtime.Runtime.get().load_program(Path(pte))
        self.method = self.program.load_method("forward")

    def _step(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        torch = self._torch
        out = self.method.execute([
            torch.tensor([list(tokens)], dtype=torch.long), torch.tensor([start_pos], dtype=torch.long),
        ])
        return out[0][0].float().numpy().copy()

    def constant(self, name: str):
        method = self.program.load_method(name)
        return method.execute([])[0]
