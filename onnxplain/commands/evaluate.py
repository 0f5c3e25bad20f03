"""`onnxplain evaluate`: which attribution method is best for this model? A table of
metrics per method (printed and JSON), the curves as a PNG, methods ranked.

Also the batch machinery the evaluate, validate and report commands share: INPUTS may be
folders; inputs are processed one file at a time under a progress bar and each file's
record is appended to a JSON-lines log as soon as it is done, so an interrupted run loses
nothing and `--resume` skips the files already in the log.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from .. import runtime
from ..cli import _bytes, _fail, _labels, _preprocess, _providers, _target, models_dir, DEFAULT_MODEL, DEFAULT_PHOTO
from ..errors import InputError, OptionError
from ..io import ARRAY_SUFFIXES, IMAGE_SUFFIXES, PRESETS, load_inputs

DEFAULT_METHODS = "gradient,input_x_gradient,integrated_gradients,lrp.epsilon_plus"
DEFAULT_METRICS = "deletion,insertion,selectivity,infidelity,max_sensitivity"
# Settings that keep the defaults quick on a CPU; every one can be changed with --setting.
DEFAULT_SETTINGS = {"max_sensitivity": {"n_samples": 5}, "continuity": {"shifts": 6},
                    "randomization": {"points": 4}}
INPUT_SUFFIXES = IMAGE_SUFFIXES + ARRAY_SUFFIXES

__all__ = ["COMMANDS", "split_models", "input_files", "Batch", "method_options", "log_path"]


# ----------------------------------------------------------------------------- shared by the commands


def split_models(paths, at_most: int) -> tuple[list[Path], list[Path]]:
    """Leading paths that are model files (not images, arrays or folders), then inputs."""
    paths = [Path(p) for p in paths]
    models = []
    for p in paths:
        if len(models) == at_most or p.is_dir() or p.suffix.lower() in INPUT_SUFFIXES:
            break
        models.append(p)
    return models, paths[len(models):]


def input_files(paths) -> list[Path]:
    """Files given, with folders expanded to their image/array files (sorted, not recursive)."""
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in INPUT_SUFFIXES)
            if not found:
                raise InputError(f"folder {p} holds no images or .npy/.npz files")
            out += found
        else:
            out.append(p)
    return out


def log_path(out: Path) -> Path:
    return out.with_suffix(".jsonl")


class Batch:
    """One model's inputs, file by file: preprocessing chosen once, a progress bar, and
    the JSON-lines log appended per file (read back with `resume`)."""

    def __init__(self, explainer, files, preset=None, log: Path | None = None, resume: bool = False):
        self.explainer = explainer
        self.files = files
        shapes = list(explainer.inputs.values())
        self.shape = shapes[0] if len(shapes) == 1 else None
        self.pre = None
        if any(f.suffix.lower() in IMAGE_SUFFIXES for f in files):
            self.pre = _preprocess(explainer, preset, {})
        self.log = log
        self.done = []
        if log is not None and resume and log.is_file():
            for i, line in enumerate(log.read_text().splitlines()):
                if line.strip():
                    try:
                        self.done.append(json.loads(line))
                    except ValueError:
                        raise InputError(f"{log} line {i + 1} is not JSON; remove it or rerun without --resume") \
                            from None
        elif log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("")

    def run(self, process, label: str) -> list[dict]:
        """process(path, inputs) -> record (JSON-able dict); records of all files, old and new."""
        seen = {r.get("input") for r in self.done}
        todo = [f for f in self.files if str(f) not in seen]
        records = list(self.done)
        with runtime.progress(len(todo), label) as bar:
            for f in todo:
                inputs = load_inputs([f], self.pre, self.shape)
                record = {"input": str(f), **process(f, inputs)}
                records.append(record)
                if self.log is not None:
                    with self.log.open("a") as fh:
                        fh.write(json.dumps(record) + "\n")
                bar.update(1)
        return records


def _parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if "," in text:
        return tuple(_parse_value(t) for t in text.split(",") if t.strip())
    return {"true": True, "false": False}.get(text.lower(), text)


def scoped_pairs(values, scopes, what: str) -> dict:
    """'SCOPE:KEY=VALUE' items -> {scope: {key: value-string}}."""
    out = {}
    for item in values:
        scope, sep, rest = item.partition(":")
        key, eq, value = rest.partition("=")
        if not sep or not eq or not key.strip():
            raise click.BadParameter(f"'{item}' is not {what}:KEY=VALUE (e.g. integrated_gradients:n_steps=16)")
        if scope not in scopes:
            raise click.BadParameter(f"'{item}': '{scope}' is not one of the chosen {what}s ({', '.join(scopes)})")
        out.setdefault(scope, {})[key.strip()] = value.strip()
    return out


def method_options(methods, option_items) -> dict:
    """{method: resolved options} from METHOD:KEY=VALUE items (checked before any work)."""
    from ..methods.base import get_method

    given = scoped_pairs(option_items, methods, "method")
    out = {}
    for m in methods:
        resolved = get_method(m).resolve(given.get(m, {}))
        out[m] = {k: v for k, v in resolved.items() if k in given.get(m, {})}
    return out


def names_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise OptionError(f"give at least one {what}")
    return list(dict.fromkeys(items))


def load_model(paths, at_most: int, quiet: bool):
    """(model paths, input files): the bundled model and photo where none are given."""
    models, inputs = split_models(paths, at_most)
    bundled = []
    if not models:
        models = [models_dir() / DEFAULT_MODEL]
        bundled.append(str(models[0]))
    if not inputs:
        inputs = [models_dir() / DEFAULT_PHOTO]
        bundled.append(str(inputs[0]))
    if bundled and not quiet:
        click.echo(f"using the bundled {' and '.join(bundled)}", err=True)
    return models, input_files(inputs)


# ----------------------------------------------------------------------------- evaluation per file


def evaluate_record(explainer, x, methods: dict, metric_names, settings, target, label=None) -> dict:
    """The JSON record of one batch: per method and metric the per-sample values, the
    curves (x and per-sample y) and the extras."""
    from .. import metrics as M

    results = M.evaluate(explainer, x, methods, metric_names, target=target, settings=settings, label=label)
    rec = {"metrics": {}, "curves": {}, "extra": {}}
    for method, scores in results.items():
        rec["metrics"][method] = {k: s.values.tolist() for k, s in scores.items()}
        rec["curves"][method] = {k: {"x": s.curve_x.tolist(), "y": s.curve.tolist(), "xlabel": s.xlabel}
                                 for k, s in scores.items() if s.curve is not None}
        rec["extra"][method] = {k: {e: (v.tolist() if isinstance(v, np.ndarray) else v) for e, v in s.extra.items()
                                    if e != "lerf_curve"} for k, s in scores.items() if s.extra}
    return rec


def aggregate(records) -> tuple[dict, dict]:
    """(table {method: {metric: mean over all samples}}, curves {metric: {method: (x, mean y)}})."""
    values, curves = {}, {}
    for r in records:
        for method, ms in r.get("metrics", {}).items():
            for metric, v in ms.items():
                values.setdefault(method, {}).setdefault(metric, []).extend(v)
        for method, cs in r.get("curves", {}).items():
            for metric, c in cs.items():
                if metric == "continuity":
                    continue  # jumps are summarised by the table
                curves.setdefault(metric, {}).setdefault(method, [c["x"], []])[1].extend(c["y"])
    table = {m: {k: float(np.mean(v)) for k, v in ms.items()} for m, ms in values.items()}
    mean_curves = {metric: {m: (np.asarray(x), np.mean(np.asarray(ys, float), axis=0)) for m, (x, ys) in d.items()}
                   for metric, d in curves.items()}
    return table, mean_curves


def metric_settings(metric_names, setting_items) -> dict:
    from ..metrics import METRICS

    bad = [m for m in metric_names if m not in METRICS]
    if bad:
        raise OptionError(f"unknown metric(s) {', '.join(bad)}; choose from {', '.join(METRICS)}")
    given = scoped_pairs(setting_items, metric_names, "metric")
    out = {m: dict(DEFAULT_SETTINGS.get(m, {})) for m in metric_names}
    for m, kv in given.items():
        out[m].update({k: _parse_value(v) for k, v in kv.items()})
    return out


def batch_options(fn):
    for deco in reversed([
        click.option("--preset", type=click.Choice(list(PRESETS)), help="Image preprocessing preset "
                     "(default: the model's metadata)."),
        click.option("--providers", callback=_providers, metavar="P1,P2", help="onnxruntime providers."),
        click.option("--memory-budget", callback=_bytes, metavar="SIZE", help="Memory one batched run may use."),
        click.option("--resume", is_flag=True, help="Skip inputs already in the JSON-lines log of an earlier run."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes."),
    ]):
        fn = deco(fn)
    return fn


# ----------------------------------------------------------------------------- the command


@click.command(epilog="""\b
Examples:
  onnxplain evaluate                                   # bundled EfficientNet on its cat photo
  onnxplain evaluate models/tiny_cnn.onnx images/ --methods gradient,occlusion \\
      -O occlusion:window=8,8 --metrics deletion,insertion,selectivity --out results.json
  onnxplain evaluate model.onnx photos/ --resume       # carry on after an interruption

\b
Metrics (arrow: better direction): deletion (AUC, lower), insertion (AUC, higher),
selectivity (AOPC, higher), road (LeRF - MoRF, higher), infidelity (lower),
max_sensitivity (lower), continuity (max jump, lower), randomization (mean Spearman, lower).
Per-file results are appended to OUT with suffix .jsonl as they are done.
""")
@click.argument("paths", nargs=-1, metavar="[MODEL] [INPUT|FOLDER]...")
@click.option("--methods", default=DEFAULT_METHODS, show_default=True, help="Methods to compare, comma-separated.")
@click.option("--metrics", "metric_names", default=DEFAULT_METRICS, show_default=True,
              help="Metrics, comma-separated.")
@click.option("-O", "--option", "options", multiple=True, metavar="METHOD:KEY=VALUE",
              help="Option of one method, repeatable (e.g. integrated_gradients:n_steps=16).")
@click.option("-S", "--setting", "settings", multiple=True, metavar="METRIC:KEY=VALUE",
              help="Setting of one metric, repeatable (e.g. deletion:steps=20, selectivity:patch=16).")
@click.option("-t", "--target", callback=_target, metavar="INT|pred", help="Class to explain (default: predicted).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default="evaluation.json",
              show_default=True, help="JSON results (the per-file log goes next to it as .jsonl).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="PNG of the curves (default: OUT with suffix .png).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of the table.")
@batch_options
def evaluate(paths, methods, metric_names, options, settings, target, out, plot, as_json, preset, providers,
             memory_budget, resume, quiet):
    """Rank attribution methods on a model by faithfulness, robustness and sanity metrics."""
    from ..explainer import Explainer
    from ..report import format_table, plot_curves, rank_methods, text_table
    from ..visualize import save_png

    runtime.QUIET = quiet
    methods = names_list(methods, "method")
    metric_names = names_list(metric_names, "metric")
    opts = method_options(methods, options)
    sets = metric_settings(metric_names, settings)
    if out.suffix.lower() != ".json":
        raise OptionError(f"--out must end in .json, got '{out.name}'")
    plot = plot or out.with_suffix(".png")
    (model,), files = load_model(paths, 1, quiet)
    explainer = Explainer(model, providers=providers, memory_budget=memory_budget)
    batch = Batch(explainer, files, preset, log_path(out), resume)

    def process(path, inputs):
        rec = evaluate_record(explainer, inputs.batch, opts, metric_names, sets, target)
        rec["samples"] = inputs.names
        return rec

    records = batch.run(process, "evaluating")
    table, curves = aggregate(records)
    ranking = rank_methods(table)
    result = {"model": str(model), "inputs": [r["input"] for r in records], "methods": methods,
              "metrics": metric_names, "settings": sets, "options": opts, "table": table,
              "ranking": [{"method": m, "mean_rank": r} for m, r in ranking], "records": records}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if curves:
        save_png(plot, plot_curves(curves))
    if as_json:
        click.echo(json.dumps({k: result[k] for k in ("model", "inputs", "table", "ranking")}, indent=2))
        return 0
    n = sum(len(r.get("samples", [])) for r in records)
    click.echo(f"{model.name}: {n} input(s), class explained: {'predicted' if target is None else target}")
    click.echo(text_table(*format_table(table, ranking)))
    click.echo(f"best: {ranking[0][0]}  |  results {out}" + (f", curves {plot}" if curves else "")
               + f", per-input log {log_path(out)}")
    return 0


COMMANDS = [evaluate]
