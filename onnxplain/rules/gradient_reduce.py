"""Exact vector-Jacobian products of products, running sums and products, triangular masks
and Einsum.

Products are differentiated without dividing by the input (d prod / d x_j is the product
of the other factors), so zeros in the input are exact, not NaN: the "other factors" are
formed by replacing x_j with 1 in an n x n copy, which needs the reduced length n static.
"""

from __future__ import annotations

import string

import numpy as np

from ..errors import ModelError
from .base import attr, register
from .gradient_elementwise import _c, _wanted
from .gradient_shape import _const_input, _reduce_axes, _static

_MAX_PRODUCT = 4096  # longest reduced length for the n x n product of the others


def _others_product(b, node, x_last: str, n: int, like: str) -> str:
    """For t shaped (..., n): out[..., j] = prod_{k != j} t[..., k]."""
    if n > _MAX_PRODUCT:
        raise ModelError(f"{node.op_type} node '{node.name}': the gradient of a product over {n} > {_MAX_PRODUCT} "
                         "elements is not supported")
    eye = b.const(np.eye(n, dtype=bool), np.bool_)
    spread = b.op("Where", eye, _c(b, 1, like), b.unsqueeze(x_last, [-2]))  # (..., n_j, n_k)
    return b.reduce("ReduceProd", spread, [-1], keepdims=False)


@register("ReduceProd")
def reduce_prod(b, node, grads):
    x = node.input[0]
    shape = b.shape(x)
    r = b.rank(x)
    axes = _reduce_axes(b, node, r)
    g = grads[0]
    rest = [None] * (len(node.input) - 1)
    if axes is None:
        return [g] + rest
    dims = [shape[a] for a in axes]
    if not all(_static(d) for d in dims):
        raise ModelError(f"ReduceProd node '{node.name}': the reduced axes of '{x}' need static lengths (got {shape})")
    n = int(np.prod(dims))
    keep = [a for a in range(r) if a not in axes]
    perm = keep + axes
    xt = b.op("Transpose", x, perm=perm)
    lead = b.op("Shape", xt, start=0, end=len(keep))
    flat = b.op("Reshape", xt, b.op("Concat", lead, b.ints([n]), axis=0))
    others = b.op("Reshape", _others_product(b, node, flat, n, x), b.shape_of(xt))
    others = b.op("Transpose", others, perm=[int(i) for i in np.argsort(perm)])
    if not int(attr(node, "keepdims", 1)):
        g = b.unsqueeze(g, axes)
    return [b.mul(g, others)] + rest


@register("CumSum")
def cum_sum(b, node, grads):
    # The adjoint of a running sum is the running sum the other way round, exclusive or not alike.
    reverse = int(attr(node, "reverse", 0))
    exclusive = int(attr(node, "exclusive", 0))
    return [b.op("CumSum", grads[0], node.input[1], exclusive=exclusive, reverse=1 - reverse), None]


@register("CumProd")
def cum_prod(b, node, grads):
    # y_i = prod_{k in S_i} x_k: dx_j = sum_i g_i [j in S_i] prod_{k in S_i, k != j} x_k.
    x, g = node.input[0], grads[0]
    r = b.rank(x)
    axis = int(np.asarray(_const_input(b, node, 1, "axis")).reshape(-1)[0]) % r
    n = (b.shape(x) or [None] * r)[axis]
    if not _static(n) or n > 128:
        raise ModelError(f"CumProd node '{node.name}': the gradient needs a static scanned length up to 128 "
                         f"(got {n})")
    n = int(n)
    i, k = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    reverse, exclusive = int(attr(node, "reverse", 0)), int(attr(node, "exclusive", 0))
    member = (k >= i) if reverse else (k <= i)
    if exclusive:
        member &= k != i
    perm = [a for a in range(r) if a != axis] + [axis]
    xt = b.op("Transpose", x, perm=perm)  # (..., n)
    gt = b.op("Transpose", g, perm=perm)
    # factor[i, j, k] = x_k where k in S_i and k != j, else 1
    use = member[:, None, :] & (np.arange(n)[None, :, None] != np.arange(n)[None, None, :])
    spread = b.op("Where", b.const(use, np.bool_), b.unsqueeze(xt, [-2, -3]), _c(b, 1, x))
    prod = b.reduce("ReduceProd", spread, [-1], keepdims=False)  # (..., n_i, n_j)
    weighted = b.mul(b.mul(prod, b.const(member.astype(b.np_dtype(x)), b.np_dtype(x))), b.unsqueeze(gt, [-1]))
    dx = b.reduce_sum(weighted, [-2], keepdims=False)
    return [b.op("Transpose", dx, perm=[int(p) for p in np.argsort(perm)]), None]


@register("Trilu")
def trilu(b, node, grads):
    # A mask: the same mask lets the gradient through.
    k = node.input[1] if len(node.input) > 1 and node.input[1] else None
    return [b.op("Trilu", grads[0], k, upper=int(attr(node, "upper", 1)))] + [None] * (len(node.input) - 1)


# --- Einsum --------------------------------------------------------------------------------------

def _parse_einsum(eq: str, ranks: list[int]):
    """Operand and output subscripts with '...' spelled out as letters (right-aligned)."""
    eq = eq.replace(" ", "")
    lhs, rhs = eq.split("->") if "->" in eq else (eq, None)
    terms = lhs.split(",")
    used = set(eq) - set(".,->")
    spare = [c for c in string.ascii_letters if c not in used]
    n_ell = max([r - (len(t) - 3) for t, r in zip(terms, ranks) if "..." in t] or [0])
    ell = "".join(spare[:n_ell])
    out_terms = []
    for t, r in zip(terms, ranks):
        if "..." in t:
            k = r - (len(t) - 3)
            t = t.replace("...", ell[n_ell - k:] if k else "")
        out_terms.append(t)
    if rhs is None:
        counts = {c: sum(t.count(c) for t in terms) for c in used}
        rhs = ell + "".join(sorted(c for c in used if counts[c] == 1))
    else:
        rhs = rhs.replace("...", ell)
    return out_terms, rhs


def _may_broadcast(b, ins, terms, x, term) -> bool:
    """Whether a dim of length 1 of `x` may have met a longer one of the same letter."""
    shape = b.shape(x)
    if shape is None:
        return True
    for pos, c in enumerate(term):
        if shape[pos] != 1:
            continue
        for xj, tj in zip(ins, terms):
            sj = b.shape(xj)
            for p2, c2 in enumerate(tj):
                if c2 == c and (sj is None or sj[p2] != 1):
                    return True
    return False


@register("Einsum")
def einsum(b, node, grads):
    ins = list(node.input)
    terms, out = _parse_einsum(attr(node, "equation"), [b.rank(x) for x in ins])
    g = grads[0]
    res = []
    for k, (x, term) in enumerate(zip(ins, terms)):
        if not _wanted(b, x):
            res.append(None)
            continue
        operands, subs = [g], [out]
        for j, (xj, tj) in enumerate(zip(ins, terms)):
            if j != k:
                operands.append(xj)
                subs.append(tj)
        # A letter repeated in this operand (a diagonal) gets a fresh letter and an identity.
        target, seen = [], set()
        fresh = iter(c for c in string.ascii_letters if c not in set("".join(terms) + out))
        shape = b.shape(x)
        for pos, c in enumerate(term):
            if c in seen:
                n = shape[pos] if shape else None
                if not _static(n):
                    raise ModelError(f"Einsum node '{node.name}': a repeated subscript needs a static length")
                f = next(fresh)
                operands.append(b.const(np.eye(int(n)), b.np_dtype(x)))
                subs.append(c + f)
                target.append(f)
            else:
                seen.add(c)
                target.append(c)
        present = set("".join(subs))
        kept = "".join(c for c in target if c in present)
        gx = b.op("Einsum", *operands, equation=",".join(subs) + "->" + kept)
        missing = [p for p, c in enumerate(target) if c not in present]
        if missing:  # summed over by the forward and seen nowhere else: broadcast back
            gx = b.op("Expand", b.unsqueeze(gx, missing), b.shape_of(x))
        elif _may_broadcast(b, ins, terms, x, term):
            gx = b.unbroadcast_at_run_time(gx, 0, x)  # dims of size 1 broadcast against others
        res.append(gx)
    return res
