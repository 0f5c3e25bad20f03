"""Text in, tokens out (onnxplain.text): a tokenizer.json encodes the text, the model's
inputs are filled by name, and the embedding-level attribution becomes token scores with
the reduction named; black-box methods perturb tokens (or words) with a baseline id.

References, element-wise, on a small PyTorch token model (word, position and type
embeddings, LayerNorm, masked attention, GELU MLP) exported to ONNX with a dynamic batch
and sequence: torch autograd at the word embedding (gradient, input x gradient), Captum's
LayerIntegratedGradients(word_emb, baselines=PAD ids with CLS/SEP kept), FeatureAblation
and KernelShap with the same feature mask and baseline; the `text:` target's seed against
the dot product of mean-pooled embeddings computed in torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import warnings

import numpy as np
import pytest
import torch

from onnxplain.errors import OptionError
from onnxplain.explainer import Explainer
from onnxplain.target import parse_target

tokenizers = pytest.importorskip("tokenizers")
from onnxplain import text as T  # noqa: E402

nn = torch.nn
CHROMIUM = "/usr/bin/chromium"
WORDS = ["the", "movie", "was", "wonder", "##ful", "a", "great", "film", "bad", "plot", "actors", "good", "and",
         "!", "not", "boring"]
SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
VOCAB = SPECIALS + WORDS
PAD, CLS, SEP = 0, 1, 2
D = 8


def make_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)])
    tok.decoder = decoders.WordPiece()
    tok.enable_padding(pad_id=PAD, pad_token="[PAD]")
    tok.save(str(path))
    return path


class TextNet(nn.Module):
    """Word + position + type embeddings -> LayerNorm -> one masked attention head with a
    residual -> GELU MLP -> (encoder) the hidden states, or (classifier) mean pool -> 3 logits."""

    def __init__(self, encoder=False):
        super().__init__()
        torch.manual_seed(3)
        self.encoder = encoder
        self.word_emb = nn.Embedding(len(VOCAB), D)
        self.pos_emb = nn.Embedding(32, D)
        self.type_emb = nn.Embedding(2, D)
        self.ln = nn.LayerNorm(D)
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D))
        self.out = nn.Linear(D, 3)

    def forward(self, input_ids, attention_mask, token_type_ids):
        pos = torch.arange(input_ids.shape[1])[None]
        h = self.ln(self.word_emb(input_ids) + self.pos_emb(pos) + self.type_emb(token_type_ids))
        scores = self.q(h) @ self.k(h).transpose(1, 2) / D ** 0.5
        scores = scores + (1.0 - attention_mask[:, None, :].float()) * -1e4
        h = h + torch.softmax(scores, -1) @ self.v(h)
        h = h + self.mlp(h)
        if self.encoder:
            return h
        m = attention_mask[:, :, None].float()
        return self.out((h * m).sum(1) / m.sum(1))


def export(model, path, dynamo=False):
    ids = torch.tensor([[CLS, 5, 6, 7, SEP]])
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            b, t = torch.export.Dim("batch"), torch.export.Dim("tokens", min=2, max=31)
            torch.onnx.export(model, args, str(path), dynamo=True, input_names=names, output_names=["out"],
                              dynamic_shapes={n: {0: b, 1: t} for n in names}, verbose=False)
        else:
            torch.onnx.export(model, args, str(path), dynamo=False, opset_version=17, input_names=names,
                              output_names=["out"], dynamic_axes={**{n: {0: "batch", 1: "tokens"} for n in names},
                                                                  "out": {0: "batch"}})
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    tok = make_tokenizer(folder / "tokenizer.json")
    models = {}
    for name, encoder in (("classifier", False), ("encoder", True)):
        model = TextNet(encoder).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        models[name] = model, Explainer(str(export(model, folder / f"{name}.onnx")))
    return tok, models, folder


SENTENCE = "The movie was wonderful!"


def _torch_inputs(enc):
    return tuple(torch.tensor(a[None]) for a in (enc.ids, enc.attention_mask, enc.type_ids))


def test_the_text_fills_the_model_inputs_by_name_in_the_model_dtypes(setup):
    tok, models, _ = setup
    ex = models["classifier"][1]
    enc = T.encode(tok, SENTENCE, "a great film")
    feeds = T.model_feeds(ex, enc)
    assert enc.tokens == ["[CLS]", "the", "movie", "was", "wonder", "##ful", "!", "[SEP]", "a", "great", "film",
                          "[SEP]"]
    assert set(feeds) == {"input_ids", "attention_mask", "token_type_ids"}
    np.testing.assert_array_equal(feeds["token_type_ids"][0], [0] * 8 + [1] * 4)
    np.testing.assert_array_equal(feeds["input_ids"][0], enc.ids)
    assert all(v.dtype == np.int64 and v.shape == (1, 12) for v in feeds.values())
    assert enc.special.tolist() == [True] + [False] * 6 + [True] + [False] * 3 + [True]


def _torch_grad_at_embedding(model, enc, target):
    ids, mask, types = _torch_inputs(enc)
    e = model.word_emb(ids).detach().requires_grad_(True)
    saved = model.word_emb.forward
    model.word_emb.forward = lambda _ids: e
    try:
        out = model(ids, mask, types)
    finally:
        model.word_emb.forward = saved
    out[0, target].backward()
    return e.detach().numpy()[0].astype(np.float64), e.grad.numpy()[0].astype(np.float64)


@pytest.mark.parametrize("method", ["gradient", "input_x_gradient"])
def test_token_scores_at_the_embedding_equal_torch_autograd_for_both_reductions(setup, method):
    tok, models, _ = setup
    model, ex = models["classifier"]
    r = T.explain_text(ex, tok, SENTENCE, method=method, target=2, reduce="sum")
    x, g = _torch_grad_at_embedding(model, T.encode(tok, SENTENCE), 2)
    # sum: the signed sum over hidden of embedding x gradient, for the gradient as for x*g
    np.testing.assert_allclose(r.scores, (x * g).sum(-1), rtol=1e-4, atol=1e-6)
    assert r.reduction == "sum" and r.layer is not None
    # the raw gradient summed over hidden is (near) zero behind the LayerNorm: not what is reported
    if method == "gradient":
        assert np.abs(g.sum(-1)).max() < 1e-5 * np.abs(g).max() * D
        np.testing.assert_allclose(r.attribution, g, rtol=1e-4, atol=1e-6)
    l2 = T.explain_text(ex, tok, SENTENCE, method=method, target=2, reduce="l2")
    ref = np.linalg.norm(g if method == "gradient" else x * g, axis=-1)
    np.testing.assert_allclose(l2.scores, ref, rtol=1e-4, atol=1e-6)
    assert l2.reduction == "l2"


def test_layer_integrated_gradients_equal_captum_with_pad_baseline_ids_keeping_special_tokens(setup):
    from captum.attr import LayerIntegratedGradients

    tok, models, _ = setup
    model, ex = models["classifier"]
    r = T.explain_text(ex, tok, SENTENCE, method="integrated_gradients", target=1, n_steps=32)
    enc = T.encode(tok, SENTENCE)
    ids, mask, types = _torch_inputs(enc)
    base = torch.where(torch.tensor(enc.special)[None], ids, torch.full_like(ids, PAD))
    lig = LayerIntegratedGradients(model, model.word_emb)
    ref = lig.attribute(ids, baselines=base, target=1, additional_forward_args=(mask, types), n_steps=32)
    ref = ref.detach().numpy()[0].astype(np.float64)
    np.testing.assert_allclose(r.attribution, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(r.scores, ref.sum(-1), rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    assert "[PAD]" in r.baseline and "special tokens kept" in r.baseline


@pytest.mark.parametrize("words", [False, True])
def test_token_feature_ablation_equals_captum_with_the_same_mask_and_baseline(setup, words):
    from captum.attr import FeatureAblation

    tok, models, _ = setup
    model, ex = models["classifier"]
    r = T.explain_text(ex, tok, SENTENCE, method="feature_ablation", target=0, words=words)
    enc = T.encode(tok, SENTENCE)
    ids, mask, types = _torch_inputs(enc)
    base = torch.where(torch.tensor(enc.special)[None], ids, torch.full_like(ids, PAD))
    fmask = torch.tensor(T._feature_mask(enc, words))
    if words:  # wonder + ##ful are one feature
        assert fmask[0, 4] == fmask[0, 5] and len(set(fmask[0].tolist())) == len(enc) - 1
    ref = FeatureAblation(model).attribute(ids, baselines=base, target=0, feature_mask=fmask,
                                           additional_forward_args=(mask, types)).numpy()[0]
    np.testing.assert_allclose(r.scores, ref, rtol=1e-4, atol=1e-6)
    # special tokens are never perturbed: their score is exactly zero
    assert np.all(r.scores[enc.special] == 0)
    if words:
        merged = {w: s for w, _, s in r.words}
        assert merged["wonderful"] == pytest.approx(ref[4], rel=1e-4)  # the word is one feature: its drop


def test_token_kernel_shap_equals_captum_kernel_shap_on_the_same_coalitions(setup):
    from captum.attr import KernelShap

    from onnxplain.methods.surrogate import kernel_shap_coalitions

    tok, models, _ = setup
    model, ex = models["classifier"]
    enc = T.encode(tok, SENTENCE)
    m = len(enc)
    r = T.explain_text(ex, tok, SENTENCE, method="kernel_shap", target=1, n_samples=40, seed=5)
    z, _ = kernel_shap_coalitions(m, 40, np.random.default_rng(5))
    ids, mask, types = _torch_inputs(enc)
    base = torch.where(torch.tensor(enc.special)[None], ids, torch.full_like(ids, PAD))
    ks = KernelShap(model)

    def feed(_inputs, **_kw):
        for row in z:
            yield torch.tensor(row[None].astype(np.int64))

    ks.perturb_func = feed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = ks.attribute(ids, baselines=base, target=1, feature_mask=torch.arange(m)[None], n_samples=40,
                           additional_forward_args=(mask, types)).numpy()[0]
    np.testing.assert_allclose(r.scores, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())


def test_occlusion_and_lime_run_over_tokens_without_touching_special_tokens(setup):
    tok, models, _ = setup
    ex = models["classifier"][1]
    occ = T.explain_text(ex, tok, SENTENCE, method="occlusion", target=0)
    fa = T.explain_text(ex, tok, SENTENCE, method="feature_ablation", target=0)
    np.testing.assert_allclose(occ.scores, fa.scores, rtol=1e-5, atol=1e-7)  # a window of one token
    lime = T.explain_text(ex, tok, SENTENCE, method="lime", target=0, n_samples=64)
    assert lime.scores.shape == (len(occ.tokens),) and np.isfinite(lime.scores).all()
    with pytest.raises(OptionError, match="feature_ablation"):
        T.explain_text(ex, tok, SENTENCE, method="occlusion", words=True)


def test_a_text_target_explains_the_dot_product_of_mean_pooled_embeddings(setup):
    tok, models, _ = setup
    model, ex = models["encoder"]
    enc = T.encode(tok, SENTENCE)
    target = parse_target('text:"a great film"')
    seed, kind = T.text_target_seed(ex, tok, enc, T.model_feeds(ex, enc), target)
    assert "dot product" in kind and "not the cosine" in kind
    with torch.no_grad():
        h = model(*_torch_inputs(enc))[0].numpy().astype(np.float64)
        ref_enc = T.encode(tok, "a great film")
        hr = model(*_torch_inputs(ref_enc))[0].numpy().astype(np.float64)
    emb, ref = h.mean(0), hr.mean(0)  # every token unmasked: the mean over tokens
    np.testing.assert_allclose(seed[0], np.broadcast_to(ref / len(enc), h.shape), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose((seed[0] * h).sum(), emb @ ref, rtol=1e-5)
    # the gradient of that score through the whole model, reduced by sum, is torch's
    r = T.explain_text(ex, tok, SENTENCE, method="gradient", target='text:"a great film"')
    ids, mask, types = _torch_inputs(enc)
    e = model.word_emb(ids).detach().requires_grad_(True)
    saved = model.word_emb.forward
    model.word_emb.forward = lambda _ids: e
    try:
        score = (model(ids, mask, types)[0].mean(0) * torch.tensor(ref, dtype=torch.float32)).sum()
    finally:
        model.word_emb.forward = saved
    score.backward()
    want = (e.detach() * e.grad).sum(-1).numpy()[0]
    np.testing.assert_allclose(r.scores, want, rtol=1e-4, atol=1e-6)
    assert r.explained_score == pytest.approx(emb @ ref, rel=1e-4)
    assert r.target == 'text:"a great film"' and "dot product" in r.score_kind


def test_a_pooled_output_has_the_reference_embedding_as_its_seed(setup):
    tok, models, _ = setup
    model, ex = models["classifier"]  # (batch, 3): taken as a pooled embedding
    enc = T.encode(tok, SENTENCE)
    seed, _ = T.text_target_seed(ex, tok, enc, T.model_feeds(ex, enc), parse_target("text:good film"))
    with torch.no_grad():
        ref = model(*_torch_inputs(T.encode(tok, "good film")))[0].numpy()
    np.testing.assert_allclose(seed[0], ref, rtol=1e-5, atol=1e-7)


def test_words_merge_subword_tokens_and_special_tokens_stay_marked(setup):
    tok, models, _ = setup
    ex = models["classifier"][1]
    r = T.explain_text(ex, tok, SENTENCE, method="input_x_gradient", target=0)
    words = [w for w, _, _ in r.words]
    assert words == ["[CLS]", "The", "movie", "was", "wonderful", "!", "[SEP]"]
    w = dict((w, s) for w, _, s in r.words)
    assert w["wonderful"] == pytest.approx(r.scores[4] + r.scores[5])
    d = r.to_dict()
    assert [t["special"] for t in d["tokens"]][0] and SENTENCE[slice(*d["tokens"][4]["offsets"])] == "wonder"
    assert d["reduction"] == "sum" and d["method"] == "input_x_gradient"


def test_outputs_json_npy_npz_and_terminal_rendering(setup, tmp_path):
    tok, models, _ = setup
    ex = models["classifier"][1]
    r = T.explain_text(ex, tok, SENTENCE, method="gradient", target=0)
    d = json.loads(r.save(tmp_path / "a.json").read_text())
    assert [t["token"] for t in d["tokens"]] == r.tokens
    np.testing.assert_allclose([t["score"] for t in d["tokens"]], r.scores, rtol=1e-6)
    assert np.load(r.save(tmp_path / "a.npy")).shape == (len(r.tokens), D)
    z = np.load(r.save(tmp_path / "a.npz"))
    np.testing.assert_array_equal(z["ids"], r.ids)
    plain = T.render(r, color=False)
    assert "\x1b[" not in plain and "[CLS](" in plain and "wonder(" in plain
    coloured = T.render(r, color=True)
    assert "\x1b[48;5;" in coloured
    with pytest.raises(OptionError, match=".html, .json"):
        r.save(tmp_path / "a.png")


def _page(setup, tmp_path):
    tok, models, _ = setup
    ex = models["classifier"][1]
    r = T.explain_text(ex, tok, SENTENCE, method="integrated_gradients", target=0, n_steps=16)
    return r, r.save(tmp_path / "why.html")


def test_the_html_page_has_one_span_per_token_with_its_score_and_sign_coloured(setup, tmp_path):
    import re

    r, page = _page(setup, tmp_path)
    text = page.read_text()
    spans = re.findall(r'<span class="tok[^"]*" data-index="(\d+)" data-score="([^"]+)"[^>]*'
                       r'style="background:rgba\((\d+),', text)
    assert [int(i) for i, _, _ in spans] == list(range(len(r.tokens)))
    for (_, s, red), want in zip(spans, r.scores):
        assert float(s) == pytest.approx(want, rel=1e-5, abs=1e-9)
        assert (red == "220") == (want >= 0)  # red for, blue against
    assert "Top tokens" in text and "http" not in text.replace("http-equiv", "")  # self-contained


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason="chromium is not installed at /usr/bin/chromium "
                    "(.ci/run installs it with apt-get); the screenshot test needs it")
def test_the_html_page_renders_in_headless_chromium(setup, tmp_path):
    from PIL import Image

    _, page = _page(setup, tmp_path)
    shot, profile = tmp_path / "shot.png", tmp_path / "profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-dev-shm-usage", "--disable-extensions", "--disable-background-networking",
           f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1000,800", page.resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=90, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    red = (img[..., 0] > 200) & (img[..., 1] < 170) & (img[..., 2] < 170)
    blue = (img[..., 2] > 200) & (img[..., 0] < 170)
    assert red.sum() > 200 or blue.sum() > 200, "no highlighted token on the page"
    if os.environ.get("ONNXPLAIN_TEXT_SHOT"):
        Image.open(shot).save(os.environ["ONNXPLAIN_TEXT_SHOT"])


def test_exporters_agree_on_the_token_scores(setup, tmp_path):
    tok, models, _ = setup
    model, ex = models["classifier"]
    dyn = Explainer(str(export(model, tmp_path / "dynamo.onnx", dynamo=True)))
    a = T.explain_text(ex, tok, SENTENCE, method="gradient", target=2)
    b = T.explain_text(dyn, tok, SENTENCE, method="gradient", target=2)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-6)


def test_a_missing_tokenizer_and_an_unknown_reduction_are_clear_errors(setup, tmp_path):
    tok, models, _ = setup
    with pytest.raises(Exception, match="tokenizer file not found"):
        T.load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(OptionError, match="sum or l2"):
        T.explain_text(models["classifier"][1], tok, SENTENCE, reduce="mean")


def test_the_explain_text_command_writes_the_page_and_prints_the_tokens(setup, tmp_path):
    from click.testing import CliRunner

    from onnxplain.cli import main

    tok, _, folder = setup
    out = tmp_path / "why.json"
    res = CliRunner().invoke(main, ["explain-text", str(folder / "encoder.onnx"), "--text", SENTENCE,
                                    "-t", 'text:"a great film"', "-m", "integrated_gradients", "-O", "n_steps=8",
                                    "--tokenizer", str(tok), "--no-color", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "[CLS](" in res.output and "dot product" in res.output and f"wrote {out}" in res.output
    d = json.loads(out.read_text())
    assert d["method"] == "integrated_gradients" and d["target"] == 'text:"a great film"'
    assert len(d["tokens"]) == 8 and d["tokens"][0]["special"]
    bad = CliRunner().invoke(main, ["explain-text", str(folder / "encoder.onnx"), "--text", SENTENCE,
                                    "--tokenizer", str(tok), "-o", str(tmp_path / "x.png")])
    assert bad.exit_code != 0 and ".html" in bad.output


def test_a_text_pair_is_explained_with_type_ids_one_and_its_words_read_from_the_pair(setup):
    tok, models, _ = setup
    model, ex = models["classifier"]
    r = T.explain_text(ex, tok, SENTENCE, "a great film", method="gradient", target=1)
    enc = T.encode(tok, SENTENCE, "a great film")
    x, g = _torch_grad_at_embedding(model, enc, 1)
    np.testing.assert_allclose(r.scores, (x * g).sum(-1), rtol=1e-4, atol=1e-6)
    assert [w for w, _, _ in r.words][-4:] == ["a", "great", "film", "[SEP]"]
    assert r.sequence_ids[-2] == 1 and r.to_dict()["text_pair"] == "a great film"


class PositionNet(TextNet):
    """TextNet taking its position ids as a fourth input (as many BERT exports do)."""

    def forward(self, input_ids, attention_mask, token_type_ids, position_ids):
        h = self.ln(self.word_emb(input_ids) + self.pos_emb(position_ids) + self.type_emb(token_type_ids))
        m = attention_mask[:, :, None].float()
        return self.out((h * m).sum(1) / m.sum(1))


def test_position_ids_are_filled_when_the_model_takes_them(setup, tmp_path):
    tok = setup[0]
    model = PositionNet().eval()
    ids = torch.tensor([[CLS, 5, 6, SEP]])
    names = ["input_ids", "attention_mask", "token_type_ids", "position_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids), torch.arange(4)[None]),
                          str(tmp_path / "pos.onnx"), dynamo=False, opset_version=17, input_names=names,
                          output_names=["out"], dynamic_axes={n: {0: "batch", 1: "tokens"} for n in names})
    ex = Explainer(str(tmp_path / "pos.onnx"))
    enc = T.encode(tok, SENTENCE)
    feeds = T.model_feeds(ex, enc)
    np.testing.assert_array_equal(feeds["position_ids"], np.arange(len(enc))[None])
    r = T.explain_text(ex, tok, SENTENCE, method="gradient", target=0)
    e = model.word_emb(torch.tensor(enc.ids[None])).detach().requires_grad_(True)
    h = model.ln(e + model.pos_emb(torch.arange(len(enc))[None]) + model.type_emb(torch.zeros_like(e[..., 0]).long()))
    model.out(h.mean(1))[0, 0].backward()
    np.testing.assert_allclose(r.scores, (e.detach() * e.grad).sum(-1).numpy()[0], rtol=1e-4, atol=1e-6)


class UnitNet(TextNet):
    """A sentence encoder whose output is the L2-normalised mean-pooled embedding (batch, hidden)."""

    def __init__(self):
        super().__init__(encoder=True)

    def forward(self, input_ids, attention_mask, token_type_ids):
        h = super().forward(input_ids, attention_mask, token_type_ids)
        m = attention_mask[:, :, None].float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def test_a_text_target_on_unit_norm_embeddings_says_the_dot_product_is_the_cosine(setup, tmp_path):
    tok = setup[0]
    model = UnitNet().eval()
    ex = Explainer(str(export(model, tmp_path / "unit.onnx")))
    r = T.explain_text(ex, tok, SENTENCE, method="gradient", target="text:a great film")
    assert "= the cosine" in r.score_kind
    with torch.no_grad():
        a = model(*_torch_inputs(T.encode(tok, SENTENCE)))[0].numpy()
        b = model(*_torch_inputs(T.encode(tok, "a great film")))[0].numpy()
    assert r.explained_score == pytest.approx(float(a @ b), rel=1e-5)


def test_explain_with_text_passes_through_to_the_token_explanation(setup, tmp_path):
    from click.testing import CliRunner

    from onnxplain.cli import main

    tok, _, folder = setup
    out = tmp_path / "why.html"
    res = CliRunner().invoke(main, ["explain", str(folder / "encoder.onnx"), "--text", SENTENCE, "-t",
                                    'text:"a great film"', "-m", "integrated_gradients", "-O", "n_steps=8",
                                    "--tokenizer", str(tok), "--reduce", "l2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "reduction l2" in res.output and out.is_file() and 'data-score="' in out.read_text()
