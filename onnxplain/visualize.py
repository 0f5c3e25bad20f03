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
    # matplotlib's seismic: dark blue, blue, white, red, dark red.
    "seismic": [(0.0, (0, 0, 0.3)), (0.25, (0, 0, 1)), (0.5, (1, 1, 1)), (0.75, (1, 0, 0)), (1.0, (0.5, 0, 0))],
    # Zennit's one-sided maps: black through red/yellow to white, its cold twin, white to a colour.
    "hot": [(0.0, (0, 0, 0)), (1 / 3, (1, 0, 0)), (2 / 3, (1, 1, 0)), (1.0, (1, 1, 1))],
    "cold": [(0.0, (0, 0, 0)), (1 / 3, (0, 0, 1)), (2 / 3, (0, 1, 1)), (1.0, (1, 1, 1))],
    "wred": [(0.0, (1, 1, 1)), (1.0, (1, 0, 0))],
    "wblue": [(0.0, (1, 1, 1)), (1.0, (0, 0, 1))],
}
DIVERGING = ("bwr", "coldnhot", "seismic")
SEQUENTIAL = ("inferno", "jet", "gray", "hot", "cold", "wred", "wblue")
SIGNS = ("all", "positive", "negative", "absolute")
VIEWS = ("overlay", "heatmap", "side-by-side")
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
    t, mag, symmetric, _ = _scaled(attr2d, symmetric, clip_percentile)
    return t, mag, symmetric


def _scaled(attr2d, symmetric, clip_percentile):
    """_scale, and the values at the colormap's bottom and top."""
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
        return np.clip(a / top, -1.0, 1.0) * 0.5 + 0.5, mag, True, (-top, top)
    hi = float(np.percentile(a, q))
    # A non-negative map far from zero everywhere (RISE's mean scores, Score-CAM) is drawn
    # over its range: on [0, max] it would be one colour.
    offset = a.min() > 0.25 * a.max()
    lo = 0.0 if a.min() >= 0 and not offset else float(np.percentile(a, 100.0 - q))
    span = _positive_or(hi - lo, a.max() - lo)
    t = np.clip((a - lo) / span, 0.0, 1.0)
    return t, t, False, (lo, lo + span)


def scale_range(attr2d, symmetric: bool | None = None, clip_percentile: float | None = 99.5):
    """(value at the colormap's bottom, value at its top, symmetric) as heatmap draws the map."""
    _, _, symmetric, (lo, hi) = _scaled(attr2d, symmetric, clip_percentile)
    return lo, hi, symmetric


def with_sign(attr2d, sign: str = "all"):
    """The map to draw for `sign` (Captum's visualize_image_attr): 'all' keeps both signs
    (a diverging map around zero), 'positive' and 'negative' keep one sign's magnitude,
    'absolute' |a|; returns (map, symmetric or None to decide by the values)."""
    a = np.asarray(attr2d, dtype=np.float64)
    if sign == "all":
        return a, None
    if sign == "positive":
        return np.maximum(a, 0.0), False
    if sign == "negative":
        return np.maximum(-a, 0.0), False
    if sign == "absolute":
        return np.abs(a), False
    raise OptionError(f"unknown sign '{sign}'; choose one of {', '.join(SIGNS)}")


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
        img = np.repeat((0.7 * grey + 0.3 * 255.0)[..., None], 3, axis=2)
    elif background != "photo":
        raise OptionError(f"overlay background must be 'photo' or 'gray', got {background!r}")
    if not 0.0 <= alpha <= 1.0:
        raise OptionError(f"alpha must be in [0, 1], got {alpha!r}")
    t, mag, symmetric = _scale(attr2d, symmetric, clip_percentile)
    colours = _lut(cmap, symmetric)[_index(t)]
    h, w = img.shape[:2]
    colours = np.asarray(Image.fromarray(colours).resize((w, h), Image.BILINEAR), dtype=np.float64)
    # Blended in proportion to the value (|relevance| of a signed map), its square root so
    # that weak relevance still shows: the photo shows through where the map is low, and
    # a CAM is no longer an opaque sheet over it.
    weight = np.asarray(Image.fromarray(mag.astype(np.float32)).resize((w, h), Image.BILINEAR))
    weight = alpha * np.sqrt(np.clip(weight, 0.0, 1.0))
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


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _label(v: float) -> str:
    return "0" if v == 0 else f"{v:+.3g}" if v < 0 else f"{v:.3g}"


def colorbar(height: int, cmap=None, symmetric: bool = True, vmin: float = -1.0, vmax: float = 1.0,
             caption: str = "relevance", width: int = 16) -> np.ndarray:
    """A vertical colour bar (top = vmax) with its values at the ends (and 0 for a signed
    map) and a caption turned along it: what the colours mean."""
    lut = _lut(cmap, symmetric)
    strip = lut[_index(np.linspace(1.0, 0.0, height))][:, None, :].repeat(width, axis=1)
    font = _font(max(10, height // 22))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    ticks = [(0, vmax), (height - 1, vmin)] + ([(height // 2, 0.0)] if symmetric else [])
    text_w = max(probe.textbbox((0, 0), _label(v), font=font)[2] for _, v in ticks)
    cap = Image.new("RGB", (height, probe.textbbox((0, 0), "Ag", font=font)[3] + 4), (255, 255, 255))
    cd = ImageDraw.Draw(cap)
    text = _fit(cd, caption, font, height)
    left, _, right, _ = cd.textbbox((0, 0), text, font=font)
    cd.text(((height - (right - left)) // 2, 1), text, fill=(0, 0, 0), font=font)
    cap = cap.rotate(90, expand=True)
    canvas = Image.new("RGB", (6 + width + 4 + text_w + 4 + cap.size[0], height), (255, 255, 255))
    canvas.paste(Image.fromarray(np.ascontiguousarray(strip)), (6, 0))
    d = ImageDraw.Draw(canvas)
    d.rectangle((6, 0, 6 + width - 1, height - 1), outline=(80, 80, 80))
    for y, v in ticks:
        top, bottom = d.textbbox((0, 0), _label(v), font=font)[1::2]
        ty = min(max(0, y - (bottom - top) // 2 - top), height - bottom)
        d.line((6 + width, y, 6 + width + 3, y), fill=(0, 0, 0))
        d.text((6 + width + 5, ty), _label(v), fill=(0, 0, 0), font=font)
    canvas.paste(cap, (6 + width + 4 + text_w + 4, 0))
    return np.asarray(canvas)


def decorate(picture, title: str | None = None, bar: np.ndarray | None = None, min_side: int = 224) -> np.ndarray:
    """A picture with a title above and a colour bar beside it, enlarged (pixels kept sharp)
    to at least `min_side` so a 32x32 input stays readable."""
    img = Image.fromarray(_as_rgb(picture))
    if min(img.size) < min_side:
        k = math.ceil(min_side / min(img.size))
        img = img.resize((img.size[0] * k, img.size[1] * k), Image.NEAREST)
    if bar is not None and bar.shape[0] != img.size[1]:
        raise OptionError("a colour bar must be as tall as its picture")
    pad = 6
    bar_w = bar.shape[1] if bar is not None else 0
    width = img.size[0] + bar_w + 2 * pad
    font = _font(max(11, img.size[1] // 20))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_h = probe.textbbox((0, 0), "Ag", font=font)[3] + 6 if title else 0
    canvas = Image.new("RGB", (width, img.size[1] + title_h + 2 * pad), (255, 255, 255))
    canvas.paste(img, (pad, pad + title_h))
    if bar is not None:
        canvas.paste(Image.fromarray(np.ascontiguousarray(bar)), (pad + img.size[0], pad + title_h))
    if title:
        d = ImageDraw.Draw(canvas)
        d.text((pad, pad), _fit(d, title, font, width - 2 * pad), fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def _caption(sign: str, symmetric: bool, cmap) -> str:
    if symmetric:
        if cmap in (None, "bwr", "seismic"):
            return "relevance: red for the class, blue against"
        return "relevance: warm for the class, cold against"
    return {"positive": "positive relevance (for the class)", "negative": "negative relevance (against the class)",
            "absolute": "|relevance|"}.get(sign, "relevance")


def picture(attr, image=None, layout: str | None = "nchw", how: str = "sum", cmap=None,
            symmetric: bool | None = None, clip_percentile: float | None = 99.5, alpha: float = 0.6,
            sign: str = "all", view: str = "overlay", title: str | None = None, bar: bool = True,
            annotate=None) -> np.ndarray:
    """One sample's attribution as the picture a person reads: the heatmap over the photo
    (view 'overlay'), alone ('heatmap') or photo | heatmap | overlay ('side-by-side'),
    with a title and a colour bar that says what the colours mean. `annotate`, if given,
    draws on the bare picture (a PIL image) before the title and bar are added."""
    if view not in VIEWS:
        raise OptionError(f"unknown view '{view}'; choose one of {', '.join(VIEWS)}")
    a2d, auto = with_sign(reduce_channels(attr, layout=layout, how=how), sign)
    symmetric = auto if symmetric is None else symmetric
    vmin, vmax, symmetric = scale_range(a2d, symmetric, clip_percentile)
    hm = heatmap(a2d, cmap=cmap, symmetric=symmetric, clip_percentile=clip_percentile)
    if image is None or view == "heatmap":
        pic = hm
        if image is not None:
            pic = np.asarray(Image.fromarray(hm).resize(_as_rgb(image).shape[1::-1], Image.NEAREST))
    else:
        over = overlay(image, a2d, alpha=alpha, cmap=cmap, symmetric=symmetric, background="gray",
                       clip_percentile=clip_percentile)
        pic = over
        if view == "side-by-side":
            img = _as_rgb(image)
            big = np.asarray(Image.fromarray(hm).resize(img.shape[1::-1], Image.NEAREST))
            pic = np.concatenate([img, np.full((img.shape[0], 4, 3), 255, np.uint8), big,
                                  np.full((img.shape[0], 4, 3), 255, np.uint8), over], axis=1)
    if annotate is not None:
        pic = np.asarray(annotate(Image.fromarray(pic)).convert("RGB"))
    if not bar and title is None:
        return pic
    side = max(224, min(pic.shape[:2]))
    k = math.ceil(side / min(pic.shape[:2]))
    height = pic.shape[0] * k
    cbar = colorbar(height, cmap, symmetric, vmin, vmax, _caption(sign, symmetric, cmap)) if bar else None
    return decorate(pic, title, cbar, min_side=side)


def save_heatmap(path, attr, image=None, layout: str | None = "nchw", how: str = "sum", cmap=None,
                 symmetric: bool | None = None, clip_percentile: float | None = 99.5,
                 alpha: float = 0.6, sign: str = "all", view: str = "overlay", title: str | None = None,
                 bar: bool = False, annotate=None) -> np.ndarray:
    """Reduce one sample's attribution to (H,W), draw it (over ``image`` if given), write a PNG.

    With ``bar`` (or a ``title``) the picture gets a colour bar and a title (see
    `picture`); without, it is the bare map at the input's size."""
    pic = picture(attr, image=image, layout=layout, how=how, cmap=cmap, symmetric=symmetric,
                  clip_percentile=clip_percentile, alpha=alpha, sign=sign, view=view, title=title, bar=bar,
                  annotate=annotate)
    save_png(path, pic)
    return pic
