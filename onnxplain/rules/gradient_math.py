"""Exact vector-Jacobian products of the remaining element-wise functions (trigonometric and
hyperbolic, Mish, Swish, Shrink, Mod) and of the normalisations not in
gradient_elementwise (LpNormalization, MeanVarianceNormalization, GroupNormalization,
RMSNormalization, LRN), and of Det.

Where a function has a kink, the convention is the one of gradient_elementwise (torch's):
Shrink passes no gradient at |x| = lambd. Hardmax is piecewise constant: its gradient is
zero wherever it is defined, so its rule sends nothing back.
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelError
from .base import attr, register
from .gradient_elementwise import _c, _input, _per_channel, _wanted
from .gradient_shape import _axis_matrix, _reduce_axes


def _unary(*op_types):
    """Register `d(b, x, y, node) -> local derivative` as the rule g * d."""

    def deco(derivative):
        def rule(b, node, grads):
            return [b.mul(grads[0], derivative(b, node.input[0], node.output[0], node))]

        register(*op_types)(rule)
        return derivative

    return deco


def _one_minus_sq(b, x):
    return b.op("Sub", _c(b, 1, x), b.mul(x, x))


# --- trigonometric and hyperbolic ----------------------------------------------------------

@_unary("Tan")
def _tan(b, x, y, node):
    return b.op("Add", _c(b, 1, y), b.mul(y, y))


@_unary("Asin")
def _asin(b, x, y, node):
    return b.op("Reciprocal", b.op("Sqrt", _one_minus_sq(b, x)))


@_unary("Acos")
def _acos(b, x, y, node):
    return b.op("Neg", b.op("Reciprocal", b.op("Sqrt", _one_minus_sq(b, x))))


@_unary("Atan")
def _atan(b, x, y, node):
    return b.op("Reciprocal", b.op("Add", _c(b, 1, x), b.mul(x, x)))


@_unary("Sinh")
def _sinh(b, x, y, node):
    return b.op("Cosh", x)


@_unary("Cosh")
def _cosh(b, x, y, node):
    return b.op("Sinh", x)


@_unary("Asinh")
def _asinh(b, x, y, node):
    return b.op("Reciprocal", b.op("Sqrt", b.op("Add", b.mul(x, x), _c(b, 1, x))))


@_unary("Acosh")
def _acosh(b, x, y, node):
    return b.op("Reciprocal", b.op("Sqrt", b.op("Sub", b.mul(x, x), _c(b, 1, x))))


@_unary("Atanh")
def _atanh(b, x, y, node):
    return b.op("Reciprocal", _one_minus_sq(b, x))


# --- activations -----------------------------------------------------------------------------

@_unary("Mish")
def _mish(b, x, y, node):
    # y = x tanh(softplus x): dy/dx = tanh(sp) + x (1 - tanh(sp)^2) sigmoid(x).
    t = b.op("Tanh", b.op("Softplus", x))
    return b.op("Add", t, b.mul(b.mul(x, _one_minus_sq(b, t)), b.op("Sigmoid", x)))


@_unary("Swish")
def _swish(b, x, y, node):
    # y = x s, s = sigmoid(alpha x): dy/dx = s + alpha x s (1 - s) = s + alpha y (1 - s).
    alpha = float(attr(node, "alpha", 1.0))
    s = b.op("Sigmoid", b.mul(x, _c(b, alpha, x)))
    return b.op("Add", s, b.mul(b.mul(y, _c(b, alpha, x)), b.op("Sub", _c(b, 1, x), s)))


@register("Shrink")
def shrink(b, node, grads):
    x = node.input[0]
    lambd = float(attr(node, "lambd", 0.5))
    outside = b.op("Greater", b.op("Abs", x), _c(b, lambd, x))
    return [b.op("Where", outside, grads[0], _c(b, 0, x))]


@register("Hardmax")
def hardmax(b, node, grads):
    # A one-hot of the arg max: piecewise constant, zero gradient wherever it is defined.
    return [None]


@register("Mod")
def mod(b, node, grads):
    # fmod(a, b) = a - b trunc(a / b) for floats (integers carry no gradient): d/da = 1,
    # d/db = -trunc(a / b), both away from the jumps where a / b is an integer.
    a, c = node.input
    y, g = node.output[0], grads[0]
    fa, fc = _wanted(b, a) and b.graph.is_float(a), _wanted(b, c) and b.graph.is_float(c)
    if not (fa or fc):
        return [None, None]
    if not int(attr(node, "fmod", 0)):
        raise ModelError(f"Mod node '{node.name}': float inputs need fmod=1")
    ga = b.unbroadcast(g, y, a) if fa else None
    gc = None
    if fc:
        q = b.op("Div", b.op("Sub", a, y), c)  # trunc(a / b), exactly as the forward took it
        gc = b.unbroadcast(b.op("Neg", b.mul(g, b.op("Round", q))), y, c)
    return [ga, gc]


# --- normalisations --------------------------------------------------------------------------

def _mean(b, x, axes):
    return b.reduce("ReduceMean", x, axes)


@register("LpNormalization")
def lp_normalization(b, node, grads):
    # y = x / n, n = ||x||_p along the axis: dx = g / n - x sum(g x) / n^2 * dn/dx with
    # dn/dx = sign(x) (p = 1) or x / n (p = 2).
    x, y, g = node.input[0], node.output[0], grads[0]
    axis = int(attr(node, "axis", -1))
    p = int(attr(node, "p", 2))
    if p == 1:
        n = b.reduce_sum(b.op("Abs", x), [axis])
        dn = b.op("Sign", x)
    elif p == 2:
        n = b.op("Sqrt", b.reduce_sum(b.mul(x, x), [axis]))
        dn = b.op("Div", x, n)
    else:
        raise ModelError(f"LpNormalization node '{node.name}': p={p} (the operator defines p = 1 or 2)")
    # A zero vector is normalised to 0 and the map jumps there: no gradient flows.
    zero = b.op("Equal", n, _c(b, 0, x))
    n = b.op("Where", zero, _c(b, 1, x), n)
    dn = b.op("Where", zero, _c(b, 0, x), dn)
    dot = b.reduce_sum(b.mul(g, y), [axis])  # sum(g x) / n
    return [b.op("Where", zero, _c(b, 0, x), b.op("Div", b.op("Sub", g, b.mul(dot, dn)), n))]


@register("MeanVarianceNormalization")
def mean_variance_normalization(b, node, grads):
    # y = (x - m) / (sqrt(E x^2 - m^2) + 1e-9), moments over `axes` (the operator's function).
    x, g = node.input[0], grads[0]
    r = b.rank(x)
    axes = [int(a) % r for a in attr(node, "axes", [0, 2, 3])]
    d = b.op("Sub", x, _mean(b, x, axes))
    std = b.op("Sqrt", b.op("Sub", _mean(b, b.mul(x, x), axes), b.mul(_mean(b, x, axes), _mean(b, x, axes))))
    den = b.op("Add", std, _c(b, 1e-9, x))
    # y = d / den; dden/dx = d / (M std); dd/dx = 1 - 1/M.
    gd = b.op("Div", g, den)
    centred = b.op("Sub", gd, _mean(b, gd, axes))
    gden = b.op("Neg", b.reduce_sum(b.op("Div", b.mul(g, d), b.mul(den, den)), axes))
    back = b.op("Div", b.mul(gden, d), std)
    return [b.op("Add", centred, b.op("Div", back, _reduced_size(b, node, x, axes)))]


def _reduced_size(b, node, x, axes):
    shape = b.shape(x)
    dims = [shape[a] for a in axes]
    if all(isinstance(v, int) for v in dims):
        return _c(b, float(np.prod(dims)), x)
    m = b.op("ReduceProd", b.op("Gather", b.shape_of(x), b.ints(axes)), keepdims=0)
    return b.cast_like(m, x)


def _standardized(b, x, axes, eps):
    d = b.op("Sub", x, _mean(b, x, axes))
    rstd = b.op("Reciprocal", b.op("Sqrt", b.op("Add", _mean(b, b.mul(d, d), axes), _c(b, eps, x))))
    return b.mul(d, rstd), rstd


def _back_standardized(b, gh, xhat, rstd, axes):
    centred = b.op("Sub", gh, _mean(b, gh, axes))
    return b.mul(rstd, b.op("Sub", centred, b.mul(xhat, _mean(b, b.mul(gh, xhat), axes))))


@register("GroupNormalization")
def group_normalization(b, node, grads):
    # x (N, C, ...) standardised per sample over groups of C / G channels and the spatial
    # axes, then scale and bias per channel (opset 21) or per group (opset 18).
    x, scale, bias = node.input
    g = grads[0]
    shape = b.shape(x)
    r = len(shape)
    groups = int(attr(node, "num_groups"))
    eps = float(attr(node, "epsilon", 1e-5))
    c = shape[1]
    if not isinstance(c, int):
        raise ModelError(f"GroupNormalization node '{node.name}': the channel count of '{x}' is not static")
    per_group = (b.shape(scale) or (c,))[0] == groups and groups != c
    grouped = b.ints([0, groups, -1])
    xg = b.op("Reshape", x, grouped)
    xhat_g, rstd = _standardized(b, xg, [2], eps)
    xhat = b.reshape_like(xhat_g, x)
    if per_group:
        expand = b.op("Reshape", b.op("Expand", b.unsqueeze(scale, [1]), b.ints([groups, c // groups])), b.ints([-1]))
        sc = _per_channel(b, expand, r)
    else:
        sc = _per_channel(b, scale, r)
    gx = None
    if _wanted(b, x):
        gh = b.op("Reshape", b.mul(g, sc), grouped)
        gx = b.reshape_like(_back_standardized(b, gh, xhat_g, rstd, [2]), x)
    outer = [0] + list(range(2, r))
    gscale = gbias = None
    if _wanted(b, scale):
        gscale = b.reduce_sum(b.mul(g, xhat), outer, keepdims=False)
        if per_group:
            gscale = b.reduce_sum(b.op("Reshape", gscale, b.ints([groups, -1])), [1], keepdims=False)
    if _wanted(b, bias):
        gbias = b.reduce_sum(g, outer, keepdims=False)
        if per_group:
            gbias = b.reduce_sum(b.op("Reshape", gbias, b.ints([groups, -1])), [1], keepdims=False)
    return [gx, gscale, gbias]


@register("RMSNormalization")
def rms_normalization(b, node, grads):
    # y = x r scale, r = 1 / sqrt(mean(x^2) + eps) over axes [axis, rank).
    x, scale = node.input[0], node.input[1]
    g = grads[0]
    rk = b.rank(x)
    axis = int(attr(node, "axis", -1)) % rk
    axes = list(range(axis, rk))
    eps = float(attr(node, "epsilon", 1e-5))
    rinv = b.op("Reciprocal", b.op("Sqrt", b.op("Add", _mean(b, b.mul(x, x), axes), _c(b, eps, x))))
    xhat = b.mul(x, rinv)
    gx = gs = None
    if _wanted(b, x):
        gh = b.mul(g, scale)
        gx = b.mul(rinv, b.op("Sub", gh, b.mul(xhat, _mean(b, b.mul(gh, xhat), axes))))
    if _wanted(b, scale):
        gs = b.unbroadcast(b.mul(g, xhat), node.output[0], scale)
    return [gx, gs]


@register("LRN")
def lrn(b, node, grads):
    # y = x s^-beta, s = bias + alpha / size * S(x^2), S the sum over a window of channels
    # c - floor((size-1)/2) .. c + ceil((size-1)/2): dx = g s^-beta + 2 alpha/size x
    # S^T(-beta g x s^(-beta-1)).
    x, y, g = node.input[0], node.output[0], grads[0]
    size = int(attr(node, "size"))
    alpha, beta = float(attr(node, "alpha", 1e-4)), float(attr(node, "beta", 0.75))
    bias = float(attr(node, "bias", 1.0))
    shape = b.shape(x)
    c = shape[1] if shape else None
    if not isinstance(c, int):
        raise ModelError(f"LRN node '{node.name}': the channel count of '{x}' is not static")
    r = len(shape)
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    window = np.zeros((c, c))
    for k in range(c):
        window[k, max(0, k - lo):min(c, k + hi + 1)] = 1.0  # S(z)[k] = sum_j window[k, j] z[j]
    s = b.op("Add", _c(b, bias, x), b.mul(_axis_matrix(b, b.mul(x, x), 1, r, window.T, x), _c(b, alpha / size, x)))
    direct = b.mul(g, b.op("Pow", s, _c(b, -beta, x)))
    inner = b.mul(b.mul(g, y), b.op("Div", _c(b, -beta, x), s))  # -beta g x s^(-beta-1)
    back = _axis_matrix(b, inner, 1, r, window, x)
    return [b.op("Add", direct, b.mul(b.mul(x, back), _c(b, 2 * alpha / size, x)))]


# --- determinant -------------------------------------------------------------------------------

@register("Det")
def det(b, node, grads):
    # d det(X) / dX = cofactor matrix (adj(X)^T), computed from the (M-1)-minors: exact also
    # where X is singular (where det(X) inv(X)^T is not defined).
    x, g = node.input[0], grads[0]
    shape = b.shape(x)
    if shape is None or not isinstance(shape[-1], int):
        raise ModelError(f"Det node '{node.name}': the matrix size of '{x}' is not static")
    m = int(shape[-1])
    r = len(shape)
    gk = b.unsqueeze(b.unsqueeze(g, [-1]), [-1])  # (..., 1, 1)
    if m == 1:
        return [b.op("Expand", gk, b.shape_of(x))]
    keep = np.array([[j for j in range(m) if j != i] for i in range(m)], dtype=np.int64)  # (M, M-1)
    rows = b.op("Gather", x, b.const(keep, np.int64), axis=r - 2)  # (..., M, M-1, M)
    minors = b.op("Gather", rows, b.const(keep, np.int64), axis=r)  # (..., M, M-1, M, M-1)
    perm = list(range(r - 2)) + [r - 2, r, r - 1, r + 1]
    minors = b.op("Transpose", minors, perm=perm)  # (..., M_i, M_j, M-1, M-1)
    sign = np.array([[(-1.0) ** (i + j) for j in range(m)] for i in range(m)])
    cof = b.mul(b.op("Det", minors), b.const(sign, b.np_dtype(x)))
    return [b.mul(gk, cof)]
