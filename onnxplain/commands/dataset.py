"""`onnxplain explain-dataset`: explain every input of a dataset into sharded .npz
attributions and a JSON-lines index, on this machine (streaming) or on a Ray cluster."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import runtime
from ..cli import TARGET_HELP, _bytes, _key_values, _providers, _target
from ..errors import OptionError
from ..io import PRESETS


@click.command("explain-dataset", epilog="""\b
Examples:
  onnxplain explain-dataset models/tiny_cnn.onnx photos/ -m gradient --out attributions/
  onnxplain explain-dataset model.onnx 'val/**/*.jpg' -m occlusion -O window=16,16 --out occ/ --resume
  onnxplain explain-dataset model.onnx labels.csv -m integrated_gradients --out ig/ --float16
  onnxplain explain-dataset model.onnx shards/ --engine ray --address ray://head:10001 --out ig/

\b
DATASET: a folder (images or .npy/.npz shards, recursive), a glob, a manifest (.csv/.jsonl
with a 'path' column and optional 'target' and 'id' columns) or a Parquet table of them.
OUT gets index.jsonl (one record per input: id, shard, row, target, predicted, score,
method, options, key; or its error) and the shards shard-*.npz (array 'attribution').
""")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("dataset")
@click.option("-m", "--method", default="gradient", show_default=True, help="Attribution method.")
@click.option("-t", "--target", callback=_target, metavar="TARGET",
              help="What to explain for every input (default: the dataset's target column, else the "
                   "predicted class). " + TARGET_HELP)
@click.option("-O", "--option", "options", multiple=True, callback=_key_values, metavar="KEY=VALUE",
              help="Method option, repeatable (e.g. -O n_steps=16).")
@click.option("--layer", help="Attribute at this tensor instead of the input.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (index.jsonl and the shards).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Inputs per batch (fewer when the memory budget says so).")
@click.option("--resume", is_flag=True, help="Keep what an earlier run in OUT did with the same run key.")
@click.option("--on-error", type=click.Choice(["skip", "stop"]), default="skip", show_default=True,
              help="An unreadable input: record its error and go on, or stop the run.")
@click.option("--float16", is_flag=True, help="Store attributions as float16 (half the disk).")
@click.option("--no-scores", is_flag=True, help="Leave the predicted class and score out of the index (spares "
                                                "one forward pass a batch).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="This machine (streaming threads), or Ray Data (pip install 'onnxplain[ray]').")
@click.option("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster).")
@click.option("--workers", type=click.IntRange(min=1), help="Decode threads (local) or Ray actors (default: 4 / the "
                                                            "cluster's CPUs).")
@click.option("--replicas", type=click.IntRange(min=1), help="Local engine: explain this many batches at once, each "
              "on its own onnxruntime session with its share of the threads (ONNXPLAIN_THREADS, else the cores) "
              "and of the memory budget (default: 1).")
@click.option("--preset", type=click.Choice(list(PRESETS)), help="Image preprocessing preset "
              "(default: the model's metadata).")
@click.option("--providers", callback=_providers, metavar="P1,P2", help="onnxruntime providers.")
@click.option("--memory-budget", callback=_bytes, metavar="SIZE", help="Memory one batched run may use.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON: the counts, the index and shard "
                                                      "paths and every index record (with its explained score).")
def explain_dataset(model, dataset, method, target, options, layer, out, batch_size, resume, on_error, float16,
                    no_scores, engine, address, workers, replicas, preset, providers, memory_budget, quiet, as_json):
    """Explain every input of DATASET with MODEL, streaming results into OUT."""
    runtime.QUIET = quiet
    if isinstance(target, list):
        raise OptionError("-t gives one target for every input of a dataset; put per-input targets in a "
                          "manifest's 'target' column")
    common = dict(method=method, target=target, options=options, batch_size=batch_size, resume=resume,
                  on_error=on_error, float16=float16, layer=layer, preset=preset, quiet=quiet,
                  providers=providers, memory_budget=memory_budget, scores=not no_scores)
    if engine == "ray":
        from ..engine_ray import explain_dataset_ray

        if replicas is not None:
            raise OptionError("--replicas is for the local engine; on Ray, --workers sets the actors")

        summary = explain_dataset_ray(model, dataset, out, address=address, workers=workers, **common)
    else:
        from ..engine import explain_dataset as run

        summary = run(model, dataset, out, workers=workers or 4, replicas=replicas or 1, **common)
    if as_json:
        click.echo(json.dumps(as_dict(summary), indent=2))
    elif not quiet:
        click.echo(f"{summary.explained} explained, {summary.reused} kept from an earlier run, "
                   f"{summary.failed} failed (batch {summary.batch_size}, {summary.rate:.1f} inputs/s) "
                   f"| index {summary.index}")
    return 0


def as_dict(summary) -> dict:
    """A run as a script reads it: what was done, where it went, and the index's records
    (dataset order; a record holds its explained score, or the error of an input that failed)."""
    shards = sorted({r["shard"] for r in summary.records if r.get("shard")})
    return {"explained": summary.explained, "reused": summary.reused, "failed": summary.failed,
            "total": len(summary.records), "batch_size": summary.batch_size, "seconds": summary.seconds,
            "out": str(summary.index.parent), "index": str(summary.index),
            "shards": [str(summary.index.parent / s) for s in shards], "records": summary.records}


COMMANDS = [explain_dataset]
