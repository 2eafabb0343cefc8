"""Our block quantizer against ONNX Runtime's own kernels, one layer at a time."""

from __future__ import annotations

import numpy as np
import pytest

from exporter.backends.onnx.blocks import dequantize, fake_quantize_activation, quantize_blockwise


def _session(nodes, inputs, initializers):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def matmul_nbits(bq, accuracy_level: int):
    from onnx import TensorProto, helper, numpy_helper

    n, k = bq.shape
    inits = [numpy_helper.from_array(bq.packed, "B"), numpy_helper.from_array(bq.scales.reshape(-1), "S")]
    names = ["A", "B", "S"]
    if bq.zero_points is not None:
        inits.append(numpy_helper.from_array(bq.zero_points.reshape(-1), "Z"))
        names.append("Z")
    node = helper.make_node("MatMulNBits", names, ["Y"], domain="com.microsoft", K=k, N=n, bits=bq.bits,
                            block_size=bq.block_size, accuracy_level=accuracy_level)
    return _session([node], [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])], inits)


@pytest.mark.parametrize("bits,block,symmetric", [(4, 32, True), (4, 64, False), (8, 32, True), (8, 128, False)])
def test_matmul_nbits_computes_with_our_dequantized_weight(bits, block, symmetric):
    rng = np.random.default_rng(bits * block)
    weight = rng.standard_normal((96, 256)).astype(np.float32)
    bq = quantize_blockwise(weight, bits=bits, block_size=block, symmetric=symmetric)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    y = matmul_nbits(bq, accuracy_level=0).run(None, {"A": x})[0]
    assert np.abs(y - x @ dequantize(bq).T).max() < 1e-4
    # and it really is quantized: about half a step of error per weight
    step = (2 if symmetric else 1) * np.abs(weight).max() / ((1 << bits) - 1)
    assert 0 < np.abs(dequantize(bq) - weight).max() <= step


def test_accuracy_level_4_is_per_block_int8_activations():
    """fake_quantize_activation reproduces what the int8 kernel does to its input."""
    import torch

    rng = np.random.default_rng(7)
    bq = quantize_blockwise(rng.standard_normal((128, 576)).astype(np.float32), bits=4, block_size=32, symmetric=True)
    x = (rng.standard_normal((2, 576)) * 3).astype(np.float32)
    y = matmul_nbits(bq, accuracy_level=4).run(None, {"A": x})[0]
    w = dequantize(bq).astype(np.float64)
    emulated = fake_quantize_activation(torch.from_numpy(x), 32).numpy().astype(np.float64) @ w.T
    plain = x.astype(np.float64) @ w.T
    assert np.abs(y - emulated).max() < 5e-4 < 0.1 < np.abs(y - plain).max()


def test_gather_block_quantized_reads_the_same_storage():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    weight = rng.standard_normal((50, 64)).astype(np.float32)
    for bits, symmetric in ((4, True), (4, False), (8, False)):
        bq = quantize_blockwise(weight, bits=bits, block_size=32, symmetric=symmetric)
        inits = [numpy_helper.from_array(bq.packed.reshape(50, -1), "D"), numpy_helper.from_array(bq.scales, "S")]
        names = ["D", "I", "S"]
        if bq.zero_points is not None:
            inits.append(numpy_helper.from_array(bq.zero_points, "Z"))
            names.append("Z")
        node = helper.make_node("GatherBlockQuantized", names, ["Y"], domain="com.microsoft", bits=bits, block_size=32,
                                gather_axis=0, quantize_axis=1)
        session = _session([node], [helper.make_tensor_value_info("I", TensorProto.INT64, [None])], inits)
        ids = np.array([0, 7, 49], dtype=np.int64)
        assert np.array_equal(session.run(None, {"I": ids})[0], dequantize(bq)[ids])
