"""Exact vector-Jacobian products of the spectral operators DFT and STFT (audio front-ends).

Both are linear in the signal when complex numbers are held as (real, imaginary) pairs in a
last axis of length 2 (1 for a real signal). Along the transformed axis the map is a real
matrix, built at compile time from numpy's FFT of the unit vectors (the operator's own
definition: forward e^{-2 pi i jk/L}, inverse with e^{+2 pi i jk/L} / L, one-sided halves);
the gradient multiplies by its transpose. The schemas tag these inputs non-differentiable,
but a model that explains an audio decision needs them.
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelError
from .base import attr, register
from .gradient_elementwise import _input, _wanted
from .gradient_linear import varies


def dft_matrix(n: int, c_in: int, c_out: int, length: int, inverse: bool, onesided: bool) -> np.ndarray:
    """The real (m * c_out, n * c_in) matrix of one DFT along an axis of length n."""
    cols = []
    for j in range(n):
        for part in range(c_in):
            x = np.zeros(n, dtype=complex)
            x[j] = 1.0 if part == 0 else 1.0j
            if inverse and onesided:
                y = np.fft.irfft(x, n=length)
            else:
                xl = np.zeros(length, dtype=complex)
                xl[:min(n, length)] = x[:min(n, length)]
                y = np.fft.ifft(xl) if inverse else np.fft.fft(xl)
                if onesided:
                    y = y[: length // 2 + 1]
            pairs = np.stack([np.real(y), np.imag(y)], axis=1)[:, :c_out]
            cols.append(pairs.reshape(-1))
    return np.stack(cols, axis=1)


def _scalar(b, node, i, what):
    name = _input(node, i)
    if not name:
        return None
    v = b.constant(name)
    if v is None:
        raise ModelError(f"{node.op_type} node '{node.name}': its {what} input is computed at run time; "
                         "the gradient needs it constant")
    return int(np.asarray(v).reshape(-1)[0])


@register("DFT")
def dft(b, node, grads):
    x, y, g = node.input[0], node.output[0], grads[0]
    xs, ys = b.shape(x), b.shape(y)
    r = len(xs)
    if b.opset >= 20:
        axis = _scalar(b, node, 2, "axis")
        axis = -2 if axis is None else axis
    else:
        axis = int(attr(node, "axis", 1))
    axis = axis % r
    n, c_in = xs[axis], xs[-1]
    m, c_out = (ys[axis], ys[-1]) if ys else (None, None)
    if not all(isinstance(v, int) for v in (n, c_in, m, c_out)):
        raise ModelError(f"DFT node '{node.name}': the gradient needs static lengths of the transformed and "
                         f"complex axes (input {xs}, output {ys})")
    inverse, onesided = bool(attr(node, "inverse", 0)), bool(attr(node, "onesided", 0))
    length = _scalar(b, node, 1, "dft_length")
    if length is None:
        length = 2 * (n - 1) if inverse and onesided else n
    a = dft_matrix(n, c_in, c_out, length, inverse, onesided)
    # (..., m, ..., c_out) -> (..., m * c_out) @ A -> (..., n, c_in) -> back.
    perm = [i for i in range(r - 1) if i != axis] + [axis, r - 1]
    gt = b.op("Transpose", g, perm=perm) if perm != list(range(r)) else g
    lead = b.op("Shape", gt, start=0, end=r - 2)
    flat = b.op("Reshape", gt, b.op("Concat", lead, b.ints([m * c_out]), axis=0))
    back = b.op("MatMul", flat, b.const(a, b.np_dtype(x)))
    back = b.op("Reshape", back, b.op("Concat", lead, b.ints([n, c_in]), axis=0))
    if perm != list(range(r)):
        back = b.op("Transpose", back, perm=[int(i) for i in np.argsort(perm)])
    return [back, None, None][: len(node.input)]


@register("STFT")
def stft(b, node, grads):
    # y[b, f, k] = sum_j w[j] x[b, f * step + j] e^{-2 pi i jk / N}: per frame a DFT of the
    # windowed slice; the gradient takes each frame's adjoint DFT, windows it and adds the
    # overlapping frames back into the signal.
    x, y, g = node.input[0], node.output[0], grads[0]
    window = _input(node, 2)
    xs, ys = b.shape(x), b.shape(y)
    step = _scalar(b, node, 1, "frame_step")
    n = _scalar(b, node, 3, "frame_length")
    if n is None:
        ws = b.shape(window) if window else None
        n = ws[0] if ws else None
    frames, bins = (ys[1], ys[2]) if ys else (None, None)
    c_in = xs[-1] if xs else None
    if not all(isinstance(v, int) for v in (n, frames, bins, c_in, xs[1])):
        raise ModelError(f"STFT node '{node.name}': the gradient needs static signal, frame and window lengths "
                         f"(signal {xs}, output {ys})")
    onesided = bool(attr(node, "onesided", 1))
    a = dft_matrix(n, c_in, 2, n, False, onesided)  # (bins * 2, n * c_in)
    dtype = b.np_dtype(x)
    gf = b.op("MatMul", b.op("Reshape", g, b.ints([0, frames, bins * 2])), b.const(a, dtype))
    gf = b.op("Reshape", gf, b.ints([0, frames, n, c_in]))  # gradient at the windowed frames
    pos = (np.arange(frames)[:, None] * step + np.arange(n)[None, :]).astype(np.int64)  # (F, N)
    gx = gw = None
    if _wanted(b, x):
        gs = b.mul(gf, b.op("Reshape", window, b.ints([1, 1, n, 1]))) if window else gf
        upd = b.op("Reshape", gs, b.ints([0, frames * n, c_in]))
        idx = b.op("Expand", b.const(pos.reshape(1, -1, 1), np.int64), b.shape_of(upd))
        gx = b.op("ScatterElements", b.zeros_like(x), idx, upd, axis=1, reduction="add")
    if window and varies(b, window) and b.graph.is_float(window):
        seen = b.op("Gather", x, b.const(pos, np.int64), axis=1)  # (B, F, N, c)
        gw = b.reduce_sum(b.mul(gf, seen), [0, 1, 3], keepdims=False)
    return [gx, None, gw, None][: len(node.input)]
