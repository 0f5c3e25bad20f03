"""What `evaluate` and `report` show: the metric table and method ranking, the curves as
a PNG plot drawn with PIL (axes, ticks, labels, legend), and one self-contained HTML page
(images inlined as base64 PNG, CSS inline) with the inputs, the methods x inputs grid of
heatmaps, the table and the curves.
"""

from __future__ import annotations

import base64
import html
import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .metrics import HIGHER_IS_BETTER

# Distinct line colours (Tableau 10), one per method.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
CURVE_TITLES = {"deletion": "Deletion (lower AUC is better)", "insertion": "Insertion (higher AUC is better)",
                "selectivity": "Region perturbation (higher AOPC is better)",
                "road": "ROAD, most relevant first (lower is better)",
                "randomization": "Randomisation (lower is better)"}


# ----------------------------------------------------------------------------- table and ranking


def rank_methods(table: dict) -> list[tuple[str, float]]:
    """Methods by mean rank over the metrics (1 = best on every metric), best first.

    table: {method: {metric: value}}. Ties share the mean of their ranks."""
    methods = list(table)
    metrics = sorted({m for row in table.values() for m in row if m in HIGHER_IS_BETTER})
    ranks = {m: [] for m in methods}
    for metric in metrics:
        have = [m for m in methods if metric in table[m]]
        values = np.array([table[m][metric] for m in have], dtype=np.float64)
        key = -values if HIGHER_IS_BETTER[metric] else values
        from scipy.stats import rankdata

        for m, r in zip(have, rankdata(key)):
            ranks[m].append(float(r))
    out = [(m, float(np.mean(ranks[m])) if ranks[m] else float("nan")) for m in methods]
    return sorted(out, key=lambda t: (math.isnan(t[1]), t[1]))


def format_table(table: dict, ranking=None) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the metric table (methods ranked, best first), arrows for direction."""
    ranking = ranking or rank_methods(table)
    metrics = [m for m in HIGHER_IS_BETTER if any(m in row for row in table.values())]
    headers = ["rank", "method"] + [f"{m} {'↑' if HIGHER_IS_BETTER[m] else '↓'}" for m in metrics] + ["mean rank"]
    rows = []
    for i, (method, mean_rank) in enumerate(ranking, 1):
        rows.append([str(i), method] + [_num(table[method].get(m)) for m in metrics] + [f"{mean_rank:.2f}"])
    return headers, rows


def _num(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}"


def text_table(headers, rows) -> str:
    widths = [max(len(x) for x in col) for col in zip(headers, *rows)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in [headers, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plot


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw), default=raw)
    start = math.ceil(lo / step - 1e-9) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def plot_curves(curves: dict, width: int = 460, height: int = 320) -> np.ndarray:
    """curves: {panel: {method: (x, y)}} -> an RGB uint8 picture, one panel per metric,
    two panels per row, each with axes, ticks, axis labels, a title and a legend."""
    panels = list(curves)
    if not panels:
        raise ValueError("nothing to plot")
    methods = list(dict.fromkeys(m for p in panels for m in curves[p]))
    colour = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    canvas = Image.new("RGB", (cols * width, rows * height), "white")
    draw = ImageDraw.Draw(canvas)
    small, big = _font(12), _font(14)
    for k, panel in enumerate(panels):
        ox, oy = (k % cols) * width, (k // cols) * height
        _panel(draw, curves[panel], colour, (ox, oy, width, height), panel, small, big)
    return np.asarray(canvas)


def _panel(draw, series, colour, box, panel, small, big):
    ox, oy, w, h = box
    left, right, top, bottom = ox + 62, ox + w - 14, oy + 30, oy + h - 46
    xs = np.concatenate([np.asarray(x, float) for x, _ in series.values()])
    ys = np.concatenate([np.asarray(y, float) for _, y in series.values()])
    x0, x1 = float(xs.min()), float(xs.max())
    y0, y1 = float(ys.min()), float(ys.max())
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad
    if x1 - x0 < 1e-12:
        x1 = x0 + 1.0

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    title = CURVE_TITLES.get(panel, panel)
    draw.text(((left + right) / 2, oy + 8), title, fill="black", font=big, anchor="mt")
    for t in _nice_ticks(y0, y1):
        _, py = px(x0, t)
        draw.line([(left, py), (right, py)], fill=(232, 232, 232))
        draw.line([(left - 4, py), (left, py)], fill="black")
        draw.text((left - 6, py), f"{t:.3g}", fill="black", font=small, anchor="rm")
    for t in _nice_ticks(x0, x1):
        qx, _ = px(t, y0)
        draw.line([(qx, bottom), (qx, bottom + 4)], fill="black")
        draw.text((qx, bottom + 6), f"{t:.3g}", fill="black", font=small, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline="black")
    xlabel, ylabel = _labels_of(panel)
    draw.text(((left + right) / 2, bottom + 24), xlabel, fill="black", font=small, anchor="mt")
    # A vertical y label: text drawn on its own image, rotated.
    _vertical_text(draw, ylabel, (ox + 10, (top + bottom) / 2), small)
    for m, (x, y) in series.items():
        pts = [px(a, b) for a, b in zip(np.asarray(x, float), np.asarray(y, float))]
        if len(pts) > 1:
            draw.line(pts, fill=colour[m], width=2)
        else:
            draw.ellipse([pts[0][0] - 3, pts[0][1] - 3, pts[0][0] + 3, pts[0][1] + 3], fill=colour[m])
    # Legend, top right inside the axes.
    line_h = 15
    lw = max(draw.textlength(m, font=small) for m in series) + 30
    lx, ly = right - lw - 6, top + 6
    draw.rectangle([lx, ly, right - 6, ly + line_h * len(series) + 6], fill="white", outline=(180, 180, 180))
    for i, m in enumerate(series):
        yy = ly + 4 + i * line_h + line_h / 2
        draw.line([(lx + 5, yy), (lx + 22, yy)], fill=colour[m], width=3)
        draw.text((lx + 26, yy), m, fill="black", font=small, anchor="lm")


_AXES = {"deletion": ("fraction of pixels deleted", "probability"),
         "insertion": ("fraction of pixels inserted", "probability"),
         "selectivity": ("patches removed", "probability"), "road": ("fraction of pixels imputed", "probability"),
         "randomization": ("layers randomised, from the output", "Spearman")}


def _labels_of(panel):
    return _AXES.get(panel, ("x", "y"))


def _vertical_text(draw, text, centre, font):
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    img = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(img).text((-left + 1, -top + 1), text, fill=255, font=font)
    img = img.rotate(90, expand=True)
    target = draw._image
    x, y = int(centre[0]), int(centre[1] - img.size[1] / 2)
    target.paste((0, 0, 0), (x, y, x + img.size[0], y + img.size[1]), img)


# ----------------------------------------------------------------------------- HTML


def png_data_uri(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px 32px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#666;font-size:13px}
table{border-collapse:collapse;font-size:13px}
td,th{padding:4px 10px;border-bottom:1px solid #e6e6e6;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}
td.best{font-weight:bold;background:#e8f4e8}
.grid td{text-align:center;vertical-align:top;border:none;padding:3px}
.grid img{width:224px;height:auto;image-rendering:auto;display:block}
.grid th{background:none;font-weight:600;font-size:12px}
.grid .row{text-align:right;font-size:12px;font-weight:600;white-space:nowrap;vertical-align:middle}
.note{font-size:12px;color:#666;max-width:900px}
"""


def html_report(title: str, meta: list[str], inputs: list[tuple[str, np.ndarray]], grid: dict,
                table: tuple | None, curves_png: np.ndarray | None, notes: list[str] = ()) -> str:
    """The page. inputs: (name, RGB picture). grid: {method: [RGB picture per input]}.
    table: (headers, rows) from format_table, best value per column highlighted."""
    e = html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>"
             f"<style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    parts += [f"<div class='meta'>{e(m)}</div>" for m in meta]
    parts.append("<h2>Explanations</h2><table class='grid'><tr><th></th>")
    parts += [f"<th>{e(name)}</th>" for name, _ in inputs]
    parts.append("</tr><tr><td class='row'>input</td>")
    parts += [f"<td><img alt='{e(name)}' src='{png_data_uri(img)}'></td>" for name, img in inputs]
    parts.append("</tr>")
    for method, pictures in grid.items():
        parts.append(f"<tr><td class='row'>{e(method)}</td>")
        parts += [f"<td><img alt='{e(method)} on {e(name)}' src='{png_data_uri(p)}'></td>"
                  for (name, _), p in zip(inputs, pictures)]
        parts.append("</tr>")
    parts.append("</table><p class='note'>Red: relevance for the explained class; blue: against it "
                 "(signed maps); sequential maps show magnitude.</p>")
    if table is not None:
        headers, rows = table
        parts.append("<h2>Metrics (mean over inputs; methods ranked by mean rank)</h2><table><tr>")
        parts += [f"<th class='{'l' if i == 1 else ''}'>{e(h)}</th>" for i, h in enumerate(headers)]
        parts.append("</tr>")
        best = _best_cells(headers, rows)
        for r, row in enumerate(rows):
            parts.append("<tr>" + "".join(
                f"<td class='{'l' if i == 1 else ''}{' best' if (r, i) in best else ''}'>{e(c)}</td>"
                for i, c in enumerate(row)) + "</tr>")
        parts.append("</table>")
    if curves_png is not None:
        parts.append(f"<h2>Curves</h2><img alt='metric curves' src='{png_data_uri(curves_png)}' style='max-width:100%'>")
    parts += [f"<p class='note'>{e(n)}</p>" for n in notes]
    parts.append("</body></html>")
    return "\n".join(parts)


def _best_cells(headers, rows) -> set:
    best = set()
    for i, h in enumerate(headers[2:-1], 2):
        values = [(float(r[i]), k) for k, r in enumerate(rows) if r[i] != "-"]
        if values:
            pick = max(values) if h.endswith("↑") else min(values)
            best.add((pick[1], i))
    return best
