"""Exact vector-Jacobian products of the sampling operators: GridSample, AffineGrid, Col2Im.

GridSample reads each output at a grid coordinate by interpolating the input's neighbours;
the gradient scatters the incoming one back to those neighbours with the same weights,
computed at run time from the grid (a spatial transformer's grid depends on the input).
The coordinate conventions are onnxruntime's: unnormalisation by align_corners, border and
reflection padding applied to the coordinate where it leaves the image and again to every
neighbour's index, nearest rounding half to even.
"""

from __future__ import annotations

import itertools

import numpy as np

from ..errors import ModelError
from .base import attr, register
from .gradient_elementwise import _c
from .gradient_linear import static_spatial, varies


def _reflect(b, x, lo: float, hi: float, slope: bool = False):
    """x folded into [lo, hi] by repeated reflection (onnxruntime's GsReflect); with
    `slope`, also d fold / dx: outside, an even count of whole ranges beyond the bound
    leaves one mirroring (-1), an odd count two (+1); inside +1."""
    rng = hi - lo
    below, above = b.op("Less", x, _c(b, lo, x)), b.op("Greater", x, _c(b, hi, x))

    def fold(dx, start, sign):  # start + sign * r where the count of folds is even
        n = b.op("Floor", b.op("Div", dx, _c(b, rng, x)))
        r = b.op("Sub", dx, b.mul(n, _c(b, rng, x)))
        even = b.op("Equal", b.op("Mod", n, _c(b, 2, x), fmod=1), _c(b, 0, x))
        near = b.op("Add", _c(b, start, x), b.mul(r, _c(b, sign, x)))
        far = b.op("Add", _c(b, lo + hi - start, x), b.mul(r, _c(b, -sign, x)))
        return b.op("Where", even, near, far), even

    low, even_low = fold(b.op("Sub", _c(b, lo, x), x), lo, 1.0)
    high, even_high = fold(b.op("Sub", x, _c(b, hi, x)), hi, -1.0)
    value = b.op("Where", below, low, b.op("Where", above, high, x))
    if not slope:
        return value
    one, minus = _c(b, 1, x), _c(b, -1, x)
    d = b.op("Where", below, b.op("Where", even_low, minus, one),
             b.op("Where", above, b.op("Where", even_high, minus, one), one))
    return value, d


def _cubic(b, t, a=-0.75):
    """Weights of the 4 neighbours floor(c)-1 .. floor(c)+2 at fraction t."""
    def near(u):
        return b.op("Add", b.mul(b.mul(b.op("Sub", b.mul(u, _c(b, a + 2, u)), _c(b, a + 3, u)), u), u), _c(b, 1, u))

    def far(u):
        inner = b.op("Add", b.mul(b.op("Sub", b.mul(u, _c(b, a, u)), _c(b, 5 * a, u)), u), _c(b, 8 * a, u))
        return b.op("Sub", b.mul(inner, u), _c(b, 4 * a, u))

    one = _c(b, 1, t)
    return [far(b.op("Add", t, one)), near(t), near(b.op("Sub", one, t)), far(b.op("Sub", _c(b, 2, t), t))]


@register("GridSample")
def grid_sample(b, node, grads):
    x, grid = node.input[:2]
    g = grads[0]
    sizes = static_spatial(b, x, f"GridSample '{node.name}'")
    d = len(sizes)
    mode = attr(node, "mode", "linear")
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
    pad = attr(node, "padding_mode", "zeros")
    align = int(attr(node, "align_corners", 0))
    want_grid = varies(b, grid) and b.graph.is_float(grid)
    if want_grid and mode == "cubic":
        raise ModelError(f"GridSample node '{node.name}': the gradient w.r.t. a varying grid is supported for "
                         "mode linear and nearest, not cubic")
    if mode not in ("linear", "nearest", "cubic"):
        raise ModelError(f"GridSample node '{node.name}': unknown mode '{mode}'")
    coords, dcoord = [], []  # per spatial axis: processed coordinate (N, O...), d coord / d grid
    for a, s in enumerate(sizes):
        c = b.op("Gather", grid, b.const(np.array(d - 1 - a), np.int64), axis=-1)  # grid[..., 0] is the last axis
        scale = (s - 1) / 2.0 if align else s / 2.0
        c = b.op("Add", b.mul(c, _c(b, scale, c)), _c(b, scale if align else (s - 1) / 2.0, c))
        lo, hi = (0.0, s - 1.0) if align else (-0.5, s - 0.5)
        if mode == "nearest":
            c = b.op("Round", c)
        slope = _c(b, scale, c)
        out = b.op("Or", b.op("Less", c, _c(b, lo, c)), b.op("Greater", c, _c(b, hi, c)))
        if pad == "border":
            clipped = b.op("Clip", c, _c(b, 0, c), _c(b, s - 1, c))
            moved = b.op("Not", b.op("Equal", clipped, c))
            slope = b.op("Where", b.op("And", out, moved), _c(b, 0, c), slope)
            c = b.op("Where", out, clipped, c)
        elif pad == "reflection":
            c, flip = _reflect(b, c, lo, hi, slope=True)
            slope = b.mul(slope, flip)
        elif pad != "zeros":
            raise ModelError(f"GridSample node '{node.name}': unknown padding_mode '{pad}'")
        coords.append(c)
        dcoord.append(slope)

    # Neighbours per axis: (offset from floor, weight, d weight / d coord).
    per_axis = []
    for a, c in enumerate(coords):
        if mode == "nearest":
            per_axis.append((c, [(0, None, None)]))
            continue
        base = b.op("Floor", c)
        t = b.op("Sub", c, base)
        if mode == "linear":
            per_axis.append((base, [(0, b.op("Sub", _c(b, 1, t), t), -1.0), (1, t, 1.0)]))
        else:
            per_axis.append((base, [(k - 1, w, None) for k, w in enumerate(_cubic(b, t))]))

    def index(a, base, off):
        s = sizes[a]
        i = b.op("Add", base, _c(b, float(off), base)) if off else base
        valid = None
        if pad == "zeros":
            valid = b.op("And", b.op("GreaterOrEqual", i, _c(b, 0, i)), b.op("LessOrEqual", i, _c(b, s - 1, i)))
            i = b.op("Clip", i, _c(b, 0, i), _c(b, s - 1, i))
        elif pad == "border":
            i = b.op("Clip", i, _c(b, 0, i), _c(b, s - 1, i))
        else:
            lo, hi = (0.0, s - 1.0) if align else (-0.5, s - 0.5)
            i = b.op("Clip", _reflect(b, i, lo, hi), _c(b, 0, i), _c(b, s - 1, i))
        return b.op("Cast", i, to=7), valid

    strides = [int(np.prod(sizes[a + 1:])) for a in range(d)]
    flat_q = b.ints([0, 1, -1])
    gq = b.op("Reshape", g, b.ints([0, 0, -1]))  # (N, C, Q)
    xq = b.op("Reshape", x, b.ints([0, 0, -1])) if want_grid else None  # (N, C, P)
    idx_parts, upd_parts = [], []
    dgrid = [[] for _ in range(d)]
    for combo in itertools.product(*[range(len(n)) for _, n in per_axis]):
        lin, weight, valid, pieces = None, None, None, []
        for a, k in enumerate(combo):
            base, neigh = per_axis[a]
            off, w, dw = neigh[k]
            i, v = index(a, base, off)
            term = b.mul(i, b.const(np.array(strides[a]), np.int64)) if strides[a] != 1 else i
            lin = term if lin is None else b.op("Add", lin, term)
            if w is not None:
                weight = w if weight is None else b.mul(weight, w)
            valid = v if valid is None else (valid if v is None else b.op("And", valid, v))
            pieces.append((w, dw))
        if weight is None:
            weight = b.cast_like(b.op("Not", b.op("Equal", lin, lin)), g)
            weight = b.op("Add", weight, _c(b, 1, g))
        if valid is not None:
            weight = b.op("Where", valid, weight, _c(b, 0, weight))
        lin_q = b.op("Reshape", lin, flat_q)  # (N, 1, Q)
        w_q = b.op("Reshape", weight, flat_q)
        idx_parts.append(lin_q)
        upd_parts.append(b.mul(gq, w_q))
        if want_grid and mode == "linear":
            # d y / d coord_a = sum_c g x_corner * (prod of the other axes' weights) * d w_a.
            xv = b.op("GatherElements", xq, b.op("Expand", lin_q, b.shape_of(gq)), axis=2)
            gx_sum = b.reduce_sum(b.mul(gq, xv), [1], keepdims=True)  # (N, 1, Q)
            if valid is not None:
                gx_sum = b.mul(gx_sum, b.cast_like(b.op("Reshape", valid, flat_q), g))
            for a in range(d):
                other = None
                for a2, (w2, _) in enumerate(pieces):
                    if a2 != a:
                        other = w2 if other is None else b.mul(other, w2)
                term = gx_sum if other is None else b.mul(gx_sum, b.op("Reshape", other, flat_q))
                dgrid[a].append(b.mul(term, _c(b, pieces[a][1], g)))
    idx = b.op("Concat", *idx_parts, axis=2)
    upd = b.op("Concat", *upd_parts, axis=2)
    zeros = b.op("Reshape", b.zeros_like(x), b.ints([0, 0, -1]))
    gx = b.op("ScatterElements", zeros, b.op("Expand", idx, b.shape_of(upd)), upd, axis=2, reduction="add")
    gx = b.reshape_like(gx, x)
    ggrid = None
    if want_grid:
        if mode == "nearest":
            ggrid = b.zeros_like(grid)  # piecewise constant in the grid
        else:
            comps = []
            for a in reversed(range(d)):  # grid's last axis lists the spatial axes last first
                s = b.mul(b.reshape_like(b.sum(dgrid[a]), coords[a]), dcoord[a])  # dcoord may be a scalar
                comps.append(b.unsqueeze(s, [-1]))
            ggrid = b.op("Concat", *comps, axis=-1)
    return [gx, ggrid]


@register("AffineGrid")
def affine_grid(b, node, grads):
    # grid[n, p, :] = theta[n] @ base[p] with base the homogeneous normalised coordinates
    # of the output positions: d theta[n] = sum_p g[n, p, :] base[p]^T.
    theta, size = node.input
    sz = b.constant(size)
    if sz is None:
        raise ModelError(f"AffineGrid node '{node.name}': its size input is computed at run time")
    spatial = [int(v) for v in sz[2:]]
    align = int(attr(node, "align_corners", 0))
    axes = []
    for s in spatial:
        if align:
            v = np.linspace(-1.0, 1.0, s) if s > 1 else np.zeros(1)
        else:
            v = (np.arange(s) * 2.0 + 1.0) / s - 1.0
        axes.append(v)
    mesh = np.meshgrid(*axes, indexing="ij")
    # Homogeneous coordinates ordered (x, y[, z], 1): the last spatial axis first.
    base = np.stack([m.reshape(-1) for m in reversed(mesh)] + [np.ones(mesh[0].size)], axis=1)  # (P, d+1)
    d = len(spatial)
    gq = b.op("Reshape", grads[0], b.ints([0, -1, d]))  # (N, P, d)
    gt = b.op("Transpose", gq, perm=[0, 2, 1])  # (N, d, P)
    return [b.op("MatMul", gt, b.const(base, b.np_dtype(theta))), None]


@register("Col2Im")
def col2im(b, node, grads):
    # Col2Im adds the columns back into the image; its adjoint takes them out again (im2col):
    # a grouped convolution whose kernel picks one offset per output channel, in the
    # (channel, offset) order of the columns.
    x, image_shape, block_shape = node.input
    blocks = b.constant(block_shape)
    if blocks is None:
        raise ModelError(f"Col2Im node '{node.name}': its block_shape input is computed at run time")
    blocks = [int(v) for v in blocks]
    k = int(np.prod(blocks))
    y = node.output[0]
    shape = b.shape(y)
    c = shape[1] if shape else None
    if not isinstance(c, int):
        xs = b.shape(x)
        c = xs[1] // k if xs and isinstance(xs[1], int) else None
    if not isinstance(c, int):
        raise ModelError(f"Col2Im node '{node.name}': the channel count is not static")
    r = len(blocks)
    kernel = np.zeros((c * k, 1) + tuple(blocks), dtype=b.np_dtype(x))
    for ch in range(c):
        for off, pos in enumerate(itertools.product(*[range(v) for v in blocks])):
            kernel[(ch * k + off, 0) + pos] = 1.0
    pads = attr(node, "pads", [0] * (2 * r))
    cols = b.op("Conv", grads[0], b.const(kernel, b.np_dtype(x)), group=c, kernel_shape=blocks,
                strides=attr(node, "strides", [1] * r), dilations=attr(node, "dilations", [1] * r), pads=pads)
    return [b.op("Reshape", cols, b.ints([0, c * k, -1])), None, None]
