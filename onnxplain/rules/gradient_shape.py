"""Exact vector-Jacobian products of operators that move or select elements (reshapes,
transposes, slicing, concatenation, padding, resizing, reductions).

Every operator here is linear in its data input, except the max/min-like reductions, so
its gradient is the transposed map: a permutation goes back by the inverse permutation, a
selection scatters (and adds where one element was selected several times), a broadcast
sums. Index tensors are computed at compile time from the constant attributes and the
static (non-batch) shapes; the batch axis is left symbolic and read with `Shape` at run time.
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelError
from .base import attr, register


# --- shared pieces -----------------------------------------------------------------------

def _const_input(b, node, i: int, what: str):
    """The value of optional input `i` (None when absent); it must be fixed at compile time."""
    if len(node.input) <= i or not node.input[i]:
        return None
    value = b.constant(node.input[i])
    if value is None:
        raise ModelError(
            f"{node.op_type} node '{node.name}': its {what} input '{node.input[i]}' is computed at run time; "
            "onnxplain needs it constant to build the gradient (fold the shape computation into a constant)"
        )
    return value


def _dim(b, x: str, axis: int) -> str:
    """The length of `axis` of `x` at run time, as a 1-element int64 tensor."""
    return b.op("Shape", x, start=axis, end=axis + 1)


def _static(dim) -> bool:
    return isinstance(dim, (int, np.integer))


def _static_dim(b, node, x: str, axis: int, why: str) -> int:
    shape = b.shape(x)
    if shape is None or not _static(shape[axis]):
        raise ModelError(
            f"{node.op_type} node '{node.name}': the gradient needs the length of axis {axis} of '{x}' "
            f"({why}), which is not static (shape {shape}); give the model static input shapes"
        )
    return int(shape[axis])


def _axis_matrix(b, g: str, axis: int, rank: int, m: np.ndarray, like: str) -> str:
    """Contract axis `axis` of `g` (length m.shape[0]) with matrix m, in the element type of
    forward tensor `like`: the result has length m.shape[1] there. For a forward map along
    one axis y[k] = sum_j m[k, j] x[j], this is the vector-Jacobian product."""
    last = rank - 1
    if axis != last:
        perm = [i for i in range(rank) if i != axis] + [axis]
        g = b.op("Transpose", g, perm=perm)
    g = b.op("MatMul", g, b.const(m, b.np_dtype(like)))
    if axis != last:
        g = b.op("Transpose", g, perm=[int(i) for i in np.argsort(perm)])
    return g


def _one_hot_matrix(src: np.ndarray, d: int) -> np.ndarray:
    """m[k, j] = 1 where output position k reads input position src[k]."""
    m = np.zeros((len(src), d))
    m[np.arange(len(src)), src] = 1.0
    return m


def _grads_out(node, grads):
    return [grads[0]] + [None] * (len(node.input) - 1)


# --- reshapes and permutations -----------------------------------------------------------

@register("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(b, node, grads):
    # Element order is unchanged: the gradient takes the input's shape back.
    return [b.reshape_like(grads[0], node.input[0])] + [None] * (len(node.input) - 1)


@register("Transpose")
def transpose(b, node, grads):
    perm = attr(node, "perm")
    if perm is None:
        perm = list(range(b.rank(node.input[0])))[::-1]
    return [b.op("Transpose", grads[0], perm=[int(i) for i in np.argsort(perm)])]


@register("DepthToSpace")
def depth_to_space(b, node, grads):
    bs = int(attr(node, "blocksize"))
    if attr(node, "mode", "DCR") == "DCR":
        # SpaceToDepth is exactly the inverse permutation of DCR DepthToSpace.
        return [b.op("SpaceToDepth", grads[0], blocksize=bs)]
    # CRD: x (N, C, bs, bs, H, W) -> y (N, C, H, bs, W, bs); undo it.
    _, c, h, w = b.shape(node.input[0])
    g = b.op("Reshape", grads[0], b.ints([-1, c // (bs * bs), h, bs, w, bs]))
    g = b.op("Transpose", g, perm=[0, 1, 3, 5, 2, 4])
    return [b.reshape_like(g, node.input[0])]


@register("SpaceToDepth")
def space_to_depth(b, node, grads):
    return [b.op("DepthToSpace", grads[0], blocksize=int(attr(node, "blocksize")), mode="DCR")]


# --- joining and splitting ---------------------------------------------------------------

@register("Concat")
def concat(b, node, grads):
    if len(node.input) == 1:
        return [grads[0]]
    known = b.shape(node.output[0])
    axis = int(attr(node, "axis"))
    sizes = [None] * len(node.input)
    if known is not None:
        axis %= len(known)
        sizes = [(b.shape(x) or [None] * len(known))[axis] for x in node.input]
    if all(_static(s) for s in sizes):
        parts = b.op("Split", grads[0], b.ints(sizes), axis=axis, outputs=len(sizes))
        return list(parts)
    # A length (or the rank, and with it a negative axis) is only known at run time.
    out, start = [], b.ints([0])
    for x in node.input:
        length = _dim(b, x, axis) if axis >= 0 else b.op("Gather", b.shape_of(x), b.ints([axis]))
        end = b.op("Add", start, length)
        out.append(b.op("Slice", grads[0], start, end, b.ints([axis])))
        start = end
    return out


@register("Split")
def split(b, node, grads):
    axis = int(attr(node, "axis", 0))
    if axis >= 0 or b.shape(node.input[0]) is not None:  # Concat takes a negative axis as it is
        axis %= b.rank(node.input[0])
    parts = [g if g is not None else b.zeros_like(o) for g, o in zip(grads, node.output)]
    g = parts[0] if len(parts) == 1 else b.op("Concat", *parts, axis=axis)
    return _grads_out(node, [g])


# --- selection ---------------------------------------------------------------------------

def _slice_indices(start, end, step, d: int) -> list[int]:
    # Python's slice clamping is the ONNX one (negative values count from the end; ends
    # clamp to [-1, d-1] for negative steps and to [0, d] otherwise).
    return list(range(d))[slice(int(start), int(end), int(step))]


def _slice_at_run_time(b, node, g):
    """Slice's adjoint by where the selected elements come from: the same Slice of the
    input's flat positions, then a scatter. Exact for any starts/ends/axes/steps, these
    computed at run time or lengths only known then."""
    x = node.input[0]
    picked = b.op("Slice", b.positions(x), *node.input[1:])
    return _grads_out(node, [b.scatter_to(g, picked, x)])


@register("Slice")
def slice_(b, node, grads):
    x = node.input[0]
    shape = b.shape(x)
    if shape is None or any(len(node.input) > i and node.input[i] and b.constant(node.input[i]) is None
                            for i in range(1, 5)):
        return _slice_at_run_time(b, node, grads[0])
    rank = len(shape)
    starts = _const_input(b, node, 1, "starts")
    ends = _const_input(b, node, 2, "ends")
    axes = _const_input(b, node, 3, "axes")
    steps = _const_input(b, node, 4, "steps")
    axes = list(range(len(starts))) if axes is None else [int(a) % rank for a in axes]
    steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
    g = grads[0]
    befores = [0] * rank
    unit = any(st == 1 for st in steps)
    for a, s, e, st in zip(axes, starts, ends, steps):
        d = shape[a]
        if not _static(d):
            if st == 1 and s >= 0:
                befores[a] = int(s)
                continue
            return _slice_at_run_time(b, node, grads[0])
        idx = _slice_indices(s, e, st, d)
        if st == 1:
            befores[a] = idx[0] if idx else 0
            continue
        # Scatter by gathering: append one zero along the axis and read it wherever the
        # input position was not selected.
        pos = np.full(d, len(idx), dtype=np.int64)
        pos[idx] = np.arange(len(idx))
        pads = [0] * (2 * rank)
        pads[rank + a] = 1
        g = b.op("Gather", b.op("Pad", g, b.ints(pads)), b.const(pos, np.int64), axis=a)
    if not unit:
        return _grads_out(node, [g])
    # Unit-step axes: zero-pad back; what comes after is whatever length is missing.
    before = b.ints(befores)
    after = b.op("Sub", b.op("Sub", b.shape_of(x), b.shape_of(g)), before)
    g = b.op("Pad", g, b.op("Concat", before, after, axis=0))
    return _grads_out(node, [g])


@register("ReverseSequence")
def reverse_sequence(b, node, grads):
    # Reversing the first sequence_lens[i] steps of each batch entry is its own inverse
    # (and a permutation): the gradient goes back by the same reversal.
    return [b.op("ReverseSequence", grads[0], node.input[1], **{a.name: attr(node, a.name) for a in node.attribute}),
            None]


@register("OptionalGetElement")
def optional_get_element(b, node, grads):
    # A tensor input (or a present optional tensor) is passed through unchanged.
    if not b.graph.is_float(node.input[0]):
        raise ModelError(f"OptionalGetElement node '{node.name}': the gradient supports a tensor input, "
                         "not an optional or a sequence")
    return [grads[0]]


@register("Gather")
def gather(b, node, grads):
    data, indices = node.input[0], node.input[1]
    rank = b.rank(data)
    axis = int(attr(node, "axis", 0)) % rank
    g = grads[0]
    idx = b.constant(indices)
    q_rank = idx.ndim if idx is not None else b.rank(indices)
    # View the indices as one axis of length m at `axis`, and the gradient likewise.
    if q_rank == 0:
        g = b.unsqueeze(g, [axis])
    elif q_rank > 1:
        target = b.op("Concat", b.op("Shape", data, start=0, end=axis), b.ints([-1]),
                      b.op("Shape", data, start=axis + 1), axis=0)
        g = b.op("Reshape", g, target)
    view = [1] * axis + [-1] + [1] * (rank - axis - 1)
    if idx is not None:
        idx = idx.astype(np.int64)
        d = b.shape(data)[axis]
        if _static(d):
            idx = np.where(idx < 0, idx + d, idx)
        where = b.const(idx.reshape(view), np.int64)
    else:
        # Indices computed at run time; ScatterElements accepts negative ones as Gather does.
        where = b.op("Reshape", b.op("Cast", indices, to=7), b.ints(view))
    where = b.op("Expand", where, b.shape_of(g))
    # reduction="add": an index repeated in `indices` receives the sum of its gradients.
    out = b.op("ScatterElements", b.zeros_like(data), where, g, axis=axis, reduction="add")
    return [out, None]


@register("GatherElements")
def gather_elements(b, node, grads):
    data = node.input[0]
    axis = int(attr(node, "axis", 0)) % b.rank(data)
    out = b.op("ScatterElements", b.zeros_like(data), node.input[1], grads[0], axis=axis, reduction="add")
    return [out, None]


@register("GatherND")
def gather_nd(b, node, grads):
    if int(attr(node, "batch_dims", 0)) != 0:
        raise ModelError(f"GatherND node '{node.name}': the gradient supports batch_dims=0 only")
    out = b.op("ScatterND", b.zeros_like(node.input[0]), node.input[1], grads[0], reduction="add")
    return [out, None]


# --- padding -----------------------------------------------------------------------------

def _pad_source(mode: str, before: int, d: int, n_out: int) -> np.ndarray:
    """For each output position along one axis, the input position it copies."""
    i = np.arange(n_out) - before
    if mode == "edge":
        return np.clip(i, 0, d - 1)
    if mode == "wrap":
        return np.mod(i, d)
    if mode == "reflect":
        if d == 1:
            return np.zeros(n_out, dtype=np.int64)
        period = 2 * (d - 1)
        i = np.mod(i, period)
        return np.where(i < d, i, period - i)
    raise ModelError(f"Pad mode '{mode}' is not supported by the gradient (constant, reflect, edge, wrap are)")


@register("Pad")
def pad(b, node, grads):
    x = node.input[0]
    mode = attr(node, "mode", "constant")
    if mode == "constant" and any(len(node.input) > i and node.input[i] and b.constant(node.input[i]) is None
                                  for i in (1, 3)):
        # Pads (or axes) computed at run time: padding by the negated amounts, on the same
        # axes, is still the adjoint.
        neg = b.op("Neg", node.input[1])
        axes_in = node.input[3] if len(node.input) > 3 and node.input[3] else None
        return _grads_out(node, [b.op("Pad", grads[0], neg, None, axes_in) if axes_in
                                 else b.op("Pad", grads[0], neg)])
    rank = b.rank(x)
    pads = _const_input(b, node, 1, "pads").astype(np.int64)
    axes = _const_input(b, node, 3, "axes")
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
    full = np.zeros(2 * rank, dtype=np.int64)
    for k, a in enumerate(axes):
        full[a], full[rank + a] = pads[k], pads[len(axes) + k]
    g = grads[0]
    if mode == "constant":
        # Padding with the negated amounts crops what was added and zero-fills what was cropped.
        return _grads_out(node, [b.op("Pad", g, b.ints(-full))])
    # reflect / edge / wrap copy input elements: scatter-add them back, one axis at a time.
    for a in range(rank):
        before, after = int(full[a]), int(full[rank + a])
        if before == 0 and after == 0:
            continue
        d = _static_dim(b, node, x, a, f"'{mode}' padding along it")
        src = _pad_source(mode, before, d, d + before + after)
        g = _axis_matrix(b, g, a, rank, _one_hot_matrix(src, d), x)
    return _grads_out(node, [g])


# --- broadcasting and tiling ---------------------------------------------------------------

@register("Expand")
def expand(b, node, grads):
    return [b.unbroadcast(grads[0], node.output[0], node.input[0]), None]


@register("Tile")
def tile(b, node, grads):
    x = node.input[0]
    reps = _const_input(b, node, 1, "repeats").astype(np.int64).reshape(-1)
    if (reps == 1).all():
        return [grads[0], None]
    k = len(reps)
    # View the gradient as (r0, d0, r1, d1, ...) and sum over the repetitions.
    pairs = b.op("Concat", b.unsqueeze(b.ints(reps), [1]), b.unsqueeze(b.shape_of(x), [1]), axis=1)
    g = b.op("Reshape", grads[0], b.op("Reshape", pairs, b.ints([-1])))
    return [b.reduce_sum(g, list(range(0, 2 * k, 2)), keepdims=False), None]


# --- reductions --------------------------------------------------------------------------

def _reduce_axes(b, node, rank: int):
    axes = attr(node, "axes")
    if axes is None:
        axes = _const_input(b, node, 1, "axes")
    if axes is None or len(axes) == 0:
        return None if int(attr(node, "noop_with_empty_axes", 0)) else list(range(rank))
    return sorted(int(a) % rank for a in np.asarray(axes).reshape(-1))


def _reduced_count(b, node, x: str, axes) -> str:
    shape = b.shape(x)
    dims = [shape[a] for a in axes]
    if all(_static(d) for d in dims):
        return b.scalar_like(float(np.prod(dims)), x)
    # The batch axis is reduced: count at run time.
    return b.cast_like(b.op("Div", b.op("Size", x), b.op("Size", node.output[0])), x)


def _reduce_backward(b, op, x, yk, g, count, tie_count):
    """The gradient at x of reduction `op`, from g and the forward result yk, both in the
    shape with the reduced axes kept; count() is the number of elements reduced into each
    result, tie_count(mask) the sum of a mask over the reduced axes."""
    if op == "ReduceSum":
        return b.op("Expand", g, b.shape_of(x))
    if op == "ReduceMean":
        return b.op("Expand", b.op("Div", g, count()), b.shape_of(x))
    if op in ("ReduceMax", "ReduceMin"):
        # Ties share the gradient equally (the convention of torch.amax/amin).
        mask = b.cast_like(b.op("Equal", x, yk), x)
        return b.mul(mask, b.op("Div", g, tie_count(mask)))
    if op == "ReduceL1":
        return b.mul(g, b.op("Sign", x))
    if op == "ReduceL2":
        # d|x|/dx = x / |x|, taken as 0 where |x| = 0 (the subgradient of least norm).
        zero = b.scalar_like(0.0, x)
        safe = b.op("Where", b.op("Equal", yk, zero), b.scalar_like(1.0, x), yk)
        return b.mul(g, b.op("Div", x, safe))
    if op == "ReduceSumSquare":
        return b.mul(g, b.mul(x, b.scalar_like(2.0, x)))
    if op == "ReduceLogSum":
        return b.op("Expand", b.op("Div", g, b.op("Exp", yk)), b.shape_of(x))
    # ReduceLogSumExp: softmax over the reduced axes
    return b.mul(g, b.op("Exp", b.op("Sub", x, yk)))


@register("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2",
          "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp")
def reduce(b, node, grads):
    x, y = node.input[0], node.output[0]
    if attr(node, "axes") is None and len(node.input) > 1 and node.input[1] and b.constant(node.input[1]) is None:
        return _reduce_at_run_time(b, node, grads[0])
    rank = b.rank(x)
    axes = _reduce_axes(b, node, rank)
    g = grads[0]
    if axes is None:  # noop_with_empty_axes: the identity
        return _grads_out(node, [g])
    keep = int(attr(node, "keepdims", 1))
    if not keep:
        g = b.unsqueeze(g, axes)
    yk = y if keep else b.unsqueeze(y, axes)
    out = _reduce_backward(b, node.op_type, x, yk, g, lambda: _reduced_count(b, node, x, axes),
                           lambda mask: b.reduce_sum(mask, axes, keepdims=True))
    return _grads_out(node, [out])


def _reduce_at_run_time(b, node, g):
    """A reduction whose axes input is computed at run time. The forward reduction redone
    with keepdims=1 gives the kept shape (whatever the axes, noop_with_empty_axes
    included), to which the gradient is reshaped and broadcast; the max/min tie counts
    reduce over the same axes tensor."""
    x, op = node.input[0], node.op_type
    axes, noop = node.input[1], int(attr(node, "noop_with_empty_axes", 0))
    yk = b.op(op, x, axes, keepdims=1, noop_with_empty_axes=noop)
    g = b.op("Reshape", g, b.shape_of(yk))
    out = _reduce_backward(
        b, op, x, yk, g, lambda: b.cast_like(b.op("Div", b.op("Size", x), b.op("Size", yk)), x),
        lambda mask: b.op("ReduceSum", mask, axes, keepdims=1, noop_with_empty_axes=noop))
    # Broadcasting g against x (Mul above) already has x's shape except for Sum-like ones.
    return _grads_out(node, [b.op("Expand", out, b.shape_of(x))])


# --- resizing ----------------------------------------------------------------------------

_F = np.float32  # onnxruntime computes sampling coordinates in float32; so do we, to agree at ties


def _source_coords(ctm: str, dout: int, din: int, scale, roi, out_len_float) -> np.ndarray:
    x = np.arange(dout, dtype=_F)
    s = _F(scale)
    if ctm == "half_pixel":
        return (x + _F(0.5)) / s - _F(0.5)
    if ctm == "half_pixel_symmetric":
        adjustment = _F(dout) / _F(out_len_float)
        offset = _F(din) / _F(2) * (_F(1) - adjustment)
        return offset + (x + _F(0.5)) / s - _F(0.5)
    if ctm == "pytorch_half_pixel":
        # The spec says -0.5 for a length-1 output; onnxruntime samples at 0 (they differ for cubic).
        return (x + _F(0.5)) / s - _F(0.5) if dout > 1 else np.zeros(dout, dtype=_F)
    if ctm == "align_corners":
        return x * _F(din - 1) / _F(dout - 1) if dout > 1 else np.zeros(dout, dtype=_F)
    if ctm == "asymmetric":
        return x / s
    if ctm == "tf_crop_and_resize":
        r0, r1 = _F(roi[0]), _F(roi[1])
        if dout > 1:
            return r0 * _F(din - 1) + x * (r1 - r0) * _F(din - 1) / _F(dout - 1)
        return np.full(dout, _F(0.5) * (r0 + r1) * _F(din - 1), dtype=_F)
    raise ModelError(f"Resize coordinate_transformation_mode '{ctm}' is not supported by the gradient")


def _nearest_index(xo: np.ndarray, mode: str) -> np.ndarray:
    fl = np.floor(xo)
    if mode == "floor":
        r = fl
    elif mode == "ceil":
        r = np.ceil(xo)
    elif mode == "round_prefer_floor":
        r = np.where(xo - fl == _F(0.5), fl, np.round(xo))
    elif mode == "round_prefer_ceil":
        r = np.where(xo - fl == _F(0.5), fl + 1, np.round(xo))
    else:
        raise ModelError(f"Resize nearest_mode '{mode}' is not supported by the gradient")
    return r.astype(np.int64)


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
    """Keys cubic convolution weights of the 4 neighbours floor(x)-1 .. floor(x)+2."""
    def near(u):  # |u| <= 1
        return ((a + 2) * u - (a + 3)) * u * u + 1

    def far(u):  # 1 < |u| < 2
        return ((a * u - 5 * a) * u + 8 * a) * u - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)


def resize_matrix(mode: str, ctm: str, din: int, dout: int, scale, *, nearest_mode="round_prefer_floor",
                  cubic_a=-0.75, exclude_outside=False, roi=(0.0, 1.0), out_len_float=None) -> np.ndarray:
    """The (dout, din) matrix of a 1-D Resize along one axis: y = m @ x."""
    xo = _source_coords(ctm, dout, din, scale, roi, out_len_float if out_len_float is not None else dout)
    m = np.zeros((dout, din))
    rows = np.arange(dout)
    if mode == "nearest":
        m[rows, np.clip(_nearest_index(xo, nearest_mode), 0, din - 1)] = 1.0
    elif mode == "linear":
        xc = np.clip(xo.astype(np.float64), 0, din - 1)
        i0 = np.floor(xc).astype(np.int64)
        t = xc - i0
        i1 = np.minimum(i0 + 1, din - 1)
        np.add.at(m, (rows, i0), 1 - t)
        np.add.at(m, (rows, i1), t)
    elif mode == "cubic":
        xd = xo.astype(np.float64)
        i0 = np.floor(xd).astype(np.int64)
        w = _cubic_weights(xd - i0, cubic_a)
        idx = i0[:, None] + np.arange(-1, 3)[None, :]
        if exclude_outside:
            w = np.where((idx >= 0) & (idx < din), w, 0.0)
            w = w / w.sum(axis=1, keepdims=True)
        for k in range(4):
            np.add.at(m, (rows, np.clip(idx[:, k], 0, din - 1)), w[:, k])
    else:
        raise ModelError(f"Resize mode '{mode}' is not supported by the gradient")
    if ctm == "tf_crop_and_resize":
        # Positions sampled outside the input take extrapolation_value, a constant.
        m[(xo < 0) | (xo > din - 1)] = 0.0
    return m


def _resize_plan(b, node, x: str, rank: int):
    """Per axis (in length, out length, scale) with scales/sizes spread over all axes."""
    shape = list(b.shape(x))
    roi = _const_input(b, node, 1, "roi") if len(node.input) > 1 else None
    scales = _const_input(b, node, 2, "scales") if len(node.input) > 2 else None
    sizes = _const_input(b, node, 3, "sizes") if len(node.input) > 3 else None
    scales = None if scales is None or scales.size == 0 else scales.astype(np.float32).reshape(-1)
    sizes = None if sizes is None or sizes.size == 0 else sizes.astype(np.int64).reshape(-1)
    axes = attr(node, "axes")
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
    if roi is not None and roi.size:
        roi = np.asarray(roi, dtype=np.float32).reshape(-1)
        full_roi = [(0.0, 1.0)] * rank
        for k, a in enumerate(axes):
            full_roi[a] = (roi[k], roi[len(axes) + k])
    else:
        full_roi = [(0.0, 1.0)] * rank
    full_scales = [1.0] * rank
    full_sizes = [None] * rank
    if scales is not None:
        for k, a in enumerate(axes):
            full_scales[a] = float(scales[k])
    elif sizes is not None:
        policy = attr(node, "keep_aspect_ratio_policy", "stretch")
        ratios = {a: _F(sizes[k]) / _F(shape[a]) for k, a in enumerate(axes) if _static(shape[a])}
        if policy in ("not_larger", "not_smaller") and ratios:
            common = (min if policy == "not_larger" else max)(ratios.values())
            for a in ratios:
                full_scales[a] = float(common)
                full_sizes[a] = int(np.floor(float(common) * shape[a] + 0.5))
        else:
            for k, a in enumerate(axes):
                full_sizes[a] = int(sizes[k])
                if a in ratios:
                    full_scales[a] = float(ratios[a])
    else:
        raise ModelError(f"Resize node '{node.name}': neither scales nor sizes is given")
    out_shape = b.shape(node.output[0]) or [None] * rank
    plan = []
    for a in range(rank):
        din, s = shape[a], full_scales[a]
        if not _static(din):
            # The batch axis: scaling it would mix samples, which no exported model does.
            if scales is not None and s != 1.0:
                raise ModelError(f"Resize node '{node.name}': resizing axis {a}, whose length is only known "
                                 "at run time, is not supported")
            plan.append(None)
            continue
        if full_sizes[a] is not None:
            dout = full_sizes[a]
        elif _static(out_shape[a]):
            dout = int(out_shape[a])
        else:
            dout = int(np.floor(din * np.float32(s)))
        plan.append((int(din), dout, s, full_roi[a]))
    return plan


def _runtime_input(b, node, i: int) -> bool:
    return len(node.input) > i and bool(node.input[i]) and b.constant(node.input[i]) is None


def _coords_at_run_time(b, ctm, x_out, dout, din, s, roi):
    """_source_coords with lengths and scale known at run time (float scalars like x_out)."""
    one, half = _c1(b, 1.0, x_out), _c1(b, 0.5, x_out)
    many = b.op("Greater", dout, one)
    if ctm in ("half_pixel", "pytorch_half_pixel", "half_pixel_symmetric"):
        xo = b.op("Sub", b.op("Div", b.op("Add", x_out, half), s), half)
        if ctm == "pytorch_half_pixel":
            xo = b.op("Where", many, xo, _c1(b, 0.0, x_out))
        elif ctm == "half_pixel_symmetric":
            adjustment = b.op("Div", dout, b.mul(s, din))
            offset = b.mul(b.op("Div", din, _c1(b, 2.0, x_out)), b.op("Sub", one, adjustment))
            xo = b.op("Add", offset, xo)
        return xo
    if ctm == "align_corners":
        span = b.op("Div", b.op("Sub", din, one), b.op("Max", b.op("Sub", dout, one), one))
        return b.op("Where", many, b.mul(x_out, span), _c1(b, 0.0, x_out))
    if ctm == "asymmetric":
        return b.op("Div", x_out, s)
    if ctm == "tf_crop_and_resize":
        r0, r1 = _c1(b, float(roi[0]), x_out), _c1(b, float(roi[1]), x_out)
        last = b.op("Sub", din, one)
        span = b.op("Div", b.mul(b.op("Sub", r1, r0), last), b.op("Max", b.op("Sub", dout, one), one))
        spread = b.op("Add", b.mul(r0, last), b.mul(x_out, span))
        centre = b.mul(b.mul(half, b.op("Add", r0, r1)), last)
        return b.op("Where", many, spread, b.op("Expand", centre, b.shape_of(x_out)))
    raise ModelError(f"Resize coordinate_transformation_mode '{ctm}' is not supported by the gradient")


def _c1(b, v, like):
    return b.scalar_like(v, like)


def _resize_matrix_at_run_time(b, node, mode, ctm, dout_i, din_i, s, roi):
    """The (dout, din) matrix of resize_matrix, emitted as ONNX ops (float32 coordinates)."""
    f = np.float32
    zero_i, one_i = b.const(np.array(0, np.int64), np.int64), b.const(np.array(1, np.int64), np.int64)
    x_out = b.op("Cast", b.op("Range", zero_i, dout_i, one_i), to=1)
    dout, din = b.op("Cast", dout_i, to=1), b.op("Cast", din_i, to=1)
    xo = _coords_at_run_time(b, ctm, x_out, dout, din, s, roi)
    last = b.op("Sub", din, b.const(f(1), f))
    values = b.const(np.array([0.0, 1.0], f), f)

    def hot(i):  # (dout, din) one-hot rows of the float index i, clipped into the input
        i = b.op("Cast", b.op("Clip", i, b.const(f(0), f), last), to=7)
        return b.op("OneHot", i, din_i, values, axis=-1)

    def col(v):
        return b.unsqueeze(v, [1])

    fl = b.op("Floor", xo)
    if mode == "nearest":
        nm = attr(node, "nearest_mode", "round_prefer_floor")
        tie = b.op("Equal", b.op("Sub", xo, fl), b.const(f(0.5), f))
        if nm == "floor":
            idx = fl
        elif nm == "ceil":
            idx = b.op("Ceil", xo)
        elif nm == "round_prefer_floor":
            idx = b.op("Where", tie, fl, b.op("Round", xo))
        elif nm == "round_prefer_ceil":
            idx = b.op("Where", tie, b.op("Add", fl, b.const(f(1), f)), b.op("Round", xo))
        else:
            raise ModelError(f"Resize nearest_mode '{nm}' is not supported by the gradient")
        m = hot(idx)
    elif mode == "linear":
        xc = b.op("Clip", xo, b.const(f(0), f), last)
        i0 = b.op("Floor", xc)
        t = b.op("Sub", xc, i0)
        i1 = b.op("Min", b.op("Add", i0, b.const(f(1), f)), last)
        m = b.op("Add", b.mul(hot(i0), col(b.op("Sub", b.const(f(1), f), t))), b.mul(hot(i1), col(t)))
    elif mode == "cubic":
        a = float(attr(node, "cubic_coeff_a", -0.75))
        t = b.op("Sub", xo, fl)
        def near(u):
            return b.op("Add", b.mul(b.mul(b.op("Sub", b.mul(u, b.const(f(a + 2), f)), b.const(f(a + 3), f)), u), u),
                        b.const(f(1), f))
        def far(u):
            inner = b.op("Add", b.mul(b.op("Sub", b.mul(u, b.const(f(a), f)), b.const(f(5 * a), f)), u),
                         b.const(f(8 * a), f))
            return b.op("Sub", b.mul(inner, u), b.const(f(4 * a), f))
        one = b.const(f(1), f)
        ws = [far(b.op("Add", t, one)), near(t), near(b.op("Sub", one, t)), far(b.op("Sub", b.const(f(2), f), t))]
        idx = [b.op("Add", fl, b.const(f(k - 1), f)) for k in range(4)]
        if int(attr(node, "exclude_outside", 0)):
            inside = [b.op("And", b.op("GreaterOrEqual", i, b.const(f(0), f)), b.op("LessOrEqual", i, last))
                      for i in idx]
            ws = [b.op("Where", ok, w, b.const(f(0), f)) for ok, w in zip(inside, ws)]
            total = b.sum(ws)
            ws = [b.op("Div", w, total) for w in ws]
        m = b.sum([b.mul(hot(i), col(w)) for i, w in zip(idx, ws)])
    else:
        raise ModelError(f"Resize mode '{mode}' is not supported by the gradient")
    if ctm == "tf_crop_and_resize":
        outside = b.op("Or", b.op("Less", xo, b.const(f(0), f)), b.op("Greater", xo, last))
        m = b.op("Where", col(outside), b.const(f(0), f), m)
    return m


def _resize_at_run_time(b, node, g, mode, ctm):
    """Resize whose scales or sizes are computed at run time (a decoder that resizes to the
    shape of another tensor): each axis's matrix is built at run time from the lengths."""
    x, y = node.input[0], node.output[0]
    rank = b.rank(x)
    axes = attr(node, "axes")
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
    roi = _const_input(b, node, 1, "roi") if len(node.input) > 1 else None
    roi = np.asarray(roi, dtype=np.float32).reshape(-1) if roi is not None and roi.size else None
    has_scales = len(node.input) > 2 and node.input[2] and not (
        b.constant(node.input[2]) is not None and b.constant(node.input[2]).size == 0)
    sx, sy = b.shape(x) or [None] * rank, b.shape(y) or [None] * rank
    ratios = {}
    for k, a in enumerate(axes):
        din_i = b.op("Shape", x, start=a, end=a + 1)
        if has_scales:
            ratios[a] = b.op("Gather", b.op("Cast", node.input[2], to=1), b.ints([k]))
        else:
            size = b.op("Gather", node.input[3], b.ints([k]))
            ratios[a] = b.op("Div", b.op("Cast", size, to=1), b.op("Cast", din_i, to=1))
    policy = attr(node, "keep_aspect_ratio_policy", "stretch")
    if not has_scales and policy in ("not_larger", "not_smaller"):
        common = b.op("ReduceMin" if policy == "not_larger" else "ReduceMax",
                      b.op("Concat", *ratios.values(), axis=0), keepdims=1)
        ratios = {a: common for a in ratios}
    for k, a in enumerate(axes):
        if sx[a] is not None and sx[a] == sy[a] and ctm != "tf_crop_and_resize":
            continue  # same length: every transform but a crop is the identity then
        full_roi = (roi[k], roi[len(axes) + k]) if roi is not None else (0.0, 1.0)
        m = _resize_matrix_at_run_time(b, node, mode, ctm, b.squeeze(b.op("Shape", y, start=a, end=a + 1), [0]),
                                       b.squeeze(b.op("Shape", x, start=a, end=a + 1), [0]), ratios[a], full_roi)
        m = b.cast_like(m, x)
        perm = [i for i in range(rank) if i != a] + [a]
        gt = b.op("Transpose", g, perm=perm) if a != rank - 1 else g
        gt = b.op("MatMul", gt, m)
        g = b.op("Transpose", gt, perm=[int(i) for i in np.argsort(perm)]) if a != rank - 1 else gt
    return g


@register("Resize")
def resize(b, node, grads):
    x = node.input[0]
    rank = b.rank(x)
    if int(attr(node, "antialias", 0)):
        raise ModelError(f"Resize node '{node.name}': antialias=1 is not supported by the gradient")
    mode = attr(node, "mode", "nearest")
    ctm = attr(node, "coordinate_transformation_mode", "half_pixel")
    g = grads[0]
    if _runtime_input(b, node, 2) or _runtime_input(b, node, 3):
        return _grads_out(node, [_resize_at_run_time(b, node, g, mode, ctm)])
    for a, step in enumerate(_resize_plan(b, node, x, rank)):
        if step is None:
            continue
        din, dout, s, roi = step
        m = resize_matrix(
            mode, ctm, din, dout, s, nearest_mode=attr(node, "nearest_mode", "round_prefer_floor"),
            cubic_a=float(attr(node, "cubic_coeff_a", -0.75)), exclude_outside=bool(attr(node, "exclude_outside", 0)),
            roi=roi, out_len_float=float(np.float32(s) * din),
        )
        if m.shape == (din, din) and np.array_equal(m, np.eye(din)):
            continue
        g = _axis_matrix(b, g, a, rank, m, x)
    return _grads_out(node, [g])

