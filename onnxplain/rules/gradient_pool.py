"""Exact vector-Jacobian products of pooling operators.

Max pools route each output's gradient to the input element that won its window; windows
overlap (3x3 stride 2), so the routing is a scatter that *adds*. Average and Lp pools
spread the gradient back over their windows with a depthwise ConvTranspose of ones, after
scaling it per output position (1/count for averages: the count differs at borders when
pads are not counted and where ceil_mode windows run past the end).
"""

from __future__ import annotations

import numpy as np

from .base import attr, attrs, register
from .gradient_linear import Window, static_dim, static_spatial


def _route_to_winners(b, g, x, pool_attrs: dict):
    """Scatter-add `g` onto the positions of `x` that MaxPool(pool_attrs) selects.

    The pool is recomputed with row-major indices (storage_order only changes how the
    indices are written, not which element wins); onnxruntime writes them flat over the
    whole N*C*spatial tensor, so one flat scatter serves every batch size.
    """
    pool_attrs = dict(pool_attrs, storage_order=0)
    _, idx = b.op("MaxPool", x, outputs=2, **pool_attrs)
    flat = b.ints([-1])
    zeros = b.op("Reshape", b.zeros_like(x), flat)
    out = b.op("ScatterElements", zeros, b.op("Reshape", idx, flat), b.op("Reshape", g, flat),
               axis=0, reduction="add")
    return b.reshape_like(out, x)


@register("MaxPool")
def max_pool(b, node, grads):
    # The Indices output (if any) is integer-valued: nothing flows back through it.
    if grads[0] is None:
        return [None]
    return [_route_to_winners(b, grads[0], node.input[0], attrs(node))]


@register("GlobalMaxPool")
def global_max_pool(b, node, grads):
    # As a MaxPool whose window is the whole map: the gradient goes to one maximum per map,
    # the first in row-major order (torch's max_pool / adaptive_max_pool do the same).
    x = node.input[0]
    sizes = static_spatial(b, x, f"GlobalMaxPool '{node.name}'")
    return [_route_to_winners(b, grads[0], x, {"kernel_shape": sizes})]


def _spread(b, g, x, win: Window, what: str):
    """Sum `g` (output-shaped) back over each output position's window: the adjoint of a
    window sum, a depthwise ConvTranspose with a kernel of ones."""
    channels = static_dim(b, x, 1, what)
    ones = b.const(np.ones([channels, 1] + win.kernel), b.np_dtype(x))
    return b.op("ConvTranspose", g, ones, group=channels, **win.transpose_attrs())


def window_average(b, x, node, what: str) -> str:
    """AveragePool(count_include_pad=1) over `node`'s windows (a pool node's kernel_shape,
    strides, dilations, pads/auto_pad, ceil_mode), valid at every opset: AveragePool takes
    dilations only from opset 19 on. A depthwise Conv of ones sums each window (an extra end
    pad of zeros stands for ceil_mode's last windows), divided by the taps it counts."""
    win = Window.of(b, node, attr(node, "kernel_shape"), what)
    channels = static_dim(b, x, 1, what)
    ends, counts = [], np.ones([1, 1] + [1] * len(win.outs))
    for axis, (h, o, k, s, d, p, e) in enumerate(zip(win.ins, win.outs, win.kernel, win.strides, win.dilations,
                                                       win.begin, win.end)):
        ends.append(max(e, (o - 1) * s + (k - 1) * d + 1 - h - p))
        c = _axis_counts(h, o, k, s, d, p, e, True).astype(np.float64)
        counts = counts * c.reshape([1, 1] + [-1 if i == axis else 1 for i in range(len(win.outs))])
    ones = b.const(np.ones([channels, 1] + win.kernel), b.np_dtype(x))
    total = b.op("Conv", x, ones, group=channels, kernel_shape=win.kernel, strides=win.strides,
                 dilations=win.dilations, pads=list(win.begin) + ends)
    # The Conv may produce windows past ceil_mode's last one (those starting in the end pad):
    # keep onnxruntime's output size.
    total = b.op("Slice", total, b.ints([0] * len(win.outs)), b.ints(win.outs), b.ints(list(range(2, 2 + len(win.outs)))))
    scale = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
    return b.mul(total, b.const(scale, b.np_dtype(x)))


def _axis_counts(h, o, k, s, d, begin, end, include_pad: bool) -> np.ndarray:
    """Per output position of one axis, how many of its window taps the average divides by.

    As onnxruntime (and torch) count: the padded taps count when count_include_pad, but
    never those past the end pad (ceil_mode windows that run off the end).
    """
    taps = np.arange(o)[:, None] * s - begin + np.arange(k)[None, :] * d
    inside = (taps < h + end) if include_pad else ((taps >= 0) & (taps < h))
    return inside.sum(axis=1)


@register("AveragePool")
def average_pool(b, node, grads):
    g, x = grads[0], node.input[0]
    what = f"AveragePool '{node.name}'"
    win = Window.of(b, node, attr(node, "kernel_shape"), what)
    include_pad = bool(attr(node, "count_include_pad", 0))
    counts = np.ones([1, 1] + [1] * len(win.outs))
    for axis, geo in enumerate(zip(win.ins, win.outs, win.kernel, win.strides, win.dilations, win.begin, win.end)):
        c = _axis_counts(*geo, include_pad).astype(np.float64)
        counts = counts * c.reshape([1, 1] + [-1 if i == axis else 1 for i in range(len(win.outs))])
    scale = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
    if np.all(scale == scale.flat[0]):
        scaled = b.mul(g, b.scalar_like(float(scale.flat[0]), x))
    else:
        scaled = b.mul(g, b.const(scale, b.np_dtype(x)))
    return [_spread(b, scaled, x, win, what)]


@register("GlobalAveragePool")
def global_average_pool(b, node, grads):
    x = node.input[0]
    n = int(np.prod(static_spatial(b, x, f"GlobalAveragePool '{node.name}'")))
    g = b.mul(grads[0], b.scalar_like(1.0 / n, x))
    return [b.op("Expand", g, b.shape_of(x))]


def _lp_factor(b, node, g):
    """y = (sum |x|^p)^(1/p) has dy/dx = sign(x) |x|^(p-1) y^(1-p): the output-side factor
    g * y^(1-p) (zero where y is zero) and the input-side factor sign(x) |x|^(p-1)."""
    x, y = node.input[0], node.output[0]
    p = float(attr(node, "p", 2))
    zero = b.scalar_like(0.0, y)
    safe = b.op("Where", b.op("Greater", y, zero), y, b.scalar_like(1.0, y))
    out_side = b.op("Where", b.op("Greater", y, zero), b.mul(g, b.op("Pow", safe, b.scalar_like(1.0 - p, y))), zero)
    in_side = b.mul(b.op("Sign", x), b.op("Pow", b.op("Abs", x), b.scalar_like(p - 1.0, x)))
    return out_side, in_side


@register("LpPool")
def lp_pool(b, node, grads):
    what = f"LpPool '{node.name}'"
    x = node.input[0]
    win = Window.of(b, node, attr(node, "kernel_shape"), what)
    out_side, in_side = _lp_factor(b, node, grads[0])
    return [b.mul(in_side, _spread(b, out_side, x, win, what))]


@register("GlobalLpPool")
def global_lp_pool(b, node, grads):
    out_side, in_side = _lp_factor(b, node, grads[0])
    return [b.mul(in_side, out_side)]
