"""`onnxplain evaluate`: which attribution method is best for this model? A table of
metrics per method (printed and JSON), the curves as a PNG, methods ranked.

Also the batch machinery the evaluate, validate and report commands share: INPUTS are
read through `onnxplain.datasets` (images, .npy/.npz shards, folders, globs, CSV/JSONL
manifests with a path and an optional target column, Parquet tables); they are processed
one input file at a time (the rows of a shard together, under the memory budget) under a
progress bar and each batch's record is appended to a JSON-lines log as soon as it is
done, so an interrupted run loses nothing and `--resume` skips the batches already in the
log.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from .. import runtime
from ..cli import (TARGET_HELP, _bytes, _fail, _labels, _preprocess, _providers, _target, models_dir, DEFAULT_MODEL,
                   DEFAULT_PHOTO)
from ..datasets import (SOURCE_SUFFIXES, batches, check_present, for_model, input_rank, is_source, load_samples,
                        open_inputs, samples_per_group)
from ..errors import InputError, OptionError
from ..io import PRESETS

DEFAULT_METHODS = "gradient,input_x_gradient,integrated_gradients,lrp.epsilon_plus"
DEFAULT_METRICS = "deletion,insertion,selectivity,infidelity,max_sensitivity"
# Settings that keep the defaults quick on a CPU; every one can be changed with --setting.
DEFAULT_SETTINGS = {"max_sensitivity": {"n_samples": 5}, "continuity": {"shifts": 6},
                    "randomization": {"points": 4}}
INPUT_SUFFIXES = SOURCE_SUFFIXES

__all__ = ["COMMANDS", "split_models", "Batch", "method_options", "log_path", "explained"]


# ----------------------------------------------------------------------------- shared by the commands


def split_models(paths, at_most: int) -> tuple[list[Path], list[Path]]:
    """Leading paths that are model files (not inputs: images, shards, manifests, folders,
    globs), then the inputs."""
    paths = [Path(p) for p in paths]
    models = []
    for p in paths:
        if len(models) == at_most or is_source(p):
            break
        models.append(p)
    return models, paths[len(models):]


def log_path(out: Path) -> Path:
    return out.with_suffix(".jsonl")


def _group_id(ids) -> str:
    return "\n".join(ids)


class Batch:
    """One model's inputs, read through `onnxplain.datasets` and processed batch by batch
    (`groups`: an input file's samples together, at most what the memory budget holds at
    once): preprocessing chosen once, a progress bar, and the JSON-lines log appended per
    batch. With `resume`, a logged record is reused only where its run key
    (`onnxplain.runkey`) is the key of what is asked now. Every input file must be there
    before any work starts; one that cannot be read stops the run (exit 2)."""

    def __init__(self, explainer, sources, preset=None, log: Path | None = None, resume: bool = False,
                 display: bool = False):
        self.explainer = explainer
        dataset = open_inputs(sources, rank=input_rank(explainer))
        pre = _preprocess(explainer, preset, {}) if any(e.kind == "image" for e in dataset.entries) else None
        self.dataset = for_model(dataset, explainer, pre)
        check_present(self.dataset)
        self.pre = self.dataset.preprocess
        self.groups = batches(self.dataset.entries, samples_per_group(explainer), by_file=True)
        self.display = display
        self.log = log
        self.done = {}  # the ids of a batch -> its last logged record
        if log is not None and resume and log.is_file():
            for i, line in enumerate(log.read_text().splitlines()):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except ValueError:
                        raise InputError(f"{log} line {i + 1} is not JSON; remove it or rerun without --resume") \
                            from None
                    if isinstance(record.get("ids"), list):
                        self.done[_group_id(record["ids"])] = record
        elif log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("")

    def __len__(self) -> int:
        return len(self.dataset)

    def previous(self, entries) -> dict | None:
        """The logged record of these inputs from an earlier run (with --resume), whatever its key."""
        return self.done.get(_group_id(e.id for e in entries))

    def digests(self, entries) -> list:
        """What identifies each input for a run key: its file's bytes, row, preprocessing
        and the dataset's target for it."""
        return [dict(e.digest(self.pre), dataset_target=e.target) for e in entries]

    def run(self, process, label: str, key=None) -> list[dict]:
        """process(samples) -> record (JSON-able dict), samples a `datasets.Samples`;
        key(entries) -> that batch's run key. Returns the records of this run's batches,
        in order: reused where the logged key matches, computed (and logged) otherwise.
        Without `key` nothing is reused."""
        records, todo = {}, []
        for entries in self.groups:
            gid = _group_id(e.id for e in entries)
            old = self.previous(entries)
            k = key(entries) if key is not None else None
            if old is not None and k is not None and old.get("key") == k:
                records[gid] = old
            else:
                todo.append((gid, entries, k))
        with runtime.progress(sum(len(t[1]) for t in todo), label) as bar:
            for gid, entries, k in todo:
                samples = load_samples(self.dataset, entries, display=self.display)
                record = {"input": entries[0].path, "ids": samples.ids, **process(samples)}
                if k is not None:
                    record["key"] = k
                records[gid] = record
                if self.log is not None:
                    with self.log.open("a") as fh:
                        fh.write(json.dumps(record) + "\n")
                bar.update(len(entries))
        return [records[_group_id(e.id for e in entries)] for entries in self.groups]


def samples_target(explainer, samples, target):
    """The target of a batch: -t where given; else a manifest's targets, the predicted
    class filling in for inputs without one; else None (the predicted classes)."""
    t = samples.target(target)
    if isinstance(t, list) and any(c is None for c in t):
        scores = np.asarray(explainer.predict(samples.batch, explainer.explained_tensor()))
        if scores.ndim != 2:
            raise InputError("the dataset gives targets for some inputs only, and the explained output has no "
                             "class per sample to explain the others with; give every input a target")
        t = [int(p) if c is None else c for c, p in zip(t, scores.argmax(axis=1))]
    return t


def explained(explainer, samples, target, scorer=None) -> list[dict]:
    """Per sample what was explained, as the dataset engine's index records say it: id,
    input, target (class, or the target's spelling), predicted class (None where the
    output has no class axis) and the explained score (the raw score of the target: the
    class's logit, the seed's weighted sum of the output)."""
    from .. import metrics as M
    from ..target import as_target

    scorer = scorer or M.Scorer(explainer, samples.batch, target, probability=False)
    scores = np.asarray(explainer.predict(samples.batch, explainer.explained_tensor()))
    n = len(samples)
    classes = scores.ndim == 2 and scores.shape[0] == n and scores.shape[1] > 1
    predicted = [int(c) for c in scores.argmax(axis=1)] if classes else [None] * n
    if scorer.classes is not None:
        targets = [int(c) for c in np.asarray(scorer.classes).reshape(-1)[:n]]
    else:
        targets = [as_target(target).text] * n
    return [{"id": e.id, "input": e.path, "sample": name, "target": t, "predicted": p, "score": float(v)}
            for e, name, t, p, v in zip(samples.entries, samples.names, targets, predicted, scorer.original)]


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
    """(model paths, input sources): the bundled model and photo where none are given."""
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
    return models, inputs


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
    from ..metrics import METRICS, check_settings, parse_setting

    bad = [m for m in metric_names if m not in METRICS]
    if bad:
        raise OptionError(f"unknown metric(s) {', '.join(bad)}; choose from {', '.join(METRICS)}")
    given = scoped_pairs(setting_items, metric_names, "metric")
    out = {m: dict(DEFAULT_SETTINGS.get(m, {})) for m in metric_names}
    for m, kv in given.items():
        out[m].update({k: parse_setting(m, k, v) for k, v in kv.items()})
    check_settings(metric_names, out)
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


class CellKeys:
    """The run key of each (method, metric) cell of an input's record: a resumed run
    reuses the cells whose key matches and computes the rest, so changing one method's
    options recomputes only that method."""

    def __init__(self, model, methods, options, metric_names, settings, target, preset, digests):
        from ..runkey import method_options as full_options, metric_settings as full_settings, model_digest

        self.model = model_digest(model)
        self.methods, self.metric_names = list(methods), list(metric_names)
        self.options = {m: full_options(m, options.get(m)) for m in methods}
        self.settings = {k: full_settings(k, settings.get(k)) for k in metric_names}
        self.target, self.preset = target_text(target), preset
        self.digests = digests  # entries -> what identifies each input (Batch.digests)

    def cells(self, entries) -> dict:
        from ..runkey import run_key

        ident = self.digests(entries)
        return {m: {k: run_key(model=self.model, method=m, options=self.options[m], metric=k,
                               settings=self.settings[k], target=self.target, input=ident, preset=self.preset)
                    for k in self.metric_names} for m in self.methods}

    def key(self, entries) -> str:
        from ..runkey import run_key

        return run_key(cells=self.cells(entries))

    def record(self, samples, old, compute) -> dict:
        """The record of one batch: old cells whose key matches, the others from
        compute(method, metric names) -> an evaluate_record."""
        keys = self.cells(samples.entries)
        old = old if old is not None and old.get("samples") == samples.names else {}
        rec = {"metrics": {}, "curves": {}, "extra": {}, "keys": keys, "samples": samples.names}
        for m in self.methods:
            kept = [k for k in self.metric_names if old.get("keys", {}).get(m, {}).get(k) == keys[m][k]]
            todo = [k for k in self.metric_names if k not in kept]
            new = compute(m, todo) if todo else {}
            for part in ("metrics", "curves", "extra"):
                cells = {}
                for k in self.metric_names:
                    value = (old if k in kept else new).get(part, {}).get(m, {}).get(k)
                    if value is not None:
                        cells[k] = value
                rec[part][m] = cells
        return rec


def check_target(explainer, target) -> None:
    """A target that cannot fit the explained output fails before any work (its shape is
    known from the model without running it, where shapes are static)."""
    from ..target import as_target

    t = as_target(target)
    if hasattr(t, "resolve"):  # a detection: checked where it is decoded, on the inputs
        return
    shape = explainer.graph.shape(explainer.explained_tensor())
    if shape is None or not shape or not all(isinstance(d, int) for d in shape[1:]):
        return
    shape = (1,) + tuple(shape[1:])
    t.seed(shape, 0, np.zeros(shape, np.float32) if t.needs_output(shape) else None)


def target_text(target) -> str:
    from ..runkey import target_text as text

    return text(target)


def _explained(target) -> str:
    return "predicted class" if target is None else target_text(target)


# ----------------------------------------------------------------------------- the command


@click.command(epilog="""\b
Examples:
  onnxplain evaluate                                   # bundled EfficientNet on its cat photo
  onnxplain evaluate models/tiny_cnn.onnx models/ --methods gradient,occlusion \\
      -O occlusion:window=8,8 --metrics deletion,insertion,selectivity --out results.json
  onnxplain evaluate models/tiny_cnn.onnx models/ --out results.json --resume  # carry on

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
@click.option("-t", "--target", callback=_target, metavar="TARGET", help=TARGET_HELP)
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
    (model,), sources = load_model(paths, 1, quiet)
    explainer = Explainer(model, providers=providers, memory_budget=memory_budget)
    check_target(explainer, target)
    batch = Batch(explainer, sources, preset, log_path(out), resume)
    keys = CellKeys(model, methods, opts, metric_names, sets, target, preset, batch.digests)

    def process(samples):
        t = samples_target(explainer, samples, target)
        rec = keys.record(samples, batch.previous(samples.entries),
                          lambda m, names: evaluate_record(explainer, samples.batch, {m: opts[m]}, names, sets, t))
        return {**rec, "explained": explained(explainer, samples, t)}

    records = batch.run(process, "evaluating", keys.key)
    table, curves = aggregate(records)
    ranking = rank_methods(table)
    result = {"model": str(model), "inputs": [r["input"] for r in records], "methods": methods,
              "metrics": metric_names, "settings": sets, "options": opts, "target": target_text(target),
              "table": table,
              "ranking": [{"method": m, "mean_rank": r} for m, r in ranking],
              "samples": [x for r in records for x in r.get("explained", [])], "records": records}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if curves:
        save_png(plot, plot_curves(curves))
    if as_json:
        click.echo(json.dumps({k: result[k] for k in ("model", "inputs", "table", "ranking", "samples")}, indent=2))
        return 0
    n = sum(len(r.get("samples", [])) for r in records)
    click.echo(f"{model.name}: {n} input(s), explained: {_explained(target)}")
    click.echo(text_table(*format_table(table, ranking)))
    click.echo(f"best: {ranking[0][0]}  |  results {out}" + (f", curves {plot}" if curves else "")
               + f", per-input log {log_path(out)}")
    return 0


COMMANDS = [evaluate]
