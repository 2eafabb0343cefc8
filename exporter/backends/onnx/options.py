"""[target.onnx]: the options of the onnx target."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class OnnxOptions:
    opset: int = 23  # the default ONNX domain's opset (23: RMSNormalization); recorded in the manifest
    # q/k/v and gate/up as one MatMulNBits each where stored alike: decode faster, long prefills a
    # little slower (docs/targets/onnx.md). false keeps them apart.
    fuse_projections: bool = True
