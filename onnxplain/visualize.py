"""Pictures of attributions: colormaps, heatmaps, overlays on the input, comparison grids.

Signed relevance (LRP, gradients) is scaled symmetrically around zero and drawn with
a diverging map, so that zero always has the same colour and the two signs are
comparable; non-negative maps (saliency, CAM) use [0, max] and a sequential map.
The top of the range is a high percentile, not the maximum, because a few extreme
pixels would otherwise wash out the rest of the map.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from onnxplain.errors import InputError, OptionError

# Anchor colours (position in [0, 1], RGB in [0, 1]); LUTs interpolate linearly between them.
_ANCHORS = {
    "coldnhot": [(0.0, (0, 1, 1)), (0.25, (0, 0, 1)), (0.5, (0, 0, 0)), (0.75, (1, 0, 0)), (1.0, (1, 1, 0))],
    "bwr": [(0.0, (0, 0, 1)), (0.5, (1, 1, 1)), (1.0, (1, 0, 0))],
    # Points of the perceptually uniform 'inferno' map at tenths of its range.
    "inferno": [(i / 10, tuple(int(h[j:j + 2], 16) / 255 for j in (0, 2, 4))) for i, h in enumerate(
        ["000004", "160b39", "420a68", "6a176e", "932667", "bc3754",
         "dd513a", "f37819", "fca50a", "f6d746", "fcffa4"])],
    "jet": [(0.0, (0, 0, 0.5)), (0.125, (0, 0, 1)), (0.375, (0, 1, 1)), (0.625, (1, 1, 0)),
            (0.875, (1, 0, 0)), (1.0, (0.5, 0, 0))],
    "gray": [(0.0, (0, 0, 0)), (1.0, (1, 1, 1))],
}
DIVERGING = ("bwr", "coldnhot")
SEQUENTIAL = ("inferno", "jet", "gray")
_LUTS: dict[str, np.ndarray] = {}
# 256 entries have no middle one, so entry 128 is placed exactly at 0.5 (128 steps below,
# 127 above): zero relevance then gets exactly the diverging map's zero colour.
_POSITIONS = np.concatenate([np.arange(128) / 256, 0.5 + np.arange(128) / 254])


def _index(t: np.ndarray) -> np.ndarray:
    """LUT index of colormap positions t in [0, 1] (the inverse of _POSITIONS)."""
    low, high = np.rint(t * 256), 128 + np.rint((t - 0.5) * 254)
    return np.where(t <= 0.5, low, high).astype(np.intp)


def colormap(name: str) -> np.ndarray:
    """The 256x3 uint8 lookup table of a named colormap."""
    if name not in _ANCHORS:
        raise OptionError(f"unknown colormap '{name}'; choose one of {', '.join(DIVERGING + SEQUENTIAL)}")
    if name not in _LUTS:
        pos = np.array([p for p, _ in _ANCHORS[name]])
        rgb = np.array([c for _, c in _ANCHORS[name]], dtype=np.float64)
        lut = np.stack([np.interp(_POSITIONS, pos, rgb[:, k]) for k in range(3)], axis=1)
        _LUTS[name] = np.rint(lut * 255).astype(np.uint8)
    return _LUTS[name].copy()


def _lut(cmap, symmetric: bool) -> np.ndarray:
    if cmap is None:
        return colormap(DIVERGING[0] if symmetric else SEQUENTIAL[0])
    if isinstance(cmap, str):
        return colormap(cmap)
    lut = np.asarray(cmap)
    if lut.shape != (256, 3) or lut.dtype != np.uint8:
        raise OptionError(f"a colormap must be a name or a 256x3 uint8 table, got {lut.dtype} {lut.shape}")
    return lut


def reduce_channels(attr, layout: str | None = "nchw", how: str = "sum") -> np.ndarray:
    """One sample's (C,H,W) or (H,W,C) attribution as an (H,W) map; (H,W) passes through.

    ``how``: 'sum' keeps the sign (relevance is additive over channels), 'abs_max' is
    Simonyan's saliency, 'norm' the L2 norm over channels.
    """
    a = np.asarray(attr, dtype=np.float64)
    while a.ndim > 3 and a.shape[0] == 1:  # a batch of one
        a = a[0]
    if a.ndim == 2:
        return a
    if a.ndim != 3:
        raise InputError(f"cannot draw an attribution of shape {np.shape(attr)}; pass one sample "
                         "shaped (C,H,W), (H,W,C) or (H,W), or save it as .npy")
    if layout not in ("nchw", "nhwc", None):
        raise OptionError(f"layout must be 'nchw', 'nhwc' or None (guess), got {layout!r}")
    channel_last = layout == "nhwc" if layout is not None else _channel_last(a.shape)
    axis = 2 if channel_last else 0
    if how == "sum":
        return a.sum(axis=axis)
    if how == "abs_max":
        return np.abs(a).max(axis=axis)
    if how == "norm":
        return np.sqrt((a * a).sum(axis=axis))
    raise OptionError(f"unknown channel reduction '{how}'; choose one of sum, abs_max, norm")


def _channel_last(shape) -> bool:
    # The two spatial axes are usually equal; otherwise channels are the short axis.
    if shape[1] == shape[2] != shape[0]:
        return False
    if shape[0] == shape[1] != shape[2]:
        return True
    return shape[2] <= 4 < shape[0]


def _scale(attr2d, symmetric, clip_percentile):
    """Map an (H,W) attribution to [0, 1] colormap positions, plus |relevance| in [0, 1]."""
    a = np.asarray(attr2d, dtype=np.float64)
    if a.ndim != 2:
        raise InputError(f"a heatmap needs an (H,W) map, got shape {a.shape}; use reduce_channels first")
    if a.size == 0:
        raise InputError("cannot draw an empty attribution map")
    if not np.isfinite(a).all():
        raise InputError("attribution contains NaN or Inf and cannot be drawn; check the model and method")
    q = 100.0 if clip_percentile is None else float(clip_percentile)
    if not 0.0 < q <= 100.0:
        raise OptionError(f"clip_percentile must be in (0, 100], got {clip_percentile!r}")
    if symmetric is None:
        symmetric = bool(a.min() < 0)
    if symmetric:
        top = _positive_or(np.percentile(np.abs(a), q), np.abs(a).max())
        mag = np.clip(np.abs(a) / top, 0.0, 1.0)
        return np.clip(a / top, -1.0, 1.0) * 0.5 + 0.5, mag, True
    lo = 0.0 if a.min() >= 0 else float(np.percentile(a, 100.0 - q))
    hi = float(np.percentile(a, q))
    span = _positive_or(hi - lo, a.max() - lo)
    t = np.clip((a - lo) / span, 0.0, 1.0)
    return t, t, False


def _positive_or(value, fallback) -> float:
    # An all-zero (or nearly constant) map must give a flat picture, never a division by zero.
    for v in (value, fallback):
        if v > 0 and math.isfinite(v):
            return float(v)
    return 1.0


def heatmap(attr2d, cmap=None, symmetric: bool | None = None, clip_percentile: float | None = 99.5) -> np.ndarray:
    """An (H,W) attribution as a uint8 HxWx3 picture.

    ``symmetric`` (default: the map has negative values) scales by the ``clip_percentile``
    of |relevance| so that 0 sits at the colormap's centre, with a diverging map by default;
    otherwise [0, max] with a sequential map.
    """
    t, _, symmetric = _scale(attr2d, symmetric, clip_percentile)
    return _lut(cmap, symmetric)[_index(t)]


def overlay(image, attr2d, alpha: float = 0.5, cmap=None, symmetric: bool | None = None,
            clip_percentile: float | None = 99.5, background: str = "photo") -> np.ndarray:
    """The heatmap blended over a uint8 image, resized to it; the result has the image's shape.

    Signed maps are blended in proportion to |relevance|, so the photo shows through
    where the relevance is near zero instead of being tinted by the zero colour.
    background="gray" draws on a faded grey copy of the photo, where the colours of
    sparse pixel-level relevance stand out.
    """
    img = _as_rgb(image)
    if background == "gray":
        grey = img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        img = np.repeat((0.45 * grey + 0.55 * 255.0)[..., None], 3, axis=2)
    elif background != "photo":
        raise OptionError(f"overlay background must be 'photo' or 'gray', got {background!r}")
    if not 0.0 <= alpha <= 1.0:
        raise OptionError(f"alpha must be in [0, 1], got {alpha!r}")
    t, mag, symmetric = _scale(attr2d, symmetric, clip_percentile)
    colours = _lut(cmap, symmetric)[_index(t)]
    h, w = img.shape[:2]
    colours = np.asarray(Image.fromarray(colours).resize((w, h), Image.BILINEAR), dtype=np.float64)
    weight = np.full((h, w), alpha)
    if symmetric:
        weight = alpha * np.asarray(Image.fromarray(mag.astype(np.float32)).resize((w, h), Image.BILINEAR))
        weight = np.clip(weight, 0.0, 1.0)
    out = (1.0 - weight[..., None]) * img + weight[..., None] * colours
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _as_rgb(image) -> np.ndarray:
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise InputError(f"an image to draw on must be uint8, got {img.dtype}; convert it to 0-255 first")
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise InputError(f"an image to draw on must be HxW or HxWx3, got shape {img.shape}")
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return img[..., :3]


def save_png(path, rgb_uint8) -> Path:
    path = Path(path)
    img = _as_rgb(rgb_uint8)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(img)).save(path, format="PNG")
    except OSError as exc:
        raise InputError(f"cannot write {path} ({exc}); check that the directory is writable") from None
    return path


def grid(images, titles=None, ncols: int | None = None, pad: int = 4) -> np.ndarray:
    """Tile pictures (resized to the first one's size) on white, with a title above each."""
    tiles = [_as_rgb(im) for im in images]
    if not tiles:
        raise InputError("grid needs at least one picture")
    if titles is not None and len(titles) != len(tiles):
        raise OptionError(f"grid got {len(tiles)} pictures but {len(titles)} titles; give one title each")
    h, w = tiles[0].shape[:2]
    tiles = [t if t.shape[:2] == (h, w) else np.asarray(Image.fromarray(t).resize((w, h), Image.BILINEAR))
             for t in tiles]
    n = len(tiles)
    ncols = max(1, min(n, ncols or (n if n <= 6 else math.ceil(math.sqrt(n)))))
    nrows = math.ceil(n / ncols)
    font = ImageFont.load_default()
    title_h = 0
    if titles:
        top, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), "Ag", font=font)[1::2]
        title_h = bottom - top + pad
    cell_w, cell_h = w + pad, h + title_h + pad
    canvas = Image.new("RGB", (ncols * cell_w + pad, nrows * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, tile in enumerate(tiles):
        x, y = pad + (i % ncols) * cell_w, pad + (i // ncols) * cell_h
        if titles:
            text = _fit(draw, str(titles[i]), font, w)
            left, top, right, _ = draw.textbbox((0, 0), text, font=font)
            draw.text((x + (w - (right - left)) // 2 - left, y - top), text, fill=(0, 0, 0), font=font)
        canvas.paste(Image.fromarray(tile), (x, y + title_h))
    return np.asarray(canvas)


def _fit(draw, text, font, width) -> str:
    def wide(s):
        left, _, right, _ = draw.textbbox((0, 0), s, font=font)
        return right - left > width
    if not wide(text):
        return text
    while text and wide(text + "..."):
        text = text[:-1]
    return text + "..."


def save_heatmap(path, attr, image=None, layout: str | None = "nchw", how: str = "sum", cmap=None,
                 symmetric: bool | None = None, clip_percentile: float | None = 99.5,
                 alpha: float = 0.8) -> np.ndarray:
    """Reduce one sample's attribution to (H,W), draw it (over ``image`` if given), write a PNG."""
    a2d = reduce_channels(attr, layout=layout, how=how)
    if image is None:
        picture = heatmap(a2d, cmap=cmap, symmetric=symmetric, clip_percentile=clip_percentile)
    else:
        picture = overlay(image, a2d, alpha=alpha, cmap=cmap, symmetric=symmetric, background="gray",
                          clip_percentile=clip_percentile)
    save_png(path, picture)
    return picture
