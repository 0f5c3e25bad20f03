"""Exact vector-Jacobian products of linear layers (Gemm, MatMul, Conv, ConvTranspose)."""

from .base import attr, register


@register("Gemm")
def gemm(b, node, grads):
    # Y = alpha A'B' + beta C with A' = A or A^T, B' = B or B^T; G = dY.
    # dA' = alpha G B'^T and dB' = alpha A'^T G, transposed back where A or B was.
    g = grads[0]
    a, w = node.input[0], node.input[1]
    alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
    ta, tb = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
    if ta:
        ga = b.op("Gemm", w, g, transA=tb, transB=1, alpha=alpha)
    else:
        ga = b.op("Gemm", g, w, transB=1 - tb, alpha=alpha)
    gw = None
    if b.constant(w) is None:
        if tb:
            gw = b.op("Gemm", g, a, transA=1, transB=ta, alpha=alpha)
        else:
            gw = b.op("Gemm", a, g, transA=1 - ta, alpha=alpha)
    gc = None
    if len(node.input) > 2 and node.input[2] and b.constant(node.input[2]) is None:
        gc = g if beta == 1.0 else b.mul(g, b.scalar_like(beta, g))
        gc = b.unbroadcast(gc, node.output[0], node.input[2])
    return [ga, gw, gc]
