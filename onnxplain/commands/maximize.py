"""`onnxplain maximize`: activation maximization, in input space or a generator's code space."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import runtime
from ..cli import DEFAULT_MODEL, _bytes, _key_values, _labels, _preprocess, _providers, models_dir
from ..errors import OptionError
from ..io import PRESETS


@click.command(epilog="""\b
Examples:
  onnxplain maximize --target 282 -o tiger_cat.png           # bundled EfficientNet
  onnxplain maximize models/tiny_cnn.onnx --neuron /relu1/Relu_output_0,3 -o neuron.png
  onnxplain maximize models/mnist_cnn.onnx --target 7 -O n_iter=100 -O lr=0.1 -o seven.png

Options (-O KEY=VALUE): n_iter=200 lr=0.05 l2=0.001 blur_every=4 blur_sigma=0.5 jitter=2 seed=0 clip=true.
""")
@click.argument("model", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-t", "--target", type=int, metavar="INT", help="Class whose score is maximised.")
@click.option("--neuron", metavar="TENSOR,CH", help="Maximise the spatial mean of this channel of a tensor instead.")
@click.option("--generator", type=click.Path(dir_okay=False, path_type=Path),
              help="ONNX model code -> input: ascend on its code (Nguyen et al. 2016).")
@click.option("-O", "--option", "options", multiple=True, callback=_key_values, metavar="KEY=VALUE",
              help="Optimisation option, repeatable (see below).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default="maximized.png",
              show_default=True, help="The input found: a picture (.png) or the array (.npy).")
@click.option("--output", metavar="NAME", help="The model output the target indexes (default: the first).")
@click.option("--probability", is_flag=True, help="Maximise the probability, not the logit before a final Softmax.")
@click.option("--preset", type=click.Choice(list(PRESETS)), help="Preprocessing preset (gives the input range).")
@click.option("--providers", callback=_providers, metavar="P1,P2", help="onnxruntime providers.")
@click.option("--memory-budget", callback=_bytes, metavar="SIZE", help="Memory one batched run may use, e.g. 2GB.")
@click.option("-q", "--quiet", is_flag=True, help="No notes.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def maximize(model, target, neuron, generator, options, out, output, probability, preset, providers,
             memory_budget, quiet, as_json):
    """Synthesise the input that maximises a class score or a neuron (activation maximization).

    Gradient ascent with L2 decay, blur, jitter and clipping to the input range of the
    model's preprocessing; with --generator, ascent on the generator's code.
    """
    from ..explainer import Explainer
    from ..io import save_array
    from ..methods.maximize import OPTIONS, activation_maximization, to_image
    from ..visualize import save_png

    runtime.QUIET = quiet
    for key, value in (("neuron", neuron), ("generator", generator)):
        if value is not None:
            if key in options:
                raise OptionError(f"give {key} once: as --{key} or as --option {key}=...")
            options[key] = str(value)
    OPTIONS.resolve(options)  # a bad option fails before the model loads
    if out.suffix.lower() not in (".png", ".npy"):
        raise OptionError(f"cannot write '{out.name}': --out must end in .png or .npy")
    if model is None:
        model = models_dir() / DEFAULT_MODEL
        if not quiet:
            click.echo(f"using the bundled {model}", err=True)
    explainer = Explainer(model, providers=providers, memory_budget=memory_budget)
    pre = _preprocess(explainer, preset, {})
    result = activation_maximization(explainer, target=target, output=output, probability=probability,
                                     pre=pre, **options)
    if out.suffix.lower() == ".npy":
        save_array(out, result.input)
    else:
        save_png(out, to_image(result.input, pre))
    labels = _labels(model, explainer)
    what = result.objective
    if target is not None and labels and 0 <= target < len(labels):
        what += f" ({labels[target]})"
    if result.stuck and not quiet:
        click.echo("note: the gradient was zero at every step (a unit that is off for this start point); "
                   "try another start point (-O seed=...)", err=True)
    if as_json:
        click.echo(json.dumps({"objective": what, "initial": result.initial, "final": result.final,
                               "steps": len(result.scores), "scores": result.scores, "file": str(out)}, indent=2))
        return
    click.echo(f"maximised the {what}: {result.initial:.4g} -> {result.final:.4g} in {len(result.scores)} steps; "
               f"wrote {out}")


COMMANDS = [maximize]
