"""DeepLIFT's rescale rule (Shrikumar et al. 2017), as Captum's `DeepLift` computes it.

The backward signal is a multiplier: linear layers keep their gradient; an element-wise
nonlinearity y = f(x) replaces its derivative by (y - y0) / (x - x0), where x0, y0 are its
input and output on the baseline (the derivative itself where |x - x0| < 1e-10); MaxPool
uses Captum's rule (the output differences routed to the winners of the input and of the
baseline, divided by the input difference). The attribution is (x - x0) times the
multiplier at the input, formed by the method.

The baseline's activations come from a second copy of the forward graph inside the
explainer, fed with the baseline broadcast to the input's batch.
"""

from __future__ import annotations

import weakref

import numpy as np
import onnx

from .base import attrs, lookup, register
from .gradient_pool import _route_to_winners

NONLINEAR = ("Relu", "Sigmoid", "Tanh", "Elu", "LeakyRelu", "Softplus", "Clip", "HardSwish", "HardSigmoid",
             "Selu", "Celu", "PRelu", "ThresholdedRelu", "Softsign", "Gelu")
TINY = 1e-10  # Captum's eps for "the input did not move"


class Reference:
    """The baseline's forward activations, emitted once per explainer being built."""

    def __init__(self, baseline=0.0):
        self.baseline = baseline
        self._names = weakref.WeakKeyDictionary()

    def key(self) -> str:
        v = np.asarray(self.baseline, dtype=np.float64)
        return f"{v.shape}:{hash(v.tobytes())}"

    def of(self, b, name: str) -> str:
        if b not in self._names:
            self._names[b] = self._emit(b)
        return self._names[b].get(name, name)

    def _baseline(self, b, x: str) -> str:
        v = np.asarray(self.baseline, dtype=b.np_dtype(x))
        shape = b.shape(x)
        if v.ndim == len(shape) and v.shape[0] != 1:
            raise ValueError("a deeplift baseline with a batch axis must have batch size 1")
        if 0 < v.ndim < len(shape):
            v = v.reshape((1,) + v.shape) if v.ndim == len(shape) - 1 else v.reshape((1, -1) + (1,) * (len(shape) - 2))
        return b.op("Expand", b.const(v, v.dtype), b.shape_of(x))

    def _emit(self, b) -> dict:
        graph = b.graph
        names = {x: self._baseline(b, x) for x in graph.inputs if graph.is_float(x)}
        saved = b.current
        b.current = "deeplift_reference"
        for node in graph.nodes:
            if not any(i in names for i in node.input):
                continue
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = b.fresh(node.op_type + "_ref")
            for k, i in enumerate(node.input):
                if i in names:
                    copy.input[k] = names[i]
            for k, o in enumerate(node.output):
                if o:
                    names[o] = copy.output[k] = b.fresh("ref")
            b.nodes.append(copy)
        b.current = saved
        return names


def _rescale(b, g, grad, dx, dy):
    """g * dy / dx where |dx| >= TINY, else `grad` (the plain gradient)."""
    small = b.op("Less", b.op("Abs", dx), b.scalar_like(TINY, dx))
    safe = b.op("Where", small, b.scalar_like(1.0, dx), dx)
    return b.op("Where", small, grad, b.op("Div", b.mul(g, dy), safe))


ZERO = Reference(0.0)


def nonlinear(b, node, grads, reference: Reference = ZERO):
    x, y = node.input[0], node.output[0]
    grad = lookup(node.op_type, "gradient")(b, node, grads)
    dx = b.op("Sub", x, reference.of(b, x))
    dy = b.op("Sub", y, reference.of(b, y))
    return [_rescale(b, grads[0], grad[0], dx, dy)] + [None] * (len(node.input) - 1)


def maxpool(b, node, grads, reference: Reference = ZERO):
    if grads[0] is None:
        return [None]
    x, y = node.input[0], node.output[0]
    x0, y0 = reference.of(b, x), reference.of(b, y)
    g = grads[0]
    a = attrs(node)
    top = b.op("Max", y, y0)
    spread = b.add(_route_to_winners(b, b.mul(g, b.op("Sub", top, y0)), x, a),
                   _route_to_winners(b, b.mul(g, b.op("Sub", y, top)), x0, a))
    grad = _route_to_winners(b, g, x, a)
    small = b.op("Less", b.op("Abs", b.op("Sub", x, x0)), b.scalar_like(TINY, x))
    safe = b.op("Where", small, b.scalar_like(1.0, x), b.op("Sub", x, x0))
    return [b.op("Where", small, grad, b.op("Div", spread, safe))]


register(*NONLINEAR, family="deeplift")(nonlinear)
register("MaxPool", family="deeplift")(maxpool)
