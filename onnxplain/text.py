"""Text in, tokens out: explain a token model on a sentence, scored per token (or word).

A tokenizer (a Hugging Face `tokenizer.json`, read offline by the `tokenizers` package,
the optional extra `onnxplain[text]`) encodes the text (and an optional second text);
the model's inputs are filled by name (`input_ids`, `attention_mask`, `token_type_ids`,
position ids), in the dtypes the model declares. Then:

- white-box methods attribute to the word-embedding output (the Gather from the largest
  constant table indexed by the token ids), giving (tokens, hidden); the token score is a
  reduction over hidden, named in the result. `sum`: for a gradient-type result g (the
  gradient, guided backprop, deconvnet, smoothgrad) it is sum_h x_h g_h (signed: the
  first-order share of the token; a raw gradient summed over hidden is zero behind a
  LayerNorm); for methods that already return relevance or x*g at the embedding (input x
  gradient, integrated gradients, DeepLIFT, LRP, ...) it is the sum over hidden. `l2`:
  the norm over hidden of what the method returns.
- black-box methods (occlusion, feature ablation, KernelSHAP, LIME) perturb the token ids
  themselves, replacing a token (or a word: `words=True`) by a baseline id (the
  tokenizer's PAD id, else its MASK id, else 0); special tokens are never replaced.

- attention maps (attention_rollout, generic_attention, transformer_attribution) are one
  score per token already, the explained query's row: taken as they are ("attention map").

Special tokens are kept in the result and marked; words are merged from the tokenizer's
word ids. `text:"..."` targets (sentence encoders) are resolved here: the reference text
is encoded and embedded with the same model and pooling, and the seed makes the explained
score dot(emb(text), emb(reference)). `text-cos:"..."` explains the cosine: not linear in
the output, it has no seed, so `cosine_output` adds it to the graph as a scalar output.

Several texts are padded at the end to the longest (PAD ids, attention mask 0, kept in
every baseline) and explained in one batch, one result per text; the padding is cut off.
"""

from __future__ import annotations

import html as _html
import json
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, ModelError, OptionError

REDUCTIONS = ("sum", "l2")
# Results that are a gradient (not yet times the input): their signed token score is sum x*g.
GRADIENT_TYPE = ("gradient", "guided_backprop", "deconvnet", "smoothgrad")
# Methods that perturb the token ids (a baseline id replaces a token or a word).
TOKEN_BLACK_BOX = ("occlusion", "feature_ablation", "kernel_shap", "lime")
INPUT_ROLES = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
_ROLE_NAMES = {
    "input_ids": ("input_ids", "ids", "input", "tokens", "token_ids", "input.1"),
    "attention_mask": ("attention_mask", "mask", "input_mask"),
    "token_type_ids": ("token_type_ids", "segment_ids", "type_ids", "token_types"),
    "position_ids": ("position_ids", "positions", "pos_ids"),
}


def load_tokenizer(path):
    """A `tokenizers.Tokenizer` from a tokenizer.json file (no network)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise OptionError("text needs the `tokenizers` package: pip install 'onnxplain[text]'") from None
    if hasattr(path, "encode") and hasattr(path, "token_to_id"):
        return path  # already a tokenizer
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise InputError(f"tokenizer file not found: {p} (give the model's tokenizer.json)")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:  # the package raises its own Exception subclass
        raise InputError(f"cannot read the tokenizer {p}: {exc}") from None


@dataclass
class Encoded:
    """One encoded text: ids, mask, type ids, tokens, character offsets, special-token flags
    and word ids (None for special tokens)."""

    text: str
    text_pair: str | None
    ids: np.ndarray
    attention_mask: np.ndarray
    type_ids: np.ndarray
    tokens: list
    offsets: list
    special: np.ndarray
    word_ids: list
    sequence_ids: list

    def __len__(self):
        return len(self.ids)


def encode(tokenizer, text: str, text_pair: str | None = None) -> Encoded:
    tok = load_tokenizer(tokenizer)
    if not isinstance(text, str) or not text.strip():
        raise InputError("the text to explain is empty")
    # A tokenizer.json saved for serving often pads to a fixed length (128 for MiniLM):
    # padding tokens would be explained too, so the text is encoded unpadded.
    padding = tok.padding
    if padding:
        tok.no_padding()
    try:
        enc = tok.encode(text, text_pair) if text_pair is not None else tok.encode(text)
    finally:
        if padding:
            tok.enable_padding(**{k: v for k, v in padding.items() if k in (
                "direction", "pad_id", "pad_type_id", "pad_token", "length", "pad_to_multiple_of")})
    if not enc.ids:
        raise InputError(f"the tokenizer gives no tokens for {text!r}")
    return Encoded(text, text_pair, np.asarray(enc.ids, np.int64), np.asarray(enc.attention_mask, np.int64),
                   np.asarray(enc.type_ids, np.int64), list(enc.tokens), [tuple(o) for o in enc.offsets],
                   np.asarray(enc.special_tokens_mask, bool), list(enc.word_ids), list(enc.sequence_ids))


def baseline_token_id(tokenizer) -> tuple[int, str]:
    """(id, name) of the token a perturbed token becomes: PAD, else MASK, else 0."""
    tok = load_tokenizer(tokenizer)
    pad = getattr(tok, "padding", None)
    if pad and pad.get("pad_id") is not None:
        return int(pad["pad_id"]), str(pad.get("pad_token", "PAD"))
    for name in ("[PAD]", "<pad>", "<PAD>", "[MASK]", "<mask>"):
        i = tok.token_to_id(name)
        if i is not None:
            return int(i), name
    return 0, "id 0"


# ----------------------------------------------------------------------------- model inputs


def input_roles(explainer) -> dict:
    """{model input: role} for a token model's inputs, by name. An input with no role is
    an error naming the roles (the model needs something this module cannot fill)."""
    g = explainer.graph
    roles = {}
    for name in g.inputs:
        low = name.lower()
        role = next((r for r, names in _ROLE_NAMES.items() if low in names), None)
        if role is None:
            role = next((r for r in ("attention_mask", "token_type_ids", "position_ids")
                         if any(k in low for k in _ROLE_NAMES[r][:2])), None)
        if role is None and "ids" in low:
            role = "input_ids"
        if role is None:
            raise ModelError(f"the model input '{name}' is none of {', '.join(INPUT_ROLES)}: the text cannot fill "
                             "it; rename the input or feed the model yourself (Explainer.attribute)")
        if role in roles.values():
            raise ModelError(f"two model inputs look like {role}: {', '.join(n for n, r in roles.items() if r == role)}"
                             f" and {name}")
        roles[name] = role
    if "input_ids" not in roles.values():
        raise ModelError(f"the model takes {', '.join(g.inputs)}: none of them is the token ids (input_ids)")
    return roles


def pad_token_id(tokenizer) -> int:
    """The id texts of a batch are padded with: the tokenizer's PAD (the attention mask
    hides it from the model, so any id would do where the model honours the mask)."""
    tok = load_tokenizer(tokenizer)
    pad = getattr(tok, "padding", None)
    if pad and pad.get("pad_id") is not None:
        return int(pad["pad_id"])
    for name in ("[PAD]", "<pad>", "<PAD>"):
        i = tok.token_to_id(name)
        if i is not None:
            return int(i)
    return 0


def model_feeds(explainer, enc, pad_id: int = 0) -> dict:
    """The model's inputs for one encoded text (batch 1), or for a list of them padded at
    the end to the longest (ids `pad_id`, attention mask 0, type ids 0, positions counted
    on), by name, in the model's dtypes."""
    from .explainer import _np_dtype

    encs = [enc] if isinstance(enc, Encoded) else list(enc)
    g = explainer.graph
    n, t = len(encs), max(len(e) for e in encs)
    roles = input_roles(explainer)
    if len({len(e) for e in encs}) > 1 and "attention_mask" not in roles.values():
        raise ModelError(f"the texts have {min(len(e) for e in encs)} to {t} tokens, so a batch pads them; the model "
                         f"takes no attention mask ({', '.join(g.inputs)}), so the padding would change what it "
                         "computes: explain the texts one at a time")
    values = {"input_ids": np.full((n, t), int(pad_id), np.int64), "attention_mask": np.zeros((n, t), np.int64),
              "token_type_ids": np.zeros((n, t), np.int64),
              "position_ids": np.broadcast_to(np.arange(t, dtype=np.int64), (n, t))}
    for i, e in enumerate(encs):
        values["input_ids"][i, :len(e)] = e.ids
        values["attention_mask"][i, :len(e)] = e.attention_mask
        values["token_type_ids"][i, :len(e)] = e.type_ids
    feeds = {}
    for name, role in roles.items():
        shape = g.shape(name)
        v = values[role]
        if shape is not None and len(shape) != 2:
            raise ModelError(f"input '{name}' ({role}) has shape {shape}; a token model takes (batch, tokens)")
        if shape is not None and isinstance(shape[1], int) and shape[1] != t:
            raise InputError(f"the model takes exactly {shape[1]} tokens in '{name}'; the text has {t} "
                             "(export the model with a dynamic sequence axis)")
        feeds[name] = np.ascontiguousarray(v).astype(_np_dtype(g.elem_type(name)))
    return feeds


def word_embedding(explainer, ids_input: str) -> str:
    """The output of the Gather that looks the token ids up in the largest constant table."""
    from .methods.integrated import embedding_lookups

    lookups = embedding_lookups(explainer.graph, ids_input)
    # The first of the largest tables, as a walk that keeps a strictly larger one would.
    best = max(lookups, key=lambda lr: lr[1])[0] if lookups else None
    if best is None:
        raise ModelError(f"no embedding lookup (a Gather from a constant 2-D float table) reads '{ids_input}': "
                         "white-box methods need one; use a black-box method (feature_ablation, kernel_shap, ...)")
    return best


# ----------------------------------------------------------------------------- the result


@dataclass
class TokenAttribution:
    """Token scores of one text. `attribution` is what the method returned, batch dropped:
    (tokens, hidden) at the embedding, or (tokens,) for token-level black-box methods."""

    text: str
    text_pair: str | None
    tokens: list
    ids: list
    offsets: list
    special: list
    word_ids: list
    sequence_ids: list
    scores: np.ndarray
    reduction: str
    method: str
    target: str
    attribution: np.ndarray
    score_kind: str = ""
    layer: str | None = None
    baseline: str | None = None
    explained_score: float | None = None
    level: str = "token"
    words: list = field(default_factory=list)  # (text, token indices, score)

    def top(self, k: int = 5, include_special: bool = False):
        """(index, token, score) of the k tokens of largest |score|."""
        idx = [i for i in range(len(self.tokens)) if include_special or not self.special[i]]
        idx.sort(key=lambda i: -abs(float(self.scores[i])))
        return [(i, self.tokens[i], float(self.scores[i])) for i in idx[:k]]

    def to_dict(self) -> dict:
        return {
            "text": self.text, "text_pair": self.text_pair, "method": self.method, "target": self.target,
            "reduction": self.reduction, "score_kind": self.score_kind, "layer": self.layer,
            "baseline": self.baseline, "level": self.level, "explained_score": self.explained_score,
            "score": self.explained_score,  # the key every other command's --json uses
            "tokens": [{"token": t, "id": int(i), "offsets": list(o), "special": bool(s),
                        "word": w, "sequence": q, "score": float(v)}
                       for t, i, o, s, w, q, v in zip(self.tokens, self.ids, self.offsets, self.special,
                                                      self.word_ids, self.sequence_ids, self.scores)],
            "words": [{"word": w, "tokens": list(t), "score": float(v)} for w, t, v in self.words],
        }

    def save(self, path) -> Path:
        """Write by suffix: .json, .html, .npy (the raw attribution), .npz (everything), .txt."""
        p = Path(path)
        suffix = p.suffix.lower()
        try:
            if suffix == ".json":
                p.write_text(json.dumps(self.to_dict(), indent=2))
            elif suffix in (".html", ".htm"):
                p.write_text(to_html(self))
            elif suffix == ".npy":
                np.save(p, self.attribution)
            elif suffix == ".npz":
                np.savez(p, attribution=self.attribution, scores=self.scores, ids=np.asarray(self.ids),
                         offsets=np.asarray(self.offsets, np.int64).reshape(-1, 2),
                         special=np.asarray(self.special), tokens=np.asarray(self.tokens),
                         word_ids=np.asarray([-1 if w is None else w for w in self.word_ids]))
            elif suffix == ".txt":
                p.write_text(render(self, color=False) + "\n")
            else:
                raise OptionError(f"cannot write '{p.name}': token scores are written as .html, .json, .npy, .npz "
                                  "or .txt")
        except OSError as exc:
            raise InputError(f"cannot write {p}: {exc.strerror}") from None
        return p


def save_results(results: list, path) -> Path:
    """Write the results of several texts to one file, by suffix: .json (a list under
    "texts", each as `TokenAttribution.to_dict`), .html (one page, a section per text),
    .txt (the renderings), .npz (stacked, padded at the end to the longest text: `lengths`
    says where each text stops; scores and attributions 0, ids -1, tokens "" past it).
    .npy is refused: a bare array cannot say where each text stops."""
    results = list(results)
    if len(results) == 1:
        return results[0].save(path)
    p = Path(path)
    suffix = p.suffix.lower()
    try:
        if suffix == ".json":
            p.write_text(json.dumps({"texts": [r.to_dict() for r in results]}, indent=2))
        elif suffix in (".html", ".htm"):
            p.write_text(to_html_many(results))
        elif suffix == ".txt":
            p.write_text("\n\n".join(render(r, color=False) for r in results) + "\n")
        elif suffix == ".npz":
            n, t = len(results), max(len(r.tokens) for r in results)
            per_token = results[0].attribution.shape[1:]
            attribution = np.zeros((n, t) + per_token, np.float32)
            scores, ids = np.zeros((n, t)), np.full((n, t), -1, np.int64)
            offsets, special = np.zeros((n, t, 2), np.int64), np.zeros((n, t), bool)
            tokens, word_ids = np.full((n, t), "", dtype=object), np.full((n, t), -1, np.int64)
            for i, r in enumerate(results):
                k = len(r.tokens)
                attribution[i, :k], scores[i, :k], ids[i, :k] = r.attribution, r.scores, r.ids
                offsets[i, :k] = np.asarray(r.offsets, np.int64).reshape(-1, 2)
                special[i, :k], tokens[i, :k] = r.special, r.tokens
                word_ids[i, :k] = [-1 if w is None else w for w in r.word_ids]
            np.savez(p, attribution=attribution, scores=scores, ids=ids, offsets=offsets, special=special,
                     tokens=tokens.astype(str), word_ids=word_ids, lengths=np.asarray([len(r.tokens) for r in results]),
                     texts=np.asarray([r.text for r in results]),
                     explained_score=np.asarray([np.nan if r.explained_score is None else r.explained_score
                                                 for r in results]))
        elif suffix == ".npy":
            raise OptionError(f"cannot write '{p.name}' for {len(results)} texts: a bare array cannot say where each "
                              "text stops; write .npz (stacked, with the lengths)")
        else:
            raise OptionError(f"cannot write '{p.name}': token scores are written as .html, .json, .npz or .txt")
    except OSError as exc:
        raise InputError(f"cannot write {p}: {exc.strerror}") from None
    return p


def _merge_words(tokens, word_ids, sequence_ids, special, scores, reduction, text, text_pair, offsets,
                 per_feature=False):
    """(word, token indices, score) per word: special tokens are words of their own; a word's
    score is its tokens' sum (l2: the norm of their norms), or, when the scores came from
    perturbing whole words, the word's score itself."""
    groups, order = {}, []
    for i, (w, q) in enumerate(zip(word_ids, sequence_ids)):
        key = ("special", i) if special[i] or w is None else ("word", q, w)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(i)
    out = []
    for key in order:
        idx = groups[key]
        src = text_pair if (key[0] == "word" and key[1] == 1 and text_pair is not None) else text
        s, e = offsets[idx[0]][0], offsets[idx[-1]][1]
        word = tokens[idx[0]] if key[0] == "special" else src[s:e]
        v = scores[idx]
        if per_feature:
            score = float(v[0])
        elif reduction == "l2":
            score = float(np.sqrt(np.sum(np.square(v))))
        else:
            score = float(np.sum(v))
        out.append((word, idx, score))
    return out


def _feature_mask(enc: Encoded, words: bool, length: int | None = None) -> np.ndarray:
    """One feature per token, or per word (special tokens each their own feature), (1,
    length). Padding past the text joins the last token's feature: its baseline is itself,
    so ablating it changes nothing, and it adds no feature of its own."""
    if not words:
        return np.arange(len(enc) if length is None else length)[None]
    keys, mask = {}, []
    for i, (w, q) in enumerate(zip(enc.word_ids, enc.sequence_ids)):
        key = ("s", i) if enc.special[i] or w is None else ("w", q, w)
        mask.append(keys.setdefault(key, len(keys)))
    mask += [mask[-1]] * ((length or len(enc)) - len(enc))
    return np.asarray(mask, np.int64)[None]


# Methods whose result is one score per token already: the row of a token-mixing matrix.
ATTENTION_MAPS = ("attention_rollout", "generic_attention", "transformer_attribution")
# Methods whose features are sampled per text (coalitions over its own tokens): a padded
# batch would give a shorter text dummy features that change its fit, so they run text by text.
PER_TEXT = ("kernel_shap", "lime")


def explain_text(explainer, tokenizer, text, text_pair=None, method: str = "gradient", target=None,
                 reduce: str | None = None, words: bool = False, baseline_id: int | None = None, output=None,
                 probability: bool = False, pooling: str = "mean", **options):
    """Explain `explainer`'s model on `text` (and `text_pair`) and score each token.

    text: one text (returns one TokenAttribution) or a list of texts (returns a list, one
    per text): they are padded at the end to the longest, the attention mask 0 on the
    padding, and explained in one batch (kernel_shap and lime: text by text); text_pair:
    None, one text for all, or one per text.
    target: any target of the grammar, or `text:"..."` / `text-cos:"..."` for a sentence
    encoder (see `text_target_seed`, `cosine_output`). reduce: `sum` (default) or `l2`
    over the hidden axis (see the module's doc); attention maps (attention_rollout,
    generic_attention, transformer_attribution) are one score per token and take none.
    words: merge scores into words (black-box methods then perturb whole words).
    baseline_id: the id a black-box method puts in place of a token, and the id whose
    embedding is the baseline of integrated gradients / DeepLIFT (default: the tokenizer's
    PAD id); special tokens (and padding) keep their ids in every baseline.
    """
    from .explainer import Explainer
    from .methods.base import get_method

    if not isinstance(explainer, Explainer):
        explainer = Explainer(explainer)
    m = get_method(method)
    if m.name in ATTENTION_MAPS and reduce is not None:
        raise OptionError(f"method '{m.name}' gives one score per token (an attention map's row): there is no hidden "
                          "axis to reduce; leave out reduce (--reduce)")
    reduce = "sum" if reduce is None else reduce
    if reduce not in REDUCTIONS:
        raise OptionError(f"unknown reduction '{reduce}'; choose {' or '.join(REDUCTIONS)}")
    single = isinstance(text, str)
    texts = [text] if single else list(text)
    if not texts:
        raise InputError("no texts to explain")
    if text_pair is None or isinstance(text_pair, str):
        pairs = [text_pair] * len(texts)
    else:
        pairs = list(text_pair)
        if len(pairs) != len(texts):
            raise InputError(f"got {len(pairs)} text pairs for {len(texts)} texts; give one pair per text or one "
                             "for all")
    tok = load_tokenizer(tokenizer)
    kw = dict(method=m.name, target=target, reduce=None if m.name in ATTENTION_MAPS else reduce, words=words,
              baseline_id=baseline_id, output=output, probability=probability, pooling=pooling, **options)
    if m.name in PER_TEXT and len(texts) > 1:
        return [explain_text(explainer, tok, t, p, **kw) for t, p in zip(texts, pairs)]
    encs = [encode(tok, t, p) for t, p in zip(texts, pairs)]
    results = _explain_encoded(explainer, tok, encs, m, target, reduce, words, baseline_id, output, probability,
                               pooling, options)
    return results[0] if single else results


def _explain_encoded(explainer, tok, encs, m, target, reduce, words, baseline_id, output, probability, pooling,
                     options) -> list:
    from .target import TextTarget, as_target

    feeds = model_feeds(explainer, encs, pad_token_id(tok))
    roles = input_roles(explainer)
    ids_name = next(n for n, r in roles.items() if r == "input_ids")
    n, t_max = feeds[ids_name].shape
    if baseline_id is None:
        baseline_id, base_name = baseline_token_id(tok)
    else:
        base_name = tok.id_to_token(int(baseline_id)) or f"id {baseline_id}"
    # Special tokens and the padding keep their ids in every baseline.
    kept = np.ones((n, t_max), bool)
    for i, e in enumerate(encs):
        kept[i, :len(e)] = e.special
    base_ids = np.where(kept, feeds[ids_name], int(baseline_id)).astype(feeds[ids_name].dtype)
    baseline_text = f"{base_name} (id {int(baseline_id)}), special tokens kept"

    kinds = [""] * n
    ex = explainer
    t = as_target(target)
    if isinstance(t, TextTarget) and t.cosine:
        if probability:
            raise OptionError(f"target '{t.text}' is a cosine, not a class: it has no probability")
        ex, output, kind = cosine_output(explainer, tok, t.reference, output=output, pooling=pooling)
        kinds = [kind] * n
        target_arg = np.ones((n, 1), np.float32)  # the cosine output, seed 1 for every method
    elif isinstance(t, TextTarget):
        target_arg, kinds = text_target_seeds(explainer, tok, encs, feeds, t, output=output, pooling=pooling)
    else:
        target_arg = target
    target_text = t.text

    opts = dict(options)
    attention = m.name in ATTENTION_MAPS
    x = None  # the embedding, for the signed sum of a gradient-type result
    if m.kind == "black-box":
        if m.name not in TOKEN_BLACK_BOX:
            raise OptionError(f"method '{m.name}' does not perturb tokens; over tokens use "
                              f"{', '.join(TOKEN_BLACK_BOX)}, or a white-box method at the embedding")
        if m.name == "occlusion":
            if words:
                raise OptionError("occlusion slides a window over tokens; to remove whole words use "
                                  "feature_ablation (or kernel_shap, lime) with words")
        else:
            opts.setdefault("feature_mask", np.concatenate([_feature_mask(e, words, t_max) for e in encs]))
        opts.setdefault("baseline", base_ids)
        raw = ex.attribute(feeds, method=m.name, target=target_arg, output=output, probability=probability,
                           wrt=ids_name, **opts)
        raw = np.asarray(raw, np.float64).reshape(n, t_max)
        layer = None
        reduction = "none (the score drop of the perturbed token)"
        if m.name in ("kernel_shap", "lime"):
            reduction = "none (the surrogate's coefficient of the token)"
    else:
        layer = word_embedding(explainer, ids_name)
        if "baseline_ids" in m.options and "layer_baseline" not in opts:
            opts.setdefault("baseline_ids", base_ids)
        raw = ex.attribute(feeds, method=m.name, target=target_arg, output=output, probability=probability,
                           layer=layer, **opts)
        raw = np.asarray(raw, np.float64)
        if attention:
            if raw.shape != (n, t_max):
                raise ModelError(f"method '{m.name}' gave scores of shape {raw.shape}; token scores need ({n}, "
                                 f"{t_max}), one per token")
            reduction = "attention map: the explained query's row of the method's token-mixing matrix, one score " \
                        "per token (no hidden axis to reduce)"
            kinds = ["attention map" + (f"; target: {k}" if k else "") for k in kinds]
        elif raw.ndim != 3 or raw.shape[:2] != (n, t_max):
            raise ModelError(f"method '{m.name}' gave an attribution of shape {raw.shape} at the embedding "
                             f"'{layer}'; token scores need ({n}, {t_max}, hidden)")
        elif reduce == "l2":
            reduction = "l2: the norm over hidden of the attribution"
        elif m.name in GRADIENT_TYPE:
            x = ex.forward(feeds, [layer])[layer].astype(np.float64)
            reduction = "sum: sum over hidden of embedding x gradient (signed)"
        else:
            reduction = "sum: sum over hidden of the attribution (signed)"
    explained = _explained_scores(ex, feeds, target_arg, output, probability if ex is explainer else False)
    if m.kind == "black-box":
        reduce_name = "none"
    elif attention:
        reduce_name = "attention map"
    else:
        reduce_name = reduce
    results = []
    for i, enc in enumerate(encs):
        length = len(enc)
        a = raw[i, :length]
        if m.kind == "black-box":
            scores = a.copy()
            if m.name in ("occlusion", "feature_ablation"):
                # Never perturbed (their baseline is themselves): the drop is zero, not float noise
                # of a batched run against a single one.
                scores[enc.special] = 0.0
        elif attention:
            scores = a.copy()
        elif reduce == "l2":
            scores = np.linalg.norm(a, axis=-1)
        elif x is not None:
            scores = (x[i, :length] * a).sum(-1)
        else:
            scores = a.sum(-1)
        per_feature = m.kind == "black-box" and words
        merged = _merge_words(enc.tokens, enc.word_ids, enc.sequence_ids, enc.special, scores, reduce, enc.text,
                              enc.text_pair, enc.offsets, per_feature=per_feature)
        result = TokenAttribution(enc.text, enc.text_pair, enc.tokens, enc.ids.tolist(), enc.offsets,
                                  enc.special.tolist(), enc.word_ids, enc.sequence_ids, scores.astype(np.float64),
                                  reduce_name, m.name, target_text, a.astype(np.float32), kinds[i], layer,
                                  baseline_text if (m.kind == "black-box" or "baseline_ids" in m.options) else None,
                                  None if explained is None else float(explained[i]), "word" if words else "token",
                                  merged)
        result.reduction_text = reduction
        results.append(result)
    return results


def _explained_scores(explainer, feeds, target, output, probability) -> np.ndarray | None:
    """(n,) sum(seed * output) per text for the explained tensor, as every method explains it."""
    try:
        tensor = explainer.explained_tensor(output, probability)
        seed = explainer.seed_for(feeds, tensor, target)
        y = explainer.forward(feeds, [tensor])[tensor]
        return (seed.astype(np.float64) * y).reshape(len(y), -1).sum(-1)
    except Exception:  # a score is a courtesy; the attribution does not depend on it
        return None


# ----------------------------------------------------------------------------- text targets


def _pool(out: np.ndarray, mask: np.ndarray, pooling: str) -> np.ndarray:
    """(hidden,) sentence embedding of one sample's output: (tokens, hidden) pooled, or as is."""
    if out.ndim == 1:
        return out
    if out.ndim != 2:
        raise ModelError(f"a sentence encoder's output is (batch, hidden) or (batch, tokens, hidden); this one is "
                         f"{(1,) + out.shape}")
    if pooling == "cls":
        return out[0]
    m = mask.astype(np.float64)[:, None]
    return (out * m).sum(0) / max(m.sum(), 1.0)


def _check_pooling(pooling):
    if pooling not in ("mean", "cls"):
        raise OptionError(f"unknown pooling '{pooling}'; choose mean or cls")


def reference_embedding(explainer, tokenizer, reference: str, output=None, pooling: str = "mean"):
    """(emb(reference), rank of the explained output per sample, its name): the sentence
    embedding of the reference text with the model's pooling."""
    _check_pooling(pooling)
    tok = load_tokenizer(tokenizer)
    ref = encode(tok, reference)
    tensor = explainer.explained_tensor(output, False)
    out = explainer.forward(model_feeds(explainer, ref), [tensor])[tensor][0].astype(np.float64)
    if out.ndim not in (1, 2):
        raise ModelError(f"a text target needs a sentence encoder's output, (batch, hidden) or (batch, tokens, "
                         f"hidden); '{tensor}' is {(1,) + out.shape}")
    return _pool(out, ref.attention_mask, pooling), out.ndim, tensor


def text_target_seed(explainer, tokenizer, enc: Encoded, feeds: dict, target, output=None,
                     pooling: str = "mean") -> tuple[np.ndarray, str]:
    """(seed, what the score is) for `text:"reference"`: the seed on the explained output
    whose sum(seed * output) is dot(emb(text), emb(reference)), emb the model's pooling.

    A token-level output (batch, tokens, hidden) is mean-pooled over the attention mask
    (pooling='mean') or read at the first token ('cls'), so the pooling lives in the seed:
    seed[t] = mask[t] / count * emb(reference) (or the reference at token 0). A pooled
    (batch, hidden) output has the reference embedding as its seed."""
    seeds, kinds = text_target_seeds(explainer, tokenizer, [enc], feeds, target, output, pooling)
    return seeds, kinds[0]


def text_target_seeds(explainer, tokenizer, encs: list, feeds: dict, target, output=None,
                      pooling: str = "mean") -> tuple[np.ndarray, list]:
    """`text_target_seed` for a padded batch of texts (`model_feeds` of `encs`): the seeds
    stacked, (n, tokens, hidden) or (n, hidden), and what each text's score is. The mean
    runs over each text's own attention mask, so the padding has seed 0."""
    r, rank, tensor = reference_embedding(explainer, tokenizer, target.reference, output, pooling)
    out = explainer.forward(feeds, [tensor])[tensor].astype(np.float64)
    n = len(encs)
    if out.ndim - 1 != rank:
        raise ModelError(f"'{tensor}' has shape {out.shape[1:]} per sample for the text and rank {rank} for the "
                         "reference")
    if rank == 1:
        seed = np.broadcast_to(r, (n,) + r.shape)
        how = "the model's pooled output"
    else:
        t_max = out.shape[1]
        w = np.zeros((n, t_max))
        for i, e in enumerate(encs):
            if pooling == "cls":
                w[i, 0] = 1.0
            else:
                w[i, :len(e)] = e.attention_mask / max(e.attention_mask.sum(), 1)
        seed = w[:, :, None] * r[None, None, :]
        how = f"{pooling} pooling of '{tensor}' over the attention mask" if pooling == "mean" else \
            f"the first token of '{tensor}'"
    kinds = []
    for i, e in enumerate(encs):
        mask = np.zeros(out.shape[1] if rank == 2 else 0, np.int64)
        if rank == 2:
            mask[:len(e)] = e.attention_mask
        emb = _pool(out[i], mask, pooling)
        norms = np.linalg.norm(emb), np.linalg.norm(r)
        cos = float(emb @ r / max(norms[0] * norms[1], 1e-30))
        unit = all(abs(v - 1.0) < 1e-3 for v in norms)
        kinds.append(f"dot product of the sentence embeddings ({how}); " +
                     ("= the cosine, the embeddings have unit norm" if unit else
                      f"not the cosine (cosine {cos:.4f}, norms {norms[0]:.3g} and {norms[1]:.3g}): the cosine divides "
                      "by the text's own norm, which the attribution does not explain; text-cos:\"...\" explains it"))
    return np.ascontiguousarray(seed, dtype=np.float32), kinds


COSINE_OUTPUT = "onnxplain.text_cosine"
# The extended models of an explainer, per (tensor, pooling, reference embedding): each
# holds a copy of the weights, so only the last few are kept.
_COSINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_COSINES_KEPT = 2


def cosine_output(explainer, tokenizer, reference: str, output=None, pooling: str = "mean"):
    """(explainer, output, what it is) for `text-cos:"reference"`: the model with a scalar
    output per sample, cos(emb(text), emb(reference)), computed from the explained output
    in the graph, so every method explains the cosine itself with seed 1.

    Added nodes: the pooling ((batch, tokens, hidden): the mean over the attention mask
    input, or over all tokens when the model takes none; cls: token 0), the L2
    normalisation written as an RMSNorm, u = p / sqrt(mean(p^2) + 1e-12) = sqrt(H) p/|p|,
    and a MatMul with the constant unit reference embedding divided by sqrt(H). Written so
    because the rule families know these forms: the gradient is exact through all of them,
    relevance rules take the RMSNorm group with its scale held constant (AttnLRP) and the
    product with the reference as a linear layer."""
    import onnx
    from onnx import helper, numpy_helper

    from .explainer import Explainer, _np_dtype

    r, rank, tensor = reference_embedding(explainer, tokenizer, reference, output, pooling)
    norm = float(np.linalg.norm(r))
    if norm == 0:
        raise InputError(f"the reference {reference!r} has a zero embedding: its cosine is undefined")
    g = explainer.graph
    elem = g.elem_type(tensor) or onnx.TensorProto.FLOAT
    dtype = _np_dtype(elem)
    hidden = r.shape[0]
    weight = (r / norm / np.sqrt(hidden)).reshape(hidden, 1).astype(dtype)
    key = (tensor, pooling, rank, weight.tobytes())
    cache = _COSINES.setdefault(explainer, {})
    roles = input_roles(explainer)
    mask_input = next((k for k, v in roles.items() if v == "attention_mask"), None)
    how = "the model's pooled output" if rank == 1 else (
        f"the first token of '{tensor}'" if pooling == "cls" else
        f"mean pooling of '{tensor}' over {'the attention mask' if mask_input else 'all tokens'}")
    kind = (f"cosine of the sentence embeddings ({how}, L2-normalised, dotted with the unit reference embedding), "
            f"built into the graph as the output '{COSINE_OUTPUT}', explained with seed 1")
    if key in cache:
        return cache[key], COSINE_OUTPUT, kind
    opset = g.opset
    prefix = "onnxplain.text_cos/"
    nodes, inits = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), prefix + name))
        return prefix + name

    def node(op, inputs, name, **attrs):
        out = COSINE_OUTPUT if name == "cosine" else prefix + name
        nodes.append(helper.make_node(op, inputs, [out], name=prefix + name, **attrs))
        return out

    def reduce(op, x, axes, keepdims, name):
        if (op == "ReduceSum" and opset >= 13) or opset >= 18:
            return node(op, [x, const(name + "_axes", np.asarray(axes, np.int64))], name, keepdims=keepdims)
        return node(op, [x], name, axes=axes, keepdims=keepdims)

    if rank == 1:
        pooled = tensor
    elif pooling == "cls":
        pooled = node("Gather", [tensor, const("first", np.asarray(0, np.int64))], "pooled", axis=1)
    else:
        if mask_input is not None:
            mask = node("Cast", [mask_input], "mask", to=elem)
        else:
            ids = next(k for k, v in roles.items() if v == "input_ids")
            mask = node("ConstantOfShape", [node("Shape", [ids], "shape")], "mask",
                        value=helper.make_tensor("one", elem, [1], [1]))
        if opset >= 13:
            mask = node("Unsqueeze", [mask, const("last_axis", np.asarray([2], np.int64))], "mask3")
        else:
            mask = node("Unsqueeze", [mask], "mask3", axes=[2])
        total = reduce("ReduceSum", node("Mul", [tensor, mask], "masked"), [1], 0, "sum")
        count = reduce("ReduceSum", mask, [1], 0, "count")
        pooled = node("Div", [total, count], "pooled")
    mean_square = reduce("ReduceMean", node("Mul", [pooled, pooled], "square"), [-1], 1, "mean_square")
    rms = node("Sqrt", [node("Add", [mean_square, const("eps", np.asarray(1e-12, dtype))], "mean_square_eps")], "rms")
    unit = node("Div", [pooled, rms], "unit")
    node("MatMul", [unit, const("reference", weight)], "cosine")
    m = onnx.ModelProto()
    m.CopyFrom(g.model)
    m.graph.node.extend(nodes)
    m.graph.initializer.extend(inits)
    m.graph.output.append(helper.make_tensor_value_info(COSINE_OUTPUT, elem, ["batch", 1]))
    extended = Explainer(m, providers=explainer.providers, memory_budget=explainer.memory_budget, canonize=False)
    extended._cache.limit = explainer._cache.limit  # the model's own session budget, not a second default
    while len(cache) >= _COSINES_KEPT:
        cache.pop(next(iter(cache)))
    cache[key] = extended
    return extended, COSINE_OUTPUT, kind


# ----------------------------------------------------------------------------- renderings


def _scale(scores) -> float:
    s = np.abs(np.asarray(scores, np.float64))
    return float(s.max()) if s.size and s.max() > 0 else 1.0


def render(result: TokenAttribution, color: bool | None = None, words: bool | None = None) -> str:
    """The text with each token coloured by its score (ANSI: red positive, blue negative);
    plain `token(+0.12)` when `color` is False (default: colour on a terminal only)."""
    if color is None:
        color = sys.stdout.isatty()
    use_words = result.level == "word" if words is None else words
    units = [(w, s, all(result.special[i] for i in idx)) for w, idx, s in result.words] if use_words else \
        [(t, s, sp) for t, s, sp in zip(result.tokens, result.scores, result.special)]
    m = _scale([u[1] for u in units if not u[2]] or [1.0])
    parts = []
    for text, score, special in units:
        if not color:
            parts.append(f"{text}({score:+.3g})" + ("*" if special else ""))
            continue
        a = min(1.0, abs(score) / m)
        level = int(round(a * 5))
        # 256-colour cube: white towards red (positive) or blue (negative)
        if score >= 0:
            code = 16 + 36 * 5 + 6 * (5 - level) + (5 - level)
        else:
            code = 16 + 36 * (5 - level) + 6 * (5 - level) + 5
        style = "\x1b[2m" if special else ""
        parts.append(f"{style}\x1b[48;5;{code}m\x1b[38;5;16m{text}\x1b[0m")
    head = f"{result.method}, target {result.target}, reduction {result.reduction}"
    if result.score_kind:
        head += f"; score: {result.score_kind}"
    if result.explained_score is not None:
        head += f"; explained value {result.explained_score:.7g}"
    lines = [head, " ".join(parts)]
    top = result.top(5)
    lines.append("top: " + ", ".join(f"{t} {s:+.3g}" for _, t, s in top))
    if not color:
        lines.append("(* special token)")
    return "\n".join(lines)


def _rgba(score: float, m: float) -> str:
    a = min(1.0, abs(score) / m) * 0.85
    return f"rgba(220,38,38,{a:.3f})" if score >= 0 else f"rgba(37,99,235,{a:.3f})"


def _section(result: TokenAttribution, h1: str = "h1", h2: str = "h2") -> str:
    """The page's part for one text: its spans, words and top tokens."""
    esc = _html.escape
    m = _scale([s for s, sp in zip(result.scores, result.special) if not sp] or [1.0])
    spans = []
    for i, (t, s, sp) in enumerate(zip(result.tokens, result.scores, result.special)):
        cls = "tok special" if sp else "tok"
        spans.append(f'<span class="{cls}" data-index="{i}" data-score="{float(s):.6g}" '
                     f'data-special="{str(bool(sp)).lower()}" style="background:{_rgba(float(s), m)}" '
                     f'title="{esc(t)}: {float(s):+.4g}">{esc(t)}</span>')
    wm = _scale([s for _, idx, s in result.words if not all(result.special[i] for i in idx)] or [1.0])
    words = []
    for w, idx, s in result.words:
        sp = all(result.special[i] for i in idx)
        words.append(f'<span class="word{" special" if sp else ""}" data-score="{s:.6g}" '
                     f'style="background:{_rgba(s, wm)}" title="{s:+.4g}">{esc(w)}</span>')
    top = "".join(f'<li><span class="tok" style="background:{_rgba(s, m)}">{esc(t)}</span> '
                  f'<code>{s:+.4g}</code></li>' for _, t, s in result.top(8))
    meta = [("method", result.method), ("target", result.target),
            ("reduction", getattr(result, "reduction_text", result.reduction))]
    if result.score_kind:
        meta.append(("score", result.score_kind))
    if result.explained_score is not None:
        meta.append(("explained value", f"{result.explained_score:.6g}"))
    if result.layer:
        meta.append(("attributed at", result.layer))
    if result.baseline:
        meta.append(("baseline", result.baseline))
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in meta)
    pair = f'<p class="pair">pair: {esc(result.text_pair)}</p>' if result.text_pair else ""
    return f"""<{h1}>Why: {esc(result.text)}</{h1}>{pair}
<table>{rows}</table>
<p class="legend"><span style="background:rgba(220,38,38,0.85)">for the target</span>
<span style="background:rgba(37,99,235,0.85)">against</span> <span class="special">special token</span></p>
<{h2}>Tokens</{h2}><div class="tokens">{''.join(spans)}</div>
<{h2}>Words</{h2}><div class="words">{''.join(words)}</div>
<{h2}>Top tokens</{h2}><ol class="top">{top}</ol>
"""


def _page_head(title: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>onnxplain: {_html.escape(title[:60])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 60em; color: #111; }}
h1 {{ font-size: 1.3em; }}
.tokens, .words {{ font-size: 1.5em; line-height: 2.2em; }}
.tok, .word {{ padding: 0.15em 0.3em; margin: 0 0.08em; border-radius: 0.25em; }}
.special {{ font-style: italic; color: #666; outline: 1px dashed #aaa; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th {{ text-align: left; padding-right: 1em; color: #555; font-weight: normal; white-space: nowrap; vertical-align: top; }}
.legend span {{ padding: 0.1em 0.5em; border-radius: 0.25em; }}
ol li {{ margin: 0.3em 0; font-size: 1.1em; }}
</style></head><body>
"""


def to_html(result: TokenAttribution) -> str:
    """A self-contained page: one span per token (its score in data-score, red positive,
    blue negative), the words, and the top tokens."""
    return _page_head(result.text) + _section(result) + "</body></html>\n"


def to_html_many(results: list) -> str:
    """One self-contained page for several texts: a section per text, as `to_html` draws it."""
    title = f"{len(results)} texts"
    sections = "".join(f'<section class="text" data-text="{i}">' + _section(r, "h2", "h3") + "</section>\n"
                       for i, r in enumerate(results))
    return _page_head(title) + f"<h1>onnxplain: {title}</h1>\n" + sections + "</body></html>\n"
