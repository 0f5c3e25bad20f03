"""`onnxplain report`: one self-contained HTML page comparing methods on a model's inputs:
the inputs, a methods x inputs grid of heatmaps, the metric table and the curves."""

from __future__ import annotations

import datetime
from pathlib import Path

import click
import numpy as np

from .. import runtime
from ..cli import TARGET_HELP, _target
from ..errors import OptionError
from .evaluate import (DEFAULT_METHODS, Batch, aggregate, batch_options, check_target, evaluate_record, explained,
                       load_model, method_options, metric_settings, names_list, samples_target, target_text)

__all__ = ["COMMANDS"]
THUMB = 224  # side of a grid picture, pixels
COLOURS = ("Colours: a signed map (gradients, LRP with negative relevance) is red for the class, blue against "
           "(bwr, zero is no colour); a non-negative map (CAM, RISE, excitation backprop) runs from dark (low) to "
           "bright yellow (high) (inferno); each map is scaled by its own 99.5th percentile and drawn over a grey "
           "copy of the photo, in proportion to its value.")


def _picture(attr, image, layout, symmetric=None) -> np.ndarray:
    """One sample's attribution as a picture: over its image, or on its own."""
    from PIL import Image

    from ..visualize import heatmap, overlay, reduce_channels

    a = np.asarray(attr, dtype=np.float64)
    if a.ndim == 1:  # tabular: one row of features
        a2d = a[None]
    else:
        a2d = reduce_channels(a, layout=layout)
    if image is not None:
        # On a faded grey copy of the photo: sparse pixel-level relevance (gradients) is
        # invisible against the colours of a photo.
        pic = overlay(image, a2d, alpha=0.8, symmetric=symmetric, background="gray")
    else:
        pic = heatmap(a2d, symmetric=symmetric)
    h, w = pic.shape[:2]
    scale = THUMB / max(h, w)
    return np.asarray(Image.fromarray(pic).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                  Image.NEAREST if a.ndim == 1 else Image.BILINEAR))


def _input_picture(x, image, layout) -> np.ndarray:
    from PIL import Image

    if image is not None:
        pic = image
    else:
        v = np.asarray(x, dtype=np.float64)
        if v.ndim == 3:
            v = v.mean(axis=0 if layout != "nhwc" else 2)
        v = np.atleast_2d(v)
        span = (v.max() - v.min()) or 1.0
        pic = np.repeat(((v - v.min()) / span * 255).astype(np.uint8)[..., None], 3, axis=2)
    h, w = pic.shape[:2]
    scale = THUMB / max(h, w)
    return np.asarray(Image.fromarray(pic).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                  Image.BILINEAR))


@click.command(epilog="""\b
Examples:
  onnxplain report                                     # bundled EfficientNet and photo
  onnxplain report models/tiny_cnn.onnx models/ --methods gradient,lrp.epsilon_plus -o report.html
  onnxplain report models/tiny_cnn.onnx models/chelsea.png --metrics none  # heatmaps only
""")
@click.argument("paths", nargs=-1, metavar="[MODEL] [INPUT|FOLDER]...")
@click.option("--methods", default=DEFAULT_METHODS, show_default=True, help="Methods to show, comma-separated.")
@click.option("--metrics", "metric_names", default="deletion,insertion,selectivity", show_default=True,
              help="Metrics for the table and curves, comma-separated, or 'none'.")
@click.option("-O", "--option", "options", multiple=True, metavar="METHOD:KEY=VALUE",
              help="Option of one method, repeatable.")
@click.option("-S", "--setting", "settings", multiple=True, metavar="METRIC:KEY=VALUE",
              help="Setting of one metric, repeatable.")
@click.option("-t", "--target", callback=_target, metavar="TARGET", help=TARGET_HELP)
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default="report.html",
              show_default=True, help="The HTML page to write.")
@click.option("--title", default=None, help="Title of the page (default: the model's name).")
@click.option("--json", "as_json", is_flag=True, help="Print the file, methods, inputs and metric table as JSON.")
@batch_options
def report(paths, methods, metric_names, options, settings, target, out, title, preset, providers, memory_budget,
           resume, quiet, as_json):
    """Write one self-contained HTML page comparing attribution methods on a model."""
    from ..explainer import Explainer
    from ..report import format_table, html_report, plot_curves, rank_methods
    from .. import metrics as M

    runtime.QUIET = quiet
    if out.suffix.lower() not in (".html", ".htm"):
        raise OptionError(f"--out must end in .html, got '{out.name}'")
    methods = names_list(methods, "method")
    metric_names = [] if metric_names.strip().lower() == "none" else names_list(metric_names, "metric")
    opts = method_options(methods, options)
    sets = metric_settings(metric_names, settings)
    (model,), sources = load_model(paths, 1, quiet)
    explainer = Explainer(model, providers=providers, memory_budget=memory_budget)
    check_target(explainer, target)
    batch = Batch(explainer, sources, preset, None, False, display=True)
    layout = batch.pre.layout if batch.pre is not None else None
    inputs, grid, samples = [], {m: [] for m in methods}, []

    def process(loaded):
        x = loaded.batch
        t = samples_target(explainer, loaded, target)
        scorer = M.Scorer(explainer, x, t, probability=False)
        samples.extend(explained(explainer, loaded, t, scorer))
        fixed = scorer.fixed_target()
        for i, name in enumerate(loaded.names):
            image = loaded.images[i] if loaded.images else None
            inputs.append((f"{name} ({scorer.describe(i)})", _input_picture(x[i], image, layout)))
        for m in methods:
            attr = explainer.attribute(x, method=m, target=fixed, **opts[m])
            for i in range(len(loaded.names)):
                grid[m].append(_picture(attr[i], loaded.images[i] if loaded.images else None, layout))
        rec = evaluate_record(explainer, x, opts, metric_names, sets, t) if metric_names else {}
        return {"samples": loaded.names, **rec}

    records = batch.run(process, "reporting")
    table = curves_png = None
    values = {}
    if metric_names:
        values, curves = aggregate(records)
        table = format_table(values, rank_methods(values))
        curves_png = plot_curves(curves) if curves else None
    files = len({e.path for e in batch.dataset.entries})
    meta = [f"model: {model}", f"inputs: {len(inputs)} from {files} file(s)",
            f"methods: {', '.join(methods)}", f"explained: {target_text(target)}",
            f"written {datetime.datetime.now():%Y-%m-%d %H:%M} by onnxplain"]
    page = html_report(title or f"onnxplain report: {model.name}", meta, inputs, grid, table, curves_png,
                       notes=[COLOURS] + (["Metrics: deletion/insertion AUC (Petsiuk et al. 2018), selectivity = "
                                           "AOPC of region perturbation (Samek et al. 2017); arrows give the better "
                                           "direction; the best value per column is highlighted."]
                                          if metric_names else []))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    if as_json:
        import json

        click.echo(json.dumps({"file": str(out), "model": str(model), "methods": methods,
                               "inputs": [name for name, _ in inputs], "explained": target_text(target),
                               "table": values, "samples": samples}, indent=2))
        return 0
    click.echo(f"wrote {out} ({len(methods)} method(s) x {len(inputs)} input(s)"
               + (f", metrics {', '.join(metric_names)})" if metric_names else ")"))
    return 0


COMMANDS = [report]
