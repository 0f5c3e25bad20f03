"""Exact vector-Jacobian products of element-wise operators (arithmetic, activations,
normalisations, softmax).

Conventions where a function has a kink follow PyTorch's autograd, so that gradients agree
with the peers element for element: ReLU-like units pass no gradient at 0; Clip passes it
where min <= x <= max (torch.clamp; torch's hardtanh uses the open interval and differs only
exactly on a bound); Max/Min share it equally between tied inputs (torch.maximum); Abs has
gradient 0 at 0. Gradients flow only to float inputs that are not constants.
"""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto

from ..errors import ModelError
from .base import attr, register

_FLOAT = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}

SELU_ALPHA = 1.67326319217681884765625
SELU_GAMMA = 1.05070102214813232421875


def _wanted(b, name: str) -> bool:
    """Whether a gradient is wanted for input `name`: present, not fixed, float-valued."""
    if not name or b.constant(name) is not None:
        return False
    t = b.graph.elem_type(name)
    return t is None or t in _FLOAT


def _is_float(b, name: str) -> bool:
    t = b.graph.elem_type(name)
    return t is None or t in _FLOAT


def _input(node, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def _c(b, value, like: str) -> str:
    return b.scalar_like(value, like)


def _where_positive(b, x, g, otherwise):
    """g where x > 0, else `otherwise` (the ReLU family's convention: nothing at 0)."""
    return b.op("Where", b.op("Greater", x, _c(b, 0, x)), g, otherwise)


def _unary(*op_types):
    """Register `d(x, y, node) -> local derivative` as the rule g * d for ops of one input."""

    def deco(derivative):
        def rule(b, node, grads):
            x, y = node.input[0], node.output[0]
            return [b.mul(grads[0], derivative(b, x, y, node))]

        register(*op_types)(rule)
        return derivative

    return deco


# --------------------------------------------------------------------------- arithmetic


@register("Add", "Sum")
def add(b, node, grads):
    g, y = grads[0], node.output[0]
    return [b.unbroadcast(g, y, x) if _wanted(b, x) else None for x in node.input]


@register("Mean")
def mean(b, node, grads):
    y = node.output[0]
    g = b.mul(grads[0], _c(b, 1.0 / len(node.input), y))
    return [b.unbroadcast(g, y, x) if _wanted(b, x) else None for x in node.input]


@register("Sub")
def sub(b, node, grads):
    g, y = grads[0], node.output[0]
    a, c = node.input
    ga = b.unbroadcast(g, y, a) if _wanted(b, a) else None
    gc = b.op("Neg", b.unbroadcast(g, y, c)) if _wanted(b, c) else None
    return [ga, gc]


@register("Mul")
def mul(b, node, grads):
    g, y = grads[0], node.output[0]
    a, c = node.input
    ga = b.unbroadcast(b.mul(g, c), y, a) if _wanted(b, a) else None
    gc = b.unbroadcast(b.mul(g, a), y, c) if _wanted(b, c) else None
    return [ga, gc]


@register("Div")
def div(b, node, grads):
    # y = a / c: dy/da = 1/c, dy/dc = -a/c^2 = -y/c.
    g, y = grads[0], node.output[0]
    a, c = node.input
    wa, wc = _wanted(b, a), _wanted(b, c)
    if not (wa or wc):
        return [None, None]
    q = b.op("Div", g, c)
    ga = b.unbroadcast(q, y, a) if wa else None
    gc = b.op("Neg", b.unbroadcast(b.mul(q, y), y, c)) if wc else None
    return [ga, gc]


@register("Max", "Min")
def extremum(b, node, grads):
    g, y = grads[0], node.output[0]
    if len(node.input) == 1:
        return [g]
    hits = [b.cast_like(b.op("Equal", x, y), y) for x in node.input]
    share = b.op("Div", g, b.sum(hits))  # ties split the gradient equally
    return [b.unbroadcast(b.mul(share, h), y, x) if _wanted(b, x) else None for x, h in zip(node.input, hits)]


@register("Pow")
def pow_(b, node, grads):
    # y = x^p: dy/dx = p x^(p-1); dy/dp = y log x, taken as 0 where x <= 0 (real only for
    # x > 0; torch gives 0 at x = 0 and NaN below, an attribution must not hold NaN).
    g, y = grads[0], node.output[0]
    x, p = node.input
    gx = gp = None
    if _wanted(b, x):
        pc = b.constant(p)
        dtype = b.np_dtype(x)
        if pc is not None and np.all(pc == 0):
            local = _c(b, 0, x)
        elif pc is not None and np.all(pc == 1):
            local = None
        elif pc is not None and np.all(pc == 2):
            local = b.mul(x, _c(b, 2, x))
        elif pc is not None:
            pc = pc.astype(np.float64)
            local = b.mul(b.const(pc.astype(dtype), dtype), b.op("Pow", x, b.const((pc - 1).astype(dtype), dtype)))
        else:
            pf = p if b.graph.elem_type(p) == b.graph.elem_type(x) else b.cast_like(p, x)
            local = b.mul(pf, b.op("Pow", x, b.op("Sub", pf, _c(b, 1, x))))
        gx = b.unbroadcast(g if local is None else b.mul(g, local), y, x)
    if _wanted(b, p):
        dy = b.mul(g, b.mul(y, b.op("Log", x)))
        dy = b.op("Where", b.op("Greater", x, _c(b, 0, x)), dy, _c(b, 0, y))
        if b.graph.elem_type(p) != b.graph.elem_type(x):
            dy = b.cast_like(dy, p)
        gp = b.unbroadcast(dy, y, p)
    return [gx, gp]


@register("Neg")
def neg(b, node, grads):
    return [b.op("Neg", grads[0])]


@register("Reciprocal")
def reciprocal(b, node, grads):
    y = node.output[0]
    return [b.op("Neg", b.mul(grads[0], b.mul(y, y)))]


@_unary("Abs")
def _abs(b, x, y, node):
    return b.op("Sign", x)


@_unary("Exp")
def _exp(b, x, y, node):
    return y


@register("Log")
def log(b, node, grads):
    return [b.op("Div", grads[0], node.input[0])]


@register("Sqrt")
def sqrt(b, node, grads):
    y = node.output[0]
    return [b.op("Div", b.mul(grads[0], _c(b, 0.5, y)), y)]


@_unary("Sin")
def _sin(b, x, y, node):
    return b.op("Cos", x)


@_unary("Cos")
def _cos(b, x, y, node):
    return b.op("Neg", b.op("Sin", x))


@_unary("Erf")
def _erf(b, x, y, node):
    return b.mul(_c(b, 2 / math.sqrt(math.pi), x), b.op("Exp", b.op("Neg", b.mul(x, x))))


# ---------------------------------------------------------------------------- activations


@register("Relu")
def relu(b, node, grads):
    x = node.input[0]
    return [_where_positive(b, x, grads[0], _c(b, 0, x))]


@register("LeakyRelu")
def leaky_relu(b, node, grads):
    x, g = node.input[0], grads[0]
    alpha = float(attr(node, "alpha", 0.01))
    return [_where_positive(b, x, g, b.mul(g, _c(b, alpha, x)))]


@register("ThresholdedRelu")
def thresholded_relu(b, node, grads):
    x = node.input[0]
    alpha = float(attr(node, "alpha", 1.0))
    return [b.op("Where", b.op("Greater", x, _c(b, alpha, x)), grads[0], _c(b, 0, x))]


@register("PRelu")
def prelu(b, node, grads):
    # y = x for x > 0, slope * x otherwise; the slope broadcasts to x (one direction).
    x, slope = node.input
    g, y = grads[0], node.output[0]
    gx = _where_positive(b, x, g, b.mul(g, slope)) if _wanted(b, x) else None
    gs = None
    if _wanted(b, slope):
        gs = b.unbroadcast(b.mul(g, b.op("Min", x, _c(b, 0, x))), y, slope)
    return [gx, gs]


@register("Clip")
def clip(b, node, grads):
    # Gradient where min <= x <= max (torch.clamp); a variable bound receives the gradient
    # of the elements it clipped. An absent or empty bound clips nothing.
    g, y = grads[0], node.output[0]
    x, lo, hi = node.input[0], _input(node, 1), _input(node, 2)
    zero = _c(b, 0, x)
    keep = None
    if lo:
        keep = b.op("GreaterOrEqual", x, lo)
    if hi:
        below = b.op("LessOrEqual", x, hi)
        keep = below if keep is None else b.op("And", keep, below)
    gx = g if keep is None else b.op("Where", keep, g, zero)
    glo = ghi = None
    if _wanted(b, lo):
        glo = b.unbroadcast(b.op("Where", b.op("Less", x, lo), g, zero), y, lo)
    if _wanted(b, hi):
        ghi = b.unbroadcast(b.op("Where", b.op("Greater", x, hi), g, zero), y, hi)
    return [gx, glo, ghi][: max(1, len(node.input))]


@_unary("Sigmoid")
def _sigmoid(b, x, y, node):
    return b.mul(y, b.op("Sub", _c(b, 1, y), y))


@_unary("Tanh")
def _tanh(b, x, y, node):
    return b.op("Sub", _c(b, 1, y), b.mul(y, y))


@register("HardSigmoid")
def hard_sigmoid(b, node, grads):
    # y = max(0, min(1, alpha x + beta)): slope alpha strictly inside (0, 1), as torch.
    y, g = node.output[0], grads[0]
    alpha = float(attr(node, "alpha", 0.2))
    inside = b.op("And", b.op("Greater", y, _c(b, 0, y)), b.op("Less", y, _c(b, 1, y)))
    return [b.op("Where", inside, b.mul(g, _c(b, alpha, y)), _c(b, 0, y))]


@register("HardSwish")
def hard_swish(b, node, grads):
    # y = x * hardsigmoid(x) with alpha 1/6, beta 1/2: 0 below -3, 1 above 3, x/3 + 1/2 between.
    x, g = node.input[0], grads[0]
    ramp = b.mul(g, b.op("Add", b.mul(x, _c(b, 1 / 3, x)), _c(b, 0.5, x)))
    mid = b.op("Where", b.op("Less", x, _c(b, -3, x)), _c(b, 0, x), ramp)
    return [b.op("Where", b.op("Greater", x, _c(b, 3, x)), g, mid)]


@register("Elu")
def elu(b, node, grads):
    # Below 0, y = alpha (e^x - 1), so dy/dx = y + alpha.
    x, y, g = node.input[0], node.output[0], grads[0]
    alpha = float(attr(node, "alpha", 1.0))
    return [_where_positive(b, x, g, b.mul(g, b.op("Add", y, _c(b, alpha, y))))]


@register("Selu")
def selu(b, node, grads):
    x, y, g = node.input[0], node.output[0], grads[0]
    alpha = float(attr(node, "alpha", SELU_ALPHA))
    gamma = float(attr(node, "gamma", SELU_GAMMA))
    neg = b.mul(g, b.op("Add", y, _c(b, alpha * gamma, y)))
    return [_where_positive(b, x, b.mul(g, _c(b, gamma, x)), neg)]


@register("Celu")
def celu(b, node, grads):
    x, g = node.input[0], grads[0]
    alpha = float(attr(node, "alpha", 1.0))
    neg = b.mul(g, b.op("Exp", b.op("Div", x, _c(b, alpha, x))))
    return [_where_positive(b, x, g, neg)]


@_unary("Softplus")
def _softplus(b, x, y, node):
    return b.op("Sigmoid", x)


@register("Softsign")
def softsign(b, node, grads):
    x = node.input[0]
    d = b.op("Add", _c(b, 1, x), b.op("Abs", x))
    return [b.op("Div", grads[0], b.mul(d, d))]


@_unary("Gelu")
def _gelu(b, x, y, node):
    approximate = attr(node, "approximate", "none")
    half = _c(b, 0.5, x)
    if approximate == "tanh":
        # y = x/2 (1 + tanh u), u = sqrt(2/pi) (x + 0.044715 x^3).
        k, c = math.sqrt(2 / math.pi), 0.044715
        x2 = b.mul(x, x)
        u = b.mul(b.mul(x, _c(b, k, x)), b.op("Add", _c(b, 1, x), b.mul(x2, _c(b, c, x))))
        t = b.op("Tanh", u)
        du = b.mul(_c(b, k, x), b.op("Add", _c(b, 1, x), b.mul(x2, _c(b, 3 * c, x))))
        sech2 = b.op("Sub", _c(b, 1, x), b.mul(t, t))
        return b.op("Add", b.mul(half, b.op("Add", _c(b, 1, x), t)), b.mul(b.mul(half, x), b.mul(sech2, du)))
    if approximate != "none":
        raise ModelError(f"Gelu node '{node.name}' has unknown approximate='{approximate}'")
    # y = x Phi(x): dy/dx = Phi(x) + x phi(x).
    cdf = b.mul(half, b.op("Add", _c(b, 1, x), b.op("Erf", b.mul(x, _c(b, 1 / math.sqrt(2), x)))))
    pdf = b.mul(_c(b, 1 / math.sqrt(2 * math.pi), x), b.op("Exp", b.mul(b.mul(x, x), _c(b, -0.5, x))))
    return b.op("Add", cdf, b.mul(x, pdf))


# ------------------------------------------------------------------- selection and passing


@register("Where")
def where(b, node, grads):
    cond, a, c = node.input
    g, y = grads[0], node.output[0]
    zero = _c(b, 0, y)
    ga = b.unbroadcast(b.op("Where", cond, g, zero), y, a) if _wanted(b, a) else None
    gc = b.unbroadcast(b.op("Where", cond, zero, g), y, c) if _wanted(b, c) else None
    return [None, ga, gc]


@register("Cast", "CastLike")
def cast(b, node, grads):
    # Back to the input's float type; a cast from or to a non-float type passes nothing.
    x, y = node.input[0], node.output[0]
    rest = [None] * (len(node.input) - 1)
    if not (_is_float(b, x) and _is_float(b, y)):
        return [None] + rest
    return [b.cast_like(grads[0], x)] + rest


@register("Identity", "Dropout")
def identity(b, node, grads):
    # Dropout is the identity at inference; its mask output and ratio inputs carry nothing.
    return [grads[0]] + [None] * (len(node.input) - 1)


# ------------------------------------------------------------------------- normalisations


def _per_channel(b, v: str, rank: int) -> str:
    """A (C,) tensor shaped to broadcast over axis 1 of a rank-`rank` tensor."""
    return v if rank <= 2 else b.op("Reshape", v, b.ints([-1] + [1] * (rank - 2)))


def _standardize(b, x: str, axes, eps: float):
    """(x - mean) * rstd and rstd = 1 / sqrt(var + eps), moments over `axes` (kept)."""
    d = b.op("Sub", x, b.reduce("ReduceMean", x, axes))
    var = b.reduce("ReduceMean", b.mul(d, d), axes)
    rstd = b.op("Reciprocal", b.op("Sqrt", b.op("Add", var, _c(b, eps, x))))
    return d, rstd


def _through_standardize(b, gh: str, xhat: str, rstd: str, axes) -> str:
    """Gradient at x of xhat = (x - mean) rstd, given the gradient gh at xhat."""
    centred = b.op("Sub", gh, b.reduce("ReduceMean", gh, axes))
    return b.mul(rstd, b.op("Sub", centred, b.mul(xhat, b.reduce("ReduceMean", b.mul(gh, xhat), axes))))


@register("BatchNormalization")
def batch_normalization(b, node, grads):
    # Inference: y = (x - mean) * scale / sqrt(var + eps) + bias, per channel (axis 1).
    if int(attr(node, "training_mode", 0)):
        raise ModelError(f"BatchNormalization node '{node.name}' is in training mode; export the model for inference")
    x, scale, bias, mu, var = node.input[:5]
    g = grads[0]
    eps = float(attr(node, "epsilon", 1e-5))
    r = b.rank(x)
    dtype = b.np_dtype(x)
    sc, vc = b.constant(scale), b.constant(var)
    if vc is not None:
        rstd_c = 1.0 / np.sqrt(vc.astype(np.float64) + eps)
        rstd = b.const(rstd_c.astype(dtype), dtype)
    else:
        rstd_c = None
        rstd = b.op("Reciprocal", b.op("Sqrt", b.op("Add", var, _c(b, eps, x))))
    if sc is not None and rstd_c is not None:
        k = b.const((sc.astype(np.float64) * rstd_c).astype(dtype), dtype)
    else:
        k = b.mul(scale, rstd)
    gx = b.mul(g, _per_channel(b, k, r)) if _wanted(b, x) else None
    axes = [0] + list(range(2, r))
    gscale = gbias = gmu = gvar = None
    if _wanted(b, scale) or _wanted(b, var):
        gd = b.reduce_sum(b.mul(g, b.op("Sub", x, _per_channel(b, mu, r))), axes, keepdims=False)  # sum g (x - mean)
        if _wanted(b, scale):
            gscale = b.mul(gd, rstd)
        if _wanted(b, var):
            # d rstd / d var = -rstd^3 / 2
            cube = b.mul(rstd, b.mul(rstd, rstd))
            gvar = b.mul(b.mul(gd, scale), b.mul(cube, _c(b, -0.5, x)))
    if _wanted(b, bias) or _wanted(b, mu):
        gsum = b.reduce_sum(g, axes, keepdims=False)
        gbias = gsum if _wanted(b, bias) else None
        gmu = b.op("Neg", b.mul(gsum, k)) if _wanted(b, mu) else None
    return [gx, gscale, gbias, gmu, gvar]


@register("LayerNormalization")
def layer_normalization(b, node, grads):
    # y = xhat * scale + bias, xhat standardised over axes [axis, rank).
    x, scale, bias = node.input[0], node.input[1], _input(node, 2)
    r = b.rank(x)
    axis = int(attr(node, "axis", -1))
    axis = axis + r if axis < 0 else axis
    axes = list(range(axis, r))
    d, rstd = _standardize(b, x, axes, float(attr(node, "epsilon", 1e-5)))
    xhat = b.mul(d, rstd)
    g = grads[0]
    parts = []
    gscale = gbias = None
    if g is not None:
        if _wanted(b, x):
            parts.append(_through_standardize(b, b.mul(g, scale), xhat, rstd, axes))
        if _wanted(b, scale):
            gscale = b.unbroadcast(b.mul(g, xhat), x, scale)
        if _wanted(b, bias):
            gbias = b.unbroadcast(g, x, bias)
    g_mean, g_rstd = (grads + [None, None])[1:3]
    if (g_mean is not None or g_rstd is not None) and _wanted(b, x):
        # The optional Mean and InvStdDev outputs: dmean/dx = 1/M, drstd/dx = -rstd^3 (x - mean) / M.
        dims = [b.shape(x)[a] for a in axes]
        if not all(isinstance(v, int) for v in dims):
            raise ModelError(f"LayerNormalization node '{node.name}': normalised axes need static sizes")
        inv_m = _c(b, 1.0 / int(np.prod(dims)), x)
        if g_mean is not None:
            gm = b.mul(b.cast_like(g_mean, x), inv_m)
            parts.append(gm if parts else b.op("Expand", gm, b.shape_of(x)))
        if g_rstd is not None:
            cube = b.mul(rstd, b.mul(rstd, rstd))
            parts.append(b.mul(d, b.op("Neg", b.mul(b.mul(b.cast_like(g_rstd, x), cube), inv_m))))
    gx = b.sum(parts) if parts else None
    return [gx, gscale, gbias]


@register("InstanceNormalization")
def instance_normalization(b, node, grads):
    # Standardised per sample and channel over the spatial axes; scale and bias per channel.
    x, scale, bias = node.input
    g = grads[0]
    r = b.rank(x)
    axes = list(range(2, r))
    d, rstd = _standardize(b, x, axes, float(attr(node, "epsilon", 1e-5)))
    xhat = b.mul(d, rstd)
    gx = _through_standardize(b, b.mul(g, _per_channel(b, scale, r)), xhat, rstd, axes) if _wanted(b, x) else None
    outer = [0] + axes
    gscale = b.reduce_sum(b.mul(g, xhat), outer, keepdims=False) if _wanted(b, scale) else None
    gbias = b.reduce_sum(g, outer, keepdims=False) if _wanted(b, bias) else None
    return [gx, gscale, gbias]


@register("Softmax")
def softmax(b, node, grads):
    # dx = y * (g - sum(g * y)) along the axis. A row whose inputs are all -inf (a fully
    # masked attention row) has NaN outputs, which models then replace (Where): the output
    # there no longer depends on x, so its gradient is the limit 0, not NaN * 0.
    y, g = node.output[0], grads[0]
    axis = int(attr(node, "axis", -1))
    y = b.op("Where", b.op("IsNaN", y), b.scalar_like(0.0, y), y)
    dot = b.reduce_sum(b.mul(g, y), [axis], keepdims=True)
    return [b.mul(y, b.op("Sub", g, dot))]


@register("LogSoftmax")
def log_softmax(b, node, grads):
    # dx = g - softmax(x) * sum(g) along the axis.
    y, g = node.output[0], grads[0]
    axis = int(attr(node, "axis", -1))
    total = b.reduce_sum(g, [axis], keepdims=True)
    # As for Softmax: an all -inf row (NaN outputs) no longer depends on x.
    p = b.op("Exp", y)
    p = b.op("Where", b.op("IsNaN", p), b.scalar_like(0.0, y), p)
    return [b.op("Sub", g, b.mul(p, total))]
