"""Target registry: one package per target, imported only when that target is named.

A target is ``exporter/backends/<name>/`` with a ``Backend`` subclass (the contract, and
``check_recipe``, are in ``backends/base.py``) and one ``register`` line below. Nothing
outside this file lists the targets: messages that name them ask the registry.
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


def backend_class(name: str):
    """The Backend subclass registered as ``name`` (cheap: no runtime is imported)."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"target.name: unknown target {name!r}{hint} (known: {', '.join(known_targets())})")
    module_name, _, class_name = _REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def get_backend(name: str):
    return backend_class(name)()


def targets_with(capability: str) -> list[str]:
    """The registered targets that declare ``capability`` (a Capabilities field)."""
    return [name for name in known_targets() if getattr(backend_class(name).capabilities, capability)]


register("executorch", "exporter.backends.executorch.backend:ExecuTorchBackend")
register("onnx", "exporter.backends.onnx.backend:OnnxBackend")
register("coreml", "exporter.backends.coreml.backend:CoreMLBackend")
