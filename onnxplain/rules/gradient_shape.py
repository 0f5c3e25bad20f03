"""Exact vector-Jacobian products of operators that move or select elements (reshapes,
transposes, slicing, concatenation, padding, resizing, reductions)."""

from .base import register


@register("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(b, node, grads):
    # Element order is unchanged: the gradient takes the input's shape back.
    return [b.reshape_like(grads[0], node.input[0])] + [None] * (len(node.input) - 1)
