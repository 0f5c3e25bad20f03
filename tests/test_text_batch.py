"""Text explanations beyond one text and one dot product (onnxplain.text):

- `text-cos:"REFERENCE"`: the cosine of the two sentence embeddings, added to the graph as
  a scalar output (pooling over the attention mask, L2 normalisation, the product with
  the unit reference embedding) and explained with seed 1. References: torch autograd of
  the cosine (gradient at the word embedding), Captum's LayerIntegratedGradients with a
  forward function returning the cosine, and numpy's cosine of onnxruntime's pooled
  embeddings for the printed value.
- attention maps (attention_rollout, generic_attention, transformer_attribution) as token
  scores: their (batch, tokens) row read directly, on a random tiny BERT of transformers.
- batches of texts: padded at the end with the attention mask 0; each text's scores in
  the batch equal the same text explained alone.

The small PyTorch token models and the tokenizer are tests/test_text.py's.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")
from test_text import CLS, PAD, SENTENCE, VOCAB, TextNet, export, make_tokenizer  # noqa: E402

from onnxplain import text as T  # noqa: E402
from onnxplain.errors import ModelError, OptionError  # noqa: E402
from onnxplain.explainer import Explainer  # noqa: E402

REF = "a great film"
TEXTS = [SENTENCE, "a bad plot", "good actors and a boring film !"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text_batch")
    tok = make_tokenizer(folder / "tokenizer.json")
    models = {}
    for name, encoder in (("classifier", False), ("encoder", True)):
        model = TextNet(encoder).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        models[name] = model, Explainer(str(export(model, folder / f"{name}.onnx")))
    return tok, models, folder


def _inputs(enc):
    return tuple(torch.tensor(a[None]) for a in (enc.ids, enc.attention_mask, enc.type_ids))


def _pooled(model, ids, mask, types, pooling="mean"):
    h = model(ids, mask, types)
    if pooling == "cls":
        return h[:, 0]
    m = mask[:, :, None].float()
    return (h * m).sum(1) / m.sum(1)


class _Cosine(torch.nn.Module):
    """(batch,) cos(pooled emb(ids), emb(REF)): the explained score as a torch model."""

    def __init__(self, model, ref, pooling="mean"):
        super().__init__()
        self.model, self.ref, self.pooling = model, ref, pooling

    def forward(self, ids, mask, types):
        return torch.nn.functional.cosine_similarity(_pooled(self.model, ids, mask, types, self.pooling),
                                                     self.ref[None], dim=-1)


def _reference(model, tok, pooling="mean"):
    with torch.no_grad():
        return _pooled(model, *_inputs(T.encode(tok, REF)), pooling)[0]


def _cosine_autograd(model, tok, enc, pooling="mean"):
    ids, mask, types = _inputs(enc)
    f = _Cosine(model, _reference(model, tok, pooling), pooling)
    e = model.word_emb(ids).detach().requires_grad_(True)
    saved = model.word_emb.forward
    model.word_emb.forward = lambda _ids: e
    try:
        f(ids, mask, types)[0].backward()
    finally:
        model.word_emb.forward = saved
    return e.detach().numpy()[0].astype(np.float64), e.grad.numpy()[0].astype(np.float64)


# ----------------------------------------------------------------------------- text-cos


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_a_cosine_target_explains_the_cosine_as_torch_autograd_differentiates_it(setup, pooling):
    tok, models, _ = setup
    model, ex = models["encoder"]
    r = T.explain_text(ex, tok, SENTENCE, method="gradient", target=f'text-cos:"{REF}"', pooling=pooling)
    x, g = _cosine_autograd(model, tok, T.encode(tok, SENTENCE), pooling)
    np.testing.assert_allclose(r.attribution, g, rtol=1e-4, atol=1e-5 * np.abs(g).max())
    np.testing.assert_allclose(r.scores, (x * g).sum(-1), rtol=1e-4, atol=1e-5 * np.abs((x * g).sum(-1)).max())
    assert r.target == f'text-cos:"{REF}"' and r.score_kind.startswith("cosine")
    assert T.COSINE_OUTPUT in r.score_kind and "seed 1" in r.score_kind


def test_the_printed_cosine_is_numpys_cosine_of_onnxruntimes_pooled_embeddings(setup):
    tok, models, _ = setup
    _, ex = models["encoder"]
    r = T.explain_text(ex, tok, SENTENCE, method="input_x_gradient", target=f'text-cos:"{REF}"')
    out = ex.outputs[0]
    enc, ref = T.encode(tok, SENTENCE), T.encode(tok, REF)
    h = ex.forward(T.model_feeds(ex, enc), [out])[out][0].astype(np.float64)
    hr = ex.forward(T.model_feeds(ex, ref), [out])[out][0].astype(np.float64)
    a, b = h.mean(0), hr.mean(0)  # every token unmasked: the mean over tokens
    assert r.explained_score == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-6)
    # the dot-product target says it is not the cosine, and where the cosine is
    dot = T.explain_text(ex, tok, SENTENCE, method="gradient", target=f'text:"{REF}"')
    assert "not the cosine" in dot.score_kind and "text-cos" in dot.score_kind
    assert dot.explained_score == pytest.approx(a @ b, rel=1e-5)


def test_a_cosine_target_integrates_gradients_along_the_path_through_the_normalisation_as_captum(setup):
    from captum.attr import LayerIntegratedGradients

    tok, models, _ = setup
    model, ex = models["encoder"]
    r = T.explain_text(ex, tok, SENTENCE, method="integrated_gradients", target=f'text-cos:"{REF}"', n_steps=24)
    enc = T.encode(tok, SENTENCE)
    ids, mask, types = _inputs(enc)
    base = torch.where(torch.tensor(enc.special)[None], ids, torch.full_like(ids, PAD))
    lig = LayerIntegratedGradients(_Cosine(model, _reference(model, tok)), model.word_emb)
    ref = lig.attribute(ids, baselines=base, additional_forward_args=(mask, types), n_steps=24)
    ref = ref.detach().numpy()[0].astype(np.float64)
    np.testing.assert_allclose(r.attribution, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(r.scores, ref.sum(-1), rtol=1e-4, atol=1e-5 * np.abs(ref.sum(-1)).max())


def test_attnlrp_of_the_cosine_is_the_dot_product_relevance_divided_by_the_two_norms(setup):
    """The normalisation is an RMSNorm group to AttnLRP, its scale held constant: the
    relevance of cos = dot / (|e| |r|) is the dot product's divided by those norms."""
    tok, models, _ = setup
    _, ex = models["encoder"]
    cos = T.explain_text(ex, tok, SENTENCE, method="lrp.attnlrp", target=f'text-cos:"{REF}"')
    dot = T.explain_text(ex, tok, SENTENCE, method="lrp.attnlrp", target=f'text:"{REF}"')
    out = ex.outputs[0]
    e = ex.forward(T.model_feeds(ex, T.encode(tok, SENTENCE)), [out])[out][0].mean(0)
    r = ex.forward(T.model_feeds(ex, T.encode(tok, REF)), [out])[out][0].mean(0)
    scale = float(np.linalg.norm(e) * np.linalg.norm(r))
    np.testing.assert_allclose(cos.attribution * scale, dot.attribution, rtol=1e-3,
                               atol=1e-5 * np.abs(dot.attribution).max())


def test_a_cosine_target_refuses_probabilities_and_lrp_rules_refuse_by_name(setup):
    tok, models, _ = setup
    _, ex = models["encoder"]
    with pytest.raises(OptionError, match="cosine, not a class"):
        T.explain_text(ex, tok, SENTENCE, target=f'text-cos:"{REF}"', probability=True)
    with pytest.raises(ModelError, match="MatMul"):  # the model's attention product, named
        T.explain_text(ex, tok, SENTENCE, method="lrp.epsilon", target=f'text-cos:"{REF}"')


# ----------------------------------------------------------------------------- attention maps


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A random-initialised transformers BERT classifier over the test vocabulary (nothing
    downloaded), exported with dynamic batch and tokens."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32, num_labels=3)
    model = transformers.BertForSequenceClassification(cfg).eval()
    model.set_attn_implementation("eager")

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    path = export(Logits().eval(), tmp_path_factory.mktemp("bert") / "bert.onnx")
    return Explainer(str(path))


@pytest.mark.parametrize("method", list(T.ATTENTION_MAPS))
def test_attention_map_token_scores_are_the_methods_row_read_directly(setup, bert, method):
    tok = setup[0]
    r = T.explain_text(bert, tok, SENTENCE, method=method, target=1)
    enc = T.encode(tok, SENTENCE)
    direct = np.asarray(bert.attribute(T.model_feeds(bert, enc), method=method, target=1), np.float64)
    assert direct.shape == (1, len(enc))
    np.testing.assert_array_equal(r.scores, direct[0])
    assert r.reduction == "attention map" and r.score_kind == "attention map"
    assert "no hidden axis" in r.reduction_text
    with pytest.raises(OptionError, match="no hidden axis to reduce"):
        T.explain_text(bert, tok, SENTENCE, method=method, target=1, reduce="l2")


def test_attention_rollout_of_a_padded_batch_equals_each_text_alone(setup, bert):
    tok = setup[0]
    batch = T.explain_text(bert, tok, TEXTS, method="attention_rollout", target=0)
    for text, b in zip(TEXTS, batch):
        alone = T.explain_text(bert, tok, text, method="attention_rollout", target=0)
        assert b.tokens == alone.tokens
        np.testing.assert_allclose(b.scores, alone.scores, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- batches


CASES = [("classifier", "gradient", 2, {}), ("classifier", "input_x_gradient", 0, {"reduce": "l2"}),
         ("classifier", "integrated_gradients", 1, {"n_steps": 8}), ("classifier", "lrp.attnlrp", 1, {}),
         ("classifier", "feature_ablation", 0, {"words": True}), ("classifier", "occlusion", 2, {}),
         ("classifier", "kernel_shap", 1, {"n_samples": 40, "seed": 3}),
         ("encoder", "gradient", f'text:"{REF}"', {}), ("encoder", "integrated_gradients", f'text-cos:"{REF}"',
                                                        {"n_steps": 8})]


@pytest.mark.parametrize("model_name, method, target, kw", CASES, ids=[f"{c[1]}-{c[0]}" for c in CASES])
def test_each_text_of_a_padded_batch_is_scored_as_it_is_alone(setup, model_name, method, target, kw):
    tok, models, _ = setup
    ex = models[model_name][1]
    batch = T.explain_text(ex, tok, TEXTS, method=method, target=target, **kw)
    assert len(batch) == len(TEXTS)
    for text, b in zip(TEXTS, batch):
        alone = T.explain_text(ex, tok, text, method=method, target=target, **kw)
        assert b.text == text and b.tokens == alone.tokens and b.attribution.shape == alone.attribution.shape
        scale = max(np.abs(alone.scores).max(), 1e-12)
        np.testing.assert_allclose(b.scores, alone.scores, rtol=1e-4, atol=1e-5 * scale)
        assert b.explained_score == pytest.approx(alone.explained_score, rel=1e-5, abs=1e-7)
        assert [w for w, _, _ in b.words] == [w for w, _, _ in alone.words]
        np.testing.assert_allclose([s for _, _, s in b.words], [s for _, _, s in alone.words], rtol=1e-4,
                                   atol=1e-5 * scale)
        assert b.score_kind == alone.score_kind


def test_the_padding_is_masked_and_kept_out_of_every_baseline(setup):
    tok, models, _ = setup
    ex = models["classifier"][1]
    encs = [T.encode(tok, t) for t in TEXTS]
    feeds = T.model_feeds(ex, encs, T.pad_token_id(tok))
    longest = max(len(e) for e in encs)
    assert feeds["input_ids"].shape == (len(TEXTS), longest)
    for i, e in enumerate(encs):
        np.testing.assert_array_equal(feeds["input_ids"][i, len(e):], PAD)
        np.testing.assert_array_equal(feeds["attention_mask"][i], [1] * len(e) + [0] * (longest - len(e)))
    assert feeds["input_ids"][1, 0] == CLS


def test_text_pairs_go_one_per_text_or_one_for_all(setup):
    tok, models, _ = setup
    ex = models["classifier"][1]
    pairs = ["a great film", "not boring"]
    batch = T.explain_text(ex, tok, TEXTS[:2], pairs, method="gradient", target=1)
    for text, pair, b in zip(TEXTS[:2], pairs, batch):
        alone = T.explain_text(ex, tok, text, pair, method="gradient", target=1)
        assert b.text_pair == pair and b.tokens == alone.tokens
        np.testing.assert_allclose(b.scores, alone.scores, rtol=1e-4, atol=1e-6)
    with pytest.raises(Exception, match="one pair per text"):
        T.explain_text(ex, tok, TEXTS, pairs, method="gradient", target=1)


class NoMaskNet(TextNet):
    """TextNet without an attention-mask input: padding would change what it computes."""

    def forward(self, input_ids, token_type_ids):
        return super().forward(input_ids, torch.ones_like(input_ids), token_type_ids)


def test_a_model_without_an_attention_mask_refuses_a_batch_that_needs_padding(setup, tmp_path):
    tok = setup[0]
    model = NoMaskNet().eval()
    ids = torch.tensor([[CLS, 5, 6, 2]])
    names = ["input_ids", "token_type_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, torch.zeros_like(ids)), str(tmp_path / "nomask.onnx"), dynamo=False,
                          opset_version=17, input_names=names, output_names=["out"],
                          dynamic_axes={n: {0: "batch", 1: "tokens"} for n in names})
    ex = Explainer(str(tmp_path / "nomask.onnx"))
    with pytest.raises(ModelError, match="no attention mask"):
        T.explain_text(ex, tok, TEXTS, method="gradient", target=0)
    same = T.explain_text(ex, tok, ["a great film", "a bad plot"], method="gradient", target=0)  # no padding
    alone = T.explain_text(ex, tok, "a bad plot", method="gradient", target=0)
    np.testing.assert_allclose(same[1].scores, alone.scores, rtol=1e-4, atol=1e-6)


def test_explain_text_with_several_texts_writes_one_result_per_text(setup, tmp_path):
    from click.testing import CliRunner

    from onnxplain.cli import main

    tok, _, folder = setup
    lines = tmp_path / "texts.txt"
    lines.write_text(f"{TEXTS[1]}\n\n{TEXTS[2]}\n")
    base = ["explain-text", str(folder / "encoder.onnx"), "--tokenizer", str(tok), "--text", TEXTS[0], "--texts",
            str(lines), "-t", f'text-cos:"{REF}"', "-m", "gradient", "--no-color"]
    alone = [T.explain_text(folder / "encoder.onnx", tok, t, target=f'text-cos:"{REF}"') for t in TEXTS]
    res = CliRunner().invoke(main, base + ["-o", str(tmp_path / "why.json")])
    assert res.exit_code == 0, res.output
    assert res.output.count("[CLS](") == 3 and res.output.count("cosine of the sentence embeddings") == 3
    # the printed value of each text: numpy's cosine of onnxruntime's mean-pooled embeddings
    import re

    ex = Explainer(str(folder / "encoder.onnx"))
    hr = ex.forward(T.model_feeds(ex, T.encode(tok, REF)), ["out"])["out"][0].mean(0).astype(np.float64)
    printed = [float(v) for v in re.findall(r"explained value ([-+0-9.e]+)", res.output)]
    assert len(printed) == 3
    for text, value in zip(TEXTS, printed):
        h = ex.forward(T.model_feeds(ex, T.encode(tok, text)), ["out"])["out"][0].mean(0).astype(np.float64)
        assert value == pytest.approx(h @ hr / np.linalg.norm(h) / np.linalg.norm(hr), rel=1e-6)
    d = json.loads((tmp_path / "why.json").read_text())["texts"]
    assert [x["text"] for x in d] == TEXTS
    for x, a in zip(d, alone):
        assert [t["token"] for t in x["tokens"]] == a.tokens
        np.testing.assert_allclose([t["score"] for t in x["tokens"]], a.scores, rtol=1e-4, atol=1e-7)
        assert x["score"] == pytest.approx(a.explained_score, rel=1e-5)
    res = CliRunner().invoke(main, base + ["-o", str(tmp_path / "why.npz")])
    assert res.exit_code == 0, res.output
    z = np.load(tmp_path / "why.npz")
    assert z["scores"].shape[0] == 3 and z["attribution"].ndim == 3
    for i, a in enumerate(alone):
        k = int(z["lengths"][i])
        assert k == len(a.tokens) and list(z["tokens"][i, :k]) == a.tokens
        np.testing.assert_allclose(z["scores"][i, :k], a.scores, rtol=1e-4, atol=1e-7)
        assert np.all(z["scores"][i, k:] == 0) and np.all(z["ids"][i, k:] == -1)
    res = CliRunner().invoke(main, base + ["-o", str(tmp_path / "why.html")])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "why.html").read_text()
    assert page.count('<section class="text"') == 3 and page.count('class="tok') >= sum(len(a.tokens) for a in alone)
    printed = json.loads(CliRunner().invoke(main, base + ["--json"]).output)
    assert [x["text"] for x in printed["texts"]] == TEXTS
    bad = CliRunner().invoke(main, base + ["-o", str(tmp_path / "why.npy")])
    assert bad.exit_code != 0 and ".npz" in bad.output
