"""`onnxplain prune-study`: rank a layer's channels by IPNA for a box of the input and by
conductance, prune the top k of each, and report the integrated gradients inside and
outside the box (Lundstrom, Huang & Razaviyayn, ICML 2022)."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from .. import runtime
from ..cli import _bytes, _floats, _ints, _preprocess, _providers, _size, _table, _target
from ..errors import InputError, OptionError
from ..io import IMAGE_SUFFIXES, LAYOUTS, PRESETS, load_inputs
from ..methods.integrated import RULES
from ..target import Target

COLOURS = {("ipna", "inside"): (214, 39, 40), ("ipna", "outside"): (255, 152, 150),
           ("conductance", "inside"): (31, 119, 180), ("conductance", "outside"): (174, 199, 232)}


def _box(ctx, param, value):
    parts = value.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise click.BadParameter(f"'{value}' is not a box x1,y1,x2,y2 of four pixel indices (e.g. 0,0,112,112)")
    x1, y1, x2, y2 = (int(p) for p in parts)
    if x1 >= x2 or y1 >= y2:
        raise click.BadParameter(f"'{value}' is empty: need x1 < x2 and y1 < y2 (the end is exclusive)")
    return x1, y1, x2, y2


@click.command("prune-study", epilog="""\b
Examples:
  onnxplain prune-study models/efficientnet_lite0.onnx models/chelsea.png \\
      --layer /_blocks.15/_project_conv/Conv_output_0 --box 60,40,160,140 --k 1,2,4,8,16 \\
      --out table.json --plot plot.png
  onnxplain prune-study models/tiny_cnn.onnx models/chelsea.png --layer /relu2/Relu_output_0 --box 0,0,16,16 -t 3

The box is in pixels of the model input (after resizing and cropping), x along the width,
end-exclusive. Channels are ranked by their scores summed over the inputs and over the
layer's spatial axes.
""")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="INPUT...")
@click.option("--layer", required=True, metavar="TENSOR",
              help="Layer whose channels are ranked and pruned (`onnxplain inspect MODEL` lists them).")
@click.option("--box", required=True, callback=_box, metavar="X1,Y1,X2,Y2", help="The patch of the input.")
@click.option("-t", "--target", callback=_target, metavar="TARGET",
              help="Class to explain (default: predicted by the unpruned model, then kept fixed).")
@click.option("--k", "ks", default="1,2,4,8,16", show_default=True, callback=_ints, metavar="K1,K2,...",
              help="Numbers of top-ranked channels to prune.")
@click.option("--n-steps", default=50, show_default=True, type=click.IntRange(min=1),
              help="Integration points of IPNA, conductance and integrated gradients.")
@click.option("--integration", default="gausslegendre", show_default=True, type=click.Choice(RULES),
              help="Integration rule.")
@click.option("--baseline", default="0", show_default=True, metavar="V|A,B,C",
              help="Baseline input: a number or per-channel values.")
@click.option("--output", metavar="NAME", help="Explain this model output (default: the first).")
@click.option("--probability", is_flag=True, help="Explain the probability, not the logit before a final Softmax.")
@click.option("--providers", callback=_providers, metavar="P1,P2", help="onnxruntime providers.")
@click.option("--memory-budget", callback=_bytes, metavar="SIZE", help="Memory one batched run may use, e.g. 2GB.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the results as JSON here.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Draw the curves as a PNG here.")
@click.option("--preset", type=click.Choice(list(PRESETS)), help="Image preprocessing preset.")
@click.option("--size", callback=_size, metavar="H,W", help="Model input size of images.")
@click.option("--mean", callback=_floats, metavar="A,B,C", help="Per-channel mean on 0..1 pixels.")
@click.option("--std", callback=_floats, metavar="A,B,C", help="Per-channel std on 0..1 pixels.")
@click.option("--layout", type=click.Choice(LAYOUTS), help="Image layout of the model input.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of the table.")
def prune_study_command(model, inputs, layer, box, target, ks, n_steps, integration, baseline, output, probability,
                        providers, memory_budget, out, plot, preset, size, mean, std, layout, quiet, as_json):
    """Prune the channels behind a box (IPNA) or the whole input (conductance) and watch the
    integrated gradients inside and outside the box."""
    from ..explainer import Explainer
    from ..methods.conductance import prune_study

    runtime.QUIET = quiet
    if isinstance(target, Target):
        raise OptionError(f"prune-study ranks channels for classes: -t takes a class, one class per sample or pred; "
                          f"'{target.text}' works in explain, evaluate and report")
    for path, suffix, flag in ((out, ".json", "--out"), (plot, ".png", "--plot")):
        if path is not None and path.suffix.lower() != suffix:
            raise OptionError(f"{flag} must end in {suffix}, got '{path.name}'")
    try:
        base = [float(v) for v in baseline.split(",") if v.strip()]
    except ValueError:
        raise OptionError(f"--baseline '{baseline}' is not a number or a list of numbers") from None
    explainer = Explainer(model, providers=providers, memory_budget=memory_budget)
    shapes = list(explainer.inputs.values())
    pre = None
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in inputs):
        flags = dict(size=size, mean=mean, std=std, layout=layout)
        pre = _preprocess(explainer, preset, {k: v for k, v in flags.items() if v is not None})
    batch = load_inputs(inputs, pre, shapes[0] if len(shapes) == 1 else None)
    result = prune_study(explainer, batch.batch, layer, box, target=target, ks=ks, n_steps=n_steps,
                         integration=integration, baseline=base[0] if len(base) == 1 else np.asarray(base),
                         output=output, probability=probability)
    result["samples"] = _samples(explainer, batch, inputs, result, output, probability)
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))
    if out is not None:
        try:
            out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot write {out}: {exc.strerror}") from None
        if not as_json:
            click.echo(f"wrote {out}")
    if plot is not None:
        from ..visualize import save_png

        save_png(plot, draw_plot(result))
        if not as_json:
            click.echo(f"wrote {plot}")


def _samples(explainer, batch, inputs, result, output, probability) -> list[dict]:
    """Per sample, what explain's records say: its target, the class the unpruned model
    predicts and the explained score (the unpruned row's)."""
    explained = np.asarray(explainer.predict(batch.batch, explainer.explained_tensor(output, probability)))
    predicted = explained.reshape(len(batch.names), -1).argmax(axis=1)
    targets = result["target"] if isinstance(result["target"], list) else [result["target"]] * len(batch.names)
    one_each = len(inputs) == len(batch.names)  # one sample per file: it is the sample's source
    out = []
    for i, name in enumerate(batch.names):
        r = {"id": inputs[i].name, "input": str(inputs[i])} if one_each else {}
        r.update(sample=name, target=int(targets[i]), predicted=int(predicted[i]),
                 score=result["unpruned"]["scores"][i])
        out.append(r)
    return out


def format_table(result: dict) -> str:
    base = result["unpruned"]
    rows = []
    for r in result["rows"]:
        rel = [r[key] / base[key] if base[key] else float("nan") for key in ("inside", "outside")]
        rows.append((r["ranking"], r["k"], f"{r['inside']:.4g}", f"{rel[0]:.3f}", f"{r['outside']:.4g}",
                     f"{rel[1]:.3f}", ",".join(map(str, r["pruned"][:8])) + (",..." if len(r["pruned"]) > 8 else "")))
    head = (f"layer {result['layer']}: {result['channels']} channels; box {','.join(map(str, result['box']))}; "
            f"target {result['target']}")
    return head + "\n" + _table(rows, ("ranking", "k", "inside", "/unpruned", "outside", "/unpruned", "pruned"))


def round_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Ticks at a round step (1, 2, 2.5 or 5 times a power of ten) from a tick at or below
    `lo` to one at or above `hi`: the axis spans exactly the ticks."""
    import math

    from ..report import _nice_ticks

    inner = _nice_ticks(lo, hi, n)
    step = inner[1] - inner[0] if len(inner) > 1 else 1.0
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


def draw_plot(result: dict, width: int = 640, height: int = 400) -> np.ndarray:
    """Attribution inside and outside the box, relative to the unpruned model, against k:
    one line per ranking and region, drawn with PIL."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    base = result["unpruned"]
    ks = sorted({r["k"] for r in result["rows"]})  # 0 and the pruned counts, evenly spaced
    series = {}
    for ranking in ("ipna", "conductance"):
        for region in ("inside", "outside"):
            pts = [(0, 1.0)] + [(r["k"], r[region] / base[region] if base[region] else 0.0)
                                for r in result["rows"] if r["ranking"] == ranking]
            series[(ranking, region)] = pts
    values = [v for pts in series.values() for _, v in pts]
    ticks = round_ticks(min(min(values), 0.0), max(max(values), 1.0))
    lo, hi = ticks[0], ticks[-1]
    left, right, top, bottom = 60, width - 170, 30, height - 45
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)

    def px(i, v):
        x = left + (right - left) * (i / max(len(ks) - 1, 1))
        y = bottom - (bottom - top) * (v - lo) / (hi - lo)
        return x, y

    d.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    for v in ticks:
        _, y = px(0, v)
        d.line([left - 4, y, left, y], fill=(0, 0, 0))
        d.text((5, y - 6), f"{v:.3g}", fill=(0, 0, 0), font=font)
    _, y0 = px(0, 0.0)
    d.line([left, y0, right, y0], fill=(200, 200, 200))
    for i, k in enumerate(ks):
        x, _ = px(i, lo)
        d.line([x, bottom, x, bottom + 4], fill=(0, 0, 0))
        d.text((x - 4, bottom + 8), str(k), fill=(0, 0, 0), font=font)
    d.text(((left + right) // 2 - 60, height - 18), "pruned channels k", fill=(0, 0, 0), font=font)
    d.text((left, 8), f"integrated gradients / unpruned, layer {result['layer']}"[:80], fill=(0, 0, 0), font=font)
    for n, ((ranking, region), pts) in enumerate(series.items()):
        colour = COLOURS[(ranking, region)]
        xy = [px(ks.index(k), v) for k, v in pts]
        d.line(xy, fill=colour, width=3 if region == "inside" else 2)
        for x, y in xy:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        ly = top + 10 + 18 * n
        d.line([right + 12, ly, right + 36, ly], fill=colour, width=3)
        d.text((right + 42, ly - 6), f"{ranking}, {region}", fill=(0, 0, 0), font=font)
    return np.asarray(img)


COMMANDS = [prune_study_command]
