"""Each operation of the Core ML interpreter against a NumPy or PyTorch reference.

The interpreter's ops compute in float32 and leave rounding to the executor, so references
are float32 too; tolerances are float32 ones. ``test_every_op_has_a_test`` fails when an op
is added to exporter/coreml_interp/ops.py without a test here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from exporter.backends.coreml.interp.ops import OPS

rng = np.random.default_rng(0)
TESTED: set[str] = set()


def run(name, **kwargs):
    TESTED.add(name)
    return OPS[name](None, **kwargs)


def r(*shape):
    return rng.standard_normal(shape).astype(np.float32)


BINARY = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.divide, "maximum": np.maximum,
          "minimum": np.minimum, "equal": np.equal, "not_equal": np.not_equal, "less": np.less,
          "less_equal": np.less_equal, "greater": np.greater, "greater_equal": np.greater_equal}


@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_broadcast(name):
    x, y = r(2, 3, 4), r(3, 1)
    np.testing.assert_array_equal(run(name, x=x, y=y), BINARY[name](x, y))


def test_pow_floor_div_mod():
    x = np.abs(r(5)) + 0.5
    np.testing.assert_allclose(run("pow", x=x, y=2.0), torch.tensor(x).pow(2).numpy(), rtol=1e-6)
    a, b = np.array([7, -7, 9]), np.array([2, 2, 4])
    np.testing.assert_array_equal(run("floor_div", x=a, y=b),
                                  torch.div(torch.tensor(a), torch.tensor(b), rounding_mode="floor").numpy())
    np.testing.assert_array_equal(run("mod", x=a, y=b), np.mod(a, b))


def test_logical():
    a, b = np.array([True, False, True]), np.array([True, True, False])
    np.testing.assert_array_equal(run("logical_and", x=a, y=b), a & b)
    np.testing.assert_array_equal(run("logical_or", x=a, y=b), a | b)
    np.testing.assert_array_equal(run("logical_xor", x=a, y=b), a ^ b)
    np.testing.assert_array_equal(run("logical_not", x=a), ~a)


UNARY_TORCH = {"abs": torch.abs, "exp": torch.exp, "sin": torch.sin, "cos": torch.cos, "tanh": torch.tanh,
               "floor": torch.floor, "ceil": torch.ceil, "round": torch.round, "sign": torch.sign,
               "square": torch.square, "relu": torch.relu, "sigmoid": torch.sigmoid, "silu": F.silu}


@pytest.mark.parametrize("name", sorted(UNARY_TORCH))
def test_unary_against_torch(name):
    x = r(4, 8) * 3
    np.testing.assert_allclose(run(name, x=x), UNARY_TORCH[name](torch.tensor(x)).numpy(), rtol=1e-5, atol=1e-6)


def test_log_sqrt_rsqrt_inverse():
    x = np.abs(r(16)) + 0.1
    np.testing.assert_allclose(run("log", x=x), np.log(x), rtol=1e-6)
    np.testing.assert_allclose(run("sqrt", x=x), np.sqrt(x), rtol=1e-6)
    np.testing.assert_allclose(run("rsqrt", x=x, epsilon=1e-6), torch.rsqrt(torch.tensor(x) + 1e-6).numpy(), rtol=1e-6)
    np.testing.assert_allclose(run("inverse", x=x, epsilon=1e-4), 1 / (x + 1e-4), rtol=1e-6)


def test_clip_select_cast():
    x = r(10)
    np.testing.assert_array_equal(run("clip", x=x, alpha=-0.5, beta=0.5), np.clip(x, -0.5, 0.5))
    cond = x > 0
    np.testing.assert_array_equal(run("select", cond=cond, a=x, b=-x), np.abs(x))
    np.testing.assert_array_equal(run("cast", x=np.array([1.7, -1.7]), dtype="int32"), [1.0, -1.0])  # truncates
    np.testing.assert_array_equal(run("cast", x=x, dtype="fp16"), x)  # the executor rounds to the declared type


@pytest.mark.parametrize("name,ref", [
    ("reduce_mean", torch.mean),
    ("reduce_sum", torch.sum),
    ("reduce_max", torch.amax),
    ("reduce_min", torch.amin),
])
def test_reductions(name, ref):
    x = r(3, 4, 5)
    for keep in (False, True):
        np.testing.assert_allclose(run(name, x=x, axes=np.array([-1, 1]), keep_dims=keep),
                                   ref(torch.tensor(x), dim=(-1, 1), keepdim=keep).numpy(), rtol=1e-5)
    np.testing.assert_allclose(run("reduce_prod", x=x, axes=np.array([1])), np.prod(x, axis=1), rtol=1e-5)


def test_argmax_softmax():
    x = r(3, 7)
    np.testing.assert_array_equal(run("reduce_argmax", x=x, axis=-1), x.argmax(-1))
    np.testing.assert_allclose(run("softmax", x=x, axis=-1), torch.softmax(torch.tensor(x), -1).numpy(), rtol=1e-5)


def test_linear_and_matmul():
    x, w, b = r(1, 3, 8), r(5, 8), r(5)
    np.testing.assert_allclose(run("linear", x=x, weight=w, bias=b), F.linear(*map(torch.tensor, (x, w, b))).numpy(),
                               rtol=1e-5, atol=1e-5)
    a, c = r(2, 3, 4), r(2, 5, 4)
    np.testing.assert_allclose(run("matmul", x=a, y=c, transpose_y=True), a @ c.transpose(0, 2, 1), rtol=1e-5)
    np.testing.assert_allclose(run("matmul", x=a.transpose(0, 2, 1), y=c, transpose_x=True, transpose_y=True),
                               a @ c.transpose(0, 2, 1), rtol=1e-5)


def test_sdpa_bool_and_float_mask():
    q, k, v = r(1, 4, 3, 8), r(1, 4, 10, 8), r(1, 4, 10, 8)
    mask = np.arange(10)[None, :] <= (np.arange(3) + 5)[:, None]
    ref = F.scaled_dot_product_attention(*map(torch.tensor, (q, k, v)), attn_mask=torch.tensor(mask)).numpy()
    np.testing.assert_allclose(run("scaled_dot_product_attention", query=q, key=k, value=v, attn_mask=mask),
                               ref, atol=1e-5)
    additive = np.where(mask, 0, -3e4).astype(np.float32)
    np.testing.assert_allclose(run("scaled_dot_product_attention", query=q, key=k, value=v, attn_mask=additive),
                               ref, atol=1e-5)
    np.testing.assert_allclose(run("scaled_dot_product_attention", query=q, key=k, value=v),
                               F.scaled_dot_product_attention(*map(torch.tensor, (q, k, v))).numpy(), atol=1e-5)


def test_shape_ops():
    x = r(2, 3, 4)
    np.testing.assert_array_equal(run("reshape", x=x, shape=np.array([0, -1])), x.reshape(2, 12))
    np.testing.assert_array_equal(run("transpose", x=x, perm=np.array([2, 0, 1])), x.transpose(2, 0, 1))
    assert run("expand_dims", x=x, axes=np.array([0, -1])).shape == (1, 2, 3, 4, 1)
    assert run("squeeze", x=x[:, :1], axes=np.array([1])).shape == (2, 4)
    assert run("squeeze", x=x[:1, :1]).shape == (4,)
    np.testing.assert_array_equal(run("shape", x=x), [2, 3, 4])
    np.testing.assert_array_equal(run("tile", x=x, reps=np.array([1, 2, 1])), np.tile(x, (1, 2, 1)))
    np.testing.assert_array_equal(run("fill", shape=np.array([2, 2]), value=3.0), np.full((2, 2), 3.0))
    np.testing.assert_array_equal(run("range_1d", start=2, end=9, step=3), [2, 5, 8])


def test_concat_stack_split():
    a, b = r(2, 3), r(2, 3)
    np.testing.assert_array_equal(run("concat", values=[a, b], axis=-1), np.concatenate([a, b], -1))
    np.testing.assert_array_equal(run("concat", values=[a, b], axis=1, interleave=True),
                                  torch.stack([torch.tensor(a), torch.tensor(b)], 2).reshape(2, 6).numpy())
    np.testing.assert_array_equal(run("stack", values=[a, b], axis=0), np.stack([a, b]))
    parts = run("split", x=r(6, 2), split_sizes=np.array([1, 5]), axis=0)
    assert [p.shape for p in parts] == [(1, 2), (5, 2)]
    assert len(run("split", x=r(6, 2), num_splits=3, axis=0)) == 3


def test_band_part_matches_torch_tril():
    x = np.ones((4, 5), dtype=bool)
    np.testing.assert_array_equal(run("band_part", x=x, lower=-1, upper=0),
                                  torch.ones(4, 5, dtype=torch.bool).tril().numpy())


def test_gather():
    x, idx = r(10, 4), np.array([[3, -1], [0, 9]], dtype=np.int16)
    np.testing.assert_array_equal(run("gather", x=x, indices=idx, axis=0),
                                  F.embedding(torch.tensor(idx % 10).long(), torch.tensor(x)).numpy())
    idx2 = np.array([[0, 1, 2, 3]] * 10) % 4
    np.testing.assert_array_equal(run("gather_along_axis", x=x, indices=idx2[:, ::-1], axis=1),
                                  torch.gather(torch.tensor(x), 1, torch.tensor(idx2[:, ::-1].copy())).numpy())


def test_slice_by_index_masks_and_squeeze():
    x = r(1, 5, 4, 6)
    got = run("slice_by_index", x=x, begin=np.array([0, -1, 0, 2]), end=np.array([1, 0, 4, 6]),
              end_mask=np.array([True, True, True, False]), squeeze_mask=np.array([False, True, False, False]))
    np.testing.assert_array_equal(got, x[:, -1, :, 2:6])
    got = run("slice_by_index", x=x, begin=np.array([0, 1, 0, 0]), end=np.array([1, 5, 4, 6]),
              stride=np.array([1, 2, 1, 3]), begin_mask=np.array([True, False, True, True]))
    np.testing.assert_array_equal(got, x[:, 1:5:2, :, ::3])
    np.testing.assert_array_equal(run("slice_by_size", x=x, begin=np.array([0, 1, 0, 2]),
                                      size=np.array([-1, 2, 4, 3])),
                                  x[:, 1:3, :, 2:5])


def test_slice_update_writes_a_copy():
    cache = np.zeros((2, 8, 3), dtype=np.float32)
    update = r(2, 2, 3)
    out = run("slice_update", x=cache, update=update, begin=np.array([0, 5, 0]), end=np.array([0, 7, 0]),
              end_mask=np.array([True, False, True]))
    ref = torch.zeros(2, 8, 3)
    ref[:, 5:7, :] = torch.tensor(update)
    np.testing.assert_array_equal(out, ref.numpy())
    assert not cache.any()  # the input is not modified


class _States:
    def __init__(self):
        self.state = {"s": np.zeros(3, np.float32)}

    def set_state(self, name, value):
        self.state[name] = np.asarray(value, np.float32)


def test_states():
    ctx = _States()
    TESTED.update({"read_state", "write_state", "coreml_update_state"})
    assert OPS["write_state"](ctx, input="s", data=np.ones(3)) == ()
    np.testing.assert_array_equal(OPS["read_state"](ctx, input="s"), np.ones(3))
    np.testing.assert_array_equal(OPS["coreml_update_state"](ctx, state="s", value=np.full(3, 2.0)), np.full(3, 2.0))
    np.testing.assert_array_equal(ctx.state["s"], np.full(3, 2.0))


def test_blockwise_shift_scale():
    data = rng.integers(-8, 8, size=(4, 64)).astype(np.int8)
    scale = np.abs(r(4, 2)) + 0.01
    offset = rng.integers(-2, 2, size=(4, 2)).astype(np.int8)
    ref = (torch.tensor(data, dtype=torch.float32).reshape(4, 2, 32)
           - torch.tensor(offset, dtype=torch.float32)[..., None]) * torch.tensor(scale)[..., None]
    np.testing.assert_allclose(run("constexpr_blockwise_shift_scale", data=data, scale=scale, offset=offset),
                               ref.reshape(4, 64).numpy(), rtol=1e-6)
    per_channel = np.abs(r(4, 1))
    np.testing.assert_allclose(run("constexpr_blockwise_shift_scale", data=data, scale=per_channel),
                               data * per_channel, rtol=1e-6)


def test_lut_to_dense_per_grouped_channel():
    indices = rng.integers(0, 16, size=(6, 5)).astype(np.uint8)
    lut = r(3, 1, 16, 1)  # one palette per 2 rows
    ref = np.stack([lut[i // 2, 0, indices[i], 0] for i in range(6)])
    np.testing.assert_array_equal(run("constexpr_lut_to_dense", indices=indices, lut=lut), ref)


def test_affine_dequantize():
    q = rng.integers(0, 255, size=(3, 4)).astype(np.uint8)
    zp, sc = np.array([1, 2, 3], np.uint8), np.array([0.5, 1.0, 2.0], np.float32)
    np.testing.assert_allclose(run("constexpr_affine_dequantize", quantized_data=q, zero_point=zp, scale=sc, axis=0),
                               (q.astype(np.float32) - zp[:, None]) * sc[:, None])


def test_every_op_has_a_test():
    # Runs last in this file (pytest keeps definition order).
    untested = sorted(set(OPS) - TESTED)
    assert not untested, f"ops without a test: {untested}"
