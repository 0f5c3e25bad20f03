"""Exact vector-Jacobian products of region and cache operators: `TensorScatter` (opset 24,
a KV-cache write) and `RoiAlign` (opsets 10-21: onnxruntime has no kernel for opset 22).

Both are linear in their data input; where elements go is only known at run time (the
write indices, the boxes), so each backward reruns the forward's own index logic on
positions rather than values: the forward applied to the input's flat indices says where
every output element came from.
"""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from ..errors import ModelError
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
    zeros = b.op("ConstantOfShape", room, value=numpy_helper.from_array(np.zeros(1, b.np_dtype(update))))
    spread = b.op("ScatterElements", zeros, b.op("Reshape", slot, flat), b.op("Reshape", g, flat),
                  axis=0, reduction="add")
    g_update = b.reshape_like(b.op("Slice", spread, b.ints([0]), n, b.ints([0])), update)
    return [g_past, g_update, None]


def _zeros_as(b, like):
    """Zeros shaped like forward tensor `like`, of its element type."""
    zero = numpy_helper.from_array(np.zeros(1, b.np_dtype(like)))
    return b.op("ConstantOfShape", b.shape_of(like), value=zero)
