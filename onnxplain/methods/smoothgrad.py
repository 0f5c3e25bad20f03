"""SmoothGrad and its variants (Smilkov et al. 2017; Adebayo et al. 2018): a method's
attribution averaged over gaussian-noised copies of the input, as Captum's NoiseTunnel.

The noise's size is by default the paper's: a fraction `noise_level` of each sample's range
(x_max - x_min; the paper found 10-20% best, we take the middle, 0.15), so it means the same
on a normalised photo as on 0..255 pixels. Captum's `stdevs` is on the input's own scale
(its default 1.0 is the whole range of a normalised photo: the map turns to noise); give
`stdev` for that convention -- it wins over noise_level.
"""

from __future__ import annotations

import numpy as np

from ..errors import OptionError
from ..resident import onehot_weights
from .base import Option, non_negative, positive, register
from .gradients import DECONVNET, GRADIENT, GUIDED

# Single-pass bases run all noisy copies in row chunks; the composite and whether the
# attribution is multiplied by the (noisy) input define them.
BASES = {
    "gradient": (GRADIENT, False),
    "input_x_gradient": (GRADIENT, True),
    "guided_backprop": (GUIDED, False),
    "deconvnet": (DECONVNET, False),
}


def _options():
    return [
        Option("n_samples", 5, int, "number of noisy samples (Captum's nt_samples)", check=positive),
        Option("noise_level", 0.15, float, "noise standard deviation as a fraction of each sample's range "
               "(x_max - x_min; the paper's 10-20%)", check=non_negative),
        Option("stdev", None, float, "standard deviation of the noise on the input's scale (Captum's stdevs); "
               "wins over noise_level", check=non_negative),
        Option("base", "gradient", str, "the attribution method that is smoothed", choices=tuple(BASES)),
        Option("seed", 0, int, "random seed of the noise"),
        Option("noise", None, "any", "explicit noise array of shape (n_samples, *input shape) (Python only)"),
    ]


def _noise(ctx, n_samples, stdev, noise_level, seed, noise, k):
    x = ctx.feeds[k]
    shape = (n_samples,) + x.shape
    if noise is None:
        if stdev is None:  # per sample: the rows are batch first
            flat = np.asarray(x, np.float64).reshape(len(x), -1)
            span = flat.max(axis=1) - flat.min(axis=1) if flat.size else np.zeros(len(x))
            stdev = (noise_level * span).reshape((1, len(x)) + (1,) * (x.ndim - 1))
        return (np.random.default_rng(seed).normal(0.0, 1.0, size=shape) * stdev).astype(x.dtype)
    arr = noise[k] if isinstance(noise, dict) else noise
    arr = np.asarray(arr, dtype=x.dtype)
    if arr.shape != shape:
        raise OptionError(f"noise for input '{k}' must have shape {shape}, got {arr.shape}")
    return arr


def _smooth(ctx, kind, n_samples, noise_level, stdev, base, seed, noise):
    composite, times_input = BASES[base]
    inputs = ctx.inputs
    noise = {k: _noise(ctx, n_samples, stdev, noise_level, seed, noise, k) for k in inputs}
    n = ctx.n
    s1 = {t: np.zeros((n,) + _shape(ctx, t), np.float64) for t in ctx.wrt}
    s2 = {t: np.zeros_like(v) for t, v in s1.items()}

    def rows(start, stop):
        idx = np.arange(start, stop)
        draw, sample = idx // n, idx % n
        feeds = {k: v[sample] for k, v in ctx.feeds.items()}
        for k in inputs:
            feeds[k] = feeds[k] + noise[k][draw, sample]
        return feeds, ctx.seed[sample]

    def consume(start, stop, attrs, acts):
        sample = np.arange(start, stop) % n
        for t, g in attrs.items():
            a = g * acts[t] if times_input else g
            np.add.at(s1[t], sample, a)
            np.add.at(s2[t], sample, a * a)

    def device_rows(start, stop):  # the same rows, built on the device: x + noise[draw, sample]
        idx = np.arange(start, stop)
        sample = idx % n
        return sample, idx, np.ones(len(idx), np.float32), onehot_weights(sample, n)

    moved = {k: (ctx.feeds[k], noise[k].reshape((-1,) + ctx.feeds[k].shape[1:])) for k in inputs}
    sums = ctx.backward_resident(composite, moved, n_samples * n, device_rows, times_input=times_input,
                                 squares=True, label=kind)
    if sums is not None:
        s1, s2 = sums
    else:
        ctx.backward_rows(composite, n_samples * n, rows, consume, label=kind)
    out = {}
    for t in ctx.wrt:
        mean, sq = s1[t] / n_samples, s2[t] / n_samples
        out[t] = {"smoothgrad": mean, "smoothgrad_sq": sq, "vargrad": sq - mean * mean}[kind].astype(np.float32)
    return out


def _shape(ctx, t):
    return ctx.feeds[t].shape[1:] if t in ctx.feeds else tuple(ctx.activations()[t].shape[1:])


for _kind, _desc in [
    ("smoothgrad", "attribution averaged over noisy copies of the input"),
    ("smoothgrad_sq", "squared attribution averaged over noisy copies of the input"),
    ("vargrad", "variance of the attribution over noisy copies of the input"),
]:
    register(_kind, _desc, options=_options(), reference="Captum NoiseTunnel")(
        (lambda kind: lambda ctx, **o: _smooth(ctx, kind, **o))(_kind)
    )
