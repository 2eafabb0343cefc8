"""One NumPy function per Core ML (MIL) operation.

Each function takes the operation's inputs as keyword arguments (NumPy arrays, Python
scalars for 0-d values, lists for variadic inputs) plus ``ctx`` (states, declared output
types) and returns its output, or a tuple of outputs. Arithmetic is float32 (float64 where
noted); the executor then rounds each output to its declared Core ML type (fp16 results
to fp16), so an operation does not round by itself. Semantics follow the MIL operation
reference (coremltools.converters.mil.mil.ops.defs, iOS 15-18 opsets).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

OPS: dict[str, Callable] = {}
# Inputs that bind a list of values rather than one.
VARIADIC = {"concat": {"values"}, "stack": {"values"}}


def op(*names: str):
    def register(fn):
        for name in names or (fn.__name__.rstrip("_"),):
            OPS[name] = fn
        return fn
    return register


def _axes(axes, rank):
    return tuple(int(a) % rank for a in np.atleast_1d(axes))


def _f32(x):
    return np.asarray(x, dtype=np.float32) if np.asarray(x).dtype.kind == "f" else np.asarray(x)


# ---- elementwise binary (broadcasting) -------------------------------------------------
_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.divide, "pow": np.power,
    "maximum": np.maximum, "minimum": np.minimum, "floor_div": np.floor_divide, "mod": np.mod,
    "equal": np.equal, "not_equal": np.not_equal, "less": np.less, "less_equal": np.less_equal,
    "greater": np.greater, "greater_equal": np.greater_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}


def _binary(fn):
    def run(ctx, x, y):
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            return fn(_f32(x), _f32(y))
    return run


for _name, _fn in _BINARY.items():
    OPS[_name] = _binary(_fn)

# ---- elementwise unary -----------------------------------------------------------------


def _sigmoid(x):
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


_UNARY = {
    "abs": np.abs, "exp": np.exp, "log": np.log, "sqrt": np.sqrt, "sin": np.sin, "cos": np.cos,
    "tanh": np.tanh, "floor": np.floor, "ceil": np.ceil, "round": np.round, "sign": np.sign,
    "square": np.square, "relu": lambda x: np.maximum(x, 0), "sigmoid": _sigmoid,
    "silu": lambda x: x * _sigmoid(x), "logical_not": np.logical_not,
}


def _unary(fn):
    def run(ctx, x):
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            return fn(_f32(x))
    return run


for _name, _fn in _UNARY.items():
    OPS[_name] = _unary(_fn)


@op()
def rsqrt(ctx, x, epsilon=1e-12):
    with np.errstate(divide="ignore"):
        return 1.0 / np.sqrt(_f32(x) + np.float32(epsilon))


@op()
def inverse(ctx, x, epsilon=1e-4):
    return 1.0 / (_f32(x) + np.float32(epsilon))


@op()
def clip(ctx, x, alpha, beta):
    return np.clip(_f32(x), alpha, beta)


@op()
def select(ctx, cond, a, b):
    return np.where(cond, a, b)


@op()
def cast(ctx, x, dtype):
    # The executor rounds/converts to the declared output type; float -> int truncates.
    x = np.asarray(x)
    if dtype.startswith(("int", "uint")) and x.dtype.kind == "f":
        return np.trunc(x)
    return x


# ---- reductions ----------------------------------------------------------------------


def _reduce(fn):
    def run(ctx, x, axes=None, keep_dims=False):
        x = _f32(x)
        axis = None if axes is None else _axes(axes, x.ndim)
        return fn(x, axis=axis, keepdims=bool(keep_dims))
    return run


for _name, _fn in {"reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max, "reduce_min": np.min,
                   "reduce_prod": np.prod}.items():
    OPS[_name] = _reduce(_fn)


@op()
def reduce_argmax(ctx, x, axis=-1, keep_dims=False):
    out = np.argmax(x, axis=int(axis))
    return np.expand_dims(out, int(axis)) if keep_dims else out


@op()
def softmax(ctx, x, axis=-1):
    x = _f32(x)
    e = np.exp(x - x.max(axis=int(axis), keepdims=True))
    return e / e.sum(axis=int(axis), keepdims=True)


# ---- linear algebra and attention ------------------------------------------------------


@op()
def linear(ctx, x, weight=None, bias=None, weight_t=None):
    """x @ weight.T + bias. ``weight_t`` is the executor's contiguous [in, out] copy of a
    constant weight: a 2-D BLAS call on it is about 5x faster than on the transposed view."""
    x = _f32(x)
    w_t = weight_t if weight_t is not None else _f32(weight).T
    out = (x.reshape(-1, x.shape[-1]) @ w_t).reshape(*x.shape[:-1], w_t.shape[1])
    return out if bias is None else out + bias


@op()
def matmul(ctx, x, y, transpose_x=False, transpose_y=False):
    x, y = _f32(x), _f32(y)
    if transpose_x:
        x = np.swapaxes(x, -1, -2)
    if transpose_y:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@op()
def scaled_dot_product_attention(ctx, query, key, value, attn_mask=None):
    """softmax(Q K^T / sqrt(d) + mask) V; a boolean mask keeps the True positions.

    Core ML's fused op keeps its intermediates internal; here they are float32 and only the
    output is rounded (to fp16 for an fp16 program)."""
    q, k, v = _f32(query), _f32(key), _f32(value)
    # A contiguous K^T: numpy's batched matmul on a transposed view skips BLAS (4x slower).
    scores = np.matmul(q, np.ascontiguousarray(np.swapaxes(k, -1, -2))) * np.float32(1.0 / np.sqrt(q.shape[-1]))
    if attn_mask is not None:
        if attn_mask.dtype == np.bool_:
            scores = np.where(attn_mask, scores, np.float32(-np.inf))
        else:
            scores = scores + attn_mask
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.matmul(weights, v)


# ---- shapes and data movement ----------------------------------------------------------


@op()
def reshape(ctx, x, shape):
    shape = [int(s) for s in np.atleast_1d(shape)]
    # A 0 keeps the input's size at that position (iOS 17 semantics).
    shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return np.reshape(x, shape)


@op()
def transpose(ctx, x, perm):
    return np.transpose(x, [int(p) for p in np.atleast_1d(perm)])


@op()
def expand_dims(ctx, x, axes):
    x = np.asarray(x)
    rank = x.ndim + len(np.atleast_1d(axes))
    return np.expand_dims(x, tuple(int(a) % rank for a in np.atleast_1d(axes)))


@op()
def squeeze(ctx, x, axes=None):
    x = np.asarray(x)
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, _axes(axes, x.ndim))


@op()
def concat(ctx, values, axis, interleave=False):
    arrays = [np.atleast_1d(v) for v in values]
    if interleave:
        stacked = np.stack(arrays, axis=int(axis) + 1 if int(axis) >= 0 else int(axis))
        shape = list(arrays[0].shape)
        shape[int(axis)] *= len(arrays)
        return stacked.reshape(shape)
    return np.concatenate(arrays, axis=int(axis))


@op()
def stack(ctx, values, axis):
    return np.stack(values, axis=int(axis))


@op()
def split(ctx, x, num_splits=None, split_sizes=None, axis=0):
    axis = int(axis)
    if split_sizes is not None:
        return tuple(np.split(x, np.cumsum(np.atleast_1d(split_sizes))[:-1], axis=axis))
    return tuple(np.split(x, int(num_splits), axis=axis))


@op()
def tile(ctx, x, reps):
    return np.tile(x, [int(r) for r in np.atleast_1d(reps)])


@op()
def shape(ctx, x):
    return np.array(np.shape(x), dtype=np.int32)


@op()
def fill(ctx, shape, value=0.0):
    return np.full([int(s) for s in np.atleast_1d(shape)], value)


@op()
def range_1d(ctx, start, end, step):
    return np.arange(start, end, step)


@op()
def band_part(ctx, x, lower=-1, upper=-1):
    rows, cols = x.shape[-2:]
    i = np.arange(rows)[:, None]
    j = np.arange(cols)[None, :]
    keep = np.ones((rows, cols), dtype=bool)
    if lower >= 0:
        keep &= i - j <= lower
    if upper >= 0:
        keep &= j - i <= upper
    return np.where(keep, x, np.zeros_like(x))


@op()
def gather(ctx, x, indices, axis=0, batch_dims=0, validate_indices=False):
    x = np.asarray(x)
    axis = int(axis) % x.ndim
    idx = np.asarray(indices).astype(np.int64)
    idx = np.where(idx < 0, idx + x.shape[axis], idx)
    if int(batch_dims) == 0:
        return np.take(x, idx, axis=axis)
    raise NotImplementedError("gather with batch_dims > 0")


@op()
def gather_along_axis(ctx, x, indices, axis=0, validate_indices=False):
    x = np.asarray(x)
    axis = int(axis) % x.ndim
    idx = np.asarray(indices).astype(np.int64)
    idx = np.where(idx < 0, idx + x.shape[axis], idx)
    return np.take_along_axis(x, idx, axis=axis)


def _index(x_shape, begin, end, stride, begin_mask, end_mask, squeeze_mask):
    rank = len(x_shape)
    begin = np.atleast_1d(begin).astype(np.int64)
    end = np.atleast_1d(end).astype(np.int64)
    stride = np.ones(rank, np.int64) if stride is None else np.atleast_1d(stride).astype(np.int64)
    flags = [np.zeros(rank, bool) if m is None else np.atleast_1d(m).astype(bool)
             for m in (begin_mask, end_mask, squeeze_mask)]
    index = []
    for i in range(rank):
        if flags[2][i]:
            index.append(int(begin[i]))
            continue
        b = None if flags[0][i] else int(begin[i])
        e = None if flags[1][i] else int(end[i])
        index.append(slice(b, e, int(stride[i])))
    return tuple(index)


@op()
def slice_by_index(ctx, x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    return np.asarray(x)[_index(np.shape(x), begin, end, stride, begin_mask, end_mask, squeeze_mask)]


@op()
def slice_by_size(ctx, x, begin, size):
    index = []
    for i, (b, s) in enumerate(zip(np.atleast_1d(begin), np.atleast_1d(size), strict=False)):
        b = int(b) % x.shape[i] if x.shape[i] else 0
        index.append(slice(b, None if int(s) == -1 else b + int(s)))
    return x[tuple(index)]


@op()
def slice_update(ctx, x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    out = np.array(x, copy=True)
    index = _index(out.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    target = out[index]
    out[index] = np.reshape(update, target.shape)
    return out


# ---- states (iOS 18) -------------------------------------------------------------------


@op()
def read_state(ctx, input):
    return ctx.state[input]


@op()
def write_state(ctx, input, data):
    ctx.set_state(input, data)
    return ()


@op()
def coreml_update_state(ctx, state, value):
    write_state(ctx, state, value)
    return value


# ---- compressed constants (evaluated once, at load) -----------------------------------


def _blockwise(data: np.ndarray, param: np.ndarray) -> np.ndarray:
    """``param`` repeated along each axis to ``data``'s shape (block = data dim / param dim)."""
    for axis, (n, m) in enumerate(zip(data.shape, param.shape, strict=False)):
        if n != m:
            param = np.repeat(param, n // m, axis=axis)
    return param


@op()
def constexpr_blockwise_shift_scale(ctx, data, scale, offset=None):
    values = data.astype(np.float32)
    if offset is not None:
        values = values - _blockwise(data, offset.astype(np.float32))
    return values * _blockwise(data, scale.astype(np.float32))


@op()
def constexpr_lut_to_dense(ctx, indices, lut, vector_axis=None):
    if lut.shape[-1] != 1:
        raise NotImplementedError("vector palettization (VECTOR_SIZE > 1)")
    rank = indices.ndim
    group_shape = lut.shape[:rank]
    palette = lut.shape[rank]
    table = lut.reshape(-1, palette)
    # Flat index of the lookup table each element uses.
    group = np.zeros(indices.shape, dtype=np.int64)
    for axis in range(rank):
        block = indices.shape[axis] // group_shape[axis]
        coord = (np.arange(indices.shape[axis]) // block).reshape([-1 if a == axis else 1 for a in range(rank)])
        group = group * group_shape[axis] + coord
    return table[group, indices.astype(np.int64)]


@op()
def constexpr_affine_dequantize(ctx, quantized_data, zero_point, scale, axis):
    """iOS 16 per-channel dequantization along ``axis`` (or per tensor for scalar parameters)."""
    along = [-1 if a == int(axis) else 1 for a in range(quantized_data.ndim)]
    zp = np.asarray(zero_point, np.float32)
    sc = np.asarray(scale, np.float32)
    zp = zp.reshape(along) if zp.ndim else zp
    sc = sc.reshape(along) if sc.ndim else sc
    return (quantized_data.astype(np.float32) - zp) * sc
