"""Meaningful perturbation (Fong & Vedaldi 2017): learn the smallest smooth mask whose
removal (blending the input with a blurred / median-filtered copy) destroys the evidence
for the target, or whose keeping preserves it.

The mask m (a low-resolution grid, `mask_size` cells per spatial side, upsampled
bilinearly; one value per feature for tabular rows) blends
    x_m = p + up(m) * (x - p) + noise,  p = perturb(x),
and Adam, with m clipped to [0, 1] after each step, minimises
    delete:   s(x_m) / |s(x)| + l1_coeff * mean(1 - m) + tv_coeff * mean(|grad m|^tv_beta)
    preserve: -s(x_m) / |s(x)| + l1_coeff * mean(m) + tv_coeff * mean(|grad m|^tv_beta)
where s is the explained score (seed . output), normalised by the input's score so that
the coefficients do not depend on the model's scale.

d s / d m comes from onnxplain's compiled gradient of the model (`gradient=exact`, the
exact gradient through blend and upsampling, chained in numpy), or, for models with
operators that have no backward rule, from finite differences of forward passes only:
SPSA (random +-1 directions over the whole mask, `spsa_samples` pairs per iteration) or
central differences per mask cell (`coordinate`, 2 passes per cell per iteration).
`auto` is exact when the model has backward rules for every operator, else SPSA.

Sign convention of the result: high = evidence for the target. delete mode returns
1 - up(m) (1 where deleting the region kills the score), preserve mode returns up(m)
(1 where the region must be kept). It has the input's shape (the same over channels).
"""

from __future__ import annotations

import numpy as np

from ..errors import OptionError, UnsupportedOperatorError
from ..runtime import progress
from .base import Option, non_negative, positive, register
from .blackbox import apply_axes, baselines, float_inputs, forward_scores, interp_matrix, layout, sample_feeds, spread
from .gradients import GRADIENT

PERTURBATIONS = ("auto", "blur_median", "blur", "median", "constant", "noise")

OPTIONS = [
    Option("mode", "delete", str, "delete: find what removes the evidence; preserve: what keeps it",
           choices=("delete", "preserve")),
    Option("mask_size", 28, int, "mask cells per spatial side (capped at the input's size)", check=positive),
    Option("perturbation", "auto", str, "what replaces deleted parts: auto = blur_median for images and "
           "sequences, constant (the baseline) for tabular rows", choices=PERTURBATIONS),
    Option("sigma", 10.0, float, "standard deviation of the gaussian blur, in pixels", check=positive),
    Option("median_size", 11, int, "size of the median filter, in pixels", check=positive),
    Option("baseline", 0.0, "array", "replacement of perturbation=constant"),
    Option("l1_coeff", 1.0, float, "weight of the mask's area (L1)", check=non_negative),
    Option("tv_coeff", 0.2, float, "weight of the mask's total variation", check=non_negative),
    Option("tv_beta", 3.0, float, "exponent of the total variation", check=positive),
    Option("noise", 0.1, float, "std of the gaussian noise added to the blended input each iteration, "
           "relative to the input's std", check=non_negative),
    Option("n_iter", 300, int, "optimisation steps", check=positive),
    Option("lr", 0.1, float, "Adam learning rate", check=positive),
    Option("gradient", "auto", str, "d score / d mask: exact (compiled gradient), spsa or coordinate "
           "(finite differences, forward passes only), auto", choices=("auto", "exact", "spsa", "coordinate")),
    Option("spsa_samples", 8, int, "SPSA directions per iteration (2 forward passes each)", check=positive),
    Option("fd_step", 0.05, float, "finite-difference step on the mask", check=positive),
    Option("seed", 0, int, "random seed of the noise and the SPSA directions"),
]


def perturbed_copy(x, kind, sigma, median_size, base, rng):
    """p = perturb(x) over the spatial axes only."""
    channel, spatial = layout(x.shape)
    if kind in ("blur", "median", "blur_median") and channel is None:
        raise OptionError(f"perturbation={kind} needs an image or a sequence; tabular rows take "
                          "perturbation=constant (the baseline) or noise")
    from scipy import ndimage

    def blur():
        s = [0.0] * x.ndim
        for a in spatial:
            s[a] = sigma
        return ndimage.gaussian_filter(x.astype(np.float64), s, mode="reflect")

    def median():
        size = [1] * x.ndim
        for a in spatial:
            size[a] = min(median_size, x.shape[a])
        return ndimage.median_filter(x.astype(np.float64), size=size, mode="reflect")

    if kind == "blur":
        return blur()
    if kind == "median":
        return median()
    if kind == "blur_median":
        return 0.5 * (blur() + median())
    if kind == "noise":
        axes = tuple(range(1, x.ndim))
        return x.mean(axes, keepdims=True) + x.std(axes, keepdims=True) * rng.standard_normal(x.shape)
    return base.astype(np.float64)


class Adam:
    def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps, self.t, self.m, self.v = lr, b1, b2, eps, 0, 0.0, 0.0

    def step(self, g):
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        mh = self.m / (1 - self.b1 ** self.t)
        vh = self.v / (1 - self.b2 ** self.t)
        return self.lr * mh / (np.sqrt(vh) + self.eps)


def total_variation(m, beta):
    """mean over neighbour differences of |d|^beta, and its gradient; m (N, *low)."""
    value = np.zeros(m.shape[0])
    grad = np.zeros_like(m)
    count = 0
    for a in range(1, m.ndim):
        if m.shape[a] < 2:
            continue
        d = np.diff(m, axis=a)
        count += d[0].size
        value += (np.abs(d) ** beta).reshape(len(m), -1).sum(1)
        gd = beta * np.abs(d) ** (beta - 1) * np.sign(d)
        pad_lo = [(0, 0)] * m.ndim
        pad_hi = [(0, 0)] * m.ndim
        pad_lo[a], pad_hi[a] = (1, 0), (0, 1)
        grad += np.pad(gd, pad_lo) - np.pad(gd, pad_hi)
    count = max(count, 1)
    return value / count, grad / count


@register("meaningful_perturbation", "learned smooth mask that deletes (or preserves) the evidence "
          "(Fong & Vedaldi 2017)", options=OPTIONS, reference="Fong & Vedaldi 2017", kind="black-box")
def meaningful_perturbation(ctx, mode, mask_size, perturbation, sigma, median_size, baseline, l1_coeff, tv_coeff,
                            tv_beta, noise, n_iter, lr, gradient, spsa_samples, fd_step, seed):
    names = float_inputs(ctx, integers=False)
    if len(names) != 1:
        raise OptionError(f"meaningful_perturbation learns a mask for one input; the model has {len(names)} float "
                          "inputs (use occlusion, rise or kernel_shap)")
    k = names[0]
    x = ctx.feeds[k].astype(np.float64)
    n = ctx.n
    rng = np.random.default_rng(seed)
    channel, spatial = layout(x.shape)
    if perturbation == "auto":
        perturbation = "constant" if channel is None else "blur_median"
    p = perturbed_copy(x, perturbation, sigma, median_size, baselines(ctx, baseline, [k])[k], rng)
    dims = tuple(x.shape[a] for a in spatial)
    low = tuple(dims) if channel is None else tuple(min(mask_size, d) for d in dims)
    mats = [interp_matrix(d, s)[None] for d, s in zip(dims, low)]

    def up(m):  # (B, *low) -> (B, *input shape) broadcastable over channels
        u = apply_axes(m, mats)
        return np.expand_dims(u, channel) if channel is not None else u

    def down(g):  # adjoint of up for a gradient shaped like the input
        if channel is not None:
            g = g.sum(channel)
        return apply_axes(g, [np.swapaxes(mt, -1, -2) for mt in mats])

    score0 = forward_scores(ctx, n, lambda s, e: ({kk: v[s:e] for kk, v in ctx.feeds.items()}, np.arange(s, e)))
    scale = np.where(np.abs(score0) > 1e-12, np.abs(score0), 1.0).reshape((n,) + (1,) * len(low))
    noise_std = noise * x.reshape(n, -1).std(1).reshape((n,) + (1,) * (x.ndim - 1))
    blend = Blend(ctx, k, p, up, down)
    if gradient in ("auto", "exact"):
        try:
            ctx.compiled(GRADIENT)
        except UnsupportedOperatorError as exc:
            if gradient == "exact":
                raise OptionError(f"meaningful_perturbation with gradient=exact needs backward rules, and the "
                                  f"model has none for: {', '.join(exc.operators)}; use gradient=spsa or coordinate"
                                  ) from None
            gradient = "spsa"
        else:
            gradient = "exact"
    directions = None
    if gradient == "coordinate":
        directions = np.broadcast_to(np.eye(int(np.prod(low))).reshape((1, -1) + low), (n, int(np.prod(low))) + low)

    m = np.ones((n,) + low)
    adam = Adam(lr)
    with progress(n_iter, "meaningful perturbation") as bar:
        for _ in range(n_iter):
            eps = noise_std * rng.standard_normal(x.shape) if noise > 0 else np.zeros_like(x)
            if gradient == "exact":
                g_score = blend.exact(m, eps)
            elif gradient == "spsa":
                d = rng.choice((-1.0, 1.0), size=(n, spsa_samples) + low)
                slope = blend.central(m, eps, d, fd_step)  # (n, spsa_samples)
                g_score = (slope.reshape(slope.shape + (1,) * len(low)) * d).mean(1)
            else:
                g_score = blend.central(m, eps, directions, fd_step).reshape(m.shape)
            _, g_tv = total_variation(m, tv_beta)
            g_area = -1.0 if mode == "delete" else 1.0
            sign = 1.0 if mode == "delete" else -1.0
            g = sign * g_score / scale + l1_coeff * g_area / m[0].size + tv_coeff * g_tv
            m = np.clip(m - adam.step(g), 0.0, 1.0)
            bar.update(1)
    mask = apply_axes(m, mats)
    saliency = 1.0 - mask if mode == "delete" else mask
    return {k: spread(saliency, ctx.feeds[k].shape, channel)}


class Blend:
    """x_m = p + up(m) * (x - p) + eps for one input, and d score / d m."""

    def __init__(self, ctx, k, p, up, down):
        self.ctx, self.k, self.p, self.up, self.down = ctx, k, p, up, down
        self.diff = ctx.feeds[k].astype(np.float64) - p
        self.dtype = ctx.feeds[k].dtype

    def inputs(self, m, eps, samples):
        return (self.p[samples] + self.up(m) * self.diff[samples] + eps[samples]).astype(self.dtype)

    def exact(self, m, eps):
        """The compiled gradient at x_m, chained through the blend and the upsampling."""
        ctx, n = self.ctx, self.ctx.n
        xm = self.inputs(m, eps, np.arange(n))
        g = ctx.backward(GRADIENT, feeds={**ctx.feeds, self.k: xm})[0][self.k]
        return self.down(g.astype(np.float64) * self.diff)

    def central(self, m, eps, directions, step):
        """(s(m + step d) - s(m - step d)) / (2 step) for directions (n, R, *low): (n, R)."""
        ctx, n = self.ctx, self.ctx.n
        r_dirs = directions.shape[1]

        def rows(start, stop):
            r = np.arange(start, stop)
            j, samples = r // n, r % n
            sgn = np.where(j < r_dirs, 1.0, -1.0).reshape((-1,) + (1,) * (m.ndim - 1))
            masks = m[samples] + sgn * step * directions[samples, j % r_dirs]
            return sample_feeds(ctx, samples, {self.k: self.inputs(masks, eps, samples)}), samples

        f = forward_scores(ctx, 2 * r_dirs * n, rows).reshape(2, r_dirs, n)
        return ((f[0] - f[1]) / (2.0 * step)).T
