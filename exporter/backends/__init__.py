"""Target registry: one module per target, imported only when that target is used.

Each backend module defines a class with:
- ``name``, ``extra`` (the pip extra that installs its runtime);
- ``validate(recipe)``: refuse, with UnsupportedError, what the target cannot run correctly;
- ``eager_kv_cache(recipe) -> (attention, cache_update)``: the eager attention of the reference;
- ``quantize(lm, quant_spec) -> QuantSummary``: quantize the decoder in place so that it
  computes with exactly the weights the artifact will store (the lowering reference);
- ``lower(lm, metadata=, out_dir=, on_stage=) -> {"roles": {...}, "timings": {...}}``;
- ``runtime_name()``, ``load_runner(artifact)`` (a runners.Runner), ``shipped_tokenizer(artifact)``
  -> (encode, decode), ``open_bench_session(artifact, threads=)``: an object with ``threads``,
  ``load_ms``, ``encode``/``decode`` (its runtime's tokenizer) and ``run(text, max_new_tokens=)``
  (see bench.py).
Heavy imports (executorch, coremltools, onnxruntime) happen inside those methods so that
`recgpt-export --help` stays fast and a missing runtime is an error naming the extra, not
an ImportError at start-up.
"""

from __future__ import annotations

import difflib
import importlib

from exporter.errors import RecipeError

_REGISTRY: dict[str, str] = {}


def register(name: str, import_path: str) -> None:
    if name in _REGISTRY:
        raise ValueError(f"target {name!r} is already registered to {_REGISTRY[name]}")
    _REGISTRY[name] = import_path


def known_targets() -> list[str]:
    return sorted(_REGISTRY)


def get_backend(name: str):
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"target.name: unknown target {name!r}{hint} (known: {', '.join(known_targets())})")
    module_name, _, class_name = _REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)()


register("executorch", "exporter.backends.executorch:ExecuTorchBackend")
register("onnx", "exporter.backends.onnx:OnnxBackend")
register("coreml", "exporter.backends.coreml:CoreMLBackend")
