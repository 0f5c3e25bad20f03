"""DeepLIFT's rescale rule (Shrikumar et al. 2017), as Captum's `DeepLift` computes it.

The backward signal is a multiplier: linear layers keep their gradient; an element-wise
nonlinearity y = f(x) replaces its derivative by (y - y0) / (x - x0), where x0, y0 are its
input and output on the baseline (the derivative itself where |x - x0| < 1e-10); MaxPool
uses Captum's rule (the output differences routed to the winners of the input and of the
baseline, divided by the input difference). The attribution is (x - x0) times the
multiplier at the input, formed by the method.

The baseline's activations come from a second copy of the forward graph inside the
explainer, fed with the baseline broadcast to the input's batch (for token ids: the
baseline ids; at a layer: the layer's own baseline where one is given).

Element-wise nonlinearities of one computed input that have no rule of their own here
(Erf, Exp, Pow(x, 3), Mish, c / x, ...) take `elementwise`; an activation that exporters
decompose into several nodes (SiLU, GELU, Mish, HardSwish: `onnxplain.groups`) takes one
multiplier for the whole group, `group_rule`.
"""

from __future__ import annotations

import weakref

import numpy as np
import onnx

from .. import groups
from ..errors import UnsupportedOperatorError
from .base import attrs, lookup, register
from .gradient_pool import _route_to_winners

NONLINEAR = ("Relu", "Sigmoid", "Tanh", "Elu", "LeakyRelu", "Softplus", "Clip", "HardSwish", "HardSigmoid",
             "Selu", "Celu", "PRelu", "ThresholdedRelu", "Softsign", "Gelu")
TINY = 1e-10  # Captum's eps for "the input did not move"


class Reference:
    """The baseline's forward activations, emitted once per explainer being built.

    baseline: the float inputs' baseline (a number, one per channel, or one sample).
    ids: {integer input: token ids} used in place of those inputs (a number for every
    position, or one sample's ids), with the ids in `keep_ids` kept from the input (Captum's
    recipe keeps special tokens such as CLS and SEP). at: (tensor, value), a baseline given
    at a tensor inside the model (the attributed layer), which replaces whatever the inputs'
    baselines would give there.
    """

    def __init__(self, baseline=0.0, ids=None, keep_ids=None, at=None):
        self.baseline = baseline
        self.ids = dict(ids or {})
        self.keep_ids = tuple(int(k) for k in (keep_ids or ()))
        self.at = at
        self._names = weakref.WeakKeyDictionary()

    def key(self) -> str:
        def h(v, dtype=np.float64):
            v = np.asarray(v, dtype=dtype)
            return f"{v.shape}:{hash(v.tobytes())}"

        parts = [h(self.baseline)]
        parts += [f"{k}={h(v, np.int64)}" for k, v in sorted(self.ids.items())]
        if self.keep_ids:
            parts.append("keep" + ",".join(map(str, self.keep_ids)))
        if self.at is not None:
            parts.append(f"at:{self.at[0]}={h(self.at[1])}")
        return "|".join(parts)

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

    def _one_sample(self, b, x: str, value, dtype, what: str) -> str:
        """`value` (a number or one sample, with or without its batch axis of 1) expanded to x."""
        v = np.asarray(value, dtype=dtype)
        rank = b.rank(x)
        if v.ndim == rank and v.shape[0] != 1:
            raise ValueError(f"{what} with a batch axis must have batch size 1 (one sample for every row)")
        if 0 < v.ndim == rank - 1:
            v = v.reshape((1,) + v.shape)
        if v.ndim > rank:
            raise ValueError(f"{what} has shape {v.shape}; '{x}' has rank {rank}")
        return b.op("Expand", b.const(v, dtype), b.shape_of(x))

    def _ids(self, b, x: str) -> str:
        dtype = b.np_dtype(x)
        ref = self._one_sample(b, x, self.ids[x], dtype, f"baseline ids for '{x}'")
        if not self.keep_ids:
            return ref
        kept = None
        for k in self.keep_ids:
            hit = b.op("Equal", x, b.const(np.array(k, dtype=dtype), dtype))
            kept = hit if kept is None else b.op("Or", kept, hit)
        return b.op("Where", kept, x, ref)

    def _emit(self, b) -> dict:
        graph = b.graph
        saved = b.current
        b.current = "deeplift_reference"
        names = {x: self._baseline(b, x) for x in graph.inputs if graph.is_float(x)}
        names.update({x: self._ids(b, x) for x in self.ids if x in graph.inputs})
        fixed = set()
        if self.at is not None:
            tensor, value = self.at
            names[tensor] = self._one_sample(b, tensor, value, b.np_dtype(tensor), f"the baseline at '{tensor}'")
            fixed.add(tensor)
        for node in graph.nodes:
            if not any(i in names for i in node.input) or all(o in fixed for o in node.output if o):
                continue
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = b.fresh(node.op_type + "_ref")
            for k, i in enumerate(node.input):
                if i in names:
                    copy.input[k] = names[i]
            for k, o in enumerate(node.output):
                if o and o not in fixed:
                    names[o] = copy.output[k] = b.fresh("ref")
                elif o:
                    copy.output[k] = b.fresh("ref_unused")
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


def elementwise(b, node, grads, reference: Reference = ZERO, index: int = 0):
    """The rescale rule on any element-wise node of one computed input (input `index`; the
    others constants): Erf, Exp, Pow(x, 3), Mish, c / x, ..."""
    x, y = node.input[index], node.output[0]
    grad = lookup(node.op_type, "gradient")(b, node, grads)[index]
    dx = b.op("Sub", x, reference.of(b, x))
    dy = b.op("Sub", y, reference.of(b, y))
    out = [None] * len(node.input)
    out[index] = _rescale(b, grads[0], grad, dx, dy)
    return out


def group_rule(b, node, grads, group: groups.Group, reference: Reference = ZERO):
    """One rescale multiplier for a whole element-wise group (SiLU's Sigmoid and Mul, GELU's
    Div/Erf/Add/Mul/Mul, ...): (y - y0) / (x - x0) from the group's output y to its input
    x, the group's derivative where x did not move. Per-node multipliers would take the
    product rule through x * sigmoid(x), which breaks summation-to-delta."""
    x, y = group.input, group.output
    grad = group_gradient(b, group, grads[0])
    dx = b.op("Sub", x, reference.of(b, x))
    dy = b.op("Sub", y, reference.of(b, y))
    return [_rescale(b, grads[0], grad, dx, dy)]


def group_gradient_rule(b, node, grads, group: groups.Group):
    """The exact gradient through a group that is no element-wise function (a decomposed
    LayerNorm): DeepLIFT has no multiplier for it, as for LayerNormalization."""
    return [group_gradient(b, group, grads[0])]


def group_gradient(b, group: groups.Group, g: str) -> str:
    """The exact vector-Jacobian product of a group, from the gradient rules of its nodes."""
    graph = b.graph
    flow = {group.output: [g]}
    saved = b.current
    for node in reversed(group.nodes):
        gout = [b.sum(flow[o]) if flow.get(o) else None for o in node.output]
        if all(v is None for v in gout) or node.op_type in groups.CONSTANT_PIECES:
            continue
        rule = lookup(node.op_type, "gradient")
        if rule is None:
            raise UnsupportedOperatorError([node.op_type], "deeplift")
        b.current = node.name
        for name, gi in zip(node.input, rule(b, node, gout)):
            if gi is not None and name and graph.constant(name) is None:
                flow.setdefault(name, []).append(gi)
    b.current = saved
    if not flow.get(group.input):
        return b.zeros_like(group.input)
    return b.sum(flow[group.input])


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
