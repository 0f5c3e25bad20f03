"""RISE: randomized input sampling for explanation (Petsiuk et al. 2018).

Random binary grids of `cells` per side keep each cell with probability `p_keep`; each
is upsampled bilinearly to (cells + 1) cells and cropped at a random shift, so masks are
smooth and not aligned to the grid. The saliency is the score-weighted mean of the masks,
sum_i score_i * mask_i / (n_masks * p_keep). Tabular rows get one Bernoulli keep per
feature. Masked inputs are baseline + mask * (input - baseline) (baseline 0: x * mask).
"""

from __future__ import annotations

import numpy as np

from .base import Option, positive, register
from .blackbox import apply_axes, baselines, float_inputs, forward_scores, interp_matrix, layout, sample_feeds, spread

OPTIONS = [
    Option("n_masks", 2000, int, "number of random masks", check=positive),
    Option("cells", 7, int, "grid cells per spatial side of the low-resolution masks", check=positive),
    Option("p_keep", 0.5, float, "probability that a cell (or feature) is kept",
           check=lambda v: None if 0.0 < v <= 1.0 else "must be in (0, 1]"),
    Option("baseline", 0.0, "array", "value the masked-out parts fade to: a number, per-channel values, or an array"),
    Option("seed", 0, int, "random seed of the masks"),
]


class MaskSampler:
    """Masks for one input, drawn up front as small grids and shifts, upsampled per chunk."""

    def __init__(self, shape, n_masks, cells, p_keep, rng):
        self.channel, self.spatial = layout(shape)
        self.dims = tuple(shape[a] for a in self.spatial)
        if self.channel is None:  # tabular: one keep per feature
            self.grids = rng.random((n_masks,) + self.dims) < p_keep
            self.mats = None
            return
        cells = [min(cells, d) for d in self.dims]
        self.grids = rng.random((n_masks,) + tuple(cells)) < p_keep
        self.mats = []
        for d, c in zip(self.dims, cells):
            if c >= d:  # as many cells as positions: no upsampling, no shift
                self.mats.append((np.eye(d), np.zeros(n_masks, dtype=int)))
                continue
            size = int(np.ceil(d / c))
            # c cells upsampled to c + 1 cell sizes; each mask is cropped at its shift
            self.mats.append((interp_matrix((c + 1) * size, c), rng.integers(0, size, n_masks)))

    def masks(self, idx: np.ndarray) -> np.ndarray:
        """(len(idx), *spatial dims) masks in [0, 1]."""
        g = self.grids[idx].astype(np.float64)
        if self.mats is None:
            return g
        mats = []
        for (up, shifts), d in zip(self.mats, self.dims):
            rows = shifts[idx][:, None] + np.arange(d)[None, :]
            mats.append(up[rows])
        return apply_axes(g, mats)


@register("rise", "score-weighted average of random smooth masks (Petsiuk et al. 2018)",
          options=OPTIONS, reference="Petsiuk et al. 2018", kind="black-box")
def rise(ctx, n_masks, cells, p_keep, baseline, seed):
    names = float_inputs(ctx, integers=False)
    base = baselines(ctx, baseline, names)
    rng = np.random.default_rng(seed)
    n = ctx.n
    out = {}
    for k in names:
        x = ctx.feeds[k]
        sampler = MaskSampler(x.shape, n_masks, cells, p_keep, rng)
        total = n_masks * n
        saliency = np.zeros((n,) + sampler.dims, dtype=np.float64)
        chunk = {}

        def rows(start, stop, k=k, x=x, sampler=sampler):
            r = np.arange(start, stop)
            samples = r % n
            m = chunk["masks"] = sampler.masks(r // n)
            if sampler.channel is not None:
                m = np.expand_dims(m, sampler.channel)
            b = base[k][samples]
            return sample_feeds(ctx, samples, {k: (b + m * (x[samples] - b)).astype(x.dtype)}), samples

        def consume(start, stop, scores, sampler=sampler):
            samples = np.arange(start, stop) % n
            weighted = scores.reshape((-1,) + (1,) * len(sampler.dims)) * chunk["masks"]
            for s in np.unique(samples):
                saliency[s] += weighted[samples == s].sum(0)

        forward_scores(ctx, total, rows, label=f"rise on {k}", consume=consume)
        saliency /= n_masks * p_keep
        out[k] = spread(saliency, x.shape, sampler.channel)
    return out
