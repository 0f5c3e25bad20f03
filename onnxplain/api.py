"""The public helpers for images and pictures: `load_image` (the model's preprocessing, as
the CLI applies it), `heatmap` and `overlay` (arrays), `save` (a PNG picture with title and
colour bar, or the array itself as .npy/.npz)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import OptionError
from .io import ARRAY_SUFFIXES, Preprocess, load_inputs, save_array
from .visualize import heatmap as _heatmap
from .visualize import overlay as _overlay
from .visualize import reduce_channels, save_heatmap

__all__ = ["load_image", "heatmap", "overlay", "save"]


def load_image(paths, model=None, preprocess: Preprocess | str | None = None):
    """(x, image): the model's input batch from image file(s) and the uint8 HxWx3 picture(s)
    at the model's resolution to draw on (one array for one path, a list for several).

    `model` (a path or an Explainer) supplies the preprocessing as the CLI finds it: the
    model's metadata, else what its input shape implies. `preprocess` overrides it: a preset
    name ('imagenet', ...) or a Preprocess.
    """
    from .explainer import Explainer

    one = isinstance(paths, (str, Path))
    files = [Path(paths)] if one else [Path(p) for p in paths]
    explainer = model if isinstance(model, Explainer) or model is None else Explainer(model)
    shape = None
    pre = Preprocess.preset(preprocess) if isinstance(preprocess, str) else preprocess
    if explainer is not None:
        shapes = list(explainer.inputs.values())
        shape = shapes[0] if len(shapes) == 1 else None
        if pre is None:
            meta = explainer.preprocess_metadata()
            pre = Preprocess.from_metadata(meta) if meta else None
    batch = load_inputs(files, pre, shape)
    return batch.batch, (batch.images[0] if one else batch.images)


def _two_d(attr, layout):
    a = np.asarray(attr)
    return a if a.ndim == 2 else reduce_channels(a, layout=layout)


def heatmap(attr, cmap=None, layout: str | None = "nchw", clip_percentile: float | None = 99.5) -> np.ndarray:
    """One sample's attribution ((C,H,W), (H,W,C) or (H,W)) as a uint8 HxWx3 heatmap."""
    return _heatmap(_two_d(attr, layout), cmap=cmap, clip_percentile=clip_percentile)


def overlay(image, attr, alpha: float = 0.6, cmap=None, layout: str | None = "nchw",
            clip_percentile: float | None = 99.5) -> np.ndarray:
    """One sample's attribution blended over a uint8 image (the photo shows through where the
    relevance is low)."""
    return _overlay(image, _two_d(attr, layout), alpha=alpha, cmap=cmap, clip_percentile=clip_percentile)


def save(path, attr, image=None, title: str | None = None, bar: bool = True, **look) -> Path:
    """Write an attribution: .npy/.npz as the array (a dict of arrays in a .npz), .png as
    the picture of one sample -- over `image` if given, with `title` and a colour bar unless
    bar=False; `look` takes visualize.picture's options (cmap, sign, view, alpha,
    clip_percentile, layout)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in ARRAY_SUFFIXES:
        return Path(save_array(path, attr))
    if suffix != ".png":
        raise OptionError(f"cannot write '{path.name}': save writes .png, .npy or .npz")
    a = attr
    if isinstance(a, dict):
        raise OptionError("several attributions (a dict): save them as .npz, or pick one to draw")
    a = np.asarray(a)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    save_heatmap(path, a, image=image, title=title, bar=bar or title is not None, **look)
    return path
