"""Building Blocks attribution factorization (Olah et al., Distill 2018).

For one image and a layer (a tensor N,C,H,W or N,C,L), the spatial attribution of many
classes to the layer is collected into a matrix A (positions x classes): per class,
activation x gradient of the class logit at the layer (or any white-box method's layer
attribution), summed over channels. A (or the layer's activations, positions x channels)
is factorized into k factors: spatial factors W (positions x k) and loadings H
(k x classes); each factor's largest loadings are the classes it pushes. The picture
gives each factor a hue and the attribution magnitude the brightness.

NMF and PCA are written here on numpy (about sixty lines) rather than taken from
scikit-learn: one small, well-understood algorithm each does not justify a heavy new
runtime dependency. NMF is HALS (hierarchical alternating least squares, the coordinate
descent that scikit-learn's default 'cd' solver also uses), initialised by NNDSVDa: every
block update minimises the objective exactly, so it never increases.
"""

from __future__ import annotations

import colorsys
import re
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError, OptionError

ALGOS = ("nmf", "pca")
OF = ("attribution", "activation")
ACTIVATION_OPS = ("Relu", "Clip", "LeakyRelu", "Elu", "Selu", "Sigmoid", "HardSigmoid", "HardSwish",
                  "Softplus", "Gelu", "Mish", "Swish", "PRelu", "Celu")
# Building Blocks' two colours (blue, orange); further factors get evenly spaced hues.
HUES = ((0.20, 0.50, 1.00), (1.00, 0.55, 0.10))


# ----------------------------------------------------------------------------- NMF and PCA


def nmf(V, k: int, n_iter: int = 400, tol: float = 1e-7, seed: int = 0):
    """V ~ W @ H with W, H >= 0, minimising ||V - W H||_F^2 / 2 by HALS.

    Returns (W (m,k), H (k,n), losses): the objective after initialisation and after each
    iteration; it never increases. Stops when an iteration lowers it by less than `tol`
    relative.
    """
    V = np.asarray(V, dtype=np.float64)
    if V.ndim != 2 or V.size == 0:
        raise InputError(f"NMF needs a non-empty 2-D matrix, got shape {V.shape}")
    if (V < 0).any():
        raise InputError("NMF needs a non-negative matrix; clip it (np.maximum(0, V)) first")
    if not 1 <= k <= min(V.shape):
        raise OptionError(f"the number of factors must be between 1 and {min(V.shape)} for a {V.shape} matrix, got {k}")
    W, H = _nndsvda(V, k, np.random.default_rng(seed))
    losses = [_loss(V, W, H)]
    for _ in range(n_iter):
        WtW, WtV = W.T @ W, W.T @ V
        for j in range(k):
            if WtW[j, j] > 0:
                H[j] = np.maximum(0.0, H[j] + (WtV[j] - WtW[j] @ H) / WtW[j, j])
        HHt, VHt = H @ H.T, V @ H.T
        for j in range(k):
            if HHt[j, j] > 0:
                W[:, j] = np.maximum(0.0, W[:, j] + (VHt[:, j] - W @ HHt[:, j]) / HHt[j, j])
        losses.append(_loss(V, W, H))
        if losses[-2] - losses[-1] <= tol * max(losses[0], 1e-300):
            break
    return W, H, np.asarray(losses)


def _loss(V, W, H) -> float:
    R = V - W @ H
    return 0.5 * float(np.vdot(R, R))


def _nndsvda(V, k, rng):
    """NNDSVD initialisation (Boutsidis & Gallopoulos 2008), zeros filled with the mean."""
    U, S, Vt = np.linalg.svd(V, full_matrices=False)
    W, H = np.zeros((V.shape[0], k)), np.zeros((k, V.shape[1]))
    for j in range(k):
        u, v = U[:, j], Vt[j]
        if j == 0:
            u, v = np.abs(u), np.abs(v)
        else:
            up, un, vp, vn = np.maximum(u, 0), np.maximum(-u, 0), np.maximum(v, 0), np.maximum(-v, 0)
            pos = np.linalg.norm(up) * np.linalg.norm(vp)
            neg = np.linalg.norm(un) * np.linalg.norm(vn)
            u, v = (up, vp) if pos >= neg else (un, vn)
            norm = np.linalg.norm(u) * np.linalg.norm(v)
            u, v = (u / np.linalg.norm(u), v / np.linalg.norm(v)) if norm > 0 else (u, v)
            S = S.copy()
            S[j] *= max(pos, neg)
        W[:, j], H[j] = np.sqrt(S[j]) * u, np.sqrt(S[j]) * v
    avg = V.mean()
    # A tiny random part breaks ties between columns that start identical.
    W[W == 0] = avg * (1 + 0.01 * rng.random(int((W == 0).sum())))
    H[H == 0] = avg * (1 + 0.01 * rng.random(int((H == 0).sum())))
    return W, H


def pca(V, k: int):
    """Principal components of the rows of V: (scores (m,k), components (k,n), mean (n,)).

    V ~ mean + scores @ components; components are orthonormal, each signed so that its
    largest-magnitude entry is positive (SVD signs are arbitrary).
    """
    V = np.asarray(V, dtype=np.float64)
    if V.ndim != 2 or V.size == 0:
        raise InputError(f"PCA needs a non-empty 2-D matrix, got shape {V.shape}")
    if not 1 <= k <= min(V.shape):
        raise OptionError(f"the number of factors must be between 1 and {min(V.shape)} for a {V.shape} matrix, got {k}")
    mean = V.mean(axis=0)
    U, S, Vt = np.linalg.svd(V - mean, full_matrices=False)
    comps, scores = Vt[:k].copy(), U[:, :k] * S[:k]
    sign = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    sign[sign == 0] = 1.0
    return scores * sign, comps * sign[:, None], mean


# ----------------------------------------------------------------------------- class attributions


def class_attributions(explainer, x, layer: str, classes, method: str = "input_x_gradient",
                       channel_axis: int = 1, shares=None, output=None, probability: bool = False,
                       label: str | None = "factorize: class attributions", **options):
    """Spatial attribution of each class to `layer` for one sample x.

    Returns maps (n_classes, *spatial): the layer attribution of each class's logit, summed
    over channels. One explainer run covers many classes: the sample is repeated along the
    batch with one one-hot seed per row. With `shares` (k, C, positions), also returns
    (k, n_classes): each class's attribution split by those per-(channel, position) shares
    (the activation factors' part of each activation). `label`: the progress bar's (on a
    terminal, as `explain`'s; None for none).
    """
    from .runtime import progress

    feeds = explainer.feeds(x)
    plan = explainer.plan(feeds)
    # Each input along its own batch axis (a state shaped (2, N, H) on axis 1); an input
    # without one (a fixed state, a 0-d rate) is the same for every row.
    axes = {k: plan.axis(k) for k in feeds}
    if plan.n(feeds) != 1 or plan.whole:
        raise InputError("attribution factorization explains one sample at a time; pass a single image")
    if plan.axis(layer) != 0:
        where = "no batch axis" if plan.axis(layer) is None else f"its batch on axis {plan.axis(layer)}"
        raise InputError(f"attribution factorization reads layer '{layer}' batch first (N, C, ...); it has {where}: "
                         "choose a layer whose first axis is the batch")
    classes = [int(c) for c in classes]
    if not classes:
        raise OptionError("no classes to attribute; give at least one class")
    shape = explainer.shape(layer, feeds)
    per_row = int(np.prod([d for d in (shape or ())[1:] if isinstance(d, int)] or [1]))
    chunk = int(np.clip((64 << 20) // max(4 * per_row, 1), 1, 256))  # ~64 MB of layer attributions
    # About twenty runs at most, so that a progress bar moves (batches of 8 or more classes
    # keep the explainer's batching efficient).
    chunk = min(chunk, max(8, -(-len(classes) // 20)))
    maps, projected = [], []
    with progress(len(classes), label) as bar:
        for start in range(0, len(classes), chunk):
            rows = classes[start:start + chunk]
            m, p = _attribute_rows(explainer, feeds, axes, rows, layer, method, channel_axis, shares, output,
                                   probability, options)
            maps.append(m)
            projected.append(p)
            bar.update(len(rows))
    maps = np.concatenate(maps)
    return maps if shares is None else (maps, np.concatenate(projected, axis=1))


def _attribute_rows(explainer, feeds, axes, rows, layer, method, channel_axis, shares, output, probability, options):
    """One run: the sample repeated once per class of `rows`, each with its one-hot seed.
    Returns (maps of those classes, their split by `shares` or None)."""
    batch = {k: v if axes[k] is None else np.repeat(v, len(rows), axis=axes[k]) for k, v in feeds.items()}
    attr = explainer.attribute(batch, method=method, target=rows, layer=layer, output=output,
                               probability=probability, **options)
    attr = np.moveaxis(np.asarray(attr, dtype=np.float64), channel_axis, 1)
    if attr.ndim < 3:
        raise InputError(f"layer '{layer}' has shape {attr.shape[1:]}: it has no spatial axes to factorize; "
                         "choose a 4-D (N,C,H,W) or 3-D (N,C,L) tensor")
    flat = attr.reshape(len(rows), attr.shape[1], -1)
    return attr.sum(axis=1), None if shares is None else np.einsum("ncp,kcp->kn", flat, shares)


# ----------------------------------------------------------------------------- factorization


@dataclass
class Factorization:
    """k factors of one image at one layer.

    spatial: (k, *spatial) non-negative maps, each scaled to a maximum of 1; loadings:
    (k, n_classes) the attribution of each class carried by each factor (for `of=attribution`,
    the class's attribution at the factor's peak position); classes: the class indices.
    """

    layer: str
    of: str
    algo: str
    method: str
    classes: list
    spatial: np.ndarray
    loadings: np.ndarray
    maps: np.ndarray = field(repr=False)  # (n_classes, *spatial): each class's attribution
    error: float = 0.0  # relative reconstruction error of the factorized matrix

    def ranked(self, labels=None, top: int = 5) -> list[list[dict]]:
        """Per factor, the classes it pushes most: [{class, label, loading}], best first."""
        out = []
        for row in self.loadings:
            order = np.argsort(-row, kind="stable")[:top]
            out.append([{"class": self.classes[i], "loading": float(row[i]),
                         **({"label": labels[self.classes[i]]} if labels and 0 <= self.classes[i] < len(labels) else {})}
                        for i in order])
        return out

    def strength(self) -> np.ndarray:
        """(k, *spatial): the attribution each factor carries at each position (brightness)."""
        peak = np.maximum(self.loadings.max(axis=1), 0.0)
        return self.spatial * peak.reshape((-1,) + (1,) * (self.spatial.ndim - 1))

    def to_dict(self, labels=None, top: int = 5) -> dict:
        return {"layer": self.layer, "of": self.of, "algo": self.algo, "method": self.method,
                "factors": len(self.spatial), "classes": len(self.classes),
                "spatial_shape": list(self.spatial.shape[1:]), "relative_error": self.error,
                "ranked": self.ranked(labels, top)}


def select_classes(explainer, x, classes, output=None, probability: bool = False) -> list[int]:
    """'all', 'topN' (the N highest-scoring), an int N (= topN), or a list of class indices."""
    scores = np.asarray(explainer.predict(x, output))
    if scores.ndim != 2:
        raise InputError(f"the explained output has shape {scores.shape[1:]}; factorization needs (N, classes)")
    n = scores.shape[1]
    if isinstance(classes, str):
        text = classes.strip().lower()
        m = re.fullmatch(r"top(\d+)", text)
        if text == "all":
            return list(range(n))
        if not m:
            raise OptionError(f"classes '{classes}' must be 'all', 'topN' (e.g. top50) or a list of indices")
        classes = int(m.group(1))
    if isinstance(classes, (int, np.integer)):
        if classes < 1:
            raise OptionError(f"classes top{classes}: give at least one class")
        return [int(c) for c in np.argsort(-scores[0], kind="stable")[:min(int(classes), n)]]
    out = [int(c) for c in classes]
    bad = [c for c in out if not 0 <= c < n]
    if bad or not out:
        raise OptionError(f"classes {bad or out} out of range: the output has {n} classes")
    return out


def factorize(explainer, x, layer: str | None = None, k: int = 2, classes="top50", of: str = "attribution",
              algo: str = "nmf", method: str = "input_x_gradient", channel_axis: int = 1, seed: int = 0,
              output=None, probability: bool = False, **options) -> Factorization:
    """Factorize the class attributions (or the activations) of one sample at `layer`.

    of='attribution': A = max(0, class maps) (positions x classes), as Building Blocks did
    (NMF; PCA takes the signed A). of='activation': the activations (positions x channels)
    are factorized, and each factor's classes are its share of every class's attribution.
    """
    if algo not in ALGOS:
        raise OptionError(f"algo '{algo}' must be one of: {', '.join(ALGOS)}")
    if of not in OF:
        raise OptionError(f"of '{of}' must be one of: {', '.join(OF)}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise OptionError(f"factors must be a positive integer, got {k!r}")
    layer = layer or default_layer(explainer)
    if layer not in set(explainer.graph.tensor_names()):
        raise OptionError(f"unknown layer '{layer}'; `onnxplain inspect MODEL` lists the model's tensors")
    feeds = explainer.feeds(x)
    chosen = select_classes(explainer, feeds, classes, output, probability)
    common = dict(method=method, channel_axis=channel_axis, output=output, probability=probability, **options)

    if of == "attribution":
        maps = class_attributions(explainer, feeds, layer, chosen, **common)
        spatial_shape = maps.shape[1:]
        A = maps.reshape(len(chosen), -1).T  # positions x classes
        W, H, err = _reduce(A, k, algo, seed)
        # Spatial factors scaled to a maximum of 1: a loading is then the class's
        # attribution at the factor's peak position.
        peak = np.where(W.max(axis=0) > 0, W.max(axis=0), 1.0)
        W, H = W / peak, H * peak[:, None]
        loadings = H
    else:
        acts = np.moveaxis(explainer.forward(feeds, [layer])[layer].astype(np.float64), channel_axis, 1)[0]
        if acts.ndim < 2:
            raise InputError(f"layer '{layer}' has no spatial axes to factorize; choose a 4-D (N,C,H,W) tensor")
        spatial_shape = acts.shape[1:]
        V = acts.reshape(acts.shape[0], -1).T  # positions x channels
        W, Hc, err = _reduce(V, k, algo, seed)
        peak = np.where(np.abs(W).max(axis=0) > 0, np.abs(W).max(axis=0), 1.0)
        W, Hc = W / peak, Hc * peak[:, None]
        # Each factor's share of each activation; what no factor explains is left out.
        parts = np.maximum(W.T[:, None, :] * Hc[:, :, None], 0.0)  # (k, C, positions)
        total = parts.sum(axis=0, keepdims=True)
        shares = np.divide(parts, total, out=np.zeros_like(parts), where=total > 1e-12)
        maps, loadings = class_attributions(explainer, feeds, layer, chosen, shares=shares, **common)
    order = np.argsort(-np.linalg.norm(np.maximum(W, 0), axis=0) * np.linalg.norm(loadings, axis=1), kind="stable")
    spatial = np.maximum(W[:, order], 0.0).T.reshape((k,) + tuple(spatial_shape))
    return Factorization(layer, of, algo, method, chosen, spatial, loadings[order], maps, err)


def _reduce(V, k, algo, seed):
    """(W, H, relative error) of V ~ W H; NMF factorizes max(0, V)."""
    if not 1 <= k <= min(V.shape):
        raise OptionError(f"cannot take {k} factors from a {V.shape[0]} positions x {V.shape[1]} matrix; "
                          f"choose at most {min(V.shape)} factors (or more classes)")
    if algo == "nmf":
        V = np.maximum(V, 0.0)
        W, H, _ = nmf(V, k, seed=seed)
        R = V - W @ H
    else:
        W, H, mean = pca(V, k)
        R = V - mean - W @ H
    norm = np.linalg.norm(V)
    return W, H, float(np.linalg.norm(R) / norm) if norm > 0 else 0.0


def default_layer(explainer) -> str:
    """A mid-late block output, as Building Blocks took GoogLeNet's mixed4d: among the 4-D
    tensors at the second-smallest spatial size of the network (EfficientNet-Lite0: 14x14),
    the last residual Add/Sum or Concat output (followed through an activation function
    that alone consumes it); else the last activation-function output; else the last
    4-D tensor. With a single spatial size, that size is taken."""
    g = explainer.graph
    name, shape = next(iter(explainer.inputs.items()))
    if shape is None or len(shape) != 4:
        raise OptionError("the model has no image-shaped input to choose a default layer for; give --layer")
    concrete = tuple(d if isinstance(d, int) else 1 for d in shape)
    if not all(isinstance(d, int) for d in shape[2:]):
        concrete = concrete[:2] + (224, 224)
    sg = g.specialize({name: concrete})
    tensors, consumers = [], {}
    for node in sg.nodes:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
        for o in node.output:
            s = sg.shape(o) if o else None
            if s and len(s) == 4 and all(isinstance(d, int) for d in s[2:]) and s[2] * s[3] > 1:
                tensors.append((o, node.op_type, s[2] * s[3]))
    if not tensors:
        raise OptionError("the model has no 4-D tensor with spatial extent; give --layer")
    sizes = sorted({t[2] for t in tensors})
    at_size = [t for t in tensors if t[2] == (sizes[1] if len(sizes) > 1 else sizes[0])]
    blocks = [t[0] for t in at_size if t[1] in ("Add", "Sum", "Concat")]
    if blocks:
        after = consumers.get(blocks[-1], [])
        if len(after) == 1 and after[0].op_type in ACTIVATION_OPS:
            return after[0].output[0]
        return blocks[-1]
    acts = [t for t in at_size if t[1] in ACTIVATION_OPS]
    return (acts or at_size)[-1][0]


# ----------------------------------------------------------------------------- the picture


def hues(k: int) -> np.ndarray:
    """k distinct RGB colours in [0, 1]: Building Blocks' blue and orange first."""
    if k <= len(HUES):
        return np.asarray(HUES[:k], dtype=np.float64)
    return np.asarray([colorsys.hsv_to_rgb((0.6 + i / k) % 1.0, 0.85, 1.0) for i in range(k)])


def picture(f: Factorization, image=None, size=None, clip_percentile: float = 99.0) -> np.ndarray:
    """The factor picture: each position coloured by the mix of its factors' hues, with
    brightness = the attribution the factors carry there; upsampled to the image (or
    `size`) and laid over a dimmed grey copy of it. uint8 HxWx3."""
    from PIL import Image

    s = f.strength()
    if s.ndim == 2:  # a 1-D layer: draw it as one row
        s = s[:, None, :]
    s = np.maximum(s, 0.0)
    total = s.sum(axis=0)
    colour = np.einsum("khw,kc->hwc", s, hues(len(s))) / np.where(total > 0, total, 1.0)[..., None]
    top = np.percentile(total, clip_percentile)
    mag = np.clip(total / (top if top > 0 else 1.0), 0.0, 1.0)
    if image is not None:
        img = np.asarray(image)
        if img.dtype != np.uint8 or img.ndim not in (2, 3):
            raise InputError(f"the image to draw on must be uint8 HxW or HxWx3, got {img.dtype} {img.shape}")
        h, w = img.shape[:2]
    else:
        (h, w), img = (size or (224, 224)), None

    def up(a):
        return np.asarray(Image.fromarray(a.astype(np.float32)).resize((w, h), Image.BILINEAR), dtype=np.float64)

    colour = np.stack([up(colour[..., c]) for c in range(3)], axis=-1)
    mag = np.clip(up(mag), 0.0, 1.0)[..., None]
    if img is None:
        out = colour * mag
    else:
        grey = (img if img.ndim == 2 else img[..., :3].mean(axis=2)).astype(np.float64) / 255.0
        base = 0.35 * grey[..., None] + 0.05
        out = (1.0 - mag) * base + mag * colour
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
