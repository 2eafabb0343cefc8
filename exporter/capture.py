"""Stage: torch.export of the decoder with a dynamic prefill length."""

from __future__ import annotations

import torch


def example_inputs(seq_len: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    # Two tokens, not one: an example of size 1 would let export specialise the dim to 1.
    return torch.zeros((1, seq_len), dtype=torch.long), torch.tensor([0], dtype=torch.long)


def capture(lm) -> torch.export.ExportedProgram:
    """Export ``forward(tokens[1, seq], input_pos[1])`` with 1 <= seq <= lm.max_prefill_len."""
    seq = torch.export.Dim("seq_len", min=1, max=lm.max_prefill_len)
    with torch.no_grad():
        # strict=True: non-strict export failed later in XNNPACK lowering
        # ("expected compiled_fn to be GraphModule"), see ../shared/STACK.md.
        return torch.export.export(lm, example_inputs(), dynamic_shapes=({1: seq}, None), strict=True)


def io_signature(lm) -> dict:
    return {
        "inputs": [
            {"name": "tokens", "dtype": "int64", "shape": [1, f"seq_len<= {lm.max_prefill_len}"]},
            {"name": "input_pos", "dtype": "int64", "shape": [1], "meaning": "position of tokens[0]"},
        ],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, lm.shape.vocab_size], "meaning": "last token"}],
        "state": {"kv_cache": [lm.shape.n_layers, 2, 1, lm.max_seq_len, lm.shape.n_kv_heads, lm.shape.head_dim]},
    }
