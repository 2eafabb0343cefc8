"""A Core ML program interpreter: reads a saved .mlpackage and executes it with NumPy.

Nothing on Linux can run a Core ML model (``MLModel.predict`` and ``make_state`` need
macOS), so the Core ML target is verified here instead: the package is read from disk as
the device would read it (the model spec protobuf and its weight blob), every operation is
executed with NumPy, states included, and every fp16-typed result is rounded to fp16 as
Core ML computes it (see executor.py for what that does and does not model).

Modules, one job each:
- ``schema``: the Core ML protobuf schema (the generated modules that ship in coremltools,
  loaded alone, without importing coremltools itself);
- ``package``: the .mlpackage folder: manifest, model spec, weight file, metadata;
- ``blob``: the weight file (MIL blob storage v2), sub-byte types included;
- ``values``: protobuf values and types to NumPy;
- ``ops``: one NumPy function per Core ML operation;
- ``executor``: the program: constants and compressed weights materialised once at load,
  operations run in order, states kept between calls.
"""

from exporter.backends.coreml.interp.executor import CoreMLProgram, UnknownOperationError
from exporter.backends.coreml.interp.package import read_package

__all__ = ["CoreMLProgram", "UnknownOperationError", "read_package"]
