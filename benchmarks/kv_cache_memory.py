"""The KV cache's memory in an ExecuTorch program, float32 against int8, read from the
program's own memory plan (what the runtime allocates at load), at real models' cache shapes.

    .venv/bin/python benchmarks/kv_cache_memory.py --out kv-cache-memory.json

The cache's size depends only on its shape (layers, KV heads, head_dim, positions), so each
shape is a seeded Qwen3 checkpoint with that attention and a tiny rest (hidden 64, MLP 64,
a 384-token vocabulary): SmolLM2-135M's (30 layers, 3 KV heads, head_dim 64) and
Qwen3-0.6B's (28 layers, 8 KV heads, head_dim 128), at 512, 1024 and 2048 positions. Each is
exported with ``kv_cache.dtype`` float32 and int8 (exporter/backends/executorch/program.py's
``memory_plan``: the cache tensors, and every planned buffer). Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

SHAPES = {"SmolLM2-135M": dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64),
          "Qwen3-0.6B": dict(num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--out", type=Path, default=Path("kv-cache-memory.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_models import make_tiny_checkpoint

    from exporter.backends.executorch.program import memory_plan
    from exporter.pipeline import export
    from exporter.recipe_io import recipe_from_dict

    rows = []
    with tempfile.TemporaryDirectory(prefix="kv-memory-") as tmp:
        for name, attention in SHAPES.items():
            checkpoint = make_tiny_checkpoint("qwen3", Path(tmp) / name, hidden_size=64, intermediate_size=64,
                                              max_position_embeddings=max(args.positions), **attention)
            for positions in args.positions:
                row = {"shape": name, "positions": positions}
                for dtype in ("float32", "int8"):
                    recipe = recipe_from_dict({"name": f"kv-{dtype}", "kv_cache": {
                        "max_seq_len": positions, "max_prefill_len": 64, "dtype": dtype}})
                    folder = export(recipe, out_dir=Path(tmp) / f"{name}-{positions}-{dtype}", model=str(checkpoint))
                    plan = memory_plan(folder / "model.pte", positions)
                    row[dtype] = plan
                    print(f"{name} {positions} {dtype}: cache {plan['cache_bytes'] / 2**20:.1f} MiB", flush=True)
                row["ratio"] = row["float32"]["cache_bytes"] / row["int8"]["cache_bytes"]
                rows.append(row)
    args.out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(f"\n{'shape':14} {'positions':>9} {'float32 MiB':>12} {'int8 MiB':>9} {'ratio':>6} "
          f"{'planned f32':>12} {'planned int8':>13}")
    for row in rows:
        f32, i8 = row["float32"], row["int8"]
        print(f"{row['shape']:14} {row['positions']:9d} {f32['cache_bytes'] / 2**20:12.1f} "
              f"{i8['cache_bytes'] / 2**20:9.1f} {row['ratio']:6.2f} {f32['planned_bytes'] / 2**20:12.1f} "
              f"{i8['planned_bytes'] / 2**20:13.1f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
