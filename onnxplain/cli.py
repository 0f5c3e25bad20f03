"""The command line: `onnxplain explain | methods | inspect | export`.

Scripts rely on the exit codes: 0 success; 2 for anything the user can fix (a bad
model, input, option or path), reported as one line `error: ...` on stderr; 1 for a
bug in onnxplain ("internal error: ..."; the traceback with --debug or ONNXPLAIN_DEBUG=1).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import textwrap
import traceback
from pathlib import Path

import click
import numpy as np

from . import __version__, runtime
from .errors import InputError, OnnxplainError, OptionError
from .io import ARRAY_SUFFIXES, LAYOUTS, Preprocess, save_array
from .io import PRESETS
from .methods.base import METHODS, get_method
from .visualize import DIVERGING, SEQUENTIAL, SIGNS, VIEWS

DEBUG_ENV = "ONNXPLAIN_DEBUG"
DEFAULT_MODEL, DEFAULT_PHOTO = "efficientnet_lite0.onnx", "chelsea.png"
# The first picture a user sees (explain with no MODEL and no -m): of LRP composites,
# integrated gradients and excitation backprop, the one with the best insertion - deletion
# on the bundled photo (0.259 - 0.133 = +0.126, against +0.074 for excitation backprop and
# +0.058 for integrated gradients; 20 steps, probability of the predicted class).
DEFAULT_PICTURE_METHOD = "lrp.epsilon_plus_flat"


def models_dir() -> Path:
    """The bundled models: the repo's `models/` folder, or $ONNXPLAIN_MODELS."""
    env = os.environ.get("ONNXPLAIN_MODELS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "models"


# ----------------------------------------------------------------------------- errors


class _Group(click.Group):
    """Turns every failure into one line on stderr and an exit code scripts can rely on."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        cut = args.index("--") if "--" in args else len(args)
        debug = "--debug" in args[:cut] or os.environ.get(DEBUG_ENV, "") not in ("", "0")
        args = [a for i, a in enumerate(args) if not (i < cut and a == "--debug")]
        try:
            rv = super().main(args, prog_name or "onnxplain", complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help())
            code = 0
        except click.ClickException as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) else ""
            code = _fail(f"error: {exc.format_message()}{hint}", 2)
        except OnnxplainError as exc:
            code = _fail(f"error: {exc}", 2, debug)
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            code = _fail(f"error: {exc.strerror or exc}{where}", 2, debug)
        except (click.Abort, KeyboardInterrupt):
            code = _fail("error: interrupted", 130)
        except Exception as exc:  # a bug: say so, in one line unless asked for more
            tail = "" if debug else f"; rerun with --debug (or {DEBUG_ENV}=1) for the traceback"
            code = _fail(f"internal error: {type(exc).__name__}: {exc}{tail}", 1, debug)
        sys.exit(code)


def _fail(message: str, code: int, debug: bool = False) -> int:
    if debug:
        traceback.print_exc()
    click.echo(" ".join(message.split()), err=True)
    return code


# ----------------------------------------------------------------------------- parameter types


def _floats(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a list of numbers (e.g. 0.5,0.5,0.5)") from None


def _ints(ctx, param, value):
    if value is None:
        return None
    parts = value.split(",")
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise click.BadParameter(f"'{value}' is not a list of positive integers (e.g. 1,3,224,224)")
    return tuple(int(p) for p in parts)


def _size(ctx, param, value):
    if value is None:
        return None
    parts = value.lower().replace("x", ",").split(",")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise click.BadParameter(f"'{value}' is not a size H,W of two positive integers (e.g. 224,224)")
    return int(parts[0]), int(parts[1])


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _bytes(ctx, param, value):
    if value is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", value.lower())
    if not m or m.group(2) not in _UNITS or float(m.group(1)) * _UNITS[m.group(2)] < 1:
        raise click.BadParameter(f"'{value}' is not a memory size (e.g. 512MB, 2GB, 1GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _providers(ctx, param, value):
    return [p.strip() for p in value.split(",") if p.strip()] if value else None


def _target(ctx, param, value):
    """-t in the target grammar (onnxplain.target): None for the predicted class, an int or
    a list of ints for classes (as the Python API takes them), else the parsed Target."""
    from .target import PREDICTED, parse_target

    if value is None:
        return None
    try:
        t = parse_target(value)
    except OnnxplainError as exc:
        raise click.BadParameter(str(exc)) from None
    if t is PREDICTED:
        return None
    values = getattr(t, "values", None)  # one class, or one per sample
    if values is not None:
        return values[0] if len(values) == 1 else list(values)
    return t


TARGET_HELP = ("What to explain: a class (3), one per sample (3,1,4), pred (default), FILE.npy (the seed), "
               "pos:T:V, last:V, step:T[:C], steps:T0-T1[:C], region:x1,y1,x2,y2[:C], mask:FILE.png[:C] "
               "(README: Targets).")


def _key_values(ctx, param, values):
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"'{item}' is not KEY=VALUE (e.g. --option n_steps=20)")
        out[key.strip()] = value.strip()
    return out


def model_options(fn):
    """Options shared by the commands that build an Explainer."""
    for deco in reversed([
        click.option("-m", "--method", default="gradient", show_default=True,
                     help="Attribution method (`onnxplain methods` lists them)."),
        click.option("--layer", metavar="TENSOR", help="Attribute to this tensor instead of the input "
                                                       "(`onnxplain inspect MODEL` lists them)."),
        click.option("--output", metavar="NAME", help="Explain this model output (default: the first)."),
        click.option("--probability", is_flag=True,
                     help="Explain the probability, not the logit before a final Softmax."),
        click.option("--providers", callback=_providers, metavar="P1,P2",
                     help="onnxruntime providers, e.g. CUDAExecutionProvider,CPUExecutionProvider."),
        click.option("--memory-budget", callback=_bytes, metavar="SIZE",
                     help="Memory one batched run may use, e.g. 512MB or 2GB (default 1GiB)."),
    ]):
        fn = deco(fn)
    return fn


# ----------------------------------------------------------------------------- commands


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="onnxplain")
@click.option("--debug", is_flag=True, expose_value=False,
              help=f"Show the traceback of internal errors (also {DEBUG_ENV}=1); valid after any command.")
def main():
    """Explain the decisions of any ONNX model.

    \b
    Examples:
      onnxplain explain                                  # bundled EfficientNet on a cat photo
      onnxplain explain models/tiny_cnn.onnx models/chelsea.png --method integrated_gradients --out ig.png
      onnxplain methods
      onnxplain inspect models/efficientnet_lite0.onnx
      onnxplain info                                     # the providers that work here
    """


@main.command(epilog="""\b
Examples:
  onnxplain explain
  onnxplain explain models/chelsea.png -m integrated_gradients -O n_steps=20 -o ig.png
  onnxplain explain models/chelsea.png --view side-by-side --sign positive -o side.png
  onnxplain explain models/efficientnet_lite0.onnx models/chelsea.png --target 281 --layer /_swish_1/Clip_output_0
  onnxplain explain models/tiny_cnn.onnx models/chelsea.png -m occlusion -O window=3,8,8 -o attribution.npz

Preprocessing of images: explicit flags > --preset > the model's metadata > the input shape.
""")
@click.argument("paths", nargs=-1, metavar="[MODEL] [INPUT]...")
@model_options
@click.option("-t", "--target", callback=_target, metavar="TARGET", help=TARGET_HELP)
@click.option("-O", "--option", "options", multiple=True, callback=_key_values, metavar="KEY=VALUE",
              help="Method option, repeatable; tuples are written 3,32,32.")
@click.option("-o", "--out", metavar="FILE|DIR/",
              help="Where to write: .png heatmap, .npy or .npz array (default: explanation.png for images, "
                   "attribution.npy for arrays); DIR/ writes one file per input named after it "
                   "(cat.png -> DIR/cat.gradient.png).")
@click.option("--format", "out_format", type=click.Choice(["png", "npy"]),
              help="With -o DIR/: pictures or arrays (default: png for images, npy for arrays).")
@click.option("--preset", type=click.Choice(list(PRESETS)), help="Image preprocessing preset.")
@click.option("--size", callback=_size, metavar="H,W", help="Model input size of images.")
@click.option("--mean", callback=_floats, metavar="A,B,C", help="Per-channel mean on 0..1 pixels.")
@click.option("--std", callback=_floats, metavar="A,B,C", help="Per-channel std on 0..1 pixels.")
@click.option("--layout", type=click.Choice(LAYOUTS), help="Image layout of the model input.")
@click.option("--bgr", is_flag=True, help="The model takes BGR images.")
@click.option("--cmap", type=click.Choice(DIVERGING + SEQUENTIAL),
              help="Heatmap colours (default: bwr if signed, else inferno).")
@click.option("--sign", type=click.Choice(SIGNS), default="all", show_default=True,
              help="Which relevance to draw: both signs, one sign's magnitude, or |relevance|.")
@click.option("--view", type=click.Choice(VIEWS), default="overlay", show_default=True,
              help="The heatmap over the photo, alone, or photo | heatmap | overlay.")
@click.option("--overlay-alpha", type=click.FloatRange(0, 1), default=0.6, show_default=True,
              help="Opacity of the strongest relevance over the photo.")
@click.option("--clip", type=click.FloatRange(0, 100, min_open=True), default=99.5, show_default=True,
              metavar="PERCENTILE", help="Colours saturate at this percentile of |relevance|.")
@click.option("--plain", is_flag=True, help="The picture alone, at the input's size: no title or colour bar.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes; only the result lines.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--wrt", metavar="NAME[,NAME]", help="Attribute to these model inputs and hold the others fixed "
                                                    "(default: the batched float inputs).")
@click.option("--decoder", type=click.Choice(["yolov8", "yolov5", "yolox", "ssd", "detr", "rtdetr", "nms"]),
              help="Detector output layout for detection:I / box: targets (default: read off the output shapes).")
@click.option("--list-detections", is_flag=True, help="Print the detector's decoded detections (explains only "
                                                      "with a detection:I or box: target).")
@click.option("--text", help="Explain a token model on this text, per token (with --tokenizer; as explain-text).")
@click.option("--text-pair", help="A second text for sentence-pair models (with --text).")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="The model's tokenizer.json (with --text).")
@click.option("--reduce", type=click.Choice(["sum", "l2"]), help="Token score over the hidden axis (with --text; "
                                                                  "default sum; see explain-text --help).")
def explain(paths, method, layer, output, probability, providers, memory_budget, target, options, out,
            out_format, preset, size, mean, std, layout, bgr, cmap, sign, view, overlay_alpha, clip, plain, quiet, as_json, wrt,
            decoder, list_detections, text=None, text_pair=None, tokenizer=None, reduce=None):
    """Explain a model's decision on images or arrays (.npy/.npz).

    With no MODEL, the bundled EfficientNet-Lite0 explains its bundled photo of a cat, by
    default with lrp.epsilon_plus_flat (the method that best finds what the model looks at
    on that photo, by insertion - deletion); with a MODEL, -m defaults to gradient, which
    works on every model.
    """
    from .explainer import Explainer

    runtime.QUIET = quiet
    if text is not None or text_pair is not None or tokenizer is not None or reduce is not None:
        from .commands.text import run_text  # text in, tokens out (onnxplain.text)

        if len(paths) != 1:
            raise OptionError("with --text, give the model alone (the text is the input)")
        run_text(Path(paths[0]), method, layer, output, probability, providers, memory_budget, text, text_pair,
                 tokenizer, target, reduce, options=options, out=out, quiet=quiet, as_json=as_json)
        return
    given_method = click.get_current_context().get_parameter_source("method") != click.core.ParameterSource.DEFAULT
    from .datasets import is_source

    model_given = bool(paths) and not is_source(paths[0])
    if not given_method and not model_given and not options:
        method = DEFAULT_PICTURE_METHOD
    method = get_method(method).name  # Integrated-Gradients -> integrated_gradients
    get_method(method).resolve(options)  # fail on a bad option before loading anything
    out_dir = None
    if out is not None and (out.endswith(("/", os.sep)) or Path(out).is_dir()):
        out_dir, out = Path(out), None
    out = Path(out) if out is not None else None
    if out is not None and out.suffix.lower() not in (".png",) + ARRAY_SUFFIXES:
        raise OptionError(f"cannot write '{out.name}': --out must end in .png, .npy or .npz, or be a folder DIR/")
    if out_format is not None and out_dir is None:
        raise OptionError("--format chooses the files of -o DIR/; with -o FILE the suffix says it")
    model, sources = _split_paths(paths)
    explainer = Explainer(model, providers=providers, memory_budget=memory_budget)
    shapes = list(explainer.inputs.values())
    if not sources:
        if len(shapes) != 1 or len(shapes[0] or ()) != 4:
            raise InputError(f"no INPUT given: pass .npy/.npz arrays shaped like the model's inputs "
                             f"{', '.join(f'{k} {_shape(v)}' for k, v in explainer.inputs.items())}")
        sources = [models_dir() / DEFAULT_PHOTO]
    bundled = [str(p) for p in (model, sources[0]) if Path(p).parent == models_dir() and str(p) not in paths]
    if bundled and not quiet:
        click.echo(f"using the bundled {' and '.join(bundled)}", err=True)
    from .datasets import batches, check_present, for_model, input_rank, load_samples, open_inputs, samples_per_group

    # One reader for every command (onnxplain.datasets): folders, globs, shards, manifests.
    dataset = open_inputs(sources, rank=input_rank(explainer))
    pre = None
    if any(e.kind == "image" for e in dataset.entries):
        flags = dict(size=size, mean=mean, std=std, layout=layout, bgr=bgr or None)
        pre = _preprocess(explainer, preset, {k: v for k, v in flags.items() if v is not None})
    dataset = for_model(dataset, explainer, pre)
    check_present(dataset)
    pre = dataset.preprocess
    one_array_file = out is not None and out.suffix.lower() in ARRAY_SUFFIXES  # needs every sample at once
    group = len(dataset) if one_array_file else samples_per_group(explainer)
    pictures = dataset.entries[0].kind == "image"
    if out_dir is not None:
        suffix = "." + (out_format or ("png" if pictures else "npy"))
        out = out_dir / f"{{name}}.{method}{suffix}"  # per input: _write fills in each name
    out = Path(out or ("explanation.png" if pictures else "attribution.npy"))
    wrt = [w.strip() for w in wrt.split(",") if w.strip()] if wrt else None
    if method == "contrastive_excitation_backprop" and "saliency_layer" not in options and layer is None \
            and wrt is None:
        # The CLI's picture is the paper's: the contrast read at a mid layer (the Python
        # default, the map at the input, is the convention tested against the dual model).
        from .factorize import default_layer

        try:
            options["saliency_layer"] = default_layer(explainer)
        except OptionError:
            pass
        else:
            if not quiet:
                click.echo(f"note: contrastive excitation backprop read at -O saliency_layer={options['saliency_layer']}, "
                           "its positive part (-O positive=false for both signs; -O saliency_layer= for the signed "
                           "map at the input)", err=True)
    from .runkey import canonical

    # The record of each input is the dataset engine's index record (id, input, target,
    # predicted, score, method, options) with what explain adds (its file, labels, shape).
    shown_options = canonical(get_method(method).resolve(dict(options)))
    labels = _labels(model, explainer)
    look = dict(cmap=cmap, sign=sign, view=view, alpha=overlay_alpha, clip_percentile=clip, bar=not plain)
    written_names: dict = {}  # -o DIR/: names met so far, across the groups
    everything, noted = [], False
    for offset, entries in _offsets(batches(dataset.entries, group)):
        batch = load_samples(dataset, entries, display=True)
        records = _explain_group(explainer, model, batch, target, decoder, list_detections, output, probability,
                                 method, layer, wrt, options, quiet or noted, labels, out, pre, look, offset,
                                 len(dataset) > 1, written_names)
        if records is None:  # only the detections' list was asked for
            return
        noted = True
        for r, e in zip(records, batch.entries):
            r.update(id=e.id, input=e.path, method=method, options=shown_options)
        everything += records
        for r in records if not as_json else []:
            click.echo(_line(r, method))
    if as_json:
        click.echo(json.dumps([{"id": r.pop("id"), "input": r.pop("input"), **r} for r in everything], indent=2))


def _offsets(groups):
    offset = 0
    for g in groups:
        yield offset, g
        offset += len(g)


def _explain_group(explainer, model, batch, target, decoder, list_detections, output, probability, method, layer,
                   wrt, options, quiet, labels, out, pre, look, offset, numbered, written_names):
    """Explain one group of loaded inputs and write its files; their records (None where
    only the detections' list was asked for)."""
    from .detection import cli_target  # a detection decoded once (and listed), then explained

    target = cli_target(explainer, batch.batch, target, decoder, list_detections, click.echo, labels)
    if target is None and list_detections:  # only the list was asked for
        return None
    output = getattr(target, "output", None) or output
    # The scores of the tensor explained (a classifier's probabilities behind its integer
    # label and ZipMap, a regressor's value), not blindly the first output.
    scores = explainer.predict(batch.batch, explainer.explained_tensor(output, probability))
    target = batch.target(target)  # a manifest's target column where -t gives none
    explained_target = target
    if isinstance(target, list) and any(c is None for c in target):
        if np.ndim(scores) != 2:
            raise InputError("the dataset gives targets for some inputs only, and the explained output has no "
                             "class per sample to explain the others with; give every input a target")
        target = [int(p) if c is None else c for c, p in zip(target, np.asarray(scores).argmax(axis=1))]
        explained_target = target
    elif target is None and np.ndim(scores) == 2:
        # The predicted class from the scores just computed: attribute() need not run the
        # model once more to find it (a terminal softmax keeps the logits' argmax).
        explained_target = [int(c) for c in np.asarray(scores).argmax(axis=1)]
    attr = explainer.attribute(batch.batch, method=method, target=explained_target, layer=layer, output=output,
                               probability=probability, wrt=wrt, **options)
    if not quiet and get_method(method).kind == "white-box":
        from .rules.quantized import CONVENTION, has_quantized

        if has_quantized(explainer.graph):
            click.echo(f"note: {CONVENTION}", err=True)
            if isinstance(attr, np.ndarray) and isinstance(explained_target, list):
                from .validate import zero_gradient_note

                why = zero_gradient_note(explainer, batch.batch, explained_target, attr, batch.names)
                if why:
                    click.echo(f"note: the model's {why}", err=True)
    seed = None
    if target is not None and not isinstance(target, (int, list)):  # a position, region, mask...
        try:
            seed = explainer.seed_for(explainer._feeds(batch.batch), explainer.explained_tensor(output, probability),
                                      target)
        except OnnxplainError:
            seed = None  # no score to print; the attribution itself was computed above
    records = _records(batch.names, scores, target, attr, [None] * len(batch.names), labels, seed)
    titles = [f"{model.stem}: {_what(r)}, {method}" for r in records]
    from .dense_pictures import annotators  # the explained box or region drawn on the picture

    written = _write(out, attr, batch, layer or (wrt[0] if wrt and len(wrt) == 1 else next(iter(explainer.inputs))),
                     pre.layout if pre is not None and layer is None else None, titles, look,
                     annotators(explainer, batch.batch, target, output, probability, labels),
                     offset=offset, numbered=numbered, seen=written_names)
    from .dense_pictures import time_plots

    extra = time_plots(explainer, batch.batch, target, written, attr, output, probability)
    for r, f in zip(records, written):
        r["file"] = f
    for r, f in zip(records, extra):
        r["time_plot"] = f
    for r, d in zip(records, getattr(target, "chosen", None) or []):  # the detection's own score
        r["score"], r["detection"] = d.score, d.as_dict()
    return records

@main.command(epilog="\b\nExamples:\n  onnxplain methods\n  onnxplain methods --json | jq '.[].name'")
@click.option("--json", "as_json", is_flag=True, help="Print the methods as JSON.")
def methods(as_json):
    """List the attribution methods with their options and defaults."""
    if as_json:
        click.echo(json.dumps([{
            "name": m.name, "kind": m.kind, "description": m.description, "reference": m.reference,
            "options": [{"name": o.name, "default": _plain(o.default), "kind": getattr(o.kind, "__name__", o.kind),
                         "help": o.help, "choices": list(o.choices) if o.choices else None}
                        for o in m.options.values()],
        } for m in METHODS.values()], indent=2))
        return
    width = max(len(m.name) for m in METHODS.values()) + 2
    wrap = textwrap.TextWrapper(width=max(60, shutil.get_terminal_size().columns),
                                initial_indent=" " * (width + 12), subsequent_indent=" " * (width + 12))
    for m in METHODS.values():
        click.echo(f"{m.name:<{width}}{m.kind:<12}{m.description}")
        if m.options:
            click.echo(wrap.fill("  ".join(f"{o.name}={_fmt_value(o.default)}" for o in m.options.values())))
    click.echo("\nSet an option with --option KEY=VALUE, e.g. onnxplain explain -m integrated_gradients "
               "-O n_steps=20.")


@main.command(epilog="\b\nExamples:\n  onnxplain info\n  onnxplain info --json")
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
def info(as_json):
    """Versions and the onnxruntime providers that really work here (and why others do not)."""
    import onnx
    import onnxruntime as ort

    installed = list(ort.get_available_providers())
    problems = {p: runtime.provider_problem(p) for p in installed}
    working = [p for p in installed if problems[p] is None]
    facts = {"onnxplain": __version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__,
             "python": sys.version.split()[0], "installed_providers": installed, "working_providers": working,
             "problems": {p: why for p, why in problems.items() if why},
             "default_providers": runtime.default_providers(), "models": str(models_dir())}
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    click.echo(f"onnxplain {__version__}  onnxruntime {ort.__version__}  onnx {onnx.__version__}  "
               f"python {facts['python']}")
    click.echo(f"works      {', '.join(working)}")
    for p, why in facts["problems"].items():
        click.echo(f"not here   {p}: {why}")
    click.echo(f"default    {', '.join(facts['default_providers'])} (--providers or ONNXPLAIN_PROVIDERS to choose)")
    click.echo(f"models     {facts['models']}")


@main.command(epilog="\b\nExamples:\n  onnxplain inspect models/tiny_cnn.onnx\n"
                     "  onnxplain inspect models/tiny_cnn.onnx --json | jq '.layers[].tensor'")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect(model, as_json):
    """Show a model's inputs, outputs, layers (names usable as --layer) and missing rules."""
    from .explainer import Explainer

    e = Explainer(model)
    report = _inspect(e)
    report["model"] = str(model)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"model   {model} (opset {report['opset']})")
    for kind in ("inputs", "outputs"):
        for t in report[kind]:
            click.echo(f"{kind[:-1]:<7} {t['name']}  {t['dtype']}  {_shape(t['shape'])}")
    if report["preprocess"]:
        click.echo("preprocess  " + " ".join(f"{k}={_fmt_value(v)}" for k, v in report["preprocess"].items()))
    click.echo(f"\nlayers ({len(report['layers'])}); give a tensor to --layer:")
    click.echo(_table([(r["node"], r["op"], r["tensor"], _shape(r["shape"])) for r in report["layers"]],
                      ("node", "op", "tensor", "shape"), indent=2))
    start = report["analysed_from"]
    if start["kind"] is None:
        click.echo("\nno float tensor is computed from the inputs: white-box methods do not apply "
                   "(black-box methods do)")
        return
    click.echo(f"\noperators without a rule on the path from the {start['kind']} "
               f"({', '.join(start['tensors'])}), subgraphs included, per method family:")
    click.echo(_table([(f, ", ".join(ops) if ops else "none (all supported)")
                       for f, ops in report["unsupported"].items()], ("family", "missing"), indent=2))
    used = [(f, line) for f, lines in report["rules"].items() for line in lines or ()]
    if used:
        click.echo("\nrules of recurrent and quantized operators, per method family:")
        click.echo(_table(used, ("family", "rule"), indent=2))


@main.command(epilog="\b\nExamples:\n  onnxplain export models/tiny_cnn.onnx -m gradient -o explainer.onnx\n"
                     "  onnxplain export models/efficientnet_lite0.onnx -m guided_backprop "
                     "--layer /_swish_1/Clip_output_0 -o gb.onnx\n"
                     "  onnxplain export models/tiny_cnn.onnx -m lrp -O rules=Conv:gamma,first:zbox -O gamma=0.5")
@click.argument("model", type=click.Path(path_type=Path))
@model_options
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default="explainer.onnx",
              show_default=True, help="Where to save the explainer model.")
@click.option("--input-shape", callback=_ints, metavar="N,C,H,W", help="Fix the input shape in the export.")
@click.option("-O", "--option", "options", multiple=True, callback=_key_values, metavar="KEY=VALUE",
              help="Method option, repeatable (e.g. rules=Conv:gamma,first:zbox for -m lrp; epsilon=0.25).")
@click.option("--json", "as_json", is_flag=True, help="Print what to feed and read as JSON.")
def export(model, method, layer, output, probability, providers, memory_budget, out, input_shape, options, as_json):
    """Save a standalone explainer model that any onnxruntime can run."""
    from .explainer import Explainer

    method = get_method(method).name
    get_method(method).resolve(options)  # fail on a bad option before loading anything
    e = Explainer(model, providers=providers, memory_budget=memory_budget)
    spec = e.export(out, method=method, layer=layer, output=output, probability=probability,
                    input_shape=input_shape, **options)
    g = e.graph
    # Shapes as the written file declares them (--input-shape fixes them), else the model's.
    declared = {v.name: v for v in list(spec.model.graph.input) + list(spec.model.graph.output)}

    def shape(name, fallback):
        v = declared.get(name)
        if v is None or not v.type.tensor_type.HasField("shape"):
            return _shape(g.shape(fallback))
        return _shape([d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                       for d in v.type.tensor_type.shape.dim])

    rows = [("feed", n, _dtype(g, n), shape(n, n), "model input") for n in g.inputs]
    rows.append(("feed", spec.seed, "float32", shape(spec.seed, spec.explained),
                 f"weights of '{spec.explained}' to explain (one-hot row = that class)"))
    rows += [("read", n, _dtype(g, n), shape(n, n), "model output") for n in spec.forward_outputs]
    rows += [("read", n, _dtype(g, t), shape(n, t), f"attribution at '{t}'")
             for t, n in spec.attributions.items()]
    if as_json:
        def dims(text):
            return [int(d) if d.isdigit() else d for d in text.strip("(,)").replace(",)", ")").split(", ") if d]

        click.echo(json.dumps({"file": str(out), "method": method, "attributions": dict(spec.attributions),
                               **{kind: [{"name": r[1], "dtype": r[2], "shape": dims(r[3]), "meaning": r[4]}
                                         for r in rows if r[0] == kind[:-1]] for kind in ("feeds", "reads")}},
                              indent=2))
        return
    click.echo(f"wrote {out} ({method}, attribution at {', '.join(spec.attributions)})")
    click.echo(_table(rows, ("", "name", "dtype", "shape", "meaning")))
    feeds = ", ".join(f"'{n}': x" for n in g.inputs)
    click.echo(f"e.g. onnxruntime.InferenceSession('{out}').run(None, {{{feeds}, '{spec.seed}': seed}})")


# ----------------------------------------------------------------------------- helpers


def _split_paths(paths) -> tuple[Path, list[Path]]:
    """[MODEL] [INPUT]...: a first path that names no inputs (no image, shard, manifest,
    folder or glob) is the model."""
    from .datasets import is_source

    paths = [Path(p) for p in paths]
    if paths and not is_source(paths[0]):
        return paths[0], paths[1:]
    return models_dir() / DEFAULT_MODEL, paths


def _preprocess(explainer, preset, flags) -> Preprocess | None:
    """explicit flags > --preset > the model's metadata > inferred from the input shape."""
    if preset:
        base = Preprocess.preset(preset)
    else:
        meta = explainer.preprocess_metadata()
        base = Preprocess.from_metadata(meta) if meta else None
    if not flags:
        return base
    if base is None:
        shapes = list(explainer.inputs.values())
        base = Preprocess.infer(shapes[0]) if len(shapes) == 1 and shapes[0] and len(shapes[0]) == 4 \
            else Preprocess()
    if "size" in flags and base.resize:
        # Keep the resize margin of the base (256 for a 224 crop) at the new size.
        ratio = base.resize / min(base.size) if base.size else 1.0
        flags["resize"] = max(int(round(ratio * min(flags["size"]))), min(flags["size"]))
    return dataclasses.replace(base, **flags)


def _what(r) -> str:
    """What a picture explains, for its title."""
    if "value" in r:
        return f"value {r['value']:.4g}"
    t = r["target"]
    if isinstance(t, int):
        return f"class {_cls(t, r.get('target_label'))}"
    return "the output" if t is None else str(t)


def _write(out: Path, attr, batch, tensor, layout, titles=None, look=None, annotators=None, offset: int = 0,
           numbered: bool | None = None, seen: dict | None = None) -> list[str]:
    """Save the attribution; one PNG per sample (FILE_k.png, k counted from `offset`,
    when `numbered`: several inputs in all). Returns the file written for each sample."""
    if "{name}" in out.name:  # -o DIR/: one file per input, named after it
        return _write_per_input(out, attr, batch, tensor, layout, titles, look, seen)
    if out.suffix.lower() in ARRAY_SUFFIXES:
        if isinstance(attr, dict) or out.suffix.lower() == ".npz":
            attr = attr if isinstance(attr, dict) else {tensor: attr}
            out = out.with_suffix(".npz")
        return [str(save_array(out, attr))] * len(batch)
    if isinstance(attr, dict):
        raise OptionError(f"the model has several inputs ({', '.join(attr)}); save with --out FILE.npz")
    from .visualize import save_heatmap

    files = []
    numbered = len(attr) > 1 if numbered is None else numbered
    for i in range(len(attr)):
        k = i + offset  # numbered across the groups of a long list of inputs
        path = out.with_name(f"{out.stem}_{k}{out.suffix}") if numbered else out
        image = batch.images[i] if batch.images else None
        look = dict(look or {})
        if annotators:
            look["annotate"] = annotators[i]
        title = titles[i] if titles and look.get("bar", True) else None
        save_heatmap(path, attr[i], image=image, layout=layout, title=title, **look)
        files.append(str(path))
    return files


def _write_per_input(pattern: Path, attr, batch, tensor, layout, titles, look, seen=None) -> list[str]:
    """DIR/NAME.METHOD.png (or .npy) for each input, NAME its path under the folder given
    without the suffix, a file's stem, a manifest's id or a shard's stem_row; a name met
    twice (in `seen`, kept across groups) gets _2, _3..."""
    seen = {} if seen is None else seen
    files = []
    for i, name in enumerate(batch.names):
        name = _safe_name(name)
        seen[name] = seen.get(name, 0) + 1
        stem = name if seen[name] == 1 else f"{name}_{seen[name]}"
        path = pattern.parent / pattern.name.replace("{name}", stem)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".npy":
            one = {k: v[i:i + 1] for k, v in attr.items()} if isinstance(attr, dict) else attr[i:i + 1]
            path = path.with_suffix(".npz") if isinstance(one, dict) else path
            files.append(str(save_array(path, one)))
            continue
        if isinstance(attr, dict):
            raise OptionError(f"the model has several inputs ({', '.join(attr)}); use --format npy")
        from .visualize import save_heatmap

        look = dict(look or {})
        title = titles[i] if titles and look.get("bar", True) else None
        save_heatmap(path, attr[i], image=batch.images[i] if batch.images else None, layout=layout, title=title,
                     **look)
        files.append(str(path))
    return files


def _safe_name(name: str) -> str:
    """A sample's name as a relative path inside the output folder: its folders kept, no
    '..', no absolute path, characters a file name cannot hold replaced."""
    parts = [re.sub(r"[^\w.+=@,-]", "_", p) for p in re.split(r"[/\\]", str(name)) if p not in ("", ".", "..")]
    return "/".join(parts) or "input"


def _labels(model: Path, explainer) -> list[str] | None:
    name = (explainer.preprocess_metadata() or {}).get("labels")
    if not isinstance(name, str):
        return None
    folder = model.resolve().parent
    path = (folder / name).resolve()
    if folder not in path.parents or not path.is_file():  # a model file must not point elsewhere
        return None
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


def _records(names, scores, target, attr, files, labels, seed=None) -> list[dict]:
    """One result per sample. `scores` is the explained tensor (batch first): a (batch,
    classes) tensor gives a predicted class, one number per sample is a value (a
    regressor's), anything else (a sequence) neither. The explained score is the seed's
    weighted sum of the explained tensor (the class's score for a class)."""
    scores = np.asarray(scores)
    n = len(names)
    flat = scores.reshape(len(scores), -1) if scores.ndim else scores.reshape(1, 1)
    value = flat.shape[1] == 1 and np.issubdtype(flat.dtype, np.number)
    # A predicted class only for a (batch, classes) output: on (batch, positions, vocab) an
    # argmax would name a position.
    classes = not value and scores.ndim >= 2 and sum(d > 1 for d in scores.shape[1:]) <= 1
    predicted = [int(c) for c in flat.argmax(axis=1)] if classes else [None] * n
    targets = target if isinstance(target, list) else [target] * n
    targets = [getattr(t, "text", t) for t in targets]  # a Target by its spelling
    shapes = {k: v.shape[1:] for k, v in attr.items()} if isinstance(attr, dict) else {None: attr.shape[1:]}
    out = []
    for i, name in enumerate(names):
        t = predicted[i] if targets[i] is None else targets[i]
        r = {"sample": name}
        if value:
            r["value"] = float(flat[i, 0])
        else:
            r["predicted"] = predicted[i]
        r["target"] = t
        score = None
        if value and t is None:
            score = float(flat[i, 0])
        elif isinstance(t, int) and len(flat) == n and -flat.shape[1] <= t < flat.shape[1]:
            score = float(flat[i, t])
        elif seed is not None and np.shape(seed)[0] == n and np.size(seed[i]) == flat.shape[1] and len(flat) == n:
            score = float(np.dot(np.asarray(seed[i], np.float64).ravel(), flat[i].astype(np.float64)))
        r["score"] = score
        r["shape"] = list(next(iter(shapes.values())))
        r["file"] = files[i]
        for key, c in (("predicted_label", predicted[i]), ("target_label", t)):
            if labels and isinstance(c, int) and -len(labels) <= c < len(labels):
                r[key] = labels[c]
        out.append(r)
    return out


def _line(r, method) -> str:
    """The result line of one sample: what the model said, what was explained, where it went."""
    score = "" if r.get("score") is None else f" (score {r['score']:.4g})"
    if "value" in r:
        said = f"value {r['value']:.4g}, explained "
        said += ("the value" if r["target"] is None else _cls(r["target"], r.get("target_label")))
        score = ""
    elif r["predicted"] is not None:
        said = (f"predicted {_cls(r['predicted'], r.get('predicted_label'))}, "
                f"explained {_cls(r['target'], r.get('target_label'))}")
    else:
        said = "explained " + ("the output" if r["target"] is None else _cls(r["target"], r.get("target_label")))
    return f"{r['sample']}: {said} with {method}{score}: attribution {tuple(r['shape'])} -> {r['file']}"


def _inspect(e) -> dict:
    from .compile import Composite, _depends_on, unsupported
    from .graph import find_embeddings
    from .methods import gradients, relevance

    g = e.graph
    # The composites the white-box methods use by default, then any others the method
    # modules define.
    defaults = [gradients.GRADIENT, gradients.GUIDED, gradients.DECONVNET]
    defaults += [relevance.zennit_composite(name) for name in relevance.ZENNIT]
    defaults += [relevance.deep_taylor_composite(), relevance.excitation_composite(False),
                 relevance.excitation_composite(True), relevance.DeepLiftComposite()]
    families = {}
    for c in defaults + _composites():
        families.setdefault(c.name, c)
    explained = e.explained_tensor()
    # Where white-box methods start: the float inputs, else the embedding outputs, else the
    # first float tensor computed from the inputs (none: white-box methods do not apply).
    embeddings = find_embeddings(g)
    wrt, start = [n for n in g.inputs if g.is_float(n)], "float inputs"
    if not wrt and embeddings:
        wrt, start = embeddings, "embedding outputs"
    elif not wrt:
        dep = _depends_on(g, g.inputs)
        first = next((o for n in g.nodes for o in n.output
                      if o and o in dep and g.is_float(o) and g.constant(o) is None), None)
        wrt, start = ([first], "first float tensor computed from the inputs") if first else ([], None)
    layers = [{"node": n.name, "op": n.op_type, "tensor": o, "shape": g.shape(o)}
              for n in g.nodes for o in n.output if o and g.is_float(o) and g.constant(o) is None]
    return {
        "opset": g.opset,
        "inputs": [{"name": n, "dtype": _dtype(g, n), "shape": g.shape(n)} for n in g.inputs],
        "outputs": [{"name": n, "dtype": _dtype(g, n), "shape": g.shape(n)} for n in g.outputs],
        "preprocess": e.preprocess_metadata(),
        "layers": layers,
        "embeddings": embeddings,
        "analysed_from": {"tensors": wrt, "kind": start},
        "unsupported": {k: unsupported(g, c, wrt, explained) if wrt else None for k, c in families.items()
                        if isinstance(c, Composite)},
        "rules": {k: _rules_used(g, c, wrt, explained) if wrt else None for k, c in families.items()
                  if isinstance(c, Composite)},
    }


def _rules_used(graph, composite, wrt, explained) -> list:
    """'Op: what serves it' for the operators on the explained path whose rule says what it
    does under `composite` (recurrent and quantized operators: the convention or published
    rule, or the exact gradient where that is what the method defines)."""
    from .compile import active_nodes

    found = set()
    for n in active_nodes(graph, wrt, explained):
        try:
            rule = composite.rule(n, graph)
        except Exception:  # a rule the composite cannot give is reported as missing instead
            continue
        describe = getattr(getattr(rule, "func", rule), "describe", None)
        text = describe(composite, n, graph) if describe else None
        if text:
            found.add(f"{n.op_type}: {text}")
    return sorted(found)


def _composites() -> list:
    """Module-level composites of the method modules (LRP and others, as they are added)."""
    from . import methods as pkg
    from .compile import Composite

    found = []
    for mod in list(vars(pkg).values()):
        if getattr(mod, "__name__", "").startswith(pkg.__name__ + "."):
            found += [v for v in vars(mod).values() if isinstance(v, Composite)]
    return found


def _dtype(graph, name) -> str:
    from onnx import helper

    elem = graph.elem_type(name)
    return str(helper.tensor_dtype_to_np_dtype(elem)) if elem else "?"


def _shape(shape) -> str:
    if shape is None:
        return "(?)"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _cls(c, label) -> str:
    return "-" if c is None else f"{c} ({label})" if label else str(c)


def _plain(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    return list(v) if isinstance(v, tuple) else v


def _fmt_value(v) -> str:
    if isinstance(v, (tuple, list)):
        return ",".join(map(_fmt_value, v))
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _table(rows, headers, indent: int = 0) -> str:
    rows = [tuple(map(str, r)) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(headers, *rows)]
    lines = [" " * indent + "  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in [headers, *rows]]
    return "\n".join(lines)


def _load_commands() -> None:
    import importlib
    import pkgutil

    from . import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        for command in getattr(module, "COMMANDS", ()):
            main.add_command(command)


_load_commands()

if __name__ == "__main__":
    main()
