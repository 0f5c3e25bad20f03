"""Attention explanations (rollout, generic attention, transformer attribution) against
numpy implementations of the published equations on the attention maps, gradients and
relevance torch computes for the same models, for both exporters, eager and SDPA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import transformer_zoo as tz
from onnxplain import Explainer
from onnxplain.errors import ModelError
from onnxplain.methods.transformers import attention_maps

TARGET = 2
EXPORTS = [("torchscript", False), ("torchscript", True), ("dynamo", False), ("dynamo", True)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("attention")
    cache = {}

    def get(kind, exporter, sdpa):
        key = (kind, exporter, sdpa)
        if key not in cache:
            model = (tz.TinyEncoder if kind == "text" else tz.TinyViT)(sdpa=sdpa).eval()
            x = model.example()
            path = tz.export(model, folder / f"{kind}_{exporter}_{sdpa}.onnx", exporter, x)
            cache[key] = (model, x, Explainer(str(path)))
        return cache[key]

    return get


# ----------------------------------------------------------------------------- the published equations
def numpy_rollout(maps):
    """Abnar & Zuidema 2020: A_hat = 0.5 mean_h(A) + 0.5 I, rows renormalised;
    rollout = A_hat_L ... A_hat_1."""
    t = maps[0].shape[-1]
    out = np.stack([np.eye(t)] * maps[0].shape[0])
    for a in maps:
        a_hat = 0.5 * a.mean(axis=1) + 0.5 * np.eye(t)
        a_hat /= a_hat.sum(axis=-1, keepdims=True)
        out = np.einsum("bij,bjk->bik", a_hat, out)
    return out


def numpy_chefer(weights):
    """Chefer et al. 2021: R = I; R <- R + mean_h((W)+) R for each layer, in order."""
    t = weights[0].shape[-1]
    out = np.stack([np.eye(t)] * weights[0].shape[0])
    for w in weights:
        out = out + np.einsum("bij,bjk->bik", np.clip(w, 0, None).mean(axis=1), out)
    return out


@pytest.mark.parametrize("exporter,sdpa", EXPORTS)
def test_attention_maps_are_found_per_layer_with_their_heads(exported, exporter, sdpa):
    model, x, ex = exported("text", exporter, sdpa)
    names = attention_maps(ex.graph)
    assert len(names) == 2
    maps, _ = tz.attention_maps(model, x)
    values = ex.forward(x.numpy(), names)
    for name, ref in zip(names, maps):
        np.testing.assert_allclose(values[name], ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("exporter,sdpa", EXPORTS)
def test_attention_rollout_equals_numpy_rollout(exported, exporter, sdpa):
    model, x, ex = exported("text", exporter, sdpa)
    maps, _ = tz.attention_maps(model, x)
    ours = ex.attribute(x.numpy(), method="attention_rollout", target=TARGET)
    ref = numpy_rollout(maps)
    assert ours.shape == (2, tz.TinyEncoder.tokens)
    np.testing.assert_allclose(ours, ref[:, 0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ex.attribute(x.numpy(), method="attention_rollout", query="mean"), ref.mean(axis=1),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("exporter,sdpa", EXPORTS)
def test_generic_attention_equals_numpy_on_torch_gradients(exported, exporter, sdpa):
    model, x, ex = exported("text", exporter, sdpa)
    maps, grads = tz.attention_maps(model, x, TARGET)
    ours = ex.attribute(x.numpy(), method="generic_attention", target=TARGET)
    ref = numpy_chefer([g * a for g, a in zip(grads, maps)])[:, 0]
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("exporter,sdpa", [EXPORTS[0], EXPORTS[3]])
def test_transformer_attribution_equals_numpy_on_torch_attnlrp_relevance(exported, exporter, sdpa):
    model, x, ex = exported("text", exporter, sdpa)
    maps, grads = tz.attention_maps(model, x, TARGET)
    _, modified = tz.attention_maps(model, x, TARGET, tz.ATTNLRP)
    relevance = [a * g for a, g in zip(maps, modified)]  # AttnLRP relevance of each map
    ours = ex.attribute(x.numpy(), method="transformer_attribution", target=TARGET)
    ref = numpy_chefer([g * r for g, r in zip(grads, relevance)])[:, 0]
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())


def test_attention_products_as_einsum_are_found(tmp_path):
    model = tz.TinyEncoder().eval()
    for blk in model.blocks:
        blk.einsum = True
    x = model.example()
    ex = Explainer(str(tz.export(model, tmp_path / "einsum.onnx", "torchscript", x)))
    maps, grads = tz.attention_maps(model, x, TARGET)
    np.testing.assert_allclose(ex.attribute(x.numpy(), method="attention_rollout"), numpy_rollout(maps)[:, 0],
                               rtol=1e-4, atol=1e-6)
    ref = numpy_chefer([g * a for g, a in zip(grads, maps)])[:, 0]
    np.testing.assert_allclose(ex.attribute(x.numpy(), method="generic_attention", target=TARGET), ref, rtol=1e-3,
                               atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("exporter,sdpa", [EXPORTS[0], EXPORTS[3]])
@pytest.mark.parametrize("method", ["attention_rollout", "generic_attention"])
def test_vit_cls_row_maps_onto_the_patch_grid_and_upsamples_to_the_image(exported, exporter, sdpa, method):
    model, x, ex = exported("vit", exporter, sdpa)
    maps, grads = tz.attention_maps(model, x, TARGET)
    matrix = numpy_rollout(maps) if method == "attention_rollout" else numpy_chefer(
        [g * a for g, a in zip(grads, maps)])
    side = model.size // model.patch
    grid = matrix[:, 0, 1:].reshape(-1, 1, side, side)
    coarse = ex.attribute(x.numpy(), method=method, target=TARGET, upsample=False)
    np.testing.assert_allclose(coarse, grid, rtol=1e-3, atol=1e-5 * np.abs(grid).max())
    fine = ex.attribute(x.numpy(), method=method, target=TARGET)
    assert fine.shape == (2, 1, model.size, model.size)
    up = F.interpolate(torch.from_numpy(grid), size=(model.size, model.size), mode="bilinear",
                       align_corners=False).numpy()
    np.testing.assert_allclose(fine, up, rtol=1e-3, atol=1e-5 * np.abs(up).max())


def test_attention_inside_the_attention_operator_is_refused_with_what_to_do(tmp_path):
    model = tz.TinyEncoder(sdpa=True).eval()
    x = model.example()
    ex = Explainer(str(tz.export(model, tmp_path / "attention23.onnx", "dynamo", x, opset=23)))
    assert any(n.op_type == "Attention" for n in ex.graph.nodes)
    with pytest.raises(ModelError, match="inside Attention operators.*opset before 23"):
        ex.attribute(x.numpy(), method="generic_attention", target=TARGET)


def test_a_model_without_attention_is_refused_by_name(tmp_path):
    import zoo

    ex = Explainer(str(zoo.export(zoo.MLP().eval(), tmp_path / "mlp.onnx", "torchscript")))
    with pytest.raises(ModelError, match="no attention maps"):
        ex.attribute(np.zeros((1, 12), np.float32), method="attention_rollout")


@pytest.mark.parametrize("method", ["attention_rollout", "generic_attention", "transformer_attribution"])
def test_gpt2_eager_and_sdpa_exports_give_the_same_scores_with_padding(tmp_path, method):
    """A padded GPT-2 batch masks whole attention rows: the SDPA export's softmax gives NaN
    there and zeroes it by a Where (eager attention: a uniform row); the maps are read after
    it, as the values see them. The last token attends to no padding: its row agrees."""
    pytest.importorskip("transformers")
    scores = {}
    for attn in ("eager", "sdpa"):
        ex, feeds, seed, _ = tz.hf_model("gpt2", tmp_path / f"gpt2_{attn}.onnx", attn)
        assert len(attention_maps(ex.graph)) == 2
        scores[attn] = ex.attribute(feeds, method=method, target=seed, query="-1")
        assert scores[attn].shape == (2, 8) and np.all(np.isfinite(scores[attn]))
    np.testing.assert_allclose(scores["sdpa"], scores["eager"], rtol=1e-3, atol=1e-5)
