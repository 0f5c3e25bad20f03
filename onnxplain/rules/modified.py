"""Modified backward passes for ReLU: guided backpropagation and deconvnet.

Both replace only the ReLU's backward step; every other operator keeps its exact
gradient, as in Captum's GuidedBackprop and Deconvolution.
"""

from .base import register


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
