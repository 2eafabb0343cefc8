"""The Core ML protobuf schema, without importing coremltools.

The schema (Model.proto, MIL.proto, ...) is Apple's; its generated Python modules ship in
the coremltools wheel under ``coremltools/proto``. Importing them the normal way runs
``coremltools/__init__``, which imports torch and the converters (18 s here). These modules
only need protobuf, so they are loaded from that folder as a package of our own.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

from exporter.errors import MissingDependencyError

_ALIAS = "_recgpt_coreml_proto"


def _proto_package():
    if _ALIAS in sys.modules:
        return sys.modules[_ALIAS]
    spec = importlib.util.find_spec("coremltools")
    if spec is None or spec.origin is None:
        raise MissingDependencyError("coremltools is not installed (the Core ML schema ships in it)",
                                     hint="pip install 'recgpt-export[coreml]'")
    package = types.ModuleType(_ALIAS)
    package.__path__ = [str(Path(spec.origin).parent / "proto")]
    sys.modules[_ALIAS] = package
    return package


def model_pb2():
    _proto_package()
    return importlib.import_module(f"{_ALIAS}.Model_pb2")


def mil_pb2():
    _proto_package()
    return importlib.import_module(f"{_ALIAS}.MIL_pb2")
