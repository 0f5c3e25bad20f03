"""Pictures of dense targets, drawn with pillow on the heatmaps of `visualize`: the explained
detection's box (the other detections faint), a region's or mask's outline, and a time-axis
plot of a sequence output's explained frames.

`annotators` gives, per sample, the callable `visualize.save_heatmap(annotate=...)` draws
with (scaled from the model input's, or the map's, pixels to the picture's overlay panel);
`time_plots` writes the plot beside each picture of a frame target.
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


def _font(size):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pillow < 10.1: one bitmap size
        return ImageFont.load_default()


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
    if min(base.size) < 160:  # a small bare picture is enlarged afterwards: its text would blur (the title says it)
        return base.convert("RGB")
    text = f"{name} {chosen.score:.2f}"
    font = _font(max(8, round(base.height / 28)))
    l, t, r, b = layer.textbbox((0, 0), text, font=font)
    th = b - t + 2
    ty = y1 - th if y1 >= th else y2 + 1
    x1 = min(x1, base.width - (r - l + 2))
    layer.rectangle((x1, ty, x1 + r - l + 2, ty + th), fill=(0, 0, 0, 170))
    layer.text((x1 + 1 - l, ty + 1 - t), text, fill=EXPLAINED + (255,), font=font)
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


def sequence_picture(path, scores, target, attribution=None) -> Path:
    """`path` with a time-axis plot of one sample's sequence output scores (time, classes)
    or (time,): the explained class's score per frame (else each frame's top score), the
    explained frames shaded, and the attribution summed per input frame as bars."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 2:
        s = s[:, target.cls] if target.cls is not None else s.max(axis=1)
    rel = None
    if attribution is not None and np.ndim(attribution) >= 1:
        a = np.asarray(attribution, dtype=np.float64)
        rel = a.reshape(-1, a.shape[-1]).sum(axis=0) if a.ndim > 1 else a
    t = len(s)
    first, last = target.first % t, target.last % t
    what = f"class {target.cls}" if target.cls is not None else "each frame's top class"
    img = time_plot(s, (first, last), rel, title=f"{what} per frame; shaded: {target.describe(0)}; bars: relevance")
    path = Path(path)
    img.save(path)
    return path


def _panel(img, size):
    """(x offset, panel image size) of the picture's overlay: the whole picture, or its last
    panel in the side-by-side view (photo | heatmap | overlay)."""
    h, w = size
    pw = round(img.height * w / h)
    return (img.width - pw, pw) if img.width > 1.5 * pw else (0, img.width)


def _in_panel(draw):
    """An annotator drawing on the overlay panel only, whatever the view."""
    def annotate(img, draw=draw):
        off, pw = _panel(img, draw.size)
        panel = draw(img.crop((off, 0, off + pw, img.height)))
        out = img.copy()
        out.paste(panel, (off, 0))
        return out

    return annotate


def annotators(explainer, x, target, output=None, probability=False, labels=None):
    """One callable per sample for `visualize.save_heatmap(annotate=...)`: the detection's
    box (the others faint) or the region's outline; None for other targets."""
    from .target import _Area, _Detected

    if isinstance(target, _Detected):
        fns = []
        for i in range(len(target.chosen)):
            chosen = target.chosen[i]
            others = [d for d in target.found[i] if d is not chosen]

            def draw(img, chosen=chosen, others=others):
                return draw_detections(img, chosen, others, target.image_size, labels)

            draw.size = target.image_size
            fns.append(_in_panel(draw))
        return fns
    if isinstance(target, _Area):
        name = explainer.explained_tensor(output, probability)
        shape = explainer.shape(name, x)
        size = tuple(shape[-2:]) if shape and all(isinstance(d, int) for d in shape[-2:]) else \
            np.asarray(explainer.predict(x, name)).shape[-2:]
        area = np.zeros(size, bool)
        if target.box is not None:
            x1, y1, x2, y2 = target.box
            area[y1:y2, x1:x2] = True
        else:
            area = target.mask

        def outline(img):
            return draw_outline(img, area)

        outline.size = size
        return [_in_panel(outline)] * len(next(iter(explainer.feeds(x).values())))
    return None


def time_plots(explainer, x, target, files, attr=None, output=None, probability=False) -> list[str]:
    """For a frame target (`step:`/`steps:`), a time plot beside each picture written
    (`NAME_time.png`); returns those files (none for other targets)."""
    from .target import _Steps

    files = [f for f in files if str(f).lower().endswith(".png")]
    if not files or not isinstance(target, _Steps):
        return []
    feeds = explainer.feeds(x)
    name = explainer.explained_tensor(output, probability)
    out = explainer.predict(x, name)
    axis = explainer.plan(feeds).axis(name) or 0
    out = np.moveaxis(np.asarray(out), axis, 0)  # batch first
    extra = []
    for i, f in enumerate(files):
        p = Path(f)
        a = None if attr is None or isinstance(attr, dict) else attr[i]
        extra.append(str(sequence_picture(p.with_name(f"{p.stem}_time.png"), out[i], target, a)))
    return extra
