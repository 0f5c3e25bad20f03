"""Exact vector-Jacobian products of element-wise operators (arithmetic, activations,
normalisations, softmax)."""

from .base import register


@register("Relu")
def relu(b, node, grads):
    x = node.input[0]
    mask = b.cast_like(b.op("Greater", x, b.scalar_like(0, x)), x)
    return [b.mul(grads[0], mask)]


@register("Add")
def add(b, node, grads):
    g = grads[0]
    y = node.output[0]
    return [b.unbroadcast(g, y, node.input[0]), b.unbroadcast(g, y, node.input[1])]
