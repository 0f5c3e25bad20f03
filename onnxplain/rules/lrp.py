"""Layer-wise relevance propagation rules, one family per rule (`lrp.epsilon`, `lrp.gamma`, ...).

Every rule for a linear layer has the same three steps, emitted as ONNX nodes:
z = forward of the modified layer, s = R / stabilise(z), c = backward (the adjoint) of the
modified layer applied to s; the relevance of the input is x * c, or the rule's own form
(z-box, w-square, flat). The modified weights (W+, W-, W + gamma W+, W^2, ones) are computed
with numpy when the explainer is compiled; the adjoint is the layer's own gradient rule run
on a copy of the node whose weight is the modified constant.

Conventions are Zennit's (zennit.rules), so that composites agree with it number for number:
the stabiliser adds epsilon with the sign of z (+epsilon where z == 0); epsilon, gamma,
alpha-beta and z-plus keep the (modified) bias in the positive-input term and drop it from
the negative-input term; z-box lets the biases cancel; w-square squares the bias; flat
drops it. `bias=False` drops the bias everywhere (Zennit's zero_params='bias').
"""

from __future__ import annotations

import json

import numpy as np
import onnx

from ..errors import ModelError, OptionError
from .base import attr, attrs, lookup, register

CONV = ("Conv", "ConvTranspose")
DENSE = ("Gemm", "MatMul")
LINEAR = CONV + DENSE
# Element-wise activations: relevance passes through unchanged (Zennit's Pass).
ACTIVATIONS = (
    "Relu", "Clip", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "Elu",
    "Selu", "Celu", "Softplus", "Softsign", "ThresholdedRelu", "Gelu", "Mish", "Identity", "Dropout",
)
POOLS = ("AveragePool", "GlobalAveragePool")
EPSILON = 1e-6  # Zennit's stabiliser


# --------------------------------------------------------------------------- shared pieces
def stabilise(b, z: str, epsilon: float) -> str:
    """z + epsilon * sign(z), with sign(0) = +1 (Zennit's `stabilize`)."""
    if epsilon == 0:
        return z
    neg = b.op("Less", z, b.scalar_like(0.0, z))
    return b.add(z, b.op("Where", neg, b.scalar_like(-epsilon, z), b.scalar_like(epsilon, z)))


def divide(b, r: str, z: str, epsilon: float) -> str:
    return b.op("Div", r, stabilise(b, z, epsilon))


class WithConstants:
    """A view of the builder that also knows the values of constants emitted by a rule, so
    a gradient rule run on a copy of a node treats the modified weight as fixed (no weight
    gradient) and can read its shape (quantized.py's float view of a quantized node too)."""

    def __init__(self, b, consts: dict):
        self._b, self._consts = b, consts

    def constant(self, name):
        return self._consts[name] if name in self._consts else self._b.constant(name)

    def shape(self, name):
        return tuple(self._consts[name].shape) if name in self._consts else self._b.shape(name)

    def __getattr__(self, key):
        return getattr(self._b, key)


class Layer:
    """A linear node seen as x -> W x + bias: where its data input and weight are, and how to
    emit it (and its adjoint) with other weights, bias and input."""

    def __init__(self, b, node):
        if node.op_type not in LINEAR:
            raise ModelError(f"LRP rules for linear layers do not apply to {node.op_type} '{node.name}'")
        self.b, self.node = b, node
        ins = list(node.input)
        if node.op_type == "MatMul":
            consts = [i for i, name in enumerate(ins) if b.constant(name) is not None]
            if len(consts) != 1:
                raise ModelError(
                    f"MatMul '{node.name}' multiplies two computed tensors; LRP rules need one constant "
                    "(weight) operand: choose the gradient rule for it (rules=node:NAME:gradient)"
                )
            self.w_index = consts[0]
            self.x_index = 1 - self.w_index
        else:
            self.x_index, self.w_index = 0, 1
            if b.constant(ins[1]) is None:
                raise ModelError(
                    f"{node.op_type} '{node.name}' has a computed weight; LRP rules need constant weights"
                )
        self.x = ins[self.x_index]
        self.weight = b.constant(ins[self.w_index])
        bias = ins[2] if len(ins) > 2 and ins[2] else None
        self.bias = None
        if bias is not None:
            self.bias = b.constant(bias)
            if self.bias is None:
                raise ModelError(f"{node.op_type} '{node.name}' has a computed bias; LRP rules need a constant one")

    def _inputs(self, x, weight, bias):
        ins = [None, None]
        ins[self.x_index], ins[self.w_index] = x, weight
        if bias is not None:
            ins.append(bias)
        return ins

    def forward(self, x: str, weight: np.ndarray, bias: np.ndarray | None = None) -> str:
        """The layer on tensor `x` with other parameters (bias None: none)."""
        b = self.b
        w = b.const(weight, weight.dtype)
        c = None if bias is None or not np.any(bias) else b.const(bias, bias.dtype)
        if c is not None and self.node.op_type == "MatMul":
            return b.add(b.op("MatMul", *self._inputs(x, w, None)), c)
        return b.op(self.node.op_type, *self._inputs(x, w, c), domain=self.node.domain, **attrs(self.node))

    def adjoint(self, s: str, weight: np.ndarray) -> str:
        """W'^T s: the layer's own gradient rule, run as if its weight were `weight`."""
        b = self.b
        w = b.const(weight, weight.dtype)
        node = onnx.NodeProto()
        node.CopyFrom(self.node)
        node.input[self.w_index] = w
        if len(node.input) > 2:
            del node.input[2:]  # the bias has no effect on the adjoint
        rule = lookup(node.op_type, "gradient")
        if rule is None:
            raise ModelError(f"no gradient rule for {node.op_type}: the LRP rules need it for the adjoint")
        return rule(WithConstants(b, {w: weight}), node, [s])[self.x_index]

    def result(self, r: str) -> list:
        out = [None] * len(self.node.input)
        out[self.x_index] = r
        return out

    def bias_or_none(self, keep: bool):
        return self.bias if keep else None


def positive(a):
    return None if a is None else np.maximum(a, 0).astype(a.dtype)


def negative(a):
    return None if a is None else np.minimum(a, 0).astype(a.dtype)


def non_negative(graph, name: str) -> bool:
    """Whether tensor `name` is >= 0 by construction (a ReLU's output, a pool of one, ...):
    rules then skip the terms of its negative part, which are exactly zero."""
    seen = 0
    while seen < 64:
        seen += 1
        node = graph.producer.get(name)
        if node is None:
            return False
        op = node.op_type
        if op in ("Relu", "Sigmoid", "Softmax", "Softplus", "HardSigmoid", "Abs"):
            return True
        if op == "Clip":
            lo = graph.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
            return lo is not None and float(np.min(lo)) >= 0
        if op in ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Reshape", "Flatten",
                  "Squeeze", "Unsqueeze", "Transpose", "Identity", "Dropout"):
            name = node.input[0]
            continue
        if op == "Concat":
            return all(non_negative(graph, i) for i in node.input)
        return False
    return False


def _parts(b, x: str):
    """(x+, x-) with x- None where x >= 0 by construction."""
    if non_negative(b.graph, x):
        return x, None
    zero = b.scalar_like(0.0, x)
    return b.op("Max", x, zero), b.op("Min", x, zero)


# --------------------------------------------------------------------------- linear layers
@register(*LINEAR, family="lrp.epsilon")
def epsilon_rule(b, node, grads, epsilon: float = EPSILON, bias: bool = True):
    """R_in = x * W^T (R / stabilise(W x + b)). With epsilon 0 this is LRP-0."""
    layer = Layer(b, node)
    z = node.output[0] if bias or layer.bias is None else layer.forward(layer.x, layer.weight)
    s = divide(b, grads[0], z, epsilon)
    return layer.result(b.mul(layer.x, layer.adjoint(s, layer.weight)))


def _two_signed(b, layer, r, wp, wn, bias_p, epsilon):
    """The z+ pattern: s = R / stab(W+ x+ + bias_p + W- x-); R_in = x+ W+^T s + x- W-^T s."""
    xp, xn = _parts(b, layer.x)
    z = layer.forward(xp, wp, bias_p)
    if xn is not None:
        z = b.add(z, layer.forward(xn, wn))
    s = divide(b, r, z, epsilon)
    out = b.mul(xp, layer.adjoint(s, wp))
    if xn is not None:
        out = b.add(out, b.mul(xn, layer.adjoint(s, wn)))
    return out


@register(*LINEAR, family="lrp.zplus")
def zplus_rule(b, node, grads, epsilon: float = EPSILON, bias: bool = True):
    """z+: only the positive contributions W+ x+ + W- x- (+ b+) explain the output."""
    layer = Layer(b, node)
    w = layer.weight
    r = _two_signed(b, layer, grads[0], positive(w), negative(w), positive(layer.bias_or_none(bias)), epsilon)
    return layer.result(r)


def check_alpha_beta(alpha: float, beta: float):
    if alpha < 0 or beta < 0:
        raise OptionError(f"alpha={alpha} and beta={beta} must both be non-negative")
    if abs((alpha - beta) - 1.0) > 1e-9:
        raise OptionError(f"alpha - beta must equal 1 (conservation); got alpha={alpha}, beta={beta}")


@register(*LINEAR, family="lrp.alpha_beta")
def alpha_beta_rule(b, node, grads, alpha: float = 2.0, beta: float = 1.0, epsilon: float = EPSILON,
                    bias: bool = True):
    """alpha * (positive contributions) - beta * (negative contributions), each normalised
    by its own total."""
    check_alpha_beta(alpha, beta)
    layer = Layer(b, node)
    w, c = layer.weight, layer.bias_or_none(bias)
    wp, wn = positive(w), negative(w)
    r = b.mul(_two_signed(b, layer, grads[0], wp, wn, positive(c), epsilon), b.scalar_like(alpha, layer.x))
    if beta:
        # Negative contributions: W- x+ (+ b-) + W+ x-.
        neg = _two_signed(b, layer, grads[0], wn, wp, negative(c), epsilon)
        r = b.op("Sub", r, b.mul(neg, b.scalar_like(beta, layer.x)))
    return layer.result(r)


@register(*LINEAR, family="lrp.gamma")
def gamma_rule(b, node, grads, gamma: float = 0.25, epsilon: float = EPSILON, bias: bool = True):
    """Generalised gamma rule (Zennit's `Gamma`): where the output is positive, the
    positive contributions are favoured by W + gamma W+; where negative, the negative ones
    by W + gamma W-. Relevance of outputs that are exactly zero is dropped, as in Zennit."""
    layer = Layer(b, node)
    w, c = layer.weight, layer.bias_or_none(bias)
    up = (w + gamma * positive(w)).astype(w.dtype)
    down = (w + gamma * negative(w)).astype(w.dtype)
    c_up = None if c is None else (c + gamma * positive(c)).astype(c.dtype)
    c_down = None if c is None else (c + gamma * negative(c)).astype(c.dtype)
    y, r = node.output[0], grads[0]
    zero = b.scalar_like(0.0, y)
    r_pos = b.op("Where", b.op("Greater", y, zero), r, zero)
    r_neg = b.op("Where", b.op("Less", y, zero), r, zero)
    xp, xn = _parts(b, layer.x)
    z_pos = layer.forward(xp, up, c_up)
    z_neg = layer.forward(xp, down, c_down)
    if xn is not None:
        z_pos = b.add(z_pos, layer.forward(xn, down))
        z_neg = b.add(z_neg, layer.forward(xn, up))
    s_pos, s_neg = divide(b, r_pos, z_pos, epsilon), divide(b, r_neg, z_neg, epsilon)
    out = b.mul(xp, b.add(layer.adjoint(s_pos, up), layer.adjoint(s_neg, down)))
    if xn is not None:
        out = b.add(out, b.mul(xn, b.add(layer.adjoint(s_pos, down), layer.adjoint(s_neg, up))))
    return layer.result(out)


def _full_like(b, value: np.ndarray, x: str) -> str:
    """A constant shaped (1, *x.shape[1:]) from a scalar, a per-channel (axis 1) vector or a
    full array: the input box bound of z-box."""
    shape = b.shape(x)
    if shape is None or not all(isinstance(d, int) for d in shape[1:]):
        raise ModelError(f"z-box needs the static shape of '{x}'; give the model static input shapes")
    full = (1,) + tuple(int(d) for d in shape[1:])
    v = np.asarray(value, dtype=b.np_dtype(x))
    if v.ndim == 1 and v.size > 1:
        if v.size != full[1]:
            raise OptionError(f"z-box bound has {v.size} values but '{x}' has {full[1]} channels")
        v = v.reshape((1, -1) + (1,) * (len(full) - 2))
    try:
        return b.const(np.broadcast_to(v, full).copy(), v.dtype)
    except ValueError:
        raise OptionError(f"z-box bound of shape {v.shape} does not fit input '{x}' of shape {full}") from None


def preprocess_bounds(graph, x: str):
    """(low, high) per channel of a model input from its preprocessing metadata
    (x = (pixel * scale - mean) / std for pixels 0..255), or None."""
    if x not in graph.inputs:
        return None
    raw = {p.key: p.value for p in graph.model.metadata_props}.get("onnxplain.preprocess")
    if not raw:
        return None
    try:
        meta = json.loads(raw)
        scale = float(meta.get("scale", 1.0 / 255.0))
        mean = np.asarray(meta.get("mean") or [0.0], dtype=np.float64)
        std = np.asarray(meta.get("std") or [1.0], dtype=np.float64)
    except (ValueError, TypeError, AttributeError):
        return None
    if str(meta.get("layout", "nchw")).lower() != "nchw" and mean.size > 1:
        return None
    low, high = (0.0 - mean) / std, (255.0 * scale - mean) / std
    return np.minimum(low, high), np.maximum(low, high)


def _bound(b, x, value, kind: str) -> str:
    if value is not None:
        return _full_like(b, value, x)
    # Per sample: the input's own minimum (or maximum), which is chunk- and export-safe.
    axes = list(range(1, b.rank(x)))
    v = b.reduce("ReduceMin" if kind == "low" else "ReduceMax", x, axes, keepdims=True)
    return b.op("Expand", v, b.shape_of(x))


@register(*LINEAR, family="lrp.zbox")
def zbox_rule(b, node, grads, low=None, high=None, epsilon: float = EPSILON, bias: bool = True):
    """z-box (Montavon et al. 2017) for inputs bounded by low <= x <= high:
    z = W x - W+ low - W- high; R_in = x W^T s - low W+^T s - high W-^T s. The biases
    cancel (Zennit keeps b, b+ and b- in the three terms). low/high: scalars, per-channel
    values, or None: the preprocessing's pixel range, else each sample's min/max."""
    layer = Layer(b, node)
    x, w = layer.x, layer.weight
    if low is None and high is None:
        bounds = preprocess_bounds(b.graph, x)
        if bounds is not None:
            low, high = bounds
    lo, hi = _bound(b, x, low, "low"), _bound(b, x, high, "high")
    wp, wn = positive(w), negative(w)
    c = layer.bias_or_none(bias)
    z = node.output[0] if bias or layer.bias is None else layer.forward(x, w)
    z = b.op("Sub", z, layer.forward(lo, wp, positive(c)))
    z = b.op("Sub", z, layer.forward(hi, wn, negative(c)))
    s = divide(b, grads[0], z, epsilon)
    r = b.mul(x, layer.adjoint(s, w))
    r = b.op("Sub", r, b.mul(lo, layer.adjoint(s, wp)))
    r = b.op("Sub", r, b.mul(hi, layer.adjoint(s, wn)))
    return layer.result(r)


def _ones_input(b, x: str) -> str:
    return _full_like(b, np.ones(1), x)


@register(*LINEAR, family="lrp.wsquare")
def wsquare_rule(b, node, grads, epsilon: float = EPSILON, bias: bool = True):
    """w-square (Montavon et al. 2017): R_in = (W^2)^T (R / stabilise(W^2 1 + b^2)),
    independent of the input's value (Zennit squares the bias too)."""
    layer = Layer(b, node)
    w2 = (layer.weight ** 2).astype(layer.weight.dtype)
    c = layer.bias_or_none(bias)
    z = layer.forward(_ones_input(b, layer.x), w2, None if c is None else (c ** 2).astype(c.dtype))
    return layer.result(layer.adjoint(divide(b, grads[0], z, epsilon), w2))


@register(*LINEAR, family="lrp.flat")
def flat_rule(b, node, grads, epsilon: float = EPSILON, bias: bool = False):
    """flat (Lapuschkin et al. 2019): w-square with all weights one and no bias: relevance
    spreads uniformly over each output's receptive field."""
    layer = Layer(b, node)
    ones = np.ones_like(layer.weight)
    z = layer.forward(_ones_input(b, layer.x), ones)
    return layer.result(layer.adjoint(divide(b, grads[0], z, epsilon), ones))


@register("BatchNormalization", family="lrp.epsilon")
def batchnorm_epsilon(b, node, grads, epsilon: float = EPSILON, bias: bool = True):
    """An unfolded BatchNormalization as the affine layer y = a x + c it is at inference:
    the epsilon rule, R_in = x a R / stabilise(y)."""
    scale, _, mean, var = (b.constant(n) for n in node.input[1:5])
    if any(v is None for v in (scale, mean, var)):
        raise ModelError(f"BatchNormalization '{node.name}' has computed statistics; LRP needs constant ones")
    a = scale / np.sqrt(var + float(attr(node, "epsilon", 1e-5)))
    rank = b.rank(node.input[0])
    a = a.reshape((-1,) + (1,) * (rank - 2)).astype(b.np_dtype(node.input[0]))
    x, y = node.input[0], node.output[0]
    z = y if bias else b.mul(x, b.const(a, a.dtype))
    s = divide(b, grads[0], z, epsilon)
    return [b.mul(b.mul(x, b.const(a, a.dtype)), s)] + [None] * (len(node.input) - 1)


# --------------------------------------------------------------------------- pass and norm
@register(*ACTIVATIONS, "BatchNormalization", family="lrp.pass")
def pass_rule(b, node, grads, **_):
    """Relevance passes unchanged to the (first) data input (Zennit's Pass)."""
    return [grads[0]] + [None] * (len(node.input) - 1)


@register("Mul", "Div", "Add", "Sub", family="lrp.pass")
def pass_affine(b, node, grads, **_):
    """Scaling or shifting by a constant: the relevance stays with the computed operand.
    With two computed operands this is not an element-wise activation: proportional split."""
    consts = [b.constant(i) is not None for i in node.input]
    if consts.count(False) != 1:
        if node.op_type in ("Add", "Sub"):
            return norm_rule(b, node, grads)
        # A product of two computed tensors is a gate (SiLU's x * sigmoid(x), squeeze-and-
        # excitation): the signal keeps the relevance, the gate gets none.
        consts = [True] * len(node.input)
        consts[_signal_operand(b, node)] = False
    out = [None] * len(node.input)
    i = consts.index(False)
    r = grads[0]
    if b.shape(node.input[i]) != b.shape(node.output[0]):
        r = b.unbroadcast(r, node.output[0], node.input[i])
    out[i] = r
    return out


GATES = ("Sigmoid", "HardSigmoid", "Tanh", "Softmax")


def _signal_operand(b, node) -> int:
    full = b.shape(node.output[0])
    for k, x in enumerate(node.input[:2]):
        producer = b.graph.producer.get(x)
        if b.shape(x) == full and (producer is None or producer.op_type not in GATES):
            return k
    return 0


@register("Add", "Sum", "Sub", family="lrp.norm")
def norm_rule(b, node, grads, epsilon: float = EPSILON, **_):
    """Proportional split of a sum (residual connections): R_i = x_i R / stabilise(sum x),
    Zennit's Norm on its Sum layer. Constant operands (biases) absorb their share."""
    y = node.output[0]
    s = divide(b, grads[0], y, epsilon)
    out = []
    for k, x in enumerate(node.input):
        if not x or b.constant(x) is not None:
            out.append(None)
            continue
        share = b.mul(x, s) if b.shape(x) == b.shape(y) else b.unbroadcast(b.mul(x, s), y, x)
        out.append(b.op("Neg", share) if node.op_type == "Sub" and k == 1 else share)
    return out


@register(*POOLS, "ReduceMean", "ReduceSum", family="lrp.norm")
def pool_norm(b, node, grads, epsilon: float = EPSILON, **_):
    """A linear pool with positive weights (average, sum, mean): R_in = x * P^T (R / stab(P x))."""
    return _proportional(b, node, node, grads[0], node.output[0], epsilon)


def _proportional(b, node, adj_node, r, z, epsilon):
    rule = lookup(adj_node.op_type, "gradient")
    if rule is None:
        raise ModelError(f"no gradient rule for {adj_node.op_type}: needed for its LRP norm rule")
    c = rule(b, adj_node, [divide(b, r, z, epsilon)])[0]
    return [b.mul(node.input[0], c)] + [None] * (len(node.input) - 1)


@register("MaxPool", family="lrp.norm")
def maxpool_smooth(b, node, grads, epsilon: float = EPSILON, **_):
    """A smooth MaxPool: each window's relevance split in proportion to the activations in
    it (the norm rule of a sum pool with the same windows), instead of winner-take-all."""
    if len(node.output) > 1 and node.output[1]:
        raise ModelError(f"MaxPool '{node.name}' exports its indices; the smooth split does not apply")
    avg = onnx.helper.make_node(
        "AveragePool", [node.input[0]], [node.output[0]], name=node.name,
        **{k: v for k, v in attrs(node).items() if k in ("kernel_shape", "strides", "pads", "auto_pad",
                                                          "ceil_mode", "dilations")},
        count_include_pad=1,
    )
    if b.opset < 19 and any(int(d) != 1 for d in attrs(node).get("dilations", [])):
        from .gradient_pool import window_average

        z = window_average(b, node.input[0], node, f"MaxPool '{node.name}'")
    else:
        z = b.op("AveragePool", node.input[0], **{a.name: onnx.helper.get_attribute_value(a) for a in avg.attribute})
    return _proportional(b, node, avg, grads[0], z, epsilon)


RULE_NAMES = ("epsilon", "zplus", "alpha_beta", "gamma", "zbox", "wsquare", "flat", "pass", "norm", "gradient")
