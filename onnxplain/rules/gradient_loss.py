"""Exact vector-Jacobian products of the loss operators (NegativeLogLikelihoodLoss,
SoftmaxCrossEntropyLoss), w.r.t. the scores; the targets and class weights are held fixed
(the schemas tag them non-differentiable).

NLL: loss = -w[t] x[n, t, ...] per element, ignored targets weigh 0; "mean" divides the
sum by the sum of the weights taken.
"""

from __future__ import annotations

import numpy as np

from .base import attr, register
from .gradient_elementwise import _c, _input


def _nll_back(b, node, x: str, target: str, weight: str, g: str) -> str:
    """Gradient at the log-probabilities x (N, C, ...) of the NLL loss with incoming g."""
    reduction = attr(node, "reduction", "mean")
    ignore = attr(node, "ignore_index")
    t = target
    keep = None
    if ignore is not None:
        keep = b.op("Not", b.op("Equal", t, b.const(np.array(int(ignore)), b.np_dtype(t))))
        t = b.op("Where", keep, t, b.const(np.array(0), b.np_dtype(t)))
    w = b.op("Gather", weight, t, axis=0) if weight else b.cast_like(b.op("Not", b.op("Equal", t, t)), x)
    if not weight:
        w = b.op("Add", w, _c(b, 1, x))  # ones shaped like the target
    if keep is not None:
        w = b.op("Where", keep, w, _c(b, 0, x))
    if reduction == "mean":
        g = b.op("Div", g, b.reduce_sum(w, list(range(b.rank(target))), keepdims=False))
    coef = b.op("Neg", b.mul(w, g))  # broadcasts a scalar g of "sum"/"mean"
    depth = b.op("Shape", x, start=1, end=2)
    hot = b.op("OneHot", t, depth, b.const(np.array([0, 1]), b.np_dtype(x)), axis=1)
    return b.mul(hot, b.unsqueeze(coef, [1]))


@register("NegativeLogLikelihoodLoss")
def nll_loss(b, node, grads):
    x, t, w = node.input[0], node.input[1], _input(node, 2)
    return [_nll_back(b, node, x, t, w, grads[0]), None, None][: len(node.input)]


@register("SoftmaxCrossEntropyLoss")
def softmax_cross_entropy(b, node, grads):
    # log_prob = LogSoftmax(scores, axis=1), loss = NLL(log_prob): both outputs flow back
    # through the log-softmax, dx = gl - softmax * sum_c gl.
    x, t, w = node.input[0], node.input[1], _input(node, 2)
    g_loss = grads[0]
    g_lp = grads[1] if len(grads) > 1 else None
    lp = node.output[1] if len(node.output) > 1 and node.output[1] else b.op("LogSoftmax", x, axis=1)
    parts = []
    if g_loss is not None:
        parts.append(_nll_back(b, node, lp, t, w, g_loss))
    if g_lp is not None:
        parts.append(g_lp)
    gl = b.sum(parts)
    dx = b.op("Sub", gl, b.mul(b.op("Exp", lp), b.reduce_sum(gl, [1], keepdims=True)))
    return [dx, None, None][: len(node.input)]
