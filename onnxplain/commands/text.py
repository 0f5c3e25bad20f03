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
  onnxplain explain-text minilm.onnx --tokenizer tokenizer.json --text "the movie was wonderful" \\
      --text "a dull plot" -t 'text-cos:"a great film"' -m gradient -o why.html
\b
Reductions (--reduce), token score from the (tokens, hidden) attribution at the embedding:
  sum  signed: sum over hidden of embedding x gradient for gradient-type methods (gradient,
       guided_backprop, deconvnet, smoothgrad), of the attribution for the others
       (input_x_gradient, integrated_gradients, deeplift, lrp.*)
  l2   the norm over hidden of what the method returns
Attention maps (attention_rollout, generic_attention, transformer_attribution) are one score
per token already (the query row of the rolled-out matrix) and take no --reduce.
Several texts (--text repeated, or --texts FILE, one per line) are padded to one length,
the attention mask 0 on the padding, and explained in one batch: one result per text.
Black-box methods (occlusion, feature_ablation, kernel_shap, lime) replace tokens (--words:
whole words) by the PAD id (--baseline-id); special tokens are never replaced.
""")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@model_options
@click.option("--text", "text", multiple=True, help="The text to explain; repeat it to explain several in one batch.")
@click.option("--texts", "texts_file", type=click.Path(dir_okay=False, path_type=Path),
              help="A file of texts to explain, one per line (blank lines skipped), with or beside --text.")
@click.option("--text-pair", multiple=True,
              help="A second text (sentence-pair models: type ids 1): one for every text, or one per text.")
@click.option("--tokenizer", required=True, type=click.Path(path_type=Path),
              help="The model's tokenizer.json (or the folder holding it); read offline.")
@click.option("-t", "--target", callback=_target, metavar="TARGET",
              help='What to explain: a class (3), pred (default), text:"REFERENCE" (a sentence encoder: the dot '
                   'product of the two sentence embeddings), text-cos:"REFERENCE" (their cosine, built into the '
                   "graph), any form of README: Targets.")
@click.option("--reduce", type=click.Choice(["sum", "l2"]),
              help="How the hidden axis becomes one score per token (default sum; see below).")
@click.option("--words", is_flag=True, help="Score words (merged from the tokenizer's word ids), not tokens.")
@click.option("--baseline-id", type=int, help="Token id of the baseline (default: the tokenizer's PAD id).")
@click.option("--pooling", type=click.Choice(["mean", "cls"]), default="mean", show_default=True,
              help="Sentence embedding of a token-level output for text: targets.")
@click.option("-O", "--option", "options", multiple=True, callback=_key_values, metavar="KEY=VALUE",
              help="Method option, repeatable (`onnxplain methods`).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the result: .html (a page), .json (tokens, offsets, scores), .npy (the raw "
                   "attribution), .npz (everything), .txt; for several texts one file holding them all "
                   "(.npz stacked with their lengths; no .npy).")
@click.option("--color/--no-color", default=None, help="Colour the tokens (default: on a terminal).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def explain_text_command(model, method, layer, output, probability, providers, memory_budget, text, texts_file,
                         text_pair, tokenizer, target, reduce, words, baseline_id, pooling, options, out, color,
                         quiet, as_json):
    """Explain a token model (BERT-style classifier, sentence encoder) on TEXT, per token.

    The tokenizer fills the model's inputs by name (input_ids, attention_mask,
    token_type_ids, position ids); white-box methods attribute to the word embedding.
    """
    run_text(model, method, layer, output, probability, providers, memory_budget, text, text_pair, tokenizer,
             target, reduce, words, baseline_id, pooling, options, out, color, quiet, as_json, texts_file=texts_file)


def _texts(text, texts_file) -> list:
    from ..errors import InputError

    texts = [text] if isinstance(text, str) else list(text or ())
    if texts_file is not None:
        try:
            lines = Path(texts_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise InputError(f"cannot read the texts file {texts_file}: {exc.strerror}") from None
        from_file = [line for line in lines if line.strip()]
        if not from_file:
            raise InputError(f"the texts file {texts_file} has no text (one per line)")
        texts += from_file
    return texts


def run_text(model, method, layer, output, probability, providers, memory_budget, text, text_pair, tokenizer,
             target, reduce=None, words=False, baseline_id=None, pooling="mean", options=None, out=None,
             color=None, quiet=False, as_json=False, texts_file=None):
    """explain-text's work, also behind `explain --text` (the same options). text: one
    text or several (with the lines of `texts_file`); text_pair: none, one, or one per text."""
    from ..errors import OptionError
    from ..explainer import Explainer
    from ..methods.base import get_method
    from ..text import explain_text, render, save_results

    runtime.QUIET = quiet
    options = dict(options or {})
    texts = _texts(text, texts_file)
    if not texts or tokenizer is None:
        raise OptionError("explaining text needs both --text (or --texts FILE) and --tokenizer (the model's "
                          "tokenizer.json)")
    pairs = [text_pair] if isinstance(text_pair, str) else list(text_pair or ())
    if len(pairs) not in (0, 1, len(texts)):
        raise OptionError(f"got {len(pairs)} --text-pair for {len(texts)} texts: give one for all or one per text")
    if layer is not None:
        raise OptionError("text is attributed at the word embedding (found in the model); --layer is not taken")
    m = get_method(method)
    m.resolve(options)  # a bad option fails before the model loads
    out = Path(out) if out is not None else None
    if out is not None and out.suffix.lower() not in OUT_SUFFIXES:
        raise OptionError(f"cannot write '{out.name}': --out must end in {', '.join(OUT_SUFFIXES)}")
    if out is not None and out.suffix.lower() == ".npy" and len(texts) > 1:
        raise OptionError(f"cannot write '{out.name}' for {len(texts)} texts: a bare array cannot say where each text "
                          "stops; write .npz (stacked, with the lengths)")
    ex = Explainer(model, providers=providers, memory_budget=memory_budget)
    single = len(texts) == 1
    pair = (pairs[0] if pairs else None) if single or len(pairs) < 2 else pairs
    results = explain_text(ex, tokenizer, texts[0] if single else texts, pair, method=m.name, target=target,
                           reduce=reduce, words=words, baseline_id=baseline_id, output=output,
                           probability=probability, pooling=pooling, **options)
    results = [results] if single else results
    if out is not None:
        save_results(results, out)
    if as_json:
        d = results[0].to_dict() if single else {"texts": [r.to_dict() for r in results]}
        if out is not None:
            d["file"] = str(out)
        click.echo(json.dumps(d, indent=2))
        return results[0] if single else results
    click.echo("\n\n".join(render(r, color=color) for r in results))
    if out is not None:
        click.echo(f"wrote {out}")
    return results[0] if single else results


COMMANDS = [explain_text_command]
