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

Special tokens are kept in the result and marked; words are merged from the tokenizer's
word ids. `text:"..."` targets (sentence encoders) are resolved here: the reference text
is encoded and embedded with the same model and pooling, and the seed makes the explained
score dot(emb(text), emb(reference)).
"""

from __future__ import annotations

import html as _html
import json
import sys
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


def model_feeds(explainer, enc: Encoded) -> dict:
    """The model's inputs for one encoded text (batch 1), by name, in the model's dtypes."""
    from .explainer import _np_dtype

    g = explainer.graph
    values = {"input_ids": enc.ids, "attention_mask": enc.attention_mask, "token_type_ids": enc.type_ids,
              "position_ids": np.arange(len(enc), dtype=np.int64)}
    feeds = {}
    for name, role in input_roles(explainer).items():
        shape = g.shape(name)
        v = values[role][None]
        if shape is not None and len(shape) != 2:
            raise ModelError(f"input '{name}' ({role}) has shape {shape}; a token model takes (batch, tokens)")
        if shape is not None and isinstance(shape[1], int) and shape[1] != len(enc):
            raise InputError(f"the model takes exactly {shape[1]} tokens in '{name}'; the text has {len(enc)} "
                             "(export the model with a dynamic sequence axis)")
        feeds[name] = v.astype(_np_dtype(g.elem_type(name)))
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


def _feature_mask(enc: Encoded, words: bool) -> np.ndarray:
    """One feature per token, or per word (special tokens each their own feature)."""
    if not words:
        return np.arange(len(enc))[None]
    keys, mask = {}, []
    for i, (w, q) in enumerate(zip(enc.word_ids, enc.sequence_ids)):
        key = ("s", i) if enc.special[i] or w is None else ("w", q, w)
        mask.append(keys.setdefault(key, len(keys)))
    return np.asarray(mask, np.int64)[None]


def explain_text(explainer, tokenizer, text: str, text_pair: str | None = None, method: str = "gradient",
                 target=None, reduce: str = "sum", words: bool = False, baseline_id: int | None = None,
                 output=None, probability: bool = False, pooling: str = "mean", **options) -> TokenAttribution:
    """Explain `explainer`'s model on `text` (and `text_pair`) and score each token.

    target: any target of the grammar, or `text:"..."` for a sentence encoder (see
    `text_target_seed`). reduce: `sum` or `l2` over the hidden axis (see the module's
    doc). words: merge scores into words (black-box methods then perturb whole words).
    baseline_id: the id a black-box method puts in place of a token, and the id whose
    embedding is the baseline of integrated gradients / DeepLIFT (default: the tokenizer's
    PAD id); special tokens keep their ids in every baseline.
    """
    from .explainer import Explainer
    from .methods.base import get_method
    from .target import as_target

    if not isinstance(explainer, Explainer):
        explainer = Explainer(explainer)
    if reduce not in REDUCTIONS:
        raise OptionError(f"unknown reduction '{reduce}'; choose {' or '.join(REDUCTIONS)}")
    tok = load_tokenizer(tokenizer)
    enc = encode(tok, text, text_pair)
    feeds = model_feeds(explainer, enc)
    roles = input_roles(explainer)
    ids_name = next(n for n, r in roles.items() if r == "input_ids")
    m = get_method(method)
    if baseline_id is None:
        baseline_id, base_name = baseline_token_id(tok)
    else:
        base_name = tok.id_to_token(int(baseline_id)) or f"id {baseline_id}"
    base_ids = np.where(enc.special, enc.ids, int(baseline_id))[None].astype(feeds[ids_name].dtype)
    baseline_text = f"{base_name} (id {int(baseline_id)}), special tokens kept"

    score_kind = ""
    from .target import TextTarget

    t = as_target(target)
    if isinstance(t, TextTarget):
        seed, score_kind = text_target_seed(explainer, tok, enc, feeds, t, output=output, pooling=pooling)
        target_arg, target_text = seed, t.text
    else:
        target_arg, target_text = target, t.text

    opts = dict(options)
    if m.kind == "black-box":
        if m.name not in TOKEN_BLACK_BOX:
            raise OptionError(f"method '{m.name}' does not perturb tokens; over tokens use "
                              f"{', '.join(TOKEN_BLACK_BOX)}, or a white-box method at the embedding")
        if m.name == "occlusion":
            if words:
                raise OptionError("occlusion slides a window over tokens; to remove whole words use "
                                  "feature_ablation (or kernel_shap, lime) with words")
        else:
            opts.setdefault("feature_mask", _feature_mask(enc, words))
        opts.setdefault("baseline", base_ids)
        raw = explainer.attribute(feeds, method=m.name, target=target_arg, output=output, probability=probability,
                                  wrt=ids_name, **opts)
        raw = np.asarray(raw, np.float64)[0]
        scores, reduction, layer = raw.copy(), "none (the score drop of the perturbed token)", None
        if m.name in ("occlusion", "feature_ablation"):
            # Never perturbed (their baseline is themselves): the drop is zero, not float noise
            # of a batched run against a single one.
            scores[enc.special] = 0.0
        if m.name in ("kernel_shap", "lime"):
            reduction = "none (the surrogate's coefficient of the token)"
    else:
        layer = word_embedding(explainer, ids_name)
        if "baseline_ids" in m.options and "layer_baseline" not in opts:
            opts.setdefault("baseline_ids", base_ids)
        raw = explainer.attribute(feeds, method=m.name, target=target_arg, output=output, probability=probability,
                                  layer=layer, **opts)
        raw = np.asarray(raw, np.float64)
        if raw.ndim != 3 or raw.shape[:2] != (1, len(enc)):
            raise ModelError(f"method '{m.name}' gave an attribution of shape {raw.shape} at the embedding "
                             f"'{layer}'; token scores need (1, {len(enc)}, hidden)")
        raw = raw[0]
        if reduce == "l2":
            scores, reduction = np.linalg.norm(raw, axis=-1), "l2: the norm over hidden of the attribution"
        elif m.name in GRADIENT_TYPE:
            x = explainer.forward(feeds, [layer])[layer][0].astype(np.float64)
            scores, reduction = (x * raw).sum(-1), "sum: sum over hidden of embedding x gradient (signed)"
        else:
            scores, reduction = raw.sum(-1), "sum: sum over hidden of the attribution (signed)"
    explained = _explained_score(explainer, feeds, target_arg, output, probability)
    per_feature = m.kind == "black-box" and words
    merged = _merge_words(enc.tokens, enc.word_ids, enc.sequence_ids, enc.special, scores, reduce, enc.text,
                          enc.text_pair, enc.offsets, per_feature=per_feature)
    if m.kind == "black-box":
        reduce_name = "none"
    else:
        reduce_name = reduce
    result = TokenAttribution(enc.text, enc.text_pair, enc.tokens, enc.ids.tolist(), enc.offsets,
                              enc.special.tolist(), enc.word_ids, enc.sequence_ids, scores.astype(np.float64),
                              reduce_name, m.name, target_text, raw.astype(np.float32), score_kind, layer,
                              baseline_text if (m.kind == "black-box" or "baseline_ids" in m.options) else None,
                              explained, "word" if words else "token", merged)
    result.reduction_text = reduction
    return result


def _explained_score(explainer, feeds, target, output, probability) -> float | None:
    """sum(seed * output) for the explained tensor, as every method explains it."""
    try:
        tensor = explainer.explained_tensor(output, probability)
        seed = explainer.seed_for(feeds, tensor, target)
        y = explainer._forward(feeds, [tensor])[tensor]
        return float(np.sum(seed.astype(np.float64) * y))
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


def text_target_seed(explainer, tokenizer, enc: Encoded, feeds: dict, target, output=None,
                     pooling: str = "mean") -> tuple[np.ndarray, str]:
    """(seed, what the score is) for `text:"reference"`: the seed on the explained output
    whose sum(seed * output) is dot(emb(text), emb(reference)), emb the model's pooling.

    A token-level output (batch, tokens, hidden) is mean-pooled over the attention mask
    (pooling='mean') or read at the first token ('cls'), so the pooling lives in the seed:
    seed[t] = mask[t] / count * emb(reference) (or the reference at token 0). A pooled
    (batch, hidden) output has the reference embedding as its seed."""
    if pooling not in ("mean", "cls"):
        raise OptionError(f"unknown pooling '{pooling}'; choose mean or cls")
    tok = load_tokenizer(tokenizer)
    ref = encode(tok, target.reference)
    ref_feeds = model_feeds(explainer, ref)
    tensor = explainer.explained_tensor(output, False)
    out_x = explainer._forward(feeds, [tensor])[tensor][0].astype(np.float64)
    out_r = explainer._forward(ref_feeds, [tensor])[tensor][0].astype(np.float64)
    if out_x.ndim not in (1, 2):
        raise ModelError(f"target '{target.text}' needs a sentence encoder's output, (batch, hidden) or (batch, "
                         f"tokens, hidden); '{tensor}' is {(1,) + out_x.shape}")
    r = _pool(out_r, ref.attention_mask, pooling)
    if out_x.ndim == 1:
        seed = r[None]
        how = "the model's pooled output"
    else:
        if pooling == "cls":
            w = np.zeros(len(enc))
            w[0] = 1.0
        else:
            w = enc.attention_mask.astype(np.float64) / max(enc.attention_mask.sum(), 1)
        seed = (w[:, None] * r[None, :])[None]
        how = f"{pooling} pooling of '{tensor}' over the attention mask" if pooling == "mean" else \
            f"the first token of '{tensor}'"
    e = _pool(out_x, enc.attention_mask, pooling)
    norms = np.linalg.norm(e), np.linalg.norm(r)
    cos = float(e @ r / max(norms[0] * norms[1], 1e-30))
    unit = all(abs(n - 1.0) < 1e-3 for n in norms)
    kind = (f"dot product of the sentence embeddings ({how}); " +
            ("= the cosine, the embeddings have unit norm" if unit else
             f"not the cosine (cosine {cos:.4f}, norms {norms[0]:.3g} and {norms[1]:.3g}): the cosine divides by "
             "the text's own norm, which the attribution does not explain"))
    return seed.astype(np.float32), kind


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
    lines = [head, " ".join(parts)]
    top = result.top(5)
    lines.append("top: " + ", ".join(f"{t} {s:+.3g}" for _, t, s in top))
    if not color:
        lines.append("(* special token)")
    return "\n".join(lines)


def _rgba(score: float, m: float) -> str:
    a = min(1.0, abs(score) / m) * 0.85
    return f"rgba(220,38,38,{a:.3f})" if score >= 0 else f"rgba(37,99,235,{a:.3f})"


def to_html(result: TokenAttribution) -> str:
    """A self-contained page: one span per token (its score in data-score, red positive,
    blue negative), the words, and the top tokens."""
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
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>onnxplain: {esc(result.text[:60])}</title>
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
<h1>Why: {esc(result.text)}</h1>{pair}
<table>{rows}</table>
<p class="legend"><span style="background:rgba(220,38,38,0.85)">for the target</span>
<span style="background:rgba(37,99,235,0.85)">against</span> <span class="special">special token</span></p>
<h2>Tokens</h2><div class="tokens">{''.join(spans)}</div>
<h2>Words</h2><div class="words">{''.join(words)}</div>
<h2>Top tokens</h2><ol class="top">{top}</ol>
</body></html>
"""
