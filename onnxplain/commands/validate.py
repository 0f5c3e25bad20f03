"""`onnxplain validate`: a CI gate for a converted, optimised or quantized model (does it
still decide, and for the same reasons?), or for one model against expectations about
where its relevance must lie. Exit 0 when every threshold holds, 1 when one does not,
2 for a usage error."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import runtime
from ..cli import TARGET_HELP, _target
from ..errors import OptionError
from ..runkey import method_options as full_options, model_digest, run_key, target_text
from ..target import Target
from .evaluate import Batch, batch_options, load_model, log_path, method_options, samples_target

__all__ = ["COMMANDS"]


def _fraction(ctx, param, value):
    if value is not None and not 0.0 <= value <= 1.0:
        raise click.BadParameter(f"{value} is not a fraction in [0, 1]")
    return value


@click.command(epilog="""\b
Examples:
  onnxplain validate models/tiny_cnn.onnx models/tiny_cnn.onnx models/  # a model and its copy
  onnxplain validate models/tiny_cnn.onnx models/tiny_cnn.onnx models/ --min-rank-corr 0.7 --report validate.json
  onnxplain validate models/tiny_cnn.onnx models/tiny_cnn.onnx models/chelsea.png --method integrated_gradients
  onnxplain validate models/efficientnet_lite0.onnx models/chelsea.png --expect "region=20,20,200,200;min_share=0.5"

\b
Two models: predictions (top-1 agreement, largest probability difference) and
explanations of the reference's predicted class (Spearman rank correlation of
|relevance|, overlap of the top-k positions, IoU of the most relevant regions).
Thresholds: defaults < --thresholds FILE.json < flags; every input must meet them.
One model: --expect checks the share of |relevance| inside a region (pixels of the
model input, x2/y2 exclusive) or a set of features; repeatable, or a .json file.
Method 'auto' is the gradient, or feature_ablation where a model has operators
without gradient rules (quantized models).
Exit codes: 0 pass, 1 fail, 2 usage error.
""")
@click.argument("paths", nargs=-1, required=True, metavar="REFERENCE [CANDIDATE] INPUT|FOLDER...")
@click.option("-m", "--method", default="auto", show_default=True, help="Attribution method used for both models.")
@click.option("-O", "--option", "options", multiple=True, metavar="KEY=VALUE", help="Option of the method.")
@click.option("--thresholds", "thresholds_file", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON file of thresholds, e.g. {\"min_rank_corr\": 0.8, \"max_prob_diff\": 0.05}.")
@click.option("--min-rank-corr", type=float, help="Least Spearman correlation of the explanations [0.8].")
@click.option("--min-topk-overlap", type=float, callback=_fraction, help="Least top-k overlap [0.6].")
@click.option("--min-iou", type=float, callback=_fraction, help="Least IoU of the most relevant regions [0.5].")
@click.option("--min-top1-agreement", type=float, callback=_fraction,
              help="Least fraction of inputs with the same top-1 class [1.0].")
@click.option("--max-prob-diff", type=float, help="Largest difference of any class probability [no limit].")
@click.option("--topk", type=float, default=0.1, show_default=True, callback=_fraction,
              help="Fraction of positions that count as the top-k.")
@click.option("--region", type=float, default=0.5, show_default=True, callback=_fraction,
              help="A region is where the smoothed map reaches this fraction of its maximum.")
@click.option("--expect", "expectations", multiple=True, metavar="SPEC|FILE.json",
              help="Single-model mode: e.g. 'region=x1,y1,x2,y2;min_share=0.5'; repeatable.")
@click.option("-t", "--target", callback=_target, metavar="TARGET",
              help="Class to explain: 3, one per sample (3,1,4) or pred (default: the reference's prediction).")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the JSON report here (the per-file log goes next to it as .jsonl).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@batch_options
def validate(paths, method, options, thresholds_file, min_rank_corr, min_topk_overlap, min_iou, min_top1_agreement,
             max_prob_diff, topk, region, expectations, target, report, as_json, preset, providers, memory_budget,
             resume, quiet):
    """Check that a converted/quantized model keeps its predictions and explanations."""
    from .. import validate as V
    from ..explainer import Explainer

    runtime.QUIET = quiet
    if method != "auto":
        opts = method_options([method], [f"{method}:{o}" for o in options])[method]
    elif options:
        raise OptionError("--option needs a --method (with 'auto' the method is not known in advance)")
    else:
        opts = {}
    if isinstance(target, Target):
        raise OptionError(f"validate compares class decisions: -t takes a class, one class per sample or pred; "
                          f"'{target.text}' works in explain, evaluate and report")
    models, sources = _models_and_inputs(paths, bool(expectations), quiet)
    if report is not None and report.suffix.lower() != ".json":
        raise OptionError(f"--report must end in .json, got '{report.name}'")
    explainers = [Explainer(m, providers=providers, memory_budget=memory_budget) for m in models]
    log = log_path(report) if report is not None else None
    batch = Batch(explainers[0], sources, preset, log, resume)
    digests = [model_digest(m) for m in models]

    def key_of(**parts):
        # Everything that changes a record; the thresholds only judge records.
        return lambda entries: run_key(command="validate", models=digests, method=method,
                                       options=opts if method == "auto" else full_options(method, opts),
                                       target=target_text(target), input=batch.digests(entries), preset=preset,
                                       **parts)

    if expectations:
        exps = V.load_expectations(expectations)
        state = {}

        def process(inputs):
            t = samples_target(explainers[0], inputs, target)
            recs, state["method"], state["note"] = V.check(explainers[0], inputs.batch, exps, method, t, opts,
                                                         inputs.names)
            return {"checks": _with_ids(recs, inputs), "method": state["method"], "note": state["note"]}

        records = batch.run(process, "validating", key_of(expectations=exps))
        _resumed_state(state, records)
        checks = [c for r in records for c in r["checks"]]
        failures = [c for c in checks if not c["passed"]]
        result = {"mode": "expectations", "model": str(models[0]), "method": state.get("method", method),
                  "note": state.get("note"), "expectations": exps, "passed": not failures,
                  "checks": checks, "failures": failures}
        _finish(result, report, as_json, _print_checks)
        return 0 if result["passed"] else 1

    thresholds = V.load_thresholds(thresholds_file, min_rank_corr=min_rank_corr, min_topk_overlap=min_topk_overlap,
                                   min_iou=min_iou, min_top1_agreement=min_top1_agreement, max_prob_diff=max_prob_diff)
    state = {}

    def process(inputs):
        t = samples_target(explainers[0], inputs, target)
        recs, state["method"], state["note"] = V.compare(explainers[0], explainers[1], inputs.batch, method, t,
                                                         topk, region, opts, inputs.names)
        return {"samples": _with_ids(recs, inputs), "method": state["method"], "note": state["note"]}

    records = batch.run(process, "validating", key_of(topk=topk, region=region))
    _resumed_state(state, records)
    samples = [s for r in records for s in r["samples"]]
    result = {"mode": "compare", "reference": str(models[0]), "candidate": str(models[1]),
              "method": state.get("method", method), "note": state.get("note"), "topk": topk, "region": region,
              "thresholds": thresholds, **V.verdict(samples, thresholds), "samples": samples}
    _finish(result, report, as_json, _print_compare)
    return 0 if result["passed"] else 1


def _with_ids(records, inputs):
    """Each record with its input's id and file (as the dataset engine's index names them)."""
    by_name = {n: e for n, e in zip(inputs.names, inputs.entries)}
    return [{"id": by_name[r["sample"]].id, "input": by_name[r["sample"]].path, **r}
            if r.get("sample") in by_name else r for r in records]


def _resumed_state(state, records):
    """The method really used ('auto' resolved) and its note, from reused records too."""
    for r in records:
        if "method" in r:
            state.setdefault("method", r["method"])
            state.setdefault("note", r.get("note"))


def _models_and_inputs(paths, single: bool, quiet: bool):
    models, files = load_model(paths, 1 if single else 2, quiet)
    want = 1 if single else 2
    if len(models) != want:
        usage = "MODEL INPUT... --expect SPEC" if single else "REFERENCE.onnx CANDIDATE.onnx INPUT..."
        raise OptionError(f"validate needs {usage}; got {len(models)} model(s) "
                          f"({', '.join(map(str, models)) or 'none'})")
    return models, files


def _finish(result, report, as_json, printer):
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(result, indent=1))
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        printer(result)
        if report is not None:
            click.echo(f"report: {report}")


def _print_compare(r):
    click.echo(f"reference {r['reference']}  vs  candidate {r['candidate']}  ({r['method']}"
               + (f"; {r['note']}" if r["note"] else "") + ")")
    for s in r["samples"]:
        click.echo(f"  {s['sample']}: top-1 {s['reference_top1']} / {s['candidate_top1']}"
                   f"{'' if s['top1_agree'] else ' DIFFERENT'}  prob diff {s['prob_diff']:.4f}  "
                   f"rank corr {s['rank_corr']:.3f}  top-k overlap {s['topk_overlap']:.3f}  IoU {s['iou']:.3f}")
    sm = r["summary"]
    parts = [f"top-1 agreement {sm['top1_agreement']:.3f}"]
    for key in ("prob_diff", "rank_corr", "topk_overlap", "iou"):
        if key in sm:
            parts.append(f"{key} mean {sm[key]['mean']:.3f} worst {sm[key]['worst']:.3f}")
    click.echo("  " + "; ".join(parts))
    limits = ", ".join(f"{k} {v}" for k, v in r["thresholds"].items() if v is not None)
    if r["passed"]:
        click.echo(f"PASS: {sm['inputs']} input(s) within thresholds ({limits})")
    else:
        for f in r["failures"]:
            click.echo(f"FAIL: {f['threshold']} {f['limit']}: worst {f['worst']:.3f} "
                       f"on {len(f['inputs'])} input(s): {', '.join(map(str, f['inputs'][:5]))}"
                       + (" ..." if len(f["inputs"]) > 5 else ""))


def _print_checks(r):
    click.echo(f"model {r['model']}  ({r['method']}" + (f"; {r['note']}" if r["note"] else "") + ")")
    for c in r["checks"]:
        e = c["expectation"]
        where = "region " + ",".join(map(str, e["region"])) if "region" in e else \
            "features " + ",".join(map(str, e["features"]))
        bound = (f">= {e['min_share']}" if "min_share" in e else "") + \
                (f" <= {e['max_share']}" if "max_share" in e else "")
        click.echo(f"  {c['sample']}: class {c['target']}: share in {where} {c['share']:.3f} (want {bound.strip()})"
                   f" {'ok' if c['passed'] else 'FAIL'}")
    click.echo("PASS" if r["passed"] else f"FAIL: {len(r['failures'])} of {len(r['checks'])} check(s) not met")


COMMANDS = [validate]
