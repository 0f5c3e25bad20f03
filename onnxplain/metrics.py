"""Is an explanation any good? Faithfulness, robustness and sanity metrics.

Every metric takes an `Explainer`, a batch `x` (one float input, batch first) and either
an attribution of x or a method name, and returns a `Score`: one value per sample (and,
for the perturbation metrics, the curve it summarises). Perturbed copies of the inputs
are never all held at once: they are built chunk by chunk and scored through
onnxruntime under the explainer's memory budget.

- faithfulness: `deletion`, `insertion` (Petsiuk et al. 2018), `selectivity` (region
  perturbation / pixel flipping and its AOPC; Samek et al. 2017, Montavon et al. 2017),
  `road` (remove and debias with noisy linear imputation; Rong et al. 2022),
  `infidelity` (Yeh et al. 2019; Captum's `infidelity`);
- robustness: `max_sensitivity` (Yeh et al. 2019; Captum's `sensitivity_max`),
  `continuity` (Montavon et al. 2017: explanations of a sequence of translated inputs);
- sanity: `randomization` (cascading model parameter randomisation; Adebayo et al. 2018).

"Pixels" are the input's positions (all channels of a position together); for tabular
rows they are the features. A position's relevance is its attribution summed over channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InputError, ModelError, OptionError
from .methods.blackbox import layout
from .target import TargetScorer, resolve_target

# Which way is better, per metric: the direction methods are ranked in.
HIGHER_IS_BETTER = {
    "deletion": False, "insertion": True, "selectivity": True, "road": True,
    "infidelity": False, "max_sensitivity": False, "continuity": False, "randomization": False,
    "energy_in_box": True, "pointing_game": True,
}
METRICS = tuple(HIGHER_IS_BETTER)


@dataclass
class Score:
    """values: (N,) one number per sample. curve_x (S,), curve (N, S): the curve the value
    summarises, if any. extra: further per-sample numbers (name -> (N,) array)."""

    name: str
    values: np.ndarray
    curve_x: np.ndarray | None = None
    curve: np.ndarray | None = None
    xlabel: str = ""
    ylabel: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))


# ----------------------------------------------------------------------------- scoring


class Scorer:
    """The model's explained score for each sample on modified copies of the inputs.

    target: any form of `onnxplain.target` (a class per sample, None for the predicted
    class, a position, a frame, a region, a seed): a row made from sample i scores
    sum(seed_i * output), the quantity the attribution explains. A predicted class is that
    of the original inputs, kept for every copy. probability: softmax first over the
    axis the seed picks a class on (Petsiuk et al. score probabilities); else the logit
    itself (what Captum's metrics see of a logit model). A target that picks no single
    class (a seed, a whole-map region) is scored by its raw value.
    """

    def __init__(self, explainer, x, target=None, probability: bool = True, output=None):
        feeds = explainer.feeds(x)
        if len(feeds) != 1:
            raise InputError(f"metrics need a model with one input; this one has {len(feeds)} "
                             f"({', '.join(feeds)})")
        (self.input, self.x), = feeds.items()
        if self.x.dtype.kind != "f":
            raise InputError(f"metrics perturb the input, which must be float; '{self.input}' is {self.x.dtype}")
        self.explainer = explainer
        plan = explainer.plan(feeds)
        if plan.axis(self.input) != 0:
            axis = plan.axis(self.input)
            where = ("no batch axis (the model reads the whole input as one sample: a sequence it runs "
                     "through, a graph)") if axis is None else f"its batch on axis {axis}"
            raise InputError(f"metrics score samples batched along the input's first axis; input '{self.input}' of "
                             f"shape {self.x.shape} has {where}")
        self.n = self.x.shape[0]
        target, output = resolve_target(explainer, feeds, target, output)
        self.tensor = explainer.explained_tensor(output)
        from .detection import check_selection

        check_selection(explainer.graph, self.tensor, None, who="a perturbation metric")  # rows an in-graph NMS selects
        self.session = explainer.forward_session(feeds, [self.tensor])
        # Sessions give rows batch first; the target reads the tensor in its own layout.
        # (A tensor without a batch axis comes stacked per sample: its rows are its layout.)
        self.axis = plan.axis(self.tensor) or 0
        # Row chunks, not one run: a model with a fixed batch size takes that many at a time.
        out = self._physical(np.concatenate([o[self.tensor] for _, _, o in self.session.run_rows(
            self.n, lambda s, e: {self.input: self.x[s:e]}, [self.tensor])]))
        self.target = TargetScorer(target, out, self.axis)
        self.probability = probability and self.target.probability_scored
        self.classes = self.target.classes
        self.original = self.target.scores(out, np.arange(self.n), self.probability)

    def _physical(self, rows) -> np.ndarray:
        return np.moveaxis(np.asarray(rows), 0, self.axis) if self.axis else np.asarray(rows)

    @property
    def ylabel(self) -> str:
        return "probability" if self.probability else "score"

    def fixed_target(self, samples=None):
        """The target to explain rows made from `samples` (default: each sample once) with:
        the same classes or seeds whatever the rows' own predictions."""
        return self.target.explain_target(np.arange(self.n) if samples is None else samples)

    def describe(self, i: int) -> str:
        return self.target.describe(i)

    def rows(self, total: int, make_rows, label: str | None = None) -> np.ndarray:
        """Scores of `total` rows; make_rows(start, stop) -> (inputs, sample index per row)."""
        scores = np.empty(total, dtype=np.float64)
        held = {}

        def feeds(start, stop):
            rows, held["samples"] = make_rows(start, stop)
            return {self.input: np.ascontiguousarray(rows, dtype=self.x.dtype)}

        for start, stop, out in self.session.run_rows(total, feeds, [self.tensor], label=label):
            scores[start:stop] = self.target.scores(self._physical(out[self.tensor]), np.asarray(held["samples"]),
                                                    self.probability)
        if not np.all(np.isfinite(scores)):
            raise InputError("the model gave non-finite outputs on perturbed inputs; check the input's scale "
                             "or the baseline")
        return scores


# ----------------------------------------------------------------------------- positions


class Positions:
    """The input's positions (spatial locations, or features) and their relevance."""

    def __init__(self, shape):
        self.shape = tuple(shape)
        self.channel, self.spatial = layout(self.shape)
        self.grid = tuple(self.shape[a] for a in self.spatial)
        self.count = int(np.prod(self.grid))

    def relevance(self, attribution) -> np.ndarray:
        """(N, P): the attribution summed over channels, one value per position."""
        a = self.full(attribution)
        if self.channel is not None:
            a = a.sum(axis=self.channel)
        return a.reshape(self.shape[0], -1)

    def full(self, attribution) -> np.ndarray:
        """The attribution at the input's shape: a map with one channel, (N, 1, H, W), or
        none, (N, H, W) (CAM maps), is the same relevance on every channel."""
        if isinstance(attribution, dict):
            raise InputError("metrics need one attribution array; the model has several inputs")
        a = np.asarray(attribution, dtype=np.float64)
        c = self.channel
        if c is not None and a.ndim == len(self.shape) - 1 and a.shape == self.shape[:c] + self.shape[c + 1:]:
            a = np.expand_dims(a, c)
        if c is not None and a.ndim == len(self.shape) and a.shape[c] == 1 and \
                a.shape[:c] + a.shape[c + 1:] == self.shape[:c] + self.shape[c + 1:]:
            a = np.broadcast_to(a, self.shape)
        if a.shape != self.shape:
            one = "" if c is None else f", or one map for all channels {self.shape[:c] + (1,) + self.shape[c + 1:]}"
            raise InputError(f"the attribution must have the input's shape {self.shape}{one}, got {a.shape}")
        if not np.all(np.isfinite(a)):
            raise InputError("the attribution contains NaN or Inf")
        return a

    def expand(self, mask) -> np.ndarray:
        """(R, P) per-position mask -> broadcastable to rows of the input (R, ...)."""
        m = mask.reshape((len(mask),) + self.grid)
        return np.expand_dims(m, self.channel) if self.channel is not None else m


def _ranks(relevance: np.ndarray, most_first: bool = True) -> np.ndarray:
    """(N, P) rank of each position: 0 for the most (or least) relevant; ties in index order."""
    order = np.argsort(-relevance if most_first else relevance, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(relevance.shape[1])[None].repeat(len(order), 0), axis=1)
    return ranks


def reference_input(x: np.ndarray, baseline, positions: Positions, sigma: float = 10.0) -> np.ndarray:
    """What removed positions become: a number, an array broadcast to x, 'blur' (a
    Gaussian blur of each sample over its spatial axes) or 'mean' (each sample's
    per-channel mean)."""
    if isinstance(baseline, str):
        if baseline == "blur":
            from scipy.ndimage import gaussian_filter

            sig = [0.0] * x.ndim
            for a in positions.spatial if positions.channel is not None else ():
                sig[a] = sigma
            if not any(sig):
                raise OptionError("a 'blur' baseline needs an image or sequence input; give a number")
            return gaussian_filter(x.astype(np.float64), sig, mode="nearest").astype(x.dtype)
        if baseline == "mean":
            axes = tuple(positions.spatial) if positions.channel is not None else tuple(range(1, x.ndim))
            return np.broadcast_to(x.mean(axis=axes, keepdims=True), x.shape).astype(x.dtype)
        try:
            baseline = float(baseline)
        except ValueError:
            raise OptionError(f"baseline '{baseline}' must be a number, 'blur' or 'mean'") from None
    try:
        return np.broadcast_to(np.asarray(baseline, dtype=x.dtype), x.shape).copy()
    except ValueError:
        raise OptionError(f"baseline of shape {np.shape(baseline)} does not fit the input {x.shape}") from None


def _auc(fractions: np.ndarray, curve: np.ndarray) -> np.ndarray:
    """Trapezoid area under each row of curve over fractions in [0, 1]."""
    dx = np.diff(fractions)
    return ((curve[:, 1:] + curve[:, :-1]) * 0.5 * dx).sum(axis=1)


# ----------------------------------------------------------------------------- deletion / insertion


def deletion(explainer, x, attribution, target=None, steps: int = 50, baseline=0.0, probability: bool = True,
             label: str | None = None) -> Score:
    """Remove the most relevant positions first, in `steps` steps, to `baseline`; the score
    of the class along the way and its area (lower: the explanation found what matters)."""
    return _move_pixels(explainer, x, attribution, target, steps, baseline, probability, False, label)


def insertion(explainer, x, attribution, target=None, steps: int = 50, baseline="blur",
              probability: bool = True, label: str | None = None) -> Score:
    """Start from `baseline` (a blurred copy) and insert the most relevant positions first;
    the area under the score curve (higher is better)."""
    return _move_pixels(explainer, x, attribution, target, steps, baseline, probability, True, label)


def _move_pixels(explainer, x, attribution, target, steps, baseline, probability, insert, label) -> Score:
    if steps < 1:
        raise OptionError(f"steps must be at least 1, got {steps}")
    scorer = Scorer(explainer, x, target, probability)
    x = scorer.x
    pos = Positions(x.shape)
    ranks = _ranks(pos.relevance(attribution))
    base = reference_input(x, baseline, pos)
    fractions = np.linspace(0.0, 1.0, steps + 1)
    counts = np.rint(fractions * pos.count).astype(np.int64)
    s = steps + 1

    def rows(start, stop):
        r = np.arange(start, stop)
        sample, step = r // s, r % s
        moved = pos.expand(ranks[sample] < counts[step][:, None])
        inside, outside = (x[sample], base[sample]) if insert else (base[sample], x[sample])
        return np.where(moved, inside, outside), sample

    curve = scorer.rows(scorer.n * s, rows, label).reshape(scorer.n, s)
    name = "insertion" if insert else "deletion"
    return Score(name, _auc(fractions, curve), fractions, curve, "fraction of pixels " +
                 ("inserted" if insert else "deleted"), scorer.ylabel)


# ----------------------------------------------------------------------------- region perturbation


def selectivity(explainer, x, attribution, target=None, patch: int = 9, steps: int | None = None,
                fill="uniform", probability: bool = True, seed: int = 0, label: str | None = None) -> Score:
    """Region perturbation: patches of patch x patch positions, most relevant first, are
    replaced one per step by `fill` (uniform noise over the sample's value range, as Samek
    et al., or a number); the value is the AOPC, mean over steps 0..L of f(x) - f(x_k)
    (higher: the relevant regions really carried the decision)."""
    if patch < 1:
        raise OptionError(f"patch must be a positive size, got {patch}")
    scorer = Scorer(explainer, x, target, probability)
    x = scorer.x
    pos = Positions(x.shape)
    rel = pos.relevance(attribution)
    coords = np.unravel_index(np.arange(pos.count), pos.grid)
    cells = tuple(-(-g // patch) for g in pos.grid)
    ids = np.ravel_multi_index(tuple(c // patch for c in coords), cells)
    n_patches = int(np.prod(cells))
    patch_rel = np.stack([np.bincount(ids, weights=r, minlength=n_patches) for r in rel])
    patch_rank = _ranks(patch_rel)[:, ids]  # (N, P): the rank of each position's patch
    steps = min(100, n_patches) if steps is None else min(int(steps), n_patches)
    if steps < 1:
        raise OptionError(f"steps must be at least 1, got {steps}")
    if isinstance(fill, str) and fill == "uniform":
        rng = np.random.default_rng(seed)
        lo = x.reshape(len(x), -1).min(axis=1).reshape((-1,) + (1,) * (x.ndim - 1))
        hi = x.reshape(len(x), -1).max(axis=1).reshape((-1,) + (1,) * (x.ndim - 1))
        filler = (lo + (hi - lo) * rng.random(x.shape)).astype(x.dtype)
    else:
        filler = reference_input(x, fill, pos)
    s = steps + 1

    def rows(start, stop):
        r = np.arange(start, stop)
        sample, k = r // s, r % s
        gone = pos.expand(patch_rank[sample] < k[:, None])
        return np.where(gone, filler[sample], x[sample]), sample

    curve = scorer.rows(scorer.n * s, rows, label).reshape(scorer.n, s)
    aopc = (curve[:, :1] - curve).mean(axis=1)
    return Score("selectivity", aopc, np.arange(s, dtype=np.float64), curve, f"{patch}x{patch} patches removed",
                 scorer.ylabel)


# ----------------------------------------------------------------------------- ROAD

# Rong et al. 2022: each imputed pixel is the weighted mean of its 8 neighbours.
_NEIGHBOURS = [(-1, 0, 1 / 6), (1, 0, 1 / 6), (0, -1, 1 / 6), (0, 1, 1 / 6),
               (-1, -1, 1 / 12), (-1, 1, 1 / 12), (1, -1, 1 / 12), (1, 1, 1 / 12)]


def noisy_linear_imputation(image: np.ndarray, removed: np.ndarray, noise: float = 0.01, rng=None) -> np.ndarray:
    """image (H, W, C), removed (H, W) bool: the removed pixels replaced by the solution of
    the sparse linear system 'each is the weighted mean of its neighbours' (known
    neighbours are constants), plus Gaussian noise of std `noise` x the image's std."""
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import splu

    h, w = removed.shape
    flat = removed.reshape(-1)
    gone = np.flatnonzero(flat)
    m = len(gone)
    values = image.reshape(h * w, -1).astype(np.float64)
    if m == 0:
        return image.copy()
    if m == h * w:
        raise OptionError("ROAD cannot impute an image with every pixel removed; use fractions below 1")
    index = np.full(h * w, -1)
    index[gone] = np.arange(m)
    ys, xs = np.divmod(gone, w)
    eq = np.arange(m)
    # A small pull to the known mean keeps the system regular even for enclosed islands.
    diag = np.full(m, 1e-6)
    rhs = np.zeros((m, values.shape[1]))
    rhs += 1e-6 * values[~flat].mean(axis=0)
    rows, cols, data = [], [], []
    for dy, dx, wt in _NEIGHBOURS:
        ny, nx = ys + dy, xs + dx
        ok = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        i, j = eq[ok], ny[ok] * w + nx[ok]
        diag[i] += wt
        unknown = flat[j]
        rows.append(i[unknown])
        cols.append(index[j[unknown]])
        data.append(np.full(int(unknown.sum()), -wt))
        rhs[i[~unknown]] += wt * values[j[~unknown]]
    a = csc_matrix((np.concatenate(data + [diag]), (np.concatenate(rows + [eq]), np.concatenate(cols + [eq]))),
                   shape=(m, m))
    solved = splu(a).solve(rhs)
    if noise:
        rng = rng if rng is not None else np.random.default_rng(0)
        solved += rng.normal(0.0, noise * (values.std() or 1.0), solved.shape)
    out = values.copy()
    out[gone] = solved
    return out.reshape(image.shape).astype(image.dtype)


def _road_positions(shape) -> "Positions":
    pos = Positions(shape)
    if pos.channel is None or len(pos.spatial) != 2:
        raise OptionError("ROAD imputes pixels from their neighbours and needs image inputs (N,C,H,W) or (N,H,W,C)")
    return pos


def road(explainer, x, attribution, target=None, fractions=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
         noise: float = 0.01, probability: bool = True, seed: int = 0, label: str | None = None) -> Score:
    """ROAD: remove a fraction of positions, most relevant first (MoRF) and least relevant
    first (LeRF), imputing them by noisy linear imputation so that the removal itself
    leaks no shape. The value is mean(LeRF) - mean(MoRF) over the fractions (higher is
    better); extra holds both means, curve the MoRF curve and extra['lerf_curve'] the LeRF one."""
    scorer = Scorer(explainer, x, target, probability)
    x = scorer.x
    pos = _road_positions(x.shape)
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.ndim != 1 or not len(fractions) or np.any(fractions <= 0) or np.any(fractions >= 1):
        raise OptionError("ROAD fractions must lie strictly between 0 and 1")
    rel = pos.relevance(attribution)
    ranks = {"morf": _ranks(rel, True), "lerf": _ranks(rel, False)}
    counts = np.rint(fractions * pos.count).astype(np.int64)
    f = len(fractions)
    images = np.moveaxis(x, pos.channel, -1)  # (N, H, W, C)
    rng = np.random.default_rng(seed)

    def rows_for(order):
        def rows(start, stop):
            out = []
            r = np.arange(start, stop)
            for sample, k in zip(r // f, r % f):
                removed = (ranks[order][sample] < counts[k]).reshape(pos.grid)
                out.append(np.moveaxis(noisy_linear_imputation(images[sample], removed, noise, rng), -1,
                                       pos.channel - 1))
            return np.stack(out), r // f
        return rows

    curves = {o: scorer.rows(scorer.n * f, rows_for(o), label).reshape(scorer.n, f) for o in ranks}
    morf, lerf = curves["morf"].mean(axis=1), curves["lerf"].mean(axis=1)
    return Score("road", lerf - morf, fractions, curves["morf"], "fraction of pixels imputed",
                 scorer.ylabel,
                 extra={"morf": morf, "lerf": lerf, "lerf_curve": curves["lerf"]})


# ----------------------------------------------------------------------------- infidelity


def gaussian_perturbation(stdev: float = 0.05, seed: int = 0):
    """Captum's convention: returns (I, x - I) with I ~ N(0, stdev^2)."""
    rng = np.random.default_rng(seed)

    def perturb(x):
        noise = rng.normal(0.0, stdev, x.shape).astype(x.dtype)
        return noise, x - noise

    return perturb


def infidelity(explainer, x, attribution, target=None, n_samples: int = 10, perturb=None, stdev: float = 0.05,
               normalize: bool = False, probability: bool = False, seed: int = 0, label: str | None = None) -> Score:
    """Expected squared error between attribution . I and f(x) - f(x - I) over
    perturbations I (Yeh et al. 2019), as Captum's `infidelity`: the inputs are repeated
    n_samples times each (sample-major) and `perturb(x_repeated) -> (I, x_perturbed)`
    (default: Gaussian noise of std `stdev`). normalize: rescale the attribution by the
    best factor first, which makes the value invariant to the attribution's scale."""
    if n_samples < 1:
        raise OptionError(f"n_samples must be at least 1, got {n_samples}")
    scorer = Scorer(explainer, x, target, probability)
    x = scorer.x
    attr = Positions(x.shape).full(attribution)
    perturb = perturb or gaussian_perturbation(stdev, seed)
    repeated = np.repeat(x, n_samples, axis=0)
    pert, perturbed = perturb(repeated)
    pert, perturbed = np.asarray(pert, dtype=np.float64), np.asarray(perturbed, dtype=x.dtype)
    if pert.shape != repeated.shape or perturbed.shape != repeated.shape:
        raise OptionError(f"the perturbation function must return two arrays shaped {repeated.shape}")
    samples = np.arange(len(repeated)) // n_samples
    scores = scorer.rows(len(repeated), lambda s, e: (perturbed[s:e], samples[s:e]), label)
    diffs = (scorer.original[samples] - scores).reshape(scorer.n, n_samples)
    dots = np.einsum("ij,ij->i", np.repeat(attr, n_samples, axis=0).reshape(len(repeated), -1),
                     pert.reshape(len(repeated), -1)).reshape(scorer.n, n_samples)
    if normalize:
        a, b, c = (dots**2).sum(1), (dots * diffs).sum(1), (diffs**2).sum(1)
        beta = np.divide(b, a, out=np.zeros_like(b), where=a != 0)
        values = beta * beta * a - 2 * beta * b + c
    else:
        values = ((dots - diffs) ** 2).sum(1)
    return Score("infidelity", values / n_samples)


# ----------------------------------------------------------------------------- robustness


def uniform_perturbation(seed: int = 0):
    """Captum's default for sensitivity_max: x + U(-radius, radius)."""
    rng = np.random.default_rng(seed)

    def perturb(x, radius):
        return (x + rng.uniform(-radius, radius, x.shape)).astype(x.dtype)

    return perturb


def _explain(explainer, x, method, target, options) -> np.ndarray:
    a = explainer.attribute(x, method=method, target=target, **(options or {}))
    if isinstance(a, dict):
        raise InputError("metrics need a model with one float input")
    return np.asarray(a, dtype=np.float64)


def max_sensitivity(explainer, x, method: str, target=None, radius: float = 0.02, n_samples: int = 10,
                    perturb=None, norm_ord="fro", seed: int = 0, options: dict | None = None) -> Score:
    """Largest relative change ||E(x') - E(x)|| / ||E(x)|| of the explanation over inputs
    x' near x (Yeh et al. 2019), as Captum's `sensitivity_max`: inputs repeated n_samples
    times (sample-major), `perturb(x_repeated, radius) -> x'` (default uniform in the
    radius); the explained class is that of x throughout."""
    if n_samples < 1:
        raise OptionError(f"n_samples must be at least 1, got {n_samples}")
    scorer = Scorer(explainer, x, target, probability=False)
    x = scorer.x
    base = _explain(explainer, x, method, scorer.fixed_target(), options).reshape(scorer.n, -1)
    perturb = perturb or uniform_perturbation(seed)
    near = np.asarray(perturb(np.repeat(x, n_samples, axis=0), radius), dtype=x.dtype)
    repeated = scorer.fixed_target(np.repeat(np.arange(scorer.n), n_samples))
    moved = _explain(explainer, near, method, repeated, options)
    diff = moved.reshape(len(near), -1) - np.repeat(base, n_samples, axis=0)
    ord_ = None if norm_ord == "fro" else norm_ord
    scale = np.linalg.norm(base, ord=ord_, axis=1)
    scale = np.where(scale == 0, 1.0, scale)
    sens = np.linalg.norm(diff, ord=ord_, axis=1).reshape(scorer.n, n_samples) / scale[:, None]
    return Score("max_sensitivity", sens.max(axis=1))


def translate(x: np.ndarray, shift: int, axis: int) -> np.ndarray:
    """x moved by `shift` positions along `axis`, the edge repeated into the gap."""
    if shift == 0:
        return x.copy()
    idx = np.clip(np.arange(x.shape[axis]) - shift, 0, x.shape[axis] - 1)
    return np.take(x, idx, axis=axis)


def continuity(explainer, x, method: str, target=None, shifts: int = 8, step: int = 1,
               options: dict | None = None) -> Score:
    """Montavon et al. 2017: explain x moved by 0, step, ..., shifts*step positions along its
    last spatial axis (the class of x throughout); each jump is ||R_t - R_t+1||_1 /
    ||x_t - x_t+1||_2 with R normalised to unit L1 mass at t = 0. The value is the largest
    jump (lower: a continuous explanation); extra['mean_jump'] the mean; curve the jumps."""
    if shifts < 1 or step < 1:
        raise OptionError("continuity needs shifts >= 1 and step >= 1")
    scorer = Scorer(explainer, x, target, probability=False)
    x = scorer.x
    pos = Positions(x.shape)
    axis = pos.spatial[-1]
    t = shifts + 1
    seq = np.stack([translate(x, i * step, axis) for i in range(t)], axis=1)  # (N, T, ...)
    flat = seq.reshape((-1,) + x.shape[1:])
    r = _explain(explainer, flat, method, scorer.fixed_target(np.repeat(np.arange(scorer.n), t)),
                 options).reshape(scorer.n, t, -1)
    mass = np.abs(r[:, 0]).sum(axis=1)
    r = r / np.where(mass == 0, 1.0, mass)[:, None, None]
    dr = np.abs(np.diff(r, axis=1)).sum(axis=2)
    dx = np.linalg.norm(np.diff(seq.reshape(scorer.n, t, -1).astype(np.float64), axis=1), axis=2)
    jumps = np.divide(dr, dx, out=np.zeros_like(dr), where=dx > 0)
    return Score("continuity", jumps.max(axis=1), np.arange(1, t, dtype=np.float64) * step, jumps,
                 "translation (positions)", "jump", extra={"mean_jump": jumps.mean(axis=1)})


# ----------------------------------------------------------------------------- randomisation

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def parameter_layers(model) -> list[tuple[str, str, list[str]]]:
    """(node name, op, initializer names) of the layers with weights, output side first
    (the reverse of the graph's topological order)."""
    inits = {t.name for t in model.graph.initializer}
    layers = []
    for i, node in enumerate(model.graph.node):
        if node.op_type in LINEAR_OPS:
            params = [t for t in node.input if t in inits]
            if params:
                layers.append((node.name or f"{node.op_type}_{i}", node.op_type, params))
    return layers[::-1]


def randomized_model(model, names, rng):
    """A copy of the model whose initializers `names` are redrawn from a normal
    distribution with the same mean and standard deviation (Adebayo et al.'s re-init)."""
    import onnx
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in names:
            w = numpy_helper.to_array(t)
            std = float(w.std()) or 0.01
            new = rng.normal(float(w.mean()), std, w.shape).astype(w.dtype)
            t.CopyFrom(numpy_helper.from_array(new, t.name))
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps; 0 when one is constant (no ranking)."""
    from scipy.stats import spearmanr

    a, b = np.ravel(a), np.ravel(b)
    if np.all(a == a[0]) or np.all(b == b[0]):
        return 0.0
    return float(spearmanr(a, b).statistic)


def randomization(explainer, x, method: str, target=None, points: int = 6, absolute: bool = True, seed: int = 0,
                  label: str | None = None, options: dict | None = None) -> Score:
    """Cascading model parameter randomisation (Adebayo et al. 2018): the weights of
    Conv/Gemm/MatMul layers are randomised from the output down, one more layer each
    step; at `points` evenly spaced depths (always including the first and the last)
    the Spearman rank correlation between the original and the randomised explanation
    (of |relevance| per position when `absolute`) is taken. The value is its mean over
    the depths (lower: the explanation depends on what the model learned)."""
    from .explainer import Explainer
    from .runtime import progress

    scorer = Scorer(explainer, x, target, probability=False)
    x = scorer.x
    layers = parameter_layers(explainer.source)
    if not layers:
        raise ModelError("randomization needs layers with weights (Conv, Gemm or MatMul with initializers)")
    depths = np.unique(np.rint(np.linspace(1, len(layers), min(points, len(layers)))).astype(int))
    pos = Positions(x.shape)
    fixed = scorer.fixed_target()
    original = pos.relevance(_explain(explainer, x, method, fixed, options))
    if absolute:
        original = np.abs(original)
    rng = np.random.default_rng(seed)
    corr = np.zeros((scorer.n, len(depths)))
    model = explainer.source
    done = 0
    with progress(len(depths), label) as bar:
        for j, depth in enumerate(depths):
            names = {t for _, _, params in layers[done:depth] for t in params}
            model = randomized_model(model, names, rng)  # cascading: builds on the last step
            done = depth
            e = Explainer(model, providers=explainer.providers, memory_budget=explainer.memory_budget)
            r = pos.relevance(_explain(e, x, method, fixed, options))
            if absolute:
                r = np.abs(r)
            corr[:, j] = [spearman(original[i], r[i]) for i in range(scorer.n)]
            bar.update(1)
    return Score("randomization", corr.mean(axis=1), depths.astype(np.float64), corr,
                 "layers randomised (from the output)", "Spearman rank correlation",
                 extra={"layers": [layers[d - 1][0] for d in depths]})


# ----------------------------------------------------------------------------- detections


def _boxes(explainer, x, target) -> tuple[np.ndarray, "Positions"]:
    """The explained box of each sample (x1, y1, x2, y2 in input pixels) of a detection
    target (`detection:I`, `box:...`, or one resolved by a Scorer), and the positions."""
    feeds = explainer.feeds(x)
    t, _ = resolve_target(explainer, feeds, target)
    chosen = getattr(t, "chosen", None)
    if chosen is None:
        raise OptionError("energy_in_box and pointing_game need a detection target (detection:I or "
                          "box:x1,y1,x2,y2[:C]): they measure the relevance inside the explained box")
    (name, xs), = [(k, v) for k, v in feeds.items()][:1]
    return np.array([d.box for d in chosen], dtype=np.float64), Positions(xs.shape)


def box_mask(box, grid) -> np.ndarray:
    """(H, W) the pixels whose centres lie inside the box (x1, y1, x2, y2)."""
    h, w = grid[-2:]
    cx = np.arange(w) + 0.5
    cy = np.arange(h) + 0.5
    return ((cy[:, None] >= box[1]) & (cy[:, None] < box[3]) & (cx[None, :] >= box[0]) & (cx[None, :] < box[2]))


def energy_in_box(explainer, x, attribution, target=None, label: str | None = None) -> Score:
    """The share of positive relevance (summed over channels) inside the explained box
    (Wang et al. 2020's energy-based pointing game; higher is better); `extra` holds the
    box's share of the image, what a uniform map would score."""
    boxes, pos = _boxes(explainer, x, target)
    rel = np.clip(pos.relevance(attribution), 0, None).reshape((len(boxes),) + pos.grid)
    values, area = np.empty(len(boxes)), np.empty(len(boxes))
    for i, b in enumerate(boxes):
        m = box_mask(b, pos.grid)
        total = rel[i].sum()
        values[i] = rel[i][m].sum() / total if total > 0 else 0.0
        area[i] = m.mean()
    return Score("energy_in_box", values, extra={"area_share": area})


def pointing_game(explainer, x, attribution, target=None, tolerance: int = 0, label: str | None = None) -> Score:
    """1 where the most relevant position lies in the explained box grown by `tolerance`
    pixels (Zhang et al. 2018; detector papers use 15 px on full-size images), else 0."""
    boxes, pos = _boxes(explainer, x, target)
    rel = pos.relevance(attribution).reshape((len(boxes),) + pos.grid)
    hits = np.empty(len(boxes))
    for i, b in enumerate(boxes):
        r, c = np.unravel_index(int(np.argmax(rel[i])), rel[i].shape)
        t = tolerance
        hits[i] = float(b[0] - t <= c + 0.5 < b[2] + t and b[1] - t <= r + 0.5 < b[3] + t)
    return Score("pointing_game", hits)


# ----------------------------------------------------------------------------- all at once

CURVES = ("deletion", "insertion", "selectivity", "road")


# Parameters of the metric functions that are not settings.
_NOT_SETTINGS = ("explainer", "x", "attribution", "method", "target", "label", "options")
# Settings that take a word as well as a number.
_WORDS = {"baseline": ("blur", "mean"), "fill": ("uniform",), "norm_ord": ("fro",)}


def settings_of(metric: str) -> dict:
    """{setting: default} of a metric (what `settings=` / `-S METRIC:KEY=VALUE` may set)."""
    import inspect

    params = inspect.signature(globals()[metric]).parameters.values()
    return {p.name: p.default for p in params if p.name not in _NOT_SETTINGS}


def _fractions(v):
    f = np.asarray(v, dtype=np.float64)
    return f.ndim == 1 and len(f) > 0 and bool(np.all((f > 0) & (f < 1)))


# What a setting's value must be, checked with the names before any work.
_VALID = {"steps": (lambda v: v is None or v >= 1, "at least 1"), "patch": (lambda v: v >= 1, "at least 1"),
          "n_samples": (lambda v: v >= 1, "at least 1"), "shifts": (lambda v: v >= 1, "at least 1"),
          "step": (lambda v: v >= 1, "at least 1"), "points": (lambda v: v >= 1, "at least 1"),
          "fractions": (_fractions, "fractions strictly between 0 and 1"),
          "stdev": (lambda v: v >= 0, "not negative"), "radius": (lambda v: v >= 0, "not negative"),
          "noise": (lambda v: v >= 0, "not negative")}


def check_settings(metrics, settings: dict | None) -> None:
    """Unknown metrics, unknown settings and impossible values fail here, before any work,
    with the valid names."""
    unknown = [m for m in list(metrics) + list(settings or {}) if m not in HIGHER_IS_BETTER]
    if unknown:
        raise OptionError(f"unknown metric(s) {', '.join(dict.fromkeys(unknown))}; choose from {', '.join(METRICS)}")
    for metric, kw in (settings or {}).items():
        valid = settings_of(metric)
        bad = sorted(set(kw) - set(valid))
        if bad:
            raise OptionError(f"metric '{metric}' has no setting(s) {', '.join(bad)}; its settings: "
                              f"{', '.join(valid)}")
        for key, value in kw.items():
            ok, want = _VALID.get(key, (None, ""))
            try:
                fine = ok is None or isinstance(value, str) or ok(value)
            except (TypeError, ValueError):
                fine = False
            if not fine:
                raise OptionError(f"setting {key}={value!r} of metric '{metric}' must be {want}")


def parse_setting(metric: str, key: str, text: str):
    """A setting's value from its command-line spelling, typed by the setting's default."""
    check_settings([metric], {metric: {key: text}})
    default = settings_of(metric)[key]
    where = f"setting {key}={text!r} of metric '{metric}'"
    if key == "perturb":
        raise OptionError(f"{where}: perturb is a Python function (perturb=callable); it cannot be given as text")
    text = str(text).strip()
    if key in _WORDS and text.lower() in _WORDS[key]:
        return text.lower()
    try:
        if isinstance(default, bool):
            from .methods.base import _parse_bool

            return _parse_bool(text)
        if isinstance(default, tuple):
            return tuple(float(v) for v in text.split(",") if v.strip())
        if isinstance(default, int) or (default is None and key == "steps"):
            return int(text)
        return float(text)
    except ValueError:
        words = f" or {', '.join(_WORDS[key])}" if key in _WORDS else ""
        kind = "true/false" if isinstance(default, bool) else "numbers a,b,c" if isinstance(default, tuple) else \
            "an integer" if isinstance(default, int) or default is None else "a number"
        raise OptionError(f"{where} must be {kind}{words}") from None


def evaluate(explainer, x, methods: dict, metrics=("deletion", "insertion", "selectivity"), target=None,
             settings: dict | None = None, label: str | None = None) -> dict:
    """{method: {metric: Score}} for `methods` (name -> attribution options) on x.

    settings: per-metric keyword arguments, e.g. {"deletion": {"steps": 20}}. What is
    explained and scored is x's predicted class unless `target` (any form of
    `onnxplain.target`) says otherwise. Methods, options, metrics and settings are all
    checked before any work.
    """
    from .methods.base import get_method

    check_settings(metrics, settings)
    for method, options in methods.items():
        get_method(method).resolve(options or {})
    settings = settings or {}
    scorer = Scorer(explainer, x, target, probability=False)
    if "road" in metrics:
        _road_positions(scorer.x.shape)
    fixed = scorer.fixed_target()
    results = {}
    for method, options in methods.items():
        attr = None
        out = {}
        for metric in metrics:
            kw = dict(settings.get(metric, {}))
            if metric in ("deletion", "insertion", "selectivity", "road", "infidelity", "energy_in_box",
                          "pointing_game"):
                if attr is None:
                    attr = _explain(explainer, x, method, fixed, options)
                out[metric] = globals()[metric](explainer, x, attr, target=fixed, label=label, **kw)
            else:
                if metric == "randomization":
                    kw.setdefault("label", label)
                out[metric] = globals()[metric](explainer, x, method, target=fixed, options=options, **kw)
        results[method] = out
    return results
