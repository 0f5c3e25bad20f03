"""`onnxplain factorize`: Building Blocks' factorized class picture of one image at a layer."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from .. import runtime
from ..cli import DEFAULT_PHOTO, _bytes, _key_values, _labels, _preprocess, _providers, _split_paths, models_dir
from ..errors import InputError, OptionError
from ..io import IMAGE_SUFFIXES, PRESETS, load_inputs

HUE_NAMES = ("blue", "orange")


def _classes(ctx, param, value):
    text = value.strip().lower()
    if text == "all" or (text.startswith("top") and text[3:].isdigit() and int(text[3:]) > 0):
        return text
    parts = text.split(",")
    if all(p.strip().isdigit() for p in parts):
        return [int(p) for p in parts] if len(parts) > 1 else f"top{int(parts[0])}"
    raise click.BadParameter(f"'{value}' is not 'all', 'topN' (e.g. top50), N, or a list of class indices (3,5,7)")


@click.command(epilog="""\b
Examples:
  onnxplain factorize                                 # bundled EfficientNet on its cat photo
  onnxplain factorize models/efficientnet_lite0.onnx models/chelsea.png --factors 3 --classes top100 -o f.png
  onnxplain factorize models/efficientnet_lite0.onnx models/chelsea.png --layer /_blocks.10/Add_output_0 \\
      --of activation --algo pca --json

The default layer is a mid-late block output: the last residual Add (or Concat) at the
second-smallest spatial size of the network (14x14 in EfficientNet-Lite0).
""")
@click.argument("paths", nargs=-1, metavar="[MODEL] [IMAGE]")
@click.option("--layer", metavar="TENSOR", help="A 4-D tensor to factorize at (`onnxplain inspect MODEL` lists them).")
@click.option("-k", "--factors", type=click.IntRange(min=1), default=2, show_default=True, help="Number of factors.")
@click.option("--classes", callback=_classes, default="top50", show_default=True, metavar="topN|all|N|I,J,..",
              help="Classes whose attributions are factorized: the N highest-scoring, all, or a list.")
@click.option("--of", "of", type=click.Choice(["attribution", "activation"]), default="attribution", show_default=True,
              help="Factorize the class attributions (positions x classes) or the activations (positions x channels).")
@click.option("--algo", type=click.Choice(["nmf", "pca"]), default="nmf", show_default=True,
              help="Non-negative matrix factorization (of max(0, .)) or principal components.")
@click.option("-m", "--method", default="input_x_gradient", show_default=True,
              help="White-box method giving each class's attribution at the layer.")
@click.option("-O", "--option", "options", multiple=True, callback=_key_values, metavar="KEY=VALUE",
              help="Option of the attribution method, repeatable.")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True, help="Classes listed per factor.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the NMF initialisation.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default="factors.png", show_default=True,
              help="The picture (.png), or the factors as arrays (.npz).")
@click.option("--output", metavar="NAME", help="Explain this model output (default: the first).")
@click.option("--probability", is_flag=True, help="Explain probabilities, not the logits before a final Softmax.")
@click.option("--preset", type=click.Choice(list(PRESETS)), help="Image preprocessing preset.")
@click.option("--providers", callback=_providers, metavar="P1,P2", help="onnxruntime providers.")
@click.option("--memory-budget", callback=_bytes, metavar="SIZE", help="Memory one batched run may use, e.g. 2GB.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes.")
@click.option("--json", "as_json", is_flag=True, help="Print the factors as JSON.")
def factorize(paths, layer, factors, classes, of, algo, method, options, top, seed, out, output, probability,
              preset, providers, memory_budget, quiet, as_json):
    """Factorize a layer's class attributions into k factors (Building Blocks, Olah 2018).

    For each class, the attribution at the layer (activation x gradient by default) summed
    over channels is one map; the maps (or the activations) are factorized into k factors.
    Prints the classes each factor pushes most, and draws the picture: one hue per factor
    (blue, orange, ...), brightness = attribution, over the image.
    """
    from ..explainer import Explainer
    from ..factorize import default_layer, factorize as run, hues, picture
    from ..methods.base import get_method
    from ..visualize import save_png

    runtime.QUIET = quiet
    get_method(method).resolve(options)
    if out.suffix.lower() not in (".png", ".npz"):
        raise OptionError(f"cannot write '{out.name}': --out must end in .png or .npz")
    if len(paths) > 2:
        raise InputError("give at most a MODEL and one IMAGE (factorization explains one image)")
    model, inputs = _split_paths(paths)
    explainer = Explainer(model, providers=providers, memory_budget=memory_budget)
    if not inputs:
        inputs = [models_dir() / DEFAULT_PHOTO]
        if not quiet:
            click.echo(f"using the bundled {inputs[0]}", err=True)
    shapes = list(explainer.inputs.values())
    pre = _preprocess(explainer, preset, {}) if inputs[0].suffix.lower() in IMAGE_SUFFIXES else None
    batch = load_inputs(inputs, pre, shapes[0] if len(shapes) == 1 else None)
    if len(batch) != 1:
        raise InputError(f"{inputs[0]} holds {len(batch)} samples; factorization explains one at a time")
    layer = layer or default_layer(explainer)
    result = run(explainer, batch.batch, layer=layer, k=factors, classes=classes, of=of, algo=algo, method=method,
                 seed=seed, output=output, probability=probability, **options)
    labels = _labels(model, explainer)
    colours = hues(factors)
    if out.suffix.lower() == ".npz":
        from ..io import save_array

        save_array(out, {"spatial": result.spatial, "loadings": result.loadings,
                         "classes": np.asarray(result.classes), "maps": result.maps})
    else:
        image = batch.images[0] if batch.images else None
        size = None if image is not None else _input_size(batch.batch)
        save_png(out, picture(result, image, size=size))
    report = result.to_dict(labels, top)
    report.update(file=str(out), colours=[_hex(c) for c in colours])
    if as_json:
        # Each class factorized with its explained score (the logit, or the probability).
        explained = np.asarray(explainer.predict(batch.batch, explainer.explained_tensor(output, probability)))
        report["input"] = str(inputs[0])
        report["explained"] = [{"class": c, **({"label": labels[c]} if labels and 0 <= c < len(labels) else {}),
                                "score": float(explained.reshape(1, -1)[0, c])} for c in result.classes]
        click.echo(json.dumps(report, indent=2))
        return
    shape = "x".join(map(str, result.spatial.shape[1:]))
    click.echo(f"layer {layer} ({shape}), {len(result.classes)} classes, {of} {algo.upper()} into {factors} "
               f"factor(s) (relative error {result.error:.2f}), attribution by {method}")
    for i, ranked in enumerate(report["ranked"]):
        name = HUE_NAMES[i] if factors <= len(HUE_NAMES) else _hex(colours[i])
        items = ", ".join(f"{r.get('label', r['class'])} {r['loading']:.2f}" for r in ranked)
        click.echo(f"factor {i + 1} ({name}): {items}")
    click.echo(f"wrote {out}")


def _input_size(batch):
    a = next(iter(batch.values())) if isinstance(batch, dict) else batch
    return tuple(a.shape[2:4]) if a.ndim == 4 else None


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(round(v * 255)):02x}" for v in rgb)


COMMANDS = [factorize]
