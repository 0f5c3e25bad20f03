"""What the black-box methods share: scoring perturbed rows through the forward model,
input layouts, baselines, feature groups (masks, grid superpixels, a SLIC-like
segmentation) and bilinear upsampling.

Black-box methods need only the forward model, so they work for every model
onnxruntime can run, including operators with no backward rule (tree ensembles,
integer ops, control flow). They attribute to the model's float inputs; a perturbed
row is scored as `sum(seed * explained)` for the sample it was made from.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError, OptionError
from .integrated import baseline_like

CHANNELS = (1, 3, 4)  # channel counts that tell NHWC from NCHW


def float_inputs(ctx, integers: bool = True) -> list[str]:
    """The inputs a black-box method perturbs: the attributed model inputs (float ones, or
    the token/byte ids of a model without float inputs, replaced by a baseline id when
    `integers`); layers are not perturbable."""
    if ctx.layer is not None:
        raise OptionError(
            f"method '{ctx.method}' perturbs the model's inputs and cannot attribute to a layer; "
            "leave out --layer, or use a gradient method for layer attributions"
        )
    names = [t for t in ctx.wrt if t in ctx.feeds]
    ints = [t for t in names if ctx.feeds[t].dtype.kind not in "f"]
    if ints and not integers:
        raise OptionError(
            f"method '{ctx.method}' blends inputs continuously and cannot perturb the integer input(s) "
            f"{', '.join(ints)}; use occlusion, feature_ablation, kernel_shap or lime (a baseline id replaces "
            "the values), or a white-box method at the embedding"
        )
    return names


def forward_scores(ctx, total: int, make_rows, label: str | None = None, consume=None) -> np.ndarray:
    """Scores of `total` perturbed rows, run in chunks under the memory budget.

    make_rows(start, stop) -> (feeds, samples): the model's feeds for rows [start, stop)
    and, per row, the index of the sample whose seed scores it. consume(start, stop,
    scores), when given, sees each chunk's scores right after make_rows made it.
    Returns the float64 scores (total,).
    """
    tensor = ctx.explained
    sess = ctx.forward_session([tensor])
    scores = np.empty(total, dtype=np.float64)
    rows = {}

    def feeds(start, stop):
        f, rows["samples"] = make_rows(start, stop)
        return f

    for start, stop, out in sess.run_rows(total, feeds, [tensor], label=label):
        y = np.asarray(out[tensor], dtype=np.float64).reshape(stop - start, -1)
        seed = ctx.seed[rows["samples"]].reshape(stop - start, -1)
        scores[start:stop] = np.einsum("ij,ij->i", seed, y)
        if not np.all(np.isfinite(scores[start:stop])):
            raise InputError(
                f"method '{ctx.method}' got non-finite model outputs on perturbed inputs; "
                "check the input's scale or the baseline"
            )
        if consume is not None:
            consume(start, stop, scores[start:stop])
    return scores


def sample_feeds(ctx, samples: np.ndarray, replaced: dict) -> dict:
    """Feeds for rows made from `samples`: the perturbed inputs given, the others copied."""
    return {k: (replaced[k] if k in replaced else v[samples]) for k, v in ctx.feeds.items()}


def original_scores(ctx) -> np.ndarray:
    """Scores sum(seed * explained) of the unperturbed inputs: off the explained tensor's
    values where a run already computed them (the forward pass that found the predicted
    class), else from one forward pass, whose values the context keeps (the dataset
    engine's scores)."""
    seed = ctx.seed  # first: finding the predicted class computes the values
    values = ctx.values
    if values is None or values.shape[:1] != (ctx.n,):
        values = ctx.forward([ctx.explained])[ctx.explained]
        ctx.values = values
    y = np.asarray(values, dtype=np.float64).reshape(ctx.n, -1)
    scores = np.einsum("ij,ij->i", seed.reshape(ctx.n, -1), y)
    if not np.all(np.isfinite(scores)):
        raise InputError(f"method '{ctx.method}' got non-finite model outputs on its inputs; check the input's scale")
    return scores


def baselines(ctx, baseline, names) -> dict:
    return {k: baseline_like(baseline, ctx.feeds[k], k) for k in names}


# ----------------------------------------------------------------------------- layouts


def layout(shape) -> tuple[int | None, tuple[int, ...]]:
    """(channel axis, spatial axes) of a batch-first shape.

    (N, F): tabular rows, no channels, one feature per column. (N, C, L): sequences.
    (N, C, H, W) or (N, H, W, C) (told apart by the channel count), (N, C, D, H, W).
    """
    r = len(shape)
    if r <= 2:
        return None, tuple(range(1, r))
    if r == 4 and shape[3] in CHANNELS and shape[1] not in CHANNELS:
        return 3, (1, 2)
    return 1, tuple(range(2, r))


def is_tabular(shape) -> bool:
    return len(shape) <= 2


# ----------------------------------------------------------------------------- upsampling


def interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation with half-pixel centres (align_corners=False)."""
    m = np.zeros((n_out, n_in), dtype=np.float64)
    if n_in == 1:
        m[:, 0] = 1.0
        return m
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    rows = np.arange(n_out)
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def apply_axes(grid: np.ndarray, mats) -> np.ndarray:
    """Multiply each non-batch axis a of grid (B, s_1, ..., s_k) by mats[a] of shape
    (B or 1, D_a, s_a): separable upsampling; pass transposed matrices for its adjoint."""
    out = grid
    for a, m in enumerate(mats):
        out = np.moveaxis(out, 1 + a, -1)
        shp = out.shape
        out = out.reshape(shp[0], -1, shp[-1]) @ np.swapaxes(m, -1, -2)
        out = np.moveaxis(out.reshape(shp[:-1] + (m.shape[-2],)), -1, 1 + a)
    return out


def spread(values: np.ndarray, shape, channel_axis) -> np.ndarray:
    """A per-location map (N, *spatial) broadcast over the channel axis to `shape`."""
    if channel_axis is not None:
        values = np.expand_dims(values, channel_axis)
    return np.ascontiguousarray(np.broadcast_to(values, shape)).astype(np.float32)


# ----------------------------------------------------------------------------- features

SUPERPIXELS = ("grid", "slic")


def feature_groups(ctx, names, feature_mask, superpixels: str, grid: int) -> tuple[dict, int]:
    """Integer feature ids per input, shaped (N, *input shape), numbered 0..M-1 across
    all inputs (ids shared by two inputs are one feature, as in Captum); and M.

    feature_mask: an int array shaped like the input (with or without the batch axis, or
    broadcastable to it), a dict input name -> such array, or a .npy path. Without it:
    one feature per column for tabular rows, superpixels for images, one per element else.
    """
    if isinstance(feature_mask, str):
        from ..io import load_array

        feature_mask = load_array(feature_mask)
    ids = {}
    offset = 0
    for k in names:
        x = ctx.feeds[k]
        given = feature_mask.get(k) if isinstance(feature_mask, dict) else feature_mask
        if given is None:
            m = _automatic(x, superpixels, grid) + offset
            offset = int(m.max()) + 1
        else:
            m = _given_mask(given, x, k)
        ids[k] = m
    # Dense numbering: feature f is column f of the interpretable representation.
    uniq = np.unique(np.concatenate([m.reshape(-1) for m in ids.values()]))
    ids = {k: np.searchsorted(uniq, m).astype(np.int64) for k, m in ids.items()}
    return ids, len(uniq)


def _given_mask(given, x, name) -> np.ndarray:
    m = np.asarray(given)
    if m.dtype.kind not in "iub" and not (m.dtype.kind == "f" and np.all(m == np.round(m))):
        raise OptionError(f"feature_mask for input '{name}' must hold integer feature ids, got dtype {m.dtype}")
    m = m.astype(np.int64)
    if m.ndim == x.ndim - 1:
        m = m[None]
    try:
        return np.ascontiguousarray(np.broadcast_to(m, x.shape))
    except ValueError:
        raise OptionError(
            f"feature_mask of shape {m.shape} does not fit input '{name}' of shape {x.shape}"
        ) from None


def _automatic(x, superpixels, grid) -> np.ndarray:
    n = x.shape[0]
    channel, spatial = layout(x.shape)
    if channel is None or len(spatial) != 2:
        return np.broadcast_to(np.arange(int(np.prod(x.shape[1:]))).reshape(x.shape[1:]), x.shape)
    h, w = (x.shape[a] for a in spatial)
    if superpixels == "slic":
        seg = np.stack([slic(np.moveaxis(x[i], channel - 1, -1), grid * grid) for i in range(n)])
    else:
        seg = np.broadcast_to(grid_segments(h, w, grid), (n, h, w))
    return np.ascontiguousarray(np.broadcast_to(np.expand_dims(seg, channel), x.shape))


def grid_segments(h: int, w: int, grid: int) -> np.ndarray:
    """(h, w) ids of a grid x grid tiling (fewer cells where the image is smaller)."""
    gh, gw = min(grid, h), min(grid, w)
    rows = np.arange(h) * gh // h
    cols = np.arange(w) * gw // w
    return rows[:, None] * gw + cols[None, :]


def slic(image: np.ndarray, n_segments: int, compactness: float = 10.0, n_iter: int = 10) -> np.ndarray:
    """A small SLIC-like segmentation of an (H, W, C) image: k-means on colour and
    position from a regular grid of centres, each centre searching a 2S x 2S window
    (Achanta et al. 2012, without the connectivity post-processing)."""
    h, w = image.shape[:2]
    img = image.reshape(h, w, -1).astype(np.float64)
    scale = img.std() or 1.0
    img = img / scale
    step = max(1.0, np.sqrt(h * w / n_segments))
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    cy = np.arange(step / 2, h, step)
    cx = np.arange(step / 2, w, step)
    cyy, cxx = np.meshgrid(cy, cx, indexing="ij")
    centres = np.stack([cyy.ravel(), cxx.ravel()], 1)
    colours = img[np.clip(centres[:, 0].astype(int), 0, h - 1), np.clip(centres[:, 1].astype(int), 0, w - 1)]
    # colour distance counts m/S per pixel of position (compactness relative to the scale)
    wpos = (compactness / 10.0) / step
    pix = img.reshape(-1, img.shape[-1])
    pos = np.stack([ys.ravel(), xs.ravel()], 1).astype(np.float64)
    for _ in range(n_iter):
        best = np.full(h * w, np.inf)
        label = np.zeros(h * w, dtype=np.int64)
        for k, ((y0, x0), c) in enumerate(zip(centres, colours)):
            near = (np.abs(pos[:, 0] - y0) <= step) & (np.abs(pos[:, 1] - x0) <= step)
            idx = np.flatnonzero(near)
            d = ((pix[idx] - c) ** 2).sum(1) + (wpos**2) * ((pos[idx] - (y0, x0)) ** 2).sum(1)
            better = d < best[idx]
            best[idx[better]] = d[better]
            label[idx[better]] = k
        for k in range(len(centres)):
            sel = label == k
            if sel.any():
                centres[k] = pos[sel].mean(0)
                colours[k] = pix[sel].mean(0)
    return np.unique(label, return_inverse=True)[1].reshape(h, w)


def scatter_features(values: np.ndarray, ids: dict) -> dict:
    """values (N, M) per feature -> per input arrays: each element gets its feature's value."""
    n = values.shape[0]
    out = {}
    for k, m in ids.items():
        flat = m.reshape(n, -1)
        out[k] = np.take_along_axis(values, flat, axis=1).reshape(m.shape).astype(np.float32)
    return out


def coalition_feeds(ctx, ids: dict, x: dict, base: dict, keep: np.ndarray, samples: np.ndarray) -> dict:
    """Feeds for rows where row r keeps feature f of sample samples[r] when keep[r, f]
    (the input's value) and replaces it by the baseline otherwise."""
    replaced = {}
    rows = np.arange(len(samples))[:, None]
    for k, m in ids.items():
        flat = m.reshape(m.shape[0], -1)[samples]
        on = keep[rows, flat].reshape((len(samples),) + m.shape[1:])
        replaced[k] = np.where(on, x[k][samples], base[k][samples])
    return sample_feeds(ctx, samples, replaced)
