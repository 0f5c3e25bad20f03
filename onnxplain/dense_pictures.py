"""Pictures of dense targets, drawn with pillow on the heatmaps of `visualize`: the explained
detection's box (the other detections faint), a region's or mask's outline, and a time-axis
plot of a sequence output's explained frames.

`annotate(path, target, image_size, sample)` draws on a PNG `visualize.save_heatmap` wrote,
scaling from the model input's pixels to the picture's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

EXPLAINED = (0, 255, 0)
OTHERS = (255, 255, 255)


def _scaled(box, image_size, picture_size):
    h, w = image_size
    pw, ph = picture_size
    sx, sy = pw / w, ph / h
    x1, y1, x2, y2 = box
    return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)


def draw_detections(img, chosen, others, image_size, labels=None):
    """The chosen detection's box (bright, labelled with class and score) and the others
    (faint) on a pillow image of the input's aspect."""
    from PIL import ImageDraw

    base = img.convert("RGBA")
    layer = ImageDraw.Draw(base, "RGBA")
    width = max(1, round(min(base.size) / 100))
    for d in others:
        layer.rectangle(_scaled(d.box, image_size, base.size), outline=OTHERS + (110,), width=width)
    x1, y1, x2, y2 = _scaled(chosen.box, image_size, base.size)
    layer.rectangle((x1, y1, x2, y2), outline=EXPLAINED + (255,), width=width + 1)
    name = labels[chosen.cls] if labels and 0 <= chosen.cls < len(labels) else f"class {chosen.cls}"
    text = f"{name} {chosen.score:.2f}"
    ty = y1 - 11 if y1 >= 11 else y2 + 1
    layer.rectangle((x1, ty, x1 + 6 * len(text) + 2, ty + 10), fill=(0, 0, 0, 170))
    layer.text((x1 + 1, ty - 1), text, fill=EXPLAINED + (255,))
    return base.convert("RGB")


def draw_outline(img, area, color=EXPLAINED):
    """The border pixels of a boolean (H, W) area, scaled to the picture."""
    from PIL import Image

    a = np.asarray(area, bool)
    edge = a & ~(np.pad(a, 1, constant_values=False)[:-2, 1:-1] & np.pad(a, 1, constant_values=False)[2:, 1:-1]
                 & np.pad(a, 1, constant_values=False)[1:-1, :-2] & np.pad(a, 1, constant_values=False)[1:-1, 2:])
    mask = Image.fromarray((edge * 255).astype(np.uint8)).resize(img.size, Image.NEAREST)
    rgb = np.asarray(img.convert("RGB")).copy()
    rgb[np.asarray(mask) > 0] = color
    return Image.fromarray(rgb)


def time_plot(scores, frames, relevance=None, width: int = 640, height: int = 200, title: str = ""):
    """A time-axis plot of a sequence output: the explained score per frame (line), the
    explained frames shaded, and, when given, the per-frame input relevance (bars)."""
    from PIL import Image, ImageDraw

    scores = np.asarray(scores, dtype=np.float64).ravel()
    t = len(scores)
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 40, width - 10, 18, height - 22
    d.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    x = lambda i: left + (right - left) * (i + 0.5) / t  # noqa: E731
    first, last = frames
    d.rectangle((x(first - 0.5), top + 1, x(last + 0.5), bottom - 1), fill=(255, 235, 180))
    if relevance is not None:
        r = np.asarray(relevance, dtype=np.float64).ravel()
        m = np.abs(r).max() or 1.0
        mid = (top + bottom) / 2
        bw = max(1.0, (right - left) / len(r) * 0.8)
        for i, v in enumerate(r):
            xi = left + (right - left) * (i + 0.5) / len(r)
            d.rectangle((xi - bw / 2, min(mid, mid - v / m * (bottom - top) / 2), xi + bw / 2,
                         max(mid, mid - v / m * (bottom - top) / 2)), fill=(200, 60, 60) if v > 0 else (60, 60, 200))
    lo, hi = scores.min(), scores.max()
    span = hi - lo or 1.0
    y = lambda v: bottom - 4 - (bottom - top - 8) * (v - lo) / span  # noqa: E731
    d.line([(x(i), y(v)) for i, v in enumerate(scores)], fill=(0, 0, 0), width=2)
    d.text((left, 3), title or "explained score per frame (shaded: explained frames; bars: input relevance)",
           fill=(0, 0, 0))
    d.text((4, top), f"{hi:.2g}", fill=(0, 0, 0))
    d.text((4, bottom - 10), f"{lo:.2g}", fill=(0, 0, 0))
    for i in sorted({0, t - 1, first, last}):
        d.text((x(i) - 4, bottom + 4), str(i), fill=(0, 0, 0))
    return img


def annotate(path, target, image_size, sample: int = 0, labels=None) -> Path:
    """Draw a resolved detection target's boxes, or a region/mask target's outline, on the
    PNG at `path` (written by visualize.save_heatmap for `sample`)."""
    from PIL import Image

    path = Path(path)
    with Image.open(path) as img:
        img.load()
        if getattr(target, "chosen", None) is not None:
            chosen = target.chosen[sample]
            others = [d for d in target.found[sample] if d is not chosen]
            out = draw_detections(img, chosen, others, image_size, labels)
        elif getattr(target, "box", None) is not None or getattr(target, "mask", None) is not None:
            area = np.zeros(image_size, bool)
            if target.box is not None:
                x1, y1, x2, y2 = target.box
                area[y1:y2, x1:x2] = True
            else:
                area = target.mask
            out = draw_outline(img, area)
        else:
            return path
    out.save(path)
    return path
