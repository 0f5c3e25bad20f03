"""Exact vector-Jacobian products of linear layers (Gemm, MatMul, Conv, ConvTranspose).

The adjoint of a convolution is a transposed convolution with the same weights and vice
versa; what takes care is the geometry: explicit pads for auto_pad, and output padding so
that the adjoint lands exactly on the forward input's spatial size. `Window` holds that
geometry and is shared with the pooling rules, whose gradients spread through windows too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ModelError
from ..graph import node_inputs
from .base import attr, register


# --- window geometry -------------------------------------------------------------------------
def static_spatial(b, name: str, what: str) -> list[int]:
    """The spatial sizes (axes 2..) of forward tensor `name`, which must be static."""
    shape = b.shape(name)
    if shape is None or len(shape) < 3 or not all(isinstance(d, int) for d in shape[2:]):
        raise ModelError(
            f"the gradient of {what} needs the static spatial shape of '{name}' (got {shape}); "
            "give the model static input shapes (only the batch axis may be symbolic)"
        )
    return [int(d) for d in shape[2:]]


def static_dim(b, name: str, axis: int, what: str) -> int:
    shape = b.shape(name)
    if shape is None or len(shape) <= axis or not isinstance(shape[axis], int):
        raise ModelError(f"the gradient of {what} needs the static size of axis {axis} of '{name}' (got {shape})")
    return int(shape[axis])


def varies(b, name: str) -> bool:
    """Whether forward tensor `name` depends on a model input. Weights that are computed
    from constants only (DequantizeLinear, Transpose or Cast of an initializer) never
    receive a gradient, and onnxruntime runs every node of a graph, needed or not, so
    their (costly) gradients are not emitted at all."""
    if b.depends:
        # The compiler knows what depends on the attributed tensors: one lookup, where the
        # walk below is quadratic over an unrolled loop's thousands of MatMuls.
        return name in b.depends
    graph, todo, seen = b.graph, [name], set()
    inputs = set(graph.inputs)
    while todo:
        t = todo.pop()
        if not t or t in seen or graph.constant(t) is not None:
            continue
        if t in inputs:
            return True
        seen.add(t)
        node = graph.producer.get(t)
        if node is None:
            return True  # unknown origin: assume it varies
        todo.extend(node_inputs(node))  # an If's branches read the enclosing scope too
    return False


def _out_size(h, k, s, d, begin, end, ceil: bool) -> int:
    """Output size of one sliding-window axis as onnxruntime (and torch) compute it.

    With ceil_mode a last window that would start in the end padding is dropped; onnx's
    shape inference (1.23) keeps it, so the static output shape cannot be trusted there.
    """
    span = h + begin + end - ((k - 1) * d + 1)
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= h + begin:
        out -= 1
    return out


def _pads(node, auto, r: int, totals):
    """(begin, end) pads of r spatial axes: each of `totals` (the padding an axis needs,
    None where the node's pads say it) split as auto_pad says, the odd one at the end for
    SAME_UPPER and at the beginning otherwise; none for VALID; else the node's pads."""
    if totals is not None:
        begin = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in totals]
        return begin, [t - h for t, h in zip(totals, begin)]
    if auto == "VALID":
        return [0] * r, [0] * r
    pads = [int(p) for p in attr(node, "pads", [0] * (2 * r))]
    return pads[:r], pads[r:]


@dataclass
class Window:
    """Sliding-window geometry of one forward Conv/pool node, all pads explicit.

    Output position o of an axis reads input positions o*stride + j*dilation - begin,
    j < kernel; `ins` and `outs` are the forward input and output spatial sizes.
    """

    kernel: list
    strides: list
    dilations: list
    begin: list
    end: list
    ins: list
    outs: list

    @classmethod
    def of(cls, b, node, kernel, what: str) -> "Window":
        ins = static_spatial(b, node.input[0], what)
        r = len(ins)
        kernel = [int(k) for k in kernel]
        strides = [int(s) for s in attr(node, "strides", [1] * r)]
        dilations = [int(d) for d in attr(node, "dilations", [1] * r)]
        ceil = bool(attr(node, "ceil_mode", 0))
        auto = attr(node, "auto_pad", "NOTSET")
        totals = None
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            totals = [max((-(-h // s) - 1) * s + (k - 1) * d + 1 - h, 0)
                      for h, k, s, d in zip(ins, kernel, strides, dilations)]
        begin, end = _pads(node, auto, r, totals)
        outs = [_out_size(*geo, ceil) for geo in zip(ins, kernel, strides, dilations, begin, end)]
        return cls(kernel, strides, dilations, begin, end, ins, outs)

    def transpose_attrs(self) -> dict:
        """Attributes of the ConvTranspose that spreads an output-shaped gradient back over
        the windows and returns exactly the input's spatial size.

        The windows cover s*(out-1) + (k-1)*d + 1 padded positions from -begin on; the
        input positions after that (fewer than a stride) get output padding, and windows
        that run past the input's end (pads, ceil_mode) are cropped by a larger end pad.
        """
        end, extra = [], []
        for h, o, k, s, d, p in zip(self.ins, self.outs, self.kernel, self.strides, self.dilations, self.begin):
            rem = h + p - (s * (o - 1) + (k - 1) * d + 1)
            end.append(max(-rem, 0))
            extra.append(max(rem, 0))
        return dict(kernel_shape=self.kernel, strides=self.strides, dilations=self.dilations,
                    pads=list(self.begin) + end, output_padding=extra if any(extra) else None)


def conv_weight_gradient(b, inp, inp_channels: int, inp_sizes, gout, group: int, win: Window):
    """d<gout, Conv(inp, W)>/dW for Conv(group, win) with W of shape (M, C/group, *kernel).

    A correlation of the input with the output gradient over the batch: the batch becomes
    the channel axis that is summed, the kernel offsets become output positions (stride
    and dilation swap roles), and the groups stay groups.
    """
    r = len(inp_sizes)
    sp = list(range(3, 3 + r))
    cg = inp_channels // group
    xr = b.op("Reshape", inp, b.ints([0, group, cg] + list(inp_sizes)))
    xr = b.op("Transpose", xr, perm=[2, 1, 0] + sp)
    xr = b.op("Reshape", xr, b.ints([cg, -1] + list(inp_sizes)))
    gr = b.op("Transpose", gout, perm=[1, 0] + [a - 1 for a in sp])
    gw = b.op("Conv", xr, gr, group=group, strides=win.dilations, dilations=win.strides,
              pads=list(win.begin) + list(win.end))
    gw = b.op("Slice", gw, b.ints([0] * r), b.ints(win.kernel), b.ints(list(range(2, 2 + r))))
    return b.op("Transpose", gw, perm=[1, 0] + list(range(2, 2 + r)))


def _bias_gradient(b, node, g):
    if len(node.input) > 2 and node.input[2] and varies(b, node.input[2]):
        return b.reduce_sum(g, [0] + list(range(2, b.rank(node.output[0]))), keepdims=False)
    return None


def _kernel(b, node, w, what):
    k = attr(node, "kernel_shape")
    if k is None:
        shape = b.shape(w)
        if shape is None or not all(isinstance(d, int) for d in shape[2:]):
            raise ModelError(f"the gradient of {what} needs the static kernel shape of '{w}' (got {shape})")
        k = shape[2:]
    return [int(d) for d in k]


# --- rules -------------------------------------------------------------------------------------
@register("Conv")
def conv(b, node, grads):
    g = grads[0]
    x, w = node.input[0], node.input[1]
    what = f"Conv '{node.name}'"
    group = int(attr(node, "group", 1))
    win = Window.of(b, node, _kernel(b, node, w, what), what)
    gx = None
    if varies(b, x):
        gx = _conv_input_gradient_as_conv(b, g, w, group, win)
        if gx is None:
            gx = b.op("ConvTranspose", g, w, group=group, **win.transpose_attrs())
    gw = None
    if varies(b, w):
        gw = conv_weight_gradient(b, x, static_dim(b, x, 1, what), win.ins, g, group, win)
    return [gx, gw, _bias_gradient(b, node, g)]


def _conv_input_gradient_as_conv(b, g, w, group: int, win: Window):
    """For a stride-1 Conv with constant weights, the input gradient as a forward Conv with
    the kernel flipped and its channel axes swapped per group (onnxruntime's Conv is much
    faster than its ConvTranspose); None where that does not apply. The flipped kernel is
    computed from the weight in the graph (Transpose, Slice), not stored: onnxruntime folds
    those constant nodes at load, and the file holds each weight once."""
    kernel = b.constant(w)
    if kernel is None or any(s != 1 for s in win.strides):
        return None
    reach = [(k - 1) * d for k, d in zip(win.kernel, win.dilations)]
    begin = [r - p for r, p in zip(reach, win.begin)]
    end = [r - p for r, p in zip(reach, win.end)]
    if min(begin + end) < 0:
        return None
    return b.op("Conv", g, _flipped_kernel(b, w, kernel, group), group=group,
                kernel_shape=list(win.kernel), dilations=list(win.dilations), pads=begin + end)


def _flipped_kernel(b, w, kernel, group: int) -> str:
    """The kernel (M, C/group, *k) as (C, M/group, *k), each spatial axis reversed."""
    m, cg = kernel.shape[:2]
    spatial = kernel.shape[2:]
    if b.opset < 10:  # no Slice with steps: store the flipped copy
        flipped = kernel.reshape((group, m // group, cg) + spatial).swapaxes(1, 2)
        flipped = flipped.reshape((group * cg, m // group) + spatial)
        flipped = flipped[(slice(None), slice(None)) + (slice(None, None, -1),) * len(spatial)]
        return b.const(np.ascontiguousarray(flipped), dtype=kernel.dtype)
    rest = list(range(2, kernel.ndim))
    if group == 1:
        t = b.op("Transpose", w, perm=[1, 0] + rest)
    elif cg == 1 and m == group:  # depthwise: (C, 1, *k) already
        t = w
    else:
        split = b.op("Reshape", w, b.const(np.array((group, m // group, cg) + spatial, np.int64), dtype=np.int64))
        swapped = b.op("Transpose", split, perm=[0, 2, 1] + [r + 1 for r in rest])
        t = b.op("Reshape", swapped, b.const(np.array((group * cg, m // group) + spatial, np.int64),
                                             dtype=np.int64))
    n = len(spatial)
    big = np.iinfo(np.int64).max
    return b.op("Slice", t, b.const(np.full(n, -1, np.int64), dtype=np.int64),
                b.const(np.full(n, -big, np.int64), dtype=np.int64), b.const(np.array(rest, np.int64), dtype=np.int64),
                b.const(np.full(n, -1, np.int64), dtype=np.int64))


def _transpose_window(b, node, kernel, what) -> Window:
    """The geometry of the Conv that is the adjoint of ConvTranspose `node`: its input is the
    ConvTranspose's output and its output the ConvTranspose's input."""
    x, y = node.input[0], node.output[0]
    ins, outs = static_spatial(b, x, what), static_spatial(b, y, what)
    r = len(ins)
    strides = [int(s) for s in attr(node, "strides", [1] * r)]
    dilations = [int(d) for d in attr(node, "dilations", [1] * r)]
    extra = [int(p) for p in attr(node, "output_padding", [0] * r)]
    auto = attr(node, "auto_pad", "NOTSET")
    totals = None
    if attr(node, "output_shape") is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        totals = [s * (h - 1) + e + (k - 1) * d + 1 - o
                  for h, o, k, s, d, e in zip(ins, outs, kernel, strides, dilations, extra)]
    begin, end = _pads(node, auto, r, totals)
    if min(begin + end) < 0:
        raise ModelError(f"the gradient of {what} does not support output_shape larger than the full output")
    return Window(kernel, strides, dilations, begin, end, outs, ins)


@register("ConvTranspose")
def conv_transpose(b, node, grads):
    g = grads[0]
    x, w = node.input[0], node.input[1]
    what = f"ConvTranspose '{node.name}'"
    group = int(attr(node, "group", 1))
    win = _transpose_window(b, node, _kernel(b, node, w, what), what)
    gx = None
    if varies(b, x):
        gx = b.op("Conv", g, w, group=group, kernel_shape=win.kernel, strides=win.strides,
                  dilations=win.dilations, pads=list(win.begin) + list(win.end))
    gw = None
    if varies(b, w):
        # <ConvTranspose_W(x), g> = <x, Conv_W(g)>: the weight gradient of that Conv.
        out_channels = static_dim(b, w, 1, what) * group
        gw = conv_weight_gradient(b, g, out_channels, win.ins, x, group, win)
    return [gx, gw, _bias_gradient(b, node, g)]


@register("Gemm")
def gemm(b, node, grads):
    # Y = alpha A'B' + beta C with A' = A or A^T, B' = B or B^T; G = dY.
    # dA' = alpha G B'^T and dB' = alpha A'^T G, transposed back where A or B was.
    g = grads[0]
    a, w = node.input[0], node.input[1]
    alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
    ta, tb = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
    ga = None
    if varies(b, a):
        if ta:
            ga = b.op("Gemm", w, g, transA=tb, transB=1, alpha=alpha)
        else:
            ga = b.op("Gemm", g, w, transB=1 - tb, alpha=alpha)
    gw = None
    if varies(b, w):
        if tb:
            gw = b.op("Gemm", g, a, transA=1, transB=ta, alpha=alpha)
        else:
            gw = b.op("Gemm", a, g, transA=1 - ta, alpha=alpha)
    gc = None
    if len(node.input) > 2 and node.input[2] and varies(b, node.input[2]):
        gc = g if beta == 1.0 else b.mul(g, b.scalar_like(beta, g))
        gc = unbroadcast_to(b, gc, b.shape(node.output[0]), node.input[2])
    return [ga, gw, gc]


def _broadcast_axes(so, si):
    """Axes of a gradient shaped `so` to sum so it takes the shape `si` it was broadcast
    from (numpy rules, aligned on the right), or None when static shapes cannot tell (a
    symbolic dim facing another dim)."""
    if so is None or si is None or len(si) > len(so):
        return None
    lead = len(so) - len(si)
    axes = list(range(lead))
    for k, di in enumerate(si):
        do = so[lead + k]
        if di is None or do is None:
            return None
        if di == do:
            continue
        if di == 1:
            axes.append(lead + k)
        else:
            return None
    return axes


def unbroadcast_to(b, g, g_shape, target: str):
    """Sum gradient `g` (static shape `g_shape`, or None) down to forward tensor `target`.

    Where the static shapes cannot tell which axes were broadcast (a symbolic batch dim
    facing a fixed one), the axes are found at run time: those where the target's size
    differs from the gradient's are exactly the broadcast ones.
    """
    axes = _broadcast_axes(g_shape, b.shape(target))
    if axes is not None:
        if not axes:
            return g
        lead = len(g_shape) - len(b.shape(target))
        g = b.reduce_sum(g, axes, keepdims=True)
        return b.squeeze(g, list(range(lead))) if lead else g
    if g_shape is None or b.shape(target) is None:
        raise ModelError(f"cannot tell how '{target}' was broadcast: unknown ranks; give the model static input shapes")
    return b.unbroadcast_at_run_time(g, len(g_shape) - b.rank(target), target)


def _swap_last(b, t, rank):
    return b.op("Transpose", t, perm=list(range(rank - 2)) + [rank - 1, rank - 2])


@register("MatMul")
def matmul(b, node, grads):
    # numpy semantics: a 1-D left operand is a row, a 1-D right operand a column, and the
    # leading (batch) dims broadcast; their gradients are summed back over broadcast dims.
    g = grads[0]
    a, w = node.input[0], node.input[1]
    sa, sw = b.shape(a), b.shape(w)
    if sa is None or sw is None:
        raise ModelError(f"the gradient of MatMul '{node.name}' needs the ranks of its operands; "
                         "give the model static input shapes")
    ra, rw = len(sa), len(sw)
    need_a, need_w = varies(b, a), varies(b, w)
    ga = gw = None
    if ra == 1 and rw == 1:
        return [b.mul(g, w) if need_a else None, b.mul(g, a) if need_w else None]
    if ra == 1:
        # y[..., m] = sum_k a[k] w[..., k, m]
        if need_a:
            ga = b.op("MatMul", w, b.unsqueeze(g, [-1]))
            ga = b.reduce_sum(ga, list(range(rw - 2)) + [rw - 1], keepdims=False)
        if need_w:
            gw = b.mul(b.unsqueeze(a, [1]), b.unsqueeze(g, [-2]))
        return [ga, gw]
    if rw == 1:
        # y[..., n] = sum_k a[..., n, k] w[k]
        if need_a:
            ga = b.mul(b.unsqueeze(g, [-1]), w)
        if need_w:
            gw = b.op("MatMul", b.unsqueeze(g, [-2]), a)
            gw = b.reduce_sum(gw, list(range(ra - 1)), keepdims=False)
        return [ga, gw]
    batch = _broadcast_batch(sa[:-2], sw[:-2])
    if batch is None:  # only the rank is known; unbroadcast_to finds the axes at run time
        batch = (None,) * max(ra - 2, rw - 2)
    if need_a:
        ga = unbroadcast_to(b, b.op("MatMul", g, _swap_last(b, w, rw)), batch + tuple(sa[-2:]), a)
    if need_w:
        gw = unbroadcast_to(b, b.op("MatMul", _swap_last(b, a, ra), g), batch + tuple(sw[-2:]), w)
    return [ga, gw]


def _broadcast_batch(sa, sb):
    """The broadcast of two batch shapes, or None when static shapes cannot tell."""
    n = max(len(sa), len(sb))
    sa, sb = (1,) * (n - len(sa)) + tuple(sa), (1,) * (n - len(sb)) + tuple(sb)
    out = []
    for da, db in zip(sa, sb):
        if da == db or db == 1:
            out.append(da)
        elif da == 1:
            out.append(db)
        else:
            return None
    return tuple(out)
