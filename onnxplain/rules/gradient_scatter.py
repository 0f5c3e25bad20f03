"""Exact vector-Jacobian products of the operators that write or pick elements by index:
ScatterElements / Scatter / ScatterND (every reduction), TopK (values), MaxUnpool,
Compress and CenterCropPad.

A scatter's output at a written position is a function of the data there and of the
updates written to it (replaced, added, multiplied, or the max/min taken), so each
gradient is a gather or a scatter of the incoming one. Conventions: where several updates
write one position without reduction, the one onnxruntime keeps (the last) gets the
gradient; max/min share it equally between tied candidates (as ReduceMax does).
"""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from ..errors import ModelError
from .base import attr, register
from .gradient_elementwise import _c, _wanted


def _fill_like(b, x: str, value) -> str:
    v = numpy_helper.from_array(np.full(1, value, dtype=b.np_dtype(x)))
    return b.op("ConstantOfShape", b.shape_of(x), value=v)


class _Elements:
    """ScatterElements / GatherElements along one axis."""

    def __init__(self, b, node):
        self.b = b
        self.axis = int(attr(node, "axis", 0))
        self.idx = node.input[1]

    def scatter(self, data, updates, reduction="none"):
        return self.b.op("ScatterElements", data, self.idx, updates, axis=self.axis,
                         reduction=None if reduction == "none" else reduction)

    def gather(self, t):
        return self.b.op("GatherElements", t, self.idx, axis=self.axis)


class _ND:
    """ScatterND / GatherND."""

    def __init__(self, b, node):
        self.b = b
        self.idx = node.input[1]

    def scatter(self, data, updates, reduction="none"):
        return self.b.op("ScatterND", data, self.idx, updates, reduction=None if reduction == "none" else reduction)

    def gather(self, t):
        return self.b.op("GatherND", t, self.idx)


def _scatter_rule(b, node, grads, ix):
    data, _, upd = node.input[:3]
    y, g = node.output[0], grads[0]
    reduction = attr(node, "reduction", "none")
    wd, wu = _wanted(b, data), _wanted(b, upd)
    gd = gu = None
    if reduction == "none":
        if wd:
            gd = ix.scatter(g, b.zeros_like(upd))  # written positions forget the data
        if wu:
            gu = ix.gather(g)
            if isinstance(ix, _Elements):
                # Updates that were overwritten by a later one with the same index get nothing.
                zero, one = b.const(np.array(0, np.int64), np.int64), b.const(np.array(1, np.int64), np.int64)
                ids = b.cast_like(b.op("Reshape", b.op("Range", zero, b.op("Size", upd), one), b.shape_of(upd)), upd)
                winner = ix.gather(ix.scatter(_fill_like(b, data, -1), ids))
                gu = b.op("Where", b.op("Equal", winner, ids), gu, _c(b, 0, upd))
    elif reduction == "add":
        gd = g if wd else None
        gu = ix.gather(g) if wu else None
    elif reduction == "mul":
        # y = data * P, P the product of the updates at a position.
        if wd:
            gd = b.mul(g, ix.scatter(_fill_like(b, data, 1), upd, "mul"))
        if wu:
            # d y / d u = y / u where u != 0; for u = 0 the product of the others: data times
            # the non-zero updates if u is the only zero there, else 0.
            zero = b.op("Equal", upd, _c(b, 0, upd))
            safe = b.op("Where", zero, _c(b, 1, upd), upd)
            nonzero_prod = b.mul(data, ix.scatter(_fill_like(b, data, 1), safe, "mul"))
            zeros_at = ix.scatter(_fill_like(b, data, 0), b.cast_like(zero, upd), "add")
            only = b.op("Equal", ix.gather(zeros_at), _c(b, 1, upd))
            at_zero = b.op("Where", only, ix.gather(nonzero_prod), _c(b, 0, upd))
            others = b.op("Where", zero, at_zero, b.op("Div", ix.gather(y), safe))
            gu = b.mul(ix.gather(g), others)
    elif reduction in ("max", "min"):
        tie_d = b.cast_like(b.op("Equal", data, y), y)
        tie_u = b.cast_like(b.op("Equal", upd, ix.gather(y)), y)
        count = b.op("Add", tie_d, ix.scatter(_fill_like(b, data, 0), tie_u, "add"))
        share = b.op("Div", g, count)
        gd = b.mul(share, tie_d) if wd else None
        gu = b.mul(ix.gather(share), tie_u) if wu else None
    else:
        raise ModelError(f"{node.op_type} node '{node.name}': unknown reduction '{reduction}'")
    return [gd, None, gu]


@register("ScatterElements", "Scatter")
def scatter_elements(b, node, grads):
    return _scatter_rule(b, node, grads, _Elements(b, node))


@register("ScatterND")
def scatter_nd(b, node, grads):
    return _scatter_rule(b, node, grads, _ND(b, node))


@register("TopK")
def top_k(b, node, grads):
    # The values are the input at the returned indices; the indices carry nothing.
    if grads[0] is None:
        return [None, None]
    x = node.input[0]
    axis = int(attr(node, "axis", -1))
    out = b.op("ScatterElements", b.zeros_like(x), node.output[1], grads[0], axis=axis, reduction="add")
    return [out, None]


@register("MaxUnpool")
def max_unpool(b, node, grads):
    # y = x written at the flat (whole-tensor) positions I: x reads them back.
    flat = b.op("Reshape", grads[0], b.ints([-1]))
    return [b.op("Gather", flat, node.input[1], axis=0), None, None][: len(node.input)]


@register("Compress")
def compress(b, node, grads):
    # The selected slices (elements without an axis) are a Gather of the positions where the
    # condition holds: scatter the gradient back there.
    x, cond = node.input[:2]
    g = grads[0]
    picked = b.squeeze(b.op("NonZero", cond), [0])
    ax = attr(node, "axis")
    if ax is None:
        flat = b.op("ScatterElements", b.op("Reshape", b.zeros_like(x), b.ints([-1])), picked, g, axis=0)
        return [b.reshape_like(flat, x), None]
    r = b.rank(x)
    axis = int(ax) % r
    where = b.op("Reshape", picked, b.ints([1] * axis + [-1] + [1] * (r - axis - 1)))
    where = b.op("Expand", where, b.shape_of(g))
    return [b.op("ScatterElements", b.zeros_like(x), where, g, axis=axis), None]


@register("CenterCropPad")
def center_crop_pad(b, node, grads):
    # Cropping and zero-padding about the centre are each other's adjoints, with the same
    # offsets ((in - out) // 2 either way).
    x = node.input[0]
    axes = attr(node, "axes")
    r = b.rank(x)
    axes = list(range(r)) if axes is None else [int(a) % r for a in axes]
    back = b.op("Gather", b.shape_of(x), b.ints(axes))
    return [b.op("CenterCropPad", grads[0], back, axes=axes), None]
