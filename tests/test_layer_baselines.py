"""Baselines at a layer: a model fed token ids has its baseline formed at the embedding.

Token ids cannot move along a path, so integrated gradients and DeepLIFT at the embedding
output take their baseline there: the embedding of baseline ids (`baseline_ids`, PAD id 0
by default, `keep_ids` kept from the input as Captum's recipe keeps CLS and SEP), or a
value given at the layer (`layer_baseline`). A baseline that equals the input at the
attributed tensor (all attributions zero, silently, before this) is an OptionError.
References: Captum's LayerIntegratedGradients(model, model.emb, baselines=PAD ids) and its
IntegratedGradients on the model from the embedding on, for models exported by both
torch.onnx.export paths; DeepLIFT by summation-to-delta.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from onnxplain.errors import OptionError
from onnxplain.explainer import Explainer

nn = torch.nn
EXPORTERS = ("torchscript", "dynamo")
VOCAB, T, D = 40, 7, 8
PAD, CLS, SEP = 0, 1, 2


def _masked_mean(h, mask):
    m = mask[:, :, None].float()
    return (h * m).sum(1) / m.sum(1)


class PoolNet(nn.Module):
    """Embedding -> tanh -> mean over the unmasked positions -> linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, D)
        self.out, self.act = nn.Linear(D, 3), nn.Tanh()  # a module: Captum's DeepLift hooks modules only

    def after(self, e, mask):
        return self.out(_masked_mean(self.act(e), mask))

    def forward(self, ids, mask):
        return self.after(self.emb(ids), mask)


class BlockNet(nn.Module):
    """A tiny transformer encoder: token + position embeddings, LayerNorm, one attention
    head with a padding mask, a GELU MLP, residual sums, masked mean pooling, a classifier."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.emb = nn.Embedding(VOCAB, D)
        self.pos = nn.Parameter(0.3 * torch.randn(T, D))
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D))
        self.out = nn.Linear(D, 3)

    def after(self, e, mask):
        h = self.ln1(e + self.pos)
        scores = self.q(h) @ self.k(h).transpose(1, 2) / D ** 0.5
        scores = scores + (1.0 - mask[:, None, :].float()) * -1e4
        h = h + torch.softmax(scores, -1) @ self.v(h)
        h = h + self.mlp(self.ln2(h))
        return self.out(_masked_mean(h, mask))

    def forward(self, ids, mask):
        return self.after(self.emb(ids), mask)


class SiluNet(PoolNet):
    """Embedding -> linear -> SiLU -> mean -> linear: a decomposed activation after the layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.mid, self.act = nn.Linear(D, D), nn.SiLU()

    def after(self, e, mask):
        return self.out(_masked_mean(self.act(self.mid(e)), mask))


MODELS = {"pool": PoolNet, "block": BlockNet, "silu": SiluNet}


def _export(model, path, exporter):
    ids = torch.randint(3, VOCAB, (2, T))
    mask = torch.ones(2, T, dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch")
            torch.onnx.export(model, (ids, mask), str(path), dynamo=True, input_names=["input_ids", "attention_mask"],
                              output_names=["logits"], dynamic_shapes={"ids": {0: batch}, "mask": {0: batch}},
                              verbose=False)
        else:
            torch.onnx.export(model, (ids, mask), str(path), dynamo=False, opset_version=17,
                              input_names=["input_ids", "attention_mask"], output_names=["logits"],
                              dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"},
                                            "logits": {0: "batch"}})
    return path


@pytest.fixture(scope="module")
def token_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("token_models")
    cache = {}

    def get(name, exporter):
        if (name, exporter) not in cache:
            model = MODELS[name]().eval()
            for p in model.parameters():
                p.requires_grad_(False)
            cache[(name, exporter)] = model, Explainer(str(_export(model, folder / f"{name}_{exporter}.onnx",
                                                                    exporter)))
        return cache[(name, exporter)]

    return get


def _embedding_output(ex) -> str:
    """The output of the Gather from the embedding table, found as a user would in `inspect`."""
    hits = [n.output[0] for n in ex.graph.nodes if n.op_type == "Gather" and ex.graph.constant(n.input[0]) is not None
            and ex.graph.constant(n.input[0]).shape == (VOCAB, D)]
    assert len(hits) == 1
    return hits[0]


def _tokens(n=3, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(n, T))
    ids[:, 0], ids[:, -1] = CLS, SEP
    mask = np.ones((n, T), dtype=np.int64)
    ids[1, -2:], mask[1, -2:] = PAD, 0  # a padded row
    return ids.astype(np.int64), mask


def _feeds(ids, mask):
    return {"input_ids": ids, "attention_mask": mask}


def _captum_layer_ig(model, ids, mask, base_ids, target):
    from captum.attr import LayerIntegratedGradients

    lig = LayerIntegratedGradients(model, model.emb)
    out = lig.attribute(torch.tensor(ids), baselines=torch.tensor(base_ids), target=target,
                        additional_forward_args=(torch.tensor(mask),), n_steps=50)
    return out.detach().numpy()


def _close(ours, ref, rtol=1e-4):
    # float32 through a LayerNorm and a softmax: ~1e-6 of the largest attribution
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=1e-5 * np.abs(ref).max())


# ----------------------------------------------------------------------------- integrated gradients
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["pool", "block"])
def test_layer_integrated_gradients_at_the_embedding_agree_with_captum_on_pad_baseline_ids(token_models, name,
                                                                                            exporter):
    model, ex = token_models(name, exporter)
    ids, mask = _tokens()
    layer = _embedding_output(ex)
    target = [0, 2, 1]
    ours = ex.attribute(_feeds(ids, mask), method="integrated_gradients", layer=layer, target=target)
    ref = _captum_layer_ig(model, ids, mask, np.full_like(ids, PAD), torch.tensor(target))
    assert np.abs(ref).max() > 1e-3  # a real signal, not the silent zeros of before
    _close(ours, ref)
    # The default is the PAD id 0, said explicitly the same.
    again = ex.attribute(_feeds(ids, mask), method="integrated_gradients", layer=layer, target=target,
                         baseline_ids=PAD)
    np.testing.assert_array_equal(ours, again)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_layer_integrated_gradients_keep_special_tokens_as_captum_recipe(token_models, exporter):
    model, ex = token_models("block", exporter)
    ids, mask = _tokens(seed=1)
    layer = _embedding_output(ex)
    ours = ex.attribute(_feeds(ids, mask), method="integrated_gradients", layer=layer, target=1,
                        baseline_ids=PAD, keep_ids=[CLS, SEP])
    base = np.where(np.isin(ids, [CLS, SEP]), ids, PAD)
    ref = _captum_layer_ig(model, ids, mask, base, 1)
    _close(ours, ref)
    # CLS and SEP did not move: nothing is attributed to them.
    assert np.all(ours[:, 0] == 0) and np.all(ours[0, -1] == 0)
    # Full baseline ids given by the caller (one sample's, for every row) are the same thing.
    full = ex.attribute(_feeds(ids, mask), method="integrated_gradients", layer=layer, target=1,
                        baseline_ids=[CLS] + [PAD] * (T - 2) + [SEP])
    ref_full = _captum_layer_ig(model, ids, mask, np.broadcast_to([CLS] + [PAD] * (T - 2) + [SEP], ids.shape), 1)
    _close(full, ref_full)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_a_baseline_given_at_the_layer_agrees_with_captum_from_the_embedding_on(token_models, exporter):
    from captum.attr import IntegratedGradients

    model, ex = token_models("block", exporter)
    ids, mask = _tokens(seed=2)
    layer = _embedding_output(ex)
    at = np.random.default_rng(3).normal(size=(T, D)).astype(np.float32) * 0.2
    ours = ex.attribute(_feeds(ids, mask), method="integrated_gradients", layer=layer, target=2, layer_baseline=at)
    e = model.emb(torch.tensor(ids))
    m = (torch.tensor(mask),)
    ref = IntegratedGradients(model.after).attribute(e, baselines=torch.tensor(at)[None].expand_as(e).contiguous(),
                                                     target=2, additional_forward_args=m, n_steps=50)
    ref = ref.detach().numpy()
    _close(ours, ref)
    # A number is a baseline for every element of the layer.
    zero = ex.attribute(_feeds(ids, mask), method="integrated_gradients", layer=layer, target=2, layer_baseline=0.0)
    ref0 = IntegratedGradients(model.after).attribute(e, baselines=torch.zeros_like(e), target=2,
                                                      additional_forward_args=m, n_steps=50).detach().numpy()
    _close(zero, ref0)


# ----------------------------------------------------------------------------- DeepLIFT
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["pool", "silu"])
def test_deeplift_at_the_embedding_sums_to_the_output_difference_from_the_baseline_ids(token_models, name,
                                                                                       exporter):
    model, ex = token_models(name, exporter)
    ids, mask = _tokens(seed=4)
    layer = _embedding_output(ex)
    for kw, base in [({}, np.full_like(ids, PAD)),
                     ({"baseline_ids": 5, "keep_ids": [CLS, SEP]}, np.where(np.isin(ids, [CLS, SEP]), ids, 5))]:
        ours = ex.attribute(_feeds(ids, mask), method="deeplift", layer=layer, target=0, **kw)
        delta = ex.predict(_feeds(ids, mask))[:, 0] - ex.predict(_feeds(base, mask))[:, 0]
        assert np.abs(delta).min() > 1e-4
        np.testing.assert_allclose(ours.reshape(3, -1).sum(1), delta, rtol=1e-5, atol=1e-6, err_msg=str(kw))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_deeplift_with_a_baseline_at_the_layer_sums_to_the_output_difference(token_models, exporter):
    model, ex = token_models("silu", exporter)
    ids, mask = _tokens(seed=5)
    layer = _embedding_output(ex)
    at = np.random.default_rng(6).normal(size=(T, D)).astype(np.float32)
    ours = ex.attribute(_feeds(ids, mask), method="deeplift", layer=layer, target=1, layer_baseline=at)
    with torch.no_grad():
        e = model.emb(torch.tensor(ids))
        m = torch.tensor(mask)
        delta = (model.after(e, m) - model.after(torch.tensor(at)[None].expand_as(e), m))[:, 1].numpy()
    np.testing.assert_allclose(ours.reshape(3, -1).sum(1), delta, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- never a silent zero
@pytest.mark.parametrize("method", ["integrated_gradients", "deeplift"])
def test_a_baseline_equal_to_the_input_at_the_layer_is_an_error_naming_the_options(token_models, method):
    _, ex = token_models("pool", "torchscript")
    ids, mask = _tokens()
    layer = _embedding_output(ex)
    with pytest.raises(OptionError, match="baseline equals the input.*(baseline_ids|layer_baseline)"):
        # Baseline ids equal to the input's ids: the same value at the layer.
        ex.attribute(_feeds(ids, mask), method=method, layer=layer, target=0, baseline_ids=ids[:1],
                     keep_ids=list(range(VOCAB)))
    # The same for float inputs: a baseline equal to the input (a whole batch of it).
    x = np.random.default_rng(0).normal(size=(1, 4)).astype(np.float32)
    with pytest.raises(OptionError, match="baseline equals the input.*option baseline"):
        _float_model_explainer().attribute(x, method=method, target=0, baseline=x)


def _float_model_explainer():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).eval()
    import io

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 4),), buf, dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    return Explainer(buf.getvalue())


@pytest.mark.parametrize("method", ["conductance", "neuron_conductance"])
def test_path_methods_on_a_model_fed_only_token_ids_say_what_to_use(token_models, method):
    _, ex = token_models("pool", "torchscript")
    ids, mask = _tokens()
    layer = _embedding_output(ex)
    opts = {"neuron": (0,)} if method == "neuron_conductance" else {}
    with pytest.raises(OptionError, match="integrated_gradients or deeplift with layer="):
        ex.attribute(_feeds(ids, mask), method=method, layer=layer, target=0, **opts)


def test_baseline_ids_name_the_input_they_replace_and_are_checked(token_models):
    model, ex = token_models("pool", "torchscript")
    ids, mask = _tokens()
    layer = _embedding_output(ex)
    by_name = ex.attribute(_feeds(ids, mask), method="integrated_gradients", layer=layer, target=0,
                           baseline_ids={"input_ids": 4})
    ref = _captum_layer_ig(model, ids, mask, np.full_like(ids, 4), 0)
    _close(by_name, ref)
    with pytest.raises(OptionError, match="not an integer input"):
        ex.attribute(_feeds(ids, mask), method="integrated_gradients", layer=layer, target=0,
                     baseline_ids={"tokens": 4})
    with pytest.raises(OptionError, match="baseline_ids"):
        ex.attribute(_feeds(ids, mask), method="integrated_gradients", layer=layer, target=0, baseline_ids="0.5")
    with pytest.raises(OptionError, match="baseline_ids"):
        ex.attribute(_feeds(ids, mask), method="integrated_gradients", layer=layer, target=0, baseline_ids=[0, 1])


def test_a_model_with_float_inputs_keeps_its_token_ids_unless_baseline_ids_are_given(tmp_path):
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(3)
            self.emb = nn.Embedding(VOCAB, D)
            self.lin = nn.Linear(4, D)

        def forward(self, x, ids):
            return torch.tanh(self.emb(ids).mean(1) + self.lin(x))

    model = Mixed().eval()
    path = tmp_path / "mixed.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 4), torch.randint(0, VOCAB, (2, T))), str(path), dynamo=False,
                          opset_version=17, input_names=["x", "ids"], dynamic_axes={"x": {0: "b"}, "ids": {0: "b"}})
    ex = Explainer(str(path))
    x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    ids, _ = _tokens(n=2)
    layer = [n.output[0] for n in ex.graph.nodes if n.op_type == "Add"][0]  # embedding mean + linear
    feeds = {"x": x, "ids": ids}
    held = ex.attribute(feeds, method="integrated_gradients", layer=layer, target=0)
    both = ex.attribute(feeds, method="integrated_gradients", layer=layer, target=0, baseline_ids=PAD)
    with torch.no_grad():
        xt, it = torch.tensor(x), torch.tensor(ids)
        full = model(xt, it)[:, 0].numpy()
        floats_moved = full - model(torch.zeros(2, 4), it)[:, 0].numpy()
        all_moved = full - model(torch.zeros(2, 4), torch.zeros_like(it))[:, 0].numpy()
    # Completeness (50 Gauss-Legendre points): the ids held, then the ids moved to PAD too.
    np.testing.assert_allclose(held.sum(1), floats_moved, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(both.sum(1), all_moved, rtol=1e-3, atol=1e-5)
    assert np.abs(floats_moved - all_moved).min() > 1e-3


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["pool", "silu"])
def test_deeplift_at_the_embedding_agrees_with_captum_layer_deeplift(token_models, name, exporter, monkeypatch):
    from captum.attr import LayerDeepLift
    from captum.attr._core import deep_lift

    # Captum rescales SiLU only when listed with its own rule (else it takes the gradient).
    monkeypatch.setitem(deep_lift.SUPPORTED_NON_LINEAR, nn.SiLU, deep_lift.nonlinear)
    model, ex = token_models(name, exporter)
    ids, mask = _tokens(seed=6)
    ours = ex.attribute(_feeds(ids, mask), method="deeplift", layer=_embedding_output(ex), target=2)
    ref = LayerDeepLift(model, model.emb).attribute(torch.tensor(ids), baselines=torch.zeros_like(torch.tensor(ids)),
                                                    target=2, additional_forward_args=(torch.tensor(mask),))
    ref = ref.detach().numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("method", ["integrated_gradients", "deeplift"])
def test_layer_baseline_options_need_a_layer_and_one_way_of_forming_it(token_models, method):
    _, ex = token_models("pool", "torchscript")
    ids, mask = _tokens()
    layer = _embedding_output(ex)
    x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    with pytest.raises(OptionError, match="layer_baseline .*give layer="):
        _float_model_explainer().attribute(x, method=method, target=0, layer_baseline=0.0)
    with pytest.raises(OptionError, match="either layer_baseline .* or baseline_ids"):
        ex.attribute(_feeds(ids, mask), method=method, layer=layer, target=0, layer_baseline=0.0, baseline_ids=3)


def test_deeplift_warns_where_a_transformer_has_no_multiplier_but_not_for_products_with_the_mask(token_models):
    _, ex = token_models("block", "torchscript")
    ids, mask = _tokens()
    with pytest.warns(UserWarning, match="no rescale rule for LayerNormalization, MatMul, Softmax on") as seen:
        ex.attribute(_feeds(ids, mask), method="deeplift", layer=_embedding_output(ex), target=0)
    assert len([w for w in seen if "deeplift" in str(w.message)]) == 1
