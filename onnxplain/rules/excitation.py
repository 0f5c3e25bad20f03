"""Excitation backprop (Zhang et al. 2016) and its contrastive variant.

Excitation backprop propagates a marginal winning probability top-down: each unit passes
its probability to the units below in proportion to their excitatory contributions
x_j w_ij^+ (for non-negative activations). That is the z-plus rule without bias, which
conserves the mass exactly; `lrp.zplus` with `bias=False` serves the linear layers.

The contrastive variant subtracts, at the layer below the explained neuron, the winning
probability of its dual unit (the same unit with negated weights) from the target's, then
continues excitation backprop with the difference. Both maps are linear in that signal, so
this equals subtracting the two full maps at the target layer, in one pass, and equals
TorchRay's two passes that subtract at a deeper contrast layer; only truncating the
difference there (methods/relevance.py, non_negative_contrast) makes that layer matter.
"""

from __future__ import annotations

from .base import register
from .lrp import EPSILON, LINEAR, Layer, _two_signed, negative, positive


@register(*LINEAR, family="excitation.contrastive")
def contrastive_top(b, node, grads, epsilon: float = EPSILON):
    """The explained layer: MWP of the target minus MWP of its negated-weight dual."""
    layer = Layer(b, node)
    w = layer.weight
    target = _two_signed(b, layer, grads[0], positive(w), negative(w), None, epsilon)
    dual = _two_signed(b, layer, grads[0], positive(-w), negative(-w), None, epsilon)
    return layer.result(b.op("Sub", target, dual))
