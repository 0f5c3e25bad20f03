"""`onnxplain explain-text`: explain a token model on a sentence, scored per token or word."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import runtime
from ..cli import _key_values, _target, model_options

OUT_SUFFIXES = (".html", ".htm", ".json", ".npy", ".npz", ".txt")


@click.command("explain-text", epilog="""\b
Examples:
  onnxplain explain-text minilm.onnx --tokenizer tokenizer.json --text "the movie was wonderful" \\
      -t 'text:"a great film"' -m integrated_gradients -o why.html
  onnxplain explain-text classifier.onnx --tokenizer tokenizer.json --text "not bad at all" -t 1 \\
      -m feature_ablation --words -o why.json
\b
Reductions (--reduce), token score from the (tokens, hidden) attribution at the embedding:
  sum  signed: sum over hidden of embedding x gradient for gradient-type methods (gradient,
       guided_backprop, deconvnet, smoothgrad), of the attribution for the others
       (input_x_gradient, integrated_gradients, deeplift, lrp.*)
  l2   the norm over hidden of what the method returns
Black-box methods (occlusion, feature_ablation, kernel_shap, lime) replace tokens (--words:
whole words) by the PAD id (--baseline-id); special tokens are never replaced.
""")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@model_options
@click.option("--text", "text", required=True, help="The text to explain.")
@click.option("--text-pair", help="A second text (sentence-pair models: type ids 1).")
@click.option("--tokenizer", required=True, type=click.Path(path_type=Path),
              help="The model's tokenizer.json (or the folder holding it); read offline.")
@click.option("-t", "--target", callback=_target, metavar="TARGET",
              help='What to explain: a class (3), pred (default), text:"REFERENCE" (a sentence encoder: the dot '
                   "product of the two sentence embeddings), any form of README: Targets.")
@click.option("--reduce", type=click.Choice(["sum", "l2"]), default="sum", show_default=True,
              help="How the hidden axis becomes one score per token (see below).")
@click.option("--words", is_flag=True, help="Score words (merged from the tokenizer's word ids), not tokens.")
@click.option("--baseline-id", type=int, help="Token id of the baseline (default: the tokenizer's PAD id).")
@click.option("--pooling", type=click.Choice(["mean", "cls"]), default="mean", show_default=True,
              help="Sentence embedding of a token-level output for text: targets.")
@click.option("-O", "--option", "options", multiple=True, callback=_key_values, metavar="KEY=VALUE",
              help="Method option, repeatable (`onnxplain methods`).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the result: .html (a page), .json (tokens, offsets, scores), .npy (the raw "
                   "attribution), .npz (everything), .txt.")
@click.option("--color/--no-color", default=None, help="Colour the tokens (default: on a terminal).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def explain_text_command(model, method, layer, output, probability, providers, memory_budget, text, text_pair,
                         tokenizer, target, reduce, words, baseline_id, pooling, options, out, color, quiet,
                         as_json):
    """Explain a token model (BERT-style classifier, sentence encoder) on TEXT, per token.

    The tokenizer fills the model's inputs by name (input_ids, attention_mask,
    token_type_ids, position ids); white-box methods attribute to the word embedding.
    """
    run_text(model, method, layer, output, probability, providers, memory_budget, text, text_pair, tokenizer,
             target, reduce, words, baseline_id, pooling, options, out, color, quiet, as_json)


def run_text(model, method, layer, output, probability, providers, memory_budget, text, text_pair, tokenizer,
             target, reduce="sum", words=False, baseline_id=None, pooling="mean", options=None, out=None,
             color=None, quiet=False, as_json=False):
    """explain-text's work, also behind `explain --text` (the same options)."""
    from ..errors import OptionError
    from ..explainer import Explainer
    from ..methods.base import get_method
    from ..text import explain_text, render

    runtime.QUIET = quiet
    options = dict(options or {})
    if text is None or tokenizer is None:
        raise OptionError("explaining text needs both --text and --tokenizer (the model's tokenizer.json)")
    if layer is not None:
        raise OptionError("text is attributed at the word embedding (found in the model); --layer is not taken")
    m = get_method(method)
    m.resolve(options)  # a bad option fails before the model loads
    out = Path(out) if out is not None else None
    if out is not None and out.suffix.lower() not in OUT_SUFFIXES:
        raise OptionError(f"cannot write '{out.name}': --out must end in {', '.join(OUT_SUFFIXES)}")
    ex = Explainer(model, providers=providers, memory_budget=memory_budget)
    result = explain_text(ex, tokenizer, text, text_pair, method=m.name, target=target, reduce=reduce or "sum",
                          words=words, baseline_id=baseline_id, output=output, probability=probability,
                          pooling=pooling, **options)
    if out is not None:
        result.save(out)
    if as_json:
        d = result.to_dict()
        if out is not None:
            d["file"] = str(out)
        click.echo(json.dumps(d, indent=2))
        return result
    click.echo(render(result, color=color))
    if out is not None:
        click.echo(f"wrote {out}")
    return result


COMMANDS = [explain_text_command]
