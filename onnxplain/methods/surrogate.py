"""Surrogate models on interpretable features: KernelSHAP (Lundberg & Lee 2017) and LIME
(Ribeiro et al. 2016), with Captum's sampling, weights and regression.

A coalition z in {0, 1}^M keeps feature f (the input's values) where z_f = 1 and puts the
baseline elsewhere. A weighted linear model g(z) = b + c . z is fitted to the scores;
each element's attribution is the coefficient of its feature. The same coalitions serve
every sample of a batch; each sample gets its own fit, as in Captum.

KernelSHAP (Captum `KernelShap`): the full and the empty coalitions first (weight 1e6,
which pins b and b + sum c to the scores of baseline and input), then coalition sizes k
drawn with probability proportional to (M - 1) / (k (M - k)) and k features uniformly,
weight 1, ordinary weighted least squares with an intercept. When n_samples >= 2^M all
coalitions are enumerated with the exact Shapley kernel weights instead: the result is
then the exact Shapley values of the model with this baseline.

LIME (Captum `Lime`): each feature kept with probability 1/2, weight
exp(-d^2 / (2 kernel_width^2)) with d the cosine (or euclidean) distance between the
input and the perturbed input, and Captum's default surrogate, a Lasso (alpha=0.01, the
objective of scikit-learn's Lasso, solved here by coordinate descent); `surrogate=linear`
(ordinary weighted least squares) or `ridge` fit without sparsity.
"""

from __future__ import annotations

from math import comb

import numpy as np

from ..errors import OptionError
from .base import Option, positive, register
from .blackbox import SUPERPIXELS, baselines, coalition_feeds, feature_groups, float_inputs, forward_scores, \
    scatter_features

INF_WEIGHT = 1e6  # Captum's weight of the empty and full coalitions
SURROGATES = ("lasso", "ridge", "linear")


def _common():
    return [
        Option("feature_mask", None, "any",
               "integer feature id per element, shaped like the input (a .npy on the CLI, a dict per input in "
               "Python); default: one feature per column (tabular) or superpixels (images), else one per element"),
        Option("n_samples", 0, int, "number of coalitions evaluated; 0: 2M + 2048 for M features "
               "(shap's rule; kernel_shap enumerates all 2^M when that is fewer)",
               check=lambda v: None if v >= 0 else "must not be negative"),
        Option("baseline", 0.0, "array", "value of absent features: a number, per-channel values, or an array"),
        Option("superpixels", "grid", str, "automatic features of images", choices=SUPERPIXELS),
        Option("grid", 8, int, "superpixels per image side (grid) or sqrt of the segment count (slic)",
               check=positive),
        Option("seed", 0, int, "random seed of the coalitions"),
    ]


def kernel_shap_coalitions(m: int, n_samples: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(coalitions (n, M) bool, weights (n,)): Captum's KernelShap sampling, or every
    coalition with the exact Shapley kernel weights when n_samples >= 2^M."""
    if m < 31 and n_samples >= 2 ** m:
        z = ((np.arange(2 ** m)[:, None] >> np.arange(m)[None, :]) & 1).astype(bool)
        k = z.sum(1)
        inner = (k > 0) & (k < m)
        w = np.full(len(z), INF_WEIGHT)
        w[inner] = (m - 1) / (np.array([comb(m, int(v)) for v in k[inner]]) * k[inner] * (m - k[inner]))
        return z, w
    z = np.zeros((n_samples, m), dtype=bool)
    z[0] = True
    w = np.ones(n_samples)
    w[:2] = INF_WEIGHT
    if m > 1 and n_samples > 2:
        sizes = np.arange(1, m)
        p = (m - 1) / (sizes * (m - sizes))
        ks = rng.choice(sizes, size=n_samples - 2, p=p / p.sum())
        order = np.argsort(rng.random((n_samples - 2, m)), axis=1)
        z[2:] = np.argsort(order, axis=1) < ks[:, None]  # k features at random positions
    return z, w


def lime_coalitions(m: int, n_samples: int, rng) -> np.ndarray:
    """Captum's default LIME sampling: each feature kept with probability 1/2."""
    return rng.random((n_samples, m)) < 0.5


def weighted_fit(z: np.ndarray, y: np.ndarray, w: np.ndarray, surrogate: str = "linear", alpha: float = 0.0):
    """Coefficients c (M,) of y ~ b + c . z with sample weights w, the intercept b free
    (fitted on weighted-centred data, as scikit-learn does)."""
    z = z.astype(np.float64)
    wn = w / w.sum()
    z_mean, y_mean = wn @ z, wn @ y
    zc, yc = z - z_mean, y - y_mean
    if surrogate == "lasso":
        return _lasso(zc, yc, wn, alpha)
    sw = np.sqrt(w)[:, None]
    a, b = zc * sw, yc * sw[:, 0]
    if surrogate == "ridge":  # scikit-learn's Ridge: sum w r^2 + alpha |c|^2
        return np.linalg.solve(a.T @ a + alpha * np.eye(a.shape[1]), a.T @ b)
    return np.linalg.lstsq(a, b, rcond=None)[0]


def _lasso(zc, yc, wn, alpha, max_iter=10000, tol=1e-12):
    """min 1/2 sum wn r^2 + alpha |c|_1 (wn summing to 1: scikit-learn's Lasso objective
    with sample weights) by cyclic coordinate descent."""
    m = zc.shape[1]
    c = np.zeros(m)
    norm = wn @ (zc * zc)
    r = yc.copy()
    for _ in range(max_iter):
        largest = 0.0
        for j in range(m):
            if norm[j] == 0.0:
                continue
            old = c[j]
            rho = wn @ (zc[:, j] * r) + norm[j] * old
            c[j] = np.sign(rho) * max(abs(rho) - alpha, 0.0) / norm[j]
            if c[j] != old:
                r -= zc[:, j] * (c[j] - old)
                largest = max(largest, abs(c[j] - old))
        if largest <= tol * max(1.0, np.abs(c).max()):
            break
    return c


def _n_samples(method, n_samples, m):
    if n_samples == 0:
        n_samples = 2 * m + 2048
        if method == "kernel_shap" and m < 31:
            n_samples = min(n_samples, 2 ** m)
    if method == "kernel_shap" and n_samples < m + 1 and not (m < 31 and n_samples >= 2 ** m):
        raise OptionError(f"kernel_shap needs n_samples >= the number of features + 1 = {m + 1} "
                          f"(got {n_samples}); raise n_samples or group features with feature_mask")
    return n_samples


def _surrogate(ctx, method, feature_mask, n_samples, baseline, superpixels, grid, seed, fit, coalitions,
               weights=None):
    names = float_inputs(ctx)
    ids, m = feature_groups(ctx, names, feature_mask, superpixels, grid)
    n_samples = _n_samples(method, n_samples, m)
    z, w = coalitions(m, n_samples, np.random.default_rng(seed))
    x = {k: ctx.feeds[k] for k in names}
    base = baselines(ctx, baseline, names)
    n, rows_n = ctx.n, len(z)
    sample_weights = np.empty(rows_n * n) if weights is not None else None

    def rows(start, stop):
        r = np.arange(start, stop)
        coalition, samples = r // n, r % n
        feeds = coalition_feeds(ctx, ids, x, base, z[coalition], samples)
        if weights is not None:
            sample_weights[start:stop] = weights({k: feeds[k] for k in names}, {k: x[k][samples] for k in names})
        return feeds, samples

    scores = forward_scores(ctx, rows_n * n, rows, label=method).reshape(rows_n, n)
    if weights is not None:
        w = sample_weights.reshape(rows_n, n)
    coef = np.stack([fit(z, scores[:, s], w if w.ndim == 1 else w[:, s]) for s in range(n)])
    return scatter_features(coef, ids)


@register("kernel_shap", "Shapley values of features from a kernel-weighted linear fit on coalitions",
          options=_common(), reference="Captum KernelShap", kind="black-box")
def kernel_shap(ctx, feature_mask, n_samples, baseline, superpixels, grid, seed):
    return _surrogate(ctx, "kernel_shap", feature_mask, n_samples, baseline, superpixels, grid, seed,
                      lambda z, y, w: weighted_fit(z, y, w, "linear"), kernel_shap_coalitions)


def similarity(distance: str, kernel_width: float):
    """exp(-d^2 / (2 width^2)) between each perturbed row and its input, all float inputs
    flattened together (Captum's get_exp_kernel_similarity_function)."""

    def weights(perturbed: dict, original: dict) -> np.ndarray:
        p = np.concatenate([v.reshape(len(v), -1) for v in perturbed.values()], 1).astype(np.float64)
        o = np.concatenate([v.reshape(len(v), -1) for v in original.values()], 1).astype(np.float64)
        if distance == "cosine":
            # torch's CosineSimilarity: each norm clamped at eps=1e-8
            norms = np.maximum(np.linalg.norm(p, axis=1), 1e-8) * np.maximum(np.linalg.norm(o, axis=1), 1e-8)
            d = 1.0 - np.einsum("ij,ij->i", p, o) / norms
        else:
            d = np.linalg.norm(p - o, axis=1)
        return np.exp(-(d ** 2) / (2.0 * kernel_width ** 2))

    return weights


LIME_OPTIONS = _common() + [
    Option("surrogate", "lasso", str, "interpretable model: lasso (Captum's default), ridge, or linear least squares",
           choices=SURROGATES),
    Option("alpha", 0.01, float, "regularisation of the lasso / ridge surrogate",
           check=lambda v: None if v >= 0 else "must not be negative"),
    Option("distance", "cosine", str, "distance in the similarity kernel", choices=("cosine", "euclidean")),
    Option("kernel_width", 1.0, float, "width of the exponential similarity kernel", check=positive),
]


@register("lime", "coefficients of a locally weighted sparse linear surrogate on feature coalitions",
          options=LIME_OPTIONS, reference="Captum Lime", kind="black-box")
def lime(ctx, feature_mask, n_samples, baseline, superpixels, grid, seed, surrogate, alpha, distance, kernel_width):
    return _surrogate(ctx, "lime", feature_mask, n_samples, baseline, superpixels, grid, seed,
                      lambda z, y, w: weighted_fit(z, y, w, surrogate, alpha),
                      lambda m, k, rng: (lime_coalitions(m, k, rng), None), similarity(distance, kernel_width))
