"""An independent float64 numpy implementation of ONNX's LSTM, GRU and RNN operators, written
from the operator specification, for finite differences and for the recurrent LRP reference.

onnxruntime has float kernels only for these operators, so finite differences of its output
are float32-noisy; this forward is checked against onnxruntime's (to float32 rounding) and
then differentiated numerically in float64.
"""

from __future__ import annotations

import numpy as np

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
DEFAULT_ACTS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh"), "RNN": ("Tanh",)}
# Default (alpha, beta) of the activations that take them, as onnxruntime runs them (checked on
# its forward): the ONNX operators' for LeakyRelu, HardSigmoid and Elu, zeros for the others.
DEFAULT_AB = {"affine": (0.0, 0.0), "leakyrelu": (0.01, None), "thresholdedrelu": (0.0, None),
              "scaledtanh": (0.0, 0.0), "hardsigmoid": (0.2, 0.5), "elu": (1.0, None)}


def activation(name, x, a=None, b=None):
    n = name.lower()
    if n == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if n == "tanh":
        return np.tanh(x)
    if n == "relu":
        return np.maximum(x, 0.0)
    if n == "affine":
        return a * x + b
    if n == "leakyrelu":
        return np.where(x >= 0, x, a * x)
    if n == "thresholdedrelu":
        return np.where(x > a, x, 0.0)
    if n == "scaledtanh":
        return a * np.tanh(b * x)
    if n == "hardsigmoid":
        return np.clip(a * x + b, 0.0, 1.0)
    if n == "elu":
        return np.where(x >= 0, x, a * (np.exp(x) - 1.0))
    if n == "softsign":
        return x / (1.0 + np.abs(x))
    if n == "softplus":
        return np.log1p(np.exp(x))
    raise ValueError(name)


def activations_of(op, names, alphas, betas, directions):
    """[(name, alpha, beta)] per activation: the alpha (beta) list is consumed in order by the
    activations that take an alpha (beta); the others, and those past the list's end, keep
    their operator's default (what onnxruntime does; the tests check it on its forward)."""
    names = list(names) if names else list(DEFAULT_ACTS[op]) * directions
    alphas, betas = list(alphas or []), list(betas or [])
    out = []
    for n in names:
        a, b = DEFAULT_AB.get(n.lower(), (None, None))
        if a is not None and alphas:
            a = alphas.pop(0)
        if b is not None and betas:
            b = betas.pop(0)
        out.append((n, a, b))
    return out


def forward(op, X, W, R, B=None, seq_lens=None, h0=None, c0=None, P=None, *, hidden_size=None,
            direction="forward", layout=0, clip=None, activations=None, activation_alpha=None,
            activation_beta=None, input_forget=0, linear_before_reset=0, record=None):
    """(Y, Y_h[, Y_c]) in float64, in the node's layout. With a dict `record`, each step's
    values are stored in it under (direction, sample, time)."""
    X = np.asarray(X, np.float64)
    W, R = np.asarray(W, np.float64), np.asarray(R, np.float64)
    D = 2 if direction == "bidirectional" else 1
    H = R.shape[-1]
    G = GATES[op]
    if layout:
        X = X.transpose(1, 0, 2)
        h0 = None if h0 is None else np.asarray(h0, np.float64).transpose(1, 0, 2)
        c0 = None if c0 is None else np.asarray(c0, np.float64).transpose(1, 0, 2)
    T, N, _ = X.shape
    B = np.zeros((D, 2 * G * H)) if B is None else np.asarray(B, np.float64)
    lens = np.full(N, T) if seq_lens is None else np.asarray(seq_lens)
    h0 = np.zeros((D, N, H)) if h0 is None else np.asarray(h0, np.float64)
    c0 = np.zeros((D, N, H)) if c0 is None else np.asarray(c0, np.float64)
    P = np.zeros((D, 3 * H)) if P is None else np.asarray(P, np.float64)
    acts = activations_of(op, activations, activation_alpha, activation_beta, D)
    na = len(DEFAULT_ACTS[op])

    def cl(v):
        return v if clip is None else np.clip(v, -clip, clip)

    Y = np.zeros((T, D, N, H))
    Yh, Yc = np.zeros((D, N, H)), np.zeros((D, N, H))
    for d in range(D):
        rev = direction == "reverse" or d == 1
        f = [(lambda v, a=a: activation(a[0], v, a[1], a[2])) for a in acts[d * na:(d + 1) * na]]
        Wd, Rd, Wb, Rb = W[d], R[d], B[d, :G * H], B[d, G * H:]
        for n in range(N):
            h, c = h0[d, n].copy(), c0[d, n].copy()
            steps = range(lens[n] - 1, -1, -1) if rev else range(lens[n])
            for t in steps:
                x = X[t, n]
                step = {"x": x, "h_prev": h.copy(), "c_prev": c.copy()}
                if op == "RNN":
                    step["a"] = Wd @ x + Rd @ h + Wb + Rb
                    h = f[0](cl(step["a"]))
                elif op == "GRU":
                    xw = Wd @ x + Wb
                    z = f[0](cl(xw[:H] + Rd[:H] @ h + Rb[:H]))
                    r = f[0](cl(xw[H:2 * H] + Rd[H:2 * H] @ h + Rb[H:2 * H]))
                    if linear_before_reset:
                        step["v"] = Rd[2 * H:] @ h + Rb[2 * H:]
                        step["a"] = xw[2 * H:] + r * step["v"]
                    else:
                        step["a"] = xw[2 * H:] + Rd[2 * H:] @ (r * h) + Rb[2 * H:]
                    hh = f[1](cl(step["a"]))
                    step.update(z=z, r=r, hh=hh)
                    h = (1 - z) * hh + z * h
                else:
                    a = Wd @ x + Rd @ h + Wb + Rb
                    pi, po, pf = P[d, :H], P[d, H:2 * H], P[d, 2 * H:]
                    i = f[0](cl(a[:H] + pi * c))
                    if input_forget:
                        fg = 1.0 - i
                    else:
                        fg = f[0](cl(a[2 * H:3 * H] + pf * c))
                    g = f[1](cl(a[3 * H:]))
                    step.update(i=i, f=fg, g=g, a=a[3 * H:])
                    c = fg * c + i * g
                    o = f[0](cl(a[H:2 * H] + po * c))
                    h = o * f[2](c)
                Y[t, d, n] = h
                step.update(h=h, c=c)
                if record is not None:
                    record[(d, n, t)] = step
            if lens[n] > 0:  # onnxruntime: a sample of length 0 has final states of zero
                Yh[d, n], Yc[d, n] = h, c
    if layout:
        Y, Yh, Yc = Y.transpose(2, 0, 1, 3), Yh.transpose(1, 0, 2), Yc.transpose(1, 0, 2)
    return (Y, Yh, Yc) if op == "LSTM" else (Y, Yh)
