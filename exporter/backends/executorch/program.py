"""The ExecuTorch program: torch.export of the decoder, lowered to XNNPACK, emitted as a .pte.

Program contract: ``forward(tokens int64[1, seq], input_pos int64[1]) -> logits
float32[1, vocab]`` with ``1 <= seq <= max_prefill_len``; the cache lives inside the
program. Constant methods carry what ExecuTorch's LLM runner reads (``constant_methods``;
their names are the runner's contract).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import torch

from exporter.errors import require
from exporter.manifest import ModelFacts

PROGRAM_FILE = "model.pte"


def example_inputs(seq_len: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    # Two tokens, not one: an example of size 1 would let export specialise the dim to 1.
    return torch.zeros((1, seq_len), dtype=torch.long), torch.tensor([0], dtype=torch.long)


def capture(lm) -> torch.export.ExportedProgram:
    """Export ``forward(tokens[1, seq], input_pos[1])`` with 1 <= seq <= lm.max_prefill_len."""
    seq = torch.export.Dim("seq_len", min=1, max=lm.max_prefill_len)
    with torch.no_grad():
        # strict=True: non-strict export failed later in XNNPACK lowering
        # ("expected compiled_fn to be GraphModule"; docs/targets/executorch.md).
        return torch.export.export(lm, example_inputs(), dynamic_shapes=({1: seq}, None), strict=True)


def constant_methods(model: ModelFacts, recipe) -> dict:
    """Constant methods ExecuTorch's LLM runner reads from the program (names are its contract)."""
    return {
        "get_max_seq_len": model.max_seq_len,
        "get_max_context_len": model.max_seq_len,
        "get_vocab_size": model.vocab_size,
        "get_n_layers": model.n_layers,
        "get_bos_id": model.bos_id,
        "get_eos_ids": list(model.eos_ids),
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
        "use_sdpa_with_kv_cache": recipe.kv_cache.attention == "custom_sdpa",
        # Ours: the prompt prefix an app prefills once and keeps in the cache (docs/intent.md).
        **({"get_prompt_prefix": list(model.prompt_prefix_ids)} if model.prompt_prefix_ids else {}),
    }


def lower_to_pte(lm, *, constants: dict, out_dir: Path, on_stage: Callable[[str], None], fast: bool = True) -> dict:
    """Capture, lower to XNNPACK and write model.pte; returns the sub-stage times."""
    require("executorch", "executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    from exporter.backends.executorch.speedups import fast_lowering
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
            constant_methods=constants,
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
    return timings


# Bytes per element of the ExecuTorch ScalarTypes a program's planned tensors use here.
_ELEMENT_BYTES = {0: 1, 1: 1, 2: 2, 3: 4, 4: 8, 5: 2, 6: 4, 7: 8, 11: 1, 15: 2}


def memory_plan(pte: Path, max_seq_len: int) -> dict[str, int]:
    """What the program's forward method plans, read from the .pte: ``planned_bytes`` (every
    memory-planned buffer: activations and the mutable KV cache, allocated once at load) and
    ``cache_bytes`` (the planned tensors of shape [1, max_seq_len, heads, d]: the caches with
    their scales and zero points)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte.read_bytes())
    program = getattr(program, "program", program)  # newer releases wrap it
    plan = next(p for p in program.execution_plan if p.name == "forward")
    cache = 0
    for value in plan.values:
        tensor = value.val
        sizes = list(getattr(tensor, "sizes", []) or [])
        if getattr(tensor, "allocation_info", None) is not None and len(sizes) == 4 and sizes[1] == max_seq_len:
            cache += _ELEMENT_BYTES[int(tensor.scalar_type)] * sizes[0] * sizes[1] * sizes[2] * sizes[3]
    return {"planned_bytes": int(sum(plan.non_const_buffer_sizes)), "cache_bytes": cache}
