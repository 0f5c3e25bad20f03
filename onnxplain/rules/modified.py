"""Modified backward passes for ReLU: guided backpropagation and deconvnet.

Both replace only the ReLU's backward step; every other operator keeps its exact
gradient, as in Captum's GuidedBackprop and Deconvolution.
"""

from .base import lookup, register


@register("Relu", family="guided_backprop")
def guided_relu(b, node, grads):
    # Springenberg et al. 2014: pass only positive gradient through active units.
    x, g = node.input[0], grads[0]
    zero = b.scalar_like(0, x)
    mask = b.cast_like(b.op("Greater", x, zero), x)
    return [b.mul(b.op("Relu", g), mask)]


@register("Relu", family="deconvnet")
def deconv_relu(b, node, grads):
    # Zeiler & Fergus 2014: the backward ReLU sees only the signal coming down.
    return [b.op("Relu", grads[0])]


def _is_rectifier(b, node) -> bool:
    """A Clip whose lower bound is the constant 0: ReLU6 and friends."""
    lo = node.input[1] if len(node.input) > 1 else ""
    value = b.constant(lo) if lo else None
    return value is not None and value.size == 1 and float(value) == 0.0


def _clip_as(relu_rule):
    # The rectifying part of a Clip(0, max) gets the modified ReLU rule; above max the
    # exact gradient (zero) still holds.
    def rule(b, node, grads):
        if not _is_rectifier(b, node):
            return lookup("Clip")(b, node, grads)
        g = relu_rule(b, node, grads)[0]
        hi = node.input[2] if len(node.input) > 2 else ""
        if hi:
            x = node.input[0]
            g = b.op("Where", b.op("LessOrEqual", x, hi), g, b.scalar_like(0, x))
        return [g] + [None] * (len(node.input) - 1)

    return rule


register("Clip", family="guided_backprop_clip")(_clip_as(guided_relu))
register("Clip", family="deconvnet_clip")(_clip_as(deconv_relu))
