"""Execute a Core ML ML program (its ``main`` function) with NumPy.

At load: every ``const`` is decoded (inline or from the weight file) and every
``constexpr_*`` operation (compressed weights: int8/int4 blockwise, palettes) is evaluated
once, so a call runs only the runtime operations, in program order. An operation type the
interpreter does not implement is refused at load, naming it.

Precision: every result is converted to the type the program declares for it. fp16
results are rounded to fp16 (round to nearest even, overflow to inf), which is where an
fp16 Core ML program loses precision; the arithmetic inside one operation is float32
(matmul accumulation, the softmax of the fused attention), so this models fp16 storage
between operations, not each device's internal accumulation order. A device may differ
from the interpreter by that much; it is the same class of difference as between Core ML's
CPU, GPU and Neural Engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from exporter.backends.coreml.interp.blob import BlobFile
from exporter.backends.coreml.interp.ops import OPS, VARIADIC
from exporter.backends.coreml.interp.package import Package, read_package
from exporter.backends.coreml.interp.values import (
    FP16,
    as_storage,
    decode_value,
    dtype_name,
    storage_dtype,
    tensor_type,
)
from exporter.errors import ArtifactError, UnsupportedError

# Operations that only move or select values: their output holds input values unchanged, so
# an fp16 result needs no rounding (skipping it is most of the speed of a decode step).
EXACT_OPS = frozenset({
    "reshape", "transpose", "expand_dims", "squeeze", "tile", "slice_by_index", "slice_by_size", "slice_update",
    "concat", "stack", "split", "gather", "gather_along_axis", "read_state", "select", "band_part",
})


class UnknownOperationError(UnsupportedError):
    """The package uses an operation the interpreter does not implement."""


@dataclass
class _Step:
    op_type: str
    fn: object
    inputs: dict  # param -> ("var", name) | ("const", value) | ("list", [...])
    outputs: list  # [(name, dtype code, shape or None)]


@dataclass
class _Context:
    state: dict
    state_types: dict = field(default_factory=dict)

    def set_state(self, name: str, value) -> None:
        # The value is a program variable of the state's type, already rounded by the executor.
        self.state[name] = np.asarray(value, dtype=storage_dtype(self.state_types[name]))


class CoreMLProgram:
    """A loaded .mlpackage: ``new_state()`` and ``predict(inputs, state)`` like MLModel."""

    def __init__(self, path: str | Path, function: str = "main", *, blas_threads: int | None = 1) -> None:
        """``blas_threads``: NumPy BLAS threads during predict (None: leave as is). One by
        default: a decode step is a chain of small matrix-vector products, and on 2 shared
        cores two BLAS threads spinning against other processes made them 19x slower here."""
        self.package: Package = read_package(path)
        self._blas = _blas_limiter(blas_threads)
        program = self.package.spec.mlProgram
        if function not in program.functions:
            raise ArtifactError(f"{path}: the program has no function {function!r}")
        fn = program.functions[function]
        block = fn.block_specializations[fn.opset]
        self.opset = fn.opset
        self._blob_files: dict[str, BlobFile] = {}
        self.inputs: dict[str, tuple] = {}
        self.states: dict[str, tuple] = {}
        for named in fn.inputs:
            code, shape = tensor_type(named.type)
            target = self.states if named.type.WhichOneof("type") == "stateType" else self.inputs
            target[named.name] = (code, shape)
        unknown = sorted({op.type for op in block.operations if op.type != "const" and op.type not in OPS})
        if unknown:
            raise UnknownOperationError(
                f"{path}: the Core ML interpreter does not implement operation(s) {', '.join(unknown)}",
                hint="the package uses an operation our exports do not produce; "
                     "add it to exporter/backends/coreml/interp/ops.py",
            )
        self.constants: dict[str, object] = {}
        self.steps: list[_Step] = []
        for op in block.operations:
            self._load_op(op)
        self._pretranspose_linear_weights()
        self.output_names = list(block.outputs)
        self.op_types = sorted({s.op_type for s in self.steps} | {op.type for op in block.operations})

    # -- loading ------------------------------------------------------------------------

    def _blobs(self, file_name: str) -> BlobFile:
        if file_name not in self._blob_files:
            self._blob_files[file_name] = BlobFile(self.package.weight_file(file_name))
        return self._blob_files[file_name]

    def _load_op(self, op) -> None:
        if op.type == "const":
            self.constants[op.outputs[0].name] = decode_value(op.attributes["val"], self._blobs)
            return
        inputs = {}
        for param, argument in op.inputs.items():
            bindings = []
            for binding in argument.arguments:
                if binding.WhichOneof("binding") == "name":
                    bindings.append(("var", binding.name))
                else:
                    bindings.append(("const", decode_value(binding.value, self._blobs)))
            inputs[param] = ("list", bindings) if param in VARIADIC.get(op.type, ()) else bindings[0]
        outputs = [(o.name, *tensor_type(o.type)) for o in op.outputs]
        step = _Step(op.type, OPS[op.type], inputs, outputs)
        if op.type.startswith("constexpr_"):
            # Compressed weights: materialised once, as Core ML does at load or first use.
            values = self._run_step(step, self.constants, _Context(state={}))
            self.constants.update(values)
            return
        self.steps.append(step)

    def _pretranspose_linear_weights(self) -> None:
        """Give each linear with a constant weight a contiguous [in, out] copy (see ops.linear);
        drop the original when nothing else reads it."""
        readers: dict[str, int] = {}
        for step in self.steps:
            for binding in step.inputs.values():
                for b in (binding[1] if binding[0] == "list" else [binding]):
                    if b[0] == "var":
                        readers[b[1]] = readers.get(b[1], 0) + 1
        transposed: dict[str, np.ndarray] = {}
        self._transposed = transposed
        for step in self.steps:
            binding = step.inputs.get("weight")
            if step.op_type != "linear" or binding is None:
                continue
            if binding[0] == "const":
                step.inputs["weight_t"] = ("const", np.ascontiguousarray(binding[1].T))
                transposed[f"{step.outputs[0][0]}.weight"] = step.inputs["weight_t"][1]
            elif binding[1] in self.constants:
                name = binding[1]
                if name not in transposed:
                    transposed[name] = np.ascontiguousarray(self.constants[name].T)
                step.inputs["weight_t"] = ("const", transposed[name])
                readers[name] -= 1
                if readers[name] == 0:
                    del self.constants[name]
            else:
                continue
            del step.inputs["weight"]

    def materialized_constants(self) -> dict[str, np.ndarray]:
        """Every constant as the program uses it, compressed weights decompressed (linear
        weights in their stored [out, in] orientation)."""
        return {**self.constants, **{name: w.T for name, w in self._transposed.items()}}

    # -- running ------------------------------------------------------------------------

    def new_state(self) -> dict[str, np.ndarray]:
        """Zero-filled states, like MLModel.make_state()."""
        return {name: np.zeros(shape, dtype=storage_dtype(code)) for name, (code, shape) in self.states.items()}

    def predict(self, inputs: dict, state: dict | None = None) -> dict[str, np.ndarray]:
        env = dict(self.constants)
        for name, (code, _) in self.inputs.items():
            if name not in inputs:
                raise ArtifactError(f"missing input {name!r}")
            env[name] = as_storage(np.asarray(inputs[name]), code)
        if self.states and state is None:
            raise ArtifactError("this program has states: pass state=program.new_state()")
        ctx = _Context(state=state if state is not None else {},
                       state_types={name: code for name, (code, _) in self.states.items()})
        for name in self.states:
            env[name] = name  # a state is passed to read_state / write_state by name
        with self._blas():
            for step in self.steps:
                env.update(self._run_step(step, env, ctx))
        out = {}
        for name in self.output_names:
            value = env[name]
            out[name] = value.astype(np.float32) if value.dtype == np.float32 else value
        return out

    @staticmethod
    def _run_step(step: _Step, env: dict, ctx: _Context) -> dict:
        kwargs = {}
        for param, binding in step.inputs.items():
            if binding[0] == "list":
                kwargs[param] = [env[b[1]] if b[0] == "var" else b[1] for b in binding[1]]
            else:
                kwargs[param] = env[binding[1]] if binding[0] == "var" else binding[1]
        kwargs = {k: _scalar(v) for k, v in kwargs.items()}
        try:
            result = step.fn(ctx, **kwargs)
        except TypeError as exc:
            raise ArtifactError(f"operation {step.op_type} "
                                f"({step.outputs[0][0] if step.outputs else ''}): {exc}") from exc
        if not isinstance(result, tuple):
            result = (result,)
        values = {}
        exact = step.op_type in EXACT_OPS
        for (name, code, shape), value in zip(step.outputs, result, strict=False):
            if code != 2 and not (exact and value.dtype == storage_dtype(code)):
                value = as_storage(np.asarray(value), code)
            if shape is not None and np.shape(value) != shape:
                raise ArtifactError(f"operation {step.op_type} produced {name} of shape {np.shape(value)}, "
                                    f"the program declares {shape}")
            values[name] = value
        return values


def _blas_limiter(threads: int | None):
    import contextlib

    if threads is None:
        return contextlib.nullcontext
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional: without it BLAS keeps its own thread count
        return contextlib.nullcontext
    controller = ThreadpoolController()
    return lambda: controller.limit(limits=threads, user_api="blas")


def _scalar(value):
    """0-d arrays as Python scalars for parameters such as axis or epsilon; tensors unchanged."""
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype != object:
        return value.item() if value.dtype.kind in "biu" or value.dtype == np.bool_ else value
    return value


__all__ = ["CoreMLProgram", "UnknownOperationError", "FP16", "dtype_name"]
