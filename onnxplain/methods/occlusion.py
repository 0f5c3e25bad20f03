"""Occlusion (Zeiler & Fergus 2014) and feature ablation: replace a window or a group of
features by a baseline and attribute the drop of the score to what was replaced,
with Captum's conventions (`Occlusion`, `FeatureAblation`)."""

from __future__ import annotations

import numpy as np

from ..errors import OptionError
from .base import Option, register
from .blackbox import (
    SUPERPIXELS,
    baselines,
    coalition_feeds,
    feature_groups,
    float_inputs,
    forward_scores,
    layout,
    original_scores,
    sample_feeds,
    scatter_features,
)

BASELINE = Option("baseline", 0.0, "array",
                  "value that replaces occluded features: a number, per-channel values, or an array (.npy on the CLI)")


def _positive_ints(v):
    return None if v is None or all(i > 0 for i in v) else "all entries must be positive"


OCCLUSION_OPTIONS = [
    Option("window", None, "ints",
           "window shape over the non-batch axes, e.g. 3,8,8 (or 8,8: all channels); "
           "default: all channels and 1/8 of each spatial side, 1 for tabular rows", check=_positive_ints),
    Option("strides", None, "ints", "step of the window per axis (one number: all axes; or per spatial axis); "
           "default half the window (Captum's 1 is window-size times slower and rarely sharper)",
           check=_positive_ints),
    BASELINE,
]


def _window(shape, window, strides):
    """Full-rank window and strides for a batch-first input shape, checked as Captum does."""
    dims = tuple(shape[1:])
    channel, spatial = layout(shape)
    if window is None:
        window = tuple(max(1, d // 8) if a + 1 in spatial and channel is not None else 1 for a, d in enumerate(dims))
        if channel is not None:
            window = tuple(dims[a] if a + 1 == channel else w for a, w in enumerate(window))
    elif len(window) == len(spatial) and channel is not None and len(window) != len(dims):
        it = iter(window)  # spatial window, all channels
        window = tuple(dims[a] if a + 1 == channel else next(it) for a in range(len(dims)))
    if len(window) != len(dims):
        raise OptionError(f"occlusion window {','.join(map(str, window))} must give one size per non-batch axis "
                          f"of the input shape {tuple(shape)}")
    if any(w > d for w, d in zip(window, dims)):
        raise OptionError(f"occlusion window {','.join(map(str, window))} is larger than the input {dims}")
    strides = tuple(max(1, w // 2) for w in window) if strides is None else strides
    if len(strides) == 1:
        strides = strides * len(dims)
    elif len(strides) == len(spatial) and channel is not None and len(strides) != len(dims):
        it = iter(strides)  # spatial strides; the channel axis moves by 1
        strides = tuple(1 if a + 1 == channel else next(it) for a in range(len(dims)))
    if len(strides) != len(dims):
        raise OptionError(f"occlusion strides {','.join(map(str, strides))} must be one number or one per axis "
                          f"of {dims}")
    if any(s > w and d > w for s, w, d in zip(strides, window, dims)):
        raise OptionError("occlusion strides must not exceed the window (features would be skipped)")
    return window, strides


def _box_sum(corners: np.ndarray, window, dims) -> np.ndarray:
    """Sum over windows of corner value times the window's indicator, clipped to dims:
    a box filter along each axis (cumulative sums), so the cost is one pass per axis."""
    out = corners
    for a, w in enumerate(window):
        ax = a + 1
        c = np.cumsum(out, axis=ax)
        shifted = np.zeros_like(c)
        src = [slice(None)] * c.ndim
        dst = [slice(None)] * c.ndim
        src[ax] = slice(0, c.shape[ax] - w)
        dst[ax] = slice(w, None)
        shifted[tuple(dst)] = c[tuple(src)]
        out = c - shifted
    return out[(slice(None),) + tuple(slice(0, d) for d in dims)]


@register("occlusion", "score drop when a sliding window is replaced by a baseline, averaged over the windows "
          "covering each element", options=OCCLUSION_OPTIONS, reference="Captum Occlusion", kind="black-box")
def occlusion(ctx, window, strides, baseline):
    names = float_inputs(ctx)
    base = baselines(ctx, baseline, names)
    score0 = original_scores(ctx)
    n = ctx.n
    out = {}
    for k in names:
        x = ctx.feeds[k]
        dims = x.shape[1:]
        win, st = _window(x.shape, window, strides)
        counts = [int(np.ceil((d - w) / s)) + 1 for d, w, s in zip(dims, win, st)]
        starts = [np.arange(c) * s for c, s in zip(counts, st)]
        total = int(np.prod(counts)) * n
        pos = np.arange(max(dims))

        def rows(start, stop, k=k, x=x, win=win, starts=starts, counts=counts):
            r = np.arange(start, stop)
            window_idx, samples = r // n, r % n
            corner = np.unravel_index(window_idx, counts)
            inside = None
            for a, (d, w) in enumerate(zip(dims, win)):
                lo = starts[a][corner[a]][:, None]
                member = (pos[None, :d] >= lo) & (pos[None, :d] < lo + w)
                member = member.reshape((len(r),) + (1,) * a + (d,) + (1,) * (len(dims) - a - 1))
                inside = member if inside is None else inside & member
            occluded = np.where(inside, base[k][samples], x[samples])
            return sample_feeds(ctx, samples, {k: occluded}), samples

        def device_rows(start, stop, starts=starts, counts=counts):  # the same rows, masked on the device
            r = np.arange(start, stop)
            corner = np.unravel_index(r // n, counts)
            return r % n, np.stack([starts[a][corner[a]] for a in range(len(dims))], axis=1)

        scores = ctx.forward_scores_resident(k, base[k], win, total, device_rows, label=f"occlusion of {k}")
        if scores is None:
            scores = forward_scores(ctx, total, rows, label=f"occlusion of {k}")
        diff = score0[np.arange(total) % n] - scores
        corners = np.zeros((n,) + tuple(d + w for d, w in zip(dims, win)), dtype=np.float64)
        grid = np.ix_(*[np.arange(n)] + starts)
        corners[grid] = np.moveaxis(diff.reshape(tuple(counts) + (n,)), -1, 0)
        ones = np.zeros((1,) + corners.shape[1:])
        ones[np.ix_(*[np.arange(1)] + starts)] = 1.0
        out[k] = (_box_sum(corners, win, dims) / _box_sum(ones, win, dims)).astype(np.float32)
    return out


ABLATION_OPTIONS = [
    Option("feature_mask", None, "any",
           "integer feature id per element, shaped like the input (a .npy on the CLI, a dict per input in Python); "
           "default: one feature per column (tabular) or grid superpixels (images), else one per element"),
    BASELINE,
    Option("superpixels", "grid", str, "automatic features of images when no feature_mask is given",
           choices=SUPERPIXELS),
    Option("grid", 8, int, "superpixels per image side (grid) or sqrt of the segment count (slic)",
           check=lambda v: None if v > 0 else "must be positive"),
]


@register("feature_ablation", "score drop when each feature group is replaced by a baseline",
          options=ABLATION_OPTIONS, reference="Captum FeatureAblation", kind="black-box")
def feature_ablation(ctx, feature_mask, baseline, superpixels, grid):
    names = float_inputs(ctx)
    ids, m = feature_groups(ctx, names, feature_mask, superpixels, grid)
    x = {k: ctx.feeds[k] for k in names}
    base = baselines(ctx, baseline, names)
    score0 = original_scores(ctx)
    n = ctx.n

    def rows(start, stop):
        r = np.arange(start, stop)
        feature, samples = r // n, r % n
        keep = np.ones((len(r), m), dtype=bool)
        keep[np.arange(len(r)), feature] = False
        return coalition_feeds(ctx, ids, x, base, keep, samples), samples

    total = m * n
    drop = score0[np.arange(total) % n] - forward_scores(ctx, total, rows, label="feature ablation")
    return scatter_features(drop.reshape(m, n).T, ids)
