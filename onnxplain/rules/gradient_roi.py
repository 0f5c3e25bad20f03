"""Exact vector-Jacobian products of region, cache and sampling operators: `TensorScatter`
(opset 24, a KV-cache write), `RoiAlign` (opsets 10-21: onnxruntime has no kernel for
opset 22), `MaxRoiPool` (onnxruntime: float32, opsets 1-21) and `DeformConv` (opset 19+).

Where elements go is only known at run time (the write indices, the boxes), so each
backward reruns the forward's own index logic on positions rather than values: the
forward applied to the input's flat indices says where every output element came from.
DeformConv is differentiated as its definition (GridSample, mask, grouped MatMul) by the
rules of those operators, which also gives the offset and mask gradients.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModelError, UnsupportedOperatorError
from .base import attr, register


@register("TensorScatter")
def tensor_scatter(b, node, grads):
    past, update = node.input[0], node.input[1]
    indices = node.input[2] if len(node.input) > 2 and node.input[2] else None
    g = grads[0]
    kw = {"axis": attr(node, "axis"), "mode": attr(node, "mode")}
    # The cache keeps every element not overwritten: g there, zero where an update landed.
    g_past = b.op("TensorScatter", g, _zeros_as(b, update), indices, **kw)
    # Where each update element landed: the same write of the update's flat positions into a
    # cache of -1s; the gradient is gathered back from there (the -1s to a spare slot).
    minus = b.op("ConstantOfShape", b.shape_of(past), value=numpy_helper.from_array(np.array([-1], np.int64)))
    landed = b.op("TensorScatter", minus, b.positions(update), indices, **kw)
    n = b.op("Reshape", b.op("Size", update), b.ints([1]))
    flat = b.ints([-1])
    slot = b.op("Where", b.op("Less", landed, b.const(np.array(0, np.int64), np.int64)), n, landed)
    room = b.op("Add", n, b.ints([1]))
    half = b.graph.elem_type(update) in (TensorProto.FLOAT16, TensorProto.BFLOAT16)
    work = np.float32 if half else b.np_dtype(update)  # onnxruntime cannot scatter-add in float16
    zeros = b.op("ConstantOfShape", room, value=numpy_helper.from_array(np.zeros(1, work)))
    spread = b.op("ScatterElements", zeros, b.op("Reshape", slot, flat),
                  b.op("Reshape", b.op("Cast", g, to=TensorProto.FLOAT) if half else g, flat),
                  axis=0, reduction="add")
    g_update = b.reshape_like(b.op("Slice", spread, b.ints([0]), n, b.ints([0])), update)
    if half:
        g_update = b.op("Cast", g_update, to=b.graph.elem_type(update))
    return [g_past, g_update, None]


def _zeros_as(b, like):
    """Zeros shaped like forward tensor `like`, of its element type."""
    zero = numpy_helper.from_array(np.zeros(1, b.np_dtype(like)))
    return b.op("ConstantOfShape", b.shape_of(like), value=zero)


# --- RoiAlign ------------------------------------------------------------------------------------
def _axis_samples(b, start, size, bins: int, grid, grid_max, extent, x):
    """One axis of RoiAlign's sampling, as onnxruntime computes it, for every roi r, bin p
    and sample i (shape (R, bins, G), G = the largest grid of any roi):

    coordinate = start + p * bin + (i + 0.5) * bin / grid, its two neighbours (low, high)
    and their bilinear weights (1 - l, l) stacked on a last axis of 2, whether the sample
    lies inside [-1, extent] (outside, onnxruntime gives it weight 0) and whether it exists
    for this roi (i < grid: the adaptive grid differs per roi).
    """
    dt = b.np_dtype(x)
    one, zero = b.scalar_like(1.0, x), b.scalar_like(0.0, x)
    binsize = b.op("Div", size, b.scalar_like(float(bins), x))  # (R, 1, 1)
    p = b.const(np.arange(bins, dtype=dt).reshape(1, bins, 1), dt)
    i = b.op("Cast", b.op("Range", b.const(np.array(0, np.int64), np.int64), grid_max,
                          b.const(np.array(1, np.int64), np.int64)), to=b.graph.elem_type(x))
    i = b.op("Reshape", i, b.ints([1, 1, -1]))
    gridf = b.op("Cast", grid, to=b.graph.elem_type(x))
    step = b.op("Div", binsize, b.op("Max", gridf, one))
    c = b.add(b.add(start, b.mul(p, binsize)), b.mul(b.add(i, b.scalar_like(0.5, x)), step))
    inside = b.op("And", b.op("Not", b.op("Less", c, b.scalar_like(-1.0, x))), b.op("Not", b.op("Greater", c, extent)))
    exists = b.op("Expand", b.op("Less", i, gridf), b.op("Shape", c))
    c = b.op("Max", c, zero)
    top = b.op("Sub", extent, one)  # extent - 1, the last index
    low = b.op("Floor", c)
    at_end = b.op("GreaterOrEqual", low, top)
    low = b.op("Where", at_end, top, low)
    high = b.op("Where", at_end, top, b.add(low, one))
    frac = b.op("Where", at_end, zero, b.op("Sub", c, low))
    idx = b.op("Cast", b.op("Concat", b.unsqueeze(low, [3]), b.unsqueeze(high, [3]), axis=3), to=7)
    wts = b.op("Concat", b.unsqueeze(b.op("Sub", one, frac), [3]), b.unsqueeze(frac, [3]), axis=3)
    return idx, wts, b.op("And", inside, exists), exists


@register("RoiAlign")
def roi_align(b, node, grads):
    x, rois, batch = node.input[0], node.input[1], node.input[2]
    g = grads[0]
    if b.opset >= 22:
        raise ModelError(f"RoiAlign node '{node.name}': onnxruntime has no RoiAlign kernel for opset {b.opset}; "
                         "the gradient is checked against onnxruntime's opset 10-21 kernels")
    mode = attr(node, "mode", "avg")
    ph, pw = int(attr(node, "output_height", 1)), int(attr(node, "output_width", 1))
    ratio = int(attr(node, "sampling_ratio", 0))
    scale = float(attr(node, "spatial_scale", 1.0))
    ctm = attr(node, "coordinate_transformation_mode", "half_pixel" if b.opset >= 16 else "output_half_pixel")
    half = ctm == "half_pixel"
    dt = b.np_dtype(x)
    t = b.graph.elem_type(x)
    shape = b.op("Shape", x)
    sizes = b.op("Cast", shape, to=t)
    hw = [b.op("Reshape", b.op("Gather", sizes, b.ints([k])), b.ints([])) for k in (2, 3)]  # H, W as scalars

    def col(k):  # roi coordinate k as (R, 1, 1), scaled and shifted
        v = b.op("Gather", b.cast_like(rois, x), b.ints([k]), axis=1)
        v = b.mul(v, b.scalar_like(scale, x))
        if half:
            v = b.op("Sub", v, b.scalar_like(0.5, x))
        return b.unsqueeze(v, [2])

    x1, y1, x2, y2 = (col(k) for k in range(4))
    size_h, size_w = b.op("Sub", y2, y1), b.op("Sub", x2, x1)
    if not half:  # malformed rois forced to 1x1
        size_h, size_w = (b.op("Max", s, b.scalar_like(1.0, x)) for s in (size_h, size_w))
    axes = []
    for start, size, bins, extent in ((y1, size_h, ph, hw[0]), (x1, size_w, pw, hw[1])):
        if ratio > 0:
            grid = b.const(np.array(ratio, np.int64), np.int64)
            grid_max = grid
        else:
            grid = b.op("Cast", b.op("Ceil", b.op("Div", size, b.scalar_like(float(bins), x))), to=7)  # (R, 1, 1)
            grid_max = b.op("Max", b.op("ReduceMax", b.op("Reshape", grid, b.ints([-1])), keepdims=0),
                            b.const(np.array(0, np.int64), np.int64))
        axes.append((_axis_samples(b, start, size, bins, grid, grid_max, extent, x), grid))
    (iy, wy, valid_y, exists_y), grid_h = axes[0]
    (ix, wx, valid_x, exists_x), grid_w = axes[1]
    # (R, PH, PW, Gh, Gw, 2, 2): bins, samples, then the corners in onnxruntime's order.
    def ylay(v):
        return b.op("Reshape", v, b.ints([0, ph, 1, -1, 1, 2, 1])) if v in (iy, wy) else \
            b.op("Reshape", v, b.ints([0, ph, 1, -1, 1, 1, 1]))

    def xlay(v):
        return b.op("Reshape", v, b.ints([0, 1, pw, 1, -1, 1, 2])) if v in (ix, wx) else \
            b.op("Reshape", v, b.ints([0, 1, pw, 1, -1, 1, 1]))

    width = b.op("Gather", shape, b.ints([3]))
    pos = b.add(b.mul(ylay(iy), width), xlay(ix))
    valid = b.op("And", ylay(valid_y), xlay(valid_x))
    exists = b.op("And", ylay(exists_y), xlay(exists_x))
    w = b.op("Where", valid, b.mul(ylay(wy), xlay(wx)), b.scalar_like(0.0, x))
    exists = b.op("Expand", exists, b.op("Shape", w))
    if mode == "avg" and ratio > 0:
        w = b.mul(w, b.scalar_like(1.0 / ratio ** 2, x))
    elif mode == "avg":
        count = b.op("Max", b.mul(grid_h, grid_w), b.const(np.array(1, np.int64), np.int64))  # (R, 1, 1)
        w = b.op("Div", w, b.op("Unsqueeze", b.cast_like(count, x), b.ints([3, 4, 5, 6])))
    # Flat positions in x (N, C, H, W): ((batch * C + c) * H * W + pos), shaped (R, C, PH, PW, S).
    chans = b.op("Gather", shape, b.ints([1]))
    plane = b.op("Mul", b.op("Gather", shape, b.ints([2])), width)
    s_all = b.ints([0, 1, ph, pw, -1])
    pos = b.op("Reshape", pos, s_all)  # (R, 1, PH, PW, S)
    w = b.op("Reshape", w, s_all)
    c = b.op("Reshape", b.op("Range", b.const(np.array(0, np.int64), np.int64),
                             b.op("Reshape", chans, b.ints([])), b.const(np.array(1, np.int64), np.int64)),
             b.ints([1, -1, 1, 1, 1]))
    bidx = b.op("Reshape", b.op("Cast", batch, to=7), b.ints([-1, 1, 1, 1, 1]))
    flat_idx = b.add(b.mul(b.add(b.mul(bidx, chans), c), plane), pos)  # (R, C, PH, PW, S)
    g5 = b.unsqueeze(g, [4])
    if mode == "avg":
        upd = b.mul(g5, w)
        idx = b.op("Expand", flat_idx, b.op("Shape", upd))
    else:
        # onnxruntime's max: the largest weighted corner value w_k * x over samples and
        # corners, the first one on ties (samples that do not exist for the roi excluded).
        ex = b.op("Reshape", exists, s_all)
        vals = b.mul(w, b.op("Gather", b.op("Reshape", x, b.ints([-1])), flat_idx))
        vals = b.op("Where", ex, vals, b.scalar_like(-np.inf, x))
        win = b.op("ArgMax", vals, axis=4, keepdims=1)
        idx = b.op("GatherElements", flat_idx, win, axis=4)
        w_full = b.op("Expand", w, b.op("Shape", vals))
        upd = b.mul(g5, b.op("GatherElements", w_full, win, axis=4))
    zeros = b.op("Reshape", b.zeros_like(x), b.ints([-1]))
    out = b.op("ScatterElements", zeros, b.op("Reshape", idx, b.ints([-1])), b.op("Reshape", upd, b.ints([-1])),
               axis=0, reduction="add")
    return [b.reshape_like(out, x), None, None]


# --- MaxRoiPool ------------------------------------------------------------------------------------
def _round_half_away(b, v):
    # The boxes are rounded as std::round does (halves away from zero), not as Round (to even).
    return b.mul(b.op("Sign", v), b.op("Floor", b.add(b.op("Abs", v), b.scalar_like(0.5, v))))


def _bin_mask(b, start, length, bins: int, extent, x):
    """Per roi r, bin p and position h (shape (R, bins, extent)): whether h lies in the bin
    [start + floor(p * size), start + ceil((p + 1) * size)) clipped to [0, extent), where
    size = length / bins; also whether the bin is empty."""
    dt = b.np_dtype(x)
    size = b.op("Div", length, b.scalar_like(float(bins), x))  # (R, 1, 1)
    p = b.const(np.arange(bins, dtype=dt).reshape(1, bins, 1), dt)
    zero = b.scalar_like(0.0, x)
    lo = b.op("Min", b.op("Max", b.add(b.op("Floor", b.mul(p, size)), start), zero), extent)
    hi = b.op("Min", b.op("Max", b.add(b.op("Ceil", b.mul(b.add(p, b.scalar_like(1.0, x)), size)), start), zero), extent)
    h = b.op("Cast", b.op("Range", b.const(np.array(0, np.int64), np.int64),
                          b.op("Cast", extent, to=7), b.const(np.array(1, np.int64), np.int64)), to=b.graph.elem_type(x))
    h = b.op("Reshape", h, b.ints([1, 1, -1]))
    inside = b.op("And", b.op("GreaterOrEqual", h, lo), b.op("Less", h, hi))
    return inside, b.op("LessOrEqual", hi, lo)


@register("MaxRoiPool")
def max_roi_pool(b, node, grads):
    # Each bin's output is its window's largest element (the first in row-major order, as
    # onnxruntime scans), 0 for an empty window: the gradient goes to that element. The
    # windows are masks over the whole map: memory grows as rois x channels x bins x H x W.
    x, rois = node.input[0], node.input[1]
    g = grads[0]
    ph, pw = (int(v) for v in attr(node, "pooled_shape"))
    scale = float(attr(node, "spatial_scale", 1.0))
    t = b.graph.elem_type(x)
    shape = b.op("Shape", x)
    sizes = b.op("Cast", shape, to=t)
    H, W = (b.op("Reshape", b.op("Gather", sizes, b.ints([k])), b.ints([])) for k in (2, 3))
    r = b.cast_like(rois, x)

    def col(k):
        return b.unsqueeze(_round_half_away(b, b.mul(b.op("Gather", r, b.ints([k]), axis=1),
                                                    b.scalar_like(scale, x))), [2])  # (R, 1, 1)

    batch = b.op("Cast", b.op("Gather", r, b.ints([0]), axis=1), to=7)  # (R, 1)
    x1, y1, x2, y2 = (col(k) for k in (1, 2, 3, 4))
    one = b.scalar_like(1.0, x)
    len_h = b.op("Max", b.add(b.op("Sub", y2, y1), one), one)
    len_w = b.op("Max", b.add(b.op("Sub", x2, x1), one), one)
    in_h, empty_h = _bin_mask(b, y1, len_h, ph, H, x)  # (R, PH, H), (R, PH, 1)
    in_w, empty_w = _bin_mask(b, x1, len_w, pw, W, x)  # (R, PW, W), (R, PW, 1)
    mask = b.op("And", b.op("Reshape", in_h, b.ints([0, 1, ph, 1, -1, 1])),
                b.op("Reshape", in_w, b.ints([0, 1, 1, pw, 1, -1])))  # (R, 1, PH, PW, H, W)
    empty = b.op("Or", b.op("Reshape", empty_h, b.ints([0, 1, ph, 1])), b.op("Reshape", empty_w, b.ints([0, 1, 1, pw])))
    chans = b.op("Gather", shape, b.ints([1]))
    plane = b.op("Mul", b.op("Gather", shape, b.ints([2])), b.op("Gather", shape, b.ints([3])))
    maps = b.op("Gather", x, b.op("Reshape", batch, b.ints([-1])), axis=0)  # (R, C, H, W)
    maps = b.op("Unsqueeze", maps, b.ints([2, 3]))  # (R, C, 1, 1, H, W)
    vals = b.op("Where", mask, maps, b.scalar_like(-np.inf, x))
    vals = b.op("Reshape", vals, b.op("Concat", b.op("Shape", vals, end=4), b.ints([-1]), axis=0))
    win = b.op("ArgMax", vals, axis=4, keepdims=0)  # (R, C, PH, PW): flat position in the map
    c = b.op("Reshape", b.op("Range", b.const(np.array(0, np.int64), np.int64), b.op("Reshape", chans, b.ints([])),
                             b.const(np.array(1, np.int64), np.int64)), b.ints([1, -1, 1, 1]))
    idx = b.add(b.mul(b.add(b.mul(b.op("Reshape", batch, b.ints([-1, 1, 1, 1])), chans), c), plane), win)
    upd = b.op("Where", empty, b.scalar_like(0.0, x), g)
    zeros = b.op("Reshape", b.zeros_like(x), b.ints([-1]))
    out = b.op("ScatterElements", zeros, b.op("Reshape", idx, b.ints([-1])), b.op("Reshape", upd, b.ints([-1])),
               axis=0, reduction="add")
    return [b.reshape_like(out, x), None]


# --- DeformConv ----------------------------------------------------------------------------------
class _Body:
    """Nodes and constants of a body graph under construction, every name fresh."""

    def __init__(self, b, op: str):
        self.prefix = b.fresh(f"{op}_body") + "/"
        self.nodes, self.inits, self.n = [], [], 0

    def name(self) -> str:
        self.n += 1
        return f"{self.prefix}t{self.n}"

    def op(self, op_type, *inputs, **attrs):
        out = self.name()
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out + "_node", **attrs))
        return out

    def const(self, value, dtype):
        out = self.name()
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), out))
        return out


@register("DeformConv")
def deform_conv(b, node, grads):
    """DeformConv as its definition: each kernel tap samples X bilinearly (GridSample,
    align_corners, zeros outside) at its position plus the offset, weighted by the mask,
    then a grouped matrix product with W. Built as a body graph from those operators and
    differentiated through their rules (X, W, offset, B and mask alike)."""
    from .gradient_attention import _refuses, body_backward

    if _refuses(b.composite):
        raise UnsupportedOperatorError(["DeformConv"], b.composite.name)
    x, w, off = node.input[:3]
    bias = node.input[3] if len(node.input) > 3 and node.input[3] else None
    mask = node.input[4] if len(node.input) > 4 and node.input[4] else None
    xs, ws, offs = b.shape(x), b.shape(w), b.shape(off)
    what = f"DeformConv node '{node.name}'"
    if xs is None or ws is None or offs is None or len(xs) != 4:
        raise ModelError(f"{what}: the gradient supports 2-D DeformConv with known ranks")
    if not all(isinstance(d, (int, np.integer)) for d in list(xs[1:]) + list(ws) + list(offs[1:])):
        raise ModelError(f"{what}: the gradient needs static channel, kernel and spatial sizes "
                         f"(X {xs}, W {ws}, offset {offs}); give the model static input shapes")
    c, ih, iw = (int(d) for d in xs[1:])
    oc, _, kh, kw = (int(d) for d in ws)
    oh, ow = int(offs[2]), int(offs[3])
    if ih < 2 or iw < 2:
        raise ModelError(f"{what}: a map of one row or column ({ih}x{iw}) is not supported by the gradient")
    group = int(attr(node, "group", 1))
    og = int(attr(node, "offset_group", 1))
    sh, sw = (int(v) for v in attr(node, "strides", [1, 1]))
    dh, dw = (int(v) for v in attr(node, "dilations", [1, 1]))
    pads = [int(v) for v in attr(node, "pads", [0, 0, 0, 0])]
    dt = b.np_dtype(x)
    t = b.graph.elem_type(x)
    y = _Body(b, "DeformConv")
    # Tap positions without offsets, (kh, kw, oh, ow), normalised as align_corners=1 reads them.
    base_h = (-pads[0] + sh * np.arange(oh))[None, None, :, None] + dh * np.arange(kh)[:, None, None, None]
    base_w = (-pads[1] + sw * np.arange(ow))[None, None, None, :] + dw * np.arange(kw)[None, :, None, None]
    base_h = np.broadcast_to(base_h, (kh, kw, oh, ow)).astype(dt)
    base_w = np.broadcast_to(base_w, (kh, kw, oh, ow)).astype(dt)
    o = y.op("Reshape", off, y.const([-1, og, kh, kw, 2, oh, ow], np.int64))
    parts = []
    for k, (base, extent) in enumerate(((base_h, ih), (base_w, iw))):
        p = y.op("Gather", o, y.const(k, np.int64), axis=4)  # (N, og, kh, kw, oh, ow)
        p = y.op("Add", p, y.const(base, dt))
        parts.append(y.op("Sub", y.op("Mul", p, y.const(2.0 / (extent - 1), dt)), y.const(1.0, dt)))
    # GridSample reads (x, y) pairs: grid (N*og, kh*kw*oh, ow, 2).
    grid = y.op("Concat", y.op("Unsqueeze", parts[1], y.const([-1], np.int64)),
                y.op("Unsqueeze", parts[0], y.const([-1], np.int64)), axis=-1)
    grid = y.op("Reshape", grid, y.const([-1, kh * kw * oh, ow, 2], np.int64))
    xg = y.op("Reshape", x, y.const([-1, c // og, ih, iw], np.int64))
    mode = "linear" if b.opset >= 20 else "bilinear"
    sampled = y.op("GridSample", xg, grid, mode=mode, padding_mode="zeros", align_corners=1)
    sampled = y.op("Reshape", sampled, y.const([-1, og, c // og, kh, kw, oh, ow], np.int64))
    if mask is not None:
        m = y.op("Reshape", mask, y.const([-1, og, 1, kh, kw, oh, ow], np.int64))
        sampled = y.op("Mul", sampled, m)
    cols = y.op("Reshape", sampled, y.const([-1, group, (c // group) * kh * kw, oh * ow], np.int64))
    wg = y.op("Reshape", w, y.const([group, oc // group, (c // group) * kh * kw], np.int64))
    out = y.op("MatMul", wg, cols)  # (N, group, oc/group, oh*ow)
    out = y.op("Reshape", out, y.const([-1, oc, oh, ow], np.int64))
    if bias is not None:
        out = y.op("Add", out, y.op("Reshape", bias, y.const([1, oc, 1, 1], np.int64)))
    out = y.op("Identity", out)
    body = helper.make_graph(y.nodes, "DeformConv_body", [], [helper.make_tensor_value_info(out, t, None)],
                             initializer=y.inits)
    targets = [i for i in node.input
               if i and i in b.depends and b.constant(i) is None and b.graph.is_float(i)]
    if not targets:
        return [None] * len(node.input)
    return body_backward(b, node, grads, body, targets)


def _deform_refuses(composite, *_node_and_graph) -> bool:
    from .gradient_attention import _refuses

    return _refuses(composite)


# Read by the compiler's check of what a composite cannot explain (and so by `inspect`).
deform_conv.refuses = _deform_refuses
