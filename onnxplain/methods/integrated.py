"""Integrated gradients (Sundararajan et al. 2017), with Captum's integration rules."""

from __future__ import annotations

import numpy as np

from ..errors import InputError, OptionError
from .base import Option, positive, register
from .gradients import GRADIENT

RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def integration_points(n: int, rule: str):
    """(alphas, weights) on [0, 1] such that sum w f(alpha) approximates the integral."""
    if rule == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n)
        return 0.5 * (x + 1.0), 0.5 * w
    if rule == "riemann_trapezoid":
        if n < 2:
            raise OptionError("integrated_gradients with integration=riemann_trapezoid needs n_steps >= 2")
        # Captum's trapezoid: steps of 1/n with the two ends halved (the weights sum to
        # (n-1)/n, not 1). Kept so results compare one to one with Captum.
        w = np.full(n, 1.0 / n)
        w[0] = w[-1] = 0.5 / n
        return np.linspace(0.0, 1.0, n), w
    w = np.full(n, 1.0 / n)
    if rule == "riemann_left":
        return np.linspace(0.0, 1.0 - 1.0 / n, n), w
    if rule == "riemann_right":
        return np.linspace(1.0 / n, 1.0, n), w
    if rule == "riemann_middle":
        return np.linspace(0.5 / n, 1.0 - 0.5 / n, n), w
    raise OptionError(f"unknown integration method '{rule}'; one of {', '.join(RULES)}")


def baseline_like(baseline, x: np.ndarray, name: str) -> np.ndarray:
    """A baseline broadcast to x: a scalar, a per-channel vector, a single sample or a batch."""
    b = np.asarray(baseline, dtype=x.dtype)
    if b.ndim == 1 and x.ndim >= 2 and b.shape[0] == x.shape[1] and x.ndim > 2:
        b = b.reshape((1, -1) + (1,) * (x.ndim - 2))  # per channel, NCHW
    try:
        return np.broadcast_to(b, x.shape).astype(x.dtype)
    except ValueError:
        raise InputError(f"baseline of shape {b.shape} does not fit input '{name}' of shape {x.shape}") from None


OPTIONS = [
    Option("n_steps", 50, int, "number of integration points", check=positive),
    # DESIGN.md names this option `method`, as Captum does; in Python that keyword is taken
    # by attribute(method=...), so it is `integration` everywhere.
    Option("integration", "gausslegendre", str, "integration rule", choices=RULES),
    Option("baseline", 0.0, "array", "reference input: a number, per-channel values, or an array (.npy on the CLI)"),
]


@register("integrated_gradients", "path integral of gradients from a baseline to the input",
          options=OPTIONS, reference="Captum IntegratedGradients")
def integrated_gradients(ctx, n_steps, integration, baseline):
    alphas, weights = integration_points(n_steps, integration)
    inputs = ctx.inputs
    x = {k: ctx.feeds[k] for k in inputs}
    base = {k: baseline_like(baseline, x[k], k) for k in inputs}
    n = ctx.n
    total = {t: None for t in ctx.wrt}

    def consume(start, stop, attrs, _acts):
        idx = np.arange(start, stop)
        step, sample = idx // n, idx % n
        for t, g in attrs.items():
            w = weights[step].reshape((-1,) + (1,) * (g.ndim - 1))
            acc = np.zeros((n,) + g.shape[1:], dtype=np.float64)
            np.add.at(acc, sample, w * g)
            total[t] = acc if total[t] is None else total[t] + acc

    if ctx.layer is not None:
        # Layer integrated gradients: the layer's value moves on the straight line from its
        # value at the baseline to its value at the input, while every path that bypasses
        # the layer sees the real input (Captum's LayerIntegratedGradients).
        layer = ctx.layer
        act_x = ctx.activations()[layer]
        act_b = ctx.activations({**ctx.feeds, **base})[layer]

        def layer_rows(start, stop):
            idx = np.arange(start, stop)
            step, sample = idx // n, idx % n
            a = alphas[step].astype(act_x.dtype).reshape((-1,) + (1,) * (act_x.ndim - 1))
            value = act_b[sample] + a * (act_x[sample] - act_b[sample])
            return {k: v[sample] for k, v in ctx.feeds.items()}, value, ctx.seed[sample]

        ctx.backward_rows_cut(GRADIENT, n_steps * n, layer_rows, consume, label="layer integrated gradients")
        return {layer: (total[layer] * (act_x - act_b)).astype(np.float32)}

    def rows(start, stop):
        idx = np.arange(start, stop)
        step, sample = idx // n, idx % n
        a = alphas[step].astype(np.float32)
        feeds = dict(ctx.feeds)
        for k in inputs:
            shape = (-1,) + (1,) * (x[k].ndim - 1)
            feeds[k] = base[k][sample] + a.reshape(shape) * (x[k][sample] - base[k][sample])
        feeds = {k: (v[sample] if k not in inputs else v) for k, v in feeds.items()}
        return feeds, ctx.seed[sample]

    ctx.backward_rows(GRADIENT, n_steps * n, rows, consume, label="integrated gradients")
    act_x = ctx.activations()
    act_b = ctx.activations({**ctx.feeds, **base})
    return {t: (total[t] * (act_x[t] - act_b[t])).astype(np.float32) for t in ctx.wrt}
